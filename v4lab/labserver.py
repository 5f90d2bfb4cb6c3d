"""``make lab``: JupyterLab on 127.0.0.1 with a fresh token that other local users cannot read.

    python -m v4lab.labserver --port 8888 --root notebooks

The token reaches Jupyter through the ``JUPYTER_TOKEN`` environment variable, never the command line:
any local user can read another process's ``/proc/PID/cmdline`` (``ps``), but ``/proc/PID/environ`` only
its owner. The printed URL carries the port the server really binds: a busy port is refused in one line
(exit 2) and Jupyter is started with ``--ServerApp.port_retries=0``, so it cannot silently move to the next
port if another program takes this one in between.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from v4lab.errors import OneLineParser

HOST = "127.0.0.1"


def port_free(port: int, host: str = HOST) -> bool:
    """Whether ``host:port`` can be bound now (with SO_REUSEADDR, as the server's own socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def command(port: int, root: str | Path) -> list[str]:
    """The ``jupyter lab`` command line: loopback only, this port or nothing, no token on it."""
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", HOST, "--port", str(port),
           "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ValueError(f"--port = {text!r}: must be a TCP port number in [1, 65535]")
    return port


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab.labserver", description=__doc__.split("\n")[0])
    p.add_argument("--port", default="8888")
    p.add_argument("--root", default="notebooks", help="the folder JupyterLab opens")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        port = _port(args.port)
    except ValueError as e:
        sys.stderr.write(f"v4lab.labserver: error: {e}\n")
        return 2
    if not port_free(port):
        sys.stderr.write(f"v4lab.labserver: error: port {port} on {HOST} is in use; pick another with "
                         f"make lab PORT=<free port>\n")
        return 2
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_TOKEN=token)
    print(f"\nJupyterLab: http://{HOST}:{port}/lab?token={token}\n", flush=True)
    cmd = command(port, args.root)
    os.execvpe(cmd[0], cmd, env)          # replaces this process: Ctrl-C goes straight to Jupyter
    return 0                              # not reached


if __name__ == "__main__":
    raise SystemExit(main())

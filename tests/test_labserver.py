"""`make lab` (v4lab.labserver): the token never appears on a command line, and the printed URL is the
port the server really uses (a busy port is refused in one line, Jupyter may not move to another)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lab_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("lab:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_makefile_lab_passes_no_token_on_the_command_line():
    recipe = " ".join(_lab_recipe())
    assert "token" not in recipe.lower(), recipe
    assert "v4lab.labserver" in recipe and "$(PORT)" in recipe, recipe


def _listening_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_a_busy_port_is_refused_in_one_line(capsys, monkeypatch, tmp_path):
    from v4lab import labserver
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("must not start Jupyter on a busy port"))
    with _listening_socket() as s:
        port = s.getsockname()[1]
        rc = labserver.main(["--port", str(port), "--root", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and f"port {port}" in err and "PORT=" in err, err


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_port_values(capsys, tmp_path, port):
    from v4lab import labserver
    rc = labserver.main(["--port", port, "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--port" in err, err


def test_token_goes_through_the_environment(capsys, monkeypatch, tmp_path):
    from v4lab import labserver
    seen = {}

    def fake_exec(file, argv, env):
        seen.update(file=file, argv=argv, env=env)
        raise SystemExit(0)
    monkeypatch.setattr(os, "execvpe", fake_exec)
    with _listening_socket() as s:               # find a free port, then release it
        port = s.getsockname()[1]
    with pytest.raises(SystemExit):
        labserver.main(["--port", str(port), "--root", str(tmp_path)])
    out = capsys.readouterr().out
    m = re.search(r"http://127\.0\.0\.1:(\d+)/lab\?token=([0-9a-f]{32})", out)
    assert m and int(m.group(1)) == port, out
    token = m.group(2)
    assert seen["env"]["JUPYTER_TOKEN"] == token
    assert not any(token in a for a in seen["argv"]), seen["argv"]
    assert "--ServerApp.port_retries=0" in seen["argv"] and str(port) in seen["argv"]
    assert "--ip" in seen["argv"] and "127.0.0.1" in seen["argv"]


@pytest.mark.slow
def test_real_server_uses_the_printed_url_and_hides_the_token(tmp_path):
    with _listening_socket() as s:
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    env.pop("JUPYTER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "v4lab.labserver", "--port", str(port), "--root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = ""
        while "token=" not in url:
            url = proc.stdout.readline()
            assert url or proc.poll() is None
        token = url.strip().rsplit("token=", 1)[1]
        base = f"http://127.0.0.1:{port}/api/status"
        deadline, status = time.time() + 120, None
        while time.time() < deadline:
            try:
                status = urllib.request.urlopen(f"{base}?token={token}", timeout=5).status
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base, timeout=5)
        assert e.value.code == 403
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert token not in cmdline and "port_retries=0" in cmdline
        assert oct(Path(f"/proc/{proc.pid}/environ").stat().st_mode & 0o777) == "0o400"   # owner only
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""Bad input, said in one line: the helpers every v4lab entry point shares.

The rule (README, "Bad input"): a mistake gets one line naming the key, the value and the rule — a
``ValueError`` from the API, exit code 2 and one line on stderr from the command line — and nothing a
user owns is deleted, half-written, or read from outside the folder it was named in.

* ``bad(name, value, rule)`` raises that ``ValueError``.
* ``OneLineParser``: an ``argparse.ArgumentParser`` whose errors are one line (plus nothing), exit 2.
* ``read_json_file(path, what)``: JSON from a regular file of bounded size (no ``/dev/zero``, FIFO or
  multi-gigabyte "config.json"), undecodable or too deeply nested text as one line naming the file.
* ``is_checkpoint_dir`` / ``check_replaceable``: the only folders v4lab writing code may replace are its
  own checkpoints (``config.json`` + the index); anything else at the target is refused, untouched.
* ``clean_stale_temporaries``: remove the ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders a killed
  writer of ours left beside NAME (only ours: the pattern, and the process that made them is gone).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

INDEX_FILE = "model.safetensors.index.json"
# Generous: V4-Pro's index is ~13 MB, large BPE tokenizer.json files ~20 MB.
MAX_JSON_BYTES = 256 * 2 ** 20


def bad(name: str, value: object, rule: str) -> NoReturn:
    """Raise ``ValueError("NAME = VALUE: RULE")``."""
    raise ValueError(f"{name} = {value!r}: {rule}")


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage dump: ``PROG: error: MESSAGE`` on one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {' '.join(str(message).split())}\n")
        raise SystemExit(2)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (newlines folded)."""
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------- reading
def read_json_file(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse the JSON in ``path`` (a regular file after symlinks, at most ``max_bytes``). Every problem is
    a ValueError ``"{what} '{path}': ..."``. Opened non-blocking, so a FIFO cannot hang the caller."""
    text = read_text_file(path, what, max_bytes)
    where = f"{what} {str(path)!r}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON here (nested too deeply)") from None


def read_text_file(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of ``path`` under the rules of ``read_json_file``."""
    p = str(path)
    where = f"{what} {p!r}"
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{where}: not a regular file (a device, FIFO, socket or folder)")
        if st.st_size > max_bytes:
            raise ValueError(f"{where}: {st.st_size} bytes, larger than the {max_bytes} bytes a JSON file "
                             "here may have")
        chunks, n = [], 0
        while n <= max_bytes:                    # a regular file ends; the cap still holds if it grows
            b = os.read(fd, min(1 << 24, max_bytes + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        raw = b"".join(chunks)
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise ValueError(f"{where}: larger than the {max_bytes} bytes a JSON file here may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid JSON (not UTF-8 text: byte {raw[e.start]:#04x} at "
                         f"offset {e.start})") from None


# ---------------------------------------------------------------------------------------- writing
def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """A folder in the official layout: it holds ``config.json`` and ``model.safetensors.index.json``."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / "config.json").is_file() and (p / INDEX_FILE).is_file()


def check_replaceable(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Refuse (ValueError naming ``what`` and the path) a write target v4lab may not replace: a path
    ending in ``..``/``.``, a symlink, a file, or a folder that is neither empty nor a checkpoint.
    Returns the path. Nothing is touched."""
    raw = str(path)
    p = Path(path)
    if p.name in ("", ".", "..") or re.search(r"(^|[/\\])\.\.?[/\\]*$", raw):
        bad(what, raw, "must name a folder, not end in '.' or '..'")
    if p.is_symlink():
        bad(what, raw, "is a symbolic link; give the real folder")
    if not p.exists():
        return p
    if not p.is_dir():
        bad(what, raw, "is a file, not a checkpoint folder; v4lab replaces only its own checkpoints")
    if any(p.iterdir()) and not is_checkpoint_dir(p):
        bad(what, raw, "is a folder that is not a v4lab checkpoint (no config.json + "
                       f"{INDEX_FILE}); v4lab replaces only its own checkpoints, choose another path")
    return p


def check_writable(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Before long work: ``path`` is replaceable (``check_replaceable``) and its nearest existing parent is
    a folder this process can write into. ValueError otherwise."""
    p = check_replaceable(path, what)
    parent = Path(os.path.abspath(p)).parent
    while not parent.exists():
        if parent.is_symlink():              # a dangling link on the way
            bad(what, str(path), f"its parent {str(parent)!r} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        bad(what, str(path), f"its parent {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        bad(what, str(path), f"its parent folder {str(parent)!r} is not writable")
    return p


def temp_prefix(path: str | os.PathLike[str], kind: str) -> str:
    """Name prefix of a writer's temporary sibling of ``path``: ``.NAME.KIND-PID-``."""
    return f".{Path(path).name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # someone else's live process
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` and ``.NAME.old-PID-*`` folders beside ``path`` whose PID is no longer
    running (a writer of ours killed mid-write). Returns what was removed."""
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(p.name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+$")
    gone = []
    for q in parent.iterdir():
        m = pat.match(q.name)
        if m and q.is_dir() and not q.is_symlink() and not _alive(int(m.group(2))):
            shutil.rmtree(q, ignore_errors=True)
            gone.append(q)
    return gone

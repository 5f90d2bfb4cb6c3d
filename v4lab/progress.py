"""One progress bar for the long-running commands (``v4lab train``, benches, experiments).

A tqdm bar with ETA on stderr, shown only when asked for (``--no-progress`` turns it off) *and* stderr is
a terminal: piped or redirected output (``--json > file``, CI logs) gets no bar characters.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import argparse

    from tqdm import tqdm


def enabled(wanted: bool = True, stream: TextIO | None = None) -> bool:
    """True when a bar should be drawn: `wanted` and the stream (default stderr) is a TTY."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(wanted) and callable(isatty) and bool(isatty())


def bar(total: int | None, desc: str, wanted: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar (use as a context manager); a disabled one (same methods, prints nothing) when
    `enabled(wanted)` is False."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled(wanted), dynamic_ncols=True, **kw)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``--no-progress`` flag."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is also off when stderr is not a terminal)")

"""Build the notebooks from plain Python sources, reproducibly and without outputs.

Each notebook ``notebooks/NN_name.ipynb`` is generated from ``notebooks/src/NN_name.py``, written in
the "percent" cell format::

    # %% [markdown]
    # # Title
    # Some *markdown*; each line starts with "# " (or is a bare "#").

    # %%
    from v4lab.viz import tour
    tour.ContextWidget().display()

A cell marker may carry cell metadata after the optional ``[markdown]``, as ``key=JSON`` pairs (jupytext's
percent-format syntax), e.g. a solution whose input and output JupyterLab shows collapsed::

    # %% jupyter={"source_hidden": true, "outputs_hidden": true}

Cell ids are derived from the cell index, so rebuilding an unchanged source gives byte-identical
JSON; the notebooks carry no outputs, execution counts or widget state (tests/test_notebooks_clean.py
checks it). Usage::

    python -m v4lab.viz.nbbuild --execute      # rebuild every notebook and check that it runs
    python -m v4lab.viz.nbbuild 00_tour        # rebuild one, without outputs
    python -m v4lab.viz.nbbuild --check        # exit 1 if a notebook's cells differ from its source

``# NBVAL_CHECK_OUTPUT`` marks the cells whose printed numbers matter. They are committed empty like
every other cell, so nbval only checks that they run; the numbers themselves are asserted by the pytest
tests of the v4lab functions that produce them (tests/test_accounting.py, test_viz_*.py, ...).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
SRC_DIR = NB_DIR / "src"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (v4lab)", "language": "python"}


def _marker_metadata(line: str) -> tuple[str, dict]:
    """``# %% [markdown] key=JSON ...`` → (kind, metadata). Anything after the marker that is not a
    ``key=JSON`` pair is refused, so a typo cannot silently turn into a code cell without its metadata."""
    rest = line.strip()[len("# %%"):].strip()
    kind = "code"
    if rest.startswith("[markdown]"):
        kind, rest = "markdown", rest[len("[markdown]"):].strip()
    meta: dict = {}
    decoder = json.JSONDecoder()
    while rest:
        key, eq, tail = rest.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"notebook source: cell marker {line.strip()!r}: expected key=JSON after '# %%' "
                             f"(e.g. jupyter={{\"source_hidden\": true}}), got {rest!r}")
        try:
            value, end = decoder.raw_decode(tail)
        except json.JSONDecodeError as e:
            raise ValueError(f"notebook source: cell marker {line.strip()!r}: the value of {key!r} is not JSON "
                             f"({e.msg})") from None
        if key in meta:
            raise ValueError(f"notebook source: cell marker {line.strip()!r}: key {key!r} given twice")
        meta[key] = value
        rest = tail[end:].strip()
    return kind, meta


def parse_cells_meta(text: str) -> list[tuple[str, str, dict]]:
    """Percent-format source → [(kind, source, metadata)], kind ∈ {"markdown", "code"}."""
    cells: list[tuple[str, list[str], dict]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# %%"):
            kind, meta = _marker_metadata(line)
            cells.append((kind, [], meta))
            continue
        if not cells:
            if stripped and not stripped.startswith("#"):
                raise ValueError(f"notebook source: code before the first '# %%' marker: {line!r}")
            continue                                        # a file header comment
        kind, lines, _ = cells[-1]
        if kind == "markdown":
            if stripped and not line.startswith("#"):
                raise ValueError(f"notebook source: markdown line without '# ': {line!r}")
            line = line[2:] if line.startswith("# ") else line[1:]
        lines.append(line)
    out = []
    for kind, lines, meta in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines:
            out.append((kind, "\n".join(lines), meta))
    return out


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Percent-format source → [(kind, source)], kind ∈ {"markdown", "code"} (metadata dropped)."""
    return [(kind, source) for kind, source, _ in parse_cells_meta(text)]


def build(src: Path) -> nbformat.NotebookNode:
    cells = parse_cells_meta(Path(src).read_text())
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC),
                   "language_info": {"name": "python", "pygments_lexer": "ipython3"}}
    stem = Path(src).stem
    for i, (kind, source, meta) in enumerate(cells):
        cid = hashlib.sha1(f"{stem}:{i}".encode()).hexdigest()[:12]
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell["id"] = cid
        if meta:
            cell["metadata"] = nbformat.from_dict(meta)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


CHECK_MARK = "NBVAL_CHECK_OUTPUT"


def is_checked(cell) -> bool:
    return cell.get("cell_type") == "code" and CHECK_MARK in cell.get("source", "")


def is_hidden(cell) -> bool:
    """A cell whose input JupyterLab shows collapsed (``metadata.jupyter.source_hidden``): the solutions."""
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden", False))


def execute(nb: nbformat.NotebookNode, cwd: Path = NB_DIR, timeout: int = 600) -> None:
    """Run a copy of ``nb`` in a kernel; raises if a cell fails. Nothing from the run is kept."""
    import copy

    from nbclient import NotebookClient
    NotebookClient(copy.deepcopy(nb), timeout=timeout, kernel_name=KERNELSPEC["name"],
                   resources={"metadata": {"path": str(cwd)}}).execute()


def strip_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    import copy
    out = copy.deepcopy(nb)
    for c in out.cells:
        if c.get("cell_type") == "code":
            c.outputs = []
            c.execution_count = None
    return out


def dumps(nb: nbformat.NotebookNode) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def targets(src_dir: Path = SRC_DIR, nb_dir: Path = NB_DIR) -> list[tuple[Path, Path]]:
    return [(s, nb_dir / f"{s.stem}.ipynb") for s in sorted(Path(src_dir).glob("[0-9][0-9]_*.py"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4lab.viz.nbbuild", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="only these notebooks (stems such as 00_tour)")
    ap.add_argument("--check", action="store_true",
                    help="compare each notebook (outputs ignored) with its source; exit 1 on a difference")
    ap.add_argument("--execute", action="store_true",
                    help="run each notebook once (it must not fail); outputs are not stored")
    args = ap.parse_args(argv)
    bad = 0
    for src, out in targets():
        if args.names and src.stem not in args.names:
            continue
        nb = build(src)
        if args.check:
            cur = strip_outputs(nbformat.reads(out.read_text(), as_version=4)) if out.exists() else None
            if cur is None or dumps(cur) != dumps(nb):
                print(f"{out.relative_to(ROOT)}: differs from {src.relative_to(ROOT)} "
                      "(run python -m v4lab.viz.nbbuild --execute)")
                bad = 1
            continue
        if args.execute:
            execute(nb)
        out.write_text(dumps(nb))
        print(f"wrote {out.relative_to(ROOT)}")
    return bad


if __name__ == "__main__":
    sys.exit(main())

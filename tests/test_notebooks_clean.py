"""Notebooks are committed clean and reproducible from their sources (notebooks/src/*.py).

Clean: no outputs, no execution counts, no widget state (``metadata.widgets``).
"""
import copy
from pathlib import Path

import nbformat
import pytest

from v4lab.viz import nbbuild

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def problems(nb) -> list[str]:
    out = []
    if "widgets" in nb.metadata:
        out.append("notebook metadata holds widget state (metadata.widgets)")
    for i, c in enumerate(nb.cells):
        if "widgets" in c.get("metadata", {}) or "execution" in c.get("metadata", {}):
            out.append(f"cell {i}: metadata carries run state")
        if c.cell_type != "code":
            continue
        if c.get("execution_count") is not None:
            out.append(f"cell {i}: execution_count = {c.execution_count}")
        if c.outputs:
            out.append(f"cell {i}: has outputs")
    return out


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"00_tour.ipynb", "09_hardware_and_cost.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert problems(nb) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_source(path):
    src = ROOT / "notebooks" / "src" / f"{path.stem}.py"
    if not src.exists():
        pytest.skip(f"{path.name} has no source in notebooks/src (written by hand)")
    built = nbbuild.dumps(nbbuild.build(src))
    cur = nbbuild.dumps(nbbuild.strip_outputs(nbformat.read(path, as_version=4)))
    assert cur == built, f"{path.name} differs from {src.name}: run python -m v4lab.viz.nbbuild --execute"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_marks_its_checked_cells(path):
    nb = nbformat.read(path, as_version=4)
    assert any(nbbuild.is_checked(c) for c in nb.cells), f"{path.name}: no # NBVAL_CHECK_OUTPUT cell"


def test_problems_catches_dirty_notebooks():
    nb = nbformat.read(ROOT / "notebooks" / "00_tour.ipynb", as_version=4)
    assert problems(nb) == []
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"][0]
    dirty = copy.deepcopy(nb)
    dirty.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    assert any("widget state" in p for p in problems(dirty))
    dirty = copy.deepcopy(nb)
    dirty.cells[code].execution_count = 3
    assert any("execution_count" in p for p in problems(dirty))
    dirty = copy.deepcopy(nb)
    dirty.cells[code].outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "x"})]
    assert any("has outputs" in p for p in problems(dirty))
    chk = [i for i, c in enumerate(nb.cells) if nbbuild.is_checked(c)][0]
    dirty = copy.deepcopy(nb)
    dirty.cells[chk].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    assert any("has outputs" in p for p in problems(dirty))


def test_parse_cells():
    text = ("# header comment\n\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\n"
            "# NBVAL_CHECK_OUTPUT\nprint(x)\n")
    assert nbbuild.parse_cells(text) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"),
                                         ("code", "# NBVAL_CHECK_OUTPUT\nprint(x)")]
    with pytest.raises(ValueError, match="before the first"):
        nbbuild.parse_cells("x = 1\n# %%\n")
    with pytest.raises(ValueError, match="markdown line"):
        nbbuild.parse_cells("# %% [markdown]\nnot a comment\n")


def test_build_is_deterministic(tmp_path):
    src = ROOT / "notebooks" / "src" / "00_tour.py"
    a, b = nbbuild.dumps(nbbuild.build(src)), nbbuild.dumps(nbbuild.build(src))
    assert a == b
    nb = nbformat.reads(a, as_version=4)
    assert len({c.id for c in nb.cells}) == len(nb.cells)
    assert nb.metadata.kernelspec.name == "python3"

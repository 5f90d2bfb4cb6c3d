"""nbbuild: cell metadata on the percent-format marker (``# %% key=JSON``) reaches the notebook."""
import nbformat
import pytest

from v4lab.viz import nbbuild


def test_marker_metadata_is_parsed_into_the_cell(tmp_path):
    src = tmp_path / "99_demo.py"
    src.write_text('# %% [markdown]\n# question\n\n# %%\nguess = None\n\n'
                   '# %% jupyter={"source_hidden": true}\nprint("solution")\n\n'
                   '# %% [markdown] tags=["note", "x"] jupyter={"source_hidden": false}\n# md\n')
    cells = nbbuild.parse_cells_meta(src.read_text())
    assert [(k, m) for k, _, m in cells] == [("markdown", {}), ("code", {}),
                                             ("code", {"jupyter": {"source_hidden": True}}),
                                             ("markdown", {"tags": ["note", "x"], "jupyter": {"source_hidden": False}})]
    assert nbbuild.parse_cells(src.read_text())[2] == ("code", 'print("solution")')   # old shape kept
    nb = nbbuild.build(src)
    nbformat.validate(nb)
    assert [nbbuild.is_hidden(c) for c in nb.cells] == [False, False, True, False]
    assert nb.cells[2].metadata == {"jupyter": {"source_hidden": True}}
    assert nb.cells[3].metadata.tags == ["note", "x"]
    assert nb.cells[0].metadata == {}
    again = nbformat.reads(nbbuild.dumps(nb), as_version=4)         # survives the round trip to JSON
    assert nbbuild.is_hidden(again.cells[2]) and nbbuild.dumps(again) == nbbuild.dumps(nbbuild.build(src))


@pytest.mark.parametrize("marker, match", [
    ("# %% hidden", "expected key=JSON"),
    ("# %% jupyter={source_hidden: true}", "not JSON"),
    ("# %% jupyter=", "not JSON"),
    ('# %% tags=["a"] tags=["b"]', "given twice"),
    ("# %% [markdown] =1", "expected key=JSON"),
])
def test_bad_markers_are_refused_with_the_line(marker, match):
    with pytest.raises(ValueError, match=match) as e:
        nbbuild.parse_cells_meta(f"{marker}\nx = 1\n")
    assert marker.strip() in str(e.value)

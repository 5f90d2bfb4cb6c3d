"""v4lab.site without running a notebook: the math, link, figure and index steps of the static site, and its
command line's refusals. The whole build is exercised by tests/test_site_browser.py (marker ``browser``)."""
from __future__ import annotations

import re

import nbformat
import pytest

from v4lab import site

ROOT = site.ROOT


def test_math_becomes_mathml_and_escaped_dollars_stay():
    store: dict[str, str] = {}
    md = r"Price \$1.74 and \$0.14; inline $s_e = \sqrt{z}$ and `code $x$` then $$\frac{a}{b}$$ end."
    out = site.protect_math(md, store)
    assert r"\$1.74" in out and r"\$0.14" in out          # escaped dollars are not math
    assert "`code $x$`" in out                             # nor is anything inside a code span
    assert len(store) == 2
    inline, block = store.values()
    assert 'display="inline"' in inline and "<msqrt>" in inline
    assert 'display="block"' in block and "<mfrac>" in block
    page = site.restore_math(f"<p>{out}</p>", store)
    assert "V4LABMATH" not in page and page.count("<math") == 2


def test_unknown_tex_stays_visible():
    html = site.tex_to_mathml(r"\left( x < y", block=False)      # the converter refuses an unclosed \left
    assert html == "<code>\\left( x &lt; y</code>"


def test_links_point_to_html_pages():
    page = ('<a href="03_mhc.ipynb">x</a> <a href="./05_fp4.ipynb#e2m1">y</a> '
            '<a href="glossary.md#gqa-8">z</a> <a href="https://example.org/a.ipynb">w</a>')
    out = site.rewrite_links(page)
    assert 'href="03_mhc.html"' in out and 'href="05_fp4.html#e2m1"' in out
    assert 'href="glossary.html#gqa-8"' in out
    assert 'href="https://example.org/a.ipynb"' in out       # not a notebook of this site: untouched


def _nb_with_figure(widget: str | None):
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4])).to_plotly_json()
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("w.display()")
    code.outputs = [nbformat.v4.new_output("display_data", data={"application/vnd.plotly.v1+json": fig})]
    if widget:                                      # what Widget.display prints after a static figure
        code.outputs.append(nbformat.v4.new_output("display_data", data={"text/html": "<p>note</p>"},
                                                   metadata={"v4lab": {"widget": widget}}))
    skipped = nbformat.v4.new_code_cell("# NBVAL_SKIP\nrun_experiment()")
    nb.cells = [nbformat.v4.new_markdown_cell("# T\n\nSee $x^2$ and [next](01_moe_expansion.ipynb)."), code, skipped]
    return nb


@pytest.mark.parametrize("widget", ["tour.context", None])
def test_figures_become_plotly_divs_and_widgets_say_so(widget):
    nb = _nb_with_figure(widget)
    site.prepare(nb)
    assert nb.cells[2].metadata["tags"] == ["skip-execution"] and "tags" not in nb.cells[1].metadata
    math: dict[str, str] = {}
    site.finish(nb, math)
    page = site.export(nb, "T", math)
    assert page.count('<script src="_static/plotly.min.js"></script>') == 1
    assert page.count("Plotly.newPlot") == 1
    assert "application/vnd.plotly" not in page and "cdn" not in page.lower()
    assert ("open in JupyterLab to move the sliders" in page) == (widget is not None)
    assert ('class="v4lab-static-note" data-widget="tour.context"' in page) == (widget is not None)
    assert site.SKIPPED_NOTE in page
    assert 'href="01_moe_expansion.html"' in page and "<math" in page
    assert not re.search(r"<script[^>]+src=\"https?:", page), "a script from the network"


def test_page_without_figures_does_not_load_plotly():
    page = site.markdown_page("# Just text\n\nNo figure.", "t")
    assert "plotly.min.js" not in page and "Just text" in page


def test_glossary_page_ids_are_the_anchor_function():
    page = site.glossary_page("# G\n\n### GQA-8\n\nx\n\n### Aux-loss-free bias\n\ny [see](#gqa-8)\n")
    ids = re.findall(r'<h3 id="([^"]+)"', page)
    assert ids == ["gqa-8", "aux-loss-free-bias"]
    assert 'href="#gqa-8"' in page


def test_index_lists_every_notebook_of_the_readme():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    md = site.index_markdown(readme)
    names = site.notebook_names()
    assert names and all(f"]({n}.ipynb)" in md for n in names)
    assert "](glossary.md)" in md
    partial = site.index_markdown(readme, {names[0]}, {names[0]: "00 · A | title"})
    assert f"[00 · A \\| title]({names[0]}.ipynb)" in partial and f"]({names[1]}.ipynb)" not in partial
    with pytest.raises(site.SiteError, match="no notebook table rows"):
        site.index_markdown("# nothing here\n")


def test_cli_refuses_unknown_notebook_and_bad_jobs(tmp_path, capsys):
    assert site.main(["--only", "99_nope", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "99_nope" in err and "00_tour" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()                      # refused before anything was written
    assert site.main(["--jobs", "0", "--out", str(tmp_path / "s")]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_static_widget_in_ipython_prints_the_note_with_its_mark(monkeypatch):
    # what the site's kernel does (V4LAB_STATIC=1 inside IPython): the figure, then the note carrying the widget's
    # name in its metadata, which finish() turns into the styled note
    import plotly.io as pio
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from v4lab.viz import tour
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    InteractiveShell.instance()
    try:
        with capture_output() as cap:
            assert tour.ContextWidget(static=True).display() is None
    finally:
        InteractiveShell.clear_instance()
    fig_out, note = cap.outputs
    assert "application/vnd.plotly.v1+json" in fig_out.data
    assert note.metadata == {"v4lab": {"widget": "tour.context"}}
    assert "open in JupyterLab to move the sliders" in note.data["text/html"]


def test_a_failing_notebook_names_itself_and_writes_no_page(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0")]
    nbformat.write(nb, tmp_path / "99_bad.ipynb")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(site.SiteError, match=r"^99_bad: a cell raised .*ZeroDivisionError"):
        site.build_notebook("99_bad", str(out), timeout=120, nb_dir=str(tmp_path))
    assert list(out.iterdir()) == []

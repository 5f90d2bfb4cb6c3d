"""The static site: every notebook run headless and exported to HTML that needs no kernel and no network.

    python -m v4lab.site                       # every notebook -> site/ (index, glossary, NN_name.html)
    python -m v4lab.site --only 00_tour --out /tmp/s     # some notebooks (the browser test builds three)

How each page is made, with the field's tools rather than a hand-written exporter:

* **run**: nbclient executes the notebook with ``V4LAB_STATIC=1`` (a widget displays the static figure of
  its default state, marked ``{"v4lab": {"widget": name}}`` in the output's metadata) and
  ``PLOTLY_RENDERER=plotly_mimetype`` (a figure is plotly JSON, not HTML with its own copy of plotly.js).
  Cells marked ``# NBVAL_SKIP`` (experiments over the notebook time budget) are tagged ``skip-execution``
  and say so on the page.
* **figures**: each plotly output becomes a ``<div>`` drawn by ``plotly.io.to_html(include_plotlyjs=False)``;
  the page loads plotly.js once, from ``_static/plotly.min.js`` (copied from the installed plotly), so the
  figures stay interactive (zoom, hover, legend) offline. Under a widget's figure ``Widget.display`` prints
  that its sliders need JupyterLab; the page styles that note.
* **math**: TeX in markdown becomes MathML at build time (latex2mathml; Chromium draws MathML itself), so no
  MathJax from a CDN.
* **export**: nbconvert's ``lab`` template without its CDN scripts (require.js, MathJax, mermaid, the widget
  manager); collapsed solution cells (``jupyter.source_hidden``) stay folded in a ``<details>``; links to
  ``NN_x.ipynb`` and ``glossary.md`` point to the ``.html`` pages.
"""
from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
GLOSSARY = NB_DIR / "glossary.md"
DEFAULT_OUT = ROOT / "site"
PLOTLY_JS = "_static/plotly.min.js"
SKIPPED_NOTE = "Not run for the static site (over the notebook time budget): run it in JupyterLab."
NOTEBOOK_RE = re.compile(r"^\d\d_[a-z0-9_]+$")

TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}
<script src="_static/plotly.min.js"></script>
{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block extra_css %}
<style type="text/css">
main { max-width: 1100px; margin: 0 auto; }
.v4lab-static-note { color: #555; font-style: italic; margin: 2px 0 10px; }
.v4lab-site-nav { font-family: var(--jp-ui-font-family, sans-serif); padding: 8px 0; border-bottom: 1px solid #ddd; }
details.v4lab-solution > summary { cursor: pointer; color: #1f5fa8; margin: 4px 0 4px 64px; }
math[display="block"] { margin: 0.6em 0; }
</style>
{% endblock extra_css %}
{% block codecell %}
{%- if cell.metadata.get('jupyter', {}).get('source_hidden') -%}
<details class="v4lab-solution"><summary>Solution (hidden: try the exercise first)</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{% endblock codecell %}
{%- block body_header -%}
{{ super() }}
<nav class="v4lab-site-nav"><a href="index.html">v4lab notebooks</a> · <a href="glossary.html">glossary</a></nav>
{%- endblock body_header -%}
"""


class SiteError(RuntimeError):
    """A page could not be built; the message names the notebook and what failed."""


def anchor(term: str) -> str:
    """The glossary anchor of a term: lower case, every run of characters other than a-z0-9 one '-', no '-' at
    either end. "GQA-8" -> "gqa-8", "E8M0" -> "e8m0", "Routed expert" -> "routed-expert"."""
    return re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")


def notebook_names(nb_dir: Path = NB_DIR) -> list[str]:
    return sorted(p.stem for p in nb_dir.glob("*.ipynb") if NOTEBOOK_RE.match(p.stem))


# ------------------------------------------------------------------------------------------------ math
_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_BLOCK_MATH = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$", re.S)
_INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)([^\n$]+?)(?<!\\)\$")


def tex_to_mathml(tex: str, block: bool) -> str:
    """MathML for one formula; TeX the converter does not know stays visible as code, never dropped."""
    from latex2mathml.converter import convert
    try:
        return convert(tex.strip(), display="block" if block else "inline")
    except Exception:                       # noqa: BLE001 - any converter failure: show the source instead
        return f"<code>{html.escape(tex.strip())}</code>"


def protect_math(md: str, store: dict[str, str]) -> str:
    """Replace ``$$..$$`` and ``$..$`` (not ``\\$``, not inside code) by placeholders whose MathML is in ``store``;
    the markdown renderer never sees the TeX, :func:`restore_math` puts the MathML into the finished page."""
    def sub(block: bool):
        def f(m):
            key = f"V4LABMATH{len(store)}X"
            store[key] = tex_to_mathml(m.group(1), block)
            return key
        return f
    parts = _CODE.split(md)
    for i in range(0, len(parts), 2):       # even parts are outside code spans
        parts[i] = _INLINE_MATH.sub(sub(False), _BLOCK_MATH.sub(sub(True), parts[i]))
    return "".join(parts)


def restore_math(page: str, store: dict[str, str]) -> str:
    if not store:
        return page
    return re.sub(r"V4LABMATH\d+X", lambda m: store.get(m.group(0), m.group(0)), page)


# ----------------------------------------------------------------------------------------- the pages
def rewrite_links(page: str) -> str:
    """``NN_x.ipynb`` -> ``NN_x.html`` and ``glossary.md`` -> ``glossary.html`` in href attributes (anchors kept)."""
    page = re.sub(r'href="(?:\./)?(\d\d_[A-Za-z0-9_]+)\.ipynb(#[^"]*)?"', r'href="\1.html\2"', page)
    return re.sub(r'href="(?:\./)?glossary\.md(#[^"]*)?"', r'href="glossary.html\1"', page)


def figure_html(fig: dict) -> str:
    import plotly.io as pio
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, validate=False,
                       config={"responsive": True, "displaylogo": False})


def widget_note(widget: str) -> str:
    """The note a widget prints under its static figure (``Widget.display`` without a widget frontend)."""
    from v4lab.viz.common import STATIC_NOTE as text
    return f'<p class="v4lab-static-note" data-widget="{html.escape(widget)}">{html.escape(text)}</p>'


def prepare(nb: nbformat.NotebookNode) -> None:
    """Before the run: no stored widget state, and the cells nbval skips are not run here either."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.lstrip().startswith("# NBVAL_SKIP"):
            tags = cell.metadata.setdefault("tags", [])
            if "skip-execution" not in tags:
                tags.append("skip-execution")


def finish(nb: nbformat.NotebookNode, math: dict[str, str]) -> None:
    """After the run: plotly JSON -> drawn divs (with the widget note), skipped cells say so, math protected."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = protect_math(cell.source, math)
            continue
        if cell.cell_type != "code":
            continue
        if "skip-execution" in cell.metadata.get("tags", []):
            cell.outputs = [nbformat.v4.new_output("display_data", data={
                "text/html": f'<p class="v4lab-static-note">{SKIPPED_NOTE}</p>'})]
        for out in cell.outputs:
            data = out.get("data", {})
            widget = out.get("metadata", {}).get("v4lab", {}).get("widget")
            if "application/vnd.plotly.v1+json" in data:
                out["data"] = {"text/html": figure_html(data["application/vnd.plotly.v1+json"])}
            elif widget:
                out["data"] = {"text/html": widget_note(widget)}
            elif "text/markdown" in data:
                data["text/markdown"] = protect_math(data["text/markdown"], math)
            out.get("metadata", {}).pop("v4lab", None)


def _template_dirs() -> list[str]:
    """nbconvert's own templates, found from where the package is installed: Jupyter's data path only looks under
    this interpreter's prefix, which misses them when nbconvert comes from another one (a --user install, a venv
    reusing another's site-packages)."""
    import nbconvert
    here = Path(nbconvert.__file__).resolve()
    return [str(p / "share" / "jupyter" / "nbconvert" / "templates") for p in here.parents
            if (p / "share" / "jupyter" / "nbconvert" / "templates" / "lab").is_dir()][:1]


def export(nb: nbformat.NotebookNode, title: str, math: dict[str, str]) -> str:
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(extra_loaders=[DictLoader({"v4lab_site.html.j2": TEMPLATE})],
                            template_file="v4lab_site.html.j2", extra_template_basedirs=_template_dirs(),
                            extra_template_paths=_template_dirs())
    nb.metadata["title"] = title
    body, _ = exporter.from_notebook_node(nb)
    if "Plotly.newPlot" not in body:            # a page without figures does not load 4.8 MB of plotly.js
        body = body.replace(f'<script src="{PLOTLY_JS}"></script>', "")
    return rewrite_links(restore_math(body, math))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def title_of(nb: nbformat.NotebookNode) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if m:
                return m.group(1).strip()
    return "v4lab"


def build_notebook(name: str, out: str, timeout: int = 600, nb_dir: str = str(NB_DIR)) -> float:
    """Run ``notebooks/<name>.ipynb`` headless and write ``<out>/<name>.html``; returns the seconds it took."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    t0 = time.time()
    nb = nbformat.read(Path(nb_dir) / f"{name}.ipynb", as_version=4)
    prepare(nb)
    env = {**os.environ, "V4LAB_STATIC": "1", "PLOTLY_RENDERER": "plotly_mimetype"}
    env.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_dir)}})
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        first = str(e).strip().splitlines()
        raise SiteError(f"{name}: a cell raised while running it for the site: {first[-1] if first else e}") from None
    math: dict[str, str] = {}
    finish(nb, math)
    write_atomic(Path(out) / f"{name}.html", export(nb, title_of(nb), math))
    return time.time() - t0


def markdown_page(md: str, title: str) -> str:
    """A page made of one markdown cell, through the same exporter as the notebooks."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(md)]
    math: dict[str, str] = {}
    finish(nb, math)
    return export(nb, title, math)


def glossary_page(md: str) -> str:
    """The glossary as HTML, each heading's id set to :func:`anchor` of its text (what ``glossary.md#x`` links use)."""
    page = markdown_page(md, "v4lab glossary")

    def fix(m):
        text = re.sub(r"<[^>]+>|¶", "", m.group(3))
        a = anchor(html.unescape(text))
        inner = m.group(3).replace(f'href="#{m.group(2)}"', f'href="#{a}"')
        return f'<h{m.group(1)} id="{a}">{inner}</h{m.group(1)}>'
    return re.sub(r'<h([1-6]) id="([^"]*)">(.*?)</h\1>', fix, page, flags=re.S)


def index_markdown(readme: str, built: set[str] | None = None, titles: dict[str, str] | None = None) -> str:
    """The index page: one line per row of notebooks/README.md's table (the notebook's title, when known, as the
    link text), linked when the page was built."""
    rows = re.findall(r"^\|\s*(\d\d)\s*\|\s*`(\d\d_[a-z0-9_]+)\.ipynb`\s*—?\s*(.*?)\s*\|", readme, re.M)
    if not rows:
        raise SiteError("notebooks/README.md: no notebook table rows (| NN | `NN_name.ipynb` — ... |) to index")
    lines = ["# v4lab: the DeepSeek-V4 notebooks, rendered", "",
             "Every notebook run once and saved as a page: the figures are interactive (hover, zoom, legend), "
             "the sliders are not: open a notebook in JupyterLab (`make lab`) to move them.", "",
             "| # | notebook | what it covers |", "|---|---|---|"]
    for num, stem, what in rows:
        text = (titles or {}).get(stem, stem).replace("|", "\\|")
        link = f"[{text}]({stem}.ipynb)" if built is None or stem in built else f"{text} (not built in this run)"
        lines.append(f"| {num} | {link} | {what} |")
    lines += ["", "[The glossary](glossary.md): every term the notebooks use, with its equation, its v4lab module "
              "and the notebooks that use it.", ""]
    return "\n".join(lines)


def build(out: Path = DEFAULT_OUT, only: list[str] | None = None, jobs: int = 2, timeout: int = 600,
          log: Callable[[str], object] = print) -> dict[str, float]:
    """Build the site into ``out``; returns seconds per notebook page. Unknown names are refused before any work."""
    names = notebook_names()
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SiteError(f"--only {unknown[0]!r}: not a notebook; known: {', '.join(names)}")
        names = [n for n in names if n in only]
    out = Path(out)
    (out / "_static").mkdir(parents=True, exist_ok=True)
    import plotly
    shutil.copyfile(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", out / PLOTLY_JS)
    titles = {n: title_of(nbformat.read(NB_DIR / f"{n}.ipynb", as_version=4)) for n in notebook_names()}
    index = index_markdown((NB_DIR / "README.md").read_text(), set(names), titles)
    write_atomic(out / "index.html", markdown_page(index, "v4lab notebooks"))
    write_atomic(out / "glossary.html", glossary_page(GLOSSARY.read_text()))
    times: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {n: pool.submit(build_notebook, n, str(out), timeout) for n in names}
        for n, f in futures.items():
            times[n] = f.result()
            log(f"{n}.html  {times[n]:.1f} s")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4lab.site", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: site/)")
    p.add_argument("--only", nargs="+", metavar="NN_name",
                   help="build only these notebooks (index and glossary always)")
    p.add_argument("--jobs", type=int, default=2, help="notebooks run at once (default 2)")
    p.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    a = p.parse_args(argv)
    if a.jobs < 1:
        print(f"v4lab site: --jobs = {a.jobs}: must be at least 1", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        times = build(a.out, a.only, a.jobs, a.timeout)
    except SiteError as e:
        print(f"v4lab site: {e}", file=sys.stderr)
        return 2 if str(e).startswith("--only") else 1
    print(f"{len(times)} notebook pages + index + glossary in {a.out} ({time.time() - t0:.0f} s); "
          f"open {a.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

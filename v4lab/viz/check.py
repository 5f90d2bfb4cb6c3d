"""Can a reader read this figure? Small rules run over every widget state the callback sweep reaches.

Each rule takes a plotly figure (or a widget, for :func:`label_widths`) and returns a list of problems,
one readable line each; :func:`check_figure` runs every figure rule. The tests (``tests/test_viz_check.py``)
plant one bad figure per rule and run the rules over every registered widget in every swept state.

Sizes are estimated the way a browser would lay them out at the notebook's width (``WIDTH`` px unless the
figure sets one): a character is ``CHAR_W`` × the font size wide, a line ``LINE_H`` × the font size tall.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import plotly.graph_objects as go

FigureLike = Union["go.Figure", dict]      # a plotly figure or its to_dict()
WIDTH = 960            # px: a JupyterLab output area at the browser widths the browser test uses
CHAR_W = 0.55          # average glyph width / font size (Open Sans, mixed text)
LINE_H = 1.3
DEFAULT_FONT = 12      # plotly's default font size
# ipywidgets' CSS defaults (--jp-widgets-*): label width, control width, font size
WIDGET_LABEL_PX = 80
WIDGET_WIDTH_PX = 300
WIDGET_FONT = 13
CATEGORY_WORDS = ("expert", "kind", "layer type", "category", "class")


def _fig_dict(fig) -> dict:
    return fig if isinstance(fig, dict) else fig.to_plotly_json()


def _text(t) -> str:
    if t is None:
        return ""
    if isinstance(t, dict):
        return str(t.get("text") or "")
    return str(t)


def _axes(layout: dict, letter: str) -> dict:
    """axis name as a trace refers to it ("x", "x2") -> its layout dict."""
    out = {}
    for k, v in layout.items():
        m = re.fullmatch(rf"{letter}axis(\d*)", k)
        if m:
            out[letter + m.group(1)] = v or {}
    out.setdefault(letter, layout.get(f"{letter}axis", {}) or {})
    return out


def _font_size(obj: dict | None, default: float = DEFAULT_FONT) -> float:
    if isinstance(obj, dict) and isinstance(obj.get("font"), dict) and obj["font"].get("size"):
        return float(obj["font"]["size"])
    return float(default)


def _lines(text: str) -> int:
    return 1 + len(re.findall(r"<br\s*/?>", text, flags=re.I))


def _plain(text: str) -> str:
    return re.sub(r"<[^>]+>", "", text)


def _width_px(text: str, size: float) -> float:
    longest = max((_plain(s) for s in re.split(r"<br\s*/?>", text, flags=re.I)), key=len, default="")
    return len(longest) * size * CHAR_W


# ------------------------------------------------------------------------------------------ the rules
_DOLLAR = re.compile(r"(?<!\\)[$]")


def dollar_signs(fig: FigureLike) -> list[str]:
    """Two unescaped ``$`` in displayed text make plotly treat it as LaTeX (and, without MathJax, hide it).
    Hover text is excluded (plotly does not typeset it)."""
    d = _fig_dict(fig)
    lay = d.get("layout", {})
    texts = [("title", _text(lay.get("title")))]
    texts += [(f"annotation {i}", _text(a)) for i, a in enumerate(lay.get("annotations") or [])]
    for letter in "xy":
        texts += [(f"{ax} title", _text(a.get("title"))) for ax, a in _axes(lay, letter).items()]
    texts += [("legend title", _text((lay.get("legend") or {}).get("title")))]
    for i, t in enumerate(d.get("data", [])):
        texts.append((f"trace {i} name", _text(t.get("name")) if t.get("showlegend", True) else ""))
        cb = (t.get("marker") or {}).get("colorbar") or t.get("colorbar") or {}
        texts.append((f"trace {i} colour-bar title", _text(cb.get("title"))))
        if "text" in str(t.get("mode", "")) or t.get("type") in ("bar", "heatmap") and t.get("texttemplate"):
            vals = t.get("text")
            vals = vals if isinstance(vals, (list, tuple)) else [vals]
            texts += [(f"trace {i} text", _text(v)) for v in vals if isinstance(v, str)]
    counts = [(where, s, len(_DOLLAR.findall(s))) for where, s in texts]
    return [f"{where}: {n} unescaped '$' (plotly reads LaTeX): {s[:60]!r}" for where, s, n in counts if n >= 2]


def _numeric_list(v) -> bool:
    if not isinstance(v, (list, tuple)) or not v:
        return False
    flat = [x for row in v for x in (row if isinstance(row, (list, tuple)) else [row])]
    return bool(flat) and all(isinstance(x, (int, float)) or x is None for x in flat) and \
        any(isinstance(x, (int, float)) for x in flat)


def _colour_traces(d: dict):
    """(index, trace, colour-holder dict, colour values) for every trace coloured by numbers."""
    for i, t in enumerate(d.get("data", [])):
        typ = t.get("type", "scatter")
        if typ in ("heatmap", "contour", "histogram2d", "histogram2dcontour"):
            if t.get("z") is not None and _numeric_list(t.get("z")):
                yield i, t, t, t["z"]
        else:
            m = t.get("marker") or {}
            if _numeric_list(m.get("color")):
                yield i, t, m, m["color"]


def _prints_values(t: dict) -> bool:
    """The trace writes its numbers on the cells (``texttemplate`` with %{z} or a filled %{text})."""
    tt = str(t.get("texttemplate") or "")
    return "%{z" in tt or ("%{text" in tt and bool(t.get("text")))


def colour_keys(fig: FigureLike) -> list[str]:
    """A heatmap or a scatter/bar coloured by numbers needs a colour bar, a legend entry, or its numbers
    printed on it (``texttemplate``) — or the same colour scale as a trace that shows its bar."""
    d = _fig_dict(fig)
    lay = d.get("layout", {})
    shown, missing = [], []
    for i, t, holder, _ in _colour_traces(d):
        is_map = holder is t
        if holder.get("coloraxis"):
            ok = (lay.get(holder["coloraxis"]) or {}).get("showscale", True) is not False
        else:
            ok = holder.get("showscale", is_map) is not False if is_map else holder.get("showscale") is True
        key = (str(holder.get("colorscale")), holder.get("zmin", holder.get("cmin")),
               holder.get("zmax", holder.get("cmax")), holder.get("coloraxis"))
        if ok:
            shown.append(key)
        elif not _prints_values(t):
            missing.append((i, t, key))
    return [f"trace {i} ({t.get('type', 'scatter')} {t.get('name', '')!r}): coloured by numbers with no colour "
            "bar, legend or printed values" for i, t, key in missing if key not in shown]


def _is_stepwise(scale) -> bool:
    """A discrete colour scale: every colour held over an interval ([[a, c], [b, c], ...])."""
    if not isinstance(scale, (list, tuple)) or len(scale) < 2:
        return False
    cols = [c for _, c in scale]
    return len(cols) % 2 == 0 and all(cols[k] == cols[k + 1] for k in range(0, len(cols), 2))


def categorical_scales(fig: FigureLike) -> list[str]:
    """Categories (expert ids, layer kinds) on a continuous colour scale: neighbouring ids look alike.
    A trace is categorical when its ``meta`` says ``{"categorical": True}``, or its colour values are
    whole numbers and its name or colour-bar title names a category (expert, kind, ...)."""
    d = _fig_dict(fig)
    out = []
    for i, t, holder, vals in _colour_traces(d):
        meta = t.get("meta") if isinstance(t.get("meta"), dict) else {}
        flat = [x for row in vals for x in (row if isinstance(row, (list, tuple)) else [row]) if x is not None]
        whole = all(float(x).is_integer() for x in flat)
        cb = holder.get("colorbar") or {}
        label = f"{t.get('name', '')} {_text(cb.get('title'))}".lower()
        categorical = meta.get("categorical") is True or (
            meta.get("categorical") is not False and whole and any(w in label for w in CATEGORY_WORDS))
        if categorical and not _is_stepwise(holder.get("colorscale")):
            out.append(f"trace {i} ({t.get('name', '')!r}): categories on a continuous colour scale "
                       f"{str(holder.get('colorscale'))[:30]!r}; use a stepwise qualitative scale")
    return out


def _has_points(t: dict) -> bool:
    for k in ("x", "y", "z", "values"):
        v = t.get(k)
        if isinstance(v, (list, tuple)) and any(
                (x is not None and (not isinstance(x, (list, tuple)) or any(y is not None for y in x))) for x in v):
            return True
    return False


def _domain(ax: dict) -> tuple[float, float]:
    dom = ax.get("domain")
    return (float(dom[0]), float(dom[1])) if dom else (0.0, 1.0)


def empty_subplots(fig: FigureLike) -> list[str]:
    """A subplot (an x/y axis pair some trace uses) whose traces hold no data must carry an annotation,
    inside its area, saying why it is empty."""
    d = _fig_dict(fig)
    lay = d.get("layout", {})
    xs, ys = _axes(lay, "x"), _axes(lay, "y")
    cells: dict[tuple[str, str], bool] = {}
    for t in d.get("data", []):
        if t.get("type", "scatter") in ("pie", "table", "indicator", "sankey"):
            continue
        key = (t.get("xaxis", "x"), t.get("yaxis", "y"))
        cells[key] = cells.get(key, False) or (_has_points(t) and t.get("visible", True) is not False)
    out = []
    anns = [a for a in lay.get("annotations") or [] if _text(a).strip()]
    for (xa, ya), has in cells.items():
        if has:
            continue
        x0, x1 = _domain(xs.get(xa, {}))
        y0, y1 = _domain(ys.get(ya, {}))
        said = False
        for a in anns:
            xr, yr = str(a.get("xref", "x")), str(a.get("yref", "y"))
            if xr.split()[0] == xa and yr.split()[0] == ya:
                said = True
            elif xr == "paper" and yr == "paper":
                ax_, ay_ = float(a.get("x", 0.5)), float(a.get("y", 0.5))
                said = said or (x0 - 0.02 <= ax_ <= x1 + 0.02 and y0 - 0.02 <= ay_ <= y1 + 0.1)
        if not said:
            out.append(f"subplot {xa}/{ya} is empty and no annotation says why")
    return out


def _legend_entries(d: dict) -> list[tuple[str, Any]]:
    """(name, legendgroup) of every trace the legend lists."""
    out = []
    for t in d.get("data", []):
        typ = t.get("type", "scatter")
        shown = t.get("showlegend")
        if shown is False or shown is None and typ not in ("scatter", "bar", "scattergl", "box", "histogram", "violin"):
            continue
        out.append((_plain(_text(t.get("name"))), t.get("legendgroup")))
    return out


def _title_bottom(title: dict, text: str, size: float, t: float, height: float) -> float:
    """px from the top of the figure to the bottom of the title's last line."""
    title = title if isinstance(title, dict) else {}
    y, anchor = title.get("y"), title.get("yanchor", "auto")
    lines_h = (_lines(text) - 1) * size * LINE_H
    if y in (None, "auto"):
        return t / 2 + lines_h + 0.25 * size                   # first baseline at half the top margin
    top = (1 - float(y)) * height
    if anchor == "top" or anchor == "auto" and float(y) > 2 / 3:
        return top + lines_h + 1.2 * size
    return top + lines_h / 2 + 0.6 * size


def legend_and_title(fig: FigureLike) -> list[str]:
    """The title must fit in the top margin, and a legend above the plot must not reach into the title."""
    d = _fig_dict(fig)
    lay = d.get("layout", {})
    title = lay.get("title") or {}
    text = _text(title)
    margin = lay.get("margin") or {}
    t, b = float(margin.get("t", 100)), float(margin.get("b", 80))
    height = float(lay.get("height") or 450)
    width = float(lay.get("width") or WIDTH)
    l, r = float(margin.get("l", 80)), float(margin.get("r", 80))
    size = _font_size(title, _font_size(lay, DEFAULT_FONT) * 17 / 12)   # plotly's title default: 17 px
    out = []
    if text and _title_bottom(title, text, size, t, height) > t:
        out.append(f"title ({_lines(text)} lines of {size:g} px) is taller than the top margin ({t:g} px)")
    if text and _width_px(text, size) > width - 10:
        out.append(f"title line ~{_width_px(text, size):.0f} px wide does not fit the figure ({width:g} px)")
    legend = lay.get("legend") or {}
    entries = _legend_entries(d)
    if lay.get("showlegend") is False or not entries or len(entries) < 2 and lay.get("showlegend") is not True:
        return out
    y = float(legend.get("y", 1.0))
    if legend.get("orientation") != "h" or y < 1.0 or str(legend.get("yref", "paper")) == "container":
        return out
    lsize = _font_size(legend, _font_size(lay, DEFAULT_FONT))
    groups: dict = {}
    for _, g in entries:
        groups[g] = groups.get(g, 0) + 1
    if len(groups) < len(entries) and None not in groups:       # grouped: each group is a column
        rows = max(groups.values())
    else:
        rows, x = 1, 0.0
        for n, _ in entries:
            w = len(n) * lsize * CHAR_W + 45                        # swatch + gap
            if x + w > width - l - r and x > 0:
                rows, x = rows + 1, 0.0
            x += w
    plot_h = height - t - b
    # glyph extents, as plotly lays them out: the title's first baseline at half the top margin, a legend
    # row ~1.6 font sizes tall stacked up from just above the plot (measured on rendered figures)
    legend_top = t - (y - 1.0) * plot_h - rows * lsize * 1.6 - 2
    title_bottom = _title_bottom(title, text, size, t, height)
    if text and legend_top < title_bottom - 3:
        out.append(f"legend ({rows} row(s), top at ~{legend_top:.0f} px) reaches into the title (bottom at "
                   f"~{title_bottom:.0f} px): raise the top margin or move the legend")
    elif legend_top < -3:
        out.append(f"legend ({rows} row(s)) is taller than the top margin ({t:g} px)")
    return out


def _range(ax: dict):
    r = ax.get("range")
    if not r or ax.get("autorange") is True or r[0] is None or r[1] is None:
        return None
    lo, hi = float(r[0]), float(r[1])
    if ax.get("type") == "log":
        lo, hi = 10 ** lo, 10 ** hi
    return (min(lo, hi), max(lo, hi))


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def axis_ranges(fig: FigureLike) -> list[str]:
    """Markers, and the text drawn next to them, must lie inside a fixed axis range (plotly clips them)."""
    d = _fig_dict(fig)
    lay = d.get("layout", {})
    xs, ys = _axes(lay, "x"), _axes(lay, "y")
    width = float(lay.get("width") or WIDTH)
    margin = lay.get("margin") or {}
    plot_w = width - float(margin.get("l", 80)) - float(margin.get("r", 80))
    out = []
    for i, t in enumerate(d.get("data", [])):
        if t.get("type", "scatter") not in ("scatter", "scattergl") or t.get("visible", True) is False:
            continue
        mode = str(t.get("mode", "markers"))
        if "markers" not in mode and "text" not in mode:
            continue
        xa, ya = xs.get(t.get("xaxis", "x"), {}), ys.get(t.get("yaxis", "y"), {})
        xr, yr = _range(xa), _range(ya)
        xv, yv = t.get("x") or [], t.get("y") or []
        texts = t.get("text") if isinstance(t.get("text"), (list, tuple)) else [t.get("text")] * len(xv)
        pos = str(t.get("textposition", "middle center"))
        for j, (x, y) in enumerate(zip(xv, yv)):
            x, y = _num(x), _num(y)
            if x is None or y is None:
                continue
            if xr and not (xr[0] <= x <= xr[1]) or yr and not (yr[0] <= y <= yr[1]):
                out.append(f"trace {i} ({t.get('name', '')!r}) point ({x:.4g}, {y:.4g}) lies outside the axis "
                           f"range x {xr} y {yr}")
                break
            label = texts[j] if j < len(texts) else None
            if "text" not in mode or not label or not xr or xa.get("type") == "log" or t.get("cliponaxis") is False:
                continue
            dom = xa.get("domain") or [0, 1]
            px_per = plot_w * (dom[1] - dom[0]) / max(xr[1] - xr[0], 1e-30)
            tw = len(_plain(str(label))) * _font_size(t.get("textfont") and {"font": t["textfont"]}) * CHAR_W
            right = (x - xr[0]) * px_per + (tw if "right" in pos else tw / 2 if "center" in pos else 0)
            left = (x - xr[0]) * px_per - (tw if "left" in pos else tw / 2 if "center" in pos else 0)
            if right > (xr[1] - xr[0]) * px_per + 4 or left < -4:
                out.append(f"trace {i} ({t.get('name', '')!r}) label {str(label)[:30]!r} at x={x:.4g} runs past "
                           f"the x range {xr}")
                break
    return out


FIGURE_RULES = (dollar_signs, colour_keys, categorical_scales, empty_subplots, legend_and_title, axis_ranges)


def check_figure(fig: FigureLike) -> list[str]:
    """Every figure rule's problems (empty: the figure passes)."""
    d = _fig_dict(fig)
    return [f"{rule.__name__}: {p}" for rule in FIGURE_RULES for p in rule(d)]


def _px(value: Any, default: float) -> float:
    if value in (None, "", "initial", "auto"):
        return default
    m = re.fullmatch(r"\s*([\d.]+)\s*px\s*", str(value))
    return float(m.group(1)) if m else default


def label_widths(controls: dict) -> list[str]:
    """ipywidgets descriptions must fit their ``description_width``, and a dropdown's option labels the
    dropdown (text width estimated as characters × font size × ``CHAR_W``)."""
    out = []
    for name, ctl in controls.items():
        if type(ctl).__name__ in ("Checkbox", "Button"):     # description beside the box / on the button
            continue
        desc = getattr(ctl, "description", "") or ""
        style = getattr(ctl, "style", None)
        label_px = _px(getattr(style, "description_width", None), WIDGET_LABEL_PX)
        need = len(_plain(desc)) * WIDGET_FONT * CHAR_W
        if desc and need > label_px:
            out.append(f"control {name!r}: description {desc!r} needs ~{need:.0f} px, description_width is "
                       f"{label_px:.0f} px")
        opts = getattr(ctl, "options", None)
        if opts and type(ctl).__name__ in ("Dropdown", "Select"):
            width = _px(getattr(getattr(ctl, "layout", None), "width", None), WIDGET_WIDTH_PX)
            room = width - (label_px if desc else 0) - 28            # the arrow and padding
            labels = [o[0] if isinstance(o, tuple) else str(o) for o in opts]
            longest = max(labels, key=len)
            if len(longest) * WIDGET_FONT * CHAR_W > room:
                out.append(f"control {name!r}: option {longest!r} needs ~{len(longest) * WIDGET_FONT * CHAR_W:.0f} px, "
                           f"the dropdown shows ~{room:.0f} px")
    return out

"""notebooks/glossary.md holds: every entry names modules that import (and the functions it names exist),
lists notebooks that exist, is in the table of contents; every ``glossary.md#anchor`` link in a notebook
source resolves to an entry, and that entry lists the notebook. Anchors come from one function,
``v4lab.site.anchor``, which the static site also uses for the glossary page's heading ids."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from v4lab.site import anchor

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
GLOSSARY = NB / "glossary.md"
LINK = re.compile(r"glossary\.md#([^)\s\"'>]+)")

# The terms issue 19 asks for, by anchor (the brief's "routed/shared expert" and "prefill/decode" are two
# entries each).
REQUIRED = ["mla", "dsa", "gqa-8", "e2m1", "e8m0", "mxfp4", "fp8", "ste", "qat", "sqnr", "mtp", "churn", "csa",
            "hca", "sliding-window", "attention-sink", "lightning-indexer", "top-k", "compression-ratio", "mhc",
            "hc", "sinkhorn", "composite-gain", "moe", "routed-expert", "shared-expert", "hash-routing",
            "sqrt-softplus", "aux-loss-free-bias", "sequence-wise-balance-loss", "swiglu-clamp",
            "anticipatory-routing", "kv-cache", "roofline", "expert-parallelism", "yarn", "rope", "muon",
            "prefill", "decode"]


def entries(text: str) -> dict[str, dict]:
    """anchor -> {term, body, modules: [(module, [names])], notebooks: [stem] | None}."""
    out = {}
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    for term, body in zip(parts[1::2], parts[2::2]):
        body = re.split(r"^#{1,2} ", body, flags=re.M)[0]
        mod_line = re.search(r"^- \*\*Module:\*\* (.+)$", body, re.M)
        nb_line = re.search(r"^- \*\*Notebooks:\*\* (.+)$", body, re.M)
        modules = []
        if mod_line:
            for m in re.finditer(r"`(v4lab(?:\.\w+)*)`(?: \(([^)]*(?:\([^)]*\))?[^)]*)\))?", mod_line.group(1)):
                names = [re.match(r"\w+", n).group(0) for n in re.findall(r"`([^`]+)`", m.group(2) or "")]
                modules.append((m.group(1), names))
        notebooks = None if nb_line is None else re.findall(r"\((\d\d_[a-z0-9_]+)\.ipynb\)", nb_line.group(1))
        out[anchor(term)] = {"term": term.strip(), "body": body, "modules": modules, "notebooks": notebooks,
                             "nb_line": nb_line.group(1) if nb_line else ""}
    return out


TEXT = GLOSSARY.read_text(encoding="utf-8")
ENTRIES = entries(TEXT)


def test_anchor_examples():
    assert anchor("GQA-8") == "gqa-8"
    assert anchor("E8M0") == "e8m0"
    assert anchor("Routed / shared  expert") == "routed-shared-expert"
    assert anchor("sqrt-softplus") == "sqrt-softplus"
    assert anchor("--Top-k!--") == "top-k"
    assert anchor("Aux-loss-free bias") == "aux-loss-free-bias"


def test_parser_sees_modules_and_notebooks():
    # the parser itself: a made-up entry is read back field by field
    e = entries("### Foo bar\n\nText.\n\n- **Module:** `v4lab.quant` (`sqnr_db`, `e2m1_decode`), `v4lab.moe`\n"
                "- **Notebooks:** [05](05_fp4.ipynb), [01](01_moe_expansion.ipynb)\n\n### Baz\n\nNo lines.\n")
    assert list(e) == ["foo-bar", "baz"]
    assert e["foo-bar"]["modules"] == [("v4lab.quant", ["sqnr_db", "e2m1_decode"]), ("v4lab.moe", [])]
    assert e["foo-bar"]["notebooks"] == ["05_fp4", "01_moe_expansion"]
    assert e["baz"]["modules"] == [] and e["baz"]["notebooks"] is None


def test_required_terms_are_defined():
    missing = [a for a in REQUIRED if a not in ENTRIES]
    assert not missing, f"glossary.md has no entry for {missing}"


def test_headings_are_unique_and_plain():
    terms = re.findall(r"^### (.+)$", TEXT, re.M)
    anchors = [anchor(t) for t in terms]
    dup = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not dup, f"two glossary headings share the anchor(s) {dup}"
    # letters, digits, single spaces and hyphens only: then GitHub's and JupyterLab's anchors match anchor()
    bad = [t for t in terms if not re.fullmatch(r"[A-Za-z0-9]+(?:[ -][A-Za-z0-9]+)*", t)]
    assert not bad, f"glossary headings with other characters (anchors would differ between renderers): {bad}"


def test_every_entry_has_a_definition_module_and_notebooks_line():
    for e in ENTRIES.values():
        prose = [p for p in e["body"].split("\n\n") if p.strip() and not p.strip().startswith(("$$", "- **"))]
        assert prose, f"glossary entry {e['term']!r}: no definition paragraph"
        assert e["modules"], f"glossary entry {e['term']!r}: no '- **Module:** `v4lab.xxx`' line"
        assert e["nb_line"], f"glossary entry {e['term']!r}: no '- **Notebooks:**' line"


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_modules_import_and_named_functions_exist(key):
    for mod, names in ENTRIES[key]["modules"]:
        m = importlib.import_module(mod)
        for n in names:
            assert hasattr(m, n), f"glossary entry {ENTRIES[key]['term']!r}: {mod} has no {n!r}"


def test_listed_notebooks_exist():
    for e in ENTRIES.values():
        if not e["notebooks"]:
            assert e["nb_line"].strip().lower().startswith("none"), \
                f"glossary entry {e['term']!r}: notebooks line {e['nb_line']!r} lists no notebook and does not say none"
        for stem in e["notebooks"] or []:
            assert (NB / f"{stem}.ipynb").exists() and (NB / "src" / f"{stem}.py").exists(), \
                f"glossary entry {e['term']!r} lists {stem}, which is not a notebook"


def test_table_of_contents_lists_every_entry_and_only_entries():
    toc = TEXT.split("\n---\n", 1)[0]
    linked = re.findall(r"\]\(#([^)]+)\)", toc)
    assert sorted(set(linked)) == sorted(ENTRIES), (sorted(set(ENTRIES) - set(linked)),
                                                    sorted(set(linked) - set(ENTRIES)))


def test_links_inside_the_glossary_resolve():
    bad = [a for a in re.findall(r"\]\(#([^)]+)\)", TEXT) if a not in ENTRIES]
    assert not bad, f"glossary.md links to missing entries {bad}"


def notebook_links() -> list[tuple[str, str]]:
    return [(src.stem, a) for src in sorted((NB / "src").glob("*.py"))
            for a in LINK.findall(src.read_text(encoding="utf-8"))]


def test_notebook_glossary_links_resolve():
    bad = [f"{stem}: glossary.md#{a}" for stem, a in notebook_links() if a not in ENTRIES]
    assert not bad, f"links to glossary entries that do not exist (anchors: {sorted(ENTRIES)}): {bad}"


def test_entries_list_the_notebooks_that_link_them():
    bad = [f"{ENTRIES[a]['term']!r} is linked from {stem} but does not list it"
           for stem, a in notebook_links() if a in ENTRIES and stem not in (ENTRIES[a]["notebooks"] or [])]
    assert not bad, bad


def test_link_checker_catches_a_broken_link(tmp_path):
    # the regex used above finds anchors in the notebooks' markdown form ("# " prefixed lines)
    src = "# See [MLA](glossary.md#mla) and [x](glossary.md#no-such-term).\n"
    found = LINK.findall(src)
    assert found == ["mla", "no-such-term"]
    assert [a for a in found if a not in ENTRIES] == ["no-such-term"]

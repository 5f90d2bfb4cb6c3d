"""The repository stands alone: no tracked file points outside it, and every citation of the design notes
(``docs/design/<page>.md §N``, or a bare ``<page>.md §N``) names a section heading that exists."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design"
OUTSIDE = ("../shared", "/shared/spec")
PAGES = ("v4-attention", "v4-moe-mhc-fp4")
# A page name, then the § list that follows it up to the end of the clause (";", a newline, ". " or the
# next page name).
_NAMES = "|".join(PAGES)
CITATION = re.compile(rf"(?:docs/design/)?({_NAMES})\.md`?"
                      rf"((?:(?!(?:docs/design/)?(?:{_NAMES})\.md)(?:[^;\n.]|\.(?=\S)))*)")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)|[–-]\s*(\d+(?:\.\d+)+)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
        return None                   # binary (weights, images) or a submodule


def headings(page: str) -> set[str]:
    return set(HEADING.findall((DESIGN / f"{page}.md").read_text(encoding="utf-8")))


def citations(text: str) -> list[tuple[str, str]]:
    """(page, section) for every section cited after a design page's name."""
    found = []
    for m in CITATION.finditer(text):
        for a, b in SECTION.findall(m.group(2)):
            found.append((m.group(1), a or b))
    return found


def test_design_pages_exist_and_are_numbered():
    for page in PAGES:
        got = headings(page)
        assert {str(i) for i in range(11)} <= got, f"{page}.md: chapters 0-10 must all exist"


def test_citation_parser_finds_sections():
    text = ("Spec: docs/design/v4-attention.md §3 (data flow), §3.5 (visibility); v4-moe-mhc-fp4.md §1, §8.\n"
            "counts (v4-attention.md §5.2–5.4); §9 of something else. Also docs/design/v4-attention.md §3.5–§3.6. x")
    assert citations(text) == [("v4-attention", "3"), ("v4-attention", "3.5"), ("v4-moe-mhc-fp4", "1"),
                               ("v4-moe-mhc-fp4", "8"), ("v4-attention", "5.2"), ("v4-attention", "5.4"),
                               ("v4-attention", "3.5"), ("v4-attention", "3.6")]


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in tracked_files():
        text = text_of(path)
        if text is None or path == Path(__file__).resolve():
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def test_every_design_citation_names_an_existing_section():
    known = {page: headings(page) for page in PAGES}
    missing, n = [], 0
    for path in tracked_files():
        if path.suffix not in (".py", ".md", ".ipynb") or path == Path(__file__).resolve():
            continue
        text = text_of(path)
        if text is None:
            continue
        for page, sec in citations(text):
            n += 1
            if sec not in known[page]:
                missing.append(f"{path.relative_to(ROOT)}: {page}.md §{sec}")
    assert n > 30, f"only {n} citations found: the parser is not reading the sources"
    assert not missing, "citations of sections that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", PAGES)
def test_design_pages_cite_primary_sources(page):
    text = (DESIGN / f"{page}.md").read_text(encoding="utf-8")
    for source in ("inference/model.py", "config.json", "DeepSeek-V4", "V3"):
        assert source in text, f"{page}.md §0 must cite {source}"

"""The lab model's corpus: CPython's HTML documentation as plain text, one document per page.

Source: Debian's ``python3.11-doc`` package (``apt-get install python3.11-doc``), which installs the
Sphinx-built HTML of the whole CPython 3.11 documentation under ``/usr/share/doc/python3.11/html``
(~530 pages). Licence: PSF License v2 (© Python Software Foundation); redistribution is allowed with the
notice, which is how ``data/lab-v4/heldout.txt`` ships a part of it.

Conversion (stdlib ``html.parser`` only): keep the text inside Sphinx's ``<div class="body" role="main">``
(so navigation bars, sidebars, footers and the search box are dropped), drop ``<script>``/``<style>`` and
the "¶" permalink anchors, keep ``<pre>`` blocks verbatim (code examples), collapse other whitespace, and
end every block element (paragraph, heading, list item, table row ...) with a newline. Index pages
(``genindex*``, ``py-modindex``, ``search``) are lists of links, not text, and are skipped.

Order and split are pure functions of the page paths: documents sorted by path relative to the HTML
root; every 10th document of that order, starting at the 4th (``sorted(paths)[3::10]``), is held out,
the same rule tiny-v4 uses for its topics. ``python -m v4lab.corpus OUT_DIR`` writes the plain texts
and a manifest (path, characters, sha256 per document, the whole corpus's sha256, the licence).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_ROOT = Path("/usr/share/doc/python3.11/html")
SOURCE = "CPython 3.11 documentation, HTML from Debian package python3.11-doc"
LICENSE = "PSF License v2 (Copyright Python Software Foundation); redistribution allowed with the notice"
HELDOUT_SLICE = (3, 10)                   # held-out documents: sorted(paths)[3::10]
SEP = "\x1e"                              # record separator between documents in heldout.txt
SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search)\.html(\.gz)?$")
PAGE = re.compile(r"\.html(\.gz)?$")      # Debian gzips the largest page (whatsnew/changelog.html.gz)
BLOCK_TAGS = {"p", "div", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br",
              "table", "ul", "ol", "dl", "section", "blockquote", "figcaption", "caption", "hr"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source"}


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


class _MainText(HTMLParser):
    """Text of the ``role="main"`` div, with block structure as newlines and ``<pre>`` kept verbatim."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.main_depth = 0          # open <div>s since (and including) the main div; 0 = outside
        self.skip_depth = 0          # inside <script>, <style> or a permalink anchor
        self.pre_depth = 0
        self.anchors: list[bool] = []   # open <a> tags: is it a permalink ("¶") anchor?

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not self.main_depth:
            if tag == "div" and a.get("role") == "main":
                self.main_depth = 1
            return
        if tag == "div":
            self.main_depth += 1
        if tag == "a":
            self.anchors.append("headerlink" in (a.get("class") or "").split())
        if tag in ("script", "style") or (tag == "a" and self.anchors[-1]):
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if self.main_depth and tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if not self.main_depth:
            return
        if tag in ("script", "style") or (tag == "a" and self.anchors and self.anchors.pop()):
            self.skip_depth = max(0, self.skip_depth - 1)
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "div":
            self.main_depth -= 1

    def handle_data(self, data):
        if not self.main_depth or self.skip_depth:
            return
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Plain text of one Sphinx page's main body (see the module docstring)."""
    p = _MainText()
    p.feed(html)
    p.close()
    lines = [ln.rstrip() for ln in "".join(p.parts).split("\n")]
    out, blank = [], 0
    for ln in lines:                          # at most one blank line in a row; no leading space on prose
        if ln.strip():
            out.append(ln)
            blank = 0
        elif out and blank == 0:
            out.append("")
            blank = 1
    return "\n".join(out).strip() + "\n"


def page_paths(root: str | Path = DEFAULT_ROOT) -> list[str]:
    """The HTML pages that make documents, as paths relative to ``root``, sorted (Sphinx's own
    ``_static``/``_sources``/``_images`` folders and the index pages excluded)."""
    root = Path(root)
    if not root.is_dir():
        _bad("root", str(root), "is not a directory; install the corpus with `apt-get install python3.11-doc`")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html*")
                   if PAGE.search(p.name) and not p.relative_to(root).parts[0].startswith("_")
                   and not SKIP_PAGES.match(p.name))
    if not paths:
        _bad("root", str(root), "holds no HTML pages")
    return paths


def load_documents(root: str | Path = DEFAULT_ROOT) -> dict[str, str]:
    """{relative path: plain text} for every page (``.html`` or gzipped ``.html.gz``), in sorted path
    order; empty pages are dropped."""
    root = Path(root)
    docs = {}
    for rel in page_paths(root):
        raw = (root / rel).read_bytes()
        text = html_to_text((gzip.decompress(raw) if rel.endswith(".gz") else raw).decode("utf-8"))
        if text.strip():
            docs[rel] = text
    return docs


def split_documents(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(train names, held-out names): ``sorted(names)[3::10]`` held out, the rest trained on."""
    names = sorted(names)
    a, b = HELDOUT_SLICE
    held = names[a::b]
    held_set = set(held)
    return [n for n in names if n not in held_set], held


def fingerprint(docs: dict[str, str]) -> dict:
    """Source, licence, document count, characters and sha256 over (path, text) pairs in path order."""
    h = hashlib.sha256()
    for k in sorted(docs):
        h.update(k.encode() + b"\0" + docs[k].encode() + b"\0")
    return {"source": SOURCE, "license": LICENSE, "documents": len(docs),
            "chars": sum(len(v) for v in docs.values()), "sha256": h.hexdigest()}


def heldout_text(docs: dict[str, str]) -> str:
    """The held-out documents joined by U+001E (what the model directory ships as heldout.txt)."""
    return SEP.join(docs[n] for n in split_documents(docs)[1])


def write_corpus(out: str | Path, root: str | Path = DEFAULT_ROOT) -> dict:
    """Write OUT/train/*.txt, OUT/heldout.txt and OUT/manifest.json; return the manifest."""
    docs = load_documents(root)
    train, held = split_documents(docs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**fingerprint(docs), "root": str(root), "heldout_rule": "sorted(paths)[3::10]",
                "train_documents": len(train), "heldout_documents": held,
                "train_chars": sum(len(docs[n]) for n in train),
                "heldout_chars": sum(len(docs[n]) for n in held),
                "documents_sha256": {n: hashlib.sha256(docs[n].encode()).hexdigest() for n in sorted(docs)}}
    (out / "heldout.txt").write_text(heldout_text(docs), encoding="utf-8")
    (out / "train.txt").write_text(SEP.join(docs[n] for n in train), encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4lab.corpus",
                                description="Build the lab model's corpus from CPython's HTML docs.")
    p.add_argument("out", help="output directory (train.txt, heldout.txt, manifest.json)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help=f"HTML root (default {DEFAULT_ROOT})")
    args = p.parse_args(argv)
    try:
        m = write_corpus(args.out, args.root)
    except ValueError as e:
        print(f"v4lab.corpus: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in m.items() if k not in ("documents_sha256", "heldout_documents")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

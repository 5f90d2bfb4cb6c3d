"""v4lab.corpus: Sphinx HTML to text, which pages count, the held-out split and the fingerprint."""
import gzip
import json

import pytest

from v4lab import corpus

PAGE = """<html><head><script>var nav = "script text";</script><style>body {color: red}</style></head>
<body><div class="related" role="navigation"><ul><li>Navigation bar</li></ul></div>
<div class="sphinxsidebar">Sidebar text</div>
<div class="document"><div class="body" role="main">
<section><h1>Built-in Functions<a class="headerlink" href="#x" title="Permalink">¶</a></h1>
<p>The   interpreter has
   functions <code>len()</code> and <a href="y.html">links</a>.</p>
<div class="highlight"><pre>for i in range(3):
    print(i)   # kept verbatim
</pre></div>
<ul><li>first item</li><li>second item</li></ul>
</section></div></div>
<div class="footer">Footer text</div></body></html>"""


def test_html_to_text_keeps_the_main_body_only():
    text = corpus.html_to_text(PAGE)
    for gone in ("Navigation bar", "Sidebar text", "Footer text", "script text", "color: red", "¶"):
        assert gone not in text
    assert text.startswith("Built-in Functions\n")
    assert "The interpreter has functions len() and links." in text        # prose whitespace collapsed
    assert "for i in range(3):\n    print(i)   # kept verbatim" in text    # <pre> verbatim
    assert "first item\n" in text and "second item" in text               # block elements end lines
    assert "\n\n\n" not in text and text.endswith("\n")


def test_html_to_text_without_main_div_is_empty():
    assert corpus.html_to_text("<html><body><p>no main div</p></body></html>").strip() == ""


def _tree(tmp_path):
    root = tmp_path / "html"
    (root / "library").mkdir(parents=True)
    (root / "_static").mkdir()
    (root / "_static" / "x.html").write_text(PAGE)                   # Sphinx's own folder: skipped
    (root / "genindex-A.html").write_text(PAGE)                      # index pages: skipped
    (root / "search.html").write_text(PAGE)
    for i in range(23):
        (root / "library" / f"m{i:02d}.html").write_text(PAGE.replace("first item", f"item of page {i}"))
    (root / "whatsnew").mkdir()
    (root / "whatsnew" / "changelog.html.gz").write_bytes(gzip.compress(PAGE.replace("first item", "gz").encode()))
    return root


def test_pages_order_split_and_gzip(tmp_path):
    root = _tree(tmp_path)
    paths = corpus.page_paths(root)
    assert paths == sorted(paths) and len(paths) == 24
    assert "whatsnew/changelog.html.gz" in paths
    assert not any(p.startswith("_") or "genindex" in p or p == "search.html" for p in paths)
    docs = corpus.load_documents(root)
    assert "gz\n" in docs["whatsnew/changelog.html.gz"]
    train, held = corpus.split_documents(docs)
    assert held == sorted(docs)[3::10] and len(held) == 3
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert corpus.heldout_text(docs).split(corpus.SEP) == [docs[n] for n in held]


def test_fingerprint_and_write_corpus(tmp_path):
    root = _tree(tmp_path)
    docs = corpus.load_documents(root)
    fp = corpus.fingerprint(docs)
    assert fp["documents"] == 24 and fp["chars"] == sum(map(len, docs.values())) and "PSF" in fp["license"]
    changed = dict(docs)
    changed["library/m00.html"] += "x"
    assert corpus.fingerprint(changed)["sha256"] != fp["sha256"]
    m = corpus.write_corpus(tmp_path / "out", root)
    assert m["sha256"] == fp["sha256"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["train_documents"] == 21
    assert (tmp_path / "out" / "heldout.txt").read_text() == corpus.heldout_text(docs)


def test_missing_root_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="root.*apt-get install python3.11-doc"):
        corpus.page_paths(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no HTML pages"):
        corpus.page_paths(tmp_path / "empty")
    assert corpus.main([str(tmp_path / "o"), "--root", str(tmp_path / "nope")]) == 2

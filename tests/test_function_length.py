"""No function over 60 lines in v4lab/ or kernels/ (from its ``def`` line to its last line, docstring
included), walked from the AST. ``ALLOWED`` names what is still longer and is being split; it may only
shrink: an entry that is no longer too long, or no longer exists, fails the test until it is removed."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60
ALLOWED: set[str] = set()


def function_lengths(src: str) -> dict[str, int]:
    """{qualified name: lines} of every function and method (nested ones too) in ``src``."""
    out = {}

    def walk(node, prefix):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + ch.name] = ch.end_lineno - ch.lineno + 1
                walk(ch, prefix + ch.name + ".")
            elif isinstance(ch, ast.ClassDef):
                walk(ch, prefix + ch.name + ".")
    walk(ast.parse(src), "")
    return out


def all_lengths() -> dict[str, int]:
    out = {}
    for base in ("v4lab", "kernels"):
        for f in sorted((ROOT / base).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            for name, n in function_lengths(f.read_text(encoding="utf-8")).items():
                out[f"{rel}:{name}"] = n
    return out


def test_no_function_over_the_limit():
    long = {k: n for k, n in all_lengths().items() if n > LIMIT and k not in ALLOWED}
    assert not long, "functions over 60 lines (split them into named steps):\n" + "\n".join(
        f"{k}: {n}" for k, n in sorted(long.items(), key=lambda kv: -kv[1]))


def test_allow_list_only_shrinks():
    lengths = all_lengths()
    stale = sorted(k for k in ALLOWED if lengths.get(k, 0) <= LIMIT)
    assert not stale, f"remove from ALLOWED (now within {LIMIT} lines, or gone): {stale}"


def test_the_walk_measures_methods_and_nested_functions():
    src = "class A:\n    def f(self):\n        def g():\n            pass\n        return 1\n"
    assert function_lengths(src) == {"A.f": 4, "A.f.g": 2}

"""Every public function in v4lab/ and kernels/ has type hints on its parameters and its return value.

Public: a module-level function or a method of a public class whose name does not start with "_"
(``__init__`` of a public class counts, without a return annotation). ``self`` / ``cls`` need none.
``@triton.jit`` kernels are left out (Triton reads their annotations itself).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# To do: files that still have public functions without hints. The list may only shrink: a file that
# becomes complete must be removed (test_todo_list_only_shrinks says so).
TODO = {
    "v4lab/__init__.py", "v4lab/attention.py", "v4lab/indexer.py", "v4lab/mhc.py", "v4lab/model.py",
    "v4lab/moe.py", "v4lab/real.py",
    "v4lab/experiments/mhc_stability.py",
    "v4lab/viz/attention.py", "v4lab/viz/clamp.py", "v4lab/viz/common.py", "v4lab/viz/cost.py",
    "v4lab/viz/fp4.py", "v4lab/viz/kernels.py", "v4lab/viz/mhc.py", "v4lab/viz/moe.py", "v4lab/viz/nbbuild.py",
    "v4lab/viz/real.py", "v4lab/viz/stability.py", "v4lab/viz/tiny.py", "v4lab/viz/tour.py",
    "v4lab/viz/trained.py",
}


def source_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in ("v4lab", "kernels") for p in (ROOT / d).rglob("*.py"))


def _is_jit(fn: ast.FunctionDef) -> bool:
    return any((isinstance(d, ast.Attribute) and d.attr == "jit") or (isinstance(d, ast.Name) and d.id == "jit")
               for d in fn.decorator_list)


def _missing(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    out = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
           if p.annotation is None and p.arg not in ("self", "cls")]
    out += [f"*{v.arg}" for v in (a.vararg, a.kwarg) if v is not None and v.annotation is None]
    if fn.returns is None and fn.name != "__init__":
        out.append("return")
    return out


def unannotated(path: str, root: Path = ROOT) -> list[str]:
    """'name: missing, ...' for every public function of the file that lacks a hint."""
    found = []

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                public = not node.name.startswith("_") or (node.name == "__init__" and prefix)
                if public and not _is_jit(node) and _missing(node):
                    found.append(f"{prefix}{node.name}: {', '.join(_missing(node))}")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                walk(node.body, f"{node.name}.")

    walk(ast.parse((root / path).read_text(encoding="utf-8")).body, "")
    return found


def test_checker_sees_a_missing_hint(tmp_path):
    src = ("def ok(x: int) -> int:\n    return x\n\ndef bad(x, *a: int) -> None:\n    pass\n\n"
           "class C:\n    def __init__(self, y: int):\n        pass\n\n    def m(self, z: int):\n        pass\n\n"
           "class _P:\n    def m(self, z):\n        pass\n")
    (tmp_path / "m.py").write_text(src)
    assert unannotated("m.py", tmp_path) == ["bad: x", "C.m: return"]


@pytest.mark.parametrize("path", [p for p in source_files() if p not in TODO])
def test_public_functions_have_hints(path):
    missing = unannotated(path)
    assert not missing, f"{path}: public functions without type hints:\n" + "\n".join(missing)


def test_todo_list_only_shrinks():
    files = set(source_files())
    assert TODO <= files, f"TODO names files that do not exist: {sorted(TODO - files)}"
    done = sorted(p for p in TODO if not unannotated(p))
    assert not done, f"these files are fully annotated now: remove them from TODO in {Path(__file__).name}: {done}"

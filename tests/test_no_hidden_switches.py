"""No switch hidden in a module: the code of v4lab/ and kernels/ never assigns to an attribute of a Python
module (``torch.Tensor.normal_ = ...``, ``nn.init.normal_ = ...``, ``model_mod.hc_pre = ...``, also through
``setattr``/``delattr``) and never rebinds a module global from a function (``global``). Run-time switches
live on objects (``v4lab.switches.Switches``) or are arguments. Tests may monkeypatch; the code may not.

The walk is static (the AST), so it catches the assignment wherever it sits, run or not."""
import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for base in ("v4lab", "kernels") for p in (ROOT / base).rglob("*.py"))


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def module_names(tree: ast.Module, package: str) -> set[str]:
    """Names bound to modules by the file's imports (``import torch``, ``from torch import nn``,
    ``from v4lab import model as model_mod``, relative ones too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                if _is_module(f"{base}.{a.name}"):
                    names.add(a.asname or a.name)
    return names


ENVIRONMENT = {"os.environ"}


def _flat(targets: list) -> list:
    out = []
    for t in targets:
        out += _flat(t.elts) if isinstance(t, (ast.Tuple, ast.List)) else [t]
    return out


def _outer(node: ast.AST) -> ast.AST:
    """The attribute a (possibly subscripted) target belongs to: ``m.d`` for ``m.d[k]``."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return node


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def offences(src: str, package: str) -> list[str]:
    tree = ast.parse(src)
    mods = module_names(tree, package)
    bad = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for t in _flat(targets):
            if isinstance(t, ast.Subscript) and ast.unparse(t.value) in ENVIRONMENT:
                continue                                  # the process environment, read by child processes
            if isinstance(t, (ast.Attribute, ast.Subscript)) and isinstance(_outer(t), ast.Attribute) \
                    and _root(t) in mods:
                bad.append(f"line {node.lineno}: assigns {ast.unparse(t)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
                and node.args and _root(node.args[0]) in mods):
            bad.append(f"line {node.lineno}: {node.func.id}({ast.unparse(node.args[0])}, ...)")
        if isinstance(node, ast.Global):
            bad.append(f"line {node.lineno}: global {', '.join(node.names)}")
    return bad


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = ["v4lab", "kernels"] if rel[0] == "kernels" else ["v4lab"]
    pkg += list(rel[1:-1])
    return ".".join(pkg) if path.name != "__init__.py" else ".".join(pkg)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_assignment_to_module_attributes(path):
    bad = offences(path.read_text(encoding="utf-8"), _package(path))
    assert not bad, f"{path.relative_to(ROOT)} changes a module at run time:\n" + "\n".join(bad)


@pytest.mark.parametrize("src", [
    "import torch\ntorch.Tensor.normal_ = lambda t, *a: t\n",
    "from torch import nn\ndef f():\n    setattr(nn.init, 'normal_', None)\n",
    "from v4lab import model as model_mod\ndef f(w):\n    model_mod.hc_pre = w\n",
    "import v4lab.mhc\nv4lab.mhc.CHECK_FINITE = False\n",
    "CHECK = True\ndef f():\n    global CHECK\n    CHECK = False\n",
    "from . import mhc\nmhc.CHECK_FINITE += 1\n",
    "from v4lab import moe\nmoe._DISPATCH['grouped'] = None\n",
    "import torch\ndef f():\n    torch.nn.Linear.reset_parameters = None\n",
])
def test_the_walk_catches_each_form(src):
    assert offences(src, "v4lab"), src


@pytest.mark.parametrize("src", [
    "import torch\nx = torch.zeros(3)\nx.data = x\n",                  # an object's attribute, not a module's
    "from torch import nn\nclass A(nn.Module):\n    def f(self):\n        self.w = 1\n",
    "import os\nos.environ['A'] = '1'\n",                              # the process environment, not a module
])
def test_the_walk_passes_ordinary_code(src):
    assert not offences(src, "v4lab"), src

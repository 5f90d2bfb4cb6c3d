"""The import pyramid of docs/architecture.md holds: every module of v4lab/ and kernels/ belongs to one
layer of the table in that page, imports only its own layer or lower ones (imports inside functions
included), and the module import graph has no cycle. The table is read from the page itself."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def load_layers() -> list[tuple[str, list[str]]]:
    m = re.search(r"<!-- layers:begin -->\s*```json\n(.*?)```\s*<!-- layers:end -->", DOC.read_text(), re.S)
    assert m, "docs/architecture.md must hold the layer table between <!-- layers:begin/end --> markers"
    return [(name, patterns) for name, patterns in json.loads(m.group(1))]


def module_files() -> dict[str, Path]:
    """Dotted name -> file, for v4lab/ and kernels/ (installed as v4lab.kernels)."""
    mods = {}
    for base, pkg in ((ROOT / "v4lab", "v4lab"), (ROOT / "kernels", "v4lab.kernels")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = f
    return mods


MODULES = module_files()


def is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def resolve(mod: str, node: ast.AST) -> set[str]:
    """The v4lab modules one import statement of ``mod`` depends on."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "v4lab"}
    if node.level:                                   # relative: from . import x / from .x import y
        base = mod if is_package(mod) else mod.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        target = base + ("." + node.module if node.module else "")
    else:
        target = node.module or ""
    if target.split(".")[0] != "v4lab":
        return set()
    return {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}


def imports_of(mod: str) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(MODULES[mod].read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            deps |= resolve(mod, node)
    return deps - {mod}


def layer_of(mod: str, layers) -> int | None:
    """Index of the layer whose most specific pattern matches ``mod`` (None: no pattern)."""
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(layers):
        for p in patterns:
            hit = mod.startswith(p[:-1]) if p.endswith(".*") else mod == p
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


@pytest.fixture(scope="module")
def layers():
    return load_layers()


def test_table_is_well_formed(layers):
    names = [n for n, _ in layers]
    assert names[0] == "config" and names[-1] == "app" and len(set(names)) == len(names)
    patterns = [p for _, ps in layers for p in ps]
    assert len(patterns) == len(set(patterns)), "a pattern appears in two layers"


def test_every_module_has_a_layer(layers):
    missing = [m for m in MODULES if layer_of(m, layers) is None]
    assert not missing, f"modules missing from the table in docs/architecture.md: {missing}"


def test_resolver_sees_relative_absolute_and_lazy_imports():
    assert "v4lab.kernels" in imports_of("v4lab.kernels.sparse_attn")       # from . import interpreted
    assert "v4lab.compressor" in imports_of("v4lab.attention")              # from .compressor import ...
    assert "v4lab.viz.trained" in imports_of("v4lab.bench.device")          # lazy, inside a function
    assert "v4lab.model" in imports_of("v4lab")                             # from v4lab.model import load


def test_no_module_imports_a_higher_layer(layers):
    bad = []
    for mod in MODULES:
        mine = layer_of(mod, layers)
        for dep in sorted(imports_of(mod)):
            theirs = layer_of(dep, layers)
            assert theirs is not None, f"{mod} imports {dep}, which is not a v4lab module in the table"
            if theirs > mine:
                bad.append(f"{mod} ({layers[mine][0]}) imports {dep} ({layers[theirs][0]})")
    assert not bad, "imports that reach up the pyramid:\n" + "\n".join(bad)


def test_import_graph_has_no_cycle():
    graph = {m: {d for d in imports_of(m) if d in MODULES} for m in MODULES}
    state: dict[str, int] = {}                        # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_notebook_sources_import_only_existing_v4lab_modules():
    for src in sorted((ROOT / "notebooks" / "src").glob("*.py")):
        for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dep in resolve("notebooks", node):
                    assert dep in MODULES, f"{src.name} imports {dep}, which is not a v4lab module"

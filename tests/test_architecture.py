"""The package's shape (docs/architecture.md): imports run one way between layers, no cycles, no hidden
state, functions that fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minisd"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("checks", "nn"),
    ("diffusion",),
    ("models",),
    ("formats",),
    ("adapters",),
    ("images", "canny", "viz", "fast", "metrics", "families", "generate", "editing", "pipeline", "pipeline_xl",
     "pipeline_sd3", "sds", "playground"),
    ("shapes",),
    ("cli", "__main__"),
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def level(module: str) -> int | None:
    """The layer of minisd.<part>...; None for the package root (its re-exports sit above everything)."""
    parts = module.split(".")
    return LEVEL[parts[1]] if len(parts) > 1 else None


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported minisd module, at module level?) for every import in the file, TYPE_CHECKING blocks excepted."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("minisd")]
        elif node.level == 0:
            targets = [node.module] if node.module and node.module.startswith("minisd") else []
        else:
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        found += [(t, id(node) in top) for t in targets if t in MODULES and t != module]
    return found


def test_every_module_has_a_layer():
    assert all(m == "minisd" or m.split(".")[1] in LEVEL for m in MODULES), sorted(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downwards_at_module_level(module):
    if level(module) is None:
        return
    for target, at_top in imports(module):
        assert at_top, f"{module} imports {target} inside a function: import at the top (a cycle?)"
        if level(target) is not None:
            assert level(target) <= level(module), f"{module} (layer {level(module)}) imports {target} (layer {level(target)})"


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports(m) if t != "minisd"} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(t):] + [t])}")
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_library_does_not_import_the_shapes_world():
    for module in MODULES:
        if level(module) is not None and level(module) < LEVEL["shapes"]:
            assert not [t for t, _ in imports(module) if t.startswith("minisd.shapes")], module


def test_functions_fit_on_a_screen():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


@pytest.mark.parametrize("pattern, why", [
    ("_minisd_", "private attributes set on modules the code does not own"),
    ("strict=False", "loading must be strict"),
    ("torch.manual_seed(", "library code takes a generator, it does not seed the global RNG"),
    ("np.random.seed(", "library code takes a generator, it does not seed the global RNG"),
])
def test_no_hidden_state(pattern, why):
    hits = [f"{m}:{i}" for m, p in MODULES.items() for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern in line]
    assert not hits, f"{why}: {hits}"

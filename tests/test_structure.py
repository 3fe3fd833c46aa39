"""The package's imports point one way, down the data flow of docs/DESIGN.md: no cycle, no upward import.

Every ``import`` in every module counts, including those inside functions (they run too). Each module has a layer
below; a module may import only modules of its own layer or a lower one, and the import graph has no cycle.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = [  # lowest first: the order of docs/DESIGN.md's data flow
    ("errors", "options", "arrays", "profiling", "scales", "kernels"),
    ("linalg", "updating", "io"),
    ("adapters",),
    ("pairing",),
    ("loading", "analysis", "memory"),
    ("plots",),
    ("report",),
    ("journal", "cache", "distributed", "recipe"),
    ("scan", "intervene", "synthetic", "tracking"),
    ("integrations", "cli", "__main__"),
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, pathlib.Path]:
    """``{dotted name: file}`` for the package (``kernels/`` installs as ``lorafft.kernels``)."""
    found = {}
    for folder, prefix in ((ROOT / "lorafft", "lorafft"), (ROOT / "kernels", "lorafft.kernels")):
        for path in folder.rglob("*.py"):
            if path.is_symlink() or any(part.is_symlink() for part in path.parents):
                continue  # a worktree's lorafft/kernels link to kernels/
            parts = list(path.relative_to(folder).with_suffix("").parts)
            name = ".".join([prefix, *parts[:-1]] + ([] if parts[-1] == "__init__" else parts[-1:]))
            found[name] = path
    return found


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (``from lorafft import x`` names x if a module)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        targets.update(c for c in candidates if c in modules and c != name and not name.startswith(c + "."))
    return targets - {"lorafft"}  # the package root only re-exports the public API, lazily


def _layer(name: str) -> int:
    top = name.split(".")[1]
    if top not in LAYER:
        pytest.fail(f"{name} has no layer: add it to LAYERS here and to docs/DESIGN.md")
    return LAYER[top]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if name != "lorafft"}


def test_no_upward_import(graph):
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    if _layer(target) > _layer(name))
    assert not upward, "imports against the data flow: " + ", ".join(upward)


def test_no_import_cycle(graph):
    cycles, state = [], {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_walk_sees_imports_inside_functions():
    source = "def f():\n    from lorafft import report\n"
    tree = ast.parse(source)
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))
    assert "lorafft.report" in _imports("lorafft.plots.x", _fake(source), {"lorafft.report": None})


def _fake(source):
    class Path:
        name = "x.py"

        @staticmethod
        def read_text():
            return source

    return Path

"""The structure rules of docs/architecture.md, checked on the source: import floors, no cycles, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hippos"

# A package may import from its own floor and the floors below (docs/architecture.md); the cycle test keeps two
# packages on one floor (training, evaluation) from importing each other both ways.
FLOORS = {
    "ops": 0,
    "data": 0,
    "layers": 1,
    "models": 2,
    "generation": 3,
    "training": 4,
    "evaluation": 4,
    "serving": 5,
    "benchmarks": 6,
    "cli": 7,
    "__main__": 8,
}
ROOT_LEAVES = {"", "config"}  # hippos/__init__.py (public names) and hippos/config.py (the config machinery)
MAX_FUNCTION_LINES = 60


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(path: Path, module: str) -> set[str]:
    """Every hippos module this file names in an import statement, at any depth (functions included)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hippos"):
            found |= {node.module.removeprefix("hippos").lstrip(".")}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("hippos").lstrip(".") for a in node.names if a.name.startswith("hippos")}
    return found


def _graph() -> dict[str, set[str]]:
    """{module: the modules it imports}, module names relative to hippos ("" is hippos itself)."""
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        deps = set()
        for name in _targets(path, module):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_imports_only_go_down_the_floors():
    upward = []
    for module, deps in _graph().items():
        top = module.split(".")[0]
        if top in ROOT_LEAVES:
            continue
        for dep in deps:
            other = dep.split(".")[0]
            if other != top and other not in ROOT_LEAVES and FLOORS[other] > FLOORS[top]:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports against the floors:\n" + "\n".join(sorted(upward))


def test_every_package_has_a_floor():
    packages = {_module(p).split(".")[0] for p in SRC.rglob("*.py")} - ROOT_LEAVES
    assert packages <= set(FLOORS), f"give these a floor here and in docs/architecture.md: {packages - set(FLOORS)}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_short(path: Path):
    long = [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_code_cites_only_the_docs_in_the_repo():
    cited = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "REFERENCE" in p.read_text()]
    assert not cited, f"these cite a document users do not have (cite docs/ instead): {cited}"

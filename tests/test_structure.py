"""The package's shape: imports flow one way (no cycles, lazy imports included), and modules stay small
enough to live in. A cycle is how a lower layer starts calling back into the facade above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import embedlens

PACKAGE = Path(embedlens.__file__).parent
#: Longest module, in lines.
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules ``path`` imports at run time (module level or inside functions), TYPE_CHECKING aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import sub`` imports the submodule ``pkg.sub``; ``from mod import name`` imports ``mod``.
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {node.module})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imported_modules(path, known) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


class TestImports:
    def test_cycle_finder_finds_a_planted_cycle(self):
        assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
        assert find_cycle({"a": {"b"}, "b": set()}) is None

    def test_no_import_cycle(self):
        cycle = find_cycle(import_graph())
        assert cycle is None, "import cycle: " + " -> ".join(cycle)

    def test_every_module_imports_alone(self):
        """Each module imports in a fresh interpreter on its own (no hidden order dependence)."""
        names = sorted(name for name in import_graph() if not name.endswith("__main__"))
        code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
        # One interpreter per module would take minutes; import them one per process in a few batches where the
        # order is reversed, so a module that only works after another has been imported is caught.
        for order in (names, names[::-1]):
            done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]


class TestSize:
    @pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
    def test_module_is_small(self, path):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines (at most {MAX_LINES})"

"""The core modules import each other in one direction only: no cycle, and no veloxseg import
hidden inside a function to break one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "veloxseg"
CORE = ("variants", "model", "adapt", "card", "hub", "registry")


def imports(module: str) -> tuple[set[str], set[str]]:
    """(veloxseg modules imported at module level, those imported inside functions) by ``module``;
    imports under ``if TYPE_CHECKING:`` run for type checkers only and are left out."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    top, nested = set(), set()

    def visit(node: ast.AST, inside_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module] if child.module else [alias.name for alias in child.names]
                (nested if inside_function else top).update(n.split(".")[0] for n in names)
            visit(child, inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, nested


@pytest.mark.parametrize("module", CORE)
def test_no_veloxseg_import_inside_functions(module):
    assert imports(module)[1] == set()


def test_core_modules_have_no_import_cycle():
    graph = {m: imports(m)[0] & set(CORE) for m in CORE}
    assert imports("variants")[0] <= {"config", "metadata"}  # the leaf: the variant table and configs
    done: list[str] = []
    while len(done) < len(graph):  # peel off modules whose imports are all done; a cycle never peels
        ready = [m for m, deps in graph.items() if m not in done and deps <= set(done)]
        assert ready, f"import cycle among {sorted(set(graph) - set(done))}"
        done += ready

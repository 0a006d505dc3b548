"""The modules of veloxseg import each other in one direction only: no cycle, counting every import
(inside functions and under ``if TYPE_CHECKING:`` too), and the network depends on its config and layers."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "veloxseg"
MODULES = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in PACKAGE.rglob("*.py")
}


def imports(module: str) -> set[str]:
    """The veloxseg modules ``module`` imports anywhere in its file (a package's ``__init__`` counts as the
    package, ``from . import name`` as the submodule ``name`` when there is one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("veloxseg")):
            base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1]] if node.level else [])
            base = ".".join(filter(None, [base, node.module]))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # a name imported from a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def cycles() -> list[set[str]]:
    """The groups of modules that import each other (strongly connected components of more than one)."""
    graph = {m: imports(m) for m in MODULES}
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            module = todo.pop()
            if module not in reach[start]:
                reach[start].add(module)
                todo += graph[module]
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return [set(group) for group in groups]


def test_the_graph_sees_every_kind_of_import():
    assert {"veloxseg.config", "veloxseg.layers", "veloxseg.modalities"} <= imports("veloxseg.model")
    assert "veloxseg.predict" in imports("veloxseg")  # imported inside __getattr__
    assert "veloxseg.model" in imports("veloxseg.hub")
    assert len(MODULES) > 40  # subpackages included


def test_no_module_imports_itself_back():
    found = cycles()
    assert found == [], found


def test_the_network_depends_on_its_config_and_layers_only():
    allowed = {"veloxseg.config", "veloxseg.layers", "veloxseg.metadata", "veloxseg.modalities"}
    assert imports("veloxseg.model") <= allowed
    assert imports("veloxseg.modalities") <= {"veloxseg.config"}  # a leaf beside the config
    assert imports("veloxseg.metadata") <= {"veloxseg.config", "veloxseg.modalities"}  # the dropout modes

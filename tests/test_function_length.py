"""No function in veloxseg runs over 55 lines (def to last line, docstring included): a longer one is split."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "veloxseg"
LIMIT = 55


def function_lengths(package: Path = PACKAGE) -> dict[str, int]:
    """``path:line name`` -> lines from the ``def`` to the function's last line, for every function."""
    lengths = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(package.parent)}:{node.lineno} {node.name}"
                lengths[where] = node.end_lineno - node.lineno + 1
    return lengths


def test_the_count_sees_nested_and_long_functions(tmp_path):
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n" + "        x = 1\n" * 60 + "\n\ndef g():\n    pass\n")
    assert function_lengths(tmp_path) == {f"{tmp_path.name}/m.py:2 f": 61, f"{tmp_path.name}/m.py:65 g": 2}


def test_no_function_is_longer_than_the_limit():
    long = {where: n for where, n in function_lengths().items() if n > LIMIT}
    assert not long, f"split these functions (over {LIMIT} lines): {long}"

"""No statement computes a value and drops it (issue 23 item 10): `check(a) and x == 12` on a line of
its own never checks x. ruff's bugbear rules (B015 pointless comparison, B018 useless expression,
selected in pyproject.toml) miss such a line because its first operand is a call, which might have
side effects; this walk flags every expression statement that is not a call, await, yield or
docstring, in the package, the tests, the benchmarks and the configs."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEPT = (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)


def dropped_values(source: str) -> list[tuple[int, str]]:
    """(line, text) of each expression statement of `source` whose value is computed and dropped."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Expr) or isinstance(node.value, KEPT):
            continue
        if isinstance(node.value, ast.Constant) and (isinstance(node.value.value, str) or node.value.value is ...):
            continue  # docstrings and `...` bodies
        found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_walk_flags_a_dropped_comparison_behind_a_call():
    source = 'def t():\n    """Doc."""\n    check(a) and state["position"] == 12\n    x == 1\n    f()\n    ...\n'
    assert dropped_values(source) == [(3, "check(a) and state['position'] == 12"), (4, "x == 1")]


@pytest.mark.parametrize("room", ["haf_jax", "tests", "benchmarks", "configs"])
def test_no_statement_drops_its_value(room):
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in sorted((ROOT / room).rglob("*.py"))
        for line, text in dropped_values(path.read_text())
    ]
    assert not found, "expression statements whose value is dropped (assert it, or call it):\n" + "\n".join(found)

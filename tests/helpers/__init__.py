"""Helpers shared by the test modules (tests/unit, tests/e2e): builders, reference values and
comparisons. Not tests themselves; fixtures live in the conftest.py files. Importable as `helpers`
because pytest puts tests/ (the directory of the top conftest.py) on sys.path."""

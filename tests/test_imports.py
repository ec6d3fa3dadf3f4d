"""The package's import graph has no cycle, counting imports inside functions too (a lazy import
hides a cycle, it does not remove it); sharding.py and the model layer keep their places."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "haf_jax"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from pkg import name` needs pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    # `import haf_jax.x` runs haf_jax/__init__.py first; that edge is not a cycle of ours
    for deps in graph.values():
        deps.discard("haf_jax")
    return graph


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layering():
    graph = _graph()
    assert not {d for d in graph["haf_jax.sharding"] if d.startswith("haf_jax.")}, graph["haf_jax.sharding"]
    for name, deps in graph.items():
        if name.startswith("haf_jax.model"):  # the model knows logical axis names only: no runs, no optimizer
            outside = {d for d in deps if not d.startswith("haf_jax.model")} - {"haf_jax.sharding"}
            assert not outside, (name, outside)

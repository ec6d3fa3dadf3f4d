"""The package's import graph has no cycle, counting imports inside functions too (a lazy import
hides a cycle, it does not remove it), and the rooms keep their layers (docs/DESIGN.md "The house"):
commands -> training / evaluation / generation -> model / data / core; config (every key's default)
below them all."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "haf_jax"


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
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
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
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


COMMANDS = {f"haf_jax.{c}" for c in ("train", "score", "evaluate", "export", "plan", "sample", "bon", "cli")} | {
    "haf_jax.data.__main__",
    "haf_jax.rlhf.__main__",
}


def _room(module: str) -> str:
    """haf_jax.training.loop -> training; haf_jax.score -> command; haf_jax -> package."""
    if module in COMMANDS:
        return "command"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or module.endswith("__init__") else ("package" if len(parts) == 1 else parts[1])


def test_layering():
    graph = _graph()
    problems = []
    for name, deps in graph.items():
        room = _room(name)
        for dep in deps:
            dep_room = _room(dep)
            if room == "command" and dep_room == "command" and dep != "haf_jax.cli":
                problems.append(f"{name} (a command) imports the command {dep}")
            if room in ("evaluation", "generation") and dep_room == "training":
                problems.append(f"{name} ({room}) imports {dep} (training)")
            if room == "model" and dep_room != "model" and dep != "haf_jax.core.sharding":
                problems.append(f"{name} (model) imports {dep}: the model knows logical axis names only")
            if room == "data" and dep_room in ("model", "training", "evaluation", "generation"):
                problems.append(f"{name} (data) imports {dep}")
            if room == "core" and dep_room in ("training", "evaluation", "generation", "command"):
                problems.append(f"{name} (core, shared by every room) imports {dep}")
            if room == "checkpoint" and dep_room not in ("checkpoint", "core"):
                problems.append(f"{name} (checkpoint) imports {dep}")
            if room != "rlhf" and dep_room == "rlhf" and room != "command":
                problems.append(f"{name} ({room}) imports {dep}: RLHF (Tunix, an extra) is a leaf room")
            if room == "config" and dep_room != "config":
                problems.append(f"{name} (config: the defaults, read by every room) imports {dep}")
            if room == "data" and dep_room == "config":
                problems.append(f"{name} (data) imports {dep}: the data package takes explicit arguments")
    assert not {d for d in graph["haf_jax.core.sharding"] if d.startswith("haf_jax.")}, graph["haf_jax.core.sharding"]
    assert not problems, "\n".join(sorted(problems))


def test_layering_rule_bites():
    """The room of each kind of module is read as intended (else test_layering checks nothing)."""
    assert _room("haf_jax.score") == _room("haf_jax.data.__main__") == "command"
    assert _room("haf_jax.training.loop") == "training" and _room("haf_jax.evaluation.evaluator") == "evaluation"
    assert _room("haf_jax.model.heads") == "model" and _room("haf_jax.core.sharding") == "core"
    assert _room("haf_jax.config.base") == _room("haf_jax.config") == "config"
    assert {"haf_jax.training.loop", "haf_jax.evaluation.evaluator"} <= set(_graph())

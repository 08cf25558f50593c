"""The shape docs/architecture.md promises, held by tests: imports point one way (no circle, counting
imports inside functions; the core never imports a backend's framework code), and the training
loop's functions stay small enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "twintune"
LONGEST_TRAIN_FUNCTION = 60  # lines, docstring included


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every twintune module `module` imports, anywhere in it (inside functions too)."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {resolve(name) for name in names if name.split(".")[0] == "twintune"} - {None, module}
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imports(module, path, known) for module, path in known.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    circles.append(sorted(group))
    return circles


def test_the_circle_finder_finds_a_circle_through_a_function_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_twintune_counting_imports_inside_functions():
    assert _circles(_graph()) == []


def test_the_core_never_imports_a_backends_framework_code():
    """Only twintune/backends/ itself reaches into backends/mlx and backends/torch; the core sees the
    backend protocol (backends/base.py) and the selector (backends/__init__.py)."""
    framework_code = ("twintune.backends.mlx", "twintune.backends.torch")
    offenders = {module: sorted(m for m in imported if m.startswith(framework_code))
                 for module, imported in _graph().items() if not module.startswith("twintune.backends")}
    assert {m: found for m, found in offenders.items() if found} == {}


def test_the_parts_of_twintune_import_one_way():
    """Between its parts (data, methods, tasks, formats, backends, train, ...: a subpackage or a
    top-level module) imports run one way too: data never imports a task, a backend never the loop."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        parts.setdefault(part(module), set()).update(part(m) for m in imported if part(m) != part(module))
    for imported in list(parts.values()):
        for name in imported:
            parts.setdefault(name, set())
    assert _circles(parts) == []


def test_nothing_below_train_imports_the_training_loop():
    """The loop sits above the data, the formats, the methods, the tasks and the backends: none of
    those imports twintune.train (a backend gets the world's settings as arguments)."""
    below = ("twintune.data", "twintune.formats", "twintune.methods", "twintune.tasks", "twintune.backends",
             "twintune.quant", "twintune.models", "twintune.dropout")
    offenders = {module: sorted(m for m in imported if m.startswith("twintune.train"))
                 for module, imported in _graph().items() if module.startswith(below)}
    assert {m: found for m, found in offenders.items() if found} == {}


def test_no_function_in_the_training_loop_is_longer_than_a_reader_holds_in_mind():
    long = []
    for path in sorted((PACKAGE / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_TRAIN_FUNCTION:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert long == []


# ---- the typed backend ------------------------------------------------------------------------------

# Protocol members a backend has only with a capability (backends/base.py Capabilities)
GATED = {"greedy_tokens": "pipelined_greedy", "shard": "sharding", "quantize_affine": "affine",
         "base_weights": "mlx_lm_models", "from_mlx_lm": "mlx_lm_models"}


def _protocol_members() -> set[str]:
    from twintune.backends.base import Backend, ModelComputation, OptimizerState, Processes

    members = set()
    for role in (ModelComputation, OptimizerState, Processes, Backend):
        members |= {name for name in vars(role) if not name.startswith("_")} | set(vars(role).get("__annotations__", {}))
    return members


def _has(capabilities, gate: str) -> bool:
    return gate in capabilities.quantizations if gate == "affine" else getattr(capabilities, gate)


def test_each_backend_implements_every_role_it_declares():
    from twintune.backends.mlx.backend import MLXBackend
    from twintune.backends.torch.backend import TorchBackend

    for cls in (MLXBackend, TorchBackend):
        missing = sorted(member for member in _protocol_members() - {"spec", "sharded"}
                         if not hasattr(cls, member) and not (member in GATED and not _has(cls.capabilities, GATED[member])))
        assert missing == [], cls.__name__
        extra = sorted(member for member, gate in GATED.items() if hasattr(cls, member) and not _has(cls.capabilities, gate))
        assert extra == [], f"{cls.__name__} has {extra} but does not declare the capability"


def test_every_call_on_a_backend_from_outside_is_declared():
    """What the core calls on a backend (run.backend.X, opened.backend.X, backend.X) is a member
    of the protocol, and nothing outside backends/ asks hasattr of a backend or compares its name."""
    import re

    calls, asks = set(), []
    for path in PACKAGE.rglob("*.py"):
        if "backends" in path.relative_to(PACKAGE).parts:
            continue
        text = path.read_text()
        calls |= set(re.findall(r"\b(?:run\.backend|self\.backend|opened\.backend|backend)\.([a-z_]+)\b", text))
        asks += [f"{path.name}: {m}" for m in re.findall(r"hasattr\([^)]*backend[^)]*\)|[=!]= \"(?:mlx|torch)\"", text)]
    assert sorted(calls - _protocol_members() - {"name"}) == []
    assert asks == []


# ---- tasks as strategies ----------------------------------------------------------------------------

def test_nothing_outside_tasks_asks_which_task_a_run_has():
    """Outside twintune/tasks/ no code tells tasks or reports apart: no isinstance against a task or
    report class, no comparison with a task's name, no test for a report's key (`"perplexity" in
    report`); the task and its report answer instead (tasks/task.py, tasks/reports.py)."""
    from twintune.tasks import TASKS, ClassificationReport, Generative, Labelled, PerplexityReport

    classes = {cls.__name__ for cls in (*TASKS.values(), Generative, Labelled, ClassificationReport, PerplexityReport)}
    words = set(TASKS) | {"perplexity", "accuracy"}
    asks = []
    for path in PACKAGE.rglob("*.py"):
        if "tasks" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                named = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None) for n in ast.walk(node.args[1])}
                asks += [f"{path.name}:{node.lineno} isinstance {sorted(named & classes)}"] if named & classes else []
            if isinstance(node, ast.Compare):
                constants = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                asks += [f"{path.name}:{node.lineno} compares with {sorted(constants & words)}"] if constants & words else []
    assert asks == []

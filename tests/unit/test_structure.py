"""The package graph runs one way, and functions stay short enough to read.

Rules (README "Layout and data flow"): the model knows nothing of MemDLM; nothing in pipeline/
imports data_prep; data_prep reaches into pipeline/ only through the dataset contract
(pipeline/dataset); no two packages import each other, directly or around a longer cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("pipeline", "data_prep", "launch"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(p for p in parts if p != "__init__")] = path
    return out


def _package(module: str) -> str:
    """pipeline.X for pipeline's sub-packages and top modules, else the top-level name."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ("pipeline", "data_prep", "launch")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        src = _package(module)
        for name in _imports(path):
            dst = _package(name)
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def test_the_model_knows_nothing_of_memdlm():
    assert "pipeline.memory" not in package_graph().get("pipeline.model", set())


def test_pipeline_never_imports_data_prep_and_data_prep_only_the_dataset_contract():
    graph = package_graph()
    offenders = {src for src, dsts in graph.items() if src.startswith("pipeline") and "data_prep" in dsts}
    assert not offenders, f"pipeline packages importing data_prep: {sorted(offenders)}"
    reached = {d for d in graph.get("data_prep", set()) if d.startswith("pipeline")}
    allowed = {"pipeline.dataset", "pipeline.cli"}  # the contract, and the leaf CLI error helper
    assert reached <= allowed, f"data_prep imports {sorted(reached - allowed)}"


def test_no_package_cycles():
    graph = package_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle reported once, from its smallest node
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "package cycles:\n" + "\n".join(cycles)


def test_no_function_in_pipeline_or_launch_is_over_sixty_lines():
    long = []
    for module, path in _modules().items():
        if module.startswith("data_prep"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(sorted(long))


# Third-party packages slow to import (seconds each) or only needed on one path: the only ones an
# import inside a function may name, with a comment saying why it is deferred.
HEAVY = {
    "deepspeed", "megatron", "mlflow", "transformers", "tokenizers", "sentencepiece", "lm_eval",
    "datasets", "matplotlib", "jinja2", "webdataset", "torch", "gguf", "submitit", "numpy", "safetensors",
    "huggingface_hub", "tqdm", "yaml", "PIL", "pyarrow",
}  # fmt: skip


def _module_imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (inside functions too), resolved to
    the module a name lives in (``from pipeline.x import y`` -> ``pipeline.x.y`` when that is a module)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "data_prep", "launch")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            if base.split(".")[0] not in ("pipeline", "data_prep", "launch"):
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m in modules and m != module}


def test_no_module_cycles_counting_imports_inside_functions():
    modules = _modules()
    graph = {m: _module_imports(p, m, modules) for m, p in modules.items()}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(" <-> ".join(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, "module cycles:\n" + "\n".join(cycles)


def _deferred_imports(tree: ast.AST):
    """(function, import node, whether a comment says why) for every import inside a function; a
    run of consecutive imports shares the comment above its first one."""
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for body in [n.body for n in ast.walk(fn) if hasattr(n, "body") and isinstance(n.body, list)]:
            run_start = None
            for stmt in body:
                if not isinstance(stmt, ast.Import | ast.ImportFrom):
                    run_start = None
                    continue
                run_start = run_start or stmt
                yield fn, stmt, run_start


def test_imports_inside_functions_are_only_heavy_dependencies_with_a_reason():
    bad = []
    for path in _modules().values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn, node, first in _deferred_imports(ast.parse("\n".join(lines))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if not {n.split(".")[0] for n in names} <= HEAVY:
                bad.append(f"{where} imports {', '.join(names)} inside {fn.name} (not a heavy dependency)")
                continue
            said = any("#" in lines[i] for i in (first.lineno - 1, first.lineno - 2))
            if not said:
                bad.append(f"{where}: deferred import of {', '.join(names)} without a comment saying why")
    assert not bad, "imports inside functions:\n" + "\n".join(sorted(set(bad)))

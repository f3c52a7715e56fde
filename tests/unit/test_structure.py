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

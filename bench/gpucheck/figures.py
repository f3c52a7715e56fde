"""Figures of a finished training run, read from its run directory (``metrics.jsonl``,
``config.json``, checkpoints, export), and helpers that keep the report small."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def approx_params(model: dict[str, Any]) -> int | None:
    """Weights of the DLM from its resolved config: blocks (attention 4d², SwiGLU 3df) + untied
    embedding and head over the vocabulary padded to 128 (norms left out: < 0.1%)."""
    try:
        d, f, n, v = model["d_model"], model["ffn_hidden"], model["n_layers"], model["vocab_size"]
    except (KeyError, TypeError):
        return None
    return n * (4 * d * d + 3 * d * f) + 2 * (-(-v // 128) * 128) * d


def trim(value: Any, max_list: int = 20, depth: int = 0) -> Any:
    """A JSON value with long lists cut (first items + count), for summaries of big result files."""
    if depth > 8:
        return "..."
    if isinstance(value, dict):
        return {k: trim(v, max_list, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > max_list:
            return [trim(v, max_list, depth + 1) for v in value[:4]] + [f"... {len(value)} items"]
        return [trim(v, max_list, depth + 1) for v in value]
    return value


def run_figures(run_dir: Path) -> dict[str, Any]:
    """Steps, first/final loss, evals by step, median throughput and MFU over the steady part (the
    last two thirds), peak memory, the resolved runtime, parameters, checkpoints and export files."""
    metrics = read_metrics(run_dir / "metrics.jsonl")
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    train = [r for r in metrics if "loss" in r]
    steady = train[len(train) // 3 :] or train

    def med(key: str) -> float | None:
        vals = sorted(r[key] for r in steady if isinstance(r.get(key), (int, float)))
        return vals[len(vals) // 2] if vals else None

    return {
        "run_dir": str(run_dir),
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "evals": {
            r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
            for r in metrics
            if any(k.startswith("eval/") for k in r)
        },
        "tokens_per_s_median": med("tokens_per_s"),
        "mfu_median": med("mfu"),
        "peak_memory_mib": max((r.get("peak_memory_mib") or 0) for r in metrics) if metrics else None,
        "runtime": cfg.get("runtime"),
        "params_approx": approx_params(cfg.get("model") or {}),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")),
        "export": sorted(p.name for p in (run_dir / "export").glob("*")),
    }

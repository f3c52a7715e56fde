"""The configs the GPU check writes for the real make targets: the data build (tokenizer +
shards of the carried corpus), the training run (a ``--preset`` model with evals, checkpoints and
an export) and a small eval (3 tasks, exposure bias). Written as JSON, which the YAML loaders read
as it is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def write_json_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` as JSON (JSON is YAML: the config loaders read it as it is)."""
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def data_config(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``make data``'s config: the carried corpus into ``work/data`` (8 train, 2 val shards)."""
    return {
        "out_dir": str(work / "data"),
        "corpus": [str(Path(a.corpus).resolve())],
        "seq_len": a.seq_len,
        "val_fraction": 0.05,
        "train_shards": 8,
        "val_shards": 2,
        "seed": 1234,
        "tokenizer": {"vocab_size": a.vocab, "model_type": "bpe"},
    }


def train_config(a: argparse.Namespace, work: Path, tracking: bool) -> dict[str, Any]:
    """``make pretrain``'s config: ``--steps`` steps of ``--preset`` with memory on, ZeRO-3, and a
    checkpoint and an eval every third of the run."""
    every = max(1, a.steps // 3)
    return {
        "run_dir": str(work / "reference"),
        "seed": 0,
        "steps": a.steps,
        "log_every": 1,
        "model_preset": a.preset,
        "model": {"seq_len": a.seq_len},
        "data": {"path": str(work / "data"), "batch_size": a.batch, "num_workers": 1},
        "memory": {"enabled": True},
        "optim": {"lr": 1.0e-3, "warmup_steps": max(1, a.steps // 6)},
        "parallel": {"tp": 1, "zero_stage": 3, "precision": "auto"},
        "checkpoint": {"every": every, "keep": 3},
        "eval": {"every": every, "batches": 2},
        "tracking": {"enabled": tracking, "root": str(work / "mlflow")},
    }


def _eval_tasks(context: int, n: int) -> list[dict[str, Any]]:
    return [
        {"task": "niah", "context_tokens": context, "n": n, "difficulty": {"values": 2, "distractors": 1}},
        {
            "task": "variable_tracking",
            "context_tokens": context,
            "n": n,
            "difficulty": {"hops": 2, "distractors": 1},
        },
        {"task": "babi", "context_tokens": context, "n": n, "difficulty": {"hops": 1, "facts": 6}},
    ]


def eval_config(a: argparse.Namespace, work: Path, tracking: bool) -> dict[str, Any]:
    """``make eval``'s config: 3 tasks x ``--eval-n`` examples, memory off and on, exposure bias."""
    return {
        "out_dir": str(work / "eval"),
        "filler": str(Path(a.corpus).resolve()),
        "seed": 1000,
        "memory": ["off", "on"],
        "tasks": _eval_tasks(a.eval_context, a.eval_n),
        "scoring": {"batch_size": 8, "mc_samples": 4, "gen_slack": 4, "seed": 0, "precision": "auto"},
        "exposure_bias": {
            "enabled": True,
            "data": str(work / "data"),
            "pairs": 8,
            "prompt_tokens": 96,
            "response_tokens": 32,
            "steps": 16,
            "static_draws": 2,
        },
        "tracking": {"enabled": tracking, "root": str(work / "mlflow")},
    }

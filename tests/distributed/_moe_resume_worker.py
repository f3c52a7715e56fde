"""Worker for test_moe_resume: a tiny mixture-of-experts run saved at one EP size and resumed at
another through DeepSpeed's universal checkpoint (the Trainer's own resize path).

    _moe_resume_worker.py <dataset> <out> <run> <ep> <stop_after|all>
Runs <run> (steps=4, checkpoint every 2) at EP=<ep> for <stop_after> steps (or to the end); rank 0
writes the logged records to <out>/<run>-ep<ep>.json and, at the end, every rank its own full
expert weights, Adam moments and routers' biases to <out>/<run>-ep<ep>-rank<r>.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides
from tests.distributed._moe_worker import TINY_MOE


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every rank's experts, gathered from ZeRO-3, with their Adam moments, plus the routers' biases."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in trainer.engine.module.named_parameters():
        if ".experts." in name or name.endswith("router.weight"):
            out[name] = safe_get_full_fp32_param(p).clone()
            out[name + ".exp_avg"] = safe_get_full_optimizer_state(p, "exp_avg").clone()
            out[name + ".exp_avg_sq"] = safe_get_full_optimizer_state(p, "exp_avg_sq").clone()
    for name, b in trainer.engine.module.named_buffers():
        if name.endswith("score_bias"):
            out[name] = b.clone()
    return out


def main(dataset: str, out_dir: str, run: str, ep: str, stop_after: str) -> None:
    out = Path(out_dir)
    cfg = load_train_config(
        None,
        [
            *tiny_run_overrides(dataset, out / "mlruns"),
            *TINY_MOE,
            f"run_dir={out / run}",
            "steps=4",
            "checkpoint.every=2",
            "tracking.enabled=false",
            "parallel.param_persistence_threshold=0",
            "parallel.precision=fp32",
            f"parallel.ep={ep}",
            "memory.enabled=true",
            "optim.lr=3e-3",
        ],
    )
    trainer = Trainer(cfg)
    records = trainer.run(stop_after=None if stop_after == "all" else int(stop_after))
    if dist.get_rank() == 0:
        (out / f"{run}-ep{ep}.json").write_text(json.dumps(records))
    if stop_after == "all":
        torch.save(state_of(trainer), out / f"{run}-ep{ep}-rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])

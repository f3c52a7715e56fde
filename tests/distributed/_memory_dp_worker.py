"""Worker for test_memory_dp: one MemDLM step of the real Trainer at DP=2 (batch-scope memory synced
over DP), capturing what each rank's inner loop started from and ended with.

    _memory_dp_worker.py <dataset> <out>     rank 0 writes <out>/dp2.pt

Captured per rank: tokens, the anchor noise, the pre-anchor masks, phi0 (the reset) and phi2 (the
memory the outer loss used), by wrapping the functions the Trainer calls (nothing is replaced).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pipeline.memory.inner_loop as inner_loop
import pipeline.objectives.memdlm as memdlm_mod
import pipeline.train as train_mod
from pipeline.memory.fast_weights import FastWeightSpec
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides


def overrides(dataset: str, run_dir: Path) -> list[str]:
    return [
        *tiny_run_overrides(dataset, run_dir.parent / "mlruns"),
        f"run_dir={run_dir}",
        "steps=1",
        "data.batch_size=2",
        "memory.enabled=true",
        "memory.scope=batch",
        "eval.every=0",
        "checkpoint.every=0",
        "parallel.precision=fp32",
        "parallel.param_persistence_threshold=0",
        "tracking.enabled=false",
    ]


def capture_one_step(trainer: Trainer) -> dict:
    got: dict = {}
    real_loss, real_masks, real_reset = (
        memdlm_mod.memdlm_loss,
        inner_loop.pre_anchor_masks,
        FastWeightSpec.reset,
    )

    def memdlm_loss(model, outer, tokens, noise, *args, **kwargs):
        out = real_loss(model, outer, tokens, noise, *args, **kwargs)
        got.update(tokens=tokens, noise=noise, phi2=dict(zip(out.fast.names, out.fast.leaves(), strict=True)))
        return out

    def pre_anchor_masks(*args, **kwargs):
        got["pre_masks"] = real_masks(*args, **kwargs)
        return got["pre_masks"]

    def reset(self, *args, **kwargs):
        fast = real_reset(self, *args, **kwargs)
        got["phi0"] = {n: v.detach().clone() for n, v in zip(fast.names, fast.leaves(), strict=True)}
        return fast

    memdlm_mod.memdlm_loss, inner_loop.pre_anchor_masks, FastWeightSpec.reset = (
        memdlm_loss,
        pre_anchor_masks,
        reset,
    )
    try:
        trainer.train_step()
    finally:
        memdlm_mod.memdlm_loss, inner_loop.pre_anchor_masks, FastWeightSpec.reset = (
            real_loss,
            real_masks,
            real_reset,
        )
    n = got["noise"]
    return {
        "tokens": got["tokens"],
        "t": n.t,
        "mask": n.mask,
        "maskable": n.maskable,
        "pre_masks": got["pre_masks"],
        "phi0": got["phi0"],
        "phi2": {k: v.detach() for k, v in got["phi2"].items()},
    }


def main() -> None:
    dataset, out = sys.argv[1], Path(sys.argv[2])
    trainer = Trainer(load_train_config(None, overrides(dataset, out / "run")))
    mine = capture_one_step(trainer)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        torch.save(gathered, out / "dp2.pt")
    train_mod.destroy_distributed()


if __name__ == "__main__":
    main()

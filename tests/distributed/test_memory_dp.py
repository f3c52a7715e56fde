"""One memory per global batch: at DP=2 the Trainer's ranks start from the same phi0 and end with the
same phi2, equal to what one process computes for the whole global batch with the same masks."""

from __future__ import annotations

from pathlib import Path

import torch

import pipeline.train as train_mod
from pipeline.diffusion.noise import Noise
from pipeline.memory.inner_loop import memdlm_loss
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.distributed._launch import torchrun
from tests.distributed._memory_dp_worker import overrides

WORKER = Path(__file__).with_name("_memory_dp_worker.py")


def test_data_parallel_ranks_share_one_memory_equal_to_the_single_process_one(world1, tiny_dataset, tmp_path):
    proc = torchrun(WORKER, 2, str(tiny_dataset), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = torch.load(tmp_path / "dp2.pt", weights_only=False)
    assert not torch.equal(r0["tokens"], r1["tokens"])  # the ranks really had different rows
    for name in r0["phi0"]:
        assert torch.equal(r0["phi0"][name], r1["phi0"][name]), f"phi0 {name} differs between DP ranks"
        assert torch.equal(r0["phi2"][name], r1["phi2"][name]), f"phi2 {name} differs between DP ranks"

    # The same step in one process over the global batch (rank 0's rows, then rank 1's).
    cfg = load_train_config(None, overrides(str(tiny_dataset), tmp_path / "single"))
    trainer = Trainer(cfg)
    cat = lambda key: torch.cat([r0[key], r1[key]])  # noqa: E731
    tokens, maskable, mask = cat("tokens"), cat("maskable"), cat("mask")
    noise = Noise(t=cat("t"), mask=mask, noisy=torch.where(mask, trainer.mask_id, tokens), maskable=maskable)
    pre = [torch.cat([a, b]) for a, b in zip(r0["pre_masks"], r1["pre_masks"], strict=True)]
    reset = train_mod._generator(trainer.device, cfg.seed, 0, 0, -1)
    out = memdlm_loss(
        trainer.model,
        trainer.model,
        tokens,
        noise,
        cfg.objective,
        cfg.memory,
        trainer.mask_id,
        torch.Generator().manual_seed(123),  # draws nothing: pre-anchor masks are given
        None,
        pre_masks=pre,
        reset_generator=reset,
    )
    single = dict(zip(out.fast.names, out.fast.leaves(), strict=True))
    moved = 0.0
    for name, value in single.items():
        torch.testing.assert_close(
            r0["phi2"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved = max(moved, float((value - r0["phi0"][name]).abs().max()))
    assert moved > 0  # the inner loop really wrote into the memory

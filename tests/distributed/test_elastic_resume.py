"""Elastic resume through the real Trainer: a checkpoint written at one TP x DP layout continues at
another through DeepSpeed's universal checkpoint (pipeline/engine/universal.py).

Runs (tiny model, ZeRO-3 partitioning every parameter, fp32, MDLM, global batch 4 sequences):
  A   DP=2 x grad_accum 1, 8 steps uninterrupted (checkpoints at 4 and 8; state taken after step 4)
  A1  A's step-4 checkpoint on 1 process: DP 2 -> 1, grad_accum 1 -> 2 (automatic), steps 5..8
  C   DP=1 x grad_accum 2, 8 steps uninterrupted
  C2  C's step-4 checkpoint on 2 processes: DP 1 -> 2, grad_accum 2 -> 1
  CT  C's step-4 checkpoint at TP=2 (DP stays 1): TP 1 -> 2
  CT1 CT's step-8 checkpoint (written at TP=2) on 1 process: TP 2 -> 1, loaded only

Tolerances: weights and Adam moments are copied, not recomputed: equal exactly. Losses after the
resume are recomputed with another summation order (DP all-reduce vs accumulation, TP shards):
rel 1e-5 over 4 steps. Logits after TP 2 -> 1: rtol 1e-5 (the TP=2 ones sum shards in another order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_elastic_worker.py")


def _launch(dataset, out: Path, run: str, nproc: int, tp: int, grad_accum: int, snap_at: int = 0) -> None:
    proc = torchrun(WORKER, nproc, str(dataset), str(out), run, str(tp), str(grad_accum), "8", str(snap_at))
    assert proc.returncode == 0, f"{run}: " + proc.stdout[-4000:] + proc.stderr[-8000:]


def _fork(out: Path, source: str, run: str, step: int) -> None:
    """A copy of ``source``'s run directory that resumes from its ``step`` checkpoint."""
    shutil.copytree(out / source, out / run)
    ckpts = out / run / "checkpoints"
    for later in ckpts.glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(f"step-{step:06d}\n")
    (out / run / "metrics.jsonl").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    _launch(tiny_dataset, out, "A", 2, tp=1, grad_accum=1, snap_at=4)
    _fork(out, "A", "A1", 4)
    _launch(tiny_dataset, out, "A1", 1, tp=1, grad_accum=1)
    _launch(tiny_dataset, out, "C", 1, tp=1, grad_accum=2, snap_at=4)
    _fork(out, "C", "C2", 4)
    _launch(tiny_dataset, out, "C2", 2, tp=1, grad_accum=2)
    _fork(out, "C", "CT", 4)
    _launch(tiny_dataset, out, "CT", 2, tp=2, grad_accum=2)
    _fork(out, "CT", "CT1", 8)
    _launch(tiny_dataset, out, "CT1", 1, tp=1, grad_accum=2)
    return out


def _losses(out: Path, run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in json.loads((out / f"{run}.json").read_text())}


def _state(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def _assert_same_optimizer_state(got: dict, want: dict) -> None:
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), f"{key} of {name} changed in the conversion"
    assert got["lr"] == want["lr"] and got["step"] == want["step"]


@pytest.mark.parametrize(
    ("source", "resumed", "grad_accum"),
    [("A", "A1", 2), ("C", "C2", 1), ("C", "CT", 2)],
    ids=["dp2to1", "dp1to2", "tp1to2"],
)
def test_resuming_at_another_layout_restores_weights_and_adam_moments_exactly(
    runs, source, resumed, grad_accum
):
    got, want = _state(runs, f"{resumed}-loaded"), _state(runs, f"{source}-snap")
    _assert_same_optimizer_state(got, want)
    assert got["grad_accum"] == grad_accum  # the global batch kept by accumulation


@pytest.mark.parametrize(
    ("source", "resumed"), [("A", "A1"), ("C", "C2"), ("C", "CT")], ids=["dp2to1", "dp1to2", "tp1to2"]
)
def test_losses_after_a_resize_match_the_uninterrupted_run(runs, source, resumed):
    full, after = _losses(runs, source), _losses(runs, resumed)
    assert sorted(full) == list(range(1, 9)) and sorted(after) == [5, 6, 7, 8]
    for step in after:
        assert after[step] == pytest.approx(full[step], rel=1e-5), step
    assert full[8] != pytest.approx(full[5], rel=1e-3)  # the steps really trained


def test_tensor_parallel_two_to_one_gives_the_same_logits_and_state(runs):
    got, want = _state(runs, "CT1-loaded"), _state(runs, "CT-end")
    _assert_same_optimizer_state(got, want)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)

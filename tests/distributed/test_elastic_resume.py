"""Elastic resume through the real Trainer: a checkpoint written at one TP x DP layout continues at
another through DeepSpeed's universal checkpoint (pipeline/engine/universal.py).

Runs (tiny model, ZeRO-3 partitioning every parameter, fp32, MDLM, global batch 4 sequences):
  A   DP=2 x grad_accum 1, 8 steps uninterrupted (checkpoints at 4 and 8; state taken after step 4)
  A1  A's step-4 checkpoint on 1 process: DP 2 -> 1, grad_accum 1 -> 2 (automatic), steps 5..8
  C   DP=1 x grad_accum 2, 8 steps uninterrupted
  C2  C's step-4 checkpoint on 2 processes: DP 1 -> 2, grad_accum 2 -> 1
  CT  C's step-4 checkpoint at TP=2 (DP stays 1): TP 1 -> 2
  CT1 CT's step-8 checkpoint (written at TP=2) on 1 process: TP 2 -> 1, loaded only
The 8B LoRA recipe's two settings, each on its own (slow; selected by `-k "elastic and (lora or
zero_init)"`), both TP=2 x DP=1 (grad_accum 2) -> TP=1 x DP=2 (grad_accum 1) on 2 processes:
  L   outer LoRA under zero_init, as the recipe (base frozen, from an init_from export; norms below
      the ZeRO-3 persistence threshold, the matrices partitioned), 8 steps; L2 resumes its step 4
      after the export was replaced by another one: the frozen base comes from the checkpoint, not
      from init_from again
  Z   parallel.zero_init=true (the model built partitioned), 8 steps; Z2 resumes its step 4

Tolerances: weights, Adam moments and Adam's step counters are copied, not recomputed: equal
exactly. Losses after the resume are recomputed with another summation order (DP all-reduce vs
accumulation, TP shards): rel 1e-5 over 4 steps. Logits after TP 2 -> 1: rtol 1e-5 (the TP=2 ones
sum shards in another order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.adapters.lora import is_lora_name
from tests.conftest import export_random_model
from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_elastic_worker.py")


def _launch(
    dataset, out: Path, run: str, nproc: int, tp: int, grad_accum: int, snap_at: int = 0, extra=()
) -> None:
    args = (str(dataset), str(out), run, str(tp), str(grad_accum), "8", str(snap_at), *extra)
    proc = torchrun(WORKER, nproc, *args)
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


def _adam_steps(state: dict) -> dict[str, float]:
    """Adam's step counter of each trained parameter; every rank must hold the same one."""
    out = {}
    for name, per_rank in state["adam_step"].items():
        assert len(set(per_rank)) == 1, f"ranks disagree on Adam's step of {name}: {per_rank}"
        out[name] = per_rank[0]
    return out


def _assert_same_optimizer_state(got: dict, want: dict) -> None:
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), f"{key} of {name} changed in the conversion"
    assert got["frozen"] == want["frozen"]
    assert _adam_steps(got) == _adam_steps(want), "Adam's step counter changed in the conversion"
    assert set(_adam_steps(want).values()) == {float(want["step"])}  # one Adam step per training step
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
    _assert_losses_match(runs, source, resumed)


def _assert_losses_match(out: Path, source: str, resumed: str) -> None:
    full, after = _losses(out, source), _losses(out, resumed)
    assert sorted(full) == list(range(1, 9)) and sorted(after) == [5, 6, 7, 8]
    for step in after:
        assert after[step] == pytest.approx(full[step], rel=1e-5), step
    assert full[8] != pytest.approx(full[5], rel=1e-3)  # the steps really trained


def test_tensor_parallel_two_to_one_gives_the_same_logits_and_state(runs):
    got, want = _state(runs, "CT1-loaded"), _state(runs, "CT-end")
    _assert_same_optimizer_state(got, want)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "resumed"), [("A", "A1"), ("C", "C2"), ("C", "CT")], ids=["dp2to1", "dp1to2", "tp1to2"]
)
def test_adam_counts_each_step_once_after_a_resize(runs, source, resumed):
    """Steps 5..8 after the resize: every parameter's counter at 8, as the uninterrupted run's (a
    counter shared by the ZeRO sub-groups would count each step once per sub-group: 12)."""
    end, full = _adam_steps(_state(runs, f"{resumed}-end")), _adam_steps(_state(runs, f"{source}-end"))
    assert end == full and set(end.values()) == {8.0}


# ------------------------------------------------------------ the 8B LoRA recipe's settings
TP2_TO_DP2 = dict(tp=2, grad_accum=2), dict(tp=1, grad_accum=1)
LORA = (  # configs/train/llada-8b-lora.yaml's parallel settings, on the tiny model
    "lora.enabled=true",
    "lora.rank=4",
    "lora.alpha=8",
    "optim.lr=1e-2",
    "parallel.zero_init=true",
    # norms (64 elements) stay whole on every rank, the matrices are partitioned
    "parallel.param_persistence_threshold=100",
)


def _resize_run(tiny_dataset, out: Path, name: str, extra: tuple[str, ...], between=None) -> Path:
    """``name`` at TP=2 x DP=1 for 8 steps, then its step-4 checkpoint at TP=1 x DP=2 (``name``2)."""
    (before, after) = TP2_TO_DP2
    _launch(tiny_dataset, out, name, 2, snap_at=4, extra=extra, **before)
    _fork(out, name, f"{name}2", 4)
    if between is not None:
        between()
    _launch(tiny_dataset, out, f"{name}2", 2, extra=extra, **after)
    return out


@pytest.fixture(scope="module")
def lora_runs(tiny_dataset, tmp_path_factory, world1):
    out = tmp_path_factory.mktemp("elastic-lora")
    tokenizer = tiny_dataset / "tokenizer.model"
    init = export_random_model(out / "init", tokenizer, seed=3, ffn_hidden=128)

    def replace_the_export() -> None:  # a re-import between the runs: the resume must not read it
        shutil.rmtree(init)
        export_random_model(init, tokenizer, seed=4, ffn_hidden=128)

    _resize_run(tiny_dataset, out, "L", (*LORA, f"init_from={init}"), between=replace_the_export)
    return out


@pytest.fixture(scope="module")
def zero_init_runs(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic-zero-init")
    return _resize_run(tiny_dataset, out, "Z", ("parallel.zero_init=true",))


@pytest.mark.slow
def test_lora_run_resized_keeps_its_frozen_base_from_the_checkpoint_and_its_adapters_state(lora_runs):
    got, want = _state(lora_runs, "L2-loaded"), _state(lora_runs, "L-snap")
    _assert_same_optimizer_state(got, want)  # frozen base included (in "weights", torch.equal)
    assert want["frozen"] and all(not is_lora_name(n) for n in want["frozen"])
    assert set(want["exp_avg"]) == {n for n in want["weights"] if is_lora_name(n)}  # only adapters train
    export = load_file(str(lora_runs / "init" / "model.safetensors"))  # the replaced init_from
    replaced = {n for n in want["frozen"] if not torch.equal(export[n], want["weights"][n])}
    assert replaced == {n for n in want["frozen"] if "norm" not in n}  # norms start at 1 in both
    end = _state(lora_runs, "L2-end")
    for name in want["frozen"]:
        assert torch.equal(end["weights"][name], want["weights"][name]), f"frozen {name} changed"


@pytest.mark.slow
def test_lora_run_resized_trains_on_like_the_uninterrupted_run(lora_runs):
    _assert_losses_match(lora_runs, "L", "L2")
    assert _adam_steps(_state(lora_runs, "L2-end")) == _adam_steps(_state(lora_runs, "L-end"))


@pytest.mark.slow
def test_zero_init_run_resized_restores_weights_adam_state_and_losses_exactly(zero_init_runs):
    _assert_same_optimizer_state(_state(zero_init_runs, "Z2-loaded"), _state(zero_init_runs, "Z-snap"))
    _assert_losses_match(zero_init_runs, "Z", "Z2")
    assert _adam_steps(_state(zero_init_runs, "Z2-end")) == _adam_steps(_state(zero_init_runs, "Z-end"))

"""Resuming at another layout: when it is refused, with what message, `make reshard`'s converter, and
how the layout is described to it (frozen parameters, models built under zero.Init)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import run_main
from pipeline.engine.checkpoint import CheckpointError, Layout, write_file_list
from pipeline.engine.elastic import plan_resume
from pipeline.engine.reshard import USER_ERRORS
from pipeline.engine.reshard import main as reshard_main
from pipeline.engine.universal import has_universal
from pipeline.train import Trainer
from tests.conftest import tiny_trainer_config


def _state(tp: int, dp: int, grad_accum: int, micro: int) -> dict:
    layout = {"world": tp * dp, "tp": tp, "dp": dp, "grad_accum": grad_accum, "micro_batch": micro}
    return {"layout": layout, "data": [[{"rank": r}] for r in range(dp) for _ in range(tp)]}


def test_grad_accum_absorbs_the_data_parallel_change_and_keeps_the_global_batch():
    plan = plan_resume(
        Path("c"), _state(1, 4, 2, 8), Layout(world=2, tp=1, dp=2, grad_accum=1, micro_batch=8)
    )
    assert plan.resized and plan.current.grad_accum == 4
    assert "global batch 64 sequences kept" in plan.describe()
    same = plan_resume(
        Path("c"), _state(1, 2, 1, 8), Layout(world=2, tp=1, dp=2, grad_accum=3, micro_batch=8)
    )
    assert not same.resized and same.current.grad_accum == 3  # the same layout: the config's value stands


def test_a_moe_checkpoint_written_at_tp_2_is_refused_at_another_layout_naming_both_sizes():
    state = {**_state(2, 2, 1, 8), "config": {"model": {"family": "moe"}}}
    state["layout"]["ep"] = 2
    with pytest.raises(CheckpointError) as err:
        plan_resume(Path("c"), state, Layout(world=4, tp=2, dp=2, grad_accum=1, micro_batch=8, ep=1))
    assert "written at TP=2 x DP=2 (EP=2)" in str(err.value) and "Resume it at TP=2 x DP=2 (EP=2)" in str(
        err.value
    )
    assert "this run is TP=2 x DP=2)" in str(err.value)
    # the same layout resumes; a dense model at TP=2 converts as before; a MoE at TP=1 too
    assert not plan_resume(
        Path("c"), state, Layout(world=4, tp=2, dp=2, grad_accum=1, micro_batch=8, ep=2)
    ).resized
    dense = {**_state(2, 2, 1, 8), "config": {"model": {"family": "dense"}}}
    assert plan_resume(Path("c"), dense, Layout(world=2, tp=1, dp=2, grad_accum=1, micro_batch=8)).resized
    moe_tp1 = {**_state(1, 2, 1, 8), "config": {"model": {"family": "moe"}}}
    assert plan_resume(
        Path("c"), moe_tp1, Layout(world=2, tp=1, dp=2, grad_accum=1, micro_batch=8, ep=2)
    ).resized


def test_a_global_batch_that_the_new_layout_cannot_split_is_refused_with_the_numbers():
    with pytest.raises(
        CheckpointError, match=r"global batch is 3 micro-batches of 8 \(DP=3 x grad_accum=1\)"
    ):
        plan_resume(Path("c"), _state(1, 3, 1, 8), Layout(world=2, tp=1, dp=2, grad_accum=1, micro_batch=8))
    with pytest.raises(CheckpointError, match=r"data.batch_size=8, this run has 4"):
        plan_resume(Path("c"), _state(1, 2, 1, 8), Layout(world=1, tp=1, dp=1, grad_accum=1, micro_batch=4))


def _as_if_written_at_dp2(ckpt: Path) -> None:
    """Rewrite a one-process checkpoint's train state as a DP=2 one's (files.json kept valid)."""
    state = json.loads((ckpt / "train_state.json").read_text())
    state["layout"].update(world=2, dp=2)
    data = state["data"][0][0]
    state["data"] = [[{**data, "rank": r, "world_size": 2}] for r in (0, 1)]
    (ckpt / "train_state.json").write_text(json.dumps(state))
    write_file_list(ckpt)


def test_a_layout_change_says_what_to_run_when_resharding_is_off_or_impossible(
    world1, tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    cfg = lambda *extra: tiny_trainer_config(tiny_dataset, run, "memory.enabled=false", "steps=2", *extra)  # noqa: E731
    Trainer(cfg()).run()
    ckpt = run / "checkpoints" / "step-000002"
    _as_if_written_at_dp2(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(f"Run `make reshard CHECKPOINT={ckpt}`")):
        Trainer(cfg("checkpoint.reshard=never"))
    for optim in (ckpt / "ds").glob("*optim_states.pt"):
        optim.unlink()  # nothing to convert the optimizer state from
    write_file_list(ckpt)
    with pytest.raises(
        CheckpointError, match=r"ds_to_universal could not convert it .*the TP x DP layout that wrote it"
    ):
        Trainer(cfg())
    assert (
        not (ckpt / "universal").exists() and not (ckpt / ".tmp-universal").exists()
    )  # nothing half-written


def test_make_reshard_converts_the_newest_checkpoint_once(world1, tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_trainer_config(tiny_dataset, run, "memory.enabled=false", "steps=2")).run()
    assert reshard_main([str(run / "checkpoints")]) == 0
    ckpt = run / "checkpoints" / "step-000002"
    assert has_universal(ckpt)
    assert "universal checkpoint ready: " + str(ckpt / "universal") in capsys.readouterr().out
    marker = (ckpt / "universal" / "files.json").stat().st_mtime_ns
    assert reshard_main([str(ckpt)]) == 0
    assert (ckpt / "universal" / "files.json").stat().st_mtime_ns == marker  # reused, not redone
    assert reshard_main([str(ckpt), "--tp", "2"]) == 0
    assert (
        "resuming at TP=2 x DP=1: TP=1 x DP=1 (grad_accum 1) -> TP=2 x DP=1 (grad_accum 1)"
        in capsys.readouterr().out
    )
    # one micro-batch per step: two ranks cannot share it
    assert run_main(reshard_main, [str(ckpt), "--dp", "2"], USER_ERRORS) == 2
    assert "DP=2 cannot split evenly" in capsys.readouterr().err
    (ckpt / "universal" / "source.json").write_text("{}")  # damaged: converted again
    assert not has_universal(ckpt)
    assert reshard_main([str(ckpt)]) == 0 and has_universal(ckpt)


def test_the_layout_description_gives_frozen_parameters_only_a_map_and_every_map_the_full_shape(
    world1, tiny_dataset, tmp_path
):
    """ds_to_universal's strict check fails on a category pattern that names no optimizer
    parameter (the frozen LoRA base), and under zero.Init ``param.shape`` is an empty partition:
    a replicated map sized from it describes 0 elements."""
    cfg = tiny_trainer_config(
        tiny_dataset,
        tmp_path / "run",
        "memory.enabled=false",
        "lora.enabled=true",
        "lora.rank=4",
        "parallel.zero_init=true",
    )
    trainer = Trainer(cfg)
    trainer.close()
    info = trainer.model.universal_checkpoint_info
    params = dict(trainer.model.named_parameters())
    pattern = {name: rf"^{re.escape(name)}$" for name in params}
    frozen = {pattern[n] for n, p in params.items() if not p.requires_grad}
    categories = {
        *info["tp_replicated_parameter_patterns"],
        *info["parameter_with_row_parallelism_patterns"],
        *info["vocabulary_parameter_patterns"],
    }
    trained = {pattern[n] for n, p in params.items() if p.requires_grad}
    assert frozen and categories and categories <= trained  # column splits need no category
    maps = info["affine_map"]["params"]
    assert set(maps) == set(pattern.values())  # the frozen ones keep their geometry
    for name, p in params.items():
        assert p.numel() == 0 < p.ds_numel  # really partitioned at creation
        assert maps[pattern[name]]["logical_shape"] == list(p.ds_shape), name

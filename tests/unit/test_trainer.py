"""The Trainer in one process: export round trip, refused resume layouts, non-finite losses."""

from __future__ import annotations

import json

import pytest
import torch

from launch.compare import charts_for, view_state
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import Noise, draw_noise, maskable_positions
from pipeline.engine.checkpoint import CheckpointError, write_file_list
from pipeline.engine.deepspeed import build_engine
from pipeline.engine.export import consolidated_state_dict, export_model, load_exported
from pipeline.parallel.dims import init_distributed
from pipeline.perf.cost import model_cost
from pipeline.train import Trainer, TrainingDiverged
from pipeline.train_config import load_train_config
from tests._models import dense_model
from tests.conftest import tiny_run_overrides, tiny_trainer_config


def _cfg(dataset, run_dir, *extra):
    return tiny_trainer_config(dataset, run_dir, *extra)


def test_export_round_trip_gives_identical_logits(world1, tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "parallel.precision=fp32", "memory.enabled=true")
    trainer = Trainer(cfg)
    trainer.run()
    out = export_model(
        trainer.engine,
        cfg,
        tmp_path / "export",
        tiny_dataset / "tokenizer.model",
        trainer.manifest.special_ids,
        trainer.state.step,
    )
    model, info = load_exported(out)
    assert info["method"] == "memdlm" and info["step"] == 4 and info["special_ids"]["mask"] == 4
    run_files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "config.json",
        "dataset_manifest.json",
        "metrics.jsonl",
        "checkpoints",
        "loss_curves.png",
    } <= run_files
    assert (out / "tokenizer.model").read_bytes() == (tiny_dataset / "tokenizer.model").read_bytes()
    tokens = torch.randint(6, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.model(tokens=tokens)
        got = model(tokens=tokens)
    assert torch.equal(got, expected)
    assert not any(k for k in model.state_dict() if "fast" in k)  # fast weights are never saved


@pytest.mark.slow
def test_resume_with_an_inconsistent_layout_or_another_dataset_is_refused(world1, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_dataset, run, "steps=2")).run()
    state_path = run / "checkpoints" / "step-000002" / "train_state.json"
    state = json.loads(state_path.read_text())
    state["layout"] = {"world": 2, "tp": 1, "dp": 2}
    state_path.write_text(json.dumps(state))
    write_file_list(state_path.parent)  # an intact checkpoint of another layout, not a damaged one
    # (a real checkpoint of another layout resumes: tests/distributed/test_elastic_resume.py)
    with pytest.raises(
        CheckpointError, match=r"data-loader states of DP ranks \[0\], but its layout says DP=2"
    ):
        Trainer(_cfg(tiny_dataset, run, "steps=3"))
    state["layout"] = {"world": 1, "tp": 1, "dp": 1}
    state["manifest_sha256"] = "0" * 64
    state_path.write_text(json.dumps(state))
    write_file_list(state_path.parent)
    with pytest.raises(CheckpointError, match=r"written for a dataset with manifest sha256 000000000000"):
        Trainer(_cfg(tiny_dataset, run, "steps=3"))


def test_repeated_non_finite_losses_stop_with_the_last_good_checkpoint(
    world1, tiny_dataset, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    trainer = Trainer(_cfg(tiny_dataset, run, "steps=10", "memory.enabled=false", "max_nonfinite_steps=3"))
    real = trainer._micro

    def poisoned(raw, micro):
        out = real(raw, micro)
        if trainer.state.step >= 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "_micro", poisoned)
    # steps 3 and 4 are skipped (weights untouched, so the step-4 checkpoint is still good); the 5th stops
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite losses at step 5; .*step-000004"):
        trainer.run()
    assert trainer.state.nonfinite_total == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "loss" not in records[2] and records[3]["nonfinite_total"] == 2  # skipped steps log no loss


def test_gradient_accumulation_of_two_halves_equals_one_full_batch(world1):

    def run(grad_accum: int) -> dict[str, torch.Tensor]:
        cfg = load_train_config(
            None,
            [
                "model_preset=tiny",
                "steps=2",
                "parallel.precision=fp32",
                "parallel.param_persistence_threshold=0",
                f"grad_accum={grad_accum}",
                f"data.batch_size={4 // grad_accum}",
                "optim.eps=1e-6",
            ],
        )
        torch.manual_seed(0)
        dims = init_distributed(tp=1)
        engine, _, _ = build_engine(cfg, dims, lambda: dense_model(cfg.model, dims))
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            tokens = torch.randint(6, 400, (4, 32), generator=g)
            noise = draw_noise(tokens, maskable_positions(tokens, 0), cfg.objective, 4, g)
            per = 4 // grad_accum
            for m in range(grad_accum):
                sl = slice(m * per, (m + 1) * per)
                part = Noise(noise.t[sl], noise.mask[sl], noise.noisy[sl], noise.maskable[sl])
                engine.backward(mdlm_loss(engine, tokens[sl], part, cfg.objective))
            engine.step()  # the trainer's explicit accumulation boundary

        return consolidated_state_dict(engine.module)

    one, two = run(1), run(2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_non_finite_micro_batch_voids_the_whole_step_under_gradient_accumulation(
    world1, tiny_dataset, tmp_path
):

    def trainer_for(name: str) -> Trainer:
        return Trainer(
            _cfg(tiny_dataset, tmp_path / name, "memory.enabled=false", "grad_accum=2", "data.batch_size=2")
        )

    clean = trainer_for("clean")
    clean_lr = [clean.train_step()["lr"] for _ in range(4)]
    trainer = trainer_for("poisoned")
    real = trainer._micro

    def poisoned(raw, micro):
        out = real(raw, micro)
        if trainer.state.step == 1 and micro == 0:
            out.loss = out.loss * float("nan")
        return out

    trainer._micro = poisoned
    records, weights = [], []
    for _ in range(4):
        records.append(trainer.train_step())
        weights.append(consolidated_state_dict(trainer.engine.module))
    assert "loss" not in records[1] and records[1]["nonfinite_total"] == 1
    for k in weights[0]:  # the void step changed nothing
        assert torch.equal(weights[1][k], weights[0][k]), k
    assert any(not torch.equal(weights[2][k], weights[1][k]) for k in weights[0])
    # the LR schedule follows the step count, and DeepSpeed applied exactly the 3 real updates
    assert [records[i]["lr"] for i in (0, 2, 3)] == [clean_lr[i] for i in (0, 2, 3)]
    assert trainer.engine.global_steps == 3
    adam_steps = {int(s["step"]) for s in trainer.engine.optimizer.optimizer.state.values()}
    assert adam_steps == {3}
    # both micro-batches of the void step were consumed: the data position matches the clean run
    assert trainer.loader.state_dict() == clean.loader.state_dict()


@pytest.mark.slow
def test_resuming_behind_the_last_logged_step_records_every_step_exactly_once(world1, tiny_dataset, tmp_path):
    import shutil

    run = tmp_path / "run"
    first = Trainer(_cfg(tiny_dataset, run, "steps=6", "memory.enabled=false"))
    first.run(stop_after=3)  # logged steps 1-3; checkpoints at 2 and 3
    # the job "died" after logging step 3 but before its step-3 checkpoint was usable
    shutil.rmtree(run / "checkpoints" / "step-000003")
    second = Trainer(_cfg(tiny_dataset, run, "steps=6", "memory.enabled=false"))
    assert second.state.step == 2
    second.run()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    client, run_id = second.tracker.client, second.tracker.run_id
    assert run_id == first.tracker.run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert "step" not in client.get_run(run_id).data.metrics  # the x axis is not a metric


def test_step_flops_count_every_micro_batch_of_the_step(world1, tiny_dataset, tmp_path):
    trainer = Trainer(
        _cfg(tiny_dataset, tmp_path / "run", "memory.enabled=true", "grad_accum=2", "data.batch_size=2")
    )
    real, outs = trainer._micro, []

    def counting(raw, micro):
        outs.append(real(raw, micro))
        return outs[-1]

    trainer._micro = counting
    rec = trainer.train_step()
    cfg = trainer.cfg
    tokens = cfg.data.batch_size * cfg.model.seq_len * cfg.grad_accum
    # both micro-batches: the same tokens the step's time covers, each stage's exact positions
    work = {k: sum(float(o.work[k]) for o in outs) for k in outs[0].work}
    assert set(work) == {"loss_positions", "stage1_positions", "stage2_positions"}
    want = trainer.objective.flops(model_cost(cfg.model), trainer.objective.step_work(tokens, work))
    assert rec["tokens_per_s"] * rec["seconds"] == pytest.approx(tokens)
    assert rec["model_tflops_per_s"] * 1e12 * rec["seconds"] == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
def test_skipped_corrupt_shards_are_agreed_across_ranks_and_logged(world1, tiny_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"][1:]:  # truncated: sizes no longer fit the manifest
        (data / shard["path"]).write_bytes((data / shard["path"]).read_bytes()[:1000])
    overrides = tiny_run_overrides(
        data,
        tmp_path / "mlruns",
        f"run_dir={tmp_path / 'run'}",
        "steps=8",  # 7 batches of 16 per intact shard: a truncated one is reached whatever the order
        "data.batch_size=16",
        "eval.every=0",
        "data.on_corrupt_shard=skip",
        "memory.enabled=false",
    )
    with pytest.warns(UserWarning):
        trainer = Trainer(load_train_config(None, overrides))
    records = trainer.run()
    assert records[-1]["data/skipped_shards"] >= 1
    history = trainer.tracker.client.get_metric_history(trainer.tracker.run_id, "data/skipped_shards")
    assert max(m.value for m in history) >= 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000008" / "train_state.json").read_text())
    assert state["counters"]["skipped_shards_total"] == records[-1]["data/skipped_shards"]


def test_moe_routing_metrics_reach_metrics_jsonl_mlflow_and_the_comparison_view(
    world1, tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    cfg = _cfg(tiny_dataset, run, "model_preset=tiny-moe", "model.vocab_size=400", "model.seq_len=32",
               "steps=2", "checkpoint.every=0")  # fmt: skip
    trainer = Trainer(cfg)
    trainer.run()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    layers = [i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]
    for key in ("imbalance", "min_load", "aux_loss", "z_loss", "entropy"):
        assert all(f"moe/layer{i}/{key}" in last for i in layers), key
    assert last["moe/imbalance"] >= 1.0 and last["moe/dropped_tokens"] == 0
    client, run_id = trainer.tracker.client, trainer.tracker.run_id
    assert [m.step for m in client.get_metric_history(run_id, "moe/imbalance")] == [1, 2]
    trainer.close()
    charts = [c["metricKey"] for c in view_state({"a": "1"}, charts_for(cfg.model))["compareRunCharts"]]
    assert charts == ["loss", "eval/loss", "memory/gain", "moe/imbalance"]
    dense = load_train_config(None, ["model_preset=tiny"]).model
    assert "moe/imbalance" not in [m for m, _ in charts_for(dense)]


def test_outer_lora_on_a_moe_model_checkpoints_and_resumes_exactly(world1, tiny_dataset, tmp_path):
    moe_lora = ("model_preset=tiny-moe", "model.vocab_size=400", "model.seq_len=32", "lora.enabled=true",
                "lora.targets=[qkv,out]", "checkpoint.every=2")  # fmt: skip
    full = Trainer(_cfg(tiny_dataset, tmp_path / "full", *moe_lora))
    want = full.run()
    full.close()
    first = Trainer(_cfg(tiny_dataset, tmp_path / "part", *moe_lora))
    first.run(stop_after=2)
    first.close()
    again = Trainer(_cfg(tiny_dataset, tmp_path / "part", *moe_lora))
    assert again.state.step == 2
    got = again.run()
    again.close()
    assert [r["step"] for r in got] == [3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in want[2:]]  # frozen experts restored exactly

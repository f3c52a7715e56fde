"""The Trainer in one process: export round trip, refused resume layouts, non-finite losses."""

from __future__ import annotations

import json

import pytest
import torch

import pipeline.train as train_mod
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.export import export_model, load_exported
from pipeline.train import Trainer, TrainingDiverged
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides


def _cfg(dataset, run_dir, *extra):
    return load_train_config(
        None,
        tiny_run_overrides(
            dataset,
            run_dir.parent / "mlruns",
            f"run_dir={run_dir}",
            "steps=4",
            "checkpoint.every=2",
            "eval.every=0",
            "parallel.param_persistence_threshold=0",
            *extra,
        ),
    )


def test_export_round_trip_gives_identical_logits(world1, tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "parallel.bf16=false", "memory.enabled=true")
    trainer = Trainer(cfg)
    trainer.run()
    out = export_model(
        trainer.engine,
        cfg,
        tmp_path / "export",
        tiny_dataset / "tokenizer.model",
        trainer.manifest.special_ids,
        trainer.step,
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


def test_resume_with_another_layout_or_dataset_is_refused(world1, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_dataset, run, "steps=2")).run()
    state_path = run / "checkpoints" / "step-000002" / "train_state.json"
    state = json.loads(state_path.read_text())
    state["layout"] = {"world": 2, "tp": 1, "dp": 2}
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"written with TP=1 x DP=2, this run is TP=1 x DP=1"):
        Trainer(_cfg(tiny_dataset, run, "steps=3"))
    state["layout"] = {"world": 1, "tp": 1, "dp": 1}
    state["manifest_sha256"] = "0" * 64
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"written for a dataset with manifest sha256 000000000000"):
        Trainer(_cfg(tiny_dataset, run, "steps=3"))


def test_repeated_non_finite_losses_stop_with_the_last_good_checkpoint(
    world1, tiny_dataset, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    trainer = Trainer(_cfg(tiny_dataset, run, "steps=10", "memory.enabled=false", "max_nonfinite_steps=3"))
    real = train_mod.mdlm_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if trainer.step >= 2 else loss

    monkeypatch.setattr(train_mod, "mdlm_loss", poisoned)
    # steps 3 and 4 are skipped (weights untouched, so the step-4 checkpoint is still good); the 5th stops
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite losses at step 4; .*step-000004"):
        trainer.run()
    assert trainer.nonfinite_total == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "loss" not in records[2] and records[3]["nonfinite_total"] == 2  # skipped steps log no loss


def test_gradient_accumulation_of_two_halves_equals_one_full_batch(world1):
    from pipeline.engine.deepspeed import build_engine
    from pipeline.model.transformer import DLMTransformer
    from pipeline.objectives.mdlm import Noise, draw_noise, maskable_positions, mdlm_loss

    def run(grad_accum: int) -> dict[str, torch.Tensor]:
        cfg = load_train_config(
            None,
            [
                "model_preset=tiny",
                "steps=2",
                "parallel.bf16=false",
                "parallel.param_persistence_threshold=0",
                f"grad_accum={grad_accum}",
                f"data.batch_size={4 // grad_accum}",
                "optim.eps=1e-6",
            ],
        )
        torch.manual_seed(0)
        engine, _, _ = build_engine(cfg, lambda: DLMTransformer(cfg.model))
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            tokens = torch.randint(6, 400, (4, 32), generator=g)
            noise = draw_noise(tokens, maskable_positions(tokens, 0), cfg.objective, 4, g)
            per = 4 // grad_accum
            for m in range(grad_accum):
                sl = slice(m * per, (m + 1) * per)
                part = Noise(noise.t[sl], noise.mask[sl], noise.noisy[sl], noise.maskable[sl])
                engine.backward(mdlm_loss(engine, tokens[sl], part, cfg.objective))
                engine.step()
        from pipeline.engine.export import consolidated_state_dict

        return consolidated_state_dict(engine.module)

    one, two = run(1), run(2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=k)

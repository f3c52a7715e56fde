"""Outer LoRA (pipeline/adapters/lora.py): step 0 is the base model, only the adapters train (with the
MemDLM inner loop on top, ZeRO-3, zero.Init, init_from), the export is the merged base + scaled BA,
a resume restores the adapters and keeps the frozen base, and the 8B recipe's dry run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launch.pretrain import main as pretrain_main
from pipeline.adapters.lora import (
    LoraConfig,
    add_lora,
    freeze_base,
    is_lora_name,
    lora_param_count,
    merge_lora,
)
from pipeline.config import ConfigError
from pipeline.engine.export import consolidated_state_dict, export_model, load_exported
from pipeline.families.registry import param_count
from pipeline.model.config import ModelConfig
from pipeline.perf.cost import expected_step_work, model_cost, step_flops
from pipeline.train_config import load_train_config
from tests._models import dense_model
from tests.conftest import export_random_model, tiny_model_config, tiny_trainer_config

TARGETS = ("qkv", "out", "gate", "up", "down")


def test_config_errors_name_the_key():
    for override, key in (
        ("lora.targets=[qkv, ffn]", r"key 'lora.targets\[1\]': 'ffn' is not a projection"),
        ("lora.rank=0", r"key 'lora.rank': got 0, expected >= 1"),
        ("lora.alpha=0", r"key 'lora.alpha'"),
        ("lora.targets=[up, up]", r"key 'lora.targets'"),
        ("lora.dropout=0.1", r"key 'lora.dropout': unknown key"),
        ("optim.warmup_fraction=1.5", r"key 'optim.warmup_fraction': got 1.5"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_train_config(None, [override])
    with pytest.raises(ConfigError, match=r"'optim.warmup_steps' \(5\) and 'optim.warmup_fraction' \(0.1\)"):
        load_train_config(None, ["optim.warmup_steps=5", "optim.warmup_fraction=0.1"])
    cfg = load_train_config(None, ["steps=1000", "optim.warmup_fraction=0.1"])
    assert cfg.optim.warmup_for(cfg.steps) == 100 and not cfg.lora.enabled  # LoRA is off by default
    assert load_train_config(None, ["steps=1000"]).optim.warmup_for(1000) == 20  # warmup_steps


def test_step0_is_the_base_and_the_merged_weights_compute_the_adapted_model(world1):
    cfg = tiny_model_config(n_kv_heads=2, qkv_bias=True)  # GQA rows and a bias on the fused QKV
    torch.manual_seed(0)
    model = dense_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens=tokens)
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0)
    add_lora(model, lora, seed=0)
    trainable, total = freeze_base(model)
    assert trainable == lora_param_count(cfg, lora) and total == param_count(cfg) + trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.lora.{t}.{m}" for i in range(cfg.n_layers) for t in TARGETS for m in "AB"
    }
    with torch.no_grad():
        assert torch.equal(model(tokens=tokens), base)  # B = 0: exactly the base model
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        adapted = model(tokens=tokens)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = merge_lora(state, lora)
    assert not any(is_lora_name(k) for k in merged) and set(merged) == {
        n for n in state if not is_lora_name(n)
    }
    for i in range(cfg.n_layers):
        for t in TARGETS:
            p = f"layers.{i}.{t}.weight"
            a, b = state[f"layers.{i}.lora.{t}.A"], state[f"layers.{i}.lora.{t}.B"]
            torch.testing.assert_close(merged[p], state[p] + 2.0 * (b @ a), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    plain = dense_model(cfg)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens=tokens), adapted, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(adapted, base, atol=1e-3)


@pytest.mark.slow
def test_only_lora_tensors_train_the_export_is_merged_and_a_resume_keeps_the_frozen_base(
    world1, tiny_dataset, tmp_path
):
    init = export_random_model(tmp_path / "init", tiny_dataset / "tokenizer.model", seed=3, ffn_hidden=128)
    run = tmp_path / "run"
    extra = (
        f"init_from={init}",
        "memory.enabled=true",  # the MemDLM inner loop on top of the frozen base + LoRA
        "lora.enabled=true",
        "lora.rank=4",
        "lora.alpha=8",
        "parallel.zero_init=true",
        "parallel.precision=fp32",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
    )
    cfg = tiny_trainer_config(tiny_dataset, run, *extra)
    from pipeline.train import Trainer

    trainer = Trainer(cfg)
    n_trainable = sum(p.ds_numel for p in trainer.model.parameters() if p.requires_grad)
    assert n_trainable == lora_param_count(cfg.model, cfg.lora)
    in_optimizer = {id(p) for group in trainer.engine.optimizer.fp16_groups for p in group}
    assert in_optimizer == {id(p) for p in trainer.model.parameters() if p.requires_grad}  # only LoRA
    before = consolidated_state_dict(trainer.model)
    stored = load_file(str(init / "model.safetensors"))
    for k, v in stored.items():
        assert torch.equal(before[k], v), k  # base = init_from
    history = trainer.run()
    for r in history:  # the MemDLM inner loop ran on the frozen base + LoRA and moved the memory
        assert r["inner/stage1_loss"] == r["inner/stage1_loss"] and r["inner/stage1_grad_norm"] > 0
    after = consolidated_state_dict(trainer.model)
    for k in before:
        if is_lora_name(k):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"frozen {k} changed"

    out = export_model(
        trainer.engine,
        cfg,
        tmp_path / "export",
        tiny_dataset / "tokenizer.model",
        trainer.manifest.special_ids,
        4,
    )
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(stored)  # no adapter tensors: init_from / sample / eval read it as is
    for k in exported:
        want = after[k]
        if k.endswith(".weight") and k.split(".")[-2] in TARGETS:
            prefix, t = k.rsplit(".", 2)[0], k.split(".")[-2]
            want = want + 2.0 * (after[f"{prefix}.lora.{t}.B"] @ after[f"{prefix}.lora.{t}.A"])
        torch.testing.assert_close(exported[k], want, rtol=0, atol=1e-6, msg=k)
    info = json.loads((out / "config.json").read_text())
    assert info["lora"]["merged"] is True and info["method"] == "memdlm"
    plain, _ = load_exported(out)
    tokens = torch.randint(6, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens=tokens), trainer.model(tokens=tokens), rtol=1e-4, atol=1e-4)

    # Resume from the step-4 checkpoint: adapters restored, the frozen base is still init_from.
    resumed = Trainer(tiny_trainer_config(tiny_dataset, run, *extra, "steps=5"))
    assert resumed.state.step == 4
    again = consolidated_state_dict(resumed.model)
    for k in after:
        assert torch.equal(again[k], after[k]), k


def test_the_8b_recipe_dry_run_names_the_plan_and_the_lora_trainable_count(capsys):
    rc = pretrain_main(
        ["--cluster", "slurm-2node-h100", "--config", "configs/train/llada-8b-lora.yaml", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    cfg = load_train_config("configs/train/llada-8b-lora.yaml")
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.ffn_hidden, m.vocab_size) == (
        4096,
        32,
        32,
        32,
        12288,
        126464,
    )
    assert (m.rope_theta, m.norm_eps, m.tie_embeddings) == (500000.0, 1e-5, False)
    # per layer r * (in + out): qkv 4096+12288, out 4096+4096, gate/up/down 4096+12288 each
    assert lora_param_count(m, cfg.lora) == 32 * 32 * (4 * 16384 + 8192) == 75_497_472
    for line in (
        "# plan: 16 task(s) = TP=8 x DP=2, ZeRO-3, memdlm, 8.02B parameters, 1000 steps (warm-up 100, lr 2e-05)",
        "# LoRA: 75.5M trainable parameters on a frozen 8.02B base (0.94 %), r=32 alpha=64 on qkv,out,gate,up,down",
        "init_from=runs/llada-8b-instruct is not an export directory yet",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        '"zero_init": true',
    ):
        assert line in out, line
    # the cost model's FLOPs for 32 sequences of 4096 tokens, and their time on 16 H100s at 40 % MFU
    cost, work = model_cost(m), expected_step_work(32 * 4096, cfg.memory)
    flops = step_flops(cost, work, cfg.memory, cfg.lora)
    assert 5e15 < flops < 12e15  # ~6 x 8B x 131k tokens, less the frozen base's weight gradients, plus MemDLM
    seconds = flops / (16 * 989e12 * 0.4)
    assert f"{flops / 1e15:.3g} PFLOP; {seconds:.2f} s per step on 16 x H100 at 40% MFU of 989 TFLOP/s" in out
    assert (
        ModelConfig(**json.loads(out.split("# training config (resolved): ")[1].split("\n# ")[0])["model"])
        == m
    )

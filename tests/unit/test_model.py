"""Model presets, the FLOPs estimate, and the CPU shim for megatron-core."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.memory.config import MemoryConfig
from pipeline.model.config import ModelConfig
from pipeline.model.transformer import DLMTransformer
from pipeline.perf.flops import estimate_flops
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("preset", ["tiny", "small", "125m", "1b", "7b"])
def test_presets_build_on_meta_with_the_stated_parameter_count(world1, preset):
    cfg = load_config(ModelConfig, Path("configs/model") / f"{preset}.yaml")
    with torch.device("meta"):
        model = DLMTransformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params()
    expected = {"tiny": 0.23e6, "small": 20e6, "125m": 134e6, "1b": 1.35e9, "7b": 6.74e9}[preset]
    assert abs(n - expected) / expected < 0.02


def test_tp_size_must_divide_heads_ffn_and_vocab():
    with pytest.raises(ConfigError, match=r"model n_heads=6 is not divisible by tensor parallel size 4"):
        ModelConfig(n_heads=6, d_model=384).check_tp(4)


def test_flops_estimate_counts_bidirectional_attention_and_head(world1):
    cfg = tiny_model_config()
    est = estimate_flops(cfg)
    d, f, T, V = 64, 96, 24, 384
    assert est.layer_fwd_per_token == 2 * (4 * d * d + 3 * d * f) + 4 * T * d
    assert est.head_fwd_per_position == 2 * d * V
    assert est.mdlm_step(tokens=100, head_positions=50) == 3 * (
        100 * 4 * est.layer_fwd_per_token + 50 * 2 * d * V
    )
    mem = estimate_flops(cfg, MemoryConfig(enabled=True))
    assert mem.first_memory_layer == 3
    assert mem.adapter_fwd_per_token == 2 * 32 * ((d + f) * 2 + (f + d))  # gate, up, down LoRA
    c, head, ad = mem.layer_fwd_per_token, mem.head_fwd_per_position, mem.adapter_fwd_per_token
    stage = 100 * (c + ad) + 100 * (2 * d * f + 2 * ad)  # one memory layer: fwd, then down-proj + adapter bwd
    stage1 = 100 * 3 * c + stage + 2 * 75 * head  # the 3 layers below run once more, without autograd
    stage2 = stage + 2 * 50 * head
    assert mem.memdlm_extra(100, [75], 50) == stage1 + stage2 + 2 * 100 * ad


def test_cpu_shim_makes_bf16_autocast_backward_work_through_megatron_linears(world1):
    torch.manual_seed(0)
    model = DLMTransformer(tiny_model_config())
    tokens = torch.randint(6, 300, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens=tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()  # fails without the shim: bf16 grad vs fp32 weight
    assert model.layers[0].qkv.weight.grad.dtype == torch.float32
    ref = model(tokens=tokens).float()
    assert (logits.float() - ref).abs().max() < 0.1  # bf16 is close to fp32

"""Model presets, the cost model's formulas, and the CPU autocast patch of megatron-core."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.families.dense.model import check_tp
from pipeline.families.registry import param_count
from pipeline.memory.config import MemoryConfig
from pipeline.model.config import ModelConfig
from pipeline.perf.cost import StepWork, memdlm_inner_flops, model_cost, outer_flops
from tests._models import dense_model
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("preset", ["tiny", "small", "125m", "1b", "7b"])
def test_presets_build_on_meta_with_the_stated_parameter_count(world1, preset):
    cfg = load_config(ModelConfig, Path("configs/model") / f"{preset}.yaml")
    with torch.device("meta"):
        model = dense_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_count(cfg) == model_cost(cfg).params_total
    expected = {"tiny": 0.23e6, "small": 20e6, "125m": 134e6, "1b": 1.35e9, "7b": 6.74e9}[preset]
    assert abs(n - expected) / expected < 0.02


def test_tp_size_must_divide_heads_ffn_and_vocab():
    with pytest.raises(ConfigError, match=r"model n_heads=6 is not divisible by tensor parallel size 4"):
        check_tp(ModelConfig(n_heads=6, d_model=384), 4)


def test_cost_model_counts_bidirectional_attention_the_head_and_memdlm_stages(world1):
    cfg = tiny_model_config()
    cost = model_cost(cfg)
    d, f, T, V = 64, 96, 24, 384
    assert cost.layer_forward(0) == 2 * (4 * d * d + 3 * d * f) + 4 * T * d
    assert cost.head_forward == 2 * d * V
    layer, attn = 2 * (4 * d * d + 3 * d * f), 4 * T * d
    # MDLM: forward, input gradients (attention twice: no weights), weight gradients; the head at 50
    step = StepWork(tokens=100, loss_positions=50)
    assert outer_flops(cost, step) == 100 * 4 * 3 * (layer + attn) + 3 * 50 * 2 * d * V
    mem = MemoryConfig(enabled=True)
    ad = 2 * 32 * ((d + f) * 2 + (f + d))  # gate, up, down LoRA fast weights on the last layer (3)
    c = layer + attn
    stage = 100 * (c + ad) + 100 * (2 * d * f + 2 * ad)  # the memory layer: fwd, then down-proj + adapter bwd
    stage1 = (
        100 * 3 * c + stage + 2 * 75 * cost.head_forward
    )  # the 3 layers below, once more without autograd
    stage2 = stage + 2 * 50 * cost.head_forward
    work = StepWork(tokens=100, loss_positions=50, stage_positions=(75,), anchor_positions=50)
    assert memdlm_inner_flops(cost, work, mem) == stage1 + stage2 + 2 * 100 * ad


def test_cpu_shim_makes_bf16_autocast_backward_work_through_megatron_linears(world1):
    torch.manual_seed(0)
    model = dense_model(tiny_model_config())
    tokens = torch.randint(6, 300, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens=tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()  # fails without the shim: bf16 grad vs fp32 weight
    assert model.layers[0].qkv.weight.grad.dtype == torch.float32
    ref = model(tokens=tokens).float()
    assert (logits.float() - ref).abs().max() < 0.1  # bf16 is close to fp32

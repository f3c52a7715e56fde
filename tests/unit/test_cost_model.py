"""The one cost model (pipeline/perf/cost.py) against what torch counts while the objectives run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pipeline.adapters.lora import LoraConfig, add_lora, freeze_base
from pipeline.diffusion.config import ObjectiveConfig
from pipeline.families import get_family
from pipeline.memory.config import MemoryConfig
from pipeline.objectives import Batch, Draws, build_objective
from pipeline.perf.cost import StepWork, expected_step_work, model_cost
from tests.conftest import tiny_model_config

aten = torch.ops.aten


def _sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


class _NoModuleTracking:
    """FlopCounterMode's module tracker installs backward hooks that torch.autograd.grad (MemDLM's
    inner loop) refuses; the totals need no per-module breakdown."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def counted_flops(run) -> int:
    """What torch counts while ``run()`` executes: matmuls, and the CPU attention kernels torch's
    table lacks (registered with torch's own attention formulas)."""
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("memory", [False, True], ids=["mdlm", "memdlm"])
@pytest.mark.parametrize("kind", ["mha", "gqa", "lora"])
def test_step_flops_match_torchs_count_within_five_percent(world1, memory, kind):
    cfg = tiny_model_config(
        vocab_size=400, seq_len=32, ffn_hidden=128, n_kv_heads=2 if kind == "gqa" else None
    )
    torch.manual_seed(0)
    model = get_family("dense").build(cfg, world1)
    lora = LoraConfig(enabled=kind == "lora")
    if lora.enabled:
        add_lora(model, lora, seed=0)
        freeze_base(model)
    mem = MemoryConfig(enabled=memory)
    objective = build_objective(ObjectiveConfig(), mem, mask_id=4, pad_id=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(6, 400, (4, 32), generator=g)
    out = {}

    def step() -> None:
        out["o"] = objective(model, model, Batch(tokens), Draws(noise=g))
        out["o"].loss.backward()

    measured = counted_flops(step)
    work = objective.step_work(tokens.numel(), {k: float(v) for k, v in out["o"].work.items()})
    estimated = objective.flops(model_cost(cfg), work, lora)
    assert estimated == pytest.approx(measured, rel=0.05), (
        f"estimated {estimated:.4g}, torch counted {measured:.4g}"
    )


def test_memdlm_counts_the_exact_pre_anchor_positions_not_one_and_a_half_times_the_anchor(world1):
    cfg = tiny_model_config(vocab_size=400, seq_len=32, ffn_hidden=128)
    mem = MemoryConfig(enabled=True, pre_anchor_scale=2.0, pre_anchor_steps=2)
    objective = build_objective(ObjectiveConfig(), mem, mask_id=4, pad_id=0)
    cost = model_cost(cfg)
    base = objective.step_work(
        128,
        {
            "loss_positions": 10.0,
            "stage1_positions": 40.0,
            "stage2_positions": 20.0,
            "stage3_positions": 10.0,
        },
    )
    more = objective.step_work(
        128,
        {
            "loss_positions": 10.0,
            "stage1_positions": 60.0,
            "stage2_positions": 20.0,
            "stage3_positions": 10.0,
        },
    )
    assert base.stage_positions == (40.0, 20.0) and base.anchor_positions == 10.0
    # 20 more stage-1 positions cost exactly 20 heads forward and backward (2 x 2 d V each)
    assert objective.flops(cost, more) - objective.flops(cost, base) == 20 * 2 * cost.head_forward


def test_params_total_and_active_of_the_dense_presets():
    from pipeline.train_config import load_train_config

    cfg = load_train_config(None, ["model_preset=small"]).model
    cost = model_cost(cfg)
    layer = 4 * 384 * 384 + 3 * 384 * 1024 + 2 * 384
    assert cost.params_total == 8 * layer + 2 * 8064 * 384 + 384
    assert cost.params_active == cost.params_total  # dense: every parameter is active


def test_expected_step_work_masks_half_and_scales_each_pre_anchor_stage():
    assert expected_step_work(1000) == StepWork(1000, 500.0)
    mem = MemoryConfig(enabled=True, pre_anchor_steps=2, pre_anchor_scale=1.5)
    # most noisy first: 0.5 x 1.5^2 capped at 1, then 0.5 x 1.5; the anchor stage at the anchor's 500
    assert expected_step_work(1000, mem) == StepWork(1000, 500.0, (1000.0, 750.0), 500.0)
    assert expected_step_work(1000, MemoryConfig(enabled=True, anchor_step=False)).anchor_positions is None

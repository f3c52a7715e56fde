"""The per-rank memory model: its terms, and how they scale with TP, DP and the ZeRO stage."""

from __future__ import annotations

import pytest

from pipeline.families.registry import param_count
from pipeline.memory.config import MemoryConfig
from pipeline.perf.memory_model import estimate_memory
from pipeline.train_config import load_train_config


@pytest.fixture(scope="module")
def seven_b():
    return load_train_config(None, ["model_preset=7b"]).model


def test_zero3_states_are_sixteen_bytes_per_parameter_over_all_ranks(seven_b):
    est = estimate_memory(seven_b, None, micro_batch=1, tp=8, dp=32)
    P, N = param_count(seven_b), 256
    assert est.optimizer == 12 * P / N
    layer = 4 * 4096**2 + 3 * 4096 * 11008
    assert est.params == 2 * P / N + 4 * layer / 8  # own partition + a gathered layer (and prefetch)
    assert est.grads == 4 * P / N + 2 * layer / 8 + 2 * 1.9 * 4096**2


def test_more_gpus_or_tp_never_need_more_memory(seven_b):
    totals = [estimate_memory(seven_b, None, micro_batch=1, tp=1, dp=n).total for n in (8, 16, 64, 256)]
    assert totals == sorted(totals, reverse=True)
    assert (
        estimate_memory(seven_b, None, micro_batch=1, tp=8, dp=1).activations
        < estimate_memory(seven_b, None, micro_batch=1, tp=1, dp=8).activations
    )


def test_zero_stage_zero_keeps_full_optimizer_state_per_tp_rank(seven_b):
    z0 = estimate_memory(seven_b, None, micro_batch=1, tp=8, dp=4, zero_stage=0)
    assert z0.optimizer == 12 * param_count(seven_b) / 8


def test_memdlm_adds_fast_weights_and_one_inner_stage(seven_b):
    plain = estimate_memory(seven_b, None, micro_batch=1, tp=8, dp=8)
    mem = estimate_memory(seven_b, MemoryConfig(enabled=True), micro_batch=1, tp=8, dp=8)
    assert plain.fast_weights == 0 and mem.fast_weights > 0
    lora = 32 * (4096 + 11008 / 8) * 2 + 32 * (11008 / 8 + 4096)  # gate, up (column) + down (row), per layer
    assert mem.fast_weights > 4 * 2 * lora * 4  # values + grads over the 4 memory layers, plus activations
    assert mem.total - plain.total < 0.2 * plain.total


def test_activation_term_matches_the_tensors_autograd_saves(world1):
    """Re-measure the bytes one block saves for backward and compare with the model's term."""
    import torch

    from pipeline.model.config import ModelConfig
    from tests._models import dense_model

    for d, f in ((128, 256), (128, 512), (192, 256)):
        cfg = ModelConfig(vocab_size=1000, seq_len=128, d_model=d, n_layers=2, n_heads=d // 32, ffn_hidden=f)
        torch.manual_seed(0)
        model = dense_model(cfg).to(torch.bfloat16)
        tokens = torch.randint(6, 1000, (4, 128))
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        h = model.embed(tokens).detach().requires_grad_(True)
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            model.run_layers(h, 0, 2)
        measured = sum(storages.values()) / tokens.numel() / 2  # per layer
        est = estimate_memory(cfg, None, micro_batch=4, tp=1, dp=1, zero_stage=0)
        modelled = est.activations / tokens.numel() / 2
        assert modelled == pytest.approx(measured, rel=0.15), (d, f, measured, modelled)

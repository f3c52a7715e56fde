"""The mixture-of-experts family on one process: its MoE layer against the independent float64
reference (tests/reference_moe.py: every expert on every token, routing masks), with and without
fast weights; config errors naming the key; the memory's layout over MoE layers; the cost model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.families import family_of
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.model import MoEBlock, MoETransformer
from pipeline.memory.config import MemoryConfig
from pipeline.parallel.dims import init_distributed
from pipeline.perf.cost import model_cost
from tests import reference_moe

# LLaDA2's router (sigmoid, score bias, groups, normalised, scaled), Qwen3-MoE's (softmax top-k),
# Qwen2-MoE's (softmax, gated shared expert, not normalised)
ROUTERS = {
    "llada2": dict(score_func="sigmoid", score_bias=True, n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5, n_shared_experts=1),
    "qwen3": dict(score_func="softmax", norm_topk_prob=True),
    "qwen2": dict(score_func="softmax", n_shared_experts=1, shared_ffn_hidden=48, shared_expert_gate=True),
}  # fmt: skip


def moe_config(**kw) -> MoEConfig:
    base = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64, n_experts=8,
                top_k=2, moe_ffn_hidden=24, first_k_dense_replace=1, init_std=0.2)  # fmt: skip
    cfg = MoEConfig(**(base | kw))
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def dims1():
    return init_distributed(tp=1, ep=1)


def float64_model(cfg: MoEConfig, dims) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(cfg, dims, params_dtype=torch.float64)
    for block in model.layers:  # a bias that changes the choice, so the bias path is exercised
        if isinstance(block, MoEBlock) and block.moe.router.score_bias is not None:
            block.moe.router.score_bias.copy_(torch.randn(cfg.n_experts) * 0.3)
    return model


def weights_of(block: MoEBlock) -> dict:
    """The reference's plain weight dict, read from a TP=1, EP=1 layer."""
    moe = block.moe
    w = {"router": moe.router.weight, "score_bias": moe.router.score_bias,
         "w1": moe.experts.w1, "w2": moe.experts.w2, "w3": moe.experts.w3}  # fmt: skip
    if moe.shared is not None:
        w |= {"shared_gate": moe.shared.gate.weight, "shared_up": moe.shared.up.weight,
              "shared_down": moe.shared.down.weight}  # fmt: skip
    if moe.shared_gate is not None:
        w["shared_expert_gate"] = moe.shared_gate.weight
    return w


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_moe_layer_equals_the_dense_float64_reference(dims1, router):
    cfg = moe_config(**ROUTERS[router])
    model = float64_model(cfg, dims1)
    h = torch.randn(3, 16, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for i in cfg.moe_layers():
        block = model.layers[i]
        want, stats = reference_moe.moe_ffn(h, weights_of(block), cfg)
        torch.testing.assert_close(block.moe(h), want, rtol=0, atol=1e-12)
        model.train()
        block.moe.log.recording = True
        block.moe(h)
        block.moe.log.recording = False
        ((_, ours),) = block.moe.log.take()
        assert torch.equal(ours.counts.long(), stats["counts"])
        for key in ("aux", "z", "entropy"):
            torch.testing.assert_close(getattr(ours, key), stats[key], rtol=0, atol=1e-12)
        assert ours.processed == h.shape[0] * h.shape[1] * cfg.top_k


@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_expert_fast_weights_equal_the_reference_per_expert_deltas(dims1, scope, adapter):
    cfg = moe_config(**ROUTERS["llada2"])
    model = float64_model(cfg, dims1)
    mem = MemoryConfig(enabled=True, adapter=adapter, layer_fraction=0.5)
    spec = mem.spec_for(cfg)
    assert spec.layers == (1, 2)
    fast = spec.reset(3 if scope == "sample" else None, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    for layer in spec.layers:  # B (and dW) nonzero, or the deltas would vanish
        for key, t in fast.by_layer[layer].items():
            if key != "scale":
                t.data = torch.randn(t.shape, generator=g).double() * 0.1
    h = torch.randn(3, 16, cfg.d_model, dtype=torch.float64, generator=g)
    for layer in spec.layers:
        phi = fast.by_layer[layer]
        ours = model.layers[layer].moe(h, phi)
        want, _ = reference_moe.moe_ffn(h, weights_of(model.layers[layer]), cfg, phi)
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
        assert (ours - model.layers[layer].moe(h)).abs().max() > 1e-3  # the memory does act


def test_inner_step_clips_every_expert_with_its_own_norm(dims1):
    from pipeline.memory.inner_loop import inner_step

    cfg = moe_config(**ROUTERS["qwen3"])
    model = float64_model(cfg, dims1)
    mem = MemoryConfig(enabled=True, layer_fraction=0.2, clip_norm=0.05, inner_lr=0.5)  # layer 2 only
    fast = mem.spec_for(cfg).reset(None, torch.Generator().manual_seed(4))
    fast = fast.with_values([v.double().detach().requires_grad_(True) for v in fast.leaves()])
    h = torch.randn(2, 16, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    layer = mem.spec_for(cfg).layers[0]

    def per_position(phi):
        return model.layers[layer].moe(h, phi).pow(2).sum(-1).reshape(-1)

    positions = torch.ones(2, 16, dtype=torch.bool)
    new, stats = inner_step(fast, per_position(fast.by_layer[layer]), positions, torch.ones(2), mem, None)
    phi = {k: v for k, v in fast.by_layer[layer].items()}
    loss = per_position(phi).sum() / positions.sum()
    expected = reference_moe.inner_sgd_per_expert(loss, phi, mem.inner_lr, mem.clip_norm,
                                                  {k for k in phi if k.startswith("experts.")})  # fmt: skip
    for key, value in new.by_layer[layer].items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-12, msg=key)
    assert 0 < float(stats.clipped) <= 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(top_k=9), "key 'model.top_k': got 9, expected <= n_experts=8"),
        (dict(n_group=3), "key 'model.n_group': 3 does not divide n_experts=8"),
        (dict(n_group=4, topk_group=5), "key 'model.topk_group': got 5, expected <= n_group=4"),
        (
            dict(n_group=4, topk_group=1, top_k=3),
            "key 'model.top_k': 3 experts cannot be chosen from topk_group=1",
        ),
        (dict(mlp_only_layers=[7]), "key 'model.mlp_only_layers[0]': got 7, expected a layer in 0..2"),
        (dict(first_k_dense_replace=3), "no layer is left a mixture of experts"),
        (dict(shared_expert_gate=True), "key 'model.shared_expert_gate': set, but the model has no shared"),
        (dict(score_bias_in_weights=True), "key 'model.score_bias_in_weights': set, but score_bias is false"),
    ],
)
def test_bad_moe_keys_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        moe_config(**override)


def test_expert_parallel_size_must_divide_the_experts_and_the_data_parallel_ranks(dims1):
    plan = family_of(moe_config()).plan
    with pytest.raises(ConfigError, match=r"key 'parallel.ep': 3 does not divide model.n_experts=8"):
        plan.check(moe_config(), dataclasses.replace(dims1, ep=3))
    with pytest.raises(ConfigError, match=r"key 'parallel.ep': 2 does not divide the data-parallel size 1"):
        plan.check(moe_config(), dataclasses.replace(dims1, ep=2))


def test_memory_targets_a_moe_layers_experts_and_shared_experts():
    spec = MemoryConfig(enabled=True, layer_fraction=0.5).spec_for(moe_config(**ROUTERS["llada2"]))
    names = [(t.name, t.kind, t.experts) for t in spec.targets_of(2)]
    assert names == [("experts.gate", "expert", 8), ("experts.up", "expert", 8), ("experts.down", "expert", 8),
                     ("shared.gate", "column", 1), ("shared.up", "column", 1), ("shared.down", "row", 1)]  # fmt: skip
    mixed = MemoryConfig(enabled=True, layer_fraction=1.0).spec_for(moe_config(decoder_sparse_step=2))
    assert [t.name for t in mixed.targets_of(0)] == ["gate", "up", "down"]  # a dense layer's FFN
    assert [t.name for t in mixed.targets_of(1)][:1] == ["experts.gate"]


def test_cost_model_counts_top_k_experts_as_active():
    cfg = moe_config(**ROUTERS["llada2"])
    cost = model_cost(cfg)
    d, f, E, k, s = cfg.d_model, cfg.moe_ffn_hidden, cfg.n_experts, cfg.top_k, cfg.shared_hidden
    experts = 3 * d * f
    assert cost.params_total - cost.params_active == (E - k) * experts * len(cfg.moe_layers())
    moe_layer = cost.layer_forward(1) - cost.layers[1].attention_flops_per_token(cfg.seq_len)
    attention = 2 * d * cfg.qkv_size + 2 * d * d
    assert moe_layer == pytest.approx(attention + 2 * d * E + 2 * k * experts + 2 * 3 * d * s)

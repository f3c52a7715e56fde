"""The mixture-of-experts family on one process: its MoE layer against the independent float64
reference (tests/reference_moe.py: every expert on every token, routing masks), with and without
fast weights; config errors naming the key; the memory's layout over MoE layers; the cost model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from launch.pretrain import main as pretrain_main
from pipeline.config import ConfigError
from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import draw_noise, maskable_positions
from pipeline.engine.checkpoint import persistent_buffers
from pipeline.engine.export import load_initial_weights
from pipeline.families import family_of
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.model import MoEBlock, MoETransformer
from pipeline.families.registry import param_count
from pipeline.memory.config import MemoryConfig
from pipeline.memory.inner_loop import inner_step, memdlm_loss, pre_anchor_masks
from pipeline.parallel.dims import init_distributed
from pipeline.perf.cost import model_cost
from pipeline.perf.memory_model import estimate_memory
from pipeline.sampler import DiffusionSampler, SamplerConfig
from pipeline.train_config import load_train_config
from tests import reference, reference_moe

MASK = reference.model_mask_id(None)

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
    return reference_moe.weights_of(block.moe)


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


def _anchor(cfg: MoEConfig, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, cfg.vocab_size, (3, cfg.seq_len), generator=g)
    return tokens, draw_noise(tokens, maskable_positions(tokens, 0), ObjectiveConfig(), MASK, g)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_moe_model_logits_and_mdlm_loss_equal_the_float64_reference(dims1, router):
    model = float64_model(moe_config(**ROUTERS[router]), dims1)
    tokens, noise = _anchor(model.cfg)
    ours = model(tokens=noise.noisy)
    torch.testing.assert_close(ours, reference.logits(model, reference.hidden(model, noise.noisy)),
                               rtol=0, atol=1e-10)  # fmt: skip
    loss = mdlm_loss(model, tokens, noise, ObjectiveConfig())
    expected = reference.mdlm_loss(model, tokens, noise.t, noise.mask, noise.maskable)
    assert abs(float(loss.detach()) - float(expected)) <= 1e-6 * abs(float(expected))


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_moe_memdlm_loss_and_memory_equal_the_float64_reference_inner_loop(dims1, adapter):
    """Both inner steps (stage 1 on a pre-anchor mask, stage 2 on the anchor), each expert clipped
    with its own norm, then the outer loss with the final memory: the reference's to 1e-6."""
    cfg = moe_config(**ROUTERS["llada2"])
    model = float64_model(cfg, dims1)
    tokens, noise = _anchor(cfg)
    mem = MemoryConfig(enabled=True, adapter=adapter, layer_fraction=0.5, inner_lr=2.0, clip_norm=0.05)
    (pre,) = pre_anchor_masks(noise.mask, noise.maskable, 1.5, 1, torch.Generator().manual_seed(9))
    out = memdlm_loss(model, model, tokens, noise, ObjectiveConfig(), mem, MASK,
                      torch.Generator().manual_seed(5), pre_masks=[pre])  # fmt: skip
    spec = mem.spec_for(cfg)
    fresh = spec.reset(None, torch.Generator().manual_seed(5))
    phi = {i: {k: v.double().detach().requires_grad_(k != "scale") if torch.is_tensor(v) else v
               for k, v in fresh.by_layer[i].items()} for i in spec.layers}  # fmt: skip
    first = spec.layers[0]
    k, n = noise.mask.sum(1), noise.maskable.sum(1)
    for mask, weight in (
        (pre, 1.0 / (1.5 * k / n).clamp(max=1.0).double()),
        (noise.mask, 1.0 / noise.t.double()),
    ):
        loss = reference.stage_loss(model, tokens, mask, weight, phi, first)
        grads = torch.autograd.grad(loss, [t for d in phi.values() for key, t in d.items() if key != "scale"])
        assert max(float(g.norm()) for g in grads) > mem.clip_norm  # the clip is exercised
        stepped = {}
        for i in spec.layers:  # one inner step per layer's dict, the same loss for all of them
            loss = reference.stage_loss(model, tokens, mask, weight, phi, first)
            stepped[i] = reference_moe.inner_sgd_per_expert(
                loss,
                phi[i],
                mem.inner_lr,
                mem.clip_norm,
                {key for key in phi[i] if key.startswith("experts.")},
            )
        phi = stepped
    for i in spec.layers:
        for key, value in out.fast.by_layer[i].items():
            if key != "scale":
                torch.testing.assert_close(
                    value,
                    phi[i][key].detach(),
                    rtol=0,
                    atol=1e-8,
                    msg=lambda m, i=i, key=key: f"{i} {key}: {m}",
                )
    final = {
        i: {key: v.detach() if torch.is_tensor(v) else v for key, v in d.items()} for i, d in phi.items()
    }
    expected = reference.mdlm_loss(model, tokens, noise.t, noise.mask, noise.maskable, fast=final)
    assert abs(float(out.loss) - float(expected)) <= 1e-6 * abs(float(expected))
    assert (
        abs(float(out.loss) - float(mdlm_loss(model, tokens, noise, ObjectiveConfig()))) > 1e-4
    )  # memory acts


def test_an_experts_fast_weights_learn_only_from_the_tokens_routed_to_it(dims1):
    cfg = moe_config(**ROUTERS["qwen3"])
    model = float64_model(cfg, dims1)
    mem = MemoryConfig(enabled=True, layer_fraction=0.2, inner_lr=0.5)  # layer 2 only
    layer = mem.spec_for(cfg).layers[0]
    fast = mem.spec_for(cfg).reset(None, torch.Generator().manual_seed(4), dtype=torch.float64)
    h = torch.randn(1, 2, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    routed = set(
        reference_moe.route(h[0], model.layers[layer].moe.router.weight, None, cfg)[0].flatten().tolist()
    )
    assert 0 < len(routed) <= 4 < cfg.n_experts  # 2 tokens x top-2: some experts see none
    per_position = model.layers[layer].moe(h, fast.by_layer[layer]).pow(2).sum(-1).reshape(-1)
    new, _ = inner_step(fast, per_position, torch.ones(1, 2, dtype=torch.bool), torch.ones(1), mem, None)
    for key in ("experts.gate.B", "experts.up.B", "experts.down.B"):
        written = {e for e in range(cfg.n_experts) if new.by_layer[layer][key][e].abs().max() > 0}
        assert written == routed, key


def _moe_sampler(dims) -> tuple[DiffusionSampler, list[list[int]]]:
    """A sampler (memory on layers 1-2) on a tiny LLaDA2-router MoE, and three prompts of 3, 7, 5 tokens."""
    cfg = moe_config(**ROUTERS["llada2"], seq_len=24)
    torch.manual_seed(0)
    model = MoETransformer(cfg, dims).eval()
    sampler = DiffusionSampler(model, vocab_size=60, mask_id=MASK, pad_id=0,
                               memory=MemoryConfig(enabled=True, layer_fraction=0.5))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    return sampler, [torch.randint(6, 60, (n,), generator=g).tolist() for n in (3, 7, 5)]


@pytest.mark.parametrize("adapt", [False, True])
def test_sampler_on_a_moe_model_gives_the_same_outputs_in_a_batch_as_one_by_one(dims1, adapt):
    sampler, prompts = _moe_sampler(dims1)
    sc = SamplerConfig(gen_length=8, steps=4, block_length=4, temperature=0.7, adapt=adapt)
    batch = sampler.generate(prompts, sc)
    assert not (batch.tokens == MASK).any()
    for i, p in enumerate(prompts):
        assert torch.equal(sampler.generate([p], sc).tokens[0], batch.tokens[i]), f"prompt {i}"
    if adapt:  # the inner loop wrote into the experts' and the shared experts' memories
        for name in ("experts.down.B", "shared.down.B"):
            assert all(float(batch.fast.by_layer[i][name].norm()) > 0 for i in (1, 2)), name


def test_memory_model_splits_experts_over_ep_and_their_zero_partition_over_dp_over_ep():
    cfg = moe_config(**ROUTERS["llada2"])
    P, P_e = param_count(cfg), 3 * cfg.d_model * cfg.moe_ffn_hidden * cfg.n_experts * len(cfg.moe_layers())
    replicated = {
        ep: estimate_memory(cfg, None, micro_batch=1, tp=2, dp=4, zero_stage=0, ep=ep) for ep in (1, 2)
    }
    assert replicated[1].params == pytest.approx(2 * ((P - P_e) / 2 + P_e))  # experts are not TP-split
    assert replicated[2].params == pytest.approx(2 * ((P - P_e) / 2 + P_e / 2))
    assert replicated[2].optimizer == pytest.approx(12 * ((P - P_e) / 2 + P_e / 2))
    zero3 = {ep: estimate_memory(cfg, None, micro_batch=1, tp=1, dp=4, zero_stage=3, ep=ep) for ep in (1, 4)}
    # persistent partitions are 1/dp of everything either way; EP shrinks the gathered MoE layer
    assert zero3[1].optimizer == zero3[4].optimizer == pytest.approx(12 * P / 4)
    assert zero3[4].params < zero3[1].params


def test_dry_run_prints_the_expert_parallel_layout_total_and_active_parameters(capsys):
    argv = ["--cluster", "slurm-example", "--dry-run", "model_preset=small-moe", "parallel.ep=4"]
    assert pretrain_main(argv) == 0
    out = capsys.readouterr().out
    cost = model_cost(load_train_config(None, ["model_preset=small-moe"]).model)
    assert cost.params_total > 2 * cost.params_active  # 8 experts, top-2
    total, active = f"{cost.params_total / 1e6:.1f}M", f"{cost.params_active / 1e6:.1f}M"
    assert (
        f"= TP=1 x DP=32 (EP=4 within DP), ZeRO-3, memdlm, {total} parameters ({active} active per token)"
        in out
    )
    assert "# memory per rank (memory model, bf16): " in out


def test_a_global_batch_memory_is_sharded_with_the_experts_and_keeps_the_unsharded_draw():
    cfg = moe_config(**ROUTERS["llada2"])
    spec = MemoryConfig(enabled=True, layer_fraction=0.5).spec_for(cfg)
    full = spec.reset(None, torch.Generator().manual_seed(7))
    halves = [spec.reset(None, torch.Generator().manual_seed(7), ep_rank=r, ep=2) for r in (0, 1)]
    assert not full.experts_sharded and all(h.experts_sharded for h in halves)
    for layer, key in full.names:
        parts = [h.by_layer[layer][key] for h in halves]
        if (layer, key) in full.experts:
            assert parts[0].shape[0] == cfg.n_experts // 2
            assert torch.equal(torch.cat(parts), full.by_layer[layer][key])
        else:  # shared experts: whole on every rank
            assert torch.equal(parts[0], full.by_layer[layer][key]) and torch.equal(parts[1], parts[0])
    assert spec.floats_per_rank(1, ep=2) < spec.floats_per_rank(1)


@pytest.mark.parametrize(
    ("preset", "total", "active"), [("llada2-mini", 16.26e9, 1.43e9), ("llada2-flash", 102.9e9, 6.15e9)]
)
def test_llada2_presets_build_on_meta_with_the_published_total_and_active_sizes(dims1, preset, total, active):
    cfg = load_train_config(None, [f"model_preset={preset}"]).model
    cost = model_cost(cfg)
    assert cost.params_total == pytest.approx(total, rel=1e-3)
    assert cost.params_active == pytest.approx(active, rel=5e-3)
    if preset == "llada2-mini":  # the model itself (on the meta device) has exactly the counted parameters
        with torch.device("meta"):
            model = MoETransformer(cfg, dims1)
        assert sum(p.numel() for p in model.parameters()) == cost.params_total
        assert cfg.moe_layers() == list(range(1, 20)) and cfg.rotary_dim == 64


def test_the_llada21_mini_recipes_differ_only_in_the_memory_and_dry_run_with_ep_and_active_params(capsys):
    memdlm = dataclasses.asdict(load_train_config("configs/train/llada21-mini-memdlm.yaml"))
    mdlm = dataclasses.asdict(load_train_config("configs/train/llada21-mini-mdlm.yaml"))
    differ = {k for k in memdlm if memdlm[k] != mdlm[k]}
    assert differ == {"run_dir", "memory"} and memdlm["memory"] | {"enabled": False} == mdlm["memory"]
    assert pretrain_main(["--cluster", "slurm-llada21-mini", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8",
                 "8 task(s) = TP=1 x DP=8 (EP=8 within DP), ZeRO-3, memdlm, 16.26B parameters (1.43B active per token)",
                 "# memory per rank (memory model, bf16): ", "s per step on 8 x H100 at 40% MFU"):  # fmt: skip
        assert line in out, line


@pytest.mark.parametrize("adapt", [False, True])
def test_sampler_with_a_threshold_on_a_moe_model_commits_every_position_within_the_cap(dims1, adapt):
    sampler, prompts = _moe_sampler(dims1)
    sc = SamplerConfig(gen_length=8, steps=8, block_length=4, temperature=0.7, threshold=0.1,
                       hide_later_blocks=True, adapt=adapt)  # fmt: skip
    batch = sampler.generate(prompts, sc)
    assert not (batch.tokens == MASK).any() and bool((batch.commit_step >= 0).all())
    assert int(batch.steps.max()) <= 8 and int(batch.steps.min()) < 8  # capped, and the threshold saved steps
    assert batch.steps.tolist() == (batch.commit_step.max(1).values + 1).tolist()
    for i, p in enumerate(prompts):
        alone = sampler.generate([p], sc)
        assert torch.equal(alone.tokens[0], batch.tokens[i]) and int(alone.steps[0]) == int(batch.steps[i])


def test_init_from_accepts_other_balancing_settings_but_not_another_expert_count(dims1, tmp_path):
    cfg = moe_config(**ROUTERS["llada2"])
    model = float64_model(cfg, dims1).float()
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()} | persistent_buffers(model)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    frozen_bias = dataclasses.replace(cfg, score_bias_rate=0.0, aux_loss_coef=0.5, z_loss_coef=0.1)
    fresh = MoETransformer(frozen_bias, dims1)
    load_initial_weights(fresh, tmp_path, frozen_bias)
    for name, value in state.items():
        assert torch.equal(fresh.state_dict()[name], value), name  # weights and the router bias
    with pytest.raises(ConfigError, match=r"model config differs \(n_experts: export 8 vs run 4\)"):
        load_initial_weights(fresh, tmp_path, dataclasses.replace(cfg, n_experts=4))

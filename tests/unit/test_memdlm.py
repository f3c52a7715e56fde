"""The DLM, the MDLM loss and the MemDLM inner loop against an independent plain-PyTorch computation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import (
    draw_noise,
    loss_weight,
    mask_probability,
    maskable_positions,
    time_of_mask_ratio,
)
from pipeline.memory.config import MemoryConfig
from pipeline.memory.inner_loop import expand_mask, memdlm_loss, pre_anchor_masks
from tests import reference as ref
from tests._models import dense_model
from tests.conftest import tiny_model_config

MASK = 4


@pytest.fixture
def setup(world1):
    torch.manual_seed(0)
    model = dense_model(tiny_model_config())
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(6, 300, (3, 24), generator=g)
    noise = draw_noise(tokens, maskable_positions(tokens, 0), ObjectiveConfig(), MASK, g)
    return model, tokens, noise


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _zero(model):
    for p in model.parameters():
        p.grad = None


def _run_memdlm(model, tokens, noise, mem, seed=5, obj=None, **kw):
    return memdlm_loss(
        model,
        model,
        tokens,
        noise,
        obj or ObjectiveConfig(),
        mem,
        MASK,
        torch.Generator().manual_seed(seed),
        **kw,
    )


def test_model_logits_and_mdlm_loss_match_plain_pytorch(setup):
    model, tokens, noise = setup
    ours = model(tokens=noise.noisy)
    theirs = ref.logits(model, ref.hidden(model, noise.noisy))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    loss = mdlm_loss(model, tokens, noise, ObjectiveConfig())
    expected = ref.mdlm_loss(model, tokens, noise.t, noise.mask, noise.maskable)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_inner_lr_zero_gives_exactly_the_mdlm_loss_and_gradients(setup):
    model, tokens, noise = setup
    loss = mdlm_loss(model, tokens, noise, ObjectiveConfig())
    loss.backward()
    g_mdlm = _grads(model)
    _zero(model)
    out = _run_memdlm(model, tokens, noise, MemoryConfig(enabled=True, inner_lr=0.0))
    out.loss.backward()
    assert torch.equal(out.loss, loss)
    g_mem = _grads(model)
    assert g_mem.keys() == g_mdlm.keys()
    assert all(torch.equal(g_mem[k], g_mdlm[k]) for k in g_mdlm)


def test_fresh_fast_weights_change_no_logit(setup):
    model, _, noise = setup
    for adapter, targets, scope in (("lora", "ffn", None), ("full", "ffn+attn", 3), ("lora", "ffn+attn", 3)):
        spec = MemoryConfig(enabled=True, adapter=adapter, targets=targets).spec_for(tiny_model_config())
        fast = spec.reset(scope, torch.Generator().manual_seed(0))
        assert torch.equal(model(tokens=noise.noisy, fast=fast.by_layer), model(tokens=noise.noisy))
        assert any(v.abs().sum() > 0 for v in fast.leaves()) or adapter == "full"


def test_memory_sits_on_the_last_ten_percent_of_layers():
    assert MemoryConfig(enabled=True).spec_for(tiny_model_config(n_layers=8)).layers == (7,)
    assert MemoryConfig(enabled=True).spec_for(tiny_model_config(n_layers=24)).layers == (21, 22, 23)
    assert MemoryConfig(enabled=True, layer_fraction=0.5).spec_for(tiny_model_config(n_layers=8)).layers == (
        4,
        5,
        6,
        7,
    )


def test_pre_anchor_mask_contains_anchor_with_ratio_min_one_one_point_five():
    g = torch.Generator().manual_seed(3)
    anchor = torch.rand(64, 40, generator=g) < torch.rand(64, 1, generator=g)
    maskable = torch.rand(64, 40, generator=g) < 0.9
    anchor &= maskable
    (pre,) = pre_anchor_masks(anchor, maskable, 1.5, 1, g)
    assert bool((pre | ~anchor).all())  # M_pre ⊇ M_t
    assert not bool((pre & ~maskable).any())
    k, n = anchor.sum(1), maskable.sum(1)
    expected = torch.minimum(torch.ceil(1.5 * k.double()).long(), n)
    assert torch.equal(pre.sum(1), expected)  # realised ratio = min(1, 1.5 x) per sequence
    two = pre_anchor_masks(anchor, maskable, 1.5, 2, torch.Generator().manual_seed(3))
    assert bool((two[0] | ~two[1]).all()) and bool((two[1] | ~anchor).all())  # nested, most noisy first
    full = expand_mask(anchor, maskable, n, g)
    assert torch.equal(full, maskable)


def test_stage_two_sees_exactly_the_anchor_state(setup):
    model, tokens, noise = setup
    seen = {}
    calls = []

    def outer(**kw):
        if "tokens" in kw:
            seen["tokens"] = kw["tokens"]
        out = model(**kw)
        if kw.get("end_layer") is not None:
            seen["h_anchor"] = out
        return out

    real = model.run_layers

    def spy(h, start, end, fast=None, checkpoint_layers=False, key_mask=None):
        calls.append((h, start))
        return real(h, start, end, fast, checkpoint_layers, key_mask)

    model.run_layers = spy
    try:
        memdlm_loss(
            model,
            outer,
            tokens,
            noise,
            ObjectiveConfig(),
            MemoryConfig(enabled=True),
            MASK,
            torch.Generator().manual_seed(1),
        )
    finally:
        del model.run_layers
    assert torch.equal(seen["tokens"], noise.noisy)
    first = 3
    stage2_input = [h for h, start in calls if start == first][1]  # [0] stage 1, [1] stage 2, [2] outer
    assert torch.equal(stage2_input, seen["h_anchor"]) and not stage2_input.requires_grad


def test_inner_steps_equal_hand_computed_clipped_sgd(setup):
    model, tokens, noise = setup
    mem = MemoryConfig(enabled=True, inner_lr=3.0, clip_norm=0.01)  # large steps: clipping is active
    (pre,) = pre_anchor_masks(noise.mask, noise.maskable, 1.5, 1, torch.Generator().manual_seed(9))
    out = _run_memdlm(model, tokens, noise, mem, seed=5, pre_masks=[pre])
    spec = mem.spec_for(tiny_model_config())
    phi = dict(spec.reset(None, torch.Generator().manual_seed(5)).by_layer[3])
    # the spec's stage-1 weight: w(rho_pre), rho_pre = min(1, 1.5 rho) (not the rounded mask's fraction)
    k, n = noise.mask.sum(1), noise.maskable.sum(1)
    assert (k % 2 == 1).any()  # a row where ceil(1.5 k) / n differs from 1.5 k / n
    w_pre = 1.0 / (1.5 * k / n).clamp(max=1.0)
    raw = torch.autograd.grad(ref.stage_loss(model, tokens, pre, w_pre, {3: phi}, 3), [phi["gate.B"]])[0]
    assert raw.norm() > mem.clip_norm  # the check below exercises the clip
    phi1 = ref.inner_sgd(
        ref.stage_loss(model, tokens, pre, w_pre, {3: phi}, 3), phi, mem.inner_lr, mem.clip_norm
    )
    phi2 = ref.inner_sgd(
        ref.stage_loss(model, tokens, noise.mask, 1.0 / noise.t, {3: phi1}, 3),
        phi1,
        mem.inner_lr,
        mem.clip_norm,
    )
    for k in ("gate.A", "gate.B", "up.A", "up.B", "down.A", "down.B"):
        torch.testing.assert_close(out.fast.by_layer[3][k], phi2[k].detach(), rtol=1e-4, atol=1e-6)
    assert out.stage_stats[0].skipped.item() == 0


def test_stage_one_weight_is_w_of_the_target_ratio_not_of_the_rounded_mask(setup):
    model, tokens, noise = setup
    row = slice(0, 1)
    one = type(noise)(noise.t[row], noise.mask[row], noise.noisy[row], noise.maskable[row])
    k, n = int(one.mask.sum()), int(one.maskable.sum())
    extra = math.ceil(1.5 * k) - k
    # an anchor with an odd masked count: 1.5 k is not an integer
    if k % 2 == 0:
        first_masked = int(one.mask[0].nonzero()[0])
        one.mask[0, first_masked] = False
        one.noisy[0, first_masked] = tokens[0, first_masked]
        k, extra = k - 1, math.ceil(1.5 * (k - 1)) - (k - 1)
    (pre,) = pre_anchor_masks(one.mask, one.maskable, 1.5, 1, torch.Generator().manual_seed(9))
    assert int(pre.sum()) == k + extra  # the mask is rounded up to whole tokens ...
    losses = {}
    for weighting in ("elbo", "uniform"):
        mem = MemoryConfig(enabled=True, inner_weighting=weighting)
        out = _run_memdlm(model, tokens[row], one, mem, seed=5, pre_masks=[pre])
        losses[weighting] = float(out.stage_stats[0].loss)
    # ... but the weight is w(rho_pre) = 1 / min(1, 1.5 k / n), the spec's noise level
    assert losses["elbo"] / losses["uniform"] == pytest.approx(1.0 / min(1.0, 1.5 * k / n), rel=1e-5)
    assert abs(1.0 / min(1.0, 1.5 * k / n) - n / (k + extra)) > 1e-3  # the two readings differ here


def test_outer_gradient_is_first_order_with_final_fast_weights_frozen(setup):
    model, tokens, noise = setup
    out = _run_memdlm(model, tokens, noise, MemoryConfig(enabled=True, inner_lr=1.0))
    out.loss.backward()
    ours = _grads(model)
    _zero(model)
    phi2 = {i: {k: v.detach() for k, v in d.items()} for i, d in out.fast.by_layer.items()}
    expected = ref.mdlm_loss(model, tokens, noise.t, noise.mask, noise.maskable, fast=phi2)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    theirs = _grads(model)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-7, msg=k)


def test_checkpointing_and_shared_anchor_pass_change_no_number(setup):
    model, tokens, noise = setup
    results = []
    for ckpt in (False, True):
        _zero(model)
        out = _run_memdlm(model, tokens, noise, MemoryConfig(enabled=True, checkpoint=ckpt))
        out.loss.backward()
        results.append((out.loss.detach(), out.fast.leaves(), _grads(model)))
    (l0, f0, g0), (l1, f1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=0)
    for a, b in zip(f0, f1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-5, atol=1e-7)


def test_sample_scope_batch_one_equals_batch_scope(setup):
    model, tokens, noise = setup
    one = draw_noise(
        tokens[:1], noise.maskable[:1], ObjectiveConfig(), MASK, torch.Generator().manual_seed(4)
    )
    (pre,) = pre_anchor_masks(one.mask, one.maskable, 1.5, 1, torch.Generator().manual_seed(2))
    a = _run_memdlm(model, tokens[:1], one, MemoryConfig(enabled=True, scope="batch"), pre_masks=[pre])
    b = _run_memdlm(model, tokens[:1], one, MemoryConfig(enabled=True, scope="sample"), pre_masks=[pre])
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    for x, y in zip(a.fast.leaves(), b.fast.leaves(), strict=True):
        torch.testing.assert_close(x, y[0], rtol=1e-5, atol=1e-7)


def test_sample_scope_batch_two_equals_two_batch_one_runs(setup):
    model, tokens, noise = setup
    obj = ObjectiveConfig(normalization="sequence")  # the batch loss is then the mean of the two
    (pre,) = pre_anchor_masks(noise.mask, noise.maskable, 1.5, 1, torch.Generator().manual_seed(2))
    mem = MemoryConfig(enabled=True, scope="sample", inner_lr=0.5)
    both = _run_memdlm(model, tokens[:2], _sub(noise, slice(0, 2)), mem, obj=obj, pre_masks=[pre[:2]])
    both.loss.backward()
    g_both = _grads(model)
    singles, g_sum = [], None
    for b in range(2):
        _zero(model)
        out = _run_memdlm(
            model, tokens[b : b + 1], _sub(noise, slice(b, b + 1)), mem, obj=obj, pre_masks=[pre[b : b + 1]]
        )
        out.loss.backward()
        singles.append(out)
        g = _grads(model)
        g_sum = g if g_sum is None else {k: g_sum[k] + g[k] for k in g}
    torch.testing.assert_close(both.loss, (singles[0].loss + singles[1].loss) / 2, rtol=1e-5, atol=1e-7)
    for i, x in enumerate(both.fast.leaves()):
        for b in range(2):
            torch.testing.assert_close(x[b], singles[b].fast.leaves()[i][0], rtol=1e-4, atol=1e-7)
    for k in g_both:
        torch.testing.assert_close(g_both[k], g_sum[k] / 2, rtol=1e-4, atol=1e-7, msg=k)


def _sub(noise, sl):
    from pipeline.diffusion.noise import Noise

    return Noise(t=noise.t[sl], mask=noise.mask[sl], noisy=noise.noisy[sl], maskable=noise.maskable[sl])


def test_non_finite_inner_loss_skips_the_update_and_is_counted(setup):
    model, tokens, noise = setup
    with torch.no_grad():
        model.head.weight[7] = float("nan")  # any position predicting over this row is NaN
    out = _run_memdlm(model, tokens, noise, MemoryConfig(enabled=True))
    assert [s.skipped.item() for s in out.stage_stats] == [1.0, 1.0]
    spec = MemoryConfig(enabled=True).spec_for(tiny_model_config())
    fresh = spec.reset(None, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(out.fast.leaves(), fresh.leaves(), strict=True))
    out = _run_memdlm(model, tokens, noise, MemoryConfig(enabled=True, scope="sample"))
    assert out.stage_stats[0].skipped.item() == 3.0


@pytest.mark.parametrize("kind", ["logit_kl", "reverse_kl", "hidden_cos", "hidden_mse"])
def test_ablation_inner_losses_run_and_update_the_memory(setup, kind):
    model, tokens, noise = setup
    out = _run_memdlm(model, tokens, noise, MemoryConfig(enabled=True, inner_loss=kind, targets="ffn+attn"))
    assert torch.isfinite(out.loss)
    assert all(s.grad_norm.item() > 0 and s.loss.item() > 0 for s in out.stage_stats)
    assert any(v.abs().sum() > 0 for k, v in out.fast.by_layer[3].items() if k.endswith(".B"))


def test_sft_never_masks_or_scores_the_prompt(world1):
    tokens = torch.randint(6, 300, (4, 24))
    prompt = torch.arange(24)[None].expand(4, 24) < 10
    maskable = maskable_positions(tokens, 0, prompt)
    noise = draw_noise(
        tokens,
        maskable,
        ObjectiveConfig(mode="sft"),
        MASK,
        torch.Generator().manual_seed(0),
        t=torch.full((4,), 0.999),
    )
    assert not bool(noise.mask[:, :10].any()) and bool(noise.mask[:, 10:].all())


def test_schedules_and_weights():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(t, "linear", "elbo"), 1 / t)
    alpha = lambda s: torch.cos(0.5 * math.pi * s)  # noqa: E731
    h = 1e-6
    d_alpha = (alpha(t + h) - alpha(t - h)) / (2 * h)
    torch.testing.assert_close(loss_weight(t, "cosine", "elbo"), -d_alpha / (1 - alpha(t)), rtol=1e-6, atol=0)
    torch.testing.assert_close(mask_probability(time_of_mask_ratio(t, "cosine"), "cosine"), t)
    assert torch.equal(loss_weight(t, "cosine", "uniform"), torch.ones_like(t))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(6, 300, (2000, 64), generator=g)
    noise = draw_noise(tokens, tokens > 0, ObjectiveConfig(), MASK, g)
    assert noise.t.min() >= 1e-3
    ratio = noise.mask.float().mean(1)
    assert abs(float((ratio - noise.t).mean())) < 0.01  # mask ratio tracks t


def test_memory_layer_checkpointing_is_automatic_for_large_models():
    assert MemoryConfig().use_checkpoint(20_000_000) is False
    assert MemoryConfig().use_checkpoint(1_300_000_000) is True
    assert MemoryConfig(checkpoint=False).use_checkpoint(7_000_000_000) is False
    assert MemoryConfig(checkpoint=True).use_checkpoint(1) is True

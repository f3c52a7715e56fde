"""The memory-effect metrics of a MemDLM step: the gain of phi2 over phi0 on the same anchor,
the fast-weight update norms and the clipped fraction (what the dashboard plots)."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.noise import draw_noise, maskable_positions
from pipeline.memory.config import MemoryConfig
from pipeline.memory.inner_loop import memdlm_loss
from tests._models import dense_model
from tests.conftest import tiny_model_config

MASK = 4


def _run(model, tokens, noise, mem, measure, seed=5):
    return memdlm_loss(
        model,
        model,
        tokens,
        noise,
        ObjectiveConfig(),
        mem,
        MASK,
        torch.Generator().manual_seed(seed),
        reset_generator=torch.Generator().manual_seed(seed + 1),
        measure=measure,
    )


@pytest.fixture
def model(world1):
    torch.manual_seed(0)
    return dense_model(tiny_model_config())


def _random_batch(seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, 300, (3, 24), generator=g)
    noise = draw_noise(tokens, maskable_positions(tokens, 0), ObjectiveConfig(), MASK, g)
    return tokens, noise


def test_gain_is_exactly_zero_when_the_memory_writes_nothing(model):
    tokens, noise = _random_batch()
    out = _run(model, tokens, noise, MemoryConfig(enabled=True, inner_lr=0.0), measure=True)
    assert out.gain is not None and out.gain.item() == 0.0
    assert torch.equal(out.loss_phi0, out.loss.detach())
    assert all(s.update_norm.item() == 0.0 for s in out.stage_stats)


def test_measuring_leaves_the_loss_gradients_and_inner_stats_bit_identical(model):
    tokens, noise = _random_batch()
    mem = MemoryConfig(enabled=True, targets="ffn+attn")
    results = []
    for measure in (False, True):
        model.zero_grad(set_to_none=True)
        out = _run(model, tokens, noise, mem, measure)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out, grads))
    (off, g_off), (on, g_on) = results
    assert off.gain is None and on.gain is not None
    assert torch.equal(off.loss, on.loss)
    assert all(torch.equal(a, b) for a, b in zip(g_off, g_on, strict=True))
    for a, b in zip(off.stage_stats, on.stage_stats, strict=True):
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_norm, b.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(off.fast.leaves(), on.fast.leaves(), strict=True))


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_gain_is_positive_on_a_repeated_key_value_sequence(model, scope):
    """A random key-value block written twice: the masked half of the anchor is visible elsewhere
    in the same row, and the inner steps train on exactly those positions, so phi2 must lower
    the anchor's loss below phi0's (which is the base model's: B = 0)."""
    g = torch.Generator().manual_seed(3)
    block = torch.randint(6, 300, (4, 12), generator=g)
    tokens = torch.cat([block, block], dim=1)
    noise = draw_noise(tokens, maskable_positions(tokens, 0), ObjectiveConfig(), MASK, g)
    mem = MemoryConfig(enabled=True, scope=scope, inner_lr=0.5)
    out = _run(model, tokens, noise, mem, measure=True)
    assert out.gain.item() > 0.0, out.gain
    assert out.loss_phi0.item() > out.loss.item()
    for st in out.stage_stats:
        assert st.update_norm.item() > 0.0
        assert 0.0 <= st.clipped.item() <= 1.0


def test_clipped_fraction_counts_the_clipped_tensors(model):
    tokens, noise = _random_batch()
    tight = _run(model, tokens, noise, MemoryConfig(enabled=True, clip_norm=1e-9), measure=False)
    loose = _run(model, tokens, noise, MemoryConfig(enabled=True, clip_norm=1e9), measure=False)
    assert [s.clipped.item() for s in tight.stage_stats] == [1.0, 1.0]
    assert [s.clipped.item() for s in loose.stage_stats] == [0.0, 0.0]
    # every tensor clipped to 1e-9: the update is inner_lr * 1e-9 per tensor at most
    n_tensors = len(tight.fast.leaves())
    assert all(s.update_norm.item() <= 0.1 * 1e-9 * n_tensors**0.5 * 1.01 for s in tight.stage_stats)

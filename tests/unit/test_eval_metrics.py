"""Exposure-bias curves and the Monte-Carlo log-likelihood against direct computations."""

from __future__ import annotations

import pytest
import torch

from pipeline.eval.exposure_bias import exposure_bias
from pipeline.eval.likelihood import mc_loglikelihood
from pipeline.sampler import prompt_seed
from tests._models import dense_model
from tests.conftest import tiny_model_config

MASK, PAD, VOCAB = 4, 0, 280


@pytest.fixture(scope="module")
def model(world1):
    torch.manual_seed(1)
    return dense_model(tiny_model_config(seq_len=40)).eval()


def _pairs(n: int, G: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(6, VOCAB, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    responses = [torch.randint(6, VOCAB, (G,), generator=g).tolist() for _ in range(n)]
    return prompts, responses


def _logp(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(tokens=x[None])[0].double()[:, :VOCAB], -1)


def _direct_curve(model, prompt, response, steps, seed, draws):
    """One sequence, the plain way: full logits each step, python loops."""
    P, G = len(prompt), len(response)
    truth = torch.tensor(prompt + response)
    x = torch.tensor(prompt + [MASK] * G)
    masked = set(range(P, P + G))
    g = torch.Generator().manual_seed(prompt_seed(seed, prompt))
    per_step = G // steps
    out = {"L_seq": [], "L_static": [], "L_control": []}
    for k in range(steps):
        logp = _logp(model, x)
        if k > 0:
            m = sorted(masked)
            out["L_seq"].append(-sum(float(logp[i, truth[i]]) for i in m) / len(m))
            ctrl = truth.clone()
            ctrl[m] = MASK
            lc = _logp(model, ctrl)
            out["L_control"].append(-sum(float(lc[i, truth[i]]) for i in m) / len(m))
            tot = 0.0
            for _ in range(draws):
                pick = torch.randperm(G, generator=g)[: len(m)]
                s = truth.clone()
                s[P + pick] = MASK
                ls = _logp(model, s)
                tot += -sum(float(ls[P + int(j), truth[P + int(j)]]) for j in pick)
            out["L_static"].append(tot / (len(m) * draws))
        best = []
        for i in sorted(masked):
            row = logp[i].clone()
            row[[MASK, PAD]] = float("-inf")
            best.append((float(row.max()), i, int(row.argmax())))
        for _, i, tok in sorted(best, reverse=True)[:per_step]:
            x[i] = tok
            masked.discard(i)
    return out


def test_exposure_bias_matches_a_direct_computation(model):
    prompts, responses = _pairs(1, 8)
    curve = exposure_bias(
        model, prompts, responses, steps=4, mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, seed=3, static_draws=2
    )
    ref = _direct_curve(model, prompts[0], responses[0], 4, 3, 2)
    assert curve.steps == [1, 2, 3] and curve.masked_ratio == [0.75, 0.5, 0.25]
    for key in ("L_seq", "L_static", "L_control"):
        assert getattr(curve, key) == pytest.approx(ref[key], rel=1e-5), key
    assert (
        pytest.approx([s / t for s, t in zip(ref["L_seq"], ref["L_static"], strict=True)], rel=1e-5)
        == curve.R
    )


def test_exposure_bias_of_a_batch_is_the_mean_of_its_rows(model):
    prompts, responses = _pairs(3, 6)
    kw = dict(steps=3, mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, seed=0)
    batch = exposure_bias(model, prompts, responses, **kw)
    rows = [exposure_bias(model, [p], [r], **kw) for p, r in zip(prompts, responses, strict=True)]
    for key in ("L_seq", "L_static", "L_control"):
        mean = [sum(getattr(c, key)[k] for c in rows) / 3 for k in range(2)]
        assert getattr(batch, key) == pytest.approx(mean, rel=1e-6), key


def test_exposure_bias_rejects_mixed_response_lengths(model):
    with pytest.raises(ValueError, match="same length"):
        exposure_bias(model, [[7], [8]], [[9, 9], [9]], steps=1, mask_id=MASK, pad_id=PAD, vocab_size=VOCAB)


def test_one_token_continuation_loglik_is_exact(model):
    prompts, _ = _pairs(3, 1)
    conts = [[17], [90], [201]]
    got = mc_loglikelihood(
        model, prompts, conts, mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, samples=3, check_greedy=True
    )
    for p, c, ll in zip(prompts, conts, got.loglik, strict=True):
        logp = _logp(model, torch.tensor([*p, MASK]))
        assert ll == pytest.approx(float(logp[len(p), c[0]]), rel=1e-6)
        assert got.greedy[prompts.index(p)] == (int(logp[len(p)].argmax()) == c[0])


def test_loglik_estimate_is_seeded_and_batch_invariant(model):
    prompts, conts = _pairs(4, 5)
    kw = dict(mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, samples=4, seed=2)
    batch = mc_loglikelihood(model, prompts, conts, batch_size=4, **kw)
    assert batch.loglik == mc_loglikelihood(model, prompts, conts, batch_size=4, **kw).loglik
    singles = [mc_loglikelihood(model, [p], [c], **kw).loglik[0] for p, c in zip(prompts, conts, strict=True)]
    assert batch.loglik == pytest.approx(singles, rel=1e-6)
    assert all(ll < 0 for ll in batch.loglik)


def test_loglik_estimate_is_unbiased_for_the_elbo_on_two_tokens(model):
    """For L=2 the estimator's mean is 1/2 * (2 * [lp1 + lp2 with both masked]) + 1/2 * (2 * mean of
    the one-masked terms); many samples approach it."""
    p, c = [9, 10, 11], [30, 40]
    both = _logp(model, torch.tensor([*p, MASK, MASK]))
    e2 = float(both[3, 30] + both[4, 40])
    a = _logp(model, torch.tensor([*p, MASK, 40]))[3, 30]
    b = _logp(model, torch.tensor([*p, 30, MASK]))[4, 40]
    e1 = float(a + b)  # l=1: weight 2, each position with prob 1/2 -> expectation a + b
    expected = 0.5 * e2 + 0.5 * e1
    got = mc_loglikelihood(model, [p], [c], mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, samples=400).loglik[0]
    assert got == pytest.approx(expected, rel=0.05)

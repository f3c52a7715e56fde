"""Log-likelihood of a continuation under a masked diffusion LM: a Monte-Carlo masked estimate.

A DLM has no left-to-right factorisation, so ``log p(c | p)`` is estimated by its ELBO in the
low-variance form LLaDA uses: for each of ``samples`` draws pick ``l ~ U{1..L}`` (L = length
of the continuation), mask ``l`` of its positions uniformly, and score

    (L / l) * sum over the masked positions of log p(c_i | prompt, visible part of c)

The mean over draws is a lower bound on ``log p(c | p)`` whose variance falls with
``samples``. Draws are seeded from the prompt, so candidate answers of one prompt share them
(common random numbers: the ranking of candidates is much less noisy than each estimate).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pipeline.memory.fast_weights import FastWeights
from pipeline.sampler import prompt_seed


def select_rows(fast: FastWeights, rows: torch.Tensor) -> FastWeights:
    """Per-sample memory for a new batch: row ``j`` gets the memory of old row ``rows[j]``."""
    return fast.with_values([v.index_select(0, rows) for v in fast.leaves()])


@dataclass
class Scored:
    loglik: list[float]  # per pair, the MC estimate of log p(continuation | prompt)
    greedy: list[bool]  # the continuation is the per-position argmax with all of it masked
    # (all False unless asked for: it costs one more forward per batch)


def _pack_pairs(
    prompts: list[list[int]], conts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [N, T], continuation mask [N, T], real-token mask [N, T] (right padding)."""
    T = max(len(p) + len(c) for p, c in zip(prompts, conts, strict=True))
    N = len(prompts)
    tokens = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    cont = torch.zeros(N, T, dtype=torch.bool, device=device)
    real = torch.zeros(N, T, dtype=torch.bool, device=device)
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        tokens[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long, device=device)
        cont[i, len(p) : len(p) + len(c)] = True
        real[i, : len(p) + len(c)] = True
    return tokens, cont, real


def _forward(model, tokens, mask, real, mem, mask_id: int, bf16: bool) -> torch.Tensor:
    """Logits [N, V] at ``mask`` with those positions replaced by [MASK]."""
    with torch.no_grad(), torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(tokens=torch.where(mask, mask_id, tokens), fast=mem, positions=mask, key_mask=real)


def _ce(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = logits.float()[:, :vocab_size]
    return torch.nn.functional.cross_entropy(logits, target, reduction="none")


def _check_pairs(prompts: list[list[int]], conts: list[list[int]], limit: int) -> None:
    if any(len(c) == 0 for c in conts):
        raise ValueError("every continuation needs at least one token")
    if len(prompts) != len(conts):
        raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
    for p, c in zip(prompts, conts, strict=True):
        if len(p) + len(c) > limit:
            raise ValueError(
                f"prompt + continuation = {len(p) + len(c)} tokens exceeds the model's seq_len {limit}"
            )


def _draw_elbo_mask(cont: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ELBO draw per row: ``l ~ U{1..L}`` continuation positions masked, weight ``L / l``."""
    mask = torch.zeros_like(cont)
    weight = torch.zeros(len(gens), dtype=torch.float64, device=cont.device)
    for j, g in enumerate(gens):
        pos = cont[j].nonzero().squeeze(1)
        L = pos.numel()
        l_ = int(torch.randint(1, L + 1, (1,), generator=g, device=g.device))
        pick = torch.randperm(L, generator=g, device=g.device)[:l_].to(cont.device)
        mask[j, pos[pick]] = True
        weight[j] = L / l_
    return mask, weight


def mc_loglikelihood(
    model,
    prompts: list[list[int]],
    conts: list[list[int]],
    *,
    mask_id: int,
    pad_id: int,
    vocab_size: int,
    samples: int = 8,
    seed: int = 0,
    fast: FastWeights | None = None,
    fast_rows: list[int] | None = None,
    batch_size: int = 16,
    bf16: bool = False,
    check_greedy: bool = False,
) -> Scored:
    """Estimate ``log p(conts[i] | prompts[i])`` for every pair (see the module docstring).

    ``fast`` is a per-sample memory and ``fast_rows[i]`` the row of it that pair ``i`` uses
    (e.g. the memory adapted on that pair's prompt). A prompt may be empty (unconditional);
    a continuation may not.
    """
    _check_pairs(prompts, conts, model.cfg.seq_len)
    device = next(model.parameters()).device
    loglik = [0.0] * len(prompts)
    greedy = [False] * len(prompts)
    for lo in range(0, len(prompts), batch_size):
        idx = list(range(lo, min(len(prompts), lo + batch_size)))
        P, C = [prompts[i] for i in idx], [conts[i] for i in idx]
        tokens, cont, real = _pack_pairs(P, C, pad_id, device)
        mem = None
        if fast is not None:
            mem = select_rows(fast, torch.tensor([fast_rows[i] for i in idx], device=device)).by_layer
        forward = functools.partial(_forward, model, tokens, real=real, mem=mem, mask_id=mask_id, bf16=bf16)
        if check_greedy:  # everything masked, argmax at every position
            hits = (forward(cont).float()[:, :vocab_size].argmax(-1) == tokens[cont]).float()
            wrong = torch.zeros(len(idx), device=device).index_add(0, cont.nonzero()[:, 0], 1.0 - hits)
            for j, i in enumerate(idx):
                greedy[i] = bool(wrong[j] == 0)
        gens = [torch.Generator(device=device).manual_seed(prompt_seed(seed, p)) for p in P]
        total = torch.zeros(len(idx), dtype=torch.float64, device=device)
        for _ in range(samples):
            mask, weight = _draw_elbo_mask(cont, gens)
            ce = _ce(forward(mask), tokens[mask], vocab_size).double()
            per_row = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add(
                0, mask.nonzero()[:, 0], ce
            )
            total -= weight * per_row
        for j, i in enumerate(idx):
            loglik[i] = float(total[j]) / samples
    return Scored(loglik=loglik, greedy=greedy)

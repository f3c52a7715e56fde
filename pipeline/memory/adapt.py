"""Inference-time adaptation (spec section 5): write a prompt into a fresh memory before using it.

    fast = adapt_to_context(model, tokens, context, mem, mask_id, generators=row_generators)
    logits = model(tokens=x, fast=fast.by_layer)     # generate / score with phi2 fixed

For each sequence: reset the memory, mask ``anchor_ratio`` of its context tokens (the anchor),
extend that to ``pre_anchor_ratio`` (the pre-anchor state), and run the same two-stage inner
loop as training on the context alone: uniform loss weights, one memory per sequence
(``sample`` scope), no cross-rank sync. Only the context is visible during adaptation: the
other positions are hidden as padding keys, so nothing the model will be scored on or asked to
generate leaks into the memory (the reference's ``evaluate()`` adapted on the gold tokens it
then scored).

Every random draw of row ``b`` comes from ``generators[b]`` and the memory's initial ``A`` is the
same for every row, so a row's memory does not depend on which other rows share its batch.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.noise import Noise
from pipeline.memory.config import MemoryConfig
from pipeline.memory.fast_weights import FastWeights
from pipeline.memory.inner_loop import inner_loop


def adaptation_memory_config(mem: MemoryConfig, anchor_ratio: float, pre_anchor_ratio: float) -> MemoryConfig:
    """The training memory config turned into its inference-time form (section 5)."""
    if not 0.0 < anchor_ratio <= pre_anchor_ratio <= 1.0:
        raise ValueError(
            f"adaptation ratios: expected 0 < anchor_ratio <= pre_anchor_ratio <= 1, got anchor_ratio="
            f"{anchor_ratio}, pre_anchor_ratio={pre_anchor_ratio}"
        )
    return replace(
        mem,
        scope="sample",
        sync_dp=False,
        inner_weighting="uniform",
        pre_anchor_scale=pre_anchor_ratio / anchor_ratio,
        pre_anchor_steps=1,
        anchor_step=True,
    )


def _row_mask(allowed: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` positions of the bool vector ``allowed`` [T], chosen uniformly (row generator)."""
    idx = allowed.nonzero().squeeze(1)
    pick = torch.randperm(idx.numel(), generator=generator, device=generator.device)[:count]
    out = torch.zeros_like(allowed)
    out[idx[pick.to(idx.device)]] = True
    return out


def context_masks(
    context: torch.Tensor, ratios: tuple[float, float], generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested anchor and pre-anchor masks [B, T] over the context positions [B, T] bool.

    Row b masks ``ceil(ratio * n_b)`` of its ``n_b`` context tokens (at least one); the
    pre-anchor mask adds uniformly chosen still-visible context tokens to the anchor's.
    """
    anchors, pres = [], []
    for b, g in enumerate(generators):
        n = int(context[b].sum())
        k_anchor = min(n, max(1, math.ceil(ratios[0] * n))) if n else 0
        k_pre = min(n, max(k_anchor, math.ceil(ratios[1] * n)))
        anchor = _row_mask(context[b], k_anchor, g)
        extra = _row_mask(context[b] & ~anchor, k_pre - k_anchor, g)
        anchors.append(anchor)
        pres.append(anchor | extra)
    return torch.stack(anchors), torch.stack(pres)


def adapt_to_context(
    model,
    tokens: torch.Tensor,
    context: torch.Tensor,
    mem: MemoryConfig,
    mask_id: int,
    *,
    generators: list[torch.Generator],
    init_generator: torch.Generator,
    anchor_ratio: float = 0.2,
    pre_anchor_ratio: float = 0.3,
    objective: ObjectiveConfig | None = None,
) -> FastWeights:
    """One memory per row, written from that row's context only; returns phi2 (detached).

    tokens [B, T] (anything outside ``context`` is ignored); context [B, T] bool: the
    positions to adapt on (they are also the only visible ones). ``generators[b]`` draws row
    b's masks; ``init_generator`` draws the memory's initial ``A`` (shared by all rows).
    """
    if len(generators) != tokens.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} for a batch of {tokens.shape[0]}")
    cfg = adaptation_memory_config(mem, anchor_ratio, pre_anchor_ratio)
    empty = (~context.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no context tokens to adapt on")
    anchor, pre = context_masks(context, (anchor_ratio, pre_anchor_ratio), generators)
    n = context.sum(1).clamp(min=1)
    noise = Noise(
        t=anchor.sum(1) / n,  # realised ratio (weights are uniform at inference anyway)
        mask=anchor,
        noisy=torch.where(anchor, mask_id, tokens),
        maskable=context,
    )
    fast, _ = inner_loop(
        model,
        tokens,
        noise,
        objective or ObjectiveConfig(),
        cfg,
        mask_id,
        init_generator,
        pre_masks=[pre],
        key_mask=context,
    )
    return fast

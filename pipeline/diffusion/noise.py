"""The forward process (docs/method.md section 1), as numbered steps:

1. draw ``t ~ U(eps, 1)`` per sequence (``eps = 1e-3``);
2. mask each *maskable* token with probability ``1 - alpha(t)`` (``= t`` for the linear
   schedule); pretraining: every non-pad token is maskable; SFT: the prompt never is.

The loss weight ``w(t) = -alpha'(t) / (1 - alpha(t))`` (``1/t`` linear) belongs to the schedule
and lives here too. Everything is vectorised on the device: no per-sample loops, no ``.item()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.diffusion.config import ObjectiveConfig


def mask_probability(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """``1 - alpha(t)``: the chance a maskable token is masked at time t [B]."""
    if schedule == "linear":
        return t
    return 1.0 - torch.cos(0.5 * math.pi * t)  # cosine: alpha(t) = cos(pi t / 2)


def loss_weight(t: torch.Tensor, schedule: str, weighting: str) -> torch.Tensor:
    """``w(t) = -alpha'(t) / (1 - alpha(t))`` per sequence [B] (or ones for ``uniform``)."""
    if weighting == "uniform":
        return torch.ones_like(t)
    if schedule == "linear":
        return 1.0 / t
    half = 0.5 * math.pi
    return half * torch.sin(half * t) / (1.0 - torch.cos(half * t))


def time_of_mask_ratio(ratio: torch.Tensor, schedule: str) -> torch.Tensor:
    """Inverse of :func:`mask_probability`: the t at which the expected masked fraction is ``ratio``."""
    ratio = ratio.clamp(1e-6, 1.0)
    if schedule == "linear":
        return ratio
    return torch.arccos(1.0 - ratio) / (0.5 * math.pi)


@dataclass
class Noise:
    """One draw of the forward process for a batch."""

    t: torch.Tensor  # [B] float
    mask: torch.Tensor  # [B, T] bool: masked positions (the loss positions)
    noisy: torch.Tensor  # [B, T] int64: tokens with [MASK] at ``mask``
    maskable: torch.Tensor  # [B, T] bool


def maskable_positions(
    tokens: torch.Tensor, pad_id: int, prompt_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T] bool: non-pad tokens, minus the prompt in SFT (prompt_mask True = prompt)."""
    maskable = tokens != pad_id
    if prompt_mask is not None:
        maskable &= ~prompt_mask
    return maskable


def draw_noise(
    tokens: torch.Tensor,
    maskable: torch.Tensor,
    cfg: ObjectiveConfig,
    mask_id: int,
    generator: torch.Generator,
    t: torch.Tensor | None = None,
) -> Noise:
    """Sample ``t`` (unless given) and the anchor mask; tokens/maskable are [B, T]."""
    B, T = tokens.shape
    if t is None:
        t = cfg.eps + (1.0 - cfg.eps) * torch.rand(B, generator=generator, device=tokens.device)
    p = mask_probability(t, cfg.schedule)
    mask = (torch.rand(B, T, generator=generator, device=tokens.device) < p[:, None]) & maskable
    return Noise(t=t, mask=mask, noisy=torch.where(mask, mask_id, tokens), maskable=maskable)

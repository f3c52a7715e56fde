"""The masked-diffusion (MDLM) objective: noise schedule, masking, and the weighted loss.

Spec (shared/spec/MEMDLM.md section 1), as numbered steps:

1. draw ``t ~ U(eps, 1)`` per sequence (``eps = 1e-3``);
2. mask each *maskable* token with probability ``1 - alpha(t)`` (``= t`` for the linear
   schedule); pretraining: every non-pad token is maskable; SFT: the prompt never is;
3. cross-entropy of the clean token at masked positions only, weighted by
   ``w(t) = -alpha'(t) / (1 - alpha(t))`` (``1/t`` linear), summed and divided by the number of
   maskable tokens in the (global) batch ("token" normalisation).

Everything is vectorised on the device: no per-sample Python loops, no ``.item()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from pipeline.config import ConfigError


@dataclass
class ObjectiveConfig:
    schedule: Literal["linear", "cosine"] = "linear"
    weighting: Literal["elbo", "uniform"] = "elbo"  # elbo: w(t) = -alpha'(t) / (1 - alpha(t))
    # token: / maskable tokens of the global batch; sequence: mean over sequences of their
    # per-maskable-token loss; batch: / number of sequences.
    normalization: Literal["token", "sequence", "batch"] = "token"
    eps: float = 1e-3
    mode: Literal["pretrain", "sft"] = "pretrain"

    def validate(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"key 'objective.eps': got {self.eps}, expected 0 < eps < 1")


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


def position_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N] (float32) of vocab-parallel logits [N, V/tp] against targets [N]."""
    return vocab_parallel_cross_entropy(logits.float(), targets)


def global_count(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of a count tensor over ``group`` (a data-parallel group), as float; local if None."""
    x = x.float()
    if group is not None and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
    return x


def weight_by_sequence(
    per_position: torch.Tensor, positions: torch.Tensor, seq_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position losses [N] (row-major over ``positions`` [B, T]) times their sequence's weight
    [B]; also returns each position's sequence index [N]."""
    B = positions.shape[0]
    seq_of = torch.arange(B, device=positions.device).unsqueeze(1).expand_as(positions)[positions]
    return per_position * seq_weight[seq_of], seq_of


def sum_by_sequence(values: torch.Tensor, seq_of: torch.Tensor, batch: int) -> torch.Tensor:
    """Sum values [N] into their sequences: [batch]."""
    return torch.zeros(batch, device=values.device, dtype=values.dtype).index_add(0, seq_of, values)


def weighted_loss(
    per_position: torch.Tensor,
    positions: torch.Tensor,
    seq_weight: torch.Tensor,
    maskable: torch.Tensor,
    normalization: str,
    dp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Reduce per-position losses [N] (row-major over ``positions`` [B, T]) to the MDLM loss.

    With ``token`` normalisation and a data-parallel group, the divisor is the global maskable
    count divided by the DP size, so the DP-mean of this loss (what gradient averaging
    computes) equals the single-process loss of the global batch.
    """
    B = positions.shape[0]
    weighted, seq_of = weight_by_sequence(per_position, positions, seq_weight)
    if normalization == "token":
        denom = global_count(maskable.sum(), dp_group)
        if dp_group is not None:
            denom = denom / dist.get_world_size(dp_group)
        return weighted.sum() / denom.clamp(min=1.0)
    if normalization == "sequence":
        return (sum_by_sequence(weighted, seq_of, B) / maskable.sum(1).clamp(min=1)).mean()
    return weighted.sum() / B


def mdlm_loss(
    model_forward,
    tokens: torch.Tensor,
    noise: Noise,
    cfg: ObjectiveConfig,
    dp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The MDLM loss of one batch: forward the noisy tokens, CE at masked positions only.

    ``model_forward(tokens=..., positions=...)`` returns vocab-parallel logits [N, V/tp] at
    the N masked positions (the model, or a DeepSpeed engine wrapping it).
    """
    logits = model_forward(tokens=noise.noisy, positions=noise.mask)
    ce = position_ce(logits, tokens[noise.mask])
    w = loss_weight(noise.t, cfg.schedule, cfg.weighting)
    return weighted_loss(ce, noise.mask, w, noise.maskable, cfg.normalization, dp_group)

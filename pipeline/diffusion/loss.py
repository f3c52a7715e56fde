"""Step 3 of the forward process' objective (docs/method.md section 1): cross-entropy of the clean
token at masked positions only, weighted per sequence, summed and divided by the number of maskable
tokens of the *global* batch ("token" normalisation; "sequence" and "batch" are the alternatives).
The per-position losses come from vocab-parallel logits (megatron's cross-entropy over TP ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.noise import Noise, loss_weight


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

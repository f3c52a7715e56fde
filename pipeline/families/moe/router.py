"""The router: which experts each token goes to, with what weight, and the balancing losses.

    routing = Routing(*router(x))                # x [N, D]
    routing.experts [N, k], routing.weights [N, k], routing.logits [N, E]
    stats = routing_stats(routing, cfg)          # counts, load-balance and z losses, entropy

Scores are computed in fp32 (fp64 for a float64 model) whatever the training precision: a bf16
softmax over hundreds of experts reorders near-ties and changes the choice. The score-correction
bias (auxiliary-loss-free balancing) enters the *choice* only, never the weights (unless
``score_bias_in_weights``: LLaDA-MoE's layout), and moves outside the gradient
(:func:`update_score_bias`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.families.moe.config import MoEConfig


@dataclass
class Routing:
    experts: torch.Tensor  # [N, k] int64, the chosen experts of each token
    weights: torch.Tensor  # [N, k] their weights (fp32 / fp64)
    logits: torch.Tensor  # [N, E] router logits (fp32 / fp64)
    scores: torch.Tensor  # [N, E] softmax or sigmoid of the logits


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def limit_groups(choice: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Group-limited routing: ``choice`` [N, E] with the experts outside each token's
    ``topk_group`` best groups set to -inf (a group's score: the sum of its top two, or its max)."""
    N, E = choice.shape
    G = cfg.n_group
    grouped = choice.view(N, G, E // G)
    if cfg.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        group_scores = grouped.amax(-1)
    keep = torch.zeros(N, G, dtype=torch.bool, device=choice.device)
    keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
    return choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))


class Router(nn.Module):
    """Linear router ``weight`` [E, D] (replicated on every rank) and, with ``score_bias``, the
    balancing bias buffer ``score_bias`` [E] (fp32, persistent: it is part of the model)."""

    def __init__(self, cfg: MoEConfig, init: Callable[[torch.Tensor], object], dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, dtype=dtype))
        init(self.weight)
        if cfg.score_bias:
            self.register_buffer("score_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        else:
            self.score_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> the routing of its N tokens as the fields of :class:`Routing` (a tuple:
        ZeRO-3 re-gathers the weight for backward through hooks on the output *tensors* it finds
        in a tuple, not in a dataclass)."""
        cfg, dt = self.cfg, _score_dtype(x)
        logits = F.linear(x.to(dt), self.weight.to(dt))
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        biased = scores if self.score_bias is None else scores + self.score_bias.to(dt)
        choice = limit_groups(biased.detach(), cfg) if cfg.n_group > 1 else biased.detach()
        experts = choice.topk(cfg.top_k, dim=-1).indices
        weights = (biased if cfg.score_bias_in_weights else scores).gather(1, experts)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * cfg.routed_scaling_factor, logits, scores


@dataclass
class RoutingStats:
    """One MoE layer's routing of one batch of N tokens."""

    counts: torch.Tensor  # [E] float: how many of the N * k choices picked each expert
    aux: torch.Tensor  # load-balance loss (differentiable; k when the routing is uniform)
    z: torch.Tensor  # router z-loss (differentiable)
    entropy: torch.Tensor  # mean entropy of the routing distribution (nats, detached)
    tokens: int  # N
    processed: int = 0  # rows the experts computed for these tokens (all EP ranks; N * k: dropless)


def routing_stats(routing: Routing, cfg: MoEConfig) -> RoutingStats:
    """Balancing statistics: load balance ``E * sum_e (count_e / N) * P_e`` with ``P_e`` the mean
    routing probability of expert e (p: the scores normalised over the experts: the softmax itself,
    or sigmoid scores divided by their sum), z-loss ``mean(logsumexp(logits)^2)``."""
    N, E = routing.logits.shape
    counts = torch.bincount(routing.experts.reshape(-1), minlength=E).to(routing.scores.dtype)
    p = (
        routing.scores
        if cfg.score_func == "softmax"
        else routing.scores / routing.scores.sum(-1, keepdim=True)
    )
    aux = E * (counts / max(N, 1) * p.mean(0)).sum()
    z = torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1).mean().detach()
    return RoutingStats(counts, aux, z, entropy, N)


@torch.no_grad()
def update_score_bias(router: Router, counts: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing: ``bias += rate * sign(mean(counts) - counts)``, with
    ``counts`` [E] the step's choices per expert over the whole global batch (the same on every
    rank, so every rank's bias stays the same)."""
    if router.score_bias is None:
        return
    c = counts.to(router.score_bias)
    router.score_bias.add_(rate * torch.sign(c.mean() - c))

"""Building blocks every model family shares: RMSNorm, q/k norms, rotary embeddings, the vocab-parallel
LM head.

    cos, sin = model_rope_tables(cfg)               # [seq_len, rotary_dim / 2] each
    q = apply_rope(q, cos, sin)                      # q [B, H, T, hd]: the first rotary_dim dims turn
    q_norm = QKNorm("head", heads_local, hd, eps, tp_group, tp)   # q [B, T, heads_local, hd]
    head = VocabHead(cfg.vocab_size, d, V_pad, tp_rank=dims.tp_rank, tp_size=dims.tp, config=mp, ...)

Logits of the padded vocabulary rows (``vocab_size..V_pad``) come out as ``PAD_LOGIT``, so no
softmax, loss or sampler ever gives them mass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from torch import nn

from pipeline.model.config import ModelConfig

LayerFast = Mapping[str, torch.Tensor] | None  # "gate.A", "gate.B", ... for one layer

# The logit of a padded vocabulary row. Finite, so p * log p is 0 rather than NaN; a power of two,
# so bf16 and fp32 hold it exactly (the same value at every precision); exp() of it is 0.
PAD_LOGIT = -(2.0**100)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or fp64 when it is fp64 (a float64 model's norms stay float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * _at_least_fp32(self.weight)).to(x.dtype)


class QKNorm(RMSNorm):
    """RMSNorm of this rank's query (or key) heads x [B, T, heads_local, hd] (fp32 compute).

    ``"head"``: over each head's hd, one weight [hd] shared by all heads and replicated over TP;
    its gradient is summed over the TP ranks (each holds other heads), so every rank's copy gets
    the full gradient. ``"full"``: over all heads of the projection (heads * hd, the sum of squares
    summed over TP in forward and backward); the weight [heads * hd] is split over TP like the heads.
    """

    def __init__(
        self, mode: str, heads_local: int, head_size: int, eps: float, tp_group: dist.ProcessGroup, tp: int
    ):
        super().__init__(head_size if mode == "head" else heads_local * head_size, eps)
        self.mode, self.tp_group, self.tp = mode, tp_group, tp
        self.full_size = heads_local * head_size * tp  # the width "full" normalises over
        if mode == "full":  # TP-split along dim 0, like the heads (exports and universal checkpoints)
            set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        if self.mode == "head":
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            w = (
                self.weight
                if self.tp == 1
                else copy_to_tensor_model_parallel_region(self.weight, self.tp_group)
            )
            return (out * _at_least_fp32(w)).to(x.dtype)
        flat = xf.flatten(-2)  # [B, T, heads_local * hd]
        sq = flat.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            # All-reduce in forward AND backward: every rank's local heads depend on the global sum,
            # so each rank's share of it needs the gradient from all ranks.
            sq = copy_to_tensor_model_parallel_region(
                reduce_from_tensor_model_parallel_region(sq, self.tp_group), self.tp_group
            )
        out = flat * torch.rsqrt(sq / self.full_size + self.eps) * _at_least_fp32(self.weight)
        return out.view(xf.shape).to(x.dtype)


def rope_tables(
    seq_len: int,
    rotary_dim: int,
    theta: float,
    cfg: ModelConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, rotary_dim/2] for rotary embeddings (scaled as ``cfg`` says).

    Frequency j is theta^(-2j / rotary_dim), over the rotated width only (transformers' default
    RoPE with ``partial_rotary_factor``)."""
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    if cfg is not None and cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg is not None and cfg.rope_scaling == "llama3":
        inv = _llama3_frequencies(inv, cfg)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _llama3_frequencies(inv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1 scaling (transformers' ``_compute_llama3_parameters``): wavelengths longer than
    original_max_len / low_freq_factor are stretched by rope_factor, shorter than
    original_max_len / high_freq_factor kept, and the band between interpolated."""
    old, lo, hi, factor = (
        cfg.rope_original_max_len,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_factor,
    )
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, scaled)


def model_rope_tables(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin tables [seq_len, rotary_dim / 2] a model of ``cfg`` uses."""
    return rope_tables(cfg.seq_len, cfg.rotary_dim, cfg.rope_theta, cfg, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]: its first rotary_dim = 2 * cos.shape[-1] dims rotated pairwise (first half,
    second half of that part: dims j and j + rotary_dim/2) by position; the rest pass through
    (transformers' ``rotate_half`` on ``q[..., :rotary_dim]``)."""
    T, half = x.shape[-2], cos.shape[-1]
    c, s = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = (x1 * c - x2 * s, x1 * s + x2 * c)
    if 2 * half == x.shape[-1]:
        return torch.cat(rotated, dim=-1)
    return torch.cat((*rotated, x[..., 2 * half :]), dim=-1)


class VocabHead(ColumnParallelLinear):
    """The column-parallel LM head; logits of padded vocabulary rows come out as ``PAD_LOGIT``.

    The mask lives in the module, not in ``head_logits``, so every caller of ``model.head``
    (the memory inner loop calls it directly) sees the same softmax.
    """

    def __init__(self, vocab_size: int, *args, tp_rank: int = 0, tp_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = vocab_size
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        """x [..., D] -> (logits [..., V_pad/tp] of this rank's vocabulary shard, None)."""
        logits, bias = super().forward(x, weight, runtime_gather_output)
        per = self.output_size_per_partition
        if per * self.tp_size == self.vocab_size:
            return logits, bias
        cols = torch.arange(self.tp_rank * per, (self.tp_rank + 1) * per, device=logits.device)
        return logits.masked_fill(cols >= self.vocab_size, PAD_LOGIT), bias

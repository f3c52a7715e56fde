"""Building blocks every model family shares: RMSNorm, rotary embeddings, the vocab-parallel LM head.

    cos, sin = model_rope_tables(cfg)               # [seq_len, head_dim / 2] each
    q = apply_rope(q, cos, sin)                      # q [B, H, T, hd]
    head = VocabHead(cfg.vocab_size, d, V_pad, tp_rank=dims.tp_rank, tp_size=dims.tp, config=mp, ...)

Logits of the padded vocabulary rows (``vocab_size..V_pad``) come out as ``PAD_LOGIT``, so no
softmax, loss or sampler ever gives them mass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import nn

from pipeline.model.config import ModelConfig

LayerFast = Mapping[str, torch.Tensor] | None  # "gate.A", "gate.B", ... for one layer

# The logit of a padded vocabulary row. Finite, so p * log p is 0 rather than NaN; a power of two,
# so bf16 and fp32 hold it exactly (the same value at every precision); exp() of it is 0.
PAD_LOGIT = -(2.0**100)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, cfg: ModelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] for rotary embeddings (scaled as ``cfg`` says)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if cfg is not None and cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg is not None and cfg.rope_scaling == "llama3":
        inv = _llama3_frequencies(inv, cfg)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


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


def model_rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin tables a model of ``cfg`` uses."""
    return rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta, cfg)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated pairwise (first half, second half) by position."""
    T = x.shape[-2]
    c, s = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


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

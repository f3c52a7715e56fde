"""The bidirectional DLM transformer on megatron-core tensor-parallel layers.

    model = DLMTransformer(ModelConfig())           # after pipeline.model.parallel.init_distributed(tp)
    h = model.embed(tokens)                          # [B, T, D]
    h = model.run_layers(h, 0, model.cfg.n_layers)   # bidirectional blocks (fast weights optional)
    logits = model.head_logits(h, positions)         # [N, V_pad / tp] only where the loss needs them

Token embedding (VocabParallelEmbedding), RoPE, RMSNorm, non-causal self-attention (QKV
column-parallel, output row-parallel), SwiGLU FFN (gate/up column-parallel, down
row-parallel), final RMSNorm and a column-parallel LM head. The same code runs at TP=1 and
TP=N; with ``use_cpu_initialization`` the weights are identical across TP sizes.

Weight deltas (MemDLM's fast weights) are forward *arguments* (a mapping ``target -> tensors``
per layer, applied by pipeline/model/delta.py), never parameters: ZeRO-3 would partition them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.config import ModelConfig
from pipeline.model.delta import delta_linear
from pipeline.model.parallel import tp_size

LayerFast = Mapping[str, torch.Tensor] | None  # "gate.A", "gate.B", ... for one layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] for rotary embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated pairwise (first half, second half) by position."""
    T = x.shape[-2]
    c, s = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)); x + SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = tp_size()
        self.n_local_heads = cfg.n_heads // tp
        self.head_dim = cfg.head_dim
        init = functools.partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        # Residual-branch outputs are scaled down with depth (GPT-2 / Megatron convention).
        init_out = functools.partial(
            nn.init.normal_, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers)
        )
        d, f = cfg.d_model, cfg.ffn_hidden
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        # QKV rows are laid out [head][q|k|v][head_dim] so a contiguous TP shard holds whole heads.
        self.qkv = ColumnParallelLinear(
            d, 3 * d, config=mp, init_method=init, bias=False, gather_output=False
        )
        self.out = RowParallelLinear(
            d, d, config=mp, init_method=init_out, bias=False, input_is_parallel=True, skip_bias_add=False
        )
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.gate = ColumnParallelLinear(d, f, config=mp, init_method=init, bias=False, gather_output=False)
        self.up = ColumnParallelLinear(d, f, config=mp, init_method=init, bias=False, gather_output=False)
        self.down = RowParallelLinear(
            f, d, config=mp, init_method=init_out, bias=False, input_is_parallel=True, skip_bias_add=False
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        fast: LayerFast = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; ``fast`` holds this layer's fast-weight tensors (or None).

        ``attn_mask`` [B, 1, 1, T] bool (True = may be attended to) hides padding keys.
        """
        B, T, _ = x.shape
        h = self.attn_norm(x)
        qkv = delta_linear(self.qkv, h, fast, "qkv").view(B, T, self.n_local_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [B, H_local, T, hd]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Bidirectional: no causal mask; only padding keys (batched inference) are hidden.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        a = a.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)
        x = x + delta_linear(self.out, a, fast, "out")
        h = self.ffn_norm(x)
        g = delta_linear(self.gate, h, fast, "gate")
        u = delta_linear(self.up, h, fast, "up")
        return x + delta_linear(self.down, F.silu(g) * u, fast, "down")


class DLMTransformer(nn.Module):
    """Bidirectional transformer for masked diffusion; see the module docstring for the API."""

    def __init__(self, cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg.check_tp(tp_size())
        self.cfg = cfg
        mp = ModelParallelConfig(
            tensor_model_parallel_size=tp_size(),
            use_cpu_initialization=True,  # full master weights initialised then split: TP-size invariant
            perform_initialization=True,
            params_dtype=params_dtype,
        )
        init = functools.partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        V = cfg.padded_vocab_size
        self.embedding = VocabParallelEmbedding(V, cfg.d_model, init_method=init, config=mp)
        self.layers = nn.ModuleList(Block(cfg, mp) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = ColumnParallelLinear(
            cfg.d_model, V, config=mp, init_method=init, bias=False, gather_output=False
        )
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] int64 -> hidden [B, T, D]."""
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model seq_len {self.cfg.seq_len}")
        return self.embedding(tokens)

    def run_layers(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        fast: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        checkpoint_layers: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply blocks ``start..end-1`` to h [B, T, D]; ``fast[i]`` are layer i's fast weights.

        With ``checkpoint_layers`` each block is recomputed in backward (non-reentrant); its
        fast weights are passed as explicit arguments so the recompute sees the same values.
        ``key_mask`` [B, T] bool marks real tokens; False positions (padding of a batch of
        prompts of different lengths) are never attended to, so a padded row computes what
        the unpadded sequence would.
        """
        rope = (self.rope_cos, self.rope_sin)
        attn = None if key_mask is None else key_mask[:, None, None, :]
        for i in range(start, end):
            layer_fast = None if fast is None else fast.get(i)
            if checkpoint_layers and torch.is_grad_enabled():
                keys = tuple(layer_fast) if layer_fast else ()
                vals = tuple(layer_fast[k] for k in keys) if layer_fast else ()
                h = checkpoint(_block_call, self.layers[i], h, rope, attn, keys, *vals, use_reentrant=False)
            else:
                h = self.layers[i](h, rope, layer_fast, attn)
        return h

    def head_logits(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head. h [B, T, D]; positions: bool [B, T] or None (all).

        Returns vocab-parallel logits [N, V_pad / tp] for the N selected positions (row-major
        order), or [B, T, V_pad / tp] when positions is None. Computing the head only where the
        loss needs it saves most of its cost at real vocabulary sizes.
        """
        if positions is not None:
            h = h[positions]
        logits, _ = self.head(self.final_norm(h))
        return logits

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        start_layer: int = 0,
        end_layer: int | None = None,
        fast: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        positions: torch.Tensor | None = None,
        checkpoint_layers: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start_layer..end_layer-1`` from ``tokens`` [B, T] or a ``hidden`` [B, T, D].

        Returns the hidden state [B, T, D] when stopping before the last block, otherwise the
        vocab-parallel logits at ``positions`` ([N, V_pad/tp], or [B, T, V_pad/tp] if None).
        One entry point, so a DeepSpeed engine can wrap any part of the pass. ``key_mask``
        [B, T] bool hides padding keys (see ``run_layers``).
        """
        end = self.cfg.n_layers if end_layer is None else end_layer
        if hidden is None:
            if tokens is None or start_layer != 0:
                raise ValueError("forward needs tokens (start_layer=0) or a hidden state")
            hidden = self.embed(tokens)
        h = self.run_layers(hidden, start_layer, end, fast, checkpoint_layers, key_mask)
        return self.head_logits(h, positions) if end == self.cfg.n_layers else h


def _block_call(
    block: Block,
    h: torch.Tensor,
    rope,
    attn: torch.Tensor | None,
    keys: tuple[str, ...],
    *vals: torch.Tensor,
) -> torch.Tensor:
    return block(h, rope, dict(zip(keys, vals, strict=True)) if keys else None, attn)

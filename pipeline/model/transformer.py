"""The bidirectional DLM transformer on megatron-core tensor-parallel layers.

    model = DLMTransformer(ModelConfig())           # after pipeline.model.parallel.init_distributed(tp)
    h = model.embed(tokens)                          # [B, T, D]
    h = model.run_layers(h, 0, model.cfg.n_layers)   # bidirectional blocks (fast weights optional)
    logits = model.head_logits(h, positions)         # [N, V_pad / tp] only where the loss needs them

Token embedding (VocabParallelEmbedding), RoPE, RMSNorm, non-causal self-attention (QKV
column-parallel, output row-parallel), SwiGLU FFN (gate/up column-parallel, down
row-parallel), final RMSNorm and a column-parallel LM head. The same code runs at TP=1 and
TP=N; with ``use_cpu_initialization`` the weights are identical across TP sizes.

Options (pipeline/model/config.py): grouped-query attention, Q/K/V biases, RoPE scaling, a head
tied to the embedding. Logits of the padded vocabulary rows (``vocab_size..V_pad``) are set to
the dtype's minimum, so no softmax, loss or sampler ever gives them mass.

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
from pipeline.model.parallel import tp_rank, tp_size

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

    def __init__(self, vocab_size: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        """x [..., D] -> (logits [..., V_pad/tp] of this rank's vocabulary shard, None)."""
        logits, bias = super().forward(x, weight, runtime_gather_output)
        per = self.output_size_per_partition
        if per * tp_size() == self.vocab_size:
            return logits, bias
        cols = torch.arange(tp_rank() * per, (tp_rank() + 1) * per, device=logits.device)
        return logits.masked_fill(cols >= self.vocab_size, PAD_LOGIT), bias


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)); x + SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = tp_size()
        self.n_local_heads = cfg.n_heads // tp
        self.n_local_kv = cfg.kv_heads // tp
        self.group = cfg.n_heads // cfg.kv_heads  # query heads per key/value head
        self.head_dim = cfg.head_dim
        init = functools.partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        # Residual-branch outputs are scaled down with depth (GPT-2 / Megatron convention).
        init_out = functools.partial(
            nn.init.normal_, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers)
        )
        d, f = cfg.d_model, cfg.ffn_hidden
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        # QKV rows are laid out [kv group][q_1..q_group|k|v][head_dim] so a contiguous TP shard holds
        # whole groups (with n_kv_heads = n_heads: [head][q|k|v][head_dim]). The bias, when
        # present, has the same layout and is sharded with the rows.
        self.qkv = ColumnParallelLinear(
            d, cfg.qkv_size, config=mp, init_method=init, bias=cfg.qkv_bias, gather_output=False
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
        # Outer LoRA adapters by projection name (pipeline/model/lora.py:add_lora), or None.
        self.lora: nn.ModuleDict | None = None

    def _linear(self, name: str, x: torch.Tensor, fast: LayerFast) -> torch.Tensor:
        """Projection ``name`` with its fast-weight delta (if any) plus its outer LoRA (if any): both
        are additive low-rank terms on the output, so the memory adapts the effective weight."""
        y = delta_linear(getattr(self, name), x, fast, name)
        if self.lora is not None and name in self.lora:
            y = y + self.lora[name](x)
        return y

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
        g = self.group
        qkv = self._linear("qkv", h, fast).view(B, T, self.n_local_kv, g + 2, self.head_dim)
        # Query head j of group i is head i * group + j: the order transformers' repeat_kv assumes.
        q = qkv[:, :, :, :g].reshape(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        k, v = (qkv[:, :, :, g + i].transpose(1, 2) for i in range(2))  # [B, KV_local, T, hd]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Bidirectional: no causal mask; only padding keys (batched inference) are hidden.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False, enable_gqa=g > 1)
        a = a.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)
        x = x + self._linear("out", a, fast)
        h = self.ffn_norm(x)
        gt = self._linear("gate", h, fast)
        u = self._linear("up", h, fast)
        return x + self._linear("down", F.silu(gt) * u, fast)


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
        self.head = VocabHead(
            cfg.vocab_size,
            cfg.d_model,
            V,
            config=mp,
            init_method=init,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=cfg.tie_embeddings,
        )
        if cfg.tie_embeddings:
            # One Parameter registered in both modules: the embedding's vocab shard [V/tp, D] is
            # exactly the head's column shard, and named_parameters() lists it once.
            self.head.weight = self.embedding.weight
        cos, sin = model_rope_tables(cfg)
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

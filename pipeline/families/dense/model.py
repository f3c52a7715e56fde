"""The dense family's model: a bidirectional transformer on megatron-core tensor-parallel layers.

    model = DLMTransformer(cfg, dims)                # dims from pipeline.parallel.dims.init_distributed
    h = model.embed(tokens)                          # [B, T, D]
    h = model.run_layers(h, 0, model.cfg.n_layers)   # bidirectional blocks (fast weights optional)
    logits = model.head_logits(h, positions)         # [N, V_pad / tp] only where the loss needs them

Token embedding (VocabParallelEmbedding), RoPE, RMSNorm, non-causal self-attention (QKV
column-parallel, output row-parallel), SwiGLU FFN (gate/up column-parallel, down
row-parallel), final RMSNorm and a column-parallel LM head. The same code runs at TP=1 and
TP=N; with ``use_cpu_initialization`` the weights are identical across TP sizes.

Options (pipeline/model/config.py): grouped-query attention, Q/K/V biases, an explicit head size,
q/k RMSNorm (per head or over the whole projection), partial RoPE, RoPE scaling, a head tied to
the embedding.

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

from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.delta import delta_linear
from pipeline.model.layers import LayerFast, QKNorm, RMSNorm, VocabHead, apply_rope, model_rope_tables
from pipeline.parallel.dims import ParallelDims


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """The dimensions tensor parallelism splits must divide by ``tp`` (a ConfigError naming one)."""
    for name, value in (
        ("n_heads", cfg.n_heads),
        ("n_kv_heads", cfg.kv_heads),
        ("ffn_hidden", cfg.ffn_hidden),
        ("padded vocab", cfg.padded_vocab_size),
    ):
        if value % tp:
            raise ConfigError(f"model {name}={value} is not divisible by tensor parallel size {tp}")


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)); x + SwiGLU(norm(x)).

    A family with another FFN (a mixture of experts, a plain MLP) subclasses it and overrides
    :meth:`build_ffn` and :meth:`ffn`; the attention half is shared."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, dims: ParallelDims):
        super().__init__()
        tp = dims.tp
        self.n_local_heads = cfg.n_heads // tp
        self.n_local_kv = cfg.kv_heads // tp
        self.group = cfg.n_heads // cfg.kv_heads  # query heads per key/value head
        self.head_dim = cfg.head_size
        self.init = functools.partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        # Residual-branch outputs are scaled down with depth (GPT-2 / Megatron convention).
        self.init_out = functools.partial(
            nn.init.normal_, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers)
        )
        d, group = cfg.d_model, dims.tp_group
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        # QKV rows are laid out [kv group][q_1..q_group|k|v][head_size] so a contiguous TP shard holds
        # whole groups (with n_kv_heads = n_heads: [head][q|k|v][head_size]). The bias, when
        # present, has the same layout and is sharded with the rows.
        self.qkv = ColumnParallelLinear(
            d,
            cfg.qkv_size,
            config=mp,
            init_method=self.init,
            bias=cfg.qkv_bias,
            gather_output=False,
            tp_group=group,
        )
        self.out = row_linear(cfg.n_heads * cfg.head_size, d, mp, self.init_out, group)
        self.q_norm: QKNorm | None = None  # RMSNorm of q and k before RoPE (qk_norm)
        self.k_norm: QKNorm | None = None
        if cfg.qk_norm != "none":
            args = (cfg.head_size, cfg.norm_eps, group, tp)
            self.q_norm = QKNorm(cfg.qk_norm, self.n_local_heads, *args)
            self.k_norm = QKNorm(cfg.qk_norm, self.n_local_kv, *args)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.build_ffn(cfg, mp, dims)
        # Outer LoRA adapters by projection name (pipeline/adapters/lora.py:add_lora), or None.
        self.lora: nn.ModuleDict | None = None

    def build_ffn(self, cfg: ModelConfig, mp: ModelParallelConfig, dims: ParallelDims) -> None:
        """The SwiGLU FFN: gate and up column-parallel, down row-parallel."""
        d, f, group = cfg.d_model, cfg.ffn_hidden, dims.tp_group
        self.gate = column_linear(d, f, mp, self.init, group)
        self.up = column_linear(d, f, mp, self.init, group)
        self.down = row_linear(f, d, mp, self.init_out, group)

    def ffn(self, h: torch.Tensor, fast: LayerFast) -> torch.Tensor:
        """h [B, T, D] (normed) -> [B, T, D]: down(silu(gate h) * up h)."""
        return self._linear("down", F.silu(self._linear("gate", h, fast)) * self._linear("up", h, fast), fast)

    def _linear(self, name: str, x: torch.Tensor, fast: LayerFast) -> torch.Tensor:
        """Projection ``name`` with its fast-weight delta (if any) plus its outer LoRA (if any): both
        are additive low-rank terms on the output, so the memory adapts the effective weight."""
        y = delta_linear(getattr(self, name), x, fast, name)
        if self.lora is not None and name in self.lora:
            y = y + self.lora[name](x)
        return y

    def attention(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        fast: LayerFast,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """h [B, T, D] (normed) -> the attention output [B, T, D] (after the output projection)."""
        B, T, _ = h.shape
        g = self.group
        qkv = self._linear("qkv", h, fast).view(B, T, self.n_local_kv, g + 2, self.head_dim)
        # Query head j of group i is head i * group + j: the order transformers' repeat_kv assumes.
        q = qkv[:, :, :, :g].reshape(B, T, self.n_local_heads, self.head_dim)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # [B, T, KV_local, hd]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Bidirectional: no causal mask; only padding keys (batched inference) are hidden.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False, enable_gqa=g > 1)
        return self._linear("out", a.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim), fast)

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
        x = x + self.attention(self.attn_norm(x), rope, fast, attn_mask)
        return x + self.ffn(self.ffn_norm(x), fast)


def column_linear(
    d_in: int, d_out: int, mp: ModelParallelConfig, init, group, bias: bool = False
) -> ColumnParallelLinear:
    """A column-parallel projection (output rows split over TP), output kept sharded."""
    return ColumnParallelLinear(
        d_in, d_out, config=mp, init_method=init, bias=bias, gather_output=False, tp_group=group
    )


def row_linear(d_in: int, d_out: int, mp: ModelParallelConfig, init, group) -> RowParallelLinear:
    """A row-parallel projection (input columns split over TP), output summed over TP."""
    return RowParallelLinear(
        d_in,
        d_out,
        config=mp,
        init_method=init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=group,
    )


class DLMTransformer(nn.Module):
    """Bidirectional transformer for masked diffusion; see the module docstring for the API.

    ``block_class`` builds each layer (:meth:`make_block`): a family whose layers differ only
    inside the block subclasses this model and names its own block class."""

    block_class: type[Block] = Block

    def __init__(self, cfg: ModelConfig, dims: ParallelDims, *, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_tp(cfg, dims.tp)
        self.cfg, self.dims = cfg, dims
        mp = ModelParallelConfig(
            tensor_model_parallel_size=dims.tp,
            use_cpu_initialization=True,  # full master weights initialised then split: TP-size invariant
            perform_initialization=True,
            params_dtype=params_dtype,
        )
        init = functools.partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        V = cfg.padded_vocab_size
        self.embedding = VocabParallelEmbedding(
            V, cfg.d_model, init_method=init, config=mp, tp_group=dims.tp_group
        )
        self.layers = nn.ModuleList(self.make_block(cfg, mp, dims, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = VocabHead(
            cfg.vocab_size,
            cfg.d_model,
            V,
            tp_rank=dims.tp_rank,
            tp_size=dims.tp,
            config=mp,
            init_method=init,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=cfg.tie_embeddings,
            tp_group=dims.tp_group,
        )
        if cfg.tie_embeddings:
            # One Parameter registered in both modules: the embedding's vocab shard [V/tp, D] is
            # exactly the head's column shard, and named_parameters() lists it once.
            self.head.weight = self.embedding.weight
        # fp32 tables (float64 for a float64 model: the reference tests compare at 1e-10)
        cos, sin = model_rope_tables(cfg, torch.float64 if params_dtype == torch.float64 else torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def make_block(self, cfg: ModelConfig, mp: ModelParallelConfig, dims: ParallelDims, index: int) -> Block:
        """Layer ``index``: a ``block_class``; a family whose layers differ by depth (dense layers
        before mixture-of-experts ones) overrides it."""
        return self.block_class(cfg, mp, dims)

    def load_full_state(self, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Take a full TP=1 state dict (an export's) as this model's weights; the model may have been
        built on the meta device. The shared embedding/head weight is stored once, under the
        embedding's name, and shared again; the RoPE tables are computed on ``device``."""
        if self.cfg.tie_embeddings:  # state_dict() lists the shared weight under both names
            state = {**state, "head.weight": state["embedding.weight"]}
        self.load_state_dict(state, assign=True, strict=True)
        if self.cfg.tie_embeddings:  # assign=True replaced the embedding's Parameter: share it again
            self.head.weight = self.embedding.weight
        self.rope_cos, self.rope_sin = (t.to(device) for t in model_rope_tables(self.cfg))

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Losses the model adds to the training loss of the forward passes since the last call
        (a mixture of experts' balancing losses); None: none (this family)."""
        return None

    def end_step(self, dp_group, applied: bool) -> dict[str, float]:
        """After each optimizer step (``applied``: not voided): the model's own updates outside
        the gradient and metrics; nothing for this family."""
        return {}

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

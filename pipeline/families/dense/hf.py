"""The dense family's Hugging Face layouts: LLaMA, Qwen2 (and Dream), Qwen3, LLaDA.

Per layer, our name <- the layout's (LLaMA, Qwen2 and Qwen3 share names; Qwen2 adds Q/K/V biases,
Qwen3 per-head q/k RMSNorms and an explicit head_dim)::

    embedding.weight        <- model.embed_tokens.weight        | model.transformer.wte.weight
    layers.{i}.attn_norm    <- model.layers.{i}.input_layernorm | ...blocks.{i}.attn_norm
    layers.{i}.qkv          <- self_attn.q_proj, k_proj, v_proj  | q_proj, k_proj, v_proj (fused per KV group)
    layers.{i}.q_norm       <- self_attn.q_norm (Qwen3: [head_dim], applied per head before RoPE)
    layers.{i}.k_norm       <- self_attn.k_norm
    layers.{i}.out          <- self_attn.o_proj                  | attn_out
    layers.{i}.ffn_norm     <- post_attention_layernorm          | ff_norm
    layers.{i}.gate         <- mlp.gate_proj                     | ff_proj (SiLU applies to it)
    layers.{i}.up           <- mlp.up_proj                       | up_proj
    layers.{i}.down         <- mlp.down_proj                     | ff_out
    final_norm.weight       <- model.norm.weight                 | model.transformer.ln_f.weight
    head.weight             <- lm_head.weight                    | model.transformer.ff_out.weight

The LLaDA names and config keys were read from ``modeling_llada.py`` as published with the GSAI-ML
checkpoints (``LLaDALlamaBlock``: ``x, x_up = self.ff_proj(x), self.up_proj(x); x = self.act(x) *
x_up; self.ff_out(x)``) and a published LLaDA-format ``config.json``; they agree with four
independent tools that read those checkpoints. LLaMA, Qwen2 and LLaDA all rotate (first half,
second half) pairs, as our ``apply_rope`` does, so q/k rows are copied without permutation. Our
QKV rows are laid out per KV group ``[q_1..q_g | k | v]`` (:func:`fuse_qkv`), so a contiguous TP
shard holds whole groups. The vocabulary is padded to ``vocab_multiple`` on import (zero rows) and
cut back on export. An export writes ``is_causal: false``: transformers then builds a
bidirectional mask.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.hf_format import (
    HFFormatError,
    HFLayout,
    KeyProblem,
    Read,
    Source,
    hf_rope,
    is_moe,
    number,
    pad_rows,
    refuse,
    rope_options,
    special_ids,
)

LLAMA_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "dream": "qwen2", "qwen3": "qwen3"}
# transformers' Qwen3Config default when config.json has no head_dim (not hidden_size / heads)
QWEN3_DEFAULT_HEAD_DIM = 128


# ---------------------------------------------------------------- names and shapes
def layer_names(layout: str, i: int) -> dict[str, str]:
    """Our logical per-layer weights -> the source tensor names of layer ``i``."""
    if layout == "llada":
        b = f"model.transformer.blocks.{i}."
        keys = {"attn_norm": "attn_norm", "out": "attn_out", "ffn_norm": "ff_norm"}
        keys.update(gate="ff_proj", up="up_proj", down="ff_out")
        names = {k: b + v + ".weight" for k, v in keys.items()}
        for x in "qkv":
            names[x], names[x + "_bias"] = b + f"{x}_proj.weight", b + f"{x}_proj.bias"
        return names
    b = f"model.layers.{i}."
    names = {
        "attn_norm": b + "input_layernorm.weight",
        "out": b + "self_attn.o_proj.weight",
        "ffn_norm": b + "post_attention_layernorm.weight",
        "gate": b + "mlp.gate_proj.weight",
        "up": b + "mlp.up_proj.weight",
        "down": b + "mlp.down_proj.weight",
    }
    for x in "qkv":
        names[x], names[x + "_bias"] = b + f"self_attn.{x}_proj.weight", b + f"self_attn.{x}_proj.bias"
    names["q_norm"], names["k_norm"] = b + "self_attn.q_norm.weight", b + "self_attn.k_norm.weight"
    return names


def global_names(layout: str) -> dict[str, str]:
    """Embedding, final norm and head tensor names."""
    if layout == "llada":
        return {
            "embed": "model.transformer.wte.weight",
            "norm": "model.transformer.ln_f.weight",
            "head": "model.transformer.ff_out.weight",
        }
    return {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}


def hf_shapes(
    layout: str, cfg: ModelConfig, ffn_layers: Container[int] | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``layout`` checkpoint of ``cfg`` holds (the head only when untied), with its shape;
    ``ffn_layers``: the layers with the dense FFN (None: all; a MoE model's others have experts)."""
    out = embedding_shapes(global_names(layout), cfg)
    for i in range(cfg.n_layers):
        out.update(block_shapes(layer_names(layout, i), cfg, ffn_layers is None or i in ffn_layers))
    return out


def embedding_shapes(g: dict[str, str], cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The embedding, final norm and (untied) head named by ``g`` (:func:`global_names`), with their shapes."""
    d, v = cfg.d_model, cfg.vocab_size
    out = {g["embed"]: (v, d), g["norm"]: (d,)}
    if not cfg.tie_embeddings:
        out[g["head"]] = (v, d)
    return out


def block_shapes(ln: dict[str, str], cfg: ModelConfig, ffn: bool = True) -> dict[str, tuple[int, ...]]:
    """The tensors of one block named by ``ln`` (:func:`layer_names`): attention, its two norms and
    (``ffn``) the dense SwiGLU FFN ``cfg.ffn_hidden`` wide, with their shapes."""
    d, f, hd = cfg.d_model, cfg.ffn_hidden, cfg.head_size
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    out = {ln["attn_norm"]: (d,), ln["ffn_norm"]: (d,), ln["q"]: (q, d), ln["k"]: (kv, d), ln["v"]: (kv, d)}
    out[ln["out"]] = (d, q)
    if ffn:
        out.update({ln["gate"]: (f, d), ln["up"]: (f, d), ln["down"]: (d, f)})
    if cfg.qkv_bias:
        out.update({ln["q_bias"]: (q,), ln["k_bias"]: (kv,), ln["v_bias"]: (kv,)})
    if cfg.qk_norm == "head":
        out.update({ln["q_norm"]: (hd,), ln["k_norm"]: (hd,)})
    elif cfg.qk_norm == "full":  # over the whole projection (OLMoE)
        out.update({ln["q_norm"]: (q,), ln["k_norm"]: (kv,)})
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """q [H*hd(, D)], k/v [KV*hd(, D)] -> our fused [(H + 2 KV) * hd(, D)], per kv group [q..q|k|v]."""
    kv, g, hd = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size
    tail = q.shape[1:]
    parts = (q.reshape(kv, g * hd, *tail), k.reshape(kv, hd, *tail), v.reshape(kv, hd, *tail))
    return torch.cat(parts, dim=1).reshape(cfg.qkv_size, *tail)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fuse_qkv`."""
    kv, g, hd = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size
    tail = qkv.shape[1:]
    grouped = qkv.reshape(kv, (g + 2) * hd, *tail)
    q, k, v = grouped.split([g * hd, hd, hd], dim=1)
    return (
        q.reshape(cfg.n_heads * hd, *tail).contiguous(),
        k.reshape(kv * hd, *tail).contiguous(),
        v.reshape(kv * hd, *tail).contiguous(),
    )


# ---------------------------------------------------------------- weights both ways
def to_ours(
    layout: str, read: Read, cfg: ModelConfig, ffn_layers: Container[int] | None = None
) -> dict[str, torch.Tensor]:
    """Source tensors (``read(name)``) -> our full fp32 TP=1 state dict (names of DLMTransformer);
    ``ffn_layers`` as for :func:`hf_shapes`."""
    state = embeddings_to_ours(global_names(layout), read, cfg)
    for i in range(cfg.n_layers):
        ffn = ffn_layers is None or i in ffn_layers
        state.update(block_to_ours(layer_names(layout, i), read, cfg, f"layers.{i}.", ffn))
    return state


def embeddings_to_ours(g: dict[str, str], read: Read, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The embedding, final norm and (untied) head named by ``g`` -> ours, fp32, the vocabulary
    rows zero-padded to ``cfg.padded_vocab_size``."""
    V = cfg.padded_vocab_size
    state = {
        "embedding.weight": pad_rows(read(g["embed"]).float(), V),
        "final_norm.weight": read(g["norm"]).float(),
    }
    if not cfg.tie_embeddings:
        state["head.weight"] = pad_rows(read(g["head"]).float(), V)
    return state


def embeddings_from_ours(
    g: dict[str, str], state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`embeddings_to_ours` (the padded vocabulary rows dropped)."""
    v = cfg.vocab_size
    out = {g["embed"]: state["embedding.weight"][:v], g["norm"]: state["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out[g["head"]] = state["head.weight"][:v]
    return out


def block_to_ours(
    ln: dict[str, str], read: Read, cfg: ModelConfig, prefix: str, ffn: bool = True
) -> dict[str, torch.Tensor]:
    """One block's source tensors (named by ``ln``) -> ours under ``prefix`` (``layers.{i}.``), fp32:
    fused QKV (and bias), norms, output, q/k norms and (``ffn``) the dense FFN."""
    state = {prefix + "qkv.weight": fuse_qkv(*(read(ln[x]).float() for x in "qkv"), cfg)}
    if cfg.qkv_bias:
        state[prefix + "qkv.bias"] = fuse_qkv(*(read(ln[x + "_bias"]).float() for x in "qkv"), cfg)
    for name in plain_weights(cfg, ffn):
        state[prefix + name + ".weight"] = read(ln[name]).float()
    return state


def plain_weights(cfg: ModelConfig, ffn: bool) -> tuple[str, ...]:
    """The block weights named alike on both sides and copied as they are: norms, output, the q/k
    norms (per head or over the whole projection) and, with ``ffn``, the dense FFN."""
    qk = ("q_norm", "k_norm") if cfg.qk_norm != "none" else ()
    return ("attn_norm", "ffn_norm", "out", *qk, *(("gate", "up", "down") if ffn else ()))


def from_ours(
    layout: str, state: dict[str, torch.Tensor], cfg: ModelConfig, ffn_layers: Container[int] | None = None
) -> dict[str, torch.Tensor]:
    """Our full state dict -> the layout's tensor names (padded vocabulary rows dropped);
    ``ffn_layers`` as for :func:`hf_shapes`."""
    out = embeddings_from_ours(global_names(layout), state, cfg)
    for i in range(cfg.n_layers):
        ffn = ffn_layers is None or i in ffn_layers
        out.update(block_from_ours(layer_names(layout, i), state, cfg, f"layers.{i}.", ffn))
    return out


def block_from_ours(
    ln: dict[str, str], state: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str, ffn: bool = True
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`block_to_ours`: our block ``prefix`` -> the source names ``ln``."""
    out = dict(zip((ln["q"], ln["k"], ln["v"]), split_qkv(state[prefix + "qkv.weight"], cfg), strict=True))
    if cfg.qkv_bias:
        names = (ln["q_bias"], ln["k_bias"], ln["v_bias"])
        out.update(zip(names, split_qkv(state[prefix + "qkv.bias"], cfg), strict=True))
    for ours in plain_weights(cfg, ffn):
        out[ln[ours]] = state[prefix + ours + ".weight"]
    return out


# ---------------------------------------------------------------- config.json both ways
def _llada_fields(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """ModelConfig fields and the context length of a LLaDA (OLMo-derived) ``config.json``."""
    refuse(
        config,
        {
            "block_type": "llama",
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "alibi": False,
            "rope": True,
            "scale_logits": False,
            "input_emb_norm": False,
            "attention_layer_norm": False,
            "include_bias": False,
            "layer_norm_with_affine": True,
            "bias_for_layer_norm": False,
            "clip_qkv": None,
            "multi_query_attention": None,
        },
    )
    d, heads = number(config, "d_model", int), number(config, "n_heads", int)
    if heads < 1:
        raise KeyProblem(f"'n_heads' is {heads}, expected >= 1")
    ffn = number(config, "mlp_hidden_size", int, None) or number(config, "mlp_ratio", int) * d
    fields = dict(
        vocab_size=number(config, "embedding_size", int, None) or number(config, "vocab_size", int),
        d_model=d,
        n_layers=number(config, "n_layers", int),
        n_heads=heads,
        n_kv_heads=number(config, "n_kv_heads", int, None) or heads,
        ffn_hidden=ffn,
        norm_eps=number(config, "rms_norm_eps", float, 1e-5),
        rope_theta=number(config, "rope_theta", float, 10000.0),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
    )
    return fields, number(config, "max_sequence_length", int, 4096)


def _llama_like_fields(config: dict[str, Any], layout: str) -> tuple[dict[str, Any], int]:
    """ModelConfig fields and the context length of a Llama / Qwen2 / Qwen3 ``config.json``."""
    if layout in ("llama", "qwen3") and config.get("attention_bias"):
        raise HFFormatError(
            f"attention_bias=true ({ARCHITECTURES[layout].removesuffix('ForCausalLM')} puts a bias on q, k, v "
            "and o_proj): only Q/K/V biases are supported"
        )
    fields, max_len = llama_like_fields(config, QWEN3_DEFAULT_HEAD_DIM if layout == "qwen3" else None)
    fields.update(qkv_bias=layout == "qwen2", qk_norm="head" if layout == "qwen3" else "none")
    return fields, max_len


def llama_like_fields(
    config: dict[str, Any], default_head_dim: int | None = None
) -> tuple[dict[str, Any], int]:
    """The ModelConfig fields every Llama-like ``config.json`` states alike (sizes, heads, head_dim,
    norm eps, tying, RoPE; ``ffn_hidden`` from ``intermediate_size``) and its context length; the
    MoE family's layouts read them too. Refuses a non-SiLU or biased MLP and sliding-window layers.
    ``default_head_dim``: the head size when config.json has no head_dim (None: hidden / heads)."""
    refuse(config, {"hidden_act": "silu", "mlp_bias": False, "use_sliding_window": False})
    sliding = [t for t in config.get("layer_types") or () if t != "full_attention"]
    if sliding:
        raise HFFormatError(f"layer_types has {sliding[0]!r} layers: only full attention is supported")
    d, heads = number(config, "hidden_size", int), number(config, "num_attention_heads", int)
    if heads < 1:
        raise KeyProblem(f"'num_attention_heads' is {heads}, expected >= 1")
    head_dim = number(config, "head_dim", int, default_head_dim or d // heads)
    fields = dict(
        vocab_size=number(config, "vocab_size", int),
        d_model=d,
        n_layers=number(config, "num_hidden_layers", int),
        n_heads=heads,
        n_kv_heads=number(config, "num_key_value_heads", int, None) or heads,
        ffn_hidden=number(config, "intermediate_size", int),
        norm_eps=number(config, "rms_norm_eps", float, 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        # d_model / heads is the default: None then, so configs compare equal
        head_dim=None if head_dim * heads == d else head_dim,
        **rope_options(config),
    )
    return fields, number(config, "max_position_embeddings", int, 4096)


def read_config(layout: str, config: dict[str, Any], seq_len: int | None, vocab_multiple: int) -> Source:
    """Our validated ModelConfig and the special ids of a ``layout`` source ``config.json``."""
    if layout == "llada":
        fields, max_len = _llada_fields(config)
    else:
        fields, max_len = _llama_like_fields(config, layout)
    model = build_config(ModelConfig, fields, seq_len if seq_len is not None else max_len, vocab_multiple)
    ids = special_ids(config)
    return Source(layout, model, ids["mask"], ids, str(config.get("model_type", "")))


def build_config(cls: type[ModelConfig], fields: dict[str, Any], seq_len: int, vocab_multiple: int) -> Any:
    """``cls(**fields)`` (a ModelConfig or a family's subclass), validated; sizes that build no model
    are an HFFormatError. n_kv_heads equal to n_heads is stored as None (the default), so configs
    compare equal."""
    if fields["n_kv_heads"] == fields["n_heads"]:
        fields = {**fields, "n_kv_heads": None}
    try:
        model = cls(seq_len=seq_len, vocab_multiple=vocab_multiple, **fields)
        model.validate()
    except ConfigError as exc:  # sizes that build no model (zero heads, a head count not dividing d_model)
        raise HFFormatError(f"describes a model we cannot build: {exc}") from None
    return model


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(layout: str, cfg: ModelConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the ``layout`` (llama, qwen2, qwen3) model equal to ``cfg``; LLaDA's loader is
    not in transformers, so its layout writes the equal Llama (Q/K/V biases: Qwen2) config."""
    if layout not in ARCHITECTURES:
        layout = "qwen2" if cfg.qkv_bias else "llama"
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[layout]],
        "model_type": layout,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": hf_rope(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # A masked diffusion LM attends both ways: transformers builds a bidirectional mask from it.
        "is_causal": False,
        "use_cache": False,
        "dtype": "float32",
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "mask_token_id": ids.get("mask"),
    }
    if layout == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, max_window_layers=cfg.n_layers)
    if layout == "qwen3":
        out.update(attention_bias=False)
    return out


# ---------------------------------------------------------------- the layouts
def _detects_llama_like(model_type: str):
    def detects(config: dict[str, Any], names: set[str]) -> bool:
        mt = str(config.get("model_type", "")).lower()
        llama_like = any(n.startswith("model.layers.") for n in names)
        return LLAMA_MODEL_TYPES.get(mt) == model_type and llama_like and not is_moe(config, names)

    return detects


def _detects_llada(config: dict[str, Any], names: set[str]) -> bool:
    if is_moe(config, names) or not any(n.startswith("model.transformer.blocks.") for n in names):
        return False
    if config.get("block_group_size", 1) != 1:
        raise HFFormatError("LLaDA config: block_group_size != 1 (grouped block names) is not supported")
    return True


def _layout(name: str, detects, model_types: tuple[str, ...]) -> HFLayout:
    return HFLayout(
        name=name,
        family="dense",
        detects=detects,
        read_config=lambda config, names, seq_len, multiple: read_config(name, config, seq_len, multiple),
        hf_shapes=lambda cfg: hf_shapes(name, cfg),
        to_ours=lambda read, cfg: to_ours(name, read, cfg),
        from_ours=lambda state, cfg: from_ours(name, state, cfg),
        hf_config=lambda cfg, ids: hf_config(name, cfg, ids),
        tied_head=lambda cfg: (
            (global_names(name)["head"], global_names(name)["embed"]) if cfg.tie_embeddings else None
        ),
        model_types=model_types,
    )


LLAMA = _layout("llama", _detects_llama_like("llama"), ("llama",))
QWEN2 = _layout("qwen2", _detects_llama_like("qwen2"), ("qwen2", "dream"))
QWEN3 = _layout("qwen3", _detects_llama_like("qwen3"), ("qwen3",))
LLADA = _layout("llada", _detects_llada, ("llada",))
LAYOUTS = (LLAMA, QWEN2, QWEN3, LLADA)


def export_layout(cfg: ModelConfig) -> HFLayout:
    """Exports go to Qwen3 when the model has per-head q/k norms, to Qwen2 when it has Q/K/V biases,
    else to LLaMA (LLaDA's own loader is not in transformers). HFFormatError for options no dense
    transformers model has."""
    if cfg.partial_rotary_factor != 1.0:
        raise HFFormatError(
            f"partial_rotary_factor={cfg.partial_rotary_factor}: no dense transformers layout we export "
            "(LLaMA, Qwen2, Qwen3) rotates only part of each head"
        )
    if cfg.qk_norm == "full":
        raise HFFormatError("qk_norm='full': no dense transformers layout we export normalises the whole q/k")
    if cfg.qk_norm == "head" and cfg.qkv_bias:
        raise HFFormatError(
            "qk_norm='head' with qkv_bias: Qwen3 (the layout with per-head q/k norms) has no Q/K/V-only biases"
        )
    if cfg.qk_norm == "head":
        return QWEN3
    return QWEN2 if cfg.qkv_bias else LLAMA

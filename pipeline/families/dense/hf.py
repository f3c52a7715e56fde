"""The dense family's Hugging Face layouts: LLaMA, Qwen2 (and Dream), LLaDA.

Per layer, our name <- the layout's (LLaMA and Qwen2 share names; Qwen2 adds Q/K/V biases)::

    embedding.weight        <- model.embed_tokens.weight        | model.transformer.wte.weight
    layers.{i}.attn_norm    <- model.layers.{i}.input_layernorm | ...blocks.{i}.attn_norm
    layers.{i}.qkv          <- self_attn.q_proj, k_proj, v_proj  | q_proj, k_proj, v_proj (fused per KV group)
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

LLAMA_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "dream": "qwen2"}


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


def hf_shapes(layout: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``layout`` checkpoint of ``cfg`` holds (the head only when untied), with its shape."""
    d, f, hd, v = cfg.d_model, cfg.ffn_hidden, cfg.head_dim, cfg.vocab_size
    g = global_names(layout)
    out = {g["embed"]: (v, d), g["norm"]: (d,)}
    if not cfg.tie_embeddings:
        out[g["head"]] = (v, d)
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    for i in range(cfg.n_layers):
        ln = layer_names(layout, i)
        out.update({ln["attn_norm"]: (d,), ln["ffn_norm"]: (d,), ln["q"]: (q, d), ln["k"]: (kv, d)})
        out.update(
            {ln["v"]: (kv, d), ln["out"]: (d, q), ln["gate"]: (f, d), ln["up"]: (f, d), ln["down"]: (d, f)}
        )
        if cfg.qkv_bias:
            out.update({ln["q_bias"]: (q,), ln["k_bias"]: (kv,), ln["v_bias"]: (kv,)})
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """q [H*hd(, D)], k/v [KV*hd(, D)] -> our fused [(H + 2 KV) * hd(, D)], per kv group [q..q|k|v]."""
    kv, g, hd = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(kv, g * hd, *tail), k.reshape(kv, hd, *tail), v.reshape(kv, hd, *tail))
    return torch.cat(parts, dim=1).reshape(cfg.qkv_size, *tail)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fuse_qkv`."""
    kv, g, hd = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(kv, (g + 2) * hd, *tail)
    q, k, v = grouped.split([g * hd, hd, hd], dim=1)
    return (
        q.reshape(cfg.n_heads * hd, *tail).contiguous(),
        k.reshape(kv * hd, *tail).contiguous(),
        v.reshape(kv * hd, *tail).contiguous(),
    )


# ---------------------------------------------------------------- weights both ways
def to_ours(layout: str, read: Read, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Source tensors (``read(name)``) -> our full fp32 TP=1 state dict (names of DLMTransformer)."""
    g = global_names(layout)
    V = cfg.padded_vocab_size
    state = {
        "embedding.weight": pad_rows(read(g["embed"]).float(), V),
        "final_norm.weight": read(g["norm"]).float(),
    }
    if not cfg.tie_embeddings:
        state["head.weight"] = pad_rows(read(g["head"]).float(), V)
    for i in range(cfg.n_layers):
        ln, p = layer_names(layout, i), f"layers.{i}."
        state[p + "qkv.weight"] = fuse_qkv(*(read(ln[x]).float() for x in "qkv"), cfg)
        if cfg.qkv_bias:
            state[p + "qkv.bias"] = fuse_qkv(*(read(ln[x + "_bias"]).float() for x in "qkv"), cfg)
        for name in ("attn_norm", "ffn_norm", "out", "gate", "up", "down"):
            state[p + name + ".weight"] = read(ln[name]).float()
    return state


def from_ours(layout: str, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> the layout's tensor names (padded vocabulary rows dropped)."""
    g = global_names(layout)
    v = cfg.vocab_size
    out = {g["embed"]: state["embedding.weight"][:v], g["norm"]: state["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out[g["head"]] = state["head.weight"][:v]
    for i in range(cfg.n_layers):
        ln, p = layer_names(layout, i), f"layers.{i}."
        out.update(zip((ln["q"], ln["k"], ln["v"]), split_qkv(state[p + "qkv.weight"], cfg), strict=True))
        if cfg.qkv_bias:
            names = (ln["q_bias"], ln["k_bias"], ln["v_bias"])
            out.update(zip(names, split_qkv(state[p + "qkv.bias"], cfg), strict=True))
        for ours in ("attn_norm", "ffn_norm", "out", "gate", "up", "down"):
            out[ln[ours]] = state[p + ours + ".weight"]
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


def _llama_qwen2_fields(config: dict[str, Any], layout: str) -> tuple[dict[str, Any], int]:
    """ModelConfig fields and the context length of a Llama / Qwen2 ``config.json``."""
    refuse(config, {"hidden_act": "silu", "mlp_bias": False, "use_sliding_window": False})
    if layout == "llama" and config.get("attention_bias"):
        raise HFFormatError(
            "attention_bias=true (LLaMA puts a bias on q, k, v and o_proj): only Q/K/V biases are supported"
        )
    d, heads = number(config, "hidden_size", int), number(config, "num_attention_heads", int)
    if heads < 1:
        raise KeyProblem(f"'num_attention_heads' is {heads}, expected >= 1")
    if config.get("head_dim") not in (None, d // heads):
        raise HFFormatError(f"head_dim={config['head_dim']} differs from hidden_size / num_attention_heads")
    fields = dict(
        vocab_size=number(config, "vocab_size", int),
        d_model=d,
        n_layers=number(config, "num_hidden_layers", int),
        n_heads=heads,
        n_kv_heads=number(config, "num_key_value_heads", int, None) or heads,
        ffn_hidden=number(config, "intermediate_size", int),
        norm_eps=number(config, "rms_norm_eps", float, 1e-6),
        qkv_bias=layout == "qwen2",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **rope_options(config),
    )
    return fields, number(config, "max_position_embeddings", int, 4096)


def read_config(layout: str, config: dict[str, Any], seq_len: int | None, vocab_multiple: int) -> Source:
    """Our validated ModelConfig and the special ids of a ``layout`` source ``config.json``."""
    if layout == "llada":
        fields, max_len = _llada_fields(config)
    else:
        fields, max_len = _llama_qwen2_fields(config, layout)
    if fields["n_kv_heads"] == fields["n_heads"]:
        fields["n_kv_heads"] = None  # plain multi-head: the default, so configs compare equal
    try:
        model = ModelConfig(
            seq_len=seq_len if seq_len is not None else max_len, vocab_multiple=vocab_multiple, **fields
        )
        model.validate()
    except ConfigError as exc:  # sizes that build no model (zero heads, a head count not dividing d_model)
        raise HFFormatError(f"describes a model we cannot build: {exc}") from None
    ids = special_ids(config)
    return Source(layout, model, ids["mask"], ids, str(config.get("model_type", "")))


def hf_config(cfg: ModelConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the Llama (or, with Q/K/V biases, Qwen2) model equal to ``cfg``."""
    qwen = cfg.qkv_bias
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
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
    if qwen:
        out.update(use_sliding_window=False, max_window_layers=cfg.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim)
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
        hf_config=hf_config,
        tied_head=lambda cfg: (
            (global_names(name)["head"], global_names(name)["embed"]) if cfg.tie_embeddings else None
        ),
        model_types=model_types,
    )


LLAMA = _layout("llama", _detects_llama_like("llama"), ("llama",))
QWEN2 = _layout("qwen2", _detects_llama_like("qwen2"), ("qwen2", "dream"))
LLADA = _layout("llada", _detects_llada, ("llada",))
LAYOUTS = (LLAMA, QWEN2, LLADA)


def export_layout(cfg: ModelConfig) -> HFLayout:
    """Exports go to Qwen2 when the model has Q/K/V biases, else to LLaMA (LLaDA's own loader is not
    in transformers)."""
    return QWEN2 if cfg.qkv_bias else LLAMA

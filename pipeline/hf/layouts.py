"""Hugging Face checkpoint layouts: tensor names and config keys, mapped to ``ModelConfig``.

Each layout names, for layer ``i``, the source tensors of our logical weights. Our fused QKV is
built from (and split back into) the separate q/k/v projections by pipeline/hf/convert.py.

``llama`` (LlamaForCausalLM; LLaDA-style dense models converted to Llama format)::

    model.embed_tokens.weight                       -> embedding.weight   [V, D] (rows padded)
    model.layers.{i}.input_layernorm.weight         -> layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  -> layers.{i}.qkv.weight (fused, per kv group)
    model.layers.{i}.self_attn.o_proj.weight        -> layers.{i}.out.weight
    model.layers.{i}.post_attention_layernorm.weight-> layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight -> layers.{i}.{gate,up,down}.weight
    model.norm.weight                               -> final_norm.weight
    lm_head.weight (absent when tied)               -> head.weight        [V, D] (rows padded)

``qwen2`` (Qwen2ForCausalLM, Dream): the ``llama`` names plus
``model.layers.{i}.self_attn.{q,k,v}_proj.bias`` -> ``layers.{i}.qkv.bias``.

``llada`` (GSAI-ML/LLaDA-8B-Base/-Instruct, OLMo-derived ``LLaDAModelLM``)::

    model.transformer.wte.weight                    -> embedding.weight
    model.transformer.blocks.{i}.attn_norm.weight   -> layers.{i}.attn_norm.weight
    model.transformer.blocks.{i}.{q,k,v}_proj.weight-> layers.{i}.qkv.weight (fused)
    model.transformer.blocks.{i}.attn_out.weight    -> layers.{i}.out.weight
    model.transformer.blocks.{i}.ff_norm.weight     -> layers.{i}.ffn_norm.weight
    model.transformer.blocks.{i}.ff_proj.weight     -> layers.{i}.gate.weight  (SiLU applies to it)
    model.transformer.blocks.{i}.up_proj.weight     -> layers.{i}.up.weight
    model.transformer.blocks.{i}.ff_out.weight      -> layers.{i}.down.weight
    model.transformer.ln_f.weight                   -> final_norm.weight
    model.transformer.ff_out.weight (weight_tying false) -> head.weight

Provenance of the LLaDA names and config keys: read from ``modeling_llada.py`` (the
``LLaDALlamaBlock``: ``x, x_up = self.ff_proj(x), self.up_proj(x); x = self.act(x) * x_up;
self.ff_out(x)``; ``LLaDAModel``: ``transformer = ModuleDict(wte, emb_drop, ln_f, blocks,
ff_out)``; ``LLaDAModelLM.model``) as published with the GSAI-ML checkpoints and copied into
public repositories (a copy modified by NVIDIA, "Modified from LLaDA repos", was read), and a
published LLaDA-format ``config.json`` (keys ``d_model n_heads n_kv_heads n_layers
mlp_hidden_size vocab_size embedding_size rope_theta rms_norm_eps weight_tying include_bias
include_qkv_bias block_type layer_norm_type activation_type mask_token_id ...``). The
checkpoint's ``model.safetensors.index.json`` itself could not be fetched here (no model hub);
the names above agree with four independent tools that read those checkpoints.

RoPE: Llama, Qwen2 and LLaDA all rotate (first half, second half) pairs (``rotate_half``), as
our ``apply_rope`` does, so q/k rows are copied without permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig

LAYOUTS = ("llama", "qwen2", "llada")
# Model types whose tensors use the llama names (qwen2-style adds q/k/v biases).
LLAMA_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "dream": "qwen2"}
# Tensors some checkpoints carry that hold no weight (recomputed RoPE frequencies).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFFormatError(ValueError):
    """A source checkpoint or config this importer cannot convert exactly; says what and why."""


class _KeyProblem(HFFormatError):
    """A config.json key that is missing or of the wrong type (the file's path is added by the caller)."""


_REQUIRED = object()


def _number(config: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``config[key]`` as an ``int`` or ``float`` (``default`` when absent or null); names the key when
    a required one is missing or the value is not a number of that kind."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _KeyProblem(f"no '{key}' (expected {'an integer' if kind is int else 'a number'})")
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        raise _KeyProblem(f"'{key}' is {value!r}, expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


@dataclass(frozen=True)
class Source:
    """What the importer read from ``config.json``: our model config and the layout's facts."""

    layout: str
    model: ModelConfig
    mask_id: int | None
    special_ids: dict[str, int | None]
    model_type: str


def layer_names(layout: str, i: int) -> dict[str, str]:
    """Our logical per-layer weights -> the source tensor names of layer ``i``."""
    if layout == "llada":
        b = f"model.transformer.blocks.{i}."
        return {
            "attn_norm": b + "attn_norm.weight",
            "q": b + "q_proj.weight",
            "k": b + "k_proj.weight",
            "v": b + "v_proj.weight",
            "q_bias": b + "q_proj.bias",
            "k_bias": b + "k_proj.bias",
            "v_bias": b + "v_proj.bias",
            "out": b + "attn_out.weight",
            "ffn_norm": b + "ff_norm.weight",
            "gate": b + "ff_proj.weight",
            "up": b + "up_proj.weight",
            "down": b + "ff_out.weight",
        }
    b = f"model.layers.{i}."
    return {
        "attn_norm": b + "input_layernorm.weight",
        "q": b + "self_attn.q_proj.weight",
        "k": b + "self_attn.k_proj.weight",
        "v": b + "self_attn.v_proj.weight",
        "q_bias": b + "self_attn.q_proj.bias",
        "k_bias": b + "self_attn.k_proj.bias",
        "v_bias": b + "self_attn.v_proj.bias",
        "out": b + "self_attn.o_proj.weight",
        "ffn_norm": b + "post_attention_layernorm.weight",
        "gate": b + "mlp.gate_proj.weight",
        "up": b + "mlp.up_proj.weight",
        "down": b + "mlp.down_proj.weight",
    }


def global_names(layout: str) -> dict[str, str]:
    """Embedding, final norm and head tensor names."""
    if layout == "llada":
        return {
            "embed": "model.transformer.wte.weight",
            "norm": "model.transformer.ln_f.weight",
            "head": "model.transformer.ff_out.weight",
        }
    return {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}


def expected_names(layout: str, cfg: ModelConfig) -> set[str]:
    """Every tensor a checkpoint of ``cfg`` in ``layout`` holds (the head only when untied)."""
    g = global_names(layout)
    names = {g["embed"], g["norm"]} | (set() if cfg.tie_embeddings else {g["head"]})
    for i in range(cfg.n_layers):
        ln = layer_names(layout, i)
        keys = ["attn_norm", "q", "k", "v", "out", "ffn_norm", "gate", "up", "down"]
        keys += ["q_bias", "k_bias", "v_bias"] if cfg.qkv_bias else []
        names |= {ln[k] for k in keys}
    return names


def is_moe(config: dict[str, Any], tensor_names: set[str]) -> bool:
    keys = (
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_intermediate_size",
        "num_experts_per_tok",
    )
    return (
        any(config.get(k) for k in keys)
        or "moe" in str(config.get("model_type", "")).lower()
        or any(".experts." in n for n in tensor_names)
    )


def detect_layout(config: dict[str, Any], tensor_names: set[str]) -> str:
    """``llama``/``qwen2``/``llada`` from the tensor names and ``model_type``; refuses MoE and others."""
    if is_moe(config, tensor_names):
        raise HFFormatError(
            f"model_type '{config.get('model_type')}' is a mixture-of-experts checkpoint (LLaDA-MoE and "
            "similar): not supported yet; our model's FFN is one dense SwiGLU, so expert weights have no place "
            "to go"
        )
    if any(n.startswith("model.transformer.blocks.") for n in tensor_names):
        if config.get("block_group_size", 1) != 1:
            raise HFFormatError("LLaDA config: block_group_size != 1 (grouped block names) is not supported")
        return "llada"
    if any(n.startswith("model.layers.") for n in tensor_names):
        mt = str(config.get("model_type", "")).lower()
        if mt not in LLAMA_MODEL_TYPES:
            raise HFFormatError(
                f"model_type '{config.get('model_type')}' has LLaMA-style tensor names but is not one this "
                f"importer knows the exact architecture of (known: {', '.join(sorted(LLAMA_MODEL_TYPES))})"
            )
        return LLAMA_MODEL_TYPES[mt]
    raise HFFormatError(
        "tensor names match no known layout (expected model.layers.N.* (LLaMA/Qwen2) or "
        f"model.transformer.blocks.N.* (LLaDA)); first names: {sorted(tensor_names)[:5]}"
    )


def _first(config: dict[str, Any], key: str) -> int | None:
    """An id, or the first of a list of ids (eos_token_id may be a list)."""
    value = config.get(key)
    if isinstance(value, list):
        return _number({key: value[0]}, key, int) if value else None
    return _number(config, key, int, None)


def _rope_options(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE theta and scaling from transformers v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``."""
    params, scaling = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise _KeyProblem(f"'{key}' is {value!r}, expected an object")
    theta = _number(params, "rope_theta", float, _number(config, "rope_theta", float, 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": _number(merged, "factor", float)}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": _number(merged, "factor", float),
            "rope_low_freq_factor": _number(merged, "low_freq_factor", float),
            "rope_high_freq_factor": _number(merged, "high_freq_factor", float),
            "rope_original_max_len": _number(merged, "original_max_position_embeddings", int),
        }
    raise HFFormatError(f"RoPE scaling '{kind}' is not supported (supported: default, linear, llama3)")


def _refuse(config: dict[str, Any], checks: dict[str, Any]) -> None:
    """Config keys whose non-default value changes the architecture in a way we do not model."""
    bad = [f"{k}={config[k]!r} (need {v!r})" for k, v in checks.items() if k in config and config[k] != v]
    if bad:
        raise HFFormatError(f"unsupported architecture options: {', '.join(bad)}")


def _llada_fields(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """ModelConfig fields and the context length of a LLaDA (OLMo-derived) ``config.json``."""
    _refuse(
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
    d, heads = _number(config, "d_model", int), _number(config, "n_heads", int)
    if heads < 1:
        raise _KeyProblem(f"'n_heads' is {heads}, expected >= 1")
    ffn = _number(config, "mlp_hidden_size", int, None) or _number(config, "mlp_ratio", int) * d
    fields = dict(
        vocab_size=_number(config, "embedding_size", int, None) or _number(config, "vocab_size", int),
        d_model=d,
        n_layers=_number(config, "n_layers", int),
        n_heads=heads,
        n_kv_heads=_number(config, "n_kv_heads", int, None) or heads,
        ffn_hidden=ffn,
        norm_eps=_number(config, "rms_norm_eps", float, 1e-5),
        rope_theta=_number(config, "rope_theta", float, 10000.0),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
    )
    max_len = _number(config, "max_sequence_length", int, 4096)
    return fields, max_len


def _llama_qwen2_fields(config: dict[str, Any], layout: str) -> tuple[dict[str, Any], int]:
    """ModelConfig fields and the context length of a Llama / Qwen2 ``config.json``."""
    _refuse(config, {"hidden_act": "silu", "mlp_bias": False, "use_sliding_window": False})
    if layout == "llama" and config.get("attention_bias"):
        raise HFFormatError(
            "attention_bias=true (LLaMA puts a bias on q, k, v and o_proj): only Q/K/V biases are supported"
        )
    d, heads = _number(config, "hidden_size", int), _number(config, "num_attention_heads", int)
    if heads < 1:
        raise _KeyProblem(f"'num_attention_heads' is {heads}, expected >= 1")
    if config.get("head_dim") not in (None, d // heads):
        raise HFFormatError(f"head_dim={config['head_dim']} differs from hidden_size / num_attention_heads")
    fields = dict(
        vocab_size=_number(config, "vocab_size", int),
        d_model=d,
        n_layers=_number(config, "num_hidden_layers", int),
        n_heads=heads,
        n_kv_heads=_number(config, "num_key_value_heads", int, None) or heads,
        ffn_hidden=_number(config, "intermediate_size", int),
        norm_eps=_number(config, "rms_norm_eps", float, 1e-6),
        qkv_bias=layout == "qwen2",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **_rope_options(config),
    )
    max_len = _number(config, "max_position_embeddings", int, 4096)
    return fields, max_len


def read_source_config(
    config: dict[str, Any],
    tensor_names: set[str],
    seq_len: int | None,
    vocab_multiple: int,
    where: str = "config.json",
) -> Source:
    """Map a source ``config.json`` (``where``, named in errors) to our ``ModelConfig`` (validated);
    refuses what we cannot hold exactly, names a missing key or one of the wrong type."""
    layout = detect_layout(config, tensor_names)
    try:
        fields, max_len = _llada_fields(config) if layout == "llada" else _llama_qwen2_fields(config, layout)
        if fields["n_kv_heads"] == fields["n_heads"]:
            fields["n_kv_heads"] = None  # plain multi-head: the default, so configs compare equal
        model = ModelConfig(
            seq_len=seq_len if seq_len is not None else max_len, vocab_multiple=vocab_multiple, **fields
        )
        model.validate()
        special = {
            "pad": _first(config, "pad_token_id"),
            "mask": _first(config, "mask_token_id"),
            "bos": _first(config, "bos_token_id"),
            "eos": _first(config, "eos_token_id"),
            "unk": None,
            "newline": None,
        }
    except _KeyProblem as exc:
        raise HFFormatError(f"{where}: {exc}") from None
    except ConfigError as exc:  # sizes that build no model (zero heads, a head count not dividing d_model)
        raise HFFormatError(f"{where} describes a model we cannot build: {exc}") from None
    return Source(layout, model, special["mask"], special, str(config.get("model_type", "")))

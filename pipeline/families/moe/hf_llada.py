"""The mixture-of-experts family's LLaDA layouts: LLaDA2 MoE and LLaDA-MoE (neither is in transformers).

Read from their published modeling files: LLaDA2.0 / 2.1 mini and flash (``model_type: llada2_moe``,
``LLaDA2MoeModelLM``, ``configuration_llada2_moe.py`` / ``modeling_llada2_moe.py``) and
LLaDA-MoE-7B-A1B (``model_type: lladamoe`` in ``configuration_lladamoe.py``; the published
config.json says ``llada``, which is read too when its tensors are a mixture of experts).

LLaDA2, per layer ``i`` (``model.layers.{i}.`` left out on the right)::

    layers.{i}.attn_norm / ffn_norm     <- input_layernorm / post_attention_layernorm
    layers.{i}.qkv.weight (and .bias)   <- attention.query_key_value: rows [all q heads | all k | all v],
                                           re-fused per KV group (ours: dense.fuse_qkv)
    layers.{i}.q_norm / k_norm          <- attention.query_layernorm / key_layernorm [head_dim] (per head)
    layers.{i}.out.weight               <- attention.dense.weight (its bias, use_bias, is refused)
    layers.{i}.gate / up / down         <- mlp.{gate,up,down}_proj (the first first_k_dense_replace layers)
    layers.{i}.moe.router.weight        <- mlp.gate.weight [E, D]
    layers.{i}.moe.router.score_bias    <- mlp.gate.expert_bias [E] (for the choice only)
    layers.{i}.moe.experts.w1 / w3 / w2 <- mlp.experts.{e}.{gate,up,down}_proj, stacked over e
    layers.{i}.moe.shared.*             <- mlp.shared_experts.{gate,up,down}_proj (ungated,
                                           moe_intermediate_size * num_shared_experts wide)
    embedding / final_norm / head       <- model.word_embeddings, model.norm, lm_head

LLaDA2 routes with sigmoid scores (whatever ``score_function`` says: the modeling file does not
read it), its ``expert_bias`` always on, group-limited (``n_group``, ``topk_group``, a group scored
by the sum of its top two), renormalised whenever top_k > 1 (``norm_topk_prob`` is not read), times
``routed_scaling_factor``. Our ``norm_topk_prob`` is therefore ``top_k > 1``. Its ``head_dim`` is
kept explicit (its config class always holds one, as the llada2 presets do).

Both rotate with transformers' ``rotate_half`` within the first int(head_dim * partial_rotary_factor)
dims of each head (frequencies over that width), as our RoPE does: q/k rows are copied as they are.

LLaDA-MoE names attention, norms, embedding, head and the dense FFN as Llama / Qwen3-MoE do
(``self_attn.q_norm`` / ``k_norm`` [head_dim], per head); per MoE layer the router, experts and
``mlp.expert_bias`` [E] (when ``moe_router_enable_expert_bias``) and, on the decoder layer itself,
``shared_expert.{gate,up,down}_proj`` (``shared_expert_intermediate_size`` wide, ungated). It routes
with a softmax, the bias added to the probabilities for the choice AND the weights
(``score_bias_in_weights``), never renormalised, unscaled, ungrouped (the config's
``norm_topk_prob``, ``routed_scaling_factor``, ``router_num_group``, ``moe_router_score_function``
are not read by its modeling file). ``moe_layer_freq[i] == 0`` makes layer i dense: the leading
dense layers become ``first_k_dense_replace``, the others ``mlp_only_layers``.

An export writes every key its modeling file reads (so none of the config classes' defaults,
e.g. LLaDA2's ``use_bias: true`` or dropout 0.1, fills in), the canonical ``model_type``,
``architectures`` and ``auto_map`` (the modeling files themselves are not ours to write: copy them
from the source checkpoint); other keys of the source are not carried.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.families.dense import hf as dense
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.experts import EXPERT_WEIGHTS
from pipeline.model.hf_format import (
    HFFormatError,
    HFLayout,
    KeyProblem,
    Read,
    Source,
    hf_rope,
    is_moe,
    number,
    special_ids,
)

PROJECTIONS = ("gate", "up", "down")
LLADA2, LLADAMOE = "llada2_moe", "lladamoe"  # the layouts' names and model_type
ARCHITECTURES = {LLADA2: "LLaDA2MoeModelLM", LLADAMOE: "LLaDAMoEModelLM"}
AUTO_MAP = {
    LLADA2: {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    LLADAMOE: {
        "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
        "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
        "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
    },
}
LLADA2_GLOBALS = {
    "embed": "model.word_embeddings.weight",
    "norm": "model.norm.weight",
    "head": "lm_head.weight",
}


# ---------------------------------------------------------------- names and shapes
def layer_names(layout: str, i: int) -> dict[str, str]:
    """Layer ``i``'s tensor names in ``layout``: attention and norms (LLaDA2's; LLaDA-MoE's are
    dense.layer_names('llama')), the dense FFN, router, score bias and shared expert."""
    b = f"model.layers.{i}."
    names = {p: b + f"mlp.{p}_proj.weight" for p in PROJECTIONS}  # the dense FFN
    names["router"] = b + "mlp.gate.weight"
    if layout == LLADAMOE:
        names["score_bias"] = b + "mlp.expert_bias"
        names.update({f"shared.{p}": b + f"shared_expert.{p}_proj.weight" for p in PROJECTIONS})
        return {**dense.layer_names("llama", i), **names}
    a = b + "attention."
    names.update(
        attn_norm=b + "input_layernorm.weight",
        ffn_norm=b + "post_attention_layernorm.weight",
        qkv=a + "query_key_value.weight",
        qkv_bias=a + "query_key_value.bias",
        q_norm=a + "query_layernorm.weight",
        k_norm=a + "key_layernorm.weight",
        out=a + "dense.weight",
        score_bias=b + "mlp.gate.expert_bias",
    )
    names.update({f"shared.{p}": b + f"mlp.shared_experts.{p}_proj.weight" for p in PROJECTIONS})
    return names


def expert_name(i: int, e: int, projection: str) -> str:
    """Expert ``e``'s ``projection`` (gate, up, down) of layer ``i`` (both layouts)."""
    return f"model.layers.{i}.mlp.experts.{e}.{projection}_proj.weight"


def _globals(layout: str) -> dict[str, str]:
    return LLADA2_GLOBALS if layout == LLADA2 else dense.global_names("llama")


def _llada2_attention_shapes(ln: dict[str, str], cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    d, hd = cfg.d_model, cfg.head_size
    out = {ln["attn_norm"]: (d,), ln["ffn_norm"]: (d,), ln["qkv"]: (cfg.qkv_size, d)}
    out[ln["out"]] = (d, cfg.n_heads * hd)
    if cfg.qkv_bias:
        out[ln["qkv_bias"]] = (cfg.qkv_size,)
    if cfg.qk_norm == "head":
        out.update({ln["q_norm"]: (hd,), ln["k_norm"]: (hd,)})
    return out


def _ffn_shapes(ln: dict[str, str], i: int, cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Layer ``i``'s dense FFN, or its router, score bias, experts and shared expert."""
    d = cfg.d_model
    if not cfg.is_moe_layer(i):
        f = cfg.ffn_hidden
        return {ln["gate"]: (f, d), ln["up"]: (f, d), ln["down"]: (d, f)}
    E, f, s = cfg.n_experts, cfg.moe_ffn_hidden, cfg.shared_hidden
    out = {ln["router"]: (E, d)}
    if cfg.score_bias:
        out[ln["score_bias"]] = (E,)
    for e in range(E):
        out.update({expert_name(i, e, "gate"): (f, d), expert_name(i, e, "up"): (f, d)})
        out[expert_name(i, e, "down")] = (d, f)
    if s:
        out.update({ln["shared.gate"]: (s, d), ln["shared.up"]: (s, d), ln["shared.down"]: (d, s)})
    return out


def hf_shapes(layout: str, cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``layout`` checkpoint of ``cfg`` holds, with its shape."""
    out = dense.embedding_shapes(_globals(layout), cfg)
    for i in range(cfg.n_layers):
        ln = layer_names(layout, i)
        if layout == LLADA2:
            out.update(_llada2_attention_shapes(ln, cfg))
        else:
            out.update(dense.block_shapes(ln, cfg, ffn=False))
        out.update(_ffn_shapes(ln, i, cfg))
    return out


# ---------------------------------------------------------------- weights both ways
def _regroup(t: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """LLaDA2's fused rows [all q | all k | all v] (weight or bias) -> ours, per KV group."""
    q, kv = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    return dense.fuse_qkv(*t.split([q, kv, kv]), cfg)


def _moe_to_ours(ln: dict[str, str], i: int, read: Read, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    p = f"layers.{i}.moe."
    state = {p + "router.weight": read(ln["router"]).float()}
    if cfg.score_bias:
        state[p + "router.score_bias"] = read(ln["score_bias"]).float()
    for proj in PROJECTIONS:
        stacked = torch.stack([read(expert_name(i, e, proj)).float() for e in range(cfg.n_experts)])
        state[p + "experts." + EXPERT_WEIGHTS[proj]] = stacked
        if cfg.shared_hidden:
            state[p + f"shared.{proj}.weight"] = read(ln[f"shared.{proj}"]).float()
    return state


def to_ours(layout: str, read: Read, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Source tensors (``read(name)``) -> our full fp32 TP=1, EP=1 state dict (MoETransformer's names)."""
    state = dense.embeddings_to_ours(_globals(layout), read, cfg)
    for i in range(cfg.n_layers):
        ln, prefix, ffn = layer_names(layout, i), f"layers.{i}.", not cfg.is_moe_layer(i)
        if layout == LLADA2:
            state[prefix + "qkv.weight"] = _regroup(read(ln["qkv"]).float(), cfg)
            if cfg.qkv_bias:
                state[prefix + "qkv.bias"] = _regroup(read(ln["qkv_bias"]).float(), cfg)
            state.update({prefix + n + ".weight": read(ln[n]).float() for n in dense.plain_weights(cfg, ffn)})
        else:
            state.update(dense.block_to_ours(ln, read, cfg, prefix, ffn))
        if not ffn:
            state.update(_moe_to_ours(ln, i, read, cfg))
    return state


def _moe_from_ours(
    ln: dict[str, str], i: int, state: dict[str, torch.Tensor], cfg: MoEConfig
) -> dict[str, torch.Tensor]:
    p = f"layers.{i}.moe."
    out = {ln["router"]: state[p + "router.weight"]}
    if cfg.score_bias:
        out[ln["score_bias"]] = state[p + "router.score_bias"]
    for proj in PROJECTIONS:  # clones: safetensors refuses tensors that share storage
        w = state[p + "experts." + EXPERT_WEIGHTS[proj]]
        out.update({expert_name(i, e, proj): w[e].clone() for e in range(cfg.n_experts)})
        if cfg.shared_hidden:
            out[ln[f"shared.{proj}"]] = state[p + f"shared.{proj}.weight"]
    return out


def from_ours(layout: str, state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> the layout's tensor names (padded vocabulary rows dropped)."""
    out = dense.embeddings_from_ours(_globals(layout), state, cfg)
    for i in range(cfg.n_layers):
        ln, prefix, ffn = layer_names(layout, i), f"layers.{i}.", not cfg.is_moe_layer(i)
        if layout == LLADA2:
            out[ln["qkv"]] = torch.cat(dense.split_qkv(state[prefix + "qkv.weight"], cfg))
            if cfg.qkv_bias:
                out[ln["qkv_bias"]] = torch.cat(dense.split_qkv(state[prefix + "qkv.bias"], cfg))
            out.update({ln[n]: state[prefix + n + ".weight"] for n in dense.plain_weights(cfg, ffn)})
        else:
            out.update(dense.block_from_ours(ln, state, cfg, prefix, ffn))
        if not ffn:
            out.update(_moe_from_ours(ln, i, state, cfg))
    return out


# ---------------------------------------------------------------- config.json -> ours
def _positive_or_none(config: dict[str, Any], key: str, what: str) -> int | None:
    """``config[key]``: null (absent) or an integer >= 1; 0 would build a zero-width ``what``."""
    value = number(config, key, int, None)
    if value is not None and value < 1:
        raise HFFormatError(f"{key}={value}: expected >= 1, or null for no {what}")
    return value


def _width(config: dict[str, Any], key: str, needed: bool, fallback: int) -> int:
    """The dense FFN width ``config[key]``, required when the model has dense layers (else
    ``fallback``, never used: the key may then be a placeholder such as -1 or null)."""
    if needed:
        return number(config, key, int)
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else fallback


def _common_fields(config: dict[str, Any], ffn: int, eps: float, max_len: int) -> tuple[dict[str, Any], int]:
    """The Llama-like fields (sizes, heads, head_dim, RoPE, tying) with these layouts' defaults;
    refuses a non-SiLU MLP and sliding-window attention (dense.llama_like_fields)."""
    defaults = {
        "intermediate_size": ffn,
        "rms_norm_eps": number(config, "rms_norm_eps", float, eps),
        "max_position_embeddings": number(config, "max_position_embeddings", int, max_len),
    }
    return dense.llama_like_fields({**config, **defaults})


def _llada2_refusals(config: dict[str, Any]) -> None:
    """LLaDA2 options we do not model: a bias on the attention output, a normalised head."""
    if config.get("use_bias", True):  # LLaDA2MoeConfig's default is true
        value = (
            repr(config["use_bias"]) if "use_bias" in config else "absent (LLaDA2MoeConfig's default: true)"
        )
        raise HFFormatError(
            f"use_bias={value}: LLaDA2 then puts a bias on the attention output projection (attention.dense); "
            "only Q/K/V biases (use_qkv_bias) are supported"
        )
    if config.get("norm_head"):
        raise HFFormatError(f"norm_head={config['norm_head']!r}: a normalised LM head is not supported")


def read_llada2(config: dict[str, Any], seq_len: int | None, vocab_multiple: int) -> Source:
    """Our validated MoEConfig and the special ids of a LLaDA2 ``config.json``."""
    _llada2_refusals(config)
    shared = _positive_or_none(config, "num_shared_experts", "shared experts")
    top_k, moe_ffn = number(config, "num_experts_per_tok", int), number(config, "moe_intermediate_size", int)
    first_dense = number(config, "first_k_dense_replace", int, 0)
    ffn = _width(config, "intermediate_size", first_dense > 0, moe_ffn)
    fields, max_len = _common_fields(config, ffn, 1e-5, 16384)
    fields.update(
        # explicit, as LLaDA2's config class holds it (head_dim or hidden_size // heads), and the presets
        head_dim=number(config, "head_dim", int, None) or fields["d_model"] // fields["n_heads"],
        qkv_bias=bool(config.get("use_qkv_bias", False)),
        qk_norm="head" if config.get("use_qk_norm", True) else "none",
        partial_rotary_factor=number(config, "partial_rotary_factor", float, 0.5),
        n_experts=number(config, "num_experts", int),
        top_k=top_k,
        moe_ffn_hidden=moe_ffn,
        n_shared_experts=shared or 0,
        first_k_dense_replace=first_dense,
        score_func="sigmoid",
        score_bias=True,
        norm_topk_prob=top_k > 1,  # the modeling file renormalises whenever top_k > 1
        routed_scaling_factor=number(config, "routed_scaling_factor", float, 2.5),
        n_group=number(config, "n_group", int, 8),
        topk_group=number(config, "topk_group", int, 4),
        group_score="top2_sum",
    )
    return _source(LLADA2, config, fields, seq_len if seq_len is not None else max_len, vocab_multiple)


def _lladamoe_refusals(config: dict[str, Any]) -> None:
    """LLaDA-MoE options we do not model: biases on all four projections, clipping, another head_dim."""
    if config.get("attention_bias"):
        raise HFFormatError(
            f"attention_bias={config['attention_bias']!r}: LLaDA-MoE then puts a bias on q, k, v and o_proj; "
            "only Q/K/V biases are supported"
        )
    if config.get("clip_qkv") is not None:
        raise HFFormatError(
            f"clip_qkv={config['clip_qkv']!r}: LLaDA-MoE then clips q, k and v; not supported"
        )
    d, heads = number(config, "hidden_size", int), number(config, "num_attention_heads", int)
    head_dim = number(config, "head_dim", int, None)
    if head_dim is not None and heads > 0 and head_dim * heads != d:
        raise HFFormatError(
            f"head_dim={head_dim}: LLaDA-MoE's heads are hidden_size / num_attention_heads = {d // heads} wide "
            "(its RoPE would read head_dim)"
        )


def _moe_layer_freq(config: dict[str, Any]) -> list[int]:
    """``moe_layer_freq``: one integer per layer (0: a dense layer)."""
    freq, n = config.get("moe_layer_freq"), number(config, "num_hidden_layers", int)
    if not isinstance(freq, list) or len(freq) != n:
        raise KeyProblem(
            f"'moe_layer_freq' is {freq!r}, expected a list of num_hidden_layers={n} integers (0: a dense layer)"
        )
    return [number({f"moe_layer_freq[{j}]": v}, f"moe_layer_freq[{j}]", int) for j, v in enumerate(freq)]


def read_lladamoe(config: dict[str, Any], seq_len: int | None, vocab_multiple: int) -> Source:
    """Our validated MoEConfig and the special ids of a LLaDA-MoE ``config.json``."""
    _lladamoe_refusals(config)
    dense_layers = [i for i, f in enumerate(_moe_layer_freq(config)) if f == 0]
    first = next((k for k, i in enumerate(dense_layers) if i != k), len(dense_layers))  # leading dense layers
    moe_ffn = number(config, "expert_intermediate_size", int)
    shared = _positive_or_none(config, "shared_expert_intermediate_size", "shared expert")
    bias = bool(config.get("moe_router_enable_expert_bias"))
    ffn = _width(config, "dense_intermediate_size", bool(dense_layers), moe_ffn)
    fields, max_len = _common_fields({k: v for k, v in config.items() if k != "head_dim"}, ffn, 1e-5, 4096)
    fields.update(
        qk_norm="head" if config.get("qk_layernorm") else "none",
        rope_theta=number(config, "rope_theta", float),  # the config class default (-1) builds no RoPE
        partial_rotary_factor=number(config, "partial_rotary_factor", float),
        n_experts=number(config, "num_experts", int),
        top_k=number(config, "num_experts_per_tok", int),
        moe_ffn_hidden=moe_ffn,
        n_shared_experts=1 if shared else 0,
        shared_ffn_hidden=None if shared in (None, moe_ffn) else shared,
        first_k_dense_replace=first,
        mlp_only_layers=dense_layers[first:],
        score_func="softmax",
        score_bias=bias,
        score_bias_in_weights=bias,
        norm_topk_prob=False,
    )
    return _source(LLADAMOE, config, fields, seq_len if seq_len is not None else max_len, vocab_multiple)


def _source(
    layout: str, config: dict[str, Any], fields: dict[str, Any], seq_len: int, multiple: int
) -> Source:
    model = dense.build_config(MoEConfig, fields, seq_len, multiple)
    ids = special_ids(config)
    return Source(layout, model, ids["mask"], ids, str(config.get("model_type", "")))


# ---------------------------------------------------------------- ours -> config.json
def _rope_scaling(cfg: MoEConfig) -> dict[str, Any] | None:
    """``rope_scaling`` as both modeling files read it (v4 style; rope_theta is its own key)."""
    rope = {k: v for k, v in hf_rope(cfg).items() if k != "rope_theta"}
    return None if rope["rope_type"] == "default" else rope


def _common_config(layout: str, cfg: MoEConfig, ids: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURES[layout]],
        "auto_map": AUTO_MAP[layout],
        "model_type": layout,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling(cfg),
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "output_router_logits": False,
        "use_cache": False,
        "dtype": "float32",
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "mask_token_id": ids.get("mask"),
    }


def hf_config(layout: str, cfg: MoEConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the ``layout`` model equal to ``cfg`` (checked by :func:`llada2_problem` /
    :func:`lladamoe_problem`): every key its modeling file reads, and the routing keys other tools read."""
    out = _common_config(layout, cfg, ids)
    dense_layers = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if layout == LLADAMOE:
        out.update(
            dense_intermediate_size=cfg.ffn_hidden,
            expert_intermediate_size=cfg.moe_ffn_hidden,
            shared_expert_intermediate_size=cfg.shared_hidden or None,
            attention_bias=False,
            clip_qkv=None,
            qk_layernorm=cfg.qk_norm == "head",
            moe_layer_freq=[int(cfg.is_moe_layer(i)) for i in range(cfg.n_layers)],
            moe_router_enable_expert_bias=cfg.score_bias,
            moe_router_score_function="softmax",
        )
        return out
    out.update(
        intermediate_size=cfg.ffn_hidden,
        head_dim=cfg.head_size,
        use_qkv_bias=cfg.qkv_bias,
        use_qk_norm=cfg.qk_norm == "head",
        use_bias=False,
        norm_head=False,
        embedding_dropout=0.0,
        output_dropout=0.0,
        use_sliding_window=False,
        moe_intermediate_size=cfg.moe_ffn_hidden,
        num_shared_experts=cfg.shared_hidden // cfg.moe_ffn_hidden or None,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        first_k_dense_replace=len(dense_layers),
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        router_dtype="fp32",
    )
    return out


def llada2_problem(cfg: MoEConfig) -> str | None:
    """Why LLaDA2's layout cannot hold ``cfg`` (None: it can), naming the option."""
    k, dense_layers = cfg.top_k, sorted(i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i))
    checks = (
        (cfg.score_func != "sigmoid", f"score_func={cfg.score_func!r}: LLaDA2 routes with sigmoid scores"),
        (
            not cfg.score_bias,
            "score_bias=false: LLaDA2's router always adds a score-correction bias (expert_bias); set "
            "score_bias: true (a zero bias routes the same)",
        ),
        (
            cfg.score_bias_in_weights,
            "score_bias_in_weights=true: LLaDA2 adds its expert_bias for the choice only",
        ),
        (
            cfg.n_group > 1 and cfg.group_score != "top2_sum",
            f"group_score={cfg.group_score!r}: LLaDA2 scores a group by the sum of its top two",
        ),
        (
            cfg.n_experts // cfg.n_group < 2,
            f"n_experts={cfg.n_experts} in n_group={cfg.n_group}: LLaDA2 needs >= 2 experts per group (top-2 sum)",
        ),
        (
            cfg.norm_topk_prob != (k > 1),
            f"norm_topk_prob={str(cfg.norm_topk_prob).lower()} with top_k={k}: LLaDA2 renormalises the chosen "
            "experts' weights if and only if top_k > 1",
        ),
        (cfg.shared_expert_gate, "shared_expert_gate=true: LLaDA2 adds its shared experts ungated"),
        (
            cfg.shared_hidden % cfg.moe_ffn_hidden != 0,
            f"shared_ffn_hidden={cfg.shared_ffn_hidden}: LLaDA2's shared experts are moe_intermediate_size x "
            f"num_shared_experts wide (a multiple of moe_ffn_hidden={cfg.moe_ffn_hidden})",
        ),
        (cfg.qk_norm == "full", "qk_norm='full': LLaDA2 normalises q and k per head (use_qk_norm)"),
        (
            dense_layers != list(range(len(dense_layers))),
            f"dense layers {dense_layers} (decoder_sparse_step, mlp_only_layers): LLaDA2's dense layers are its "
            "first first_k_dense_replace layers",
        ),
    )
    return next((message for bad, message in checks if bad), None)


def lladamoe_problem(cfg: MoEConfig) -> str | None:
    """Why LLaDA-MoE's layout cannot hold ``cfg`` (None: it can), naming the option."""
    checks = (
        (cfg.score_func != "softmax", f"score_func={cfg.score_func!r}: LLaDA-MoE routes with a softmax"),
        (
            cfg.score_bias and not cfg.score_bias_in_weights,
            "score_bias=true without score_bias_in_weights: LLaDA-MoE adds its expert_bias to the weights too",
        ),
        (cfg.norm_topk_prob, "norm_topk_prob=true: LLaDA-MoE never renormalises the chosen experts' weights"),
        (
            cfg.routed_scaling_factor != 1.0,
            f"routed_scaling_factor={cfg.routed_scaling_factor}: LLaDA-MoE does not scale the routed experts' "
            "weights",
        ),
        (cfg.n_group > 1, f"n_group={cfg.n_group}: LLaDA-MoE does not limit routing to groups of experts"),
        (cfg.shared_expert_gate, "shared_expert_gate=true: LLaDA-MoE adds its shared expert ungated"),
        (cfg.qk_norm == "full", "qk_norm='full': LLaDA-MoE normalises q and k per head (qk_layernorm)"),
        (cfg.qkv_bias, "qkv_bias=true: LLaDA-MoE's attention_bias puts a bias on o_proj too"),
        (
            cfg.head_size * cfg.n_heads != cfg.d_model,
            f"head_dim={cfg.head_dim}: LLaDA-MoE's heads are d_model / n_heads wide",
        ),
    )
    return next((message for bad, message in checks if bad), None)


# ---------------------------------------------------------------- the layouts
def _detects(layout: str):
    def detects(config: dict[str, Any], names: set[str]) -> bool:
        model_type = str(config.get("model_type", "")).lower()
        if not any(n.startswith("model.layers.") for n in names):
            return False
        if layout == LLADA2:
            return model_type == LLADA2
        # LLaDA-MoE-7B-A1B's published config.json says "llada" (LLaDA-8B's model_type, other names)
        return model_type == LLADAMOE or (model_type == "llada" and is_moe(config, names))

    return detects


def _layout(name: str) -> HFLayout:
    g = _globals(name)
    reader = read_llada2 if name == LLADA2 else read_lladamoe
    return HFLayout(
        name=name,
        family="moe",
        detects=_detects(name),
        read_config=lambda config, names, seq_len, multiple: reader(config, seq_len, multiple),
        hf_shapes=lambda cfg: hf_shapes(name, cfg),
        to_ours=lambda read, cfg: to_ours(name, read, cfg),
        from_ours=lambda state, cfg: from_ours(name, state, cfg),
        hf_config=lambda cfg, ids: hf_config(name, cfg, ids),
        tied_head=lambda cfg: (g["head"], g["embed"]) if cfg.tie_embeddings else None,
        model_types=(name,),
    )


LLADA2_MOE, LLADA_MOE = _layout(LLADA2), _layout(LLADAMOE)
LAYOUTS = (LLADA2_MOE, LLADA_MOE)

"""The mixture-of-experts family's Hugging Face layouts: Qwen3-MoE, Qwen2-MoE, OLMoE (transformers'),
and LLaDA2 MoE and LLaDA-MoE (pipeline/families/moe/hf_llada.py).

Attention, norms, embedding, head and the dense layers' FFN are named as in the dense family's
Llama-like layouts (pipeline/families/dense/hf.py, whose helpers this module calls). Per MoE layer
``i``, our name <- the layout's (``model.layers.{i}.mlp.`` left out on the right)::

    layers.{i}.moe.router.weight        [E, D]      <- gate.weight (softmax over the E logits, top-k)
    layers.{i}.moe.experts.w1           [E, F, D]   <- experts.{e}.gate_proj.weight, stacked over e
    layers.{i}.moe.experts.w3           [E, F, D]   <- experts.{e}.up_proj.weight
    layers.{i}.moe.experts.w2           [E, D, F]   <- experts.{e}.down_proj.weight
    layers.{i}.moe.shared.gate.weight   [S, D]      <- shared_expert.gate_proj.weight   (Qwen2-MoE)
    layers.{i}.moe.shared.up.weight     [S, D]      <- shared_expert.up_proj.weight
    layers.{i}.moe.shared.down.weight   [D, S]      <- shared_expert.down_proj.weight
    layers.{i}.moe.shared_gate.weight   [1, D]      <- shared_expert_gate.weight (sigmoid(g . x) scales it)
    layers.{i}.q_norm.weight            <- self_attn.q_norm.weight: Qwen3-MoE [head_dim] per head
                                           (qk_norm "head"); OLMoE [H * head_dim], the whole q (qk_norm "full")
    layers.{i}.k_norm.weight            <- self_attn.k_norm.weight: [head_dim]; OLMoE [KV * head_dim]

transformers' ``save_pretrained`` writes the experts one by one as above (its default
``save_original_format``); its models hold them fused, ``experts.gate_up_proj`` [E, 2F, D] (gate
rows first) and ``experts.down_proj`` [E, D, F], and a checkpoint saved that way imports too (the
``*_FUSED`` layouts). An export writes the experts one by one.

Config keys: ``num_experts`` (Qwen3-MoE's own ``save_pretrained`` writes ``num_local_experts``) ->
n_experts, ``num_experts_per_tok`` -> top_k, ``moe_intermediate_size`` (OLMoE:
``intermediate_size``) -> moe_ffn_hidden, ``intermediate_size`` -> ffn_hidden (the dense layers),
``decoder_sparse_step`` and ``mlp_only_layers`` as they are (layer i is a MoE layer iff
``(i + 1) % step == 0`` and i is not in the list; an export adds our ``first_k_dense_replace``
layers to the list), ``norm_topk_prob``, Qwen2-MoE's ``shared_expert_intermediate_size`` -> one
gated shared expert of that width, ``qkv_bias`` (Qwen2-MoE, default true). Every layout routes
with a softmax, unscaled, ungrouped and without a score bias; the balancing-loss weights
(``router_aux_loss_coef``) are training settings and are not read. Options none of the three can
hold are refused on export (:func:`export_layout`), keys we do not model on import (sliding
windows, a bias on o_proj, OLMoE's clip_qkv).

An export goes to a transformers layout when one holds the model, else to LLaDA2 (sigmoid scores
with a score bias: the only layout routing that way) or LLaDA-MoE (a bias in the weights, or what
no transformers layout holds: partial rotary, an ungated shared expert, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.families.dense import hf as dense
from pipeline.families.moe import hf_llada as llada
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.experts import EXPERT_WEIGHTS
from pipeline.model.hf_format import HFFormatError, HFLayout, KeyProblem, Read, Source, number, special_ids

ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
NAMES = {"qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE", "olmoe": "OLMoE"}
PROJECTIONS = ("gate", "up", "down")
EXPORTED = "no MoE transformers layout we export (Qwen3-MoE, Qwen2-MoE, OLMoE)"


# ---------------------------------------------------------------- names and shapes
def moe_names(i: int) -> dict[str, str]:
    """Our logical MoE weights of layer ``i`` -> the source names (experts: :func:`expert_name`)."""
    b = f"model.layers.{i}.mlp."
    names = {"router": b + "gate.weight", "shared_gate": b + "shared_expert_gate.weight"}
    names.update({f"shared.{p}": b + f"shared_expert.{p}_proj.weight" for p in PROJECTIONS})
    names.update(gate_up=b + "experts.gate_up_proj", down=b + "experts.down_proj")  # fused experts
    return names


def expert_name(i: int, e: int, projection: str) -> str:
    """Expert ``e``'s ``projection`` (gate, up, down) of layer ``i``, one tensor per expert."""
    return f"model.layers.{i}.mlp.experts.{e}.{projection}_proj.weight"


def _dense_layers(cfg: MoEConfig) -> set[int]:
    return set(range(cfg.n_layers)) - set(cfg.moe_layers())


def hf_shapes(fused: bool, cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` holds (experts one by one or ``fused``), with its shape."""
    out = dense.hf_shapes("llama", cfg, _dense_layers(cfg))
    d, f, E, s = cfg.d_model, cfg.moe_ffn_hidden, cfg.n_experts, cfg.shared_hidden
    for i in cfg.moe_layers():
        n = moe_names(i)
        out[n["router"]] = (E, d)
        if fused:
            out.update({n["gate_up"]: (E, 2 * f, d), n["down"]: (E, d, f)})
        else:
            for e in range(E):
                out.update({expert_name(i, e, "gate"): (f, d), expert_name(i, e, "up"): (f, d)})
                out[expert_name(i, e, "down")] = (d, f)
        if s:
            out.update({n["shared.gate"]: (s, d), n["shared.up"]: (s, d), n["shared.down"]: (d, s)})
        if cfg.shared_expert_gate:
            out[n["shared_gate"]] = (1, d)
    return out


# ---------------------------------------------------------------- weights both ways
def to_ours(fused: bool, read: Read, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Source tensors (``read(name)``) -> our full fp32 TP=1, EP=1 state dict (MoETransformer's names)."""
    state = dense.to_ours("llama", read, cfg, _dense_layers(cfg))
    for i in cfg.moe_layers():
        n, p = moe_names(i), f"layers.{i}.moe."
        state[p + "router.weight"] = read(n["router"]).float()
        if fused:
            gate, up = read(n["gate_up"]).float().split(cfg.moe_ffn_hidden, dim=1)
            experts = {"gate": gate, "up": up, "down": read(n["down"]).float()}
        else:
            experts = {
                proj: torch.stack([read(expert_name(i, e, proj)).float() for e in range(cfg.n_experts)])
                for proj in PROJECTIONS
            }
        for proj, t in experts.items():
            state[p + "experts." + EXPERT_WEIGHTS[proj]] = t.contiguous()
        if cfg.shared_hidden:
            for proj in PROJECTIONS:
                state[p + f"shared.{proj}.weight"] = read(n[f"shared.{proj}"]).float()
        if cfg.shared_expert_gate:
            state[p + "shared_gate.weight"] = read(n["shared_gate"]).float()
    return state


def from_ours(fused: bool, state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> the layout's tensor names (padded vocabulary rows dropped)."""
    out = dense.from_ours("llama", state, cfg, _dense_layers(cfg))
    for i in cfg.moe_layers():
        n, p = moe_names(i), f"layers.{i}.moe."
        out[n["router"]] = state[p + "router.weight"]
        w = {proj: state[p + "experts." + EXPERT_WEIGHTS[proj]] for proj in PROJECTIONS}
        if fused:
            out.update({n["gate_up"]: torch.cat([w["gate"], w["up"]], dim=1), n["down"]: w["down"]})
        else:
            for proj in PROJECTIONS:  # clones: safetensors refuses tensors that share storage
                out.update({expert_name(i, e, proj): w[proj][e].clone() for e in range(cfg.n_experts)})
        if cfg.shared_hidden:
            out.update({n[f"shared.{proj}"]: state[p + f"shared.{proj}.weight"] for proj in PROJECTIONS})
        if cfg.shared_expert_gate:
            out[n["shared_gate"]] = state[p + "shared_gate.weight"]
    return out


# ---------------------------------------------------------------- config.json both ways
def _layer_list(config: dict[str, Any], key: str) -> list[int]:
    value = config.get(key) or []
    if not isinstance(value, list):
        raise KeyProblem(f"'{key}' is {value!r}, expected a list of layer indices")
    return [number({f"{key}[{j}]": v}, f"{key}[{j}]", int) for j, v in enumerate(value)]


def _attention_refusals(layout: str, config: dict[str, Any]) -> None:
    """Attention options of the source we do not model: a bias on o_proj, OLMoE's clipping and window."""
    if layout != "qwen2_moe" and config.get("attention_bias"):
        raise HFFormatError(
            f"attention_bias=true ({NAMES[layout]} puts a bias on q, k, v and o_proj): only Q/K/V biases "
            "are supported"
        )
    for key in ("clip_qkv", "sliding_window") if layout == "olmoe" else ():
        if config.get(key) is not None:
            what = "clips q, k and v" if key == "clip_qkv" else "attends within a sliding window"
            raise HFFormatError(f"{key}={config[key]!r} (OLMoE then {what}): only unclipped full attention")


def _moe_fields(layout: str, config: dict[str, Any], ffn_hidden: int) -> dict[str, Any]:
    """The MoEConfig fields of the routing, experts and layer pattern of a ``layout`` config.json."""
    key = next((k for k in ("num_experts", "num_local_experts") if config.get(k) is not None), "num_experts")
    fields = dict(
        n_experts=number(config, key, int),
        top_k=number(config, "num_experts_per_tok", int),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        score_func="softmax",
    )
    if layout == "olmoe":  # every layer a MoE layer, its experts intermediate_size wide
        return {**fields, "moe_ffn_hidden": ffn_hidden}
    fields.update(
        moe_ffn_hidden=number(config, "moe_intermediate_size", int),
        decoder_sparse_step=number(config, "decoder_sparse_step", int, 1),
        mlp_only_layers=_layer_list(config, "mlp_only_layers"),
    )
    if layout == "qwen2_moe":
        shared = number(config, "shared_expert_intermediate_size", int)
        if shared < 1:
            raise KeyProblem(f"'shared_expert_intermediate_size' is {shared}, expected >= 1")
        fields.update(
            n_shared_experts=1,
            # equal to the routed experts' width: None (the default), so configs compare equal
            shared_ffn_hidden=None if shared == fields["moe_ffn_hidden"] else shared,
            shared_expert_gate=True,
        )
    return fields


def read_config(layout: str, config: dict[str, Any], seq_len: int | None, vocab_multiple: int) -> Source:
    """Our validated MoEConfig and the special ids of a ``layout`` source ``config.json``."""
    _attention_refusals(layout, config)
    fields, max_len = dense.llama_like_fields(config)
    if layout == "olmoe" and fields["head_dim"] is not None:
        raise HFFormatError(
            f"head_dim={config['head_dim']} differs from hidden_size / num_attention_heads: OLMoE's q_norm "
            "is hidden_size wide"
        )
    fields.update(
        qkv_bias=layout == "qwen2_moe" and bool(config.get("qkv_bias", True)),
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(layout, "none"),
        **_moe_fields(layout, config, fields["ffn_hidden"]),
    )
    model = dense.build_config(MoEConfig, fields, seq_len if seq_len is not None else max_len, vocab_multiple)
    ids = special_ids(config)
    return Source(layout, model, ids["mask"], ids, str(config.get("model_type", "")))


def hf_config(layout: str, cfg: MoEConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the ``layout`` model equal to ``cfg`` (the dense Llama-like keys, then the MoE's)."""
    base = {"qwen3_moe": "qwen3", "qwen2_moe": "qwen2", "olmoe": "llama"}[layout]
    out = dense.hf_config(base, cfg, ids)
    out.update(
        architectures=[ARCHITECTURES[layout]],
        model_type=layout,
        num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.norm_topk_prob,
    )
    if layout == "olmoe":
        out.update(intermediate_size=cfg.moe_ffn_hidden, clip_qkv=None)
        return out
    out.update(
        moe_intermediate_size=cfg.moe_ffn_hidden,
        decoder_sparse_step=cfg.decoder_sparse_step,
        mlp_only_layers=sorted(set(cfg.mlp_only_layers) | set(range(cfg.first_k_dense_replace))),
    )
    if layout == "qwen2_moe":
        out.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_hidden)
    return out


# ---------------------------------------------------------------- the layouts
def _detects(layout: str, fused: bool):
    def detects(config: dict[str, Any], names: set[str]) -> bool:
        if str(config.get("model_type", "")).lower() != layout:
            return False
        if not any(n.startswith("model.layers.") for n in names):
            return False
        return any(n.endswith(".mlp.experts.gate_up_proj") for n in names) == fused

    return detects


def _layout(name: str, fused: bool) -> HFLayout:
    g = dense.global_names("llama")
    return HFLayout(
        name=name,
        family="moe",
        detects=_detects(name, fused),
        read_config=lambda config, names, seq_len, multiple: read_config(name, config, seq_len, multiple),
        hf_shapes=lambda cfg: hf_shapes(fused, cfg),
        to_ours=lambda read, cfg: to_ours(fused, read, cfg),
        from_ours=lambda state, cfg: from_ours(fused, state, cfg),
        hf_config=lambda cfg, ids: hf_config(name, cfg, ids),
        tied_head=lambda cfg: (g["head"], g["embed"]) if cfg.tie_embeddings else None,
        model_types=(name,),
    )


QWEN3_MOE, QWEN3_MOE_FUSED = _layout("qwen3_moe", False), _layout("qwen3_moe", True)
QWEN2_MOE, QWEN2_MOE_FUSED = _layout("qwen2_moe", False), _layout("qwen2_moe", True)
OLMOE, OLMOE_FUSED = _layout("olmoe", False), _layout("olmoe", True)
LAYOUTS = (QWEN3_MOE, QWEN2_MOE, OLMOE, QWEN3_MOE_FUSED, QWEN2_MOE_FUSED, OLMOE_FUSED, *llada.LAYOUTS)


def _check_routing(cfg: MoEConfig) -> None:
    """Options none of the three layouts has: each refused with the option named."""
    checks = (
        (
            cfg.score_func != "softmax",
            f"score_func={cfg.score_func!r}: {EXPORTED} routes with {cfg.score_func} scores (all use softmax)",
        ),
        (cfg.score_bias, f"score_bias=true: {EXPORTED} has a score-correction bias"),
        (cfg.n_group > 1, f"n_group={cfg.n_group}: {EXPORTED} limits routing to groups of experts"),
        (
            cfg.routed_scaling_factor != 1.0,
            f"routed_scaling_factor={cfg.routed_scaling_factor}: {EXPORTED} scales the routed experts' weights",
        ),
        (
            cfg.partial_rotary_factor != 1.0,
            f"partial_rotary_factor={cfg.partial_rotary_factor}: {EXPORTED} rotates only part of each head",
        ),
    )
    for bad, message in checks:
        if bad:
            raise HFFormatError(message)


def _check_olmoe(cfg: MoEConfig) -> None:
    """OLMoE (the layout with qk_norm='full'): every layer a MoE layer, no shared expert, no biases,
    head_dim = d_model / n_heads."""
    why = "OLMoE (the layout with qk_norm='full')"
    if _dense_layers(cfg):
        raise HFFormatError(
            f"qk_norm='full' with dense layers {sorted(_dense_layers(cfg))} (first_k_dense_replace, "
            f"decoder_sparse_step, mlp_only_layers): {why} has a mixture of experts in every layer"
        )
    if cfg.shared_hidden:
        raise HFFormatError(f"qk_norm='full' with n_shared_experts={cfg.n_shared_experts}: {why} has none")
    if cfg.qkv_bias:
        raise HFFormatError(f"qk_norm='full' with qkv_bias: {why} has no Q/K/V-only biases")
    if cfg.head_size * cfg.n_heads != cfg.d_model:
        raise HFFormatError(f"qk_norm='full' with head_dim={cfg.head_dim}: {why} needs d_model / n_heads")


def export_layout(cfg: MoEConfig) -> HFLayout:
    """The layout an export writes: LLaDA2 for sigmoid scores with a score bias, LLaDA-MoE for a
    bias in the weights; else a transformers layout (:func:`transformers_layout`) when one holds
    the model, else LLaDA-MoE when it does; HFFormatError naming the option otherwise."""
    if cfg.score_func == "sigmoid" and cfg.score_bias:
        problem = llada.llada2_problem(cfg)
        if problem:
            raise HFFormatError(problem)
        return llada.LLADA2_MOE
    if cfg.score_bias_in_weights:
        problem = llada.lladamoe_problem(cfg)
        if problem:
            raise HFFormatError(problem)
        return llada.LLADA_MOE
    try:
        return transformers_layout(cfg)
    except HFFormatError as exc:
        problem = llada.llada2_problem(cfg) if cfg.score_func == "sigmoid" else llada.lladamoe_problem(cfg)
        if problem is None:
            return llada.LLADA_MOE
        raise HFFormatError(f"{exc}; nor a LLaDA layout: {problem}") from None


def transformers_layout(cfg: MoEConfig) -> HFLayout:
    """The transformers layout that holds ``cfg``: OLMoE for q/k norms over the whole projection,
    Qwen2-MoE for a (gated) shared expert, Qwen3-MoE for per-head q/k norms; HFFormatError naming
    the option that none of them holds."""
    _check_routing(cfg)
    if cfg.qk_norm == "full":
        _check_olmoe(cfg)
        return OLMOE
    if cfg.shared_hidden:
        why = "Qwen2-MoE (the layout with a shared expert)"
        if not cfg.shared_expert_gate:
            raise HFFormatError(
                f"n_shared_experts={cfg.n_shared_experts} without shared_expert_gate: {why} scales the shared "
                "expert by a sigmoid gate"
            )
        if cfg.qk_norm != "none":
            raise HFFormatError(f"qk_norm={cfg.qk_norm!r} with shared experts: {why} has no q/k norms")
        return QWEN2_MOE
    if cfg.qk_norm == "head":
        if cfg.qkv_bias:
            raise HFFormatError(
                "qkv_bias with qk_norm='head': Qwen3-MoE (the layout with per-head q/k norms) has no Q/K/V-only "
                "biases"
            )
        return QWEN3_MOE
    raise HFFormatError(
        "qk_norm='none' without shared experts: no MoE transformers layout we export holds it (Qwen3-MoE "
        "normalises q/k per head, OLMoE over the whole projection, Qwen2-MoE has a gated shared expert)"
    )

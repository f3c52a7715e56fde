"""Small random Hugging Face checkpoints for the import/export tests (no download).

``hf_checkpoint(kind, dir)`` writes a model with the real transformers classes (``save_pretrained``)
or, for ``llada``, a state dict under LLaDA's OLMo-derived names with a config.json in LLaDA's
format. Norm weights and biases are randomised too, so a swapped or dropped tensor shows.
``reference_logits`` runs transformers with a full (bidirectional) 4-D attention mask.

LLaDA2 MoE and LLaDA-MoE are not in transformers: ``llada_moe_checkpoint`` writes a random one under
the published tensor and config.json names, and ``llada_moe_reference`` computes its logits from the
published equations in plain PyTorch (tests/reference.py's RMSNorm, tests/reference_moe.py's MoE).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests import reference, reference_moe
from tests.reference_moe import moe_cfg

VOCAB, D, FFN, LAYERS, HEADS = 300, 64, 96, 2, 4
MASK_ID = 7
# kind -> (transformers class, config overrides)
KINDS = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied-llama3rope": (
        "llama",
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2-gqa-bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # per-head q/k RMSNorms and a head size (24) that is not hidden_size / heads (16)
    "qwen3-gqa-headdim": ("qwen3", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
}
# Mixture-of-experts kinds (the MoE family's layouts), built like KINDS; tiny, so each test takes seconds.
MOE_KINDS = {
    # 8 experts, top-2, renormalised, GQA, a head size (24) that is not hidden_size / heads, layer 0 dense
    "qwen3-moe": (
        "qwen3_moe",
        dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False),
    ),
    # a gated shared expert (48 wide), Q/K/V biases, every second layer a MoE layer (1 and 3)
    "qwen2-moe": (
        "qwen2_moe",
        dict(num_hidden_layers=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=32, shared_expert_intermediate_size=48, decoder_sparse_step=2,
             norm_topk_prob=False, tie_word_embeddings=False),
    ),
    # q/k norms over the whole projections with GQA, experts intermediate_size wide, tied head
    "olmoe": (
        "olmoe",
        dict(num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
             tie_word_embeddings=True),
    ),
}  # fmt: skip
PREFIXES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe",
            "qwen2_moe": "Qwen2Moe", "olmoe": "Olmoe"}  # fmt: skip
# LLaDA name -> Llama name, the mapping documented in pipeline/families/dense/hf.py, restated here.
LLADA_TO_LLAMA = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def transformers_model(kind: str, seed: int = 0):
    """A random transformers model of ``kind`` (a KINDS or MOE_KINDS key; fp32; MoE kinds with eager
    attention)."""
    import transformers

    family, extra = KINDS[kind] if kind in KINDS else MOE_KINDS[kind]
    prefix = PREFIXES[family]
    cls_cfg, cls = getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")
    base = dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    )
    if kind in MOE_KINDS:
        base["attn_implementation"] = "eager"
    cfg = cls_cfg(**(base | extra))
    cfg.mask_token_id = MASK_ID
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    _randomise(model, seed)
    return model


def hf_checkpoint(kind: str, out: Path, seed: int = 0, *, fused_experts: bool = False) -> Path:
    """Write checkpoint ``kind`` (a KINDS or MOE_KINDS key, or ``llada``) to ``out``; returns ``out``.
    ``fused_experts``: a MoE kind's experts as transformers holds them (``experts.gate_up_proj``,
    ``experts.down_proj``) rather than one by one, as ``save_pretrained`` writes them by default."""
    if kind == "llada":
        return _llada_checkpoint(out, seed)
    transformers_model(kind, seed).save_pretrained(out, save_original_format=not fused_experts)
    return out


def _llada_checkpoint(out: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    kv = 2
    hd = D // HEADS
    shapes = {
        "model.transformer.wte.weight": (VOCAB, D),
        "model.transformer.ln_f.weight": (D,),
        "model.transformer.ff_out.weight": (VOCAB, D),
    }
    for i in range(LAYERS):
        b = f"model.transformer.blocks.{i}."
        shapes |= {
            b + "attn_norm.weight": (D,),
            b + "q_proj.weight": (D, D),
            b + "k_proj.weight": (kv * hd, D),
            b + "v_proj.weight": (kv * hd, D),
            b + "attn_out.weight": (D, D),
            b + "ff_norm.weight": (D,),
            b + "ff_proj.weight": (FFN, D),
            b + "up_proj.weight": (FFN, D),
            b + "ff_out.weight": (D, FFN),
        }
    state = {
        n: (1.0 + 0.2 * torch.randn(s, generator=g))
        if n.endswith("norm.weight") or n.endswith("ln_f.weight")
        else 0.08 * torch.randn(s, generator=g)
        for n, s in shapes.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {  # LLaDA-8B-Base's config.json keys, at toy sizes
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": D,
        "embedding_size": VOCAB,
        "eos_token_id": 3,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": MASK_ID,
        "max_sequence_length": 32,
        "mlp_hidden_size": FFN,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": HEADS,
        "n_kv_heads": kv,
        "n_layers": LAYERS,
        "pad_token_id": 3,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "vocab_size": VOCAB,
        "weight_tying": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def llada_as_llama(src: Path):
    """The LlamaForCausalLM holding a LLaDA checkpoint's tensors under the documented mapping."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    c = json.loads((src / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["d_model"],
        intermediate_size=c["mlp_hidden_size"],
        num_hidden_layers=c["n_layers"],
        num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_kv_heads"],
        max_position_embeddings=c["max_sequence_length"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_parameters=dict(rope_type="default", rope_theta=c["rope_theta"]),
        tie_word_embeddings=False,
    )
    state = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name in LLADA_TO_LLAMA:
            state[LLADA_TO_LLAMA[name]] = t
        else:
            i, rest = name.removeprefix("model.transformer.blocks.").split(".", 1)
            state[f"model.layers.{i}.{LLADA_TO_LLAMA[rest]}"] = t
    model = LlamaForCausalLM(cfg).float().eval()
    model.load_state_dict(state, strict=True)
    return model


def reference_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """transformers logits [B, T, V] with every position attending to every position."""
    B, T = tokens.shape
    full = torch.ones(B, 1, T, T, dtype=torch.bool)  # a 4-D mask is used as given: bidirectional
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=full).logits.float()


def reference_model(kind: str, src: Path):
    """The transformers model a checkpoint directory of ``kind`` holds."""
    if kind == "llada":
        return llada_as_llama(src)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def round_trip(src: Path, tmp: Path) -> tuple[Path, dict]:
    """``make import-hf`` then ``make export-hf`` of the checkpoint at ``src`` (under ``tmp``);
    asserts every tensor comes back with its dtype and bits. Returns the export and its config.json."""
    from pipeline.hf.convert import export_hf, import_hf  # heavy: DeepSpeed and megatron behind it

    hf = export_hf(import_hf(src, tmp / "ours"), tmp / "hf")
    before, after = load_file(str(src / "model.safetensors")), load_file(str(hf / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    return hf, json.loads((hf / "config.json").read_text())


# ---------------------------------------------------------------- LLaDA2 MoE and LLaDA-MoE (not in transformers)
# config.json as the published configuration files name the keys (configuration_llada2_moe.py,
# configuration_lladamoe.py), at toy sizes: GQA, q/k norms per head, half-rotary RoPE, a nonzero expert
# bias, a shared expert, dense layers (LLaDA2: the first; LLaDA-MoE: moe_layer_freq 0 at layers 0 and 2).
LLADA2_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "vocab_size": VOCAB,
    "hidden_size": D,
    "intermediate_size": FFN,
    "num_hidden_layers": 3,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "hidden_act": "silu",
    "use_qkv_bias": True,
    "use_qk_norm": True,
    "use_bias": False,
    "rms_norm_eps": 1e-6,
    "norm_head": False,
    "tie_word_embeddings": False,
    "embedding_dropout": 0.0,
    "attention_dropout": 0.0,
    "output_dropout": 0.0,
    "initializer_range": 0.02,
    "max_position_embeddings": 32,
    "rope_theta": 600000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 3,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "mask_token_id": MASK_ID,
    "num_experts": 8,
    "num_shared_experts": 2,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "moe_intermediate_size": 16,
    "first_k_dense_replace": 1,
    "output_router_logits": False,
    "partial_rotary_factor": 0.5,
    "score_function": "sigmoid",
    "norm_topk_prob": True,
    "moe_router_enable_expert_bias": True,
    "router_dtype": "fp32",
}
LLADAMOE_CONFIG = {
    "architectures": ["LLaDAMoEModelLM"], "model_type": "lladamoe",
    "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                 "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                 "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    "vocab_size": VOCAB, "hidden_size": D, "dense_intermediate_size": FFN, "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": HEADS,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32, "initializer_range": 0.02,
    "rms_norm_eps": 1e-5, "use_cache": False, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
    "mask_token_id": MASK_ID, "tie_word_embeddings": True, "rope_theta": 50000.0, "partial_rotary_factor": 0.5,
    "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "num_experts_per_tok": 2, "num_experts": 8, "output_router_logits": False, "router_aux_loss_coef": 0.01,
    "norm_topk_prob": False, "qk_layernorm": True, "moe_layer_freq": [0, 1, 0, 1],
    "moe_router_enable_expert_bias": True, "moe_router_score_function": "softmax", "routed_scaling_factor": 1,
    "router_num_group": 1, "router_topk_group": 1,
}  # fmt: skip
LLADA_MOE_CONFIGS = {"llada2_moe": LLADA2_CONFIG, "lladamoe": LLADAMOE_CONFIG}


class _Llada:
    """What a LLaDA2 (``llada2_moe``) or LLaDA-MoE config.json says, read as each modeling file reads it."""

    def __init__(self, c: dict):
        self.c, self.llada2 = c, c["model_type"] == "llada2_moe"
        self.embed = "model.word_embeddings.weight" if self.llada2 else "model.embed_tokens.weight"
        self.d, self.H = c["hidden_size"], c["num_attention_heads"]
        self.KV = c.get("num_key_value_heads") or self.H
        self.hd = (c.get("head_dim") or self.d // self.H) if self.llada2 else self.d // self.H
        self.E, self.k = c["num_experts"], c["num_experts_per_tok"]
        if self.llada2:  # the dense layers are the first first_k_dense_replace; shared = F * count, ungated
            self.F, self.dense_F = c["moe_intermediate_size"], c["intermediate_size"]
            self.S = self.F * (c.get("num_shared_experts") or 0)
            self.moe = [i >= c.get("first_k_dense_replace", 0) for i in range(c["num_hidden_layers"])]
        else:  # moe_layer_freq[i] == 0: a dense layer; the shared expert sits on the decoder layer
            self.F, self.dense_F = c["expert_intermediate_size"], c["dense_intermediate_size"]
            self.S = c.get("shared_expert_intermediate_size") or 0
            self.moe = [f != 0 for f in c["moe_layer_freq"]]

    def names(self, i: int) -> dict[str, str]:
        """Layer i's tensor names (as the published modeling files' modules name them)."""
        b = f"model.layers.{i}."
        if self.llada2:
            a = b + "attention."
            return {
                "qkv": a + "query_key_value.weight",
                "qkv_bias": a + "query_key_value.bias",
                "q_norm": a + "query_layernorm.weight",
                "k_norm": a + "key_layernorm.weight",
                "out": a + "dense.weight",
                "bias": b + "mlp.gate.expert_bias",
                "shared": b + "mlp.shared_experts.",
            }
        a = b + "self_attn."
        return {"q": a + "q_proj.weight", "k": a + "k_proj.weight", "v": a + "v_proj.weight",
                "q_norm": a + "q_norm.weight", "k_norm": a + "k_norm.weight", "out": a + "o_proj.weight",
                "bias": b + "mlp.expert_bias", "shared": b + "shared_expert."}  # fmt: skip

    def shapes(self) -> dict[str, tuple[int, ...]]:
        c, d, hd, H, KV, E = self.c, self.d, self.hd, self.H, self.KV, self.E
        out = {self.embed: (c["vocab_size"], d), "model.norm.weight": (d,)}
        if not c.get("tie_word_embeddings"):
            out["lm_head.weight"] = (c["vocab_size"], d)
        for i, moe in enumerate(self.moe):
            b, n = f"model.layers.{i}.", self.names(i)
            out |= {b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,)}
            out[n["out"]] = (d, H * hd)
            if self.llada2:
                out[n["qkv"]] = ((H + 2 * KV) * hd, d)
                if c.get("use_qkv_bias"):
                    out[n["qkv_bias"]] = ((H + 2 * KV) * hd,)
            else:
                out |= {n["q"]: (H * hd, d), n["k"]: (KV * hd, d), n["v"]: (KV * hd, d)}
            if c.get("use_qk_norm", True) if self.llada2 else c.get("qk_layernorm"):
                out |= {n["q_norm"]: (hd,), n["k_norm"]: (hd,)}
            F = self.F if moe else self.dense_F
            experts = [f"{b}mlp.experts.{e}." for e in range(E)] if moe else [b + "mlp."]
            if moe:
                out[b + "mlp.gate.weight"] = (E, d)
                if self.llada2 or c.get("moe_router_enable_expert_bias"):
                    out[n["bias"]] = (E,)
                if self.S:
                    out |= {n["shared"] + "gate_proj.weight": (self.S, d), n["shared"] + "up_proj.weight": (self.S, d),
                            n["shared"] + "down_proj.weight": (d, self.S)}  # fmt: skip
            for p in experts:
                out |= {
                    p + "gate_proj.weight": (F, d),
                    p + "up_proj.weight": (F, d),
                    p + "down_proj.weight": (d, F),
                }
        return out


def llada_moe_checkpoint(kind: str, out: Path, seed: int = 0, **changes) -> Path:
    """A random LLaDA2 (``llada2_moe``) or LLaDA-MoE (``lladamoe``) checkpoint at ``out``: config.json
    (:data:`LLADA_MOE_CONFIGS` with ``changes``) and model.safetensors under the published names; norms
    around 1, the expert bias large enough to change the choice of some experts."""
    config = LLADA_MOE_CONFIGS[kind] | changes
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _Llada(config).shapes().items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            std = {"expert_bias": 0.1 if kind == "llada2_moe" else 0.05}.get(name.rsplit(".", 1)[-1], 0.08)
            state[name] = std * torch.randn(shape, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _rotary(x: torch.Tensor, theta: float, r: int) -> torch.Tensor:
    """x [B, T, heads, hd]: transformers' default RoPE on the first r dims (inv_freq theta^(-2j/r),
    ``q * cos + rotate_half(q) * sin``), the rest passed through: both modeling files' apply_rotary_pos_emb."""
    T = x.shape[1]
    inv_freq = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)
    freqs = torch.arange(T).float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None]  # [1, T, 1, r]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], dim=-1)
    return torch.cat([rot * emb.cos() + half * emb.sin(), rest], dim=-1)


def _llada_attention(m: _Llada, w: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer i's bidirectional attention of x [B, T, D] (normed), from the published equations."""
    c, n, (B, T, _) = m.c, m.names(i), x.shape
    H, KV, hd = m.H, m.KV, m.hd
    if m.llada2:  # one fused projection, rows [all q heads | all k heads | all v heads]
        qkv = x @ w[n["qkv"]].t() + w.get(n["qkv_bias"], 0)
        q, k, v = qkv.view(B, T, H + 2 * KV, hd).split([H, KV, KV], dim=2)
    else:
        q, k, v = ((x @ w[n[p]].t()).view(B, T, -1, hd) for p in "qkv")
    if n["q_norm"] in w:  # RMSNorm over each head's hd, before RoPE
        q, k = (
            reference.rms(q, w[n["q_norm"]], c["rms_norm_eps"]),
            reference.rms(k, w[n["k_norm"]], c["rms_norm_eps"]),
        )
    r = int(hd * c.get("partial_rotary_factor", 0.5))
    q, k = _rotary(q, c["rope_theta"], r), _rotary(k, c["rope_theta"], r)
    k, v = (
        k.repeat_interleave(H // KV, dim=2),
        v.repeat_interleave(H // KV, dim=2),
    )  # head h reads h // (H/KV)
    att = (torch.einsum("bqhd,bkhd->bhqk", q, k) * hd**-0.5).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, H * hd) @ w[n["out"]].t()


def _llada_moe_ffn(m: _Llada, w: dict, i: int, x: torch.Tensor, overrides: dict):
    """Layer i's MoE of x [B, T, D] (normed) through tests/reference_moe.py, routed as the modeling file
    routes; returns (y, the chosen experts [B*T, k])."""
    c, n, b = m.c, m.names(i), f"model.layers.{i}.mlp."
    bias = w.get(n["bias"])
    if m.llada2:  # sigmoid + bias for the choice, groups (top-2 sum), renormalised when k > 1, scaled
        routing = dict(score_func="sigmoid", score_bias=True, norm_topk_prob=m.k > 1, group_score="top2_sum",
                       routed_scaling_factor=c.get("routed_scaling_factor", 2.5), n_group=c.get("n_group", 8),
                       topk_group=c.get("topk_group", 4))  # fmt: skip
    else:  # softmax, + bias in place: the biased probabilities choose AND weigh; no norm, no scale
        routing = dict(
            score_func="softmax", score_bias=bias is not None, score_bias_in_weights=bias is not None
        )
    cfg = moe_cfg(n_experts=m.E, top_k=m.k, moe_ffn_hidden=m.F, n_shared_experts=int(m.S > 0),
                  shared_ffn_hidden=m.S or None, **(routing | overrides))  # fmt: skip
    weights = {"router": w[b + "gate.weight"], "score_bias": bias}
    for proj, key in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        weights[key] = torch.stack([w[f"{b}experts.{e}.{proj}_proj.weight"] for e in range(m.E)])
        if m.S:
            weights["shared_" + proj] = w[n["shared"] + f"{proj}_proj.weight"]
    y, _ = reference_moe.moe_ffn(x, weights, cfg)
    return y, reference_moe.route(x.reshape(-1, m.d), weights["router"], bias, cfg)[0]


def llada_moe_reference(src: Path, tokens: torch.Tensor, **route_overrides):
    """``(logits [B, T, V], [the chosen experts [B*T, k] of each MoE layer])`` of the LLaDA2 / LLaDA-MoE
    checkpoint at ``src``, in plain PyTorch from the published equations on its tensors by their
    published names (fp32, every position attending to every position; none of our model's code).
    ``route_overrides``: routing keys of tests/reference_moe.py to change (e.g. ``n_group=1``)."""
    c = json.loads((src / "config.json").read_text())
    w, m = load_file(str(src / "model.safetensors")), _Llada(c)
    eps, embed = c["rms_norm_eps"], w[m.embed]
    h, routes = embed[tokens], []
    for i, moe in enumerate(m.moe):
        b = f"model.layers.{i}."
        h = h + _llada_attention(m, w, i, reference.rms(h, w[b + "input_layernorm.weight"], eps))
        x = reference.rms(h, w[b + "post_attention_layernorm.weight"], eps)
        if moe:
            y, chosen = _llada_moe_ffn(m, w, i, x, route_overrides)
            routes.append(chosen)
        else:
            g = x @ w[b + "mlp.gate_proj.weight"].t()
            y = (g * torch.sigmoid(g) * (x @ w[b + "mlp.up_proj.weight"].t())) @ w[
                b + "mlp.down_proj.weight"
            ].t()
        h = h + y
    head = embed if c.get("tie_word_embeddings") else w["lm_head.weight"]
    return reference.rms(h, w["model.norm.weight"], eps) @ head.t(), routes

"""Small random Hugging Face checkpoints for the import/export tests (no download).

``hf_checkpoint(kind, dir)`` writes a model with the real transformers classes (``save_pretrained``)
or, for ``llada``, a state dict under LLaDA's OLMo-derived names with a config.json in LLaDA's
format. Norm weights and biases are randomised too, so a swapped or dropped tensor shows.
``reference_logits`` runs transformers with a full (bidirectional) 4-D attention mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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

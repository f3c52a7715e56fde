"""The attention options of ModelConfig (head_dim, qk_norm, partial_rotary_factor): a float64 model
equals the independent float64 reference (tests/reference.py) to 1e-10; partial RoPE follows
transformers' convention; the Qwen3 layout imports, exports and is sized as published."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.families.dense.model import DLMTransformer
from pipeline.families.registry import param_count
from pipeline.hf.convert import export_hf, import_hf, read_source
from pipeline.model.config import ModelConfig
from pipeline.model.hf_format import HFFormatError
from pipeline.model.layers import apply_rope, model_rope_tables
from tests import reference as ref
from tests._models import current_dims, dense_model
from tests.conftest import tiny_model_config

OPTIONS = {
    "gqa": dict(n_kv_heads=2),
    "head_dim": dict(n_kv_heads=2, head_dim=24),  # 4 heads x 24 = 96 != d_model 64
    "qk_norm_head": dict(qk_norm="head"),
    "qk_norm_full": dict(qk_norm="full", n_kv_heads=2),
    "partial_rotary": dict(partial_rotary_factor=0.5),
    "all": dict(n_kv_heads=2, head_dim=24, qk_norm="full", partial_rotary_factor=0.25, qkv_bias=True),
    "all_head": dict(n_kv_heads=1, head_dim=20, qk_norm="head", partial_rotary_factor=0.5),
}


def float64_model(cfg: ModelConfig) -> DLMTransformer:
    """A seeded TP=1 model in float64 (RoPE tables too), its norm weights and biases randomised so a
    dropped or misplaced one shows."""
    torch.manual_seed(0)
    model = DLMTransformer(cfg, current_dims(), params_dtype=torch.float64)
    assert model.rope_cos.dtype == torch.float64  # the tables follow the parameters' precision
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


@pytest.mark.parametrize("option", list(OPTIONS))
def test_float64_model_equals_the_independent_reference(world1, option):
    cfg = tiny_model_config(**OPTIONS[option])
    model = float64_model(cfg)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens=tokens)
        theirs = ref.logits(model, ref.hidden(model, tokens))
    assert ours.dtype == torch.float64
    err = (ours[..., :300] - theirs[..., :300]).abs().max().item()
    assert err <= 1e-10, f"{option}: max |ours - reference| = {err:.3e}"
    assert theirs[..., :300].abs().max() > 0.1  # a real signal, not two zeros


def test_partial_rope_is_transformers_rotate_half_on_the_first_rotary_dims():
    """transformers' Phi (the convention of LLaDA2's modeling file): inv_freq = theta^(-2j/rotary_dim),
    rotate_half on q[..., :rotary_dim], the rest passed through."""
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding, apply_rotary_pos_emb

    theta, T = 5000.0, 12
    hf = PhiConfig(
        hidden_size=96,
        num_attention_heads=4,
        rope_parameters=dict(rope_type="default", rope_theta=theta, partial_rotary_factor=0.5),
    )
    cfg = ModelConfig(d_model=96, n_heads=4, seq_len=T, rope_theta=theta, partial_rotary_factor=0.5)
    assert cfg.rotary_dim == 12
    q = torch.randn(2, 4, T, 24, generator=torch.Generator().manual_seed(0))
    cos, sin = PhiRotaryEmbedding(hf)(q, torch.arange(T)[None])
    rot, _ = apply_rotary_pos_emb(q[..., :12], q[..., :12], cos, sin)
    theirs = torch.cat((rot, q[..., 12:]), dim=-1)
    ours = apply_rope(q, *model_rope_tables(cfg))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[..., 12:], q[..., 12:])  # the unrotated half passes through exactly
    assert (ours[..., 1:, :12] - q[..., 1:, :12]).abs().max() > 0.1


@pytest.mark.parametrize("option", ["head_dim", "qk_norm_head", "qk_norm_full", "all"])
def test_attention_options_build_the_stated_parameters(world1, option):
    cfg = tiny_model_config(**OPTIONS[option])
    layer = dense_model(cfg).layers[0]
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    hd, heads, kv = cfg.head_size, cfg.n_heads, cfg.kv_heads
    assert shapes["qkv.weight"] == ((heads + 2 * kv) * hd, 64) and shapes["out.weight"] == (64, heads * hd)
    norms = {"head": (hd,), "full": (heads * hd,)}.get(cfg.qk_norm)
    assert shapes.get("q_norm.weight") == norms
    assert shapes.get("k_norm.weight") == (
        None if norms is None else (hd,) if cfg.qk_norm == "head" else (kv * hd,)
    )
    assert sum(p.numel() for p in dense_model(cfg).parameters()) == param_count(cfg)


def test_qwen3_0_6b_config_reads_as_head_dim_128_with_per_head_qk_norm(world1):
    published = {  # Qwen/Qwen3-0.6B config.json, the keys the importer reads or checks
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    names = {"model.layers.0.self_attn.q_norm.weight"}
    cfg = read_source(published, names, 4096, 128, "config.json").model
    assert (cfg.head_dim, cfg.head_size, cfg.qk_norm, cfg.n_kv_heads) == (128, 128, "head", 8)
    with torch.device("meta"):
        n = sum(p.numel() for p in dense_model(cfg).parameters())
    # 0.44B without the embedding (as published) + the tied 151936 x 1024 embedding
    assert n == param_count(cfg) == 596_049_920
    no_head_dim = {k: v for k, v in published.items() if k != "head_dim"}  # transformers' default: 128
    assert read_source(no_head_dim, names, 4096, 128, "config.json").model.head_dim == 128


@pytest.mark.parametrize(
    "overrides, architecture",
    [
        (dict(qkv_bias=True), "Qwen2ForCausalLM"),
        (dict(head_dim=24), "LlamaForCausalLM"),
        (dict(head_dim=24, qk_norm="head"), "Qwen3ForCausalLM"),
    ],
)
def test_our_model_exports_to_transformers_with_the_same_logits_and_reimports_exactly(
    world1, tmp_path, overrides, architecture
):
    from transformers import AutoModelForCausalLM

    cfg = tiny_model_config(n_kv_heads=2, **overrides)
    model = float64_model(cfg).float().eval()
    model.rope_cos, model.rope_sin = model_rope_tables(cfg)
    export = tmp_path / "export"
    export.mkdir()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file(state, str(export / "model.safetensors"))
    ids = {"pad": 0, "mask": 4, "bos": 2, "eos": 3}
    (export / "config.json").write_text(json.dumps({"model": vars(cfg), "special_ids": ids}))
    hf_dir = export_hf(export, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    full = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    with torch.no_grad():
        ours, theirs = model(tokens=tokens)[..., :300], hf(input_ids=tokens, attention_mask=full).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
    back = import_hf(hf_dir, tmp_path / "back")
    info = json.loads((back / "config.json").read_text())
    assert {k: info["model"][k] for k in overrides} == overrides
    again = load_file(str(back / "model.safetensors"))
    assert again.keys() == state.keys()
    for name, t in state.items():  # the padded vocabulary rows come back as zeros
        want = (
            torch.cat((t[:300], torch.zeros_like(t[300:])))
            if name in ("embedding.weight", "head.weight")
            else t
        )
        assert torch.equal(again[name], want), name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(qk_norm="full"), r"qk_norm='full': no dense transformers layout"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5: no dense transformers layout"),
        (dict(qk_norm="head", qkv_bias=True), r"qk_norm='head' with qkv_bias"),
    ],
)
def test_export_of_options_no_transformers_model_has_is_refused(world1, tmp_path, overrides, message):
    cfg = tiny_model_config(**overrides)
    export = tmp_path / "export"
    export.mkdir()
    save_file(
        {n: p.detach() for n, p in dense_model(cfg).named_parameters()}, str(export / "model.safetensors")
    )
    (export / "config.json").write_text(json.dumps({"model": vars(cfg), "special_ids": {}}))
    with pytest.raises(HFFormatError, match=message):
        export_hf(export, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

"""Architecture options of ModelConfig: validated keys, defaults = the original model."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.families.dense.model import check_tp
from pipeline.families.registry import param_count
from pipeline.model.config import ModelConfig
from pipeline.model.layers import PAD_LOGIT, model_rope_tables
from tests._models import dense_model
from tests.conftest import tiny_model_config


def test_defaults_keep_the_original_parameter_layout(world1):
    torch.manual_seed(0)
    model = dense_model(tiny_model_config())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["layers.0.qkv.weight"] == (3 * 64, 64) and "layers.0.qkv.bias" not in shapes
    assert "head.weight" in shapes and sum(p.numel() for p in model.parameters()) == param_count(model.cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_kv_heads": 3}, "key 'model.n_kv_heads': 3 must be >= 1 and divide n_heads=4"),
        ({"rope_scaling": "yarn"}, "key 'model.rope_scaling': 'yarn' is not one of none, linear, llama3"),
        ({"norm_eps": 0.0}, "key 'model.norm_eps': got 0.0, expected > 0"),
        ({"n_kv_head": 2}, "n_kv_head"),  # an unknown key names itself
        ({"head_dim": 0}, r"key 'model.head_dim': got 0, expected >= 1 \(or null\)"),
        ({"head_dim": 23}, r"key 'model.head_dim': head size 23 must be even \(RoPE\)"),
        ({"n_heads": 3}, r"key 'model.d_model': 64 is not divisible by n_heads=3 \(or set model.head_dim\)"),
        ({"n_heads": 3, "head_dim": 20}, None),  # an explicit head size need not divide d_model
        ({"qk_norm": "layer"}, r"key 'qk_norm': got 'layer', expected one of 'none', 'head', 'full'"),
        ({"partial_rotary_factor": 0.0}, r"key 'model.partial_rotary_factor': got 0.0, expected 0 < f <= 1"),
        ({"partial_rotary_factor": 1.5}, r"key 'model.partial_rotary_factor': got 1.5, expected 0 < f <= 1"),
        (
            {"partial_rotary_factor": 0.3125},
            r"key 'model.partial_rotary_factor': 0.3125 rotates int\(16 \* 0.3125\) = 5 dims of each head, "
            "expected an even number >= 2",
        ),
    ],
)
def test_invalid_architecture_options_fail_naming_the_key(override, message):
    base = dict(vocab_size=300, d_model=64, n_heads=4, ffn_hidden=96)
    if message is None:
        from_dict(ModelConfig, base | override, "model").validate()
        return
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, base | override, "model")


def test_kv_heads_must_divide_by_the_tensor_parallel_size():
    with pytest.raises(ConfigError, match="model n_kv_heads=1 is not divisible by tensor parallel size 2"):
        check_tp(ModelConfig(d_model=64, n_heads=4, n_kv_heads=1), 2)


def test_gqa_bias_and_tied_head_build_the_stated_parameters(world1):
    cfg = tiny_model_config(n_kv_heads=2, qkv_bias=True, tie_embeddings=True)
    model = dense_model(cfg)
    assert model.head.weight is model.embedding.weight
    assert model.layers[0].qkv.weight.shape == ((4 + 2 * 2) * 16, 64) and model.layers[0].qkv.bias is not None
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    logits = model(tokens=torch.randint(0, 300, (2, 8)))
    logits.float().logsumexp(-1).mean().backward()
    assert model.embedding.weight.grad is not None  # the head's gradient reaches the shared matrix


def test_padded_vocabulary_logits_are_never_candidates(world1):
    model = dense_model(tiny_model_config())  # vocab 300 padded to 384
    logits = model(tokens=torch.randint(0, 300, (2, 8)))
    assert (logits[..., 300:] == PAD_LOGIT).all() and (logits[..., :300].abs() < 100).all()
    assert torch.softmax(logits.float(), -1)[..., 300:].sum() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same value at bf16
        assert (model(tokens=torch.randint(0, 300, (2, 8)))[..., 300:] == PAD_LOGIT).all()


def test_rope_scaling_matches_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_parameters=dict(rope_type="llama3", original_max_position_embeddings=64, **params),
    )
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = ModelConfig(
        d_model=256,
        n_heads=2,
        seq_len=2,
        rope_theta=500000.0,
        rope_scaling="llama3",
        rope_factor=8.0,
        rope_original_max_len=64,
    )
    cos, _ = model_rope_tables(ours)
    torch.testing.assert_close(cos[1], torch.cos(inv.float()), rtol=1e-5, atol=1e-6)
    # linear: position 4 at factor 4 turns as far as position 1 unscaled
    linear = ModelConfig(d_model=256, n_heads=2, seq_len=5, rope_scaling="linear", rope_factor=4.0)
    plain = ModelConfig(d_model=256, n_heads=2, seq_len=5)
    torch.testing.assert_close(model_rope_tables(linear)[0][4], model_rope_tables(plain)[0][1])


def test_llada_8b_preset_is_what_import_reads_from_the_published_config(world1):
    from dataclasses import asdict

    from pipeline.config import load_config
    from pipeline.hf.convert import read_source

    published = {  # GSAI-ML/LLaDA-8B-Base config.json, the keys the importer reads or checks
        "activation_type": "silu",
        "alibi": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 4096,
        "embedding_size": 126464,
        "include_bias": False,
        "include_qkv_bias": False,
        "layer_norm_type": "rms",
        "mask_token_id": 126336,
        "max_sequence_length": 4096,
        "mlp_hidden_size": 12288,
        "model_type": "llada",
        "n_heads": 32,
        "n_kv_heads": 32,
        "n_layers": 32,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "vocab_size": 126464,
        "weight_tying": False,
    }
    source = read_source(published, {"model.transformer.blocks.0.q_proj.weight"}, None, 128, "config.json")
    preset = load_config(ModelConfig, "configs/model/llada-8b.yaml")
    assert asdict(source.model) == asdict(preset) and source.mask_id == 126336
    with torch.device("meta"):
        n = sum(p.numel() for p in dense_model(preset).parameters())
    assert n == param_count(preset) and abs(n - 8.02e9) / 8.02e9 < 0.01

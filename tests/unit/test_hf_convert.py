"""Hugging Face import/export at TP=1: logits equal transformers', round trips are bit-exact,
unsupported checkpoints are refused with the names that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.engine.export import load_exported
from pipeline.families.dense.hf import fuse_qkv, split_qkv
from pipeline.hf.convert import export_hf, import_hf
from pipeline.model.config import ModelConfig
from pipeline.model.hf_format import HFFormatError
from tests._hf_models import (
    KINDS,
    MASK_ID,
    VOCAB,
    hf_checkpoint,
    reference_logits,
    reference_model,
    round_trip,
)

RTOL = 1e-4


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def _assert_rel_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err < RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("kind", [*KINDS, "llada"])
def test_imported_model_logits_equal_transformers_with_bidirectional_mask(world1, tmp_path, kind):
    src = hf_checkpoint(kind, tmp_path / "src")
    out = import_hf(src, tmp_path / "ours")
    model, info = load_exported(out)
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens=tokens)
    ref = reference_logits(reference_model(kind, src), tokens)
    _assert_rel_close(logits[..., :VOCAB], ref)
    # the padded vocabulary (300 -> 384) is never a candidate
    assert (logits[..., VOCAB:] < -1e29).all()
    assert (
        info["special_ids"]["mask"] == MASK_ID and info["source"]["layout"] == KINDS.get(kind, ("llada",))[0]
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_import_then_export_is_bit_exact_per_tensor(world1, tmp_path, kind):
    src = hf_checkpoint(kind, tmp_path / "src")
    _, config = round_trip(src, tmp_path)
    assert config["is_causal"] is False and config["mask_token_id"] == MASK_ID


def test_exported_model_loads_in_transformers_and_attends_both_ways(world1, tmp_path):
    """Our own (never imported) GQA + bias model -> export-hf -> AutoModelForCausalLM, default mask."""
    from safetensors.torch import save_file as save
    from transformers import AutoModelForCausalLM

    from tests._models import dense_model

    cfg = ModelConfig(
        vocab_size=300,
        seq_len=24,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        qkv_bias=True,
    )
    torch.manual_seed(0)
    model = dense_model(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.qkv.bias.normal_(0, 0.1)  # megatron initialises biases to zero
    export = tmp_path / "export"
    export.mkdir()
    save({n: p.detach().clone() for n, p in model.named_parameters()}, str(export / "model.safetensors"))
    ids = {"pad": 0, "mask": 4, "bos": 2, "eos": 3}
    (export / "config.json").write_text(json.dumps({"model": vars(cfg), "special_ids": ids}))
    hf = AutoModelForCausalLM.from_pretrained(export_hf(export, tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    tokens = _tokens()
    with torch.no_grad():
        ours, theirs = model(tokens=tokens)[..., :VOCAB], hf(input_ids=tokens).logits
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % VOCAB
        first = hf(input_ids=changed).logits[:, 0]
    _assert_rel_close(theirs, ours)
    assert (first - theirs[:, 0]).abs().max() > 1e-3  # position 0 sees the last token: bidirectional


def test_fused_qkv_layout_round_trips_and_groups_heads(world1):
    cfg = ModelConfig(vocab_size=300, d_model=64, n_heads=8, n_kv_heads=2, ffn_hidden=96)
    q, k, v = torch.randn(64, 64), torch.randn(16, 64), torch.randn(16, 64)
    fused = fuse_qkv(q, k, v, cfg)
    assert fused.shape == (cfg.qkv_size, 64)
    # group 1 = query heads 4..7, then kv head 1's key and value
    group1 = fused[6 * 8 : 12 * 8]
    assert torch.equal(group1[: 4 * 8], q[32:64]) and torch.equal(group1[32:40], k[8:16])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v), strict=True))


def _rewrite(src, fn):
    state = load_file(str(src / "model.safetensors"))
    fn(state)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unknown_tensors_are_listed_by_name(world1, tmp_path):
    src = hf_checkpoint("llama-gqa", tmp_path / "src")

    def damage(state):
        del state["model.layers.1.mlp.up_proj.weight"]
        state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)

    _rewrite(src, damage)
    with pytest.raises(
        HFFormatError,
        match=r"missing \['model.layers.1.mlp.up_proj.weight'\], unknown "
        r"\['model.layers.1.mlp.extra.weight'\]",
    ):
        import_hf(src, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_moe_checkpoints_of_a_layout_we_do_not_map_are_refused_listing_those_we_map(world1, tmp_path):
    """MoE layouts import (Qwen3-MoE, Qwen2-MoE, OLMoE: tests/unit/test_hf_moe.py); others are refused."""
    src = hf_checkpoint("llada", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "dbrx", "num_experts": 64}))
    with pytest.raises(
        HFFormatError,
        match=r"model_type 'dbrx' is a mixture-of-experts checkpoint of a layout we do not map "
        r"\(we map: [^)]*\bolmoe\b[^)]*\bqwen2_moe\b[^)]*\bqwen3_moe\b",
    ):
        import_hf(src, tmp_path / "ours")


def test_mask_id_comes_from_config_or_option_and_is_checked_against_the_tokenizer(world1, tmp_path):
    from tokenizers import Tokenizer, models

    src = hf_checkpoint("qwen2-gqa-bias", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["mask_token_id"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match=r"no mask_token_id.*--mask-id"):
        import_hf(src, tmp_path / "ours")
    vocab = {f"t{i}": i for i in range(VOCAB)} | {"<|mask|>": 11}
    del vocab["t11"]
    Tokenizer(models.WordLevel(vocab, unk_token="t1")).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<|mask|>"}))
    with pytest.raises(HFFormatError, match=r"mask token id 12 is 't12', but tokenizer_config.json declares"):
        import_hf(src, tmp_path / "ours", mask_id=12)
    out = import_hf(src, tmp_path / "ours", mask_id=11)
    info = json.loads((out / "config.json").read_text())
    assert info["special_ids"]["mask"] == 11 and info["source"]["tokenizer"]["mask_token"] == "<|mask|>"
    assert (out / "hf_tokenizer" / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    assert "sentencepiece" in info["source"]["tokenizer"]["note"]


@pytest.mark.parametrize("kind, name", [("llama-gqa", "Llama"), ("qwen3-gqa-headdim", "Qwen3")])
def test_attention_bias_on_the_output_projection_is_refused(world1, tmp_path, kind, name):
    src = hf_checkpoint(kind, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(HFFormatError, match=rf"attention_bias=true \({name} puts .*only Q/K/V biases"):
        import_hf(src, tmp_path / "ours")


def test_sliding_window_layers_are_refused(world1, tmp_path):
    src = hf_checkpoint("qwen3-gqa-headdim", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    layers = ["full_attention", "sliding_attention"]
    (src / "config.json").write_text(json.dumps({**config, "layer_types": layers}))
    with pytest.raises(
        HFFormatError, match=r"layer_types has 'sliding_attention' layers: only full attention"
    ):
        import_hf(src, tmp_path / "ours")

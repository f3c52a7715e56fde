"""Hugging Face imports and the architecture options at TP=2 (2 real gloo processes).

Imported checkpoints, loaded shard by shard at TP=2, give transformers' bidirectional logits
(1e-4 relative, fp32); GQA + Q/K/V bias + tied head + padded vocabulary, and the attention options
(explicit head_dim, q/k norm per head or over the whole projection, partial RoPE), give the same
logits, gradients and random initialisation at TP=2 as at TP=1 (2e-5 relative / 1e-6 absolute,
as test_tp_parity).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.hf.convert import import_hf
from tests._hf_models import VOCAB, hf_checkpoint, reference_logits, reference_model
from tests.conftest import tiny_model_config
from tests.distributed._launch import torchrun

KINDS = ("llama-gqa", "llama-tied-llama3rope", "qwen2-gqa-bias", "qwen3-gqa-headdim", "llada")
# export name -> model options, each a TP=1 model written as an export, run at TP=2 and TP=1
ARCHS = {
    "arch": dict(n_kv_heads=2, qkv_bias=True, tie_embeddings=True),
    "attn_full": dict(n_kv_heads=2, head_dim=24, qk_norm="full", partial_rotary_factor=0.5),
    "attn_head": dict(n_kv_heads=2, head_dim=20, qk_norm="head", partial_rotary_factor=0.5),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, world1):
    from tests._models import dense_model

    root = tmp_path_factory.mktemp("hf_tp")
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    refs = {}
    for kind in KINDS:
        src = hf_checkpoint(kind, root / "src" / kind)
        import_hf(src, root / "imports" / kind)
        refs[kind] = reference_logits(reference_model(kind, src), tokens)
    # archs: TP=1 models with the options on, random biases and norm weights, written as exports
    for name, options in ARCHS.items():
        cfg = tiny_model_config(**options)
        torch.manual_seed(3)
        model = dense_model(cfg)
        (root / "archs" / name).mkdir(parents=True)
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        for key in state:
            if key.endswith("qkv.bias"):
                state[key].normal_(0, 0.1)
            elif key.endswith("norm.weight"):
                state[key].normal_(1.0, 0.3)
        save_file(state, str(root / "archs" / name / "model.safetensors"))
        (root / "archs" / name / "config.json").write_text(json.dumps({"model": vars(cfg)}))
    proc = torchrun(Path(__file__).with_name("_hf_tp_worker.py"), 2, str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(root / "results.pt"), refs


@pytest.mark.parametrize("kind", KINDS)
def test_imported_checkpoint_at_tp2_gives_transformers_bidirectional_logits(results, kind):
    res, refs = results
    ours, ref = res["kinds"][kind][..., :VOCAB], refs[kind]
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def _assert_tp2_equals_tp1(res: dict, arch: str) -> dict:
    tp1, tp2 = res["arch"][arch]["tp1"], res["arch"][arch]["tp2"]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=2e-5, atol=1e-6)
    assert tp1["grads"].keys() == tp2["grads"].keys()
    for name in tp1["grads"]:
        torch.testing.assert_close(tp2["grads"][name], tp1["grads"][name], rtol=2e-5, atol=1e-6, msg=name)
    for name, t in res["init"][arch]["tp1"].items():  # use_cpu_initialization: the same weights at any TP
        assert torch.equal(res["init"][arch]["tp2"][name], t), name
    return tp1["grads"]


def test_gqa_bias_tied_head_and_padded_vocab_are_exact_at_tp2(results):
    res, _ = results
    grads = _assert_tp2_equals_tp1(res, "arch")
    assert "head.weight" not in grads  # tied: one matrix, listed as the embedding
    assert grads["layers.0.qkv.bias"].abs().sum() > 0


@pytest.mark.parametrize("arch", ["attn_full", "attn_head"])
def test_qk_norm_head_dim_and_partial_rope_are_exact_at_tp2(results, arch):
    """The "full" norm's sum of squares spans both ranks' heads (forward and backward); the "head"
    norm's replicated weight gets the gradient of all heads on every rank."""
    res, _ = results
    grads = _assert_tp2_equals_tp1(res, arch)
    width = {"attn_full": 4 * 24, "attn_head": 20}[arch]
    assert grads["layers.0.q_norm.weight"].shape == (width,)
    assert grads["layers.0.q_norm.weight"].abs().min() > 0 and grads["layers.0.k_norm.weight"].abs().sum() > 0

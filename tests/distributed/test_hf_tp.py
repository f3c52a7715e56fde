"""Hugging Face imports and the architecture options at TP=2 (2 real gloo processes).

Imported checkpoints, loaded shard by shard at TP=2, give transformers' bidirectional logits
(1e-4 relative, fp32); GQA + Q/K/V bias + tied head + padded vocabulary give the same logits,
gradients and random initialisation at TP=2 as at TP=1 (2e-5 relative / 1e-6 absolute, as
test_tp_parity).
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

KINDS = ("llama-gqa", "llama-tied-llama3rope", "qwen2-gqa-bias", "llada")


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
    # arch: a TP=1 model with every option on and random biases, written as an export
    cfg = tiny_model_config(n_kv_heads=2, qkv_bias=True, tie_embeddings=True)
    torch.manual_seed(3)
    model = dense_model(cfg)
    (root / "arch").mkdir()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in state:
        if name.endswith("qkv.bias"):
            state[name].normal_(0, 0.1)
    save_file(state, str(root / "arch" / "model.safetensors"))
    (root / "arch" / "config.json").write_text(json.dumps({"model": vars(cfg)}))
    proc = torchrun(Path(__file__).with_name("_hf_tp_worker.py"), 2, str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(root / "results.pt"), refs


@pytest.mark.parametrize("kind", KINDS)
def test_imported_checkpoint_at_tp2_gives_transformers_bidirectional_logits(results, kind):
    res, refs = results
    ours, ref = res["kinds"][kind][..., :VOCAB], refs[kind]
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_gqa_bias_tied_head_and_padded_vocab_are_exact_at_tp2(results):
    res, _ = results
    tp1, tp2 = res["arch"]["tp1"], res["arch"]["tp2"]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=2e-5, atol=1e-6)
    assert tp1["grads"].keys() == tp2["grads"].keys()
    assert "head.weight" not in tp1["grads"]  # tied: one matrix, listed as the embedding
    for name in tp1["grads"]:
        torch.testing.assert_close(tp2["grads"][name], tp1["grads"][name], rtol=2e-5, atol=1e-6, msg=name)
    assert tp1["grads"]["layers.0.qkv.bias"].abs().sum() > 0
    for name, t in res["init"]["tp1"].items():  # use_cpu_initialization: the same weights at any TP
        assert torch.equal(res["init"]["tp2"][name], t), name

"""Hugging Face import/export of the mixture-of-experts family (Qwen3-MoE, Qwen2-MoE, OLMoE) at TP=1:
logits equal transformers', round trips are bit-exact per tensor, our own MoE configs export to
the layout that holds them, and what no layout holds is refused with the option named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.engine.export import load_exported
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.model import MoETransformer
from pipeline.hf.convert import export_hf, import_hf
from pipeline.model.hf_format import HFFormatError
from tests._hf_models import MASK_ID, MOE_KINDS, VOCAB, hf_checkpoint, reference_logits, round_trip

RTOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
# kind -> the layers that are a mixture of experts
MOE_LAYERS = {"qwen3-moe": [1, 2], "qwen2-moe": [1, 3], "olmoe": [0, 1]}


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _transformers(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("kind", list(MOE_KINDS))
def test_imported_moe_model_logits_equal_transformers_with_bidirectional_mask(world1, tmp_path, kind):
    src = hf_checkpoint(kind, tmp_path / "src")
    model, info = load_exported(import_hf(src, tmp_path / "ours"))
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens=tokens)
    ref = reference_logits(_transformers(src), tokens)
    assert _rel_err(logits[..., :VOCAB], ref) < RTOL
    assert (logits[..., VOCAB:] < -1e29).all()  # the padded vocabulary is never a candidate
    layout = MOE_KINDS[kind][0]
    assert info["source"]["layout"] == layout and info["model"]["family"] == "moe"
    assert info["special_ids"]["mask"] == MASK_ID
    assert [i for i, block in enumerate(model.layers) if hasattr(block, "moe")] == MOE_LAYERS[kind]


@pytest.mark.parametrize("kind", list(MOE_KINDS))
def test_moe_import_then_export_is_bit_exact_and_loads_in_transformers(world1, tmp_path, kind):
    src = hf_checkpoint(kind, tmp_path / "src")
    hf, config = round_trip(src, tmp_path)
    assert config["architectures"] == [ARCHITECTURE[MOE_KINDS[kind][0]]] and config["is_causal"] is False
    tokens = _tokens()
    ref = reference_logits(_transformers(src), tokens)
    exported = _transformers(hf)
    with torch.no_grad():  # no mask given: is_causal false makes transformers attend both ways
        theirs = exported(input_ids=tokens).logits
    assert _rel_err(theirs, ref) < RTOL


@pytest.mark.parametrize("kind", list(MOE_KINDS))
def test_fused_expert_checkpoint_imports_the_same_weights_as_per_expert(world1, tmp_path, kind):
    per_expert = import_hf(hf_checkpoint(kind, tmp_path / "src"), tmp_path / "a")
    fused_src = hf_checkpoint(kind, tmp_path / "fused", fused_experts=True)
    assert any(
        n.endswith("mlp.experts.gate_up_proj") for n in load_file(str(fused_src / "model.safetensors"))
    )
    fused = import_hf(fused_src, tmp_path / "b")
    a, b = load_file(str(per_expert / "model.safetensors")), load_file(str(fused / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _tiny_moe(**overrides) -> MoEConfig:
    """configs/model/tiny-moe.yaml with a softmax router (no groups, no score bias, unscaled), sized
    for the test vocabulary, then ``overrides``."""
    cfg = yaml.safe_load((ROOT / "configs/model/tiny-moe.yaml").read_text())
    cfg.update(vocab_size=VOCAB, seq_len=32, score_func="softmax", score_bias=False, n_group=1, topk_group=1,
               routed_scaling_factor=1.0, init_std=0.1)  # fmt: skip
    out = MoEConfig(**(cfg | overrides))
    out.validate()
    return out


def _our_export(cfg: MoEConfig, out: Path, dims=None) -> MoETransformer | None:
    """An export directory of ``cfg``: a model's weights (``dims`` given) or a placeholder tensor."""
    out.mkdir()
    model, state = None, {"placeholder": torch.zeros(1)}
    if dims is not None:
        torch.manual_seed(0)
        model = MoETransformer(cfg, dims).eval()
        with torch.no_grad():  # norms away from 1, so a swapped or dropped norm shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape))
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file(state, str(out / "model.safetensors"))
    ids = {"pad": 0, "mask": MASK_ID, "bos": 2, "eos": 3}
    (out / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg), "special_ids": ids}))
    return model


@pytest.mark.parametrize(
    ("overrides", "architecture"),
    [
        # tiny-moe as it is (a shared expert, layer 0 dense) with the shared expert gated
        (dict(shared_expert_gate=True), "Qwen2MoeForCausalLM"),
        (dict(n_shared_experts=0, qk_norm="head", n_kv_heads=2, mlp_only_layers=[2]), "Qwen3MoeForCausalLM"),
        (dict(n_shared_experts=0, first_k_dense_replace=0, qk_norm="full", n_kv_heads=2), "OlmoeForCausalLM"),
    ],
)
def test_our_moe_config_exports_to_the_layout_that_holds_it(world1, tmp_path, overrides, architecture):
    cfg = _tiny_moe(**overrides)
    model = _our_export(cfg, tmp_path / "export", world1)
    hf = export_hf(tmp_path / "export", tmp_path / "hf")
    theirs = _transformers(hf)
    assert type(theirs).__name__ == architecture
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens=tokens)[..., :VOCAB]
        assert _rel_err(theirs(input_ids=tokens).logits, ours) < RTOL
    # and back: the same tensors (the padded vocabulary rows, never used, come back zero)
    back = load_file(str(import_hf(hf, tmp_path / "back") / "model.safetensors"))
    assert back.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        rows = VOCAB if name in ("embedding.weight", "head.weight") else None
        assert torch.equal(back[name][:rows], p.detach()[:rows]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(score_func="sigmoid"), r"score_func='sigmoid': no MoE transformers layout we export \(Qwen3-MoE, "
                                     r"Qwen2-MoE, OLMoE\) routes with sigmoid scores"),
        (dict(score_bias=True, shared_expert_gate=True), r"score_bias=true: no MoE transformers layout we export "
                                                         r".* has a score-correction bias"),
        (dict(n_group=4, topk_group=2), r"n_group=4: no MoE .* limits routing to groups of experts"),
        (dict(routed_scaling_factor=2.5), r"routed_scaling_factor=2.5: no MoE .* scales the routed experts'"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5: no MoE .* rotates only part of each head"),
        ({}, r"n_shared_experts=1 without shared_expert_gate: Qwen2-MoE \(the layout with a shared expert\) "
             r"scales the shared expert by a sigmoid gate"),
        (dict(shared_expert_gate=True, qk_norm="head"), r"qk_norm='head' with shared experts: Qwen2-MoE .* has "
                                                        r"no q/k norms"),
        (dict(n_shared_experts=0), r"qk_norm='none' without shared experts: no MoE transformers layout we export "
                                   r"holds it"),
        (dict(n_shared_experts=0, qk_norm="head", qkv_bias=True), r"qkv_bias with qk_norm='head': Qwen3-MoE"),
        (dict(n_shared_experts=0, qk_norm="full"), r"qk_norm='full' with dense layers \[0\] .*OLMoE \(the layout "
                                                   r"with qk_norm='full'\) has a mixture of experts in every layer"),
        (dict(first_k_dense_replace=0, qk_norm="full", shared_expert_gate=True),
         r"qk_norm='full' with n_shared_experts=1: OLMoE"),
    ],
)  # fmt: skip
def test_moe_export_refuses_what_no_layout_holds_naming_the_option(world1, tmp_path, overrides, message):
    _our_export(_tiny_moe(**overrides), tmp_path / "export")
    with pytest.raises(HFFormatError, match=message):
        export_hf(tmp_path / "export", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("qwen3-moe", dict(model_type="mixtral"), r"model_type 'mixtral' is a mixture-of-experts checkpoint of a "
         r"layout we do not map \(we map: [^)]*olmoe[^)]*qwen2_moe[^)]*qwen3_moe"),
        ("qwen2-moe", dict(model_type="deepseek_v3"), r"model_type 'deepseek_v3' is a mixture-of-experts "
         r"checkpoint of a layout we do not map"),
        ("qwen3-moe", dict(use_sliding_window=True), r"unsupported architecture options: use_sliding_window=True "
         r"\(need False\)"),
        ("qwen2-moe", dict(layer_types=["full_attention", "sliding_attention"] * 2),
         r"layer_types has 'sliding_attention' layers: only full attention is supported"),
        ("qwen3-moe", dict(attention_bias=True), r"attention_bias=true \(Qwen3-MoE puts a bias on q, k, v and "
         r"o_proj\): only Q/K/V biases are supported"),
        ("olmoe", dict(attention_bias=True), r"attention_bias=true \(OLMoE puts a bias on q, k, v and o_proj\)"),
        ("olmoe", dict(clip_qkv=8.0), r"clip_qkv=8.0 \(OLMoE then clips q, k and v\): only unclipped full "
         r"attention"),
        ("olmoe", dict(sliding_window=16), r"sliding_window=16 \(OLMoE then attends within a sliding window\)"),
        ("olmoe", dict(head_dim=24), r"head_dim=24 differs from hidden_size / num_attention_heads: OLMoE's "
         r"q_norm is hidden_size wide"),
        ("qwen2-moe", dict(shared_expert_intermediate_size=0), r"'shared_expert_intermediate_size' is 0, "
         r"expected >= 1"),
        ("qwen3-moe", dict(hidden_act="gelu"), r"hidden_act='gelu' \(need 'silu'\)"),
        ("qwen3-moe", dict(mlp_only_layers=[0, "1"]), r"'mlp_only_layers\[1\]' is '1', expected an integer"),
        ("qwen3-moe", dict(num_experts_per_tok=9), r"describes a model we cannot build: key 'model.top_k': "
         r"got 9, expected <= n_experts=8"),
        ("qwen3-moe", dict(mlp_only_layers=[0, 1, 2]), r"describes a model we cannot build: .*no layer is left a "
         r"mixture of experts"),
    ],
)  # fmt: skip
def test_moe_checkpoints_we_cannot_hold_are_refused_naming_the_key(world1, tmp_path, kind, changes, message):
    src = hf_checkpoint(kind, tmp_path / "src")
    _edit_config(src, **changes)
    with pytest.raises(HFFormatError, match=message) as err:
        import_hf(src, tmp_path / "ours")
    if "model_type" not in changes:
        assert str(src / "config.json") in str(err.value)
    assert not (tmp_path / "ours").exists()


def test_qwen3_moe_expert_count_is_read_from_num_experts_or_num_local_experts(world1, tmp_path):
    """transformers writes Qwen3-MoE's count as num_local_experts, published checkpoints as num_experts."""
    src = hf_checkpoint("qwen3-moe", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    assert config.get("num_local_experts") == 8  # as save_pretrained writes it
    config["num_experts"] = config.pop("num_local_experts")
    (src / "config.json").write_text(json.dumps(config))
    info = json.loads((import_hf(src, tmp_path / "ours") / "config.json").read_text())
    assert info["model"]["n_experts"] == 8 and info["model"]["top_k"] == 2 and info["model"]["norm_topk_prob"]

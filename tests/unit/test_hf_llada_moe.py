"""Hugging Face import/export of LLaDA2 MoE (``llada2_moe``) and LLaDA-MoE (``lladamoe``) at TP=1.

Neither is in transformers, so the imported logits are compared with a plain-PyTorch reference built
from the published equations on the checkpoint's own tensors (tests/_hf_models.py
``llada_moe_reference``). Round trips are bit-exact per tensor, our own MoE configs export to the
LLaDA layout that holds them, and what we cannot hold is refused naming config.json, the key and the
value."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.engine.checkpoint import persistent_buffers
from pipeline.engine.export import load_exported
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.hf_llada import LLADA2_MOE, LLADA_MOE
from pipeline.families.moe.model import MoETransformer
from pipeline.hf.convert import export_hf, import_hf
from pipeline.model.hf_format import HFFormatError
from tests._hf_models import (
    LLADA_MOE_CONFIGS,
    MASK_ID,
    VOCAB,
    llada_moe_checkpoint,
    llada_moe_reference,
    round_trip,
)

RTOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]
KINDS = list(LLADA_MOE_CONFIGS)
MOE_LAYERS = {"llada2_moe": [1, 2], "lladamoe": [1, 3]}
ARCHITECTURE = {"llada2_moe": "LLaDA2MoeModelLM", "lladamoe": "LLaDAMoEModelLM"}
# routing without the expert bias (LLaDA-MoE: nor in the weights), and LLaDA2's without its groups
NO_BIAS = {
    "llada2_moe": dict(score_bias=False),
    "lladamoe": dict(score_bias=False, score_bias_in_weights=False),
}


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _changed(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens chose another set of experts."""
    return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_imported_llada_moe_logits_equal_the_published_equations(world1, tmp_path, kind):
    src = llada_moe_checkpoint(kind, tmp_path / "src")
    model, info = load_exported(import_hf(src, tmp_path / "ours"))
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens=tokens)
    ref, routes = llada_moe_reference(src, tokens)
    assert _rel_err(logits[..., :VOCAB], ref) < RTOL
    assert (logits[..., VOCAB:] < -1e29).all()  # the padded vocabulary is never a candidate
    assert info["source"]["layout"] == kind and info["special_ids"]["mask"] == MASK_ID
    assert [i for i, block in enumerate(model.layers) if hasattr(block, "moe")] == MOE_LAYERS[kind]
    # the expert bias (and LLaDA2's groups) change the first MoE layer's choice: the test sees them
    unbiased_ref, unbiased = llada_moe_reference(src, tokens, **NO_BIAS[kind])
    assert _changed(routes[0], unbiased[0]) > 0 and _rel_err(logits[..., :VOCAB], unbiased_ref) > 1e-3
    if kind == "llada2_moe":
        assert _changed(routes[0], llada_moe_reference(src, tokens, n_group=1, topk_group=1)[1][0]) > 0
    else:  # the same choice, but weights without the bias: far off too
        plain_weights = llada_moe_reference(src, tokens, score_bias_in_weights=False)[0]
        assert _rel_err(logits[..., :VOCAB], plain_weights) > 1e-3


def _fields(cfg: MoEConfig, *names: str) -> dict:
    return {n: getattr(cfg, n) for n in names}


def test_llada_configs_map_to_the_routing_their_modeling_files_compute():
    """LLaDA2: sigmoid + bias for the choice, groups, renormalised (k > 1), x2.5, shared = 2 x 16 wide;
    LLaDA-MoE: softmax + bias in the weights, unnormalised, unscaled, dense layers from moe_layer_freq."""
    llada2 = LLADA2_MOE.read_config(LLADA_MOE_CONFIGS["llada2_moe"], set(), None, 128).model
    assert _fields(llada2, "score_func", "score_bias", "score_bias_in_weights", "norm_topk_prob") == dict(
        score_func="sigmoid", score_bias=True, score_bias_in_weights=False, norm_topk_prob=True
    )
    assert _fields(llada2, "routed_scaling_factor", "n_group", "topk_group", "group_score") == dict(
        routed_scaling_factor=2.5, n_group=4, topk_group=2, group_score="top2_sum"
    )
    assert _fields(llada2, "n_shared_experts", "shared_hidden", "shared_expert_gate", "qk_norm") == dict(
        n_shared_experts=2, shared_hidden=32, shared_expert_gate=False, qk_norm="head"
    )
    assert _fields(llada2, "head_size", "rotary_dim", "qkv_bias") == dict(
        head_size=24, rotary_dim=12, qkv_bias=True
    )
    assert llada2.moe_layers() == [1, 2]
    lladamoe = LLADA_MOE.read_config(LLADA_MOE_CONFIGS["lladamoe"], set(), None, 128).model
    assert _fields(lladamoe, "score_func", "score_bias", "score_bias_in_weights", "norm_topk_prob") == dict(
        score_func="softmax", score_bias=True, score_bias_in_weights=True, norm_topk_prob=False
    )
    assert _fields(lladamoe, "routed_scaling_factor", "n_group", "n_shared_experts", "shared_hidden") == dict(
        routed_scaling_factor=1.0, n_group=1, n_shared_experts=1, shared_hidden=24
    )
    assert _fields(lladamoe, "first_k_dense_replace", "mlp_only_layers", "qk_norm", "head_size") == dict(
        first_k_dense_replace=1, mlp_only_layers=[2], qk_norm="head", head_size=16
    )
    assert lladamoe.moe_layers() == [1, 3] and lladamoe.rotary_dim == 8 and lladamoe.tie_embeddings
    top1 = LLADA2_MOE.read_config(
        LLADA_MOE_CONFIGS["llada2_moe"] | {"num_experts_per_tok": 1}, set(), None, 128
    )
    assert top1.model.norm_topk_prob is False  # LLaDA2 weighs a single expert by its raw score


@pytest.mark.parametrize("kind", KINDS)
def test_llada_moe_import_then_export_is_bit_exact_and_imports_the_same_model(world1, tmp_path, kind):
    src = llada_moe_checkpoint(kind, tmp_path / "src")
    hf, config = round_trip(src, tmp_path)  # every source tensor back with its bits
    assert config["model_type"] == kind and config["architectures"] == [ARCHITECTURE[kind]]
    assert config["auto_map"] == LLADA_MOE_CONFIGS[kind]["auto_map"]
    again = import_hf(hf, tmp_path / "again")
    first, second = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "ours", again))
    assert first["model"] == second["model"] and first["special_ids"] == second["special_ids"]
    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "ours", again))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_llada_moe_checkpoint_with_the_published_model_type_llada_imports_as_lladamoe(world1, tmp_path):
    """LLaDA-MoE-7B-A1B's config.json says model_type "llada" (LLaDA-8B's, whose tensors are named otherwise)."""
    src = llada_moe_checkpoint("lladamoe", tmp_path / "src", model_type="llada")
    info = json.loads((import_hf(src, tmp_path / "ours") / "config.json").read_text())
    assert info["source"]["layout"] == "lladamoe" and info["source"]["model_type"] == "llada"


def _tiny_moe(**overrides) -> MoEConfig:
    """configs/model/tiny-moe.yaml (LLaDA2's router: sigmoid, score bias, 4 groups keep 2, x2.5, one
    ungated shared expert, layer 0 dense) sized for the test vocabulary, then ``overrides``."""
    cfg = yaml.safe_load((ROOT / "configs/model/tiny-moe.yaml").read_text())
    out = MoEConfig(**(cfg | dict(vocab_size=VOCAB, seq_len=32, init_std=0.1) | overrides))
    out.validate()
    return out


def _our_export(
    cfg: MoEConfig, out: Path, dims=None
) -> tuple[MoETransformer | None, dict[str, torch.Tensor]]:
    """An export directory of ``cfg``: a random model's weights and score biases (``dims`` given), or a
    placeholder tensor; returns the model and the tensors written."""
    out.mkdir()
    model, state = None, {"placeholder": torch.zeros(1)}
    if dims is not None:
        torch.manual_seed(0)
        model = MoETransformer(cfg, dims).eval()
        with torch.no_grad():  # norms away from 1, biases and score biases nonzero, so a dropped one shows
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith("norm.weight"):
                    t.copy_(1 + 0.2 * torch.randn(t.shape))
                elif name.endswith("bias"):
                    t.copy_(0.1 * torch.randn(t.shape))
        state = {n: p.detach().clone() for n, p in model.named_parameters()} | persistent_buffers(model)
    save_file(state, str(out / "model.safetensors"))
    ids = {"pad": 0, "mask": MASK_ID, "bos": 2, "eos": 3}
    (out / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg), "special_ids": ids}))
    return model, state


LLADA2_HEADS = dict(qk_norm="head", n_kv_heads=2, head_dim=24, partial_rotary_factor=0.5, qkv_bias=True)
LLADAMOE_ROUTER = dict(
    score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1
)


@pytest.mark.parametrize(
    ("overrides", "layout"),
    [
        ({}, "llada2_moe"),  # tiny-moe as it is
        (dict(LLADA2_HEADS, n_shared_experts=2, top_k=3), "llada2_moe"),
        (dict(LLADAMOE_ROUTER, score_bias_in_weights=True, qk_norm="head", partial_rotary_factor=0.5,
              mlp_only_layers=[2]), "lladamoe"),
        # no bias, no q/k norm, an ungated shared expert: no transformers layout holds it, LLaDA-MoE does
        (dict(LLADAMOE_ROUTER, score_bias=False), "lladamoe"),
    ],
)  # fmt: skip
def test_our_moe_config_exports_to_the_llada_layout_that_holds_it_and_back(
    world1, tmp_path, overrides, layout
):
    cfg = _tiny_moe(**overrides)
    model, state = _our_export(cfg, tmp_path / "export", world1)
    assert any(n.endswith("score_bias") for n in state) == cfg.score_bias
    hf = export_hf(tmp_path / "export", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == layout and config["architectures"] == [ARCHITECTURE[layout]]
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens=tokens)[..., :VOCAB]
    assert _rel_err(ours, llada_moe_reference(hf, tokens)[0]) < RTOL  # the published equations agree
    back = load_file(str(import_hf(hf, tmp_path / "back") / "model.safetensors"))
    assert back.keys() == state.keys()
    for name, t in state.items():
        rows = VOCAB if name in ("embedding.weight", "head.weight") else None
        assert torch.equal(back[name][:rows], t[:rows]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(group_score="max"), r"^group_score='max': LLaDA2 scores a group by the sum of its top two$"),
        (dict(norm_topk_prob=False), r"^norm_topk_prob=false with top_k=2: LLaDA2 renormalises the chosen experts' "
                                     r"weights if and only if top_k > 1$"),
        (dict(top_k=1), r"^norm_topk_prob=true with top_k=1: LLaDA2 renormalises"),
        (dict(shared_expert_gate=True), r"^shared_expert_gate=true: LLaDA2 adds its shared experts ungated$"),
        (dict(shared_ffn_hidden=48), r"^shared_ffn_hidden=48: LLaDA2's shared experts are moe_intermediate_size x "
                                     r"num_shared_experts wide \(a multiple of moe_ffn_hidden=32\)$"),
        (dict(qk_norm="full"), r"^qk_norm='full': LLaDA2 normalises q and k per head \(use_qk_norm\)$"),
        (dict(mlp_only_layers=[2]), r"^dense layers \[0, 2\] \(decoder_sparse_step, mlp_only_layers\): LLaDA2's "
                                    r"dense layers are its first first_k_dense_replace layers$"),
        (dict(score_bias_in_weights=True), r"^score_bias_in_weights=true: LLaDA2 adds its expert_bias for the "
                                           r"choice only$"),
        (dict(score_bias=False), r"^score_func='sigmoid': no MoE transformers layout we export \(Qwen3-MoE, "
                                 r"Qwen2-MoE, OLMoE\) routes with sigmoid scores \(all use softmax\); nor a LLaDA "
                                 r"layout: score_bias=false: LLaDA2's router always adds a score-correction bias"),
        (dict(LLADAMOE_ROUTER, score_bias_in_weights=True, norm_topk_prob=True),
         r"^norm_topk_prob=true: LLaDA-MoE never renormalises the chosen experts' weights$"),
        (dict(LLADAMOE_ROUTER, score_bias_in_weights=True, qkv_bias=True),
         r"^qkv_bias=true: LLaDA-MoE's attention_bias puts a bias on o_proj too$"),
        (dict(LLADAMOE_ROUTER, score_bias_in_weights=True, head_dim=24),
         r"^head_dim=24: LLaDA-MoE's heads are d_model / n_heads wide$"),
        (dict(LLADAMOE_ROUTER, score_bias_in_weights=True, routed_scaling_factor=2.5),
         r"^routed_scaling_factor=2.5: LLaDA-MoE does not scale the routed experts' weights$"),
        (dict(LLADAMOE_ROUTER, score_bias_in_weights=True, n_group=4, topk_group=2),
         r"^n_group=4: LLaDA-MoE does not limit routing to groups of experts$"),
        (dict(LLADAMOE_ROUTER, score_bias=False, shared_expert_gate=True, qk_norm="head"),
         r"qk_norm='head' with shared experts: Qwen2-MoE .* has no q/k norms; nor a LLaDA layout: "
         r"shared_expert_gate=true: LLaDA-MoE adds its shared expert ungated$"),
    ],
)  # fmt: skip
def test_moe_export_to_a_llada_layout_refuses_what_it_cannot_hold_naming_the_option(
    world1, tmp_path, overrides, message
):
    _our_export(_tiny_moe(**overrides), tmp_path / "export")
    with pytest.raises(HFFormatError, match=message):
        export_hf(tmp_path / "export", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("llada2_moe", dict(use_bias=True), r"use_bias=True: LLaDA2 then puts a bias on the attention output "
         r"projection \(attention.dense\); only Q/K/V biases \(use_qkv_bias\) are supported"),
        ("llada2_moe", dict(norm_head=True), r"norm_head=True: a normalised LM head is not supported"),
        ("llada2_moe", dict(use_sliding_window=True), r"unsupported architecture options: use_sliding_window=True "
         r"\(need False\)"),
        ("llada2_moe", dict(num_shared_experts=0), r"num_shared_experts=0: expected >= 1, or null for no shared "
         r"experts"),
        ("llada2_moe", dict(hidden_act="gelu"), r"hidden_act='gelu' \(need 'silu'\)"),
        ("llada2_moe", dict(num_experts=None), r"no 'num_experts' \(expected an integer\)"),
        ("llada2_moe", dict(n_group=3), r"describes a model we cannot build: key 'model.n_group': 3 does not divide "
         r"n_experts=8"),
        ("llada2_moe", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"RoPE scaling 'yarn' is not "
         r"supported"),
        ("lladamoe", dict(attention_bias=True), r"attention_bias=True: LLaDA-MoE then puts a bias on q, k, v and "
         r"o_proj; only Q/K/V biases are supported"),
        ("lladamoe", dict(clip_qkv=8.0), r"clip_qkv=8.0: LLaDA-MoE then clips q, k and v; not supported"),
        ("lladamoe", dict(head_dim=24), r"head_dim=24: LLaDA-MoE's heads are hidden_size / num_attention_heads = 16 "
         r"wide"),
        ("lladamoe", dict(moe_layer_freq=[0, 1, 1]), r"'moe_layer_freq' is \[0, 1, 1\], expected a list of "
         r"num_hidden_layers=4 integers \(0: a dense layer\)"),
        ("lladamoe", dict(moe_layer_freq=[0, 1, "1", 1]), r"'moe_layer_freq\[2\]' is '1', expected an integer"),
        ("lladamoe", dict(shared_expert_intermediate_size=0), r"shared_expert_intermediate_size=0: expected >= 1, "
         r"or null for no shared expert"),
        ("lladamoe", dict(partial_rotary_factor=None), r"no 'partial_rotary_factor' \(expected a number\)"),
        ("lladamoe", dict(rope_theta=-1), r"describes a model we cannot build: key 'model.rope_theta': got -1.0, "
         r"expected > 0"),
        ("lladamoe", dict(moe_layer_freq=[0, 0, 0, 0]), r"no layer is left a mixture of experts"),
    ],
)  # fmt: skip
def test_llada_moe_checkpoints_we_cannot_hold_are_refused_naming_the_key(
    world1, tmp_path, kind, changes, message
):
    src = llada_moe_checkpoint(kind, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | changes))
    with pytest.raises(HFFormatError, match=message) as err:
        import_hf(src, tmp_path / "ours")
    assert str(err.value).startswith(f"{src / 'config.json'}: ")
    assert not (tmp_path / "ours").exists()


def test_llada2_without_use_bias_takes_its_config_class_default_and_is_refused(world1, tmp_path):
    src = llada_moe_checkpoint("llada2_moe", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["use_bias"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        HFFormatError, match=r"use_bias=absent \(LLaDA2MoeConfig's default: true\): LLaDA2 then"
    ):
        import_hf(src, tmp_path / "ours")


def test_llada2_mini_config_json_reads_as_the_llada2_mini_preset():
    """LLaDA2.0-mini's published config.json values (as third-party fixtures quote them) are the preset."""
    config = {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184,
        "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu", "use_qkv_bias": False, "use_qk_norm": True,
        "use_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "max_position_embeddings": 32768,
        "rope_theta": 600000, "partial_rotary_factor": 0.5, "num_experts": 256, "num_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "moe_intermediate_size": 512, "first_k_dense_replace": 1, "score_function": "sigmoid",
        "norm_topk_prob": True, "moe_router_enable_expert_bias": True, "pad_token_id": 156892,
    }  # fmt: skip
    preset = yaml.safe_load((ROOT / "configs/model/llada2-mini.yaml").read_text())
    source = LLADA2_MOE.read_config(config, set(), preset["seq_len"], 128)
    assert dataclasses.asdict(source.model) == dataclasses.asdict(MoEConfig(**preset))

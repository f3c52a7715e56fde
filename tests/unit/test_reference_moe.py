"""The plain MoE reference (tests/reference_moe.py) proven against transformers' own MoE blocks.

Tiny random float64 blocks of Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3 and DeepSeek-V2, their
weights copied into the reference's plain dict (transformers 5.x fuses an expert's gate and up rows as
gate_up_proj [E, 2F, D], gate first). transformers pins its routers to float32; ``hf_router_in_fp64``
lifts only that pin for float64 tensors so outputs can agree to 1e-12 (the unpinned run is checked to
1e-5). Each contract detail is also mutated once and must then change the output.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3
from transformers.models.mixtral import modeling_mixtral as mixtral
from transformers.models.olmoe import modeling_olmoe as olmoe
from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

from tests import reference
from tests.reference_moe import inner_sgd_per_expert, merge_fast, moe_cfg, moe_ffn, route

D = 16
TOL = 1e-12
# transformers' eager experts loop (what a standalone block falls back to anyway, said out loud)
HF_BASE = dict(hidden_size=D, num_attention_heads=4, experts_implementation="eager")


@contextlib.contextmanager
def hf_router_in_fp64():
    """Inside: a float64 tensor asked to become float32 (softmax(dtype=float32), .float(), .type(float32),
    as transformers' routers do) stays float64. Nothing else changes."""
    f_softmax, t_softmax, t_type, t_float = (
        torch.nn.functional.softmax,
        torch.Tensor.softmax,
        torch.Tensor.type,
        torch.Tensor.float,
    )

    def keep(t: torch.Tensor, dtype) -> bool:
        return t.dtype == torch.float64 and dtype == torch.float32

    def softmax(input, *args, dtype=None, **kw):
        return f_softmax(input, *args, dtype=None if keep(input, dtype) else dtype, **kw)

    def tensor_softmax(self, *args, dtype=None, **kw):
        return t_softmax(self, *args, dtype=None if keep(self, dtype) else dtype, **kw)

    def tensor_type(self, *args, **kw):
        return self if args and keep(self, args[0]) else t_type(self, *args, **kw)

    def tensor_float(self, *args, **kw):
        return self if self.dtype == torch.float64 else t_float(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", softmax)
        mp.setattr(torch.Tensor, "softmax", tensor_softmax)
        mp.setattr(torch.Tensor, "type", tensor_type)
        mp.setattr(torch.Tensor, "float", tensor_float)
        yield


def randomise(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """float64, every parameter and buffer drawn N(0, std^2) from a seeded generator (by name)."""
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted([*module.named_parameters(), *module.named_buffers()]):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std)
    return module


def expert_weights(experts: torch.nn.Module) -> dict:
    """transformers 5.x fused experts -> w1 (gate, first half of gate_up_proj), w3 (up), w2 (down)."""
    F = experts.gate_up_proj.shape[1] // 2
    return {
        "w1": experts.gate_up_proj[:, :F].detach(),
        "w3": experts.gate_up_proj[:, F:].detach(),
        "w2": experts.down_proj.detach(),
    }


def shared_weights(mlp: torch.nn.Module) -> dict:
    return {
        "shared_gate": mlp.gate_proj.weight.detach(),
        "shared_up": mlp.up_proj.weight.detach(),
        "shared_down": mlp.down_proj.weight.detach(),
    }


@dataclass
class Case:
    block: torch.nn.Module
    weights: dict
    cfg: object


def qwen3_case() -> Case:
    c = Qwen3MoeConfig(
        **HF_BASE, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=12, norm_topk_prob=True,
    )  # fmt: skip
    b = randomise(qwen3.Qwen3MoeSparseMoeBlock(c), seed=1)
    w = {"router": b.gate.weight.detach(), "score_bias": None, **expert_weights(b.experts)}
    return Case(b, w, moe_cfg(n_experts=8, top_k=2, moe_ffn_hidden=12, norm_topk_prob=True))


def qwen2_case() -> Case:
    c = Qwen2MoeConfig(
        **HF_BASE, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=12, shared_expert_intermediate_size=20, norm_topk_prob=False,
    )  # fmt: skip
    b = randomise(qwen2.Qwen2MoeSparseMoeBlock(c), seed=2)
    w = {
        "router": b.gate.weight.detach(),
        "score_bias": None,
        **expert_weights(b.experts),
        **shared_weights(b.shared_expert),
        "shared_expert_gate": b.shared_expert_gate.weight.detach(),
    }
    cfg = moe_cfg(
        n_experts=8, top_k=3, moe_ffn_hidden=12, n_shared_experts=1, shared_ffn_hidden=20,
        shared_expert_gate=True, norm_topk_prob=False,
    )  # fmt: skip
    return Case(b, w, cfg)


def olmoe_case() -> Case:
    c = OlmoeConfig(**HF_BASE, num_experts=8, num_experts_per_tok=2, intermediate_size=12)
    b = randomise(olmoe.OlmoeSparseMoeBlock(c), seed=3)
    w = {"router": b.gate.weight.detach(), "score_bias": None, **expert_weights(b.experts)}
    return Case(b, w, moe_cfg(n_experts=8, top_k=2, moe_ffn_hidden=12, norm_topk_prob=c.norm_topk_prob))


def mixtral_case() -> Case:
    c = MixtralConfig(
        **HF_BASE, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, intermediate_size=12,
    )  # fmt: skip
    b = randomise(mixtral.MixtralSparseMoeBlock(c), seed=4)
    w = {"router": b.gate.weight.detach(), "score_bias": None, **expert_weights(b.experts)}
    return Case(b, w, moe_cfg(n_experts=8, top_k=2, moe_ffn_hidden=12, norm_topk_prob=True))


def deepseek_v3_case() -> Case:
    c = DeepseekV3Config(
        **HF_BASE, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2, moe_intermediate_size=8,
        norm_topk_prob=True,
    )  # fmt: skip
    b = randomise(ds3.DeepseekV3MoE(c), seed=5)  # e_score_correction_bias too: nonzero, random
    w = {
        "router": b.gate.weight.detach(),
        "score_bias": b.gate.e_score_correction_bias.detach(),
        **expert_weights(b.experts),
        **shared_weights(b.shared_experts),
    }
    cfg = moe_cfg(
        n_experts=16, top_k=4, moe_ffn_hidden=8, n_shared_experts=2, shared_ffn_hidden=16,
        score_func="sigmoid", score_bias=True, norm_topk_prob=True, routed_scaling_factor=2.5,
        n_group=4, topk_group=2, group_score="top2_sum",
    )  # fmt: skip
    return Case(b, w, cfg)


def deepseek_v2_case() -> Case:
    c = DeepseekV2Config(
        **HF_BASE, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.7, n_shared_experts=1,
        moe_intermediate_size=8,
    )  # fmt: skip
    b = randomise(ds2.DeepseekV2Moe(c), seed=6)
    w = {
        "router": b.gate.weight.detach(),
        "score_bias": None,
        **expert_weights(b.experts),
        **shared_weights(b.shared_experts),
    }
    cfg = moe_cfg(
        n_experts=16, top_k=4, moe_ffn_hidden=8, n_shared_experts=1, shared_ffn_hidden=8,
        score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.7, n_group=4, topk_group=2,
        group_score="max",
    )  # fmt: skip
    return Case(b, w, cfg)


CASES = {
    "qwen3_moe": qwen3_case,
    "qwen2_moe": qwen2_case,
    "olmoe": olmoe_case,
    "mixtral": mixtral_case,
    "deepseek_v3": deepseek_v3_case,
    "deepseek_v2": deepseek_v2_case,
}


def tokens(seed: int = 0, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_equals_transformers_moe_block(name):
    case, h = CASES[name](), tokens()
    y_ref, stats = moe_ffn(h, case.weights, case.cfg)
    with torch.no_grad(), hf_router_in_fp64():
        y_hf = case.block(h)
        hf_idx = case.block.gate(h.reshape(-1, D))[2]
    ref_idx = route(h.reshape(-1, D), case.weights["router"], case.weights["score_bias"], case.cfg)[0]
    assert torch.equal(ref_idx.sort(-1).values, hf_idx.sort(-1).values)
    assert stats["counts"].sum() == h.shape[0] * h.shape[1] * case.cfg.top_k
    assert y_hf.dtype == torch.float64 and (y_ref - y_hf).abs().max() <= TOL
    with torch.no_grad():  # transformers' own float32 router: the same result up to float32 rounding
        assert (y_ref - case.block(h)).abs().max() <= 1e-5


def swap_gate_up(w, cfg):
    return w | {"w1": w["w3"], "w3": w["w1"]}, cfg


def no_bias(w, cfg):
    return w, replace_cfg(cfg, score_bias=False)


def replace_cfg(cfg, **kw):
    return moe_cfg(**(vars(cfg) | kw))


MUTATIONS = [
    ("qwen3_moe", "gate/up halves swapped", swap_gate_up),
    ("qwen3_moe", "norm_topk_prob off", lambda w, c: (w, replace_cfg(c, norm_topk_prob=False))),
    ("qwen2_moe", "shared_expert_gate off", lambda w, c: (w, replace_cfg(c, shared_expert_gate=False))),
    ("qwen2_moe", "norm_topk_prob on", lambda w, c: (w, replace_cfg(c, norm_topk_prob=True))),
    ("olmoe", "down projection of experts 0 and 1 exchanged", lambda w, c: (w | {"w2": w["w2"][[1, 0, *range(2, 8)]]}, c)),
    ("mixtral", "sigmoid scores", lambda w, c: (w, replace_cfg(c, score_func="sigmoid"))),
    ("deepseek_v3", "score bias dropped", no_bias),
    ("deepseek_v3", "bias in the weights too", None),
    ("deepseek_v3", "no group limit", lambda w, c: (w, replace_cfg(c, n_group=1, topk_group=1))),
    ("deepseek_v3", "group score max", lambda w, c: (w, replace_cfg(c, group_score="max"))),
    ("deepseek_v3", "routed_scaling_factor 1", lambda w, c: (w, replace_cfg(c, routed_scaling_factor=1.0))),
    ("deepseek_v3", "shared experts dropped", lambda w, c: (
        {k: v for k, v in w.items() if not k.startswith("shared")}, replace_cfg(c, n_shared_experts=0))),
    ("deepseek_v2", "group score top2_sum", lambda w, c: (w, replace_cfg(c, group_score="top2_sum"))),
]  # fmt: skip


def biased_weights_moe_ffn(h, w, cfg):
    """The classic mistake: the chosen experts' weights taken from the biased choice scores."""
    idx, wts, _, scores = route(h.reshape(-1, D), w["router"], w["score_bias"], cfg)
    wrong = (scores + w["score_bias"]).gather(1, idx)
    wrong = wrong / (wrong.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    return (wrong - wts).abs().max()


@pytest.mark.parametrize("name, what, mutate", MUTATIONS, ids=[f"{n}-{w}" for n, w, _ in MUTATIONS])
def test_each_contract_detail_changes_the_output(name, what, mutate):
    """The comparison above can fail: every detail, changed alone, moves the output far past 1e-12."""
    case, h = CASES[name](), tokens()
    if mutate is None:
        assert biased_weights_moe_ffn(h, case.weights, case.cfg) > 1e-3
        return
    with torch.no_grad(), hf_router_in_fp64():
        y_hf = case.block(h)
    w, cfg = mutate(case.weights, case.cfg)
    assert (moe_ffn(h, w, cfg)[0] - y_hf).abs().max() > 1e-3, what


def test_aux_equals_transformers_load_balancing_loss_for_one_layer():
    case, h = qwen3_case(), tokens()
    _, stats = moe_ffn(h, case.weights, case.cfg)
    with torch.no_grad(), hf_router_in_fp64():
        logits = case.block.gate(h.reshape(-1, D))[0]  # raw router logits [B*T, E]; HF softmaxes them
        # HF takes a tuple with one [B*T, E] logits tensor per layer (a bare tensor gives 0)
        aux_hf = qwen3.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert abs(stats["aux"].item() - aux_hf.item()) <= TOL
    assert qwen3.load_balancing_loss_func(logits, num_experts=8, top_k=2) == 0
    # a zero router: uniform p, every token ties and picks the same k experts -> aux = k exactly
    _, uniform = moe_ffn(h, case.weights | {"router": torch.zeros(8, D, dtype=torch.float64)}, case.cfg)
    assert uniform["aux"].item() == pytest.approx(2.0, abs=TOL)
    assert sorted(uniform["counts"].tolist()) == [0, 0, 0, 0, 0, 0, 32, 32]
    assert uniform["entropy"].item() == pytest.approx(math.log(8), abs=TOL)


def test_z_loss_and_sigmoid_aux_and_entropy_match_a_hand_computation():
    gen = torch.Generator().manual_seed(7)
    E, N = 4, 3
    x = torch.randn(1, N, 2, generator=gen, dtype=torch.float64)
    w = {
        "router": torch.randn(E, 2, generator=gen, dtype=torch.float64),
        "score_bias": None,
        "w1": torch.zeros(E, 1, 2, dtype=torch.float64),
        "w3": torch.zeros(E, 1, 2, dtype=torch.float64),
        "w2": torch.zeros(E, 2, 1, dtype=torch.float64),
    }
    cfg = moe_cfg(n_experts=E, top_k=2, moe_ffn_hidden=1, score_func="sigmoid")
    _, stats = moe_ffn(x, w, cfg)
    L = (x[0] @ w["router"].t()).tolist()
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in L) / N
    s = [[1 / (1 + math.exp(-v)) for v in row] for row in L]
    p = [[v / sum(row) for v in row] for row in s]
    chosen = [sorted(range(E), key=lambda e, row=row: -row[e])[:2] for row in s]
    counts = [sum(e in c for c in chosen) for e in range(E)]
    aux = E * sum(counts[e] / N * sum(row[e] for row in p) / N for e in range(E))
    ent = sum(-sum(v * math.log(v) for v in row) for row in p) / N
    assert stats["counts"].tolist() == counts
    assert abs(stats["z"].item() - z) <= TOL
    assert abs(stats["aux"].item() - aux) <= TOL
    assert abs(stats["entropy"].item() - ent) <= TOL


def random_setup(seed: int = 11):
    """A DeepSeek-V3-like layer with every option on (bias, groups, shared experts and their gate)."""
    gen = torch.Generator().manual_seed(seed)
    E, F, S = 8, 6, 10

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    w = {
        "router": rnd(E, D), "score_bias": rnd(E, std=0.1), "w1": rnd(E, F, D), "w3": rnd(E, F, D),
        "w2": rnd(E, D, F), "shared_gate": rnd(S, D), "shared_up": rnd(S, D), "shared_down": rnd(D, S),
        "shared_expert_gate": rnd(1, D),
    }  # fmt: skip
    cfg = moe_cfg(
        n_experts=E, top_k=3, moe_ffn_hidden=F, n_shared_experts=1, shared_ffn_hidden=S,
        shared_expert_gate=True, score_func="sigmoid", score_bias=True, norm_topk_prob=True,
        routed_scaling_factor=1.5, n_group=4, topk_group=2,
    )  # fmt: skip
    return w, cfg, rnd


def fast_weights(rnd, adapter: str, lead: tuple = (), r: int = 2) -> dict:
    E, F, S = 8, 6, 10
    shapes = {  # projection -> (out, in), with the expert axis for experts.*
        "experts.gate": ((E,), F, D), "experts.up": ((E,), F, D), "experts.down": ((E,), D, F),
        "shared.gate": ((), S, D), "shared.up": ((), S, D), "shared.down": ((), D, S),
    }  # fmt: skip
    fast = {"scale": 0.5}
    for name, (e, out, inp) in shapes.items():
        if adapter == "full":
            fast[name + ".W"] = rnd(*lead, *e, out, inp, std=0.1)
        else:
            fast[name + ".A"] = rnd(*lead, *e, r, inp)
            fast[name + ".B"] = rnd(*lead, *e, out, r)  # nonzero B: the delta is live
    return fast


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_fast_weights_equal_the_merged_weights(adapter):
    w, cfg, rnd = random_setup()
    fast = fast_weights(rnd, adapter)
    h = tokens(seed=12)
    y_fast, s_fast = moe_ffn(h, w, cfg, fast)
    y_merged, s_merged = moe_ffn(h, merge_fast(w, fast), cfg)
    assert (y_fast - y_merged).abs().max() <= TOL
    assert (y_fast - moe_ffn(h, w, cfg)[0]).abs().max() > 1e-2  # the delta is not a no-op
    assert torch.equal(s_fast["counts"], s_merged["counts"])  # the router sees no fast weights


def test_merging_one_expert_elsewhere_breaks_the_fast_weight_identity():
    """The identity above can fail: expert 0's delta folded into expert 1 instead."""
    w, cfg, rnd = random_setup()
    fast = fast_weights(rnd, "lora")
    merged = merge_fast(w, fast)
    d0 = merged["w1"][0] - w["w1"][0]
    wrong = merged | {"w1": torch.stack([w["w1"][0], merged["w1"][1] + d0, *merged["w1"][2:]])}
    h = tokens(seed=12)
    assert (moe_ffn(h, w, cfg, fast)[0] - moe_ffn(h, wrong, cfg)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_per_sample_fast_weights_give_each_sample_its_own_batch_scope_result(adapter):
    w, cfg, rnd = random_setup()
    B = 3
    fast = fast_weights(rnd, adapter, lead=(B,))
    h = tokens(seed=13, B=B)
    y, _ = moe_ffn(h, w, cfg, fast)

    def sample(b):
        return {k: (v if k == "scale" else v[b]) for k, v in fast.items()}

    for b in range(B):
        y_b, _ = moe_ffn(h[b : b + 1], w, cfg, sample(b))
        assert (y[b] - y_b[0]).abs().max() <= TOL
    assert (y[1] - moe_ffn(h[1:2], w, cfg, sample(0))[0][0]).abs().max() > 1e-3  # samples differ


def test_inner_sgd_clips_each_expert_slice_with_its_own_norm():
    E, r, Din = 4, 2, 3
    gen = torch.Generator().manual_seed(21)
    M = torch.randn(E, r, Din, generator=gen, dtype=torch.float64)
    Ms = torch.randn(r, Din, generator=gen, dtype=torch.float64)
    c = torch.tensor([0.01, 0.5, 10.0, 100.0], dtype=torch.float64)  # small and large gradients
    phi = {
        "experts.gate.A": torch.randn(E, r, Din, generator=gen, dtype=torch.float64).requires_grad_(True),
        "shared.gate.A": torch.randn(r, Din, generator=gen, dtype=torch.float64).requires_grad_(True),
        "scale": 0.5,
    }

    def loss_of(p):  # gradient: c_e * M_e for expert e, 3 * Ms for the shared tensor
        return (c[:, None, None] * M * p["experts.gate.A"]).sum() + (3 * Ms * p["shared.gate.A"]).sum()

    lr, clip = 0.1, 1.0
    out = inner_sgd_per_expert(loss_of(phi), phi, lr, clip, {"experts.gate.A"})
    for e in range(E):
        g = c[e] * M[e]
        want = phi["experts.gate.A"][e] - lr * min(1.0, clip / (g.norm().item() + 1e-6)) * g
        assert (out["experts.gate.A"][e] - want).abs().max() <= TOL
    gs = 3 * Ms
    want_s = phi["shared.gate.A"] - lr * min(1.0, clip / (gs.norm().item() + 1e-6)) * gs
    assert (out["shared.gate.A"] - want_s).abs().max() <= TOL
    assert out["scale"] == 0.5 and out["experts.gate.A"].requires_grad
    # one norm over the whole expert tensor (tests/reference.py inner_sgd) is a different step
    whole = reference.inner_sgd(loss_of(phi), phi, lr, clip)
    assert (whole["experts.gate.A"] - out["experts.gate.A"]).abs().max() > 1e-3


def test_inner_sgd_per_expert_refuses_a_per_sample_expert_tensor():
    phi = {"experts.gate.A": torch.ones(2, 4, 2, 3, dtype=torch.float64, requires_grad=True), "scale": 1.0}
    with pytest.raises(ValueError, match=r"experts.gate.A: expected a batch-scope expert tensor"):
        inner_sgd_per_expert(phi["experts.gate.A"].sum(), phi, 0.1, 1.0, {"experts.gate.A"})


def test_route_takes_weights_from_unbiased_scores_in_the_kept_groups():
    """A hand-made token: the bias moves the choice, the weights stay the plain sigmoid scores."""
    E = 8
    cfg = moe_cfg(n_experts=E, top_k=2, score_func="sigmoid", score_bias=True, n_group=4, topk_group=1)
    logits = torch.tensor([[0.0, 0.1, 2.0, -1.0, 1.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.9, 0.0], dtype=torch.float64)
    # router = identity on an E-dim token, so logits == x
    idx, w, lg, _ = route(logits, torch.eye(E, dtype=torch.float64), bias, cfg)
    # choice = sigmoid + bias = .50 .52 | .38 .27 | .73 .73 | 1.02 .62: group top-2 sums keep group 3 only;
    # without the groups the choice would be [6, 4], without the bias [2, 4]
    assert idx.tolist() == [[6, 7]] and torch.equal(lg, logits)
    assert torch.allclose(w, torch.sigmoid(logits[:, [6, 7]]), rtol=0, atol=TOL)


def test_route_with_bias_in_weights_takes_the_biased_softmax_values_as_weights():
    """LLaDA-MoE's router by hand: softmax, + bias, top-k of the biased values, which are the weights."""
    logits = [1.0, 0.5, 0.0, -0.5]
    bias = [0.0, -0.3, 0.4, 0.0]
    total = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / total for v in logits]  # .455 .276 .167 .102
    biased = [a + b for a, b in zip(p, bias, strict=True)]  # .455 -.024 .567 .102: the bias picks 2 over 1
    x, eye = torch.tensor([logits], dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64)
    cfg = moe_cfg(n_experts=4, top_k=2, score_bias=True, score_bias_in_weights=True)
    idx, w, _, scores = route(x, eye, b, cfg)
    assert idx.tolist() == [[2, 0]]
    assert torch.allclose(w, torch.tensor([[biased[2], biased[0]]], dtype=torch.float64), rtol=0, atol=TOL)
    assert torch.allclose(scores, torch.tensor([p], dtype=torch.float64), rtol=0, atol=TOL)
    # the same choice without the mode, but the plain probabilities as weights
    idx_plain, w_plain, _, _ = route(x, eye, b, replace_cfg(cfg, score_bias_in_weights=False))
    assert idx_plain.tolist() == [[2, 0]] and abs(w_plain[0, 0].item() - p[2]) <= TOL
    with pytest.raises(ValueError, match=r"score_bias_in_weights is set but cfg\.score_bias is not"):
        route(x, eye, b, replace_cfg(cfg, score_bias=False))

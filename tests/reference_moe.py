"""An independent plain-PyTorch mixture-of-experts feed-forward, written from docs of the MoE contract only.

Nothing here reads the MoE family's code. Routing follows the contract's "Routing" paragraph line by
line (explicit loops over tokens and groups); the experts are computed DENSELY: every expert runs on
every token and a [N, E] combine matrix (zero where an expert was not chosen) mixes the outputs, so no
sorting, gathering or scattering of tokens can hide a bug. Fast weights are explicit per-expert,
per-sample low-rank (or full) terms. Meant for float64 tests.

Weight layout (a plain dict): "router" [E, D], "score_bias" [E] or None, "w1" [E, F, D] gate,
"w3" [E, F, D] up, "w2" [E, D, F] down, optional "shared_gate" / "shared_up" [S, D], "shared_down"
[D, S], optional "shared_expert_gate" [1, D].

Fast weights (the contract's LayerFast keys), A [r, in] and B [out, r] as in tests/reference.py:
"experts.gate.A" [E, r, D], "experts.gate.B" [E, F, r], "experts.up.*" likewise, "experts.down.A"
[E, r, F], "experts.down.B" [E, D, r]; "shared.gate.A" [r, D], "shared.gate.B" [S, r], "shared.up.*"
likewise, "shared.down.A" [r, S], "shared.down.B" [D, r]; adapter "full": ".W" with the weight's own
shape ([E, F, D], [S, D], ...). Per-sample scope: a leading [B] on every tensor. "scale" = alpha / r.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

# The contract's MoE keys and their defaults (docs of the MoE family, "Config").
MOE_DEFAULTS = dict(
    n_experts=8,
    top_k=2,
    moe_ffn_hidden=256,
    n_shared_experts=0,
    shared_ffn_hidden=None,
    shared_expert_gate=False,
    score_func="softmax",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    group_score="top2_sum",
    score_bias=False,
    score_bias_in_weights=False,
    aux_loss_coef=0.0,
    z_loss_coef=0.0,
)

EXPERT_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
SHARED_PROJ = {"gate": "shared_gate", "up": "shared_up", "down": "shared_down"}


def moe_cfg(**overrides) -> SimpleNamespace:
    """A config object with every MoE key of the contract (defaults overridden by ``overrides``)."""
    unknown = set(overrides) - set(MOE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown MoE keys: {sorted(unknown)}")
    return SimpleNamespace(**(MOE_DEFAULTS | overrides))


def _group_score(part: torch.Tensor, how: str) -> torch.Tensor:
    if how == "top2_sum":
        return torch.topk(part, 2).values.sum()
    if how == "max":
        return part.max()
    raise ValueError(f"group_score {how!r}")


def route(
    x: torch.Tensor, router_w: torch.Tensor, bias: torch.Tensor | None, cfg
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route N tokens: x [N, D], router_w [E, D], bias [E] (used only when cfg.score_bias).

    Returns idx [N, k] (long, torch.topk order), w [N, k] (the UNbiased scores of the chosen experts,
    optionally renormalised, times routed_scaling_factor; with cfg.score_bias_in_weights, LLaDA-MoE's
    router, the BIASED scores scores + bias), logits [N, E], scores [N, E] (softmax or sigmoid of the
    logits). Computed in float64 when x is float64, else float32.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.to(dt) @ router_w.to(dt).t()
    if cfg.score_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif cfg.score_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"score_func {cfg.score_func!r}")
    choice = scores.detach().clone()
    if cfg.score_bias:
        if bias is None:
            raise ValueError("cfg.score_bias is set but no score_bias tensor was given")
        choice = choice + bias.to(dt)
    N, E = scores.shape
    G = cfg.n_group
    if G > 1:
        size = E // G  # group g = experts [g*size, (g+1)*size)
        for n in range(N):
            gs = torch.stack(
                [_group_score(choice[n, g * size : (g + 1) * size], cfg.group_score) for g in range(G)]
            )
            keep = set(torch.topk(gs, cfg.topk_group).indices.tolist())
            for g in range(G):
                if g not in keep:
                    choice[n, g * size : (g + 1) * size] = float("-inf")
    idx = torch.topk(choice, cfg.top_k, dim=-1).indices
    if cfg.score_bias_in_weights:
        if not cfg.score_bias:
            raise ValueError("cfg.score_bias_in_weights is set but cfg.score_bias is not")
        w = (scores + bias.to(dt)).gather(1, idx)  # LLaDA-MoE: the biased probabilities are the weights
    else:
        w = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    return idx, w, logits, scores


def _fast_term(x: torch.Tensor, fast: dict | None, name: str, e: int | None) -> torch.Tensor | None:
    """The fast-weight term of projection ``name`` on x [B, T, in], sample by sample; None if absent.

    ``e`` selects the expert slice of an expert tensor (None for a shared projection).
    """
    if not fast or (name + ".A" not in fast and name + ".W" not in fast):
        return None
    base_dim = 2 if e is None else 3  # batch-scope rank of an A / B / W tensor
    outs = []
    for b in range(x.shape[0]):

        def pick(t: torch.Tensor, b: int = b) -> torch.Tensor:
            t = t[b] if t.dim() == base_dim + 1 else t
            return t if e is None else t[e]

        if name + ".W" in fast:
            outs.append(x[b] @ pick(fast[name + ".W"]).t())
        else:
            A, Bm = pick(fast[name + ".A"]), pick(fast[name + ".B"])
            outs.append(float(fast["scale"]) * (x[b] @ A.t()) @ Bm.t())
    return torch.stack(outs)


def _proj(x: torch.Tensor, w: torch.Tensor, fast: dict | None, name: str, e: int | None) -> torch.Tensor:
    y = x @ w.t()
    d = _fast_term(x, fast, name, e)
    return y if d is None else y + d


def _swiglu(h: torch.Tensor, ws: dict, fast: dict | None, prefix: str, e: int | None) -> torch.Tensor:
    """down(silu(gate h) * up h) for h [B, T, D]; ws maps gate/up/down to [F, D], [F, D], [D, F]."""
    g = _proj(h, ws["gate"], fast, prefix + ".gate", e)
    u = _proj(h, ws["up"], fast, prefix + ".up", e)
    a = g * torch.sigmoid(g) * u
    return _proj(a, ws["down"], fast, prefix + ".down", e)


def routing_stats(idx: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor, cfg) -> dict:
    """aux (load balance), z (z-loss), counts [E] (long) and entropy of one layer's N routed tokens.

    p = scores normalised to sum 1 over all E; aux = E * sum_e (count_e / N) * mean_n p_ne;
    z = mean_n logsumexp(logits_n)^2; entropy = mean_n -sum_e p_ne log p_ne.
    """
    N, E = scores.shape
    p = scores / scores.sum(-1, keepdim=True)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    aux = E * ((counts.to(p.dtype) / N) * p.mean(0)).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    entropy = -torch.special.xlogy(p, p).sum(-1).mean()
    return {"aux": aux, "z": z, "counts": counts, "entropy": entropy}


def _check_shared(weights: dict, cfg) -> bool:
    has = weights.get("shared_gate") is not None
    if has != (cfg.n_shared_experts > 0):
        raise ValueError(f"n_shared_experts={cfg.n_shared_experts} but shared weights present={has}")
    if cfg.shared_expert_gate and weights.get("shared_expert_gate") is None:
        raise ValueError("cfg.shared_expert_gate is set but weights has no 'shared_expert_gate'")
    return has


def moe_ffn(h: torch.Tensor, weights: dict, cfg, fast: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The MoE feed-forward of h [B, T, D] -> (y [B, T, D], stats) with ALL experts computed densely.

    y = sum_e combine[:, e] * Expert_e(h) + shared(h) (* sigmoid(h . g) with shared_expert_gate), where
    combine [N, E] holds w at the chosen experts and 0 elsewhere. The router sees no fast weights.
    stats: see ``routing_stats``.
    """
    B, T, D = h.shape
    E = cfg.n_experts
    idx, w, logits, scores = route(h.reshape(B * T, D), weights["router"], weights.get("score_bias"), cfg)
    # one row per (token, slot): one_hot * w, summed over the k slots
    combine = (F.one_hot(idx, E).to(w.dtype) * w[..., None]).sum(1).to(h.dtype).reshape(B, T, E)
    y = torch.zeros_like(h)
    for e in range(E):
        ws = {p: weights[key][e] for p, key in EXPERT_PROJ.items()}
        y = y + combine[..., e : e + 1] * _swiglu(h, ws, fast, "experts", e)
    if _check_shared(weights, cfg):
        s = _swiglu(h, {p: weights[key] for p, key in SHARED_PROJ.items()}, fast, "shared", None)
        if cfg.shared_expert_gate:
            s = torch.sigmoid(h @ weights["shared_expert_gate"].t()) * s
        y = y + s
    return y, routing_stats(idx, logits, scores, cfg)


def weights_of(moe) -> dict:
    """The plain weight dict of a TP=1, EP=1 MoE layer (its tensors by attribute name; none of its code)."""
    w = {"router": moe.router.weight, "score_bias": moe.router.score_bias,
         "w1": moe.experts.w1, "w2": moe.experts.w2, "w3": moe.experts.w3}  # fmt: skip
    if moe.shared is not None:
        w |= {"shared_gate": moe.shared.gate.weight, "shared_up": moe.shared.up.weight,
              "shared_down": moe.shared.down.weight}  # fmt: skip
    if moe.shared_gate is not None:
        w["shared_expert_gate"] = moe.shared_gate.weight
    return w


def merge_fast(weights: dict, fast: dict) -> dict:
    """Weights with the (batch-scope) fast deltas folded in: W_e + scale * B_e A_e, or W_e + W_fast_e."""
    out = dict(weights)
    for prefix, names in (("experts", EXPERT_PROJ), ("shared", SHARED_PROJ)):
        for p, key in names.items():
            name = f"{prefix}.{p}"
            if name + ".W" in fast:
                out[key] = weights[key] + fast[name + ".W"]
            elif name + ".A" in fast:
                out[key] = weights[key] + float(fast["scale"]) * fast[name + ".B"] @ fast[name + ".A"]
    return out


def inner_sgd_per_expert(loss: torch.Tensor, phi: dict, lr: float, clip: float, expert_keys) -> dict:
    """One inner SGD step phi - lr * g * min(1, clip / (|g| + 1e-6)), batch scope.

    Every tensor is clipped with its own norm, as tests/reference.py ``inner_sgd``; a key in
    ``expert_keys`` holds [E, ...] (one slice per expert) and each slice [e] is clipped with its own
    norm, as if every expert had its own LoRA module.
    """
    keys = [k for k in phi if k != "scale"]
    grads = torch.autograd.grad(loss, [phi[k] for k in keys])
    out = {"scale": phi["scale"]}
    for k, g in zip(keys, grads, strict=True):
        if k in expert_keys:
            if g.dim() != 3:
                raise ValueError(
                    f"{k}: expected a batch-scope expert tensor [E, out, in], got {tuple(g.shape)}"
                )
            coefs = [min(1.0, clip / (ge.norm().item() + 1e-6)) for ge in g.unbind(0)]
            coef = torch.tensor(coefs, dtype=g.dtype)[:, None, None]
        else:
            coef = min(1.0, clip / (g.norm().item() + 1e-6))
        out[k] = (phi[k] - lr * coef * g).detach().requires_grad_(True)
    return out

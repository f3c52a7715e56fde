"""The anchor-consistent inner loop of MemDLM and the outer loss it conditions (spec sections 3-4).

For one batch, with the anchor ``(t, M_t, x_t)`` drawn exactly as MDLM draws it:

1. pre-anchor masks ``M_pre ⊇ M_t``: per sequence, ``ceil(scale * |M_t|)`` masked tokens
   (capped at all maskable), the extra ones chosen at random among the still visible;
2. stage 1 (pre-anchor -> clean): forward ``x_pre`` with ``phi0``; loss at all of ``M_pre``;
   ``phi1 = phi0 - lr * clip_per_tensor(grad)``. The layers below the first memory layer run
   without autograd: only the fast weights get gradients;
3. stage 2 (anchor -> clean): the anchor's pass below the memory layers is computed once, with
   autograd, and shared with the outer loss; stage 2 uses it detached, with ``phi1``;
4. outer: the memory layers again from that shared hidden state, with ``phi2`` as a constant
   (first-order), MDLM loss at ``M_t``, backward into the base weights only.

A non-finite inner loss skips that update (per sample in ``sample`` scope) and is counted.
Inner losses are divided by the number of loss positions (as the reference does), so they
read about 1/t larger than the outer loss, which is divided by the maskable count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.loss import (
    global_count,
    position_ce,
    sum_by_sequence,
    weight_by_sequence,
    weighted_loss,
)
from pipeline.diffusion.noise import Noise, loss_weight, time_of_mask_ratio
from pipeline.families.registry import param_count
from pipeline.memory.config import MemoryConfig
from pipeline.memory.fast_weights import FastWeights, FastWeightSpec

# ---------------------------------------------------------------- masks


def expand_mask(
    mask: torch.Tensor, maskable: torch.Tensor, target: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Add random still-visible maskable positions to ``mask`` [B, T] until ``target`` [B] are masked."""
    candidates = maskable & ~mask
    scores = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~candidates, 2.0)
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(mask.shape[1], device=mask.device).expand_as(order)
    )
    need = (target - mask.sum(1)).clamp(min=0)
    return mask | ((ranks < need[:, None]) & candidates)


def pre_anchor_masks(
    anchor: torch.Tensor, maskable: torch.Tensor, scale: float, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Nested masks ``M_steps ⊇ ... ⊇ M_1 ⊇ M_t``, returned most noisy first.

    ``M_j`` masks ``min(n, ceil(scale**j * |M_t|))`` tokens of each sequence (n = maskable).
    """
    k = anchor.sum(1).float()
    n = maskable.sum(1)
    masks, cur = [], anchor
    for j in range(1, steps + 1):
        target = torch.minimum(torch.ceil(k * scale**j).long(), n)
        cur = expand_mask(cur, maskable, target, generator)
        masks.append(cur)
    return masks[::-1]


def pre_anchor_ratio(anchor: torch.Tensor, n_maskable: torch.Tensor, scale: float, j: int) -> torch.Tensor:
    """The stage-1 noise level ``rho_pre = min(1, scale**j * rho)`` [B], rho = the anchor's realised
    masked fraction among maskable tokens.

    The spec weights stage 1 by ``w(rho_pre)``, the level the pre-anchor state is drawn *at*;
    the mask itself holds ``ceil(scale**j * k)`` tokens, whose fraction differs from rho_pre by
    under one token (3.6 % of the weight on a short row with odd k). We follow the spec: the
    weight is a property of the noise level, not of the integer rounding of one row.
    """
    rho = anchor.sum(1).float() / n_maskable.float()
    return (rho * scale**j).clamp(max=1.0)


# ---------------------------------------------------------------- inner losses


def _vp_log_softmax(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """log-softmax over a vocabulary split across TP ranks (logits [N, V/tp], float32)."""
    m = logits.detach().max(-1, keepdim=True).values
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = reduce_from_tensor_model_parallel_region(torch.exp(logits - m).sum(-1, keepdim=True), group)
    return logits - m - torch.log(s)


@dataclass
class _Teacher:
    """The clean sequence through the model without memory (for distillation-style inner losses)."""

    hidden: torch.Tensor  # [B, T, D], final-normed


def _position_losses(
    model,
    h_below: torch.Tensor,
    start: int,
    fast: FastWeights,
    positions: torch.Tensor,
    tokens: torch.Tensor,
    kind: str,
    teacher: _Teacher | None,
    checkpoint: bool,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position inner loss [N] at ``positions`` (row-major), float32."""
    h = model.run_layers(h_below, start, model.cfg.n_layers, fast.by_layer, checkpoint, key_mask)
    hs = model.final_norm(h[positions])
    if kind == "ce":
        logits, _ = model.head(hs)
        return position_ce(logits, tokens[positions])
    assert teacher is not None
    ht = teacher.hidden[positions]
    if kind in ("hidden_cos", "hidden_mse"):
        hs, ht = hs.float(), ht.float()
        if kind == "hidden_cos":
            return 1.0 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1)
        return (hs - ht).pow(2).mean(-1)
    group = model.dims.tp_group
    ls = _vp_log_softmax(model.head(hs)[0].float(), group)
    lt = _vp_log_softmax(model.head(ht)[0].float(), group)
    p, q = (lt, ls) if kind == "logit_kl" else (ls, lt)  # KL(teacher || student) or the reverse
    part = (p.exp() * (p - q)).sum(-1)
    return reduce_from_tensor_model_parallel_region(part, group)


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """Base weights stop requiring grad for the inner loop, then resume.

    The inner gradient is taken w.r.t. the fast weights only, but megatron's linear autograd
    function computes the weight gradient whenever the weight requires grad (and discards it
    here): about half of every inner backward. With the flag off it takes its frozen-weight
    path (same forward, input gradient only).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ---------------------------------------------------------------- one inner step


@dataclass
class InnerStats:
    loss: torch.Tensor  # global inner loss (sum over samples in sample scope)
    grad_norm: torch.Tensor  # norm of all fast-weight gradients before clipping
    skipped: torch.Tensor  # updates skipped for a non-finite loss
    # What the step wrote (diagnostics only, never used by the loss): the norm of phi_k - phi_{k-1}
    # (mean over samples in sample scope) and the fraction of tensors (x samples) whose gradient
    # was clipped, among the updates not skipped.
    update_norm: torch.Tensor | None = None
    clipped: torch.Tensor | None = None
    positions: torch.Tensor | None = (
        None  # loss positions of this stage on this rank (the cost model's count)
    )


def _clip_units(
    fast: FastWeights, grads: list[torch.Tensor], tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Squared gradient norms of every clipped unit: a fast-weight tensor, or one expert's slice of
    an expert tensor (per sample in sample scope); TP-sharded tensors sum over ``tp_group``.
    Returns ``sq`` [U] (or [U, B]) and each tensor's rows ``(lo, hi)`` in it."""
    rows, units, sharded = [], [], []
    for name, g in zip(fast.names, grads, strict=True):
        expert = name in fast.experts
        lead = int(fast.per_sample) + int(expert)  # the sample and expert dimensions are kept
        wide = g.to(torch.promote_types(g.dtype, torch.float32))  # fp32 at least; float64 stays
        sq = wide.pow(2).sum(dim=tuple(range(lead, g.dim())))  # [], [B], [E] or [B, E]
        sq = (sq.t() if expert else sq.unsqueeze(0)) if fast.per_sample else sq.reshape(-1)
        units.append((len(sharded), len(sharded) + sq.shape[0]))
        rows.append(sq)
        sharded += [fast.sharded[name]] * sq.shape[0]
    sq = torch.cat(rows)
    mask = torch.tensor(sharded, device=sq.device).view(-1, *([1] * (sq.dim() - 1)))
    if tp_group is not None and dist.get_world_size(tp_group) > 1 and bool(mask.any()):
        part = sq * mask
        dist.all_reduce(part, group=tp_group)
        sq = torch.where(mask, part, sq)
    return sq, units


def _per_tensor(
    coef: torch.Tensor, finite: torch.Tensor, g: torch.Tensor, per_sample: bool, expert: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor's clip coefficients (``coef``: its rows of the units) and finite flags, shaped to
    broadcast against ``g`` ([B,] [E,] ...)."""
    trail = (1,) * (g.dim() - int(per_sample) - int(expert))
    if per_sample:
        c = coef.t().reshape(-1, coef.shape[0], *trail) if expert else coef[0].view(-1, *trail)
        return c, finite.view(-1, *(1,) * (g.dim() - 1))
    c = coef.view(-1, *trail) if expert else coef[0]
    return c, finite.reshape(())


def inner_step(
    fast: FastWeights,
    per_position: torch.Tensor,
    positions: torch.Tensor,
    seq_weight: torch.Tensor,
    cfg: MemoryConfig,
    dp_group: dist.ProcessGroup | None,
    tp_group: dist.ProcessGroup | None = None,
    expert_groups: ExpertGroups | None = None,
) -> tuple[FastWeights, InnerStats]:
    """One clipped SGD step on the fast weights (new detached leaves); ``tp_group`` sums sharded
    norms; ``expert_groups``: where a memory sharded with its experts (``fast.experts_sharded``)
    reduces its expert adapters' gradients and statistics."""
    B = positions.shape[0]
    weighted, seq_of = weight_by_sequence(per_position, positions, seq_weight)
    sync = cfg.scope == "batch" and cfg.sync_dp and dp_group is not None and dist.get_world_size(dp_group) > 1
    if cfg.scope == "batch":
        # Divide by the global count, so summing gradients over DP gives the global-batch gradient.
        count = global_count(positions.sum(), dp_group if sync else None).clamp(min=1.0)
        loss = weighted.sum() / count
        sample_loss = loss.detach().reshape(1)
    else:
        sample_loss_grad = sum_by_sequence(weighted, seq_of, B) / positions.sum(1).clamp(min=1)
        loss = sample_loss_grad.sum()  # d loss / d phi_b involves sample b only
        sample_loss = sample_loss_grad.detach()
    leaves = fast.leaves()
    grads = list(torch.autograd.grad(loss, leaves, allow_unused=False))
    sharded = expert_groups if fast.experts_sharded else None
    if sync:
        grads, sample_loss = _sum_over_data_parallel(fast, grads, sample_loss, dp_group, sharded)
    sq, units = _clip_units(fast, grads, tp_group)  # [U] or [U, B]: one row per clipped tensor
    norms = sq.sqrt()
    coef = (cfg.clip_norm / (norms + 1e-6)).clamp(max=1.0)
    if sharded is not None:
        finite, stats = _sharded_verdict(fast, units, norms, coef, sample_loss, positions, cfg, sharded)
    else:
        finite = torch.isfinite(sample_loss) & torch.isfinite(norms).all(0)  # [1] or [B]
        stats = InnerStats(
            loss=torch.where(finite, sample_loss, torch.zeros_like(sample_loss)).sum().detach(),
            grad_norm=sq.sum(0).sqrt().max().detach(),
            skipped=(~finite).sum().float(),
            # |phi_k - phi_{k-1}| per tensor is inner_lr * coef * |g| (0 where skipped): no pass over the weights
            update_norm=torch.where(finite, (cfg.inner_lr * coef * norms).pow(2).sum(0).sqrt(), 0.0).mean(),
            clipped=((norms + 1e-6 > cfg.clip_norm) & finite).float().mean().detach(),
            positions=positions.sum(),
        )
    new = []
    for name, p, g, (lo, hi) in zip(fast.names, leaves, grads, units, strict=True):
        c, ok = _per_tensor(coef[lo:hi], finite, g, fast.per_sample, name in fast.experts)
        stepped = p.detach() - cfg.inner_lr * c * torch.nan_to_num(g.detach())
        new.append(torch.where(ok, stepped, p.detach()).requires_grad_(True))
    return fast.with_values(new), stats


@dataclass(frozen=True)
class ExpertGroups:
    """The groups of a memory sharded with its experts: ``ep`` splits the experts; ``edp`` holds
    the ranks with the same experts (None when there is one)."""

    ep: dist.ProcessGroup
    edp: dist.ProcessGroup | None


def _expert_mask(fast: FastWeights) -> list[bool]:
    return [name in fast.experts for name in fast.names]


def _sum_over_data_parallel(
    fast: FastWeights,
    grads: list[torch.Tensor],
    sample_loss: torch.Tensor,
    dp_group: dist.ProcessGroup,
    sharded: ExpertGroups | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inner gradients and loss summed over the data-parallel ranks: one memory per global batch.
    A sharded memory's expert adapters sum over the ranks holding the same experts (their EP
    peers' tokens reached them already, through the MoE layer's all-to-all)."""
    experts = _expert_mask(fast) if sharded is not None else [False] * len(grads)
    dense = [g for g, e in zip(grads, experts, strict=True) if not e]
    out = _all_reduce_flat([*dense, sample_loss], dp_group)
    sample_loss = out.pop()
    if any(experts):
        routed = [g for g, e in zip(grads, experts, strict=True) if e]
        edp = sharded.edp if sharded is not None else None
        routed = _all_reduce_flat(routed, edp) if edp is not None and dist.get_world_size(edp) > 1 else routed
        it_dense, it_routed = iter(out), iter(routed)
        out = [next(it_routed) if e else next(it_dense) for e in experts]
    return out, sample_loss


def _all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """``tensors`` summed over ``group`` in one all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [p.view_as(t) for p, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _sharded_verdict(
    fast: FastWeights,
    units: list[tuple[int, int]],
    norms: torch.Tensor,
    coef: torch.Tensor,
    sample_loss: torch.Tensor,
    positions: torch.Tensor,
    cfg: MemoryConfig,
    groups: ExpertGroups,
) -> tuple[torch.Tensor, InnerStats]:
    """:func:`inner_step`'s skip decision (finite [1]) and statistics for a batch-scope memory
    sharded with its experts: every EP rank clips its experts' slices itself, but skips
    (non-finite) and reports (norms, clipped share) over all experts, summed over the EP group,
    so every rank agrees."""
    rows = torch.zeros(norms.shape[0], dtype=torch.bool, device=norms.device)
    for (lo, hi), expert in zip(units, _expert_mask(fast), strict=True):
        rows[lo:hi] = expert
    per_unit = torch.stack(
        [
            norms.pow(2),
            (norms + 1e-6 > cfg.clip_norm).to(norms.dtype),
            (cfg.inner_lr * coef * norms).pow(2),
            torch.ones_like(norms),
            (~torch.isfinite(norms)).to(norms.dtype),
        ]
    )  # [5, U]
    routed = per_unit[:, rows].sum(1)
    dist.all_reduce(routed, group=groups.ep)
    sums = per_unit[:, ~rows].sum(1) + routed
    finite = torch.isfinite(sample_loss) & (sums[4] == 0)  # [1]
    stats = InnerStats(
        loss=torch.where(finite, sample_loss, torch.zeros_like(sample_loss)).sum().detach(),
        grad_norm=sums[0].sqrt().detach(),
        skipped=(~finite).sum().float(),
        update_norm=torch.where(finite, sums[2].sqrt(), 0.0).mean(),
        clipped=(sums[1] * finite).sum().detach() / sums[3],
        positions=positions.sum(),
    )
    return finite, stats


# ---------------------------------------------------------------- the whole MemDLM loss


@dataclass
class MemDLMOutput:
    loss: torch.Tensor
    fast: FastWeights  # the final memory (phi2), detached
    stage_stats: list[InnerStats]
    # With ``measure=True``: the outer loss of the same anchor with the fresh memory phi0 (no
    # inner step), and ``gain = loss_phi0 - loss`` (> 0: what the memory wrote lowered the loss).
    loss_phi0: torch.Tensor | None = None
    gain: torch.Tensor | None = None


@dataclass(frozen=True)
class MemoryLayout:
    """Where the memory sits in a model, computed once per step: the fast-weight spec, the first
    memory layer, and whether the memory layers recompute in backward."""

    spec: FastWeightSpec
    first: int
    checkpoint: bool
    tp_rank: int = 0
    tp: int = 1
    dtype: torch.dtype = torch.float32  # the memory's: fp32 at least, float64 under a float64 model
    ep_rank: int = 0
    ep: int = 1  # > 1: expert adapters of a batch-scope memory are sharded with the experts

    @classmethod
    def of(cls, model, mem: MemoryConfig) -> MemoryLayout:
        """The layout in ``model`` (its config and parallel dims)."""
        spec = mem.spec_for(model.cfg)
        dims = model.dims
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        checkpoint = mem.use_checkpoint(param_count(model.cfg))
        ep = getattr(dims, "ep", 1)
        # One memory for the global batch: each EP rank keeps its experts' part (the tokens that
        # reach an expert are all on its rank during the MoE layer). Otherwise every rank's tokens
        # need their own memory of every expert, so each rank holds all of them.
        shard = ep > 1 and mem.scope == "batch" and mem.sync_dp
        ep_rank, ep = (dims.ep_rank, ep) if shard else (0, 1)
        return cls(spec, spec.layers[0], checkpoint, dims.tp_rank, dims.tp, dtype, ep_rank, ep)

    def reset(self, mem: MemoryConfig, batch: int, generator: torch.Generator, device) -> FastWeights:
        """A fresh memory: one per batch, or one per sequence in ``sample`` scope."""
        scope_batch = batch if mem.scope == "sample" else None
        return self.spec.reset(
            scope_batch, generator, device, self.tp_rank, self.tp, self.dtype, self.ep_rank, self.ep
        )


def _expert_groups(model) -> ExpertGroups | None:
    """The model's EP and expert-data-parallel groups (None without expert parallelism)."""
    dims = model.dims
    if getattr(dims, "ep", 1) <= 1:
        return None
    return ExpertGroups(dims.ep_group, dims.edp_group)


def _teacher(
    model, tokens: torch.Tensor, mem: MemoryConfig, key_mask: torch.Tensor | None
) -> _Teacher | None:
    """The clean sequence without memory, for the distillation-style inner losses (ablations)."""
    if mem.inner_loss == "ce":
        return None
    with torch.no_grad():
        h = model.run_layers(model.embed(tokens), 0, model.cfg.n_layers, key_mask=key_mask)
        return _Teacher(hidden=model.final_norm(h))


def _below_memory(
    model, x: torch.Tensor, layout: MemoryLayout, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """The layers below the memory on x [B, T], without autograd (only fast weights get gradients)."""
    with torch.no_grad():
        return model.run_layers(model.embed(x), 0, layout.first, key_mask=key_mask)


def _stage(
    model,
    h_below: torch.Tensor,
    layout: MemoryLayout,
    fast: FastWeights,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    weight: torch.Tensor,
    mem: MemoryConfig,
    teacher: _Teacher | None,
    dp_group: dist.ProcessGroup | None,
    key_mask: torch.Tensor | None,
) -> tuple[FastWeights, InnerStats]:
    """One inner stage: the memory layers from ``h_below`` (no grad below), loss at ``mask``, one
    clipped SGD step on the fast weights only."""
    with frozen_weights(model):
        losses = _position_losses(
            model,
            h_below,
            layout.first,
            fast,
            mask,
            tokens,
            mem.inner_loss,
            teacher,
            layout.checkpoint,
            key_mask,
        )
        return inner_step(
            fast, losses, mask, weight, mem, dp_group, model.dims.tp_group, _expert_groups(model)
        )


def inner_loop(
    model,
    tokens: torch.Tensor,
    noise: Noise,
    obj: ObjectiveConfig,
    mem: MemoryConfig,
    mask_id: int,
    generator: torch.Generator,
    dp_group: dist.ProcessGroup | None = None,
    pre_masks: list[torch.Tensor] | None = None,
    h_anchor: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    reset_generator: torch.Generator | None = None,
    layout: MemoryLayout | None = None,
) -> tuple[FastWeights, list[InnerStats]]:
    """Reset the memory and run the stages (1. pre-anchor ..., 2. anchor); returns phi and stats.

    ``h_anchor`` is the anchor's hidden state below the first memory layer when the caller
    already has it (training shares it with the outer loss); otherwise it is computed without
    autograd (inference-time adaptation). ``key_mask`` [B, T] hides padding (batched prompts
    of different lengths). ``reset_generator`` draws phi0 (default: ``generator``); training
    passes one that is the same on every data-parallel rank, so a batch-scope memory synced
    over DP starts from one phi0 for the whole global batch.
    """
    layout = layout or MemoryLayout.of(model, mem)
    fast = layout.reset(mem, tokens.shape[0], reset_generator or generator, tokens.device)
    teacher = _teacher(model, tokens, mem, key_mask)
    n_maskable = noise.maskable.sum(1).clamp(min=1)
    stats: list[InnerStats] = []
    ctx = {"layout": layout, "tokens": tokens, "mem": mem, "teacher": teacher, "dp_group": dp_group}
    stage = functools.partial(_stage, model, key_mask=key_mask, **ctx)
    # 1. stage 1: pre-anchor states (most noisy first) -> clean; no autograd below the memory
    if pre_masks is None:
        pre_masks = pre_anchor_masks(
            noise.mask, noise.maskable, mem.pre_anchor_scale, mem.pre_anchor_steps, generator
        )
    for idx, m_pre in enumerate(pre_masks):
        h_pre = _below_memory(model, torch.where(m_pre, mask_id, tokens), layout, key_mask)
        rho_pre = pre_anchor_ratio(noise.mask, n_maskable, mem.pre_anchor_scale, len(pre_masks) - idx)
        w = loss_weight(time_of_mask_ratio(rho_pre, obj.schedule), obj.schedule, mem.inner_weighting)
        fast, st = stage(h_pre, fast=fast, mask=m_pre, weight=w)
        stats.append(st)

    # 2. stage 2: the exact anchor state -> clean
    if mem.anchor_step:
        if h_anchor is None:
            h_anchor = _below_memory(model, noise.noisy, layout, key_mask)
        w = loss_weight(noise.t, obj.schedule, mem.inner_weighting)
        fast, st = stage(h_anchor.detach(), fast=fast, mask=noise.mask, weight=w)
        stats.append(st)
    return fast.detached(), stats


def memdlm_loss(
    model,
    outer_forward: Callable[..., torch.Tensor],
    tokens: torch.Tensor,
    noise: Noise,
    obj: ObjectiveConfig,
    mem: MemoryConfig,
    mask_id: int,
    generator: torch.Generator,
    dp_group: dist.ProcessGroup | None = None,
    pre_masks: list[torch.Tensor] | None = None,
    reset_generator: torch.Generator | None = None,
    measure: bool = False,
) -> MemDLMOutput:
    """MemDLM's outer loss for one batch, after the two-stage inner loop.

    ``model`` is the unwrapped module (inner passes); ``outer_forward`` is the module or a
    DeepSpeed engine around it and computes everything the outer gradient flows through.
    tokens [B, T] clean; ``noise`` is the MDLM anchor draw; ``pre_masks`` (most noisy first)
    replaces the drawn pre-anchor masks (evaluation and tests); ``reset_generator``
    draws the memory's reset (see :func:`inner_loop`). ``measure`` (log steps) also computes
    the memory's gain: the memory layers and head once more from the shared anchor pass, with
    phi0, under no_grad (about the cost of the outer pass above the memory, forward only).
    """
    layout = MemoryLayout.of(model, mem)
    # phi0 is redrawn afterwards from a copy of the reset generator's state: the draws the
    # training consumes are untouched, whether or not this step is measured.
    reset_state = (reset_generator or generator).get_state() if measure else None
    # The anchor's pass below the memory: once, with autograd, shared by stage 2 and the outer loss.
    h_anchor = outer_forward(tokens=noise.noisy, end_layer=layout.first)
    fast, stats = inner_loop(
        model, tokens, noise, obj, mem, mask_id, generator, dp_group, pre_masks, h_anchor,
        reset_generator=reset_generator, layout=layout,
    )  # fmt: skip
    # 3. outer: the memory layers with phi2 as a constant (first-order), MDLM loss at M_t
    logits = outer_forward(
        hidden=h_anchor, start_layer=layout.first, fast=fast.by_layer, positions=noise.mask,
        checkpoint_layers=layout.checkpoint,
    )  # fmt: skip
    w = loss_weight(noise.t, obj.schedule, obj.weighting)
    loss = weighted_loss(
        position_ce(logits, tokens[noise.mask]), noise.mask, w, noise.maskable, obj.normalization, dp_group
    )
    out = MemDLMOutput(loss=loss, fast=fast, stage_stats=stats)
    if measure:
        g0 = torch.Generator(tokens.device)
        g0.set_state(reset_state)
        phi0 = layout.reset(mem, tokens.shape[0], g0, tokens.device)
        with torch.no_grad():
            logits0 = model(
                hidden=h_anchor.detach(), start_layer=layout.first, fast=phi0.by_layer, positions=noise.mask
            )
            ce0 = position_ce(logits0, tokens[noise.mask])
            out.loss_phi0 = weighted_loss(ce0, noise.mask, w, noise.maskable, obj.normalization, dp_group)
        out.gain = out.loss_phi0 - loss.detach()
    return out

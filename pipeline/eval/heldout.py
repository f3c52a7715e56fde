"""Held-out evaluation during training: the MDLM loss with the memory off, the continuation loss,
and (MemDLM) the continuation loss after inference-time adaptation on the context only.

The context the memory may read is the prompt (SFT) or the first ``eval.context_fraction`` of each
sequence; the scored continuation never feeds the memory. Collective over data-parallel ranks.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from pipeline.dataset.seeding import seed_of
from pipeline.loader.stream import TokenBatchLoader
from pipeline.memory.adapt import adapt_to_context
from pipeline.objectives import Batch, Draws, Objective, build_objective
from pipeline.train_config import TrainConfig

EVAL_SEED_TAG = 10**9  # the generators' "step": the same draws at every evaluation


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed_of(*parts))


def _context(batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """[B, T] bool: what the memory may read: the prompt (SFT), else the first
    ``eval.context_fraction`` of every sequence."""
    if batch.prompt_mask is not None:
        return batch.prompt_mask
    tokens = batch.tokens
    C = int(cfg.model.seq_len * cfg.eval.context_fraction)
    return (torch.arange(tokens.shape[1], device=tokens.device) < C).expand_as(tokens)


def _batch_losses(
    model, cfg: TrainConfig, objective: Objective, batch: Batch, i: int, device: torch.device, bf16: bool
) -> torch.Tensor:
    """[loss, continuation loss, adapted continuation loss] of one validation batch (float64)."""
    ev, dp_rank, pad_id = cfg.eval, model.dims.dp_rank, objective.pad_id
    out = torch.zeros(3, dtype=torch.float64, device=device)
    context = _context(batch, cfg)
    g = _generator(device, cfg.seed, EVAL_SEED_TAG, i, dp_rank)
    continuation = Batch(batch.tokens, batch.prompt_mask, region=~context)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            out[0] = float(objective(model, model, batch, Draws(g)).loss)
            scored = objective(model, model, continuation, Draws(g))
            out[1] = float(scored.loss)
        if ev.adapt and cfg.memory.enabled:
            tokens = batch.tokens
            rows = [
                _generator(device, cfg.seed, EVAL_SEED_TAG, i, dp_rank, b) for b in range(tokens.shape[0])
            ]
            fast = adapt_to_context(
                model,
                torch.where(context, tokens, pad_id),
                context & (tokens != pad_id),
                cfg.memory,
                objective.mask_id,
                generators=rows,
                init_generator=g,
                anchor_ratio=ev.anchor_ratio,
                pre_anchor_ratio=ev.pre_anchor_ratio,
            )
            with torch.no_grad():  # the same continuation anchor, now with the adapted memory
                adapted = functools.partial(model, fast=fast.by_layer)
                out[2] = float(objective(model, adapted, continuation, Draws(g), noise=scored.noise).loss)
    return out


def evaluate_heldout(
    model, cfg: TrainConfig, mask_id: int, pad_id: int, device: torch.device, bf16: bool
) -> dict[str, float]:
    """``eval/loss``, ``eval/continuation_loss`` (and ``eval/continuation_loss_adapted``), each the
    mean over ``eval.batches`` validation batches of every data-parallel rank: the MDLM loss with
    the memory off (whatever the training objective), scored over the whole maskable sequence or
    its continuation only. Collective over ``model.dims``' data-parallel ranks."""
    dims = model.dims
    val = TokenBatchLoader(
        cfg.data, split="val", rank=dims.dp_rank, world_size=dims.dp, shuffle=False, loop=False
    )
    objective = build_objective(cfg.objective, cfg.memory, mask_id, pad_id, memory=False)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # NCCL takes device tensors only
    for i, raw in enumerate(val):
        if i >= cfg.eval.batches:
            break
        prompt = raw["prompt_mask"].to(device) if "prompt_mask" in raw else None
        batch = Batch(raw["tokens"].to(device), prompt)
        sums[:3] += _batch_losses(model, cfg, objective, batch, i, device, bf16)
        sums[3] += 1
    dist.all_reduce(sums)
    n = max(1.0, float(sums[3]))
    out = {"eval/loss": float(sums[0]) / n, "eval/continuation_loss": float(sums[1]) / n}
    if cfg.eval.adapt and cfg.memory.enabled:
        out["eval/continuation_loss_adapted"] = float(sums[2]) / n
    return out

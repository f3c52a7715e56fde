"""Held-out evaluation during training: the MDLM loss with the memory off, the continuation loss,
and (MemDLM) the continuation loss after inference-time adaptation on the context only.

The context the memory may read is the prompt (SFT) or the first ``eval.context_fraction`` of each
sequence; the scored continuation never feeds the memory. Collective over data-parallel ranks.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from pipeline.data.stream import TokenBatchLoader
from pipeline.dataset.seeding import seed_of
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import draw_noise, maskable_positions
from pipeline.memory.adapt import adapt_to_context
from pipeline.model.parallel import dp_rank, dp_size
from pipeline.train_config import TrainConfig

EVAL_SEED_TAG = 10**9  # the generators' "step": the same draws at every evaluation


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed_of(*parts))


def _batch_losses(
    model, cfg: TrainConfig, batch: dict, i: int, ids: tuple[int, int], device: torch.device, bf16: bool
) -> torch.Tensor:
    """[loss, continuation loss, adapted continuation loss] of one validation batch (float64)."""
    mask_id, pad_id = ids
    ev = cfg.eval
    out = torch.zeros(3, dtype=torch.float64, device=device)
    tokens = batch["tokens"].to(device)
    prompt = batch["prompt_mask"].to(device) if "prompt_mask" in batch else None
    maskable = maskable_positions(tokens, pad_id, prompt)
    if prompt is not None:
        context = prompt
    else:
        C = int(cfg.model.seq_len * ev.context_fraction)
        context = (torch.arange(tokens.shape[1], device=device) < C).expand_as(tokens)
    g = _generator(device, cfg.seed, EVAL_SEED_TAG, i, dp_rank())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            noise = draw_noise(tokens, maskable, cfg.objective, mask_id, g)
            out[0] = float(mdlm_loss(model, tokens, noise, cfg.objective))
            cnoise = draw_noise(tokens, maskable & ~context, cfg.objective, mask_id, g)
            out[1] = float(mdlm_loss(model, tokens, cnoise, cfg.objective))
        if ev.adapt and cfg.memory.enabled:
            rows = [
                _generator(device, cfg.seed, EVAL_SEED_TAG, i, dp_rank(), b) for b in range(tokens.shape[0])
            ]
            fast = adapt_to_context(
                model,
                torch.where(context, tokens, pad_id),
                context & (tokens != pad_id),
                cfg.memory,
                mask_id,
                generators=rows,
                init_generator=g,
                anchor_ratio=ev.anchor_ratio,
                pre_anchor_ratio=ev.pre_anchor_ratio,
            )
            with torch.no_grad():
                adapted = functools.partial(model, fast=fast.by_layer)
                out[2] = float(mdlm_loss(adapted, tokens, cnoise, cfg.objective))
    return out


def evaluate_heldout(
    model, cfg: TrainConfig, mask_id: int, pad_id: int, device: torch.device, bf16: bool
) -> dict[str, float]:
    """``eval/loss``, ``eval/continuation_loss`` (and ``eval/continuation_loss_adapted``), each the
    mean over ``eval.batches`` validation batches of every data-parallel rank."""
    val = TokenBatchLoader(
        cfg.data, split="val", rank=dp_rank(), world_size=dp_size(), shuffle=False, loop=False
    )
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # NCCL takes device tensors only
    for i, batch in enumerate(val):
        if i >= cfg.eval.batches:
            break
        sums[:3] += _batch_losses(model, cfg, batch, i, (mask_id, pad_id), device, bf16)
        sums[3] += 1
    dist.all_reduce(sums)
    n = max(1.0, float(sums[3]))
    out = {"eval/loss": float(sums[0]) / n, "eval/continuation_loss": float(sums[1]) / n}
    if cfg.eval.adapt and cfg.memory.enabled:
        out["eval/continuation_loss_adapted"] = float(sums[2]) / n
    return out

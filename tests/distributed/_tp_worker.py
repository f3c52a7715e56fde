"""Worker for test_tp_parity: one launch, three layouts, the same seeded batch.

1. TP=2 x DP=1: logits, MDLM and MemDLM (batch and sample scope) losses, gradients and
   fast weights, gathered to full tensors;
2. TP=1 x DP=2 with the batch split over ranks: MemDLM batch scope with inner gradients
   summed over DP (one memory per global batch);
3. TP=1 on each rank with the whole batch: the single-process reference.
Rank 0 saves everything to <out>/results.pt for the test to compare.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import Noise, draw_noise, maskable_positions
from pipeline.memory.config import MemoryConfig
from pipeline.memory.inner_loop import memdlm_loss, pre_anchor_masks
from tests._models import current_dims, dense_model
from tests.conftest import tiny_model_config
from tests.distributed._gather import gather
from tests.distributed._worker import at_tp

MASK = 4
OBJ = ObjectiveConfig()


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False) and current_dims().tp > 1:
            out[name] = gather(p.grad, p.partition_dim)
        else:
            out[name] = p.grad.detach().clone()
        p.grad = None
    return out


def full_fast(fast) -> dict[str, torch.Tensor]:
    out = {}
    for (layer, key), t in zip(fast.names, fast.leaves(), strict=True):
        if fast.sharded[(layer, key)]:
            target, kind = key.split(".")
            column = target in ("qkv", "gate", "up")
            dim = (0 if column else 1) if kind == "W" else (0 if kind == "B" else 1)
            t = gather(t, dim + (1 if fast.per_sample else 0))
        out[f"{layer}.{key}"] = t.detach().clone()
    return out


def batch():
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(6, 300, (4, 24), generator=g)
    noise = draw_noise(tokens, maskable_positions(tokens, 0), OBJ, MASK, g)
    (pre,) = pre_anchor_masks(noise.mask, noise.maskable, 1.5, 1, g)
    return tokens, noise, pre


def run_all(model, tokens, noise, pre, dp=None) -> dict:
    res = {"logits": gather(model(tokens=noise.noisy), -1)}
    loss = mdlm_loss(model, tokens, noise, OBJ, dp)
    loss.backward()
    res["mdlm_loss"], res["mdlm_grads"] = loss.detach(), full_grads(model)
    for scope, targets in (("batch", "ffn"), ("sample", "ffn+attn"), ("batch-full", "ffn")):
        mem = MemoryConfig(
            enabled=True,
            scope=scope.split("-")[0],
            targets=targets,
            adapter="full" if "full" in scope else "lora",
            inner_lr=0.5,
        )
        out = memdlm_loss(
            model, model, tokens, noise, OBJ, mem, MASK, torch.Generator().manual_seed(7), dp, [pre]
        )
        out.loss.backward()
        res[scope] = {
            "loss": out.loss.detach(),
            "grads": full_grads(model),
            "fast": full_fast(out.fast),
            "inner": [s.loss for s in out.stage_stats],
        }
    return res


def build():
    torch.manual_seed(0)
    return dense_model(tiny_model_config())


def main(out_dir: str) -> None:
    results = {}
    tokens, noise, pre = batch()
    # 1. TP=2
    at_tp(2)
    results["tp2"] = run_all(build(), tokens, noise, pre)
    # 2. TP=1 x DP=2: half of the batch per rank
    at_tp(1)
    r = dist.get_rank()
    rows = slice(2 * r, 2 * r + 2)
    half = Noise(
        t=noise.t[rows], mask=noise.mask[rows], noisy=noise.noisy[rows], maskable=noise.maskable[rows]
    )
    model = build()
    mem = MemoryConfig(enabled=True, inner_lr=0.5)
    out = memdlm_loss(
        model,
        model,
        tokens[rows],
        half,
        OBJ,
        mem,
        MASK,
        torch.Generator().manual_seed(7),
        current_dims().dp_group,
        [pre[rows]],
    )
    out.loss.backward()
    grads = full_grads(model)
    for g in grads.values():  # what data-parallel gradient averaging does
        dist.all_reduce(g, group=current_dims().dp_group)
        g /= 2
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=current_dims().dp_group)
    results["dp2"] = {
        "loss": loss / 2,
        "grads": grads,
        "fast": full_fast(out.fast),
        "inner": [s.loss for s in out.stage_stats],
    }
    # 3. the single-process reference: TP=1, the whole batch
    results["tp1"] = run_all(build(), tokens, noise, pre)
    if r == 0:
        torch.save(results, f"{out_dir}/results.pt")
    else:
        torch.save(results["dp2"], f"{out_dir}/dp2_rank1.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""Worker for test_engine_parity: DeepSpeed ZeRO-3 runs vs a plain single-process PyTorch run.

Same seeded global batch of 4 sequences per step, 4 steps, fp32, ZeRO-3 with
``stage3_param_persistence_threshold=0`` (every parameter really partitioned):
  ref-mdlm / ref-memdlm : plain PyTorch, one process's view of the whole batch (AdamW, clip, LR schedule)
  dp2-mdlm / dp2-memdlm : ZeRO-3, TP=1 x DP=2, half the batch per rank
  tp2-mdlm              : ZeRO-3, TP=2 x DP=1, with zero.Init over the data-parallel group
Rank 0 saves losses and consolidated final weights to <out>/engine.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import Noise, draw_noise, maskable_positions
from pipeline.engine.deepspeed import build_engine, lr_lambda
from pipeline.engine.export import consolidated_state_dict
from pipeline.memory.inner_loop import memdlm_loss, pre_anchor_masks
from pipeline.train_config import load_train_config
from tests._models import current_dims, dense_model
from tests.distributed._worker import at_tp, finish

STEPS, GLOBAL_BATCH, MASK = 4, 4, 4


def config(method: str, zero_init: bool = False):
    return load_train_config(
        None,
        [
            "model_preset=tiny",
            "model.vocab_size=300",
            "model.seq_len=24",
            f"steps={STEPS}",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "optim.grad_clip=0.5",
            # eps above float noise: Adam's first steps are ~lr*sign(g), and the sign of a ~1e-9
            # gradient depends on reduction order; with eps=1e-6 such elements barely move.
            "optim.eps=1e-6",
            "parallel.precision=fp32",
            "parallel.param_persistence_threshold=0",
            f"parallel.zero_init={str(zero_init).lower()}",
            f"memory.enabled={'true' if method == 'memdlm' else 'false'}",
            "memory.inner_lr=0.5",
            f"data.batch_size={GLOBAL_BATCH // current_dims().dp}",
        ],
    )


def batch(step: int):
    """The global batch of a step: tokens, anchor noise, pre-anchor mask (drawn once for all rows)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(6, 300, (GLOBAL_BATCH, 24), generator=g)
    noise = draw_noise(tokens, maskable_positions(tokens, 0), config("mdlm").objective, MASK, g)
    (pre,) = pre_anchor_masks(noise.mask, noise.maskable, 1.5, 1, g)
    return tokens, noise, pre


def rows(noise: Noise, sl: slice) -> Noise:
    return Noise(t=noise.t[sl], mask=noise.mask[sl], noisy=noise.noisy[sl], maskable=noise.maskable[sl])


def loss_of(method, cfg, module, outer, tokens, noise, pre, step, group):
    if method == "mdlm":
        return mdlm_loss(outer, tokens, noise, cfg.objective, group)
    g = torch.Generator().manual_seed(77 + step)  # same memory initialisation on every rank
    return memdlm_loss(module, outer, tokens, noise, cfg.objective, cfg.memory, MASK, g, group, [pre]).loss


def reference(method: str) -> dict:
    cfg = config(method)
    torch.manual_seed(0)
    model = dense_model(cfg.model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    losses, norms = [], []
    for step in range(STEPS):
        tokens, noise, pre = batch(step)
        loss = loss_of(method, cfg, model, model, tokens, noise, pre, step, None)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).double())
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.detach())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return {"losses": torch.stack(losses), "grad_norms": torch.stack(norms), "weights": weights}


def deepspeed_run(method: str, zero_init: bool = False) -> dict:
    cfg = config(method, zero_init)
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, current_dims(), lambda: dense_model(cfg.model))
    per = GLOBAL_BATCH // current_dims().dp
    sl = slice(current_dims().dp_rank * per, (current_dims().dp_rank + 1) * per)
    losses, norms = [], []
    for step in range(STEPS):
        tokens, noise, pre = batch(step)
        loss = loss_of(
            method,
            cfg,
            engine.module,
            engine,
            tokens[sl],
            rows(noise, sl),
            pre[sl],
            step,
            current_dims().dp_group,
        )
        engine.backward(loss)
        engine.step()
        norms.append(torch.tensor(float(engine.get_global_grad_norm()), dtype=torch.float64))
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=current_dims().dp_group)
        losses.append(mean / current_dims().dp)
    return {
        "losses": torch.stack(losses),
        "grad_norms": torch.stack(norms),
        "weights": consolidated_state_dict(engine.module),
    }


def main(out: str) -> None:
    res = {}
    at_tp(1)
    res["ref-mdlm"], res["ref-memdlm"] = reference("mdlm"), reference("memdlm")
    res["dp2-mdlm"], res["dp2-memdlm"] = deepspeed_run("mdlm"), deepspeed_run("memdlm")
    at_tp(2)
    res["tp2-mdlm"] = deepspeed_run("mdlm", zero_init=True)
    finish(res, f"{out}/engine.pt")


if __name__ == "__main__":
    main(sys.argv[1])

"""Worker for test_elastic_resume: the real Trainer (ZeRO-3, MDLM) at one layout, resumed at another.

    _elastic_worker.py <dataset> <out> <run> <tp> <grad_accum> <steps> <snap_at> [<key=value> ...]

Trains run ``<out>/<run>`` (resuming whatever checkpoint it holds) to ``steps``, checkpoints every
4 steps; ``key=value`` arguments are config overrides (``lora.enabled=true``, ...). Rank 0 writes,
under ``<out>``:
  <run>.json          the logged records of this launch
  <run>-loaded.pt     a resumed launch's state right after loading its checkpoint
  <run>-snap.pt       a fresh launch's state after step ``snap_at`` (it then trains on, uninterrupted)
  <run>-end.pt        the state at the end
A state: full weights (fp32 masters of the trained parameters, the frozen ones as they are) and
Adam exp_avg / exp_avg_sq (ZeRO partitions and TP shards gathered), Adam's step counter of every
trained parameter on every rank, the names of the frozen parameters, the LR, the step, grad_accum,
and the full logits of a fixed batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from pipeline.train import Trainer
from tests.conftest import tiny_trainer_config
from tests.distributed._gather import gather


def config(dataset: str, run_dir: Path, tp: int, grad_accum: int, steps: int, *overrides: str):
    return tiny_trainer_config(
        dataset,
        run_dir,
        f"steps={steps}",
        f"parallel.tp={tp}",
        f"grad_accum={grad_accum}",
        "data.batch_size=2",
        "memory.enabled=false",
        "checkpoint.every=4",
        "checkpoint.keep=3",
        "parallel.precision=fp32",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        # eps above float noise: the sign of a ~1e-9 gradient depends on summation order
        "optim.eps=1e-6",
        *overrides,
    )


def _full(t: torch.Tensor, param) -> torch.Tensor:
    """A ZeRO-gathered tensor of ``param``, its TP shards joined too (fp32, on the CPU)."""
    if getattr(param, "tensor_model_parallel", False):
        t = gather(t, param.partition_dim)
    return t.detach().float().cpu().clone()


def _frozen(param) -> torch.Tensor:
    """A frozen parameter (no fp32 master, no Adam state) as the model holds it, gathered."""
    with deepspeed.zero.GatheredParameters([param]):
        t = param.data.detach().clone()
    if getattr(param, "tensor_model_parallel", False):
        t = gather(t, param.partition_dim)
    return t.cpu()


def adam_steps(trainer: Trainer) -> dict[str, list[float]]:
    """Adam's step counter of every trained parameter (its ZeRO sub-group's), one value per rank."""
    zero = trainer.engine.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    mine = {}
    for flat, group in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups, strict=True):
        step = zero.optimizer.state[flat].get("step")
        for p in group:
            mine[names[id(p)]] = None if step is None else float(step)
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {name: [r[name] for r in ranks] for name in mine}


def snapshot(trainer: Trainer) -> dict:
    """Full tensors of the trainer's weights, Adam moments and steps, LR, and logits of a fixed batch."""
    out: dict = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "frozen": []}
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            out["weights"][name] = _frozen(p)
            out["frozen"].append(name)
            continue
        out["weights"][name] = _full(safe_get_full_fp32_param(p), p)
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = _full(safe_get_full_optimizer_state(p, key), p)
    out["adam_step"] = adam_steps(trainer)
    out["lr"] = float(trainer.scheduler.get_last_lr()[0])
    tokens = torch.randint(6, 300, (2, trainer.cfg.model.seq_len), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = trainer.model(tokens)
    out["logits"] = gather(logits, -1)
    out["grad_accum"] = trainer.cfg.grad_accum
    out["step"] = trainer.state.step
    return out


def main(
    dataset: str, out_dir: str, run: str, tp: int, grad_accum: int, steps: int, snap_at: int, *overrides: str
) -> None:
    out = Path(out_dir)
    trainer = Trainer(config(dataset, out / run, tp, grad_accum, steps, *overrides))

    def save(name: str) -> None:
        state = snapshot(trainer)  # collective
        if dist.get_rank() == 0:
            torch.save(state, out / f"{run}-{name}.pt")

    history = []
    if trainer.state.step > 0:
        save("loaded")
    elif snap_at:
        history += trainer.run(stop_after=snap_at)
        save("snap")
    history += trainer.run()
    save("end")
    if dist.get_rank() == 0:
        (out / f"{run}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], *map(int, a[3:7]), *a[7:])

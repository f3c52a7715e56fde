"""Worker for test_lora_tp: outer LoRA at TP=2 equals TP=1, and the Trainer trains it at TP=2.

    _lora_tp_worker.py <dataset> <out>

1. TP=1 on each rank, then TP=2 over both: the same seeded model + LoRA (B set non-zero so every
   adapter tensor gets a gradient), the same batch: logits, MDLM loss, the LoRA gradients
   (gathered to full tensors), whether any base weight got a gradient, and whether the replicated
   LoRA tensors and their gradients are identical on the two TP ranks.
2. The real Trainer (ZeRO-3, memory on, LoRA on) at TP=2 for 3 steps, then at TP=1 x DP=2 (ZeRO-3
   partitioning the frozen base over 2 ranks) for 2: the consolidated weights before and after,
   and the export.
Rank 0 saves everything to <out>/results.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pipeline.adapters.lora import LoraConfig, add_lora, freeze_base, is_lora_name
from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import draw_noise, maskable_positions
from tests._models import current_dims, dense_model
from tests.conftest import tiny_model_config, tiny_run_overrides
from tests.distributed._gather import gather
from tests.distributed._worker import at_tp, finish

MASK = 4
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)


def full(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sharded = getattr(p, "tensor_model_parallel", False) and current_dims().tp > 1
    return gather(t, p.partition_dim) if sharded else t.detach().clone()


def same_on_tp_ranks(t: torch.Tensor) -> bool:
    other = t.detach().clone()
    dist.broadcast(other, src=dist.get_rank() - current_dims().tp_rank, group=current_dims().tp_group)
    return torch.equal(other, t.detach())


def model_run() -> dict:
    torch.manual_seed(0)
    cfg = tiny_model_config(n_kv_heads=2)
    model = dense_model(cfg)
    add_lora(model, LORA, seed=0)
    freeze_base(model)
    with torch.no_grad():  # B != 0 (the same full values, sliced like the weight), so dA != 0 too
        g = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                shape = list(p.shape)
                if getattr(p, "tensor_model_parallel", False):
                    shape[p.partition_dim] *= current_dims().tp
                value = 0.1 * torch.randn(shape, generator=g)
                if getattr(p, "tensor_model_parallel", False):
                    value = value.chunk(current_dims().tp, dim=p.partition_dim)[current_dims().tp_rank]
                p.copy_(value)
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(6, cfg.vocab_size, (4, 24), generator=g)
    obj = ObjectiveConfig()
    noise = draw_noise(tokens, maskable_positions(tokens, 0), obj, MASK, g)
    res = {"logits": gather(model(tokens=noise.noisy), -1)}
    loss = mdlm_loss(model, tokens, noise, obj, None)
    loss.backward()
    res["loss"] = loss.detach()
    res["grads"] = {n: full(p, p.grad) for n, p in model.named_parameters() if is_lora_name(n)}
    res["base_grads"] = [n for n, p in model.named_parameters() if not is_lora_name(n) and p.grad is not None]
    res["replicated_identical"] = all(
        same_on_tp_ranks(p) and same_on_tp_ranks(p.grad)
        for n, p in model.named_parameters()
        if is_lora_name(n) and not p.tensor_model_parallel
    )
    return res


def trainer_run(dataset: str, out: Path, tp: int, steps: int) -> dict:
    from pipeline.engine.export import consolidated_state_dict, export_model
    from pipeline.train import Trainer
    from pipeline.train_config import load_train_config

    cfg = load_train_config(
        None,
        [
            *tiny_run_overrides(dataset, out / "mlruns"),
            f"run_dir={out / f'run-tp{tp}'}",
            f"steps={steps}",
            "checkpoint.every=0",
            "eval.every=0",
            "data.num_workers=0",
            "memory.enabled=true",
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
            f"parallel.tp={tp}",
            "parallel.param_persistence_threshold=0",
            "parallel.precision=fp32",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "tracking.enabled=false",
        ],
    )
    trainer = Trainer(cfg)
    before = consolidated_state_dict(trainer.model)
    history = trainer.run()
    after = consolidated_state_dict(trainer.model)
    export = export_model(
        trainer.engine,
        cfg,
        out / f"export-tp{tp}",
        Path(dataset) / "tokenizer.model",
        trainer.manifest.special_ids,
        steps,
    )
    return {"before": before, "after": after, "history": history, "export": str(export)}


def main(dataset: str, out_dir: str) -> None:
    out = Path(out_dir)
    results = {}
    at_tp(1)
    results["tp1"] = model_run()
    at_tp(2)
    results["tp2"] = model_run()
    results["trainer-tp2"] = trainer_run(dataset, out, tp=2, steps=3)
    parallel_state.destroy_model_parallel()
    results["trainer-dp2"] = trainer_run(dataset, out, tp=1, steps=2)  # ZeRO-3 partitions over 2 ranks
    finish(results, out / "results.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

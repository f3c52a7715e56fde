"""One configuration of bench-scale (started by bench/scale.py through torchrun): MemDLM steps of the
trainer's own ``train_step`` at a TP x DP layout, with this rank's peak memory.

    python -m torch.distributed.run --nproc_per_node 2 bench/_scale_worker.py TP STEPS OUT PRESET GLOBAL_BATCH DATA [KEY=VALUE ...]
(trailing arguments: more training overrides, e.g. parallel.ep=2)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys

import torch
import torch.distributed as dist

from pipeline.train import Trainer
from pipeline.train_config import load_train_config

GLOBAL_BATCH = 8


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def main(tp: int, steps: int, out: str, preset: str, global_batch: int, data: str, *extra: str) -> None:
    per_rank = global_batch // (int(os.environ.get("WORLD_SIZE", "1")) // tp)
    baseline = rss_mib()  # interpreter, torch, DeepSpeed, megatron: not part of the memory model
    # the run directory is beside the result file: the same path on every rank
    cfg = load_train_config(
        "configs/train/local.yaml",
        [
            f"parallel.tp={tp}",
            f"data.batch_size={per_rank}",
            f"model_preset={preset}",
            f"data.path={data}",
            "data.num_workers=0",
            f"run_dir={out}.run",
            "tracking.enabled=false",
            "eval.every=0",
            "checkpoint.resume=false",
            "log_every=1000000",
            "steps=1000000",
            *extra,
        ],
    )
    trainer = Trainer(cfg)
    times = [trainer.train_step()["seconds"] for _ in range(steps + 2)][2:]
    trainer.close()
    rec = {
        "rank": dist.get_rank(),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": rss_mib(),
        "peak_device_mib": device_mib(),  # torch.cuda.max_memory_allocated on GPUs
        "step_s": statistics.median(times),
        "precision": trainer.precision.dtype,
        "precision_reason": trainer.precision.reason,
    }
    recs = [None] * dist.get_world_size()
    dist.all_gather_object(recs, rec)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(recs, f)


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
        sys.argv[6],
        *sys.argv[7:],
    )

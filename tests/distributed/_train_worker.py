"""Worker for test_train_resume: the real Trainer on 2 processes (ZeRO-3, DP=2).

    _train_worker.py full   <dataset> <out>   uninterrupted 6 steps (run A) + 3 of 6 steps (runs B, D)
    _train_worker.py crash  <dataset> <out>   run C: 3 steps saved, then SIGKILL inside the step-6 save
    _train_worker.py resave <dataset> <out>   run D relaunched at step 3, a stop signal re-saves step 3:
                                              SIGKILL between the swap's two renames
    _train_worker.py resume <dataset> <out>   resume B, C and D to step 6
Rank 0 writes each run's logged losses to <out>/<run>.json (an error resuming D to <out>/D-error.txt).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides


def cfg(dataset: str, run_dir: Path):
    return load_train_config(
        None,
        [
            *tiny_run_overrides(dataset, run_dir.parent / "mlruns"),
            f"run_dir={run_dir}",
            "steps=6",
            "data.num_workers=1",
            "memory.enabled=true",
            "checkpoint.every=3",
            "checkpoint.keep=2",
            "eval.every=3",
            "eval.batches=2",
            "parallel.param_persistence_threshold=0",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
        ],
    )


def record(out: Path, name: str, history) -> None:
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(history))


def main(mode: str, dataset: str, out_dir: str) -> None:
    out = Path(out_dir)
    if mode == "full":
        record(out, "A", Trainer(cfg(dataset, out / "A")).run())
        record(out, "B-first", Trainer(cfg(dataset, out / "B")).run(stop_after=3))
        record(out, "D-first", Trainer(cfg(dataset, out / "D")).run(stop_after=3))
    elif mode == "crash":
        trainer = Trainer(cfg(dataset, out / "C"))
        record(out, "C-first", trainer.run(stop_after=3))
        import pipeline.engine.checkpoint as ckpt

        real_replace = os.replace

        def die_on_publish(src, dst):
            if Path(src).name == ".tmp-step-000006":
                os.kill(os.getpid(), signal.SIGKILL)  # the worst moment: all files written, not renamed
            return real_replace(src, dst)

        ckpt.os.replace = die_on_publish
        trainer.run()
    elif mode == "resave":
        import pipeline.engine.checkpoint as ckpt

        trainer = Trainer(cfg(dataset, out / "D"))  # resumes at step 3
        real_replace = os.replace

        def die_inside_resave(src, dst):
            if Path(src).name == ".tmp-step-000003":
                os.kill(os.getpid(), signal.SIGKILL)  # the new copy is complete, not yet in place
            return real_replace(src, dst)

        ckpt.os.replace = die_inside_resave
        trainer.stop.request(signal.SIGTERM)  # saves step 3 again before any step
        trainer.run()
    elif mode == "resume":
        record(out, "B-second", Trainer(cfg(dataset, out / "B")).run())
        record(out, "C-second", Trainer(cfg(dataset, out / "C")).run())
        try:  # recorded, not raised: B and C are judged on their own
            record(out, "D-second", Trainer(cfg(dataset, out / "D")).run())
        except Exception as exc:
            if dist.get_rank() == 0:
                (out / "D-error.txt").write_text(f"{type(exc).__name__}: {exc}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Worker for test_hf_finetune_tp: an imported Hugging Face model fine-tuned on 2 real processes.

    _hf_finetune_worker.py <export> <dataset> <out>

Two runs in one launch, each from ``init_from=<export>`` (weights and tokenizer of import_hf),
MemDLM on, ZeRO-3 partitioning every parameter, objective.mode=sft, the same global batch of 4
sequences, and an export at the end as ``python -m pipeline.train --export`` writes it:
  tp2   TP=2 x DP=1 (batch 4 on the one data-parallel rank)
  dp2   TP=1 x DP=2 (batch 2 on each data-parallel rank)
Rank 0 writes ``<out>/<run>.json``: ``layout`` (tp, dp), ``history`` (the logged records) and the
held-out numbers (pipeline/eval/heldout.py: fixed noise, the same draws each time) ``before`` the
run and ``after`` it (the run's own evaluation at its last step). The run directory is
``<out>/<run>/`` (``export/``, ``dataset_manifest.json``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from pipeline.engine.export import export_model, export_model_config
from pipeline.model.config import ModelConfig
from pipeline.train import Trainer
from tests.conftest import tiny_trainer_config

STEPS = 8
RUNS = {"tp2": ("parallel.tp=2", "data.batch_size=4"), "dp2": ("parallel.tp=1", "data.batch_size=2")}


def model_overrides(export: Path, seq_len: int) -> list[str]:
    """``model.<key>=<value>`` for every key of the export's model config (the imported
    architecture, nothing of the tiny preset left); ``seq_len`` the dataset's (RoPE: allowed)."""
    theirs = {**asdict(ModelConfig()), **export_model_config(export), "seq_len": seq_len}
    return [f"model.{k}={json.dumps(v)}" for k, v in theirs.items()]


def config(export: Path, dataset: Path, run_dir: Path, *extra: str):
    seq_len = json.loads((dataset / "manifest.json").read_text())["seq_len"]
    return tiny_trainer_config(
        dataset,
        run_dir,
        f"init_from={export}",
        f"steps={STEPS}",
        *model_overrides(export, seq_len),
        "objective.mode=sft",
        "memory.enabled=true",
        "parallel.precision=fp32",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "checkpoint.every=0",
        f"eval.every={STEPS}",  # at the end of the run (as in production: then save, export)
        "eval.batches=1",
        "tracking.enabled=false",
        *extra,
    )


def main(export: str, dataset: str, out_dir: str) -> None:
    out = Path(out_dir)
    for name, extra in RUNS.items():
        cfg = config(Path(export), Path(dataset), out / name, *extra)
        trainer = Trainer(cfg)
        before = trainer.evaluate()  # the imported weights
        history = trainer.run()
        after = {k: v for k, v in history[-1].items() if k.startswith("eval/")}
        # what `python -m pipeline.train --export` does after the run
        export_model(
            trainer.engine,
            cfg,
            Path(cfg.run_dir) / "export",
            Path(cfg.data.path) / trainer.manifest.tokenizer_file,
            trainer.manifest.special_ids,
            trainer.state.step,
        )
        if dist.get_rank() == 0:
            layout = {"tp": trainer.dims.tp, "dp": trainer.dims.dp}
            record = {"layout": layout, "history": history, "before": before, "after": after}
            (out / f"{name}.json").write_text(json.dumps(record))
        dist.barrier()
        parallel_state.destroy_model_parallel()  # the next run builds its own TP x DP groups
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

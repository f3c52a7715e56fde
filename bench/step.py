"""MemDLM vs MDLM step time through the trainer's own step: same preset, batch and data, alternating.

    python -m bench.step [--preset small] [--batch 8] [--steps 16] [--precision auto|bf16|fp32]
                         [--data data/bench-step-256] [--config-data configs/data/sample.yaml]

Two :class:`pipeline.train.Trainer` objects (memory off and on) are built on the real DeepSpeed
engine and stepped in turn with :meth:`Trainer.train_step`: the forward, the inner loop, the
backward, the ZeRO-3 reduction and AdamW, exactly what a run times. Model FLOPs and MFU are the
trainer's own (the one cost model, pipeline/perf/cost.py, against the run's MFU peak,
pipeline/hardware/peak.py, which re-measures itself rather than report an MFU above 1); the
FLOP ratio is the lower bound the measured time ratio is compared to. The dataset is the sample
corpus built at the preset's sequence length (once, under ``--data``). Writes
bench/results/<--out>.json (default step.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, write
from data_prep.prepare import USER_ERRORS, load_dataset_config, prepare_any
from pipeline.cli import run_main
from pipeline.families.registry import param_count
from pipeline.train import Trainer
from pipeline.train_config import load_train_config


def bench_dataset(preset: str, data: str | None, config: str) -> str:
    """The dataset the benchmark trains on, built if missing: ``config``'s corpus with a tokenizer of
    the preset's vocabulary at its sequence length (the config's own dataset when they agree:
    ``make pretrain``'s data/sample for the small preset)."""
    model = load_train_config(None, [f"model_preset={preset}"]).model
    prep = load_dataset_config(config)
    if (prep.seq_len, prep.tokenizer.vocab_size) != (model.seq_len, model.vocab_size) or data:
        out = data or f"{prep.out_dir}-{model.seq_len}-{model.vocab_size}"
        overrides = [f"out_dir={out}", f"seq_len={model.seq_len}", f"tokenizer.vocab_size={model.vocab_size}"]
        prep = load_dataset_config(config, [*overrides, "train_shards=8", "val_shards=2"])
    prepare_any(prep, progress=False)
    return prep.out_dir


def bench_trainer(
    preset: str, batch: int, data: str, memory: bool, run_dir: Path, extra: list[str]
) -> Trainer:
    cfg = load_train_config(
        None,
        [
            f"model_preset={preset}",
            f"data.path={data}",
            f"data.batch_size={batch}",
            "data.num_workers=0",
            f"memory.enabled={str(memory).lower()}",
            f"run_dir={run_dir}",
            "tracking.enabled=false",
            "eval.every=0",
            "checkpoint.resume=false",
            "log_every=1000000",  # no memory-gain measurement: the step a run times
            "steps=1000000",
            *extra,
        ],
    )
    return Trainer(cfg)


def run(preset: str, batch: int, steps: int, data: str, extra: list[str]) -> dict[str, Any]:
    """Both trainers, two warm-up steps each, then ``steps`` alternating timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            m: bench_trainer(preset, batch, data, m == "memdlm", Path(tmp) / m, extra)
            for m in ("mdlm", "memdlm")
        }
        recs = alternate(trainers, steps)
    return summarize(preset, batch, steps, trainers, recs)


def alternate(trainers: dict[str, Trainer], steps: int) -> dict[str, list[dict[str, float]]]:
    """Two warm-up steps each, then ``steps`` timed steps of each trainer in turn (so the machine's
    drift hits all alike); the trainers' step records by name. Closes the trainers."""
    try:
        for _ in range(2):  # warm-up (allocator, autocast caches, ZeRO buffers)
            for t in trainers.values():
                t.train_step()
        recs: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
        for _ in range(steps):
            for name, t in trainers.items():
                recs[name].append(t.train_step())
    finally:
        for t in trainers.values():
            t.close()
    return recs


def summarize(
    preset: str, batch: int, steps: int, trainers: dict[str, Trainer], recs: dict[str, list[dict[str, float]]]
) -> dict[str, Any]:
    t = trainers["mdlm"]
    world = t.dims.world
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in recs.items()}
    flops = {m: [r["model_tflops_per_s"] * 1e12 * r["seconds"] * world for r in rs] for m, rs in recs.items()}
    tokens = t.global_batch * t.cfg.model.seq_len
    result = {
        "preset": preset,
        "device": str(t.device),
        "batch": batch,
        "seq_len": t.cfg.model.seq_len,
        "params": param_count(t.cfg.model),
        "steps": steps,
        "precision": t.precision.dtype,
        "precision_reason": t.precision.reason,
        **trainers["memdlm"].peak.as_record(),  # the later of the two: a re-measured peak if any
        "mdlm_step_s": med["mdlm"],
        "memdlm_step_s": med["memdlm"],
        "mdlm_tokens_per_s": tokens / med["mdlm"],
        "memdlm_tokens_per_s": tokens / med["memdlm"],
        # median of per-pair ratios: each MemDLM step against the MDLM step right before it,
        # robust to the machine's drift over the run (2 shared cores vary by ~5 %)
        "memdlm_over_mdlm_step_ratio": statistics.median(
            m["seconds"] / d["seconds"] for m, d in zip(recs["memdlm"], recs["mdlm"], strict=True)
        ),
        "memdlm_over_mdlm_flops_ratio": statistics.mean(flops["memdlm"]) / statistics.mean(flops["mdlm"]),
        "mdlm_model_flops_per_s": statistics.mean(flops["mdlm"]) / med["mdlm"],
        "mdlm_mfu": statistics.median(r["mfu"] for r in recs["mdlm"]),
        "memdlm_mfu": statistics.median(r["mfu"] for r in recs["memdlm"]),
        "machine": machine(),
    }
    result["step_ratio_over_flops_ratio"] = (
        result["memdlm_over_mdlm_step_ratio"] / result["memdlm_over_mdlm_flops_ratio"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator; 0 = table/measure")
    p.add_argument(
        "--data",
        default=None,
        help="dataset directory (built if missing; default: data/sample or data/bench-step-<seq>-<vocab>)",
    )
    p.add_argument("--config-data", default="configs/data/sample.yaml", help="how to build it when missing")
    p.add_argument("--out", default="step")
    args = p.parse_args(argv)
    os.environ.setdefault("MASTER_PORT", "29731")
    data = bench_dataset(args.preset, args.data, args.config_data)
    extra = [f"parallel.precision={args.precision}", f"peak_tflops={args.peak_tflops}"]
    result = run(args.preset, args.batch, args.steps, data, extra)
    print(f"precision: {result['precision']} ({result['precision_reason']})")
    print(f"MFU peak: {result['peak_flops'] / 1e12:.3g} TFLOP/s ({result['peak_flops_source']})")
    for k in (
        "mdlm_tokens_per_s",
        "memdlm_tokens_per_s",
        "memdlm_over_mdlm_step_ratio",
        "memdlm_over_mdlm_flops_ratio",
    ):
        print(f"{k:32s} {result[k]:.4g}")
    print(f"{'mdlm_mfu':32s} {result['mdlm_mfu']:.4g}")
    write(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))

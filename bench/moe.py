"""Mixture-of-experts step time through the trainer's own step: against a dense model of the same
active FLOPs, MemDLM over MDLM on the MoE, and expert parallelism EP=2 against EP=1.

    python -m bench.moe [--batch 8] [--steps 8] [--ep-steps 4] [--precision auto|bf16|fp32]
                        [--config-data configs/data/sample.yaml] [--out moe]

1. One process: three :class:`pipeline.train.Trainer` objects on the real DeepSpeed engine, stepped
   in turn with :meth:`Trainer.train_step` (forward, inner loop, backward, ZeRO-3, AdamW): the
   ``small`` dense preset (MDLM) and the ``small-moe`` preset (MDLM and MemDLM), which routes each
   token through 2 of 16 experts plus a shared expert with about ``small``'s FFN FLOPs. FLOPs are
   the trainer's own (the cost model's active FLOPs); the goal is a MoE time per FLOP within 1.5x
   of the dense model's: the routing, sorting and scattering a dense FFN does not do.
2. Two processes (torchrun, gloo): ``small-moe`` MemDLM at EP=1 and EP=2 (DP=2 both, the same
   global batch), step time and per-rank peak RSS (bench/_scale_worker.py).

The dataset is the sample corpus at the presets' length and vocabulary (``make pretrain``'s
data/sample). Writes bench/results/<--out>.json (default moe.json).
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
from bench.scale import measure
from bench.step import alternate, bench_dataset, bench_trainer
from data_prep.prepare import USER_ERRORS
from pipeline.cli import run_main
from pipeline.perf.cost import model_cost
from pipeline.train_config import load_train_config

GOAL_TIME_PER_FLOP = 1.5  # MoE over dense, seconds per model FLOP
RUNS = {"dense-mdlm": ("small", False), "moe-mdlm": ("small-moe", False), "moe-memdlm": ("small-moe", True)}


def _per_step(recs: list[dict[str, float]]) -> tuple[float, float]:
    """(median step seconds, mean model FLOPs per step) of one trainer's records (world 1)."""
    seconds = statistics.median(r["seconds"] for r in recs)
    flops = statistics.mean(r["model_tflops_per_s"] * 1e12 * r["seconds"] for r in recs)
    return seconds, flops


def one_process(batch: int, steps: int, data: str, extra: list[str]) -> dict[str, Any]:
    """Dense MDLM, MoE MDLM and MoE MemDLM through the trainer, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: bench_trainer(preset, batch, data, memory, Path(tmp) / name, extra)
            for name, (preset, memory) in RUNS.items()
        }
        precision = trainers["moe-mdlm"].precision
        recs = alternate(trainers, steps)
    stats = {name: _per_step(r) for name, r in recs.items()}
    out: dict[str, Any] = {"precision": precision.dtype, "precision_reason": precision.reason}
    for name, (seconds, flops) in stats.items():
        out[f"{name}_step_s"] = seconds
        out[f"{name}_model_flops_per_step"] = flops
    (dense_s, dense_f), (moe_s, moe_f), (_, mem_f) = (stats[n] for n in RUNS)
    out["moe_over_dense_flops_ratio"] = moe_f / dense_f
    out["moe_over_dense_step_ratio"] = moe_s / dense_s
    out["moe_over_dense_time_per_flop"] = (moe_s / moe_f) / (dense_s / dense_f)
    out["time_per_flop_goal"] = GOAL_TIME_PER_FLOP
    out["meets_goal"] = out["moe_over_dense_time_per_flop"] <= GOAL_TIME_PER_FLOP
    # each MemDLM step against the MoE MDLM step right before it (drift-robust, as bench.step)
    out["moe_memdlm_over_mdlm_step_ratio"] = statistics.median(
        m["seconds"] / d["seconds"] for m, d in zip(recs["moe-memdlm"], recs["moe-mdlm"], strict=True)
    )
    out["moe_memdlm_over_mdlm_flops_ratio"] = mem_f / moe_f
    return out


def expert_parallel(batch: int, steps: int, data: str, extra: list[str]) -> list[dict[str, Any]]:
    """small-moe MemDLM on 2 ranks at EP=1 and EP=2 (global batch ``batch``)."""
    rows = []
    for ep in (1, 2):
        recs = measure(2, 1, steps, data, "small-moe", batch, (f"parallel.ep={ep}", *extra))
        rows.append(
            {
                "world": 2,
                "ep": ep,
                "step_s": max(r["step_s"] for r in recs),
                "peak_rss_mib_per_rank": max(r["peak_rss_mib"] for r in recs),
                "rss_above_baseline_mib_per_rank": max(
                    r["peak_rss_mib"] - r["baseline_rss_mib"] for r in recs
                ),
                "per_rank": recs,
            }
        )
        print(
            f"EP={ep} (world 2): step {rows[-1]['step_s']:.3f} s, peak {rows[-1]['peak_rss_mib_per_rank']:.0f} MiB/rank"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ep-steps", type=int, default=4, help="timed steps per EP launch (0: skip them)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--config-data", default="configs/data/sample.yaml", help="how to build the dataset")
    p.add_argument("--out", default="moe")
    args = p.parse_args(argv)
    os.environ.setdefault("MASTER_PORT", "29733")
    data = bench_dataset("small-moe", None, args.config_data)
    if bench_dataset("small", None, args.config_data) != data:
        raise SystemExit("error: the small and small-moe presets need the same dataset (length, vocabulary)")
    extra = [f"parallel.precision={args.precision}"]
    moe = load_train_config(None, ["model_preset=small-moe"]).model
    cost = model_cost(moe)
    result: dict[str, Any] = {
        "batch": args.batch,
        "steps": args.steps,
        "seq_len": moe.seq_len,
        "moe_params_total": cost.params_total,
        "moe_params_active": cost.params_active,
        "dense_params": model_cost(load_train_config(None, ["model_preset=small"]).model).params_total,
        **one_process(args.batch, args.steps, data, extra),
    }
    for k in (
        "moe_over_dense_time_per_flop",
        "moe_memdlm_over_mdlm_step_ratio",
        "moe_memdlm_over_mdlm_flops_ratio",
    ):
        print(f"{k:36s} {result[k]:.4g}")
    if args.ep_steps:
        result["expert_parallel"] = expert_parallel(args.batch, args.ep_steps, data, extra)
        one, two = result["expert_parallel"]
        result["ep2_over_ep1_step_ratio"] = two["step_s"] / one["step_s"]
    result["machine"] = machine()
    write(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))

"""Per-rank peak memory and step time of the small config at world 1 and 2 (DP and TP), and the
memory model's predictions for the 1B and 7B presets on 8-256 GPUs.

    python -m bench.scale [--steps 4]

Each configuration runs MemDLM through the trainer's own ``train_step`` (ZeRO-3, global batch
8 x 256 of the sample dataset, in the precision training resolves for the device: bf16 where
native, fp32 on an AVX2-only CPU) in its own torchrun launch (gloo, OMP_NUM_THREADS = cores /
world). The memory model (pipeline/perf/memory_model.py) is
checked against what is measured: measured peak RSS minus the process's RSS before the model
existed (interpreter + libraries) vs the predicted training-state + activation bytes.
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, write
from bench.step import bench_dataset
from pipeline.perf.memory_model import estimate_memory
from pipeline.train_config import load_train_config

LAYOUTS = [(1, 1, 1), (2, 1, 2), (2, 2, 1)]  # (world, tp, dp)
GPU_COUNTS = [8, 16, 32, 64, 128, 256]


def measure(
    world: int,
    tp: int,
    steps: int,
    data: str,
    preset: str = "small",
    global_batch: int = 8,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """Per-rank records of one torchrun launch of bench/_scale_worker.py (``extra``: more overrides)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), PYTHONPATH=path)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            "--master_port=29741",
            str(root / "bench" / "_scale_worker.py"),
            str(tp),
            str(steps),
            str(out),
            preset,
            str(global_batch),
            data,
            *extra,
        ]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--preset", default="small")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--worlds", default="1,2", help="which world sizes to run (GPU machines: 1)")
    p.add_argument("--out", default="scale")
    args = p.parse_args()
    small = load_train_config("configs/train/local.yaml", [f"model_preset={args.preset}"])
    data = bench_dataset(args.preset, None, "configs/data/sample.yaml")
    worlds = {int(w) for w in args.worlds.split(",")}
    configs = []
    for world, tp, dp in (lay for lay in LAYOUTS if lay[0] in worlds):
        recs = measure(world, tp, args.steps, data, args.preset, args.global_batch)
        pred = estimate_memory(small.model, small.memory, micro_batch=args.global_batch // dp, tp=tp, dp=dp)
        peak = max(r["peak_rss_mib"] for r in recs)
        above_baseline = max(r["peak_rss_mib"] - r["baseline_rss_mib"] for r in recs)
        if any(r["peak_device_mib"] for r in recs):  # on GPUs the allocator's peak is the comparable number
            above_baseline = max(r["peak_device_mib"] for r in recs)
        configs.append(
            {
                "world": world,
                "tp": tp,
                "dp": dp,
                "peak_rss_mib_per_rank": peak,
                "rss_above_baseline_mib_per_rank": above_baseline,
                "predicted_mib_per_rank": pred.total / 2**20,
                "predicted_over_measured": pred.total / 2**20 / above_baseline,
                "step_s": max(r["step_s"] for r in recs),
                "precision": recs[0]["precision"],
                "precision_reason": recs[0]["precision_reason"],
                "per_rank": recs,
            }
        )
        print(
            f"world {world} tp {tp} dp {dp}: peak {peak:.0f} MiB/rank (+{above_baseline:.0f} over baseline, "
            f"model {pred.total / 2**20:.0f}), step {configs[-1]['step_s']:.2f}s"
        )
    predictions = []
    for preset, seq in (("1b", 2048), ("7b", 4096)):
        cfg = load_train_config(None, [f"model_preset={preset}", "memory.enabled=true"])
        for gpus in GPU_COUNTS:
            for tp in (1, 8):
                est = estimate_memory(cfg.model, cfg.memory, micro_batch=1, tp=tp, dp=gpus // tp, seq_len=seq)
                predictions.append(
                    {
                        "preset": preset,
                        "gpus": gpus,
                        "tp": tp,
                        "dp": gpus // tp,
                        "micro_batch": 1,
                        "seq_len": seq,
                        "gib_per_gpu": round(est.total_gib, 2),
                        "breakdown_gib": est.as_gib(),
                    }
                )
    write(args.out, {"configs": configs, "predictions": predictions, "machine": machine()})


if __name__ == "__main__":
    main()

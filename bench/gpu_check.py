"""The GPU check: the CUDA path end to end on one bare GPU machine, in one timed script.

    bash bench/gpu_check.sh                      # = python3 -m bench.gpu_check run
    python -m bench.gpu_check run [--budget-s 330] [--preset 125m] [--steps 30] [--bench-presets 125m,1b]
    .venv/bin/python -m bench.gpu_check prepare  # here, with network: wheels + corpus to carry there

``run`` goes through stages, each timed, each recorded as ``pass``, ``fail`` (with the error and
the tail of its log) or ``skipped: ...``, and writes ``bench/results/gpu_check.json``:

1. ``install``: a venv that sees the machine's own torch (never reinstalled), the runtime
   packages installed from the carried wheel folder with ``pip --no-index`` and ``DS_BUILD_OPS=0``;
   records that torch's version and location are unchanged. ``--no-install`` checks an existing
   environment instead.
2. ``environment``: GPU name, driver, torch / CUDA / NCCL / DeepSpeed / megatron-core versions;
   with ``--device-check cuda`` (default) it fails when CUDA is not usable.
3. ``data``: ``make data`` on the carried corpus (tokenizer + shards, on this machine's cores).
4. ``pretrain``: ``make pretrain CLUSTER=local`` (submitit LocalExecutor, 1 task, NCCL) of the
   ``--preset`` model (125m: 134M parameters) for ``--steps`` steps with evals, checkpoints and an
   export: the uninterrupted reference.
5. ``resume``: the same command again in another run directory, killed (SIGKILL of the launcher and
   its task) once its first checkpoint is published, then started again: it resumes from that
   checkpoint, finishes and exports. Its losses (train and eval) must match the reference's at
   every step within ``--resume-rtol`` (relative).
6. ``sample``: ``make sample`` on the resumed run's export, memory off and adapted.
7. ``eval``: ``make eval`` (a small config: 3 tasks x 8 examples, exposure bias) on that export.
8. ``bench_step_<preset>``: ``make bench-step`` per ``--bench-presets`` preset: MFU against the
   trainer's peak (the table's dense bf16 peak on known GPUs), MemDLM/MDLM step and FLOP ratios.
9. ``bench_moe``: ``make bench-moe``: the mixture-of-experts family on CUDA (routing, dispatch,
   per-expert fast weights) against a dense model of equal active FLOPs, MemDLM/MDLM on it; with
   ``--gpus 2`` or more also EP=2 vs EP=1 on two ranks.

A global time budget (``--budget-s``) bounds the whole run: a stage starts only if its minimum
time still fits (else ``skipped: time budget``), and its commands are killed when the budget runs
out. This module uses the standard library only: it runs on the bare machine's Python before any
package is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpucheck.check import GpuCheck
from bench.gpucheck.common import DEFAULT_CORPUS, DEFAULT_OUT, DEFAULT_WHEELS, ROOT
from bench.gpucheck.prepare import download_wheels, write_corpus
from bench.gpucheck.report import build_report, now, write_report
from bench.gpucheck.runner import Budget, run_stages


def _kv(text: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, v = item.split("=", 1)
        out[k] = cast(v)
    return out


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check run")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                   help="the interpreter that has the machine's torch")  # fmt: skip
    p.add_argument(
        "--venv", default=None, help="environment to create (default <work>/venv) or, with --no-install, use"
    )
    p.add_argument("--no-install", action="store_true", help="use --venv as it is (it has the packages)")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS))
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu-check"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--budget-s", type=float, default=330.0, help="whole run, install included")
    p.add_argument("--device-check", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="125m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary (the model keeps its own)")
    p.add_argument("--resume-rtol", type=float, default=1e-3)
    p.add_argument("--eval-n", type=int, default=8, help="examples per task")
    p.add_argument("--eval-context", type=int, default=192, help="task context tokens (<= --seq-len)")
    p.add_argument("--bench-presets", default="125m,1b")
    p.add_argument("--bench-steps", type=int, default=8)
    p.add_argument("--bench-batch", default="125m=8,1b=4", help="preset=batch,...")
    p.add_argument("--bench-extra", default="", help="more bench.step flags, e.g. '--peak-tflops 989'")
    p.add_argument("--bench-min-s", default="125m=30,1b=70", help="preset=seconds,...: skipped below")
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs here: bench_moe adds EP=1 vs EP=2 with 2 or more"
    )
    p.add_argument("--stages", default="", help="comma-separated stage-name prefixes to run (default: all)")
    a = p.parse_args(argv)
    a.bench_presets = [x for x in a.bench_presets.split(",") if x]
    a.bench_batch = _kv(a.bench_batch, int)
    a.bench_min_s = _kv(a.bench_min_s, float)
    a.stages = [x for x in a.stages.split(",") if x]
    return a


def run(argv: list[str]) -> int:
    args = parse_run_args(argv)
    budget = Budget(args.budget_s)
    started = now()
    check = GpuCheck(args, budget)
    records = run_stages(check.stages(), budget)
    settings = dict(vars(args))
    report = build_report(records, budget, started, settings)
    path = write_report(report, Path(args.out))
    print(
        f"[gpu-check] {'ALL PASSED' if report['ok'] else 'NOT ALL PASSED'} in {report['elapsed_s']:.0f} s; wrote {path}"
    )
    return 0 if report["ok"] else 1


def prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check prepare")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS))
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--corpus-mb", type=float, default=3.0, help="text kept from the sample corpus")
    p.add_argument("--with-mlflow", action="store_true", help="also mlflow and its closure (~160 MB)")
    a = p.parse_args(argv)
    download_wheels(Path(a.wheels), a.with_mlflow)
    write_corpus(Path(a.corpus), int(a.corpus_mb * 2**20))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "prepare"):
        print(__doc__)
        return 2
    return run(argv[1:]) if argv[0] == "run" else prepare(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

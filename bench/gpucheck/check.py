"""The GPU check's stages, in order: install, environment, data, pretrain, resume, sample, eval
and one ``bench_step_<preset>`` per ``--bench-presets`` preset (see ``bench/gpu_check.py``). Each
stage runs the real make targets through a :class:`~bench.gpucheck.shell.Shell` and returns its
figures, or raises :class:`~bench.gpucheck.runner.StageError`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.gpucheck.configs import data_config, eval_config, train_config, write_json_yaml
from bench.gpucheck.environment import probe
from bench.gpucheck.figures import read_metrics, run_figures, trim
from bench.gpucheck.install import check_existing, install_offline
from bench.gpucheck.parity import parity_failure, resume_parity
from bench.gpucheck.runner import Budget, Stage, StageError
from bench.gpucheck.shell import Shell, kill_tree, tail

_BENCH_KEYS = [
    "preset", "device", "batch", "seq_len", "params", "steps", "precision", "precision_reason",
    "peak_flops", "peak_flops_source", "mdlm_mfu", "memdlm_mfu", "mdlm_tokens_per_s",
    "memdlm_tokens_per_s", "mdlm_step_s", "memdlm_step_s", "memdlm_over_mdlm_step_ratio",
    "memdlm_over_mdlm_flops_ratio", "step_ratio_over_flops_ratio",
]  # fmt: skip


class GpuCheck:
    """One invocation's state: the work folder, the venv, whether tracking is on, the reference
    run's metrics and the export the later stages use."""

    def __init__(self, args: argparse.Namespace, budget: Budget):
        self.a = args
        self.budget = budget
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DS_BUILD_OPS="0", PYTHONUNBUFFERED="1")
        env.pop("DS_ACCELERATOR", None)  # training sets it from the device
        self.shell = Shell(budget, self.work / "logs", env)
        self.venv = Path(args.venv).resolve() if args.venv else self.work / "venv"
        self.python = str(self.venv / "bin" / "python")
        self.stamp = self.work / ".deps-ready"  # make's STAMP: the environment is ready, install nothing
        self.tracking = False
        self.export: Path | None = None
        self.reference_metrics: list[dict[str, Any]] = []

    # ---- helpers
    def make(self, target: str, *variables: str, log: str) -> str:
        return self.shell.run(
            ["make", "--no-print-directory", f"VENV={self.venv}", f"STAMP={self.stamp}", target, *variables],
            log,
        )

    def pretrain(self, run_dir: Path, log: str) -> list[str]:
        return [
            "make",
            "--no-print-directory",
            f"VENV={self.venv}",
            f"STAMP={self.stamp}",
            "pretrain",
            "CLUSTER=local",
            f"CONFIG={self.work / 'train.yaml'}",
            f"ARGS=--data-config {self.work / 'data.yaml'} run_dir={run_dir}",
        ]

    def find_export(self) -> Path | None:
        """The export of this check: the resumed run's, else the reference's (also from an earlier
        invocation, so ``--stages sample,eval`` can be rerun alone)."""
        if self.export is None:
            for run in ("resumed", "reference"):
                if (self.work / run / "export" / "model.safetensors").is_file():
                    self.export = self.work / run / "export"
                    break
        return self.export

    # ---- stages
    def stage_install(self) -> dict[str, Any]:
        if self.a.no_install:
            figures = check_existing(self.python)
        else:
            figures = install_offline(self.a.python, self.venv, Path(self.a.wheels).resolve(), self.shell)
        self.tracking = bool(figures["packages"].get("mlflow"))
        self.stamp.touch()
        return figures

    def stage_environment(self) -> dict[str, Any]:
        info = probe(self.python, ["torch", "deepspeed", "megatron-core", "submitit", "mlflow", "numpy"])
        if self.a.device_check == "cuda" and not info.get("cuda_available"):
            err = StageError(f"CUDA not available to {self.python} (torch {info.get('torch')})")
            err.figures = info  # type: ignore[attr-defined]
            raise err
        info["tracking"] = self.tracking
        return info

    def stage_data(self) -> dict[str, Any]:
        corpus = Path(self.a.corpus).resolve()
        if not corpus.is_file():
            raise StageError(f"no corpus at {corpus}: `python -m bench.gpu_check prepare` writes it")
        cfg = write_json_yaml(self.work / "data.yaml", data_config(self.a, self.work))
        self.make("data", f"DATA_CONFIG={cfg}", f"CORPUS={corpus}", f"OUT={self.work / 'data'}", log="data")
        manifest = json.loads((self.work / "data" / "manifest.json").read_text())
        return {
            "corpus": str(corpus),
            "vocab_size": manifest.get("vocab_size"),
            "seq_len": manifest.get("seq_len"),
            "splits": {
                k: {"samples": v.get("samples"), "shards": len(v.get("shards", []))}
                for k, v in manifest.get("splits", {}).items()
                if isinstance(v, dict)
            },
        }

    def stage_pretrain(self) -> dict[str, Any]:
        write_json_yaml(self.work / "train.yaml", train_config(self.a, self.work, self.tracking))
        run_dir = self.work / "reference"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.monotonic()
        self.shell.run(self.pretrain(run_dir, "pretrain"), "pretrain")
        figures = run_figures(run_dir)
        figures["wall_s"] = round(time.monotonic() - t0, 1)
        self.reference_metrics = read_metrics(run_dir / "metrics.jsonl")
        if figures["steps"] != self.a.steps:
            raise StageError(f"reference run logged {figures['steps']} of {self.a.steps} steps")
        if not (run_dir / "export" / "model.safetensors").is_file():
            raise StageError("reference run wrote no export")
        self.export = run_dir / "export"
        return figures

    def _kill_at_first_checkpoint(self, cmd: list[str], latest: Path) -> str:
        """Start ``cmd`` and SIGKILL it with its tasks once ``latest`` names a checkpoint; that name."""
        proc = self.shell.start(cmd, "resume")
        deadline = time.monotonic() + max(1.0, self.budget.remaining())
        killed_at = None
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if latest.is_file() and latest.read_text().strip():
                    killed_at = latest.read_text().strip()
                    kill_tree(proc)  # kill -9 of the launcher, submitit's controller and the task
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        if killed_at is None:
            raise StageError(
                f"the run ended (status {proc.returncode}) before its first checkpoint was published",
                tail(self.work / "logs" / "resume.log"),
            )
        return killed_at

    def _resume_failure(self, figures: dict[str, Any], run_dir: Path) -> str | None:
        """Why the resumed run does not count (None when it does)."""
        if not self.reference_metrics:
            return "no reference metrics (the pretrain stage did not pass): parity not checked"
        parity = figures["parity"]
        if not parity["ok"]:
            return parity_failure(
                parity, figures["max_rel_diff_before_kill"], self.a.resume_rtol, figures["resumed_from_step"]
            )
        if figures["steps"] != self.a.steps or self.export != run_dir / "export":
            return f"resumed run ended at step {figures['steps']} without its export"
        return None

    def stage_resume(self) -> dict[str, Any]:
        run_dir = self.work / "resumed"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = self.pretrain(run_dir, "resume")
        killed_at = self._kill_at_first_checkpoint(cmd, run_dir / "checkpoints" / "latest")
        before = read_metrics(run_dir / "metrics.jsonl")
        stopped_after = max((r["step"] for r in before), default=0)
        if stopped_after >= self.a.steps:
            raise StageError(f"the run finished all {self.a.steps} steps before the kill: nothing to resume")
        resumed_from = int(killed_at.rsplit("-", 1)[-1])
        self.shell.run(cmd, "resume")
        figures = run_figures(run_dir)
        resumed_metrics = read_metrics(run_dir / "metrics.jsonl")
        parity = resume_parity(self.reference_metrics, resumed_metrics, self.a.resume_rtol)
        # Steps up to the checkpoint ran before the kill: a difference there is not the resume's
        # (nondeterministic kernels, or code that changed between the two runs).
        early = [r for r in self.reference_metrics if r.get("step", 0) <= resumed_from]
        before_kill = resume_parity(early, resumed_metrics, self.a.resume_rtol)
        figures.update(
            killed_with_latest=killed_at,
            logged_before_kill=stopped_after,
            resumed_from_step=resumed_from,
            max_rel_diff_before_kill=before_kill["max_rel_diff"],
            parity=parity,
        )
        if (run_dir / "export" / "model.safetensors").is_file():
            self.export = run_dir / "export"
        failure = self._resume_failure(figures, run_dir)
        if failure is None:
            return figures
        err = StageError(failure)
        err.figures = figures  # type: ignore[attr-defined]
        raise err

    def stage_sample(self) -> dict[str, Any]:
        if self.find_export() is None:
            raise StageError("no export to sample from")
        out = self.make(
            "sample",
            f"CHECKPOINT={self.export}",
            "PROMPT=In the beginning",
            "ARGS=--gen-length 32 --adapt both",
            log="sample",
        )
        return {"export": str(self.export), "output_tail": out[-1500:]}

    def stage_eval(self) -> dict[str, Any]:
        if self.find_export() is None:
            raise StageError("no export to evaluate")
        cfg = write_json_yaml(self.work / "eval.yaml", eval_config(self.a, self.work, self.tracking))
        self.make("eval", f"CHECKPOINT={self.export}", f"EVAL_CONFIG={cfg}", log="eval")
        results = self.work / "eval" / "latest" / "results.json"
        if not results.is_file():
            raise StageError(f"make eval wrote no {results}")
        return {"results": str(results.resolve()), "summary": trim(json.loads(results.read_text()))}

    def stage_bench(self, preset: str) -> dict[str, Any]:
        out = self.work / f"bench_step_{preset}"
        batch = self.a.bench_batch.get(preset, 8)
        extra = self.a.bench_extra
        if Path(self.a.corpus).is_file() and "--config-data" not in extra:
            # the trainer's step needs a dataset at the preset's length and vocabulary: from the
            # carried corpus (a GPU machine reaches no registry to fetch the sample corpus)
            spec = {**data_config(self.a, self.work), "out_dir": str(self.work / "bench_data")}
            cfg = write_json_yaml(self.work / "bench_data.yaml", spec)
            extra += f" --config-data {cfg} --data {self.work / f'bench_data_{preset}'}"
        self.make(
            "bench-step",
            f"ARGS=--preset {preset} --batch {batch} --steps {self.a.bench_steps} --out {out} {extra}",
            log=f"bench_step_{preset}",
        )
        r = json.loads(out.with_suffix(".json").read_text())
        return {k: r.get(k) for k in _BENCH_KEYS}

    def stage_bench_moe(self) -> dict[str, Any]:
        """make bench-moe on this GPU, one process: the MoE family's routing, dispatch and expert
        fast weights on CUDA (bf16), against the dense model of equal active FLOPs. Expert
        parallelism needs two GPUs (NCCL puts one rank per device): skipped on one."""
        out = self.work / "bench_moe"
        spec = {**data_config(self.a, self.work), "out_dir": str(self.work / "bench_data")}
        cfg = write_json_yaml(self.work / "bench_data.yaml", spec)
        ep_steps = 4 if self.a.gpus >= 2 else 0
        args = f"--steps {self.a.bench_steps} --ep-steps {ep_steps} --config-data {cfg} --out {out}"
        self.make("bench-moe", f"ARGS={args}", log="bench_moe")
        r = json.loads(out.with_suffix(".json").read_text())
        return {k: v for k, v in r.items() if k not in ("machine", "expert_parallel")}

    def stages(self) -> list[Stage]:
        a = self.a
        all_stages = [
            Stage("install", self.stage_install, min_s=20),
            Stage("environment", self.stage_environment, min_s=5, requires=("install",)),
            Stage("data", self.stage_data, min_s=15, requires=("environment",)),
            Stage("pretrain", self.stage_pretrain, min_s=45, requires=("data",)),
            Stage("resume", self.stage_resume, min_s=60, requires=("pretrain",)),
            Stage("sample", self.stage_sample, min_s=15, requires=("pretrain",)),
            Stage("eval", self.stage_eval, min_s=30, requires=("pretrain",)),
        ]
        for preset in a.bench_presets:
            all_stages.append(
                Stage(
                    f"bench_step_{preset}",
                    lambda p=preset: self.stage_bench(p),
                    min_s=a.bench_min_s.get(preset, 30),
                    requires=("environment",),
                )
            )
        all_stages.append(Stage("bench_moe", self.stage_bench_moe, min_s=60, requires=("environment",)))
        if a.stages:
            all_stages = [s for s in all_stages if any(s.name.startswith(w) for w in a.stages)]
        return all_stages

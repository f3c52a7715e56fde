"""Evaluate exported checkpoints: retrieval tasks (memory off/on) and the exposure-bias ratio.

    make eval CHECKPOINT=runs/local/export
    python -m launch.evaluate --checkpoint runs/local/export [--checkpoint runs/mdlm/export] \
        --config configs/eval/local.yaml scoring.mc_samples=16 tasks[0].n=64

For each checkpoint and each memory setting (``off``: the trained weights alone, i.e. MemDLM
"train-only"; ``on``: inference-time adaptation on each prompt) it scores every task set by
generation and by likelihood ranking (pipeline/eval/task_scores.py), and measures the exposure-bias
curve (pipeline/eval/exposure_bias.py) on held-out sequences of a dataset split into a prompt
and a response. The task examples are generated here, deterministically, with the
checkpoint's own tokenizer sizing each context (data_prep/retrieval_tasks): this command is the app that
joins data preparation and the evaluation library (pipeline/eval), which never imports data_prep. Results go to
``<out_dir>/<timestamp>/`` (``results.json``, ``results.md``, ``exposure_bias.png``, the task
files) with ``<out_dir>/latest`` pointing at it, and to one MLflow run per invocation in the
``eval`` experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data_prep.retrieval_tasks import generate, load_filler, read_jsonl, resolve_filler_path, write_jsonl
from pipeline.build import export_tracking_credentials
from pipeline.cli import run_main
from pipeline.config import ConfigError, load_config
from pipeline.eval.exposure_bias import ExposureBiasCurve, exposure_bias, plot_exposure_bias
from pipeline.eval.task_scores import TaskScoringConfig, evaluate_examples
from pipeline.loader.stream import DataConfig, TokenBatchLoader
from pipeline.sampler import load_sampler
from pipeline.tracking import Tracker, TrackingConfig, flatten, git_commit, redact_config, redact_uri


@dataclass
class TaskSetConfig:
    task: str  # niah | variable_tracking | babi
    context_tokens: int = 192
    n: int = 24
    difficulty: dict[str, int] = field(default_factory=dict)  # e.g. {hops: 2, distractors: 3}

    @property
    def name(self) -> str:
        knobs = "".join(f",{k}={v}" for k, v in sorted(self.difficulty.items()))
        return f"{self.task}@{self.context_tokens}{knobs}"


@dataclass
class ExposureBiasConfig:
    enabled: bool = True
    data: str = "data/sample"  # a prepared dataset; its val split gives (prompt, response) pairs
    pairs: int = 16
    prompt_tokens: int = 96
    response_tokens: int = 32
    steps: int = 16
    static_draws: int = 2


@dataclass
class EvalTrackingConfig(TrackingConfig):
    experiment: str = "eval"  # beside training's "memdlm" experiment in the same store


@dataclass
class EvalRunConfig:
    out_dir: str = "runs/eval"
    filler: str = "sample"  # prose the tasks hide in: "sample" (the sample corpus) or a .jsonl/.txt
    seed: int = 1000  # task examples (SFT data for training uses other seeds)
    device: str = "auto"  # auto: the GPU when there is one
    memory: list[str] = field(default_factory=lambda: ["off", "on"])
    tasks: list[TaskSetConfig] = field(default_factory=list)
    scoring: TaskScoringConfig = field(default_factory=TaskScoringConfig)
    exposure_bias: ExposureBiasConfig = field(default_factory=ExposureBiasConfig)
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)

    def validate(self) -> None:
        bad = [m for m in self.memory if m not in ("off", "on")]
        if bad or not self.memory:
            raise ConfigError(f"key 'memory': got {self.memory}, expected a non-empty list of 'off'/'on'")


def build_task_files(cfg: EvalRunConfig, tok, out: Path) -> dict[str, Path]:
    """Generate each task set with the checkpoint's tokenizer; returns name -> jsonl path."""
    filler = load_filler(resolve_filler_path(cfg.filler))
    files = {}
    for ts in cfg.tasks:
        examples = generate(
            ts.task,
            ts.n,
            seed=cfg.seed,
            context_tokens=ts.context_tokens,
            count_tokens=lambda s: len(tok.encode(s)),
            filler=filler,
            **ts.difficulty,
        )
        path = out / "tasks" / f"{ts.name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(examples, path)
        files[ts.name] = path
    return files


def exposure_pairs(
    cfg: ExposureBiasConfig, seq_len: int, tokenizer: Path
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt, response) token pairs cut from the dataset's first val sequences; the dataset must
    be tokenised with the checkpoint's ``tokenizer`` (checked)."""

    need = cfg.prompt_tokens + cfg.response_tokens
    if need > seq_len:
        raise ConfigError(
            f"key 'exposure_bias': prompt_tokens + response_tokens = {need} exceeds the model's seq_len {seq_len}"
        )
    loader = TokenBatchLoader(
        DataConfig(path=cfg.data, batch_size=1, num_workers=0),
        split="val",
        shuffle=False,
        loop=False,
        tokenizer_path=tokenizer,
    )
    prompts, responses = [], []
    for batch in loader:
        t = batch["tokens"][0].tolist()
        if len(t) < need:
            raise ConfigError(f"{cfg.data}: sequences of {len(t)} tokens are shorter than the {need} needed")
        prompts.append(t[: cfg.prompt_tokens])
        responses.append(t[cfg.prompt_tokens : need])
        if len(prompts) == cfg.pairs:
            break
    return prompts, responses


def evaluate_checkpoint(path: str, cfg: EvalRunConfig, out: Path) -> dict[str, Any]:
    """All numbers for one export directory (see the module docstring)."""

    sampler, tok, info = load_sampler(path, device=cfg.device)
    name = f"{info.get('method')}@{Path(path).resolve().parent.name}"
    result: dict[str, Any] = {"checkpoint": str(path), "method": info.get("method"), "step": info.get("step")}
    files = build_task_files(cfg, tok, out / name)
    result["tasks"] = {}
    for ts_name, f in files.items():
        examples = read_jsonl(f)
        result["tasks"][ts_name] = {}
        for mem in cfg.memory:
            t0 = time.perf_counter()
            scores = evaluate_examples(sampler, tok, examples, adapt=mem == "on", cfg=cfg.scoring)
            scores["seconds"] = time.perf_counter() - t0
            result["tasks"][ts_name][mem] = scores
            print(
                f"{name} {ts_name} memory {mem}: generation {scores['generation']:.3f}, "
                f"ranking {scores['ranking']:.3f} ({scores['n']} examples, {scores['seconds']:.1f}s)"
            )
    eb = cfg.exposure_bias
    if eb.enabled:
        prompts, responses = exposure_pairs(eb, sampler.model.cfg.seq_len, Path(path))
        result["exposure_bias"] = {}
        for mem in cfg.memory:
            fast = (
                sampler.adapt_prompts(
                    prompts, seed=cfg.scoring.seed, bf16=cfg.scoring.bf16_on(sampler.device)
                )
                if mem == "on"
                else None
            )
            curve = exposure_bias(
                sampler.model,
                prompts,
                responses,
                steps=eb.steps,
                mask_id=sampler.mask_id,
                pad_id=sampler.pad_id,
                vocab_size=sampler.vocab_size,
                fast=fast,
                seed=cfg.scoring.seed,
                static_draws=eb.static_draws,
                bf16=cfg.scoring.bf16_on(sampler.device),
            )
            result["exposure_bias"][mem] = curve.to_json()
            print(f"{name} exposure bias memory {mem}: R at the last step {curve.R[-1]:.3f}")
    result["name"] = name
    return result


def _setting(result: dict[str, Any], mem: str) -> str:
    method = result.get("method")
    if method == "memdlm":
        return "MemDLM " + ("+ inference adaptation" if mem == "on" else "train-only")
    return f"{str(method).upper()}" + (" + inference adaptation" if mem == "on" else "")


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["# Evaluation", "", "## Retrieval tasks (generation score / likelihood-ranking accuracy)", ""]
    names = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    lines.append("| setting | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for r in results:
        mems = list(next(iter(r["tasks"].values()), {}))
        for mem in mems:
            cells = []
            for n in names:
                s = r["tasks"].get(n, {}).get(mem)
                cells.append(f"{s['generation']:.3f} / {s['ranking']:.3f}" if s else "-")
            lines.append(f"| {_setting(r, mem)} ({r['name']}) | " + " | ".join(cells) + " |")
    if any("exposure_bias" in r for r in results):
        lines += ["", "## Exposure-bias ratio R = L_seq / L_static (selection-only control in brackets)", ""]
        steps = next(r["exposure_bias"] for r in results if "exposure_bias" in r)
        ks = next(iter(steps.values()))["steps"]
        show = sorted({ks[0], ks[len(ks) // 2], ks[-1]})
        lines.append("| setting | " + " | ".join(f"step {k}" for k in show) + " |")
        lines.append("|---|" + "---|" * len(show))
        for r in results:
            for mem, c in r.get("exposure_bias", {}).items():
                cells = [
                    f"{c['R'][c['steps'].index(k)]:.3f} ({c['R_selection'][c['steps'].index(k)]:.3f})"
                    for k in show
                ]
                lines.append(f"| {_setting(r, mem)} ({r['name']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_name(key: str) -> str:
    """MLflow allows only alphanumerics and ``_-. :/`` in metric names."""
    return key.replace("@", "_at_").replace(",", "_").replace("=", "-")


def log_to_mlflow(cfg: EvalRunConfig, results: list[dict[str, Any]], out: Path) -> str | None:

    if not cfg.tracking.enabled:
        return None
    export_tracking_credentials(cfg)  # tracking.uri's user:password -> MLflow's variables
    tracking = replace(cfg.tracking, uri=redact_uri(cfg.tracking.uri) if cfg.tracking.uri else None)
    tracker = Tracker(tracking, f"eval-{out.name}")
    tracker.start(
        flatten(redact_config(asdict(cfg))),
        {
            "git_commit": git_commit(Path(__file__).resolve().parent),
            "checkpoints": ",".join(r["checkpoint"] for r in results),
        },
    )
    metrics: dict[str, float] = {}
    for r in results:
        for ts, by_mem in r["tasks"].items():
            for mem, s in by_mem.items():
                metrics[f"{r['name']}/{ts}/{mem}/generation"] = s["generation"]
                metrics[f"{r['name']}/{ts}/{mem}/ranking"] = s["ranking"]
        for mem, c in r.get("exposure_bias", {}).items():
            for k, ratio in zip(c["steps"], c["R"], strict=True):
                tracker.log(k, {metric_name(f"{r['name']}/exposure_bias_R/{mem}"): ratio})
    tracker.log(0, {metric_name(k): v for k, v in metrics.items()})
    tracker.log_artifacts(sorted(out.glob("results.*")) + sorted(out.glob("*.png")))
    tracker.end()
    return tracker.run_id


def run(checkpoints: list[str], cfg: EvalRunConfig) -> Path:
    """Evaluate ``checkpoints``; returns the results directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    out, k = root / stamp, 0
    while out.exists():  # two evaluations within one second
        k += 1
        out = root / f"{stamp}-{k}"
    out.mkdir()
    stamp = out.name
    torch.manual_seed(cfg.seed)
    results = [evaluate_checkpoint(c, cfg, out) for c in checkpoints]
    (out / "results.json").write_text(
        json.dumps({"config": redact_config(asdict(cfg)), "results": results}, indent=2) + "\n"
    )
    (out / "results.md").write_text(markdown(results))
    curves = {
        f"{_setting(r, mem)} ({r['name']})": ExposureBiasCurve(
            **{k: c[k] for k in ("steps", "masked_ratio", "L_seq", "L_static", "L_control")}
        )
        for r in results
        for mem, c in r.get("exposure_bias", {}).items()
    }
    if curves:
        plot_exposure_bias(curves, out / "exposure_bias.png")
    run_id = log_to_mlflow(cfg, results, out)
    latest = root / "latest"
    tmp = root / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp)
    os.replace(tmp, latest)
    print((out / "results.md").read_text())
    print(f"results: {out}/results.json, results.md" + (f"; MLflow run {run_id}" if run_id else ""))
    return out


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="export directory (repeatable)")
    ap.add_argument("--config", default="configs/eval/local.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. scoring.mc_samples=16")
    args = ap.parse_args(argv)
    for c in args.checkpoint:
        if not (Path(c) / "model.safetensors").is_file():
            raise ConfigError(
                f"{c}: not an export directory (no model.safetensors); `make pretrain CLUSTER=local` "
                "writes runs/local/export"
            )
    cfg = load_config(EvalRunConfig, args.config, args.overrides)
    run(args.checkpoint, cfg)
    return 0


# What a user can fix: a config key, a dataset or task file that does not fit, a missing file.
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))

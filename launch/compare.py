"""MDLM vs MemDLM with the same seed, data order, noise draws and budget, side by side in MLflow.

    python -m launch.compare [--config configs/train/local.yaml] [--steps 100] [key=value ...]

Trains both methods (a parent MLflow run with the two as children), reads both runs back through
the MLflow client, and writes ``<tracking.root>/compare/<timestamp>/``: ``compare.json`` (the
numbers and the plotted series), ``compare.md`` (a table) and ``loss_curves.png`` (train raw and
smoothed, eval). ``<tracking.root>/compare/latest`` points at the newest comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.data.manifest import DatasetError
from pipeline.tracking import Tracker, ema, flatten
from pipeline.train import Trainer
from pipeline.train_config import load_train_config, resolve_train_dict

METHODS = ("mdlm", "memdlm")


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def _steps_to_reach(steps: list[int], values: list[float], threshold: float) -> int | None:
    return next((s for s, v in zip(steps, values, strict=True) if v <= threshold), None)


def summarise(client, run_ids: dict[str, str]) -> dict[str, Any]:
    """Numbers and series of both runs, read back from MLflow."""
    curves: dict[str, dict[str, list]] = {}
    for method, run_id in run_ids.items():
        s, loss = _history(client, run_id, "loss")
        es, eval_loss = _history(client, run_id, "eval/loss")
        _, tps = _history(client, run_id, "tokens_per_s")
        _, step_s = _history(client, run_id, "seconds")
        curves[method] = {
            "steps": s,
            "loss": loss,
            "loss_ema": ema(loss),
            "eval_steps": es,
            "eval_loss": eval_loss,
            "tokens_per_s": tps,
            "seconds": step_s,
        }
    # The loss MDLM ends at (smoothed): how many steps each method needs to get there.
    target = curves["mdlm"]["loss_ema"][-1]
    out: dict[str, Any] = {"steps": max(curves["mdlm"]["steps"]), "target_loss": target, "run_ids": run_ids}
    for m, c in curves.items():
        out[f"{m}_final_loss"] = c["loss_ema"][-1]
        out[f"{m}_min_loss"] = min(c["loss_ema"])
        out[f"{m}_final_eval_loss"] = c["eval_loss"][-1] if c["eval_loss"] else None
        out[f"{m}_min_eval_loss"] = min(c["eval_loss"]) if c["eval_loss"] else None
        out[f"{m}_tokens_per_s"] = statistics.median(c["tokens_per_s"][1:] or c["tokens_per_s"])
        out[f"{m}_steps_to_target"] = _steps_to_reach(c["steps"], c["loss_ema"], target)
    out["memdlm_over_mdlm_step_time"] = out["mdlm_tokens_per_s"] / out["memdlm_tokens_per_s"]
    out["curves"] = curves
    return out


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for (method, c), color in zip(summary["curves"].items(), ("tab:blue", "tab:orange"), strict=True):
        train_ax.plot(c["steps"], c["loss"], color=color, alpha=0.25)
        train_ax.plot(c["steps"], c["loss_ema"], color=color, label=f"{method} (EMA 0.9)")
        if c["eval_steps"]:
            eval_ax.plot(c["eval_steps"], c["eval_loss"], "o-", color=color, label=method)
    train_ax.set(title="train loss (raw, smoothed)", xlabel="step", ylabel="loss")
    eval_ax.set(title="held-out loss (memory off)", xlabel="step")
    train_ax.legend()
    eval_ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def table(summary: dict[str, Any]) -> str:
    rows = [
        ("final train loss (EMA)", "final_loss"),
        ("min train loss (EMA)", "min_loss"),
        ("final eval loss", "final_eval_loss"),
        ("min eval loss", "min_eval_loss"),
        (f"steps to train loss {summary['target_loss']:.3f}", "steps_to_target"),
        ("tokens/s", "tokens_per_s"),
    ]

    def fmt(v):
        return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| | MDLM | MemDLM |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(summary['mdlm_' + k])} | {fmt(summary['memdlm_' + k])} |" for name, k in rows]
    lines.append(f"| MemDLM / MDLM step time | | {summary['memdlm_over_mdlm_step_time']:.3f} |")
    return "\n".join(lines) + "\n"


def compare(config: str, steps: int | None, overrides: list[str]) -> Path:
    """Train both methods and write the comparison; returns its directory."""
    base = load_train_config(config, overrides)
    root = Path(base.tracking.root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / "compare" / stamp
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparison directory: {out.resolve()}")
    budget = [f"steps={steps}"] if steps else []
    parent = Tracker(base.tracking, f"compare-{stamp}")
    parent.start(flatten(resolve_train_dict(config, [*overrides, *budget])), {"kind": "compare"})
    run_ids = {}
    for method in METHODS:
        extra = [
            *overrides,
            *budget,
            f"run_dir={out / method}",
            f"memory.enabled={str(method == 'memdlm').lower()}",
        ]
        cfg = load_train_config(config, extra)
        trainer = Trainer(cfg, parent_run_id=parent.run_id)
        trainer.run()
        run_ids[method] = trainer.tracker.run_id if trainer.tracker else None
    summary = summarise(parent.client, run_ids)
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "compare.md").write_text(table(summary))
    plot(summary, out / "loss_curves.png")
    parent.log(summary["steps"], {k: v for k, v in summary.items() if isinstance(v, int | float)})
    parent.log_artifacts([out / "compare.json", out / "compare.md", out / "loss_curves.png"])
    parent.end()
    latest = root / "compare" / "latest"
    tmp = latest.with_name(f".latest-{os.getpid()}")
    tmp.symlink_to(stamp)
    os.replace(tmp, latest)
    print(table(summary))
    print(f"comparison directory: {out.resolve()} (also {latest})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/train/local.yaml")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per method (default: the config's)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        compare(args.config, args.steps, args.overrides)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MDLM vs MemDLM with the same seed, data order, noise draws and budget, side by side in MLflow.

    python -m launch.compare [--config configs/train/local.yaml] [--steps 100] [key=value ...]
    python -m launch.compare --url [--port 5000]     # the dashboard URL of the newest comparison

Prepares (or checks) the dataset first, as ``make pretrain CLUSTER=local`` does (``--data-config``,
default the local cluster's). Trains both methods (a parent MLflow run with the two as children,
each in its fixed colour: the ``mlflow.runColor`` tag, the colours of ``loss_curves.png``)
logging at a cadence that draws a curve (every step up to 500 steps, ``--log-every`` /
``log_every=`` to change; held-out loss about 10 times per run, ``--eval-every`` /
``eval.every=``), reads both runs back through
the MLflow client, and writes ``<tracking.root>/compare/<timestamp>/``: ``compare.json`` (the
numbers and the plotted series), ``compare.md`` (a table, the memory's effect, the dashboard URL)
and ``loss_curves.png`` (train, held-out, the memory's gain and update norms).
``<tracking.root>/compare/latest`` points at the newest comparison.

The dashboard: a saved view of the experiment (tag ``mlflow.sharedViewState.<key>``, listed
under the runs view's saved views) holds exactly the two children and the ``loss``,
``eval/loss`` and ``memory/gain`` charts; the printed URL opens it in chart mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from data_prep.prepare import USER_ERRORS
from launch.clusters import ClusterConfig, load_cluster
from launch.pretrain import prepare_data
from pipeline.build import export_tracking_credentials
from pipeline.cli import run_main
from pipeline.families import family_of
from pipeline.plots import COLORS, GAIN, plot_compare
from pipeline.tracking import LOCAL_UI, Tracker, ema, flatten, redact_config, redact_uri, ui_url
from pipeline.train import Trainer
from pipeline.train_config import load_train_config

METHODS = ("mdlm", "memdlm")
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a saved runs view (MLflow 3 UI)
CHARTS = (  # (metric, title): the first section of the saved view, in this order
    ("loss", "train loss"),
    ("eval/loss", "held-out loss (memory off)"),
    (GAIN, "memory gain: loss(phi0) - loss(phi2), same anchor"),
)
# A mixture of experts adds its routing health: how unevenly the experts are loaded.
MOE_CHARTS = (("moe/imbalance", "expert load imbalance: max / mean tokens per expert"),)
SECTION_ID = "mdlm-vs-memdlm"
# The run's colour in MLflow's UI (its charts and runs table read this tag; the colour picker
# writes it): each method keeps the colour it has in loss_curves.png.
RUN_COLOR_TAG = "mlflow.runColor"


def _redacted(uri: str | None) -> str | None:
    return redact_uri(uri) if uri else uri


def auto_log_every(steps: int) -> int:
    """Every step up to 500 steps; at most ~500 points per curve beyond."""
    return max(1, math.ceil(steps / 500))


def auto_eval_every(steps: int) -> int:
    """About ten held-out points per run."""
    return max(1, steps // 10)


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def _steps_to_reach(steps: list[int], values: list[float], threshold: float) -> int | None:
    return next((s for s, v in zip(steps, values, strict=True) if v <= threshold), None)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(client, run_ids: dict[str, str]) -> dict[str, Any]:
    """Numbers and series of both runs, read back from MLflow."""
    curves: dict[str, dict[str, Any]] = {}
    for method, run_id in run_ids.items():
        s, loss = _history(client, run_id, "loss")
        es, eval_loss = _history(client, run_id, "eval/loss")
        _, tps = _history(client, run_id, "tokens_per_s")
        _, step_s = _history(client, run_id, "seconds")
        gs, gain = _history(client, run_id, GAIN)
        keys = set(client.get_run(run_id).data.metrics)
        stages = sorted(
            int(k[len("inner/stage") : -len("_update_norm")])
            for k in keys
            if k.startswith("inner/stage") and k.endswith("_update_norm")
        )
        curves[method] = {
            "steps": s,
            "loss": loss,
            "loss_ema": ema(loss),
            "eval_steps": es,
            "eval_loss": eval_loss,
            "tokens_per_s": tps,
            "seconds": step_s,
            "gain_steps": gs,
            "gain": gain,
            "update_norms": {
                f"stage{k}": _history(client, run_id, f"inner/stage{k}_update_norm") for k in stages
            },
            "clipped_frac": {
                f"stage{k}": _history(client, run_id, f"inner/stage{k}_clipped_frac") for k in stages
            },
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
    # The memory's effect (MemDLM only): what phi2 gains over phi0 on the step's own anchor.
    mem = curves["memdlm"]
    out["memdlm_mean_gain"] = _mean(mem["gain"])
    out["memdlm_final_gain"] = ema(mem["gain"])[-1] if mem["gain"] else None
    out["memdlm_gain_positive_frac"] = _mean([float(g > 0) for g in mem["gain"]])
    for stage, (_, norms) in mem["update_norms"].items():
        out[f"memdlm_{stage}_update_norm"] = _mean(norms)
    out["memdlm_clipped_frac"] = _mean([v for _, vals in mem["clipped_frac"].values() for v in vals])
    if out["mdlm_final_eval_loss"] is not None and out["memdlm_final_eval_loss"] is not None:
        out["eval_loss_mdlm_minus_memdlm"] = out["mdlm_final_eval_loss"] - out["memdlm_final_eval_loss"]
    out["curves"] = curves
    return out


def table(summary: dict[str, Any]) -> str:
    rows = [
        ("final train loss (EMA)", "final_loss"),
        ("min train loss (EMA)", "min_loss"),
        ("final eval loss", "final_eval_loss"),
        ("min eval loss", "min_eval_loss"),
        (f"steps to train loss {summary['target_loss']:.3f}", "steps_to_target"),
        ("tokens/s", "tokens_per_s"),
    ]

    def fmt(v, spec=".6g"):
        return "—" if v is None else (format(v, spec) if isinstance(v, float) else str(v))

    lines = ["| | MDLM | MemDLM |", "|---|---|---|"]
    lines += [
        f"| {name} | {fmt(summary.get('mdlm_' + k))} | {fmt(summary.get('memdlm_' + k))} |"
        for name, k in rows
    ]
    lines.append(f"| MemDLM / MDLM step time | | {summary['memdlm_over_mdlm_step_time']:.3f} |")
    mem_rows = [
        ("memory gain, mean over logged steps: loss(phi0) − loss(phi2)", "mean_gain", "+.3e"),
        ("memory gain, last (EMA 0.9)", "final_gain", "+.3e"),
        ("logged steps where the memory helped (gain > 0)", "gain_positive_frac", ".0%"),
        *[
            (f"fast-weight update norm, {k.replace('stage', 'stage ')} (mean)", f"{k}_update_norm", ".3e")
            for k in summary["curves"]["memdlm"]["update_norms"]
        ],
        ("inner updates clipped (tensors)", "clipped_frac", ".0%"),
    ]
    lines += [f"| {name} | — | {fmt(summary.get('memdlm_' + k), spec)} |" for name, k, spec in mem_rows]
    return "\n".join(lines) + "\n"


def report(summary: dict[str, Any], url: str) -> str:
    """compare.md: the table, what the memory did, the figure and the dashboard link."""
    gain = summary.get("memdlm_mean_gain")
    if gain is None:
        verdict = "The MemDLM run logged no memory gain (memory off, or no logged step)."
    else:
        verdict = (
            f"On its own anchor, what the inner loop wrote into the fast weights changed MemDLM's outer loss "
            f"by {-gain:+.3e} on average over the logged steps (gain {gain:+.3e}; > 0: the memory lowers "
            f"the loss). The held-out loss is measured with the memory off: MDLM − MemDLM = "
            f"{summary.get('eval_loss_mdlm_minus_memdlm', float('nan')):+.3e}."
        )
    return (
        f"# MDLM vs MemDLM ({summary['steps']} steps each)\n\n"
        f"Dashboard (both runs, loss / eval loss / memory gain charts): {url}\n"
        f"(`make mlflow-ui` serves it for the local store.)\n\n"
        f"{table(summary)}\n{verdict}\n\n![loss curves and memory gain](loss_curves.png)\n"
    )


def _line_chart(metric: str, title: str) -> dict[str, Any]:
    """One line-chart card as the MLflow 3 runs view stores it (RunsChartsLineCardConfig)."""
    return {
        "uuid": f"{SECTION_ID}:{metric}",
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": SECTION_ID,
        "deleted": False,
        "isGenerated": False,
        "displayName": title,
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": False,
        "useGlobalLineSmoothing": False,
    }


def charts_for(model_cfg) -> tuple[tuple[str, str], ...]:
    """The comparison's charts for this model: the three of every run, and MoE routing for a
    mixture-of-experts family."""
    return CHARTS + (MOE_CHARTS if family_of(model_cfg).expert_parallel else ())


def view_state(run_ids: dict[str, str], charts: tuple[tuple[str, str], ...] = CHARTS) -> dict[str, Any]:
    """The runs view: exactly the two children, our charts first (other metrics follow in
    MLflow's generated sections)."""
    ids = ", ".join(f"'{r}'" for r in run_ids.values())
    return {
        "searchFilter": f"attributes.run_id IN ({ids})",
        # Any order but start time lists the children flat (not folded under the parent).
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "compareRunCharts": [_line_chart(m, t) for m, t in charts],
        "compareRunSections": [
            {
                "uuid": SECTION_ID,
                "name": "MDLM vs MemDLM",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def save_view(
    client,
    experiment_id: str,
    key: str,
    name: str,
    run_ids: dict[str, str],
    charts: tuple[tuple[str, str], ...] = CHARTS,
) -> str:
    """Store the comparison as a saved view of the experiment; returns its UI route."""
    now = int(time.time() * 1000)
    state = json.dumps(view_state(run_ids, charts))
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": state}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(envelope))
    # workflowType: the UI's "Model training" side (its sidebar), whatever it showed last
    query = f"viewStateShareKey={quote(key)}&compareRunsMode=CHART&workflowType=machine_learning"
    return f"/experiments/{experiment_id}/runs?{query}"


def _with_cadence(base, overrides: list[str], log_every: int | None, eval_every: int | None):
    """``base`` with a curve's worth of logging and evaluation, unless the user set them."""
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    if log_every is not None or "log_every" not in given:
        base = replace(base, log_every=log_every or auto_log_every(base.steps))
    if eval_every is not None or "eval.every" not in given:
        every = auto_eval_every(base.steps) if eval_every is None else eval_every
        base = replace(base, eval=replace(base.eval, every=every))
    return base


def _train_both(base, out: Path, parent: Tracker) -> dict[str, str | None]:
    """MDLM then MemDLM from ``base`` (memory off / on), children of ``parent``; their run ids."""
    run_ids = {}
    for method in METHODS:
        memory = replace(base.memory, enabled=method == "memdlm")
        cfg = replace(base, run_dir=str(out / method), memory=memory)
        trainer = Trainer(cfg, parent_run_id=parent.run_id)
        if trainer.tracker:  # the method's fixed colour, in the UI from the first point on
            parent.client.set_tag(trainer.tracker.run_id, RUN_COLOR_TAG, COLORS[method])
        trainer.run()
        run_ids[method] = trainer.tracker.run_id if trainer.tracker else None
    return run_ids


def compare(
    config: str,
    steps: int | None,
    overrides: list[str],
    log_every: int | None = None,
    eval_every: int | None = None,
    data_config: str | None = None,
) -> Path:
    """Train both methods and write the comparison; returns its directory. With ``data_config``
    the dataset is prepared (or checked) first, as ``make pretrain CLUSTER=local`` does."""

    # Resolved once; the two runs are derived from it with dataclasses.replace, never re-parsed.
    base = load_train_config(config, [*overrides, *([f"steps={steps}"] if steps else [])])
    base = _with_cadence(base, overrides, log_every, eval_every)
    if data_config is not None:  # both runs train in this one process: a world of 1
        prepare_data(ClusterConfig(executor="local"), base, config, data_config)
    export_tracking_credentials(base)  # tracking.uri's user:password -> MLflow's variables
    base = replace(base, tracking=replace(base.tracking, uri=_redacted(base.tracking.uri)))
    root = Path(base.tracking.root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / "compare" / stamp
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparison directory: {out.resolve()}")
    parent = Tracker(base.tracking, f"compare-{stamp}")
    parent.start(flatten(redact_config(asdict(base))), {"kind": "compare"})
    run_ids = _train_both(base, out, parent)
    summary = summarise(parent.client, run_ids)
    view = (f"compare-{stamp}", f"MDLM vs MemDLM {stamp}")
    route = save_view(parent.client, parent.experiment_id, *view, run_ids, charts_for(base.model))
    url = ui_url(parent.uri, route)
    summary["dashboard_route"] = route
    summary["dashboard_url"] = url
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "compare.md").write_text(report(summary, url))
    plot_compare(summary, out / "loss_curves.png")
    parent.client.set_tag(parent.run_id, "dashboard_url", url)
    # One point each, in their own chart section; the training curves live in the children.
    scalars = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, int | float) and k != "steps"}
    parent.log(summary["steps"], scalars)
    parent.log_artifacts([out / "compare.json", out / "compare.md", out / "loss_curves.png"])
    parent.end()
    latest = root / "compare" / "latest"
    tmp = latest.with_name(f".latest-{os.getpid()}")
    tmp.symlink_to(stamp)
    os.replace(tmp, latest)
    print(table(summary))
    print(f"comparison directory: {out.resolve()} (also {latest})")
    print(f"dashboard: {url}" + ("  (serve it with `make mlflow-ui`)" if url.startswith(LOCAL_UI) else ""))
    return out


def latest_url(root: Path, port: int | None = None) -> str | None:
    """The dashboard URL of the newest comparison under ``root`` (None: no comparison yet)."""
    path = root / "compare" / "latest" / "compare.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    url = summary.get("dashboard_url")
    if url and port is not None and url.startswith(LOCAL_UI):
        url = f"http://127.0.0.1:{port}" + url[len(LOCAL_UI) :]
    return url


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/train/local.yaml")
    parser.add_argument(
        "--data-config",
        default=None,
        help="dataset config prepared (or checked) first (default: the local cluster's, "
        "configs/cluster/local.yaml 'data')",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per method (default: the config's)"
    )
    parser.add_argument("--log-every", type=int, default=None, help="default: every step up to 500 steps")
    parser.add_argument("--eval-every", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--url", action="store_true", help="print the newest comparison's dashboard URL")
    parser.add_argument("--root", default="runs", help="with --url: the tracking root")
    parser.add_argument("--port", type=int, default=None, help="with --url: the local UI's port")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.url:
        url = latest_url(Path(args.root), args.port)
        print(f"newest comparison: {url}" if url else f"no comparison under {args.root}/compare yet")
        return 0
    data_config = args.data_config or load_cluster("local").data
    compare(args.config, args.steps, args.overrides, args.log_every, args.eval_every, data_config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))

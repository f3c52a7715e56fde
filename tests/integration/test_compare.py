"""`make compare`: both methods trained alike, read back through MLflow, plotted and tabulated,
and one dashboard view with both curves and the memory's gain."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import matplotlib.colors
import matplotlib.image
import numpy as np
from mlflow.tracking import MlflowClient

from launch.compare import (
    RUN_COLOR_TAG,
    SHARED_VIEW_TAG,
    _with_cadence,
    auto_log_every,
    compare,
    latest_url,
    main,
)
from pipeline.plots import COLORS
from pipeline.tracking import EXPERIMENT_KIND_TAG, TRAINING_KIND
from tests.conftest import tiny_run_overrides


def test_compare_reads_both_runs_back_and_writes_json_png_and_parent_run(
    world1, tiny_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    root = tmp_path / "runs"
    # no log_every: compare's own cadence (every step for a short run) must apply
    overrides = [
        o for o in tiny_run_overrides(tiny_dataset, root, "checkpoint.every=0") if o != "log_every=1"
    ]
    out = compare("configs/train/local.yaml", 4, [*overrides, "eval.every=2", "eval.batches=1"])
    summary = json.loads((out / "compare.json").read_text())
    for key in (
        "steps",
        "mdlm_final_eval_loss",
        "memdlm_final_eval_loss",
        "mdlm_tokens_per_s",
        "memdlm_tokens_per_s",
        "memdlm_mean_gain",
        "memdlm_clipped_frac",
        "memdlm_stage1_update_norm",
        "memdlm_stage2_update_norm",
    ):
        assert isinstance(summary[key], int | float), key
    assert summary["steps"] == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("memdlm")
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND  # opens in MLflow 3's training view
    for method in ("mdlm", "memdlm"):  # the JSON's series are exactly what MLflow holds
        run_id = summary["run_ids"][method]
        history = client.get_metric_history(run_id, "loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == summary["curves"][method]["loss"]
        metrics = client.get_run(run_id).data.metrics
        assert "step" not in metrics and "steps" not in metrics
        assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [2, 4]
    assert summary["curves"]["mdlm"]["loss"] != summary["curves"]["memdlm"]["loss"]
    assert summary["curves"]["mdlm"]["steps"] == summary["curves"]["memdlm"]["steps"] == [1, 2, 3, 4]
    # the memory's gain at every logged step, MemDLM only
    assert summary["curves"]["memdlm"]["gain_steps"] == [1, 2, 3, 4]
    assert summary["curves"]["mdlm"]["gain"] == []
    parent_id = client.get_run(summary["run_ids"]["mdlm"]).data.tags["mlflow.parentRunId"]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(r.data.tags["method"] for r in children) == ["mdlm", "memdlm"]
    # each method has its own fixed colour in the dashboard, the one it has in loss_curves.png
    colours = {r.data.tags["method"]: r.data.tags.get(RUN_COLOR_TAG) for r in children}
    assert colours == COLORS and colours["mdlm"] != colours["memdlm"]
    parent_metrics = client.get_run(parent_id).data.metrics
    assert parent_metrics and all(k.startswith("summary/") for k in parent_metrics)
    # the saved view: exactly the two children, the loss / eval/loss / gain charts first
    url = summary["dashboard_url"]
    assert url.startswith("http://127.0.0.1:5000/#/experiments/" + exp.experiment_id + "/runs?")
    query = parse_qs(urlsplit(url.split("#", 1)[1]).query)
    assert query["compareRunsMode"] == ["CHART"]
    envelope = json.loads(exp.tags[SHARED_VIEW_TAG + query["viewStateShareKey"][0]])
    state = json.loads(envelope["state"])
    assert [c["metricKey"] for c in state["compareRunCharts"]] == [
        "loss",
        "eval/loss",
        "memory/gain",
    ]  # dense: no MoE chart
    found = client.search_runs([exp.experiment_id], filter_string=state["searchFilter"])
    assert {r.info.run_id for r in found} == set(summary["run_ids"].values())
    md = (out / "compare.md").read_text()
    assert url in md and "memory gain" in md and "| MemDLM / MDLM step time |" in md
    assert url in capsys.readouterr().out
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 500 and image.shape[1] > 800  # 2 x 2 panels
    for colour in COLORS.values():  # both methods' curves are drawn, each in its colour
        rgb = np.array(matplotlib.colors.to_rgb(colour))
        assert (np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum() > 200, colour
    assert (root / "compare" / "latest").resolve() == out.resolve()
    assert latest_url(root, 5123) == url.replace(":5000/", ":5123/")
    assert main(["--url", "--root", str(root)]) == 0 and url in capsys.readouterr().out


def test_compare_cadence_draws_curves_unless_the_user_chose_one():
    assert auto_log_every(30) == 1 and auto_log_every(500) == 1 and auto_log_every(5000) == 10
    from pipeline.train_config import load_train_config

    def cadence(overrides, log_every, eval_every):
        base = load_train_config(None, ["steps=30", *overrides])
        cfg = _with_cadence(base, overrides, log_every, eval_every)
        return cfg.log_every, cfg.eval.every

    assert cadence([], None, None) == (1, 3)
    assert cadence(["log_every=5", "eval.every=0"], None, None) == (5, 0)
    assert cadence(["log_every=5"], 2, 7) == (2, 7)

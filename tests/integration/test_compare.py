"""`make compare`: both methods trained alike, read back through MLflow, plotted and tabulated."""

from __future__ import annotations

import json

import matplotlib.image
from mlflow.tracking import MlflowClient

from launch.compare import compare
from tests.conftest import tiny_run_overrides


def test_compare_reads_both_runs_back_and_writes_json_png_and_parent_run(world1, tiny_dataset, tmp_path):
    root = tmp_path / "runs"
    overrides = tiny_run_overrides(tiny_dataset, root, "checkpoint.every=0", "eval.every=2", "eval.batches=1")
    out = compare("configs/train/local.yaml", 4, overrides)
    summary = json.loads((out / "compare.json").read_text())
    for key in (
        "steps",
        "mdlm_final_eval_loss",
        "memdlm_final_eval_loss",
        "mdlm_tokens_per_s",
        "memdlm_tokens_per_s",
    ):
        assert isinstance(summary[key], int | float), key
    assert summary["steps"] == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    for method in ("mdlm", "memdlm"):  # the JSON's series are exactly what MLflow holds
        history = client.get_metric_history(summary["run_ids"][method], "loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == summary["curves"][method]["loss"]
    assert summary["curves"]["mdlm"]["loss"] != summary["curves"]["memdlm"]["loss"]
    assert summary["curves"]["mdlm"]["steps"] == summary["curves"]["memdlm"]["steps"] == [1, 2, 3, 4]
    children = client.search_runs(
        [client.get_experiment_by_name("memdlm").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{client.get_run(summary['run_ids']['mdlm']).data.tags['mlflow.parentRunId']}'",
    )
    assert sorted(r.data.tags["method"] for r in children) == ["mdlm", "memdlm"]
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 500
    assert (root / "compare" / "latest").resolve() == out.resolve()
    assert "| MemDLM / MDLM step time |" in (out / "compare.md").read_text()

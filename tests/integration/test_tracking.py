"""MLflow tracking: what a run logs (read back through the client), and a real `mlflow server`."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import matplotlib.image
from mlflow.tracking import MlflowClient

from pipeline.tracking import EXPERIMENT_KIND_TAG, TRAINING_KIND, Tracker, TrackingConfig
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests._mlflow import MlflowServer
from tests.conftest import tiny_run_overrides


def test_a_run_logs_config_tags_batched_metrics_and_artifacts(world1, tiny_dataset, tmp_path, monkeypatch):
    overrides = tiny_run_overrides(
        tiny_dataset,
        tmp_path / "runs",
        f"run_dir={tmp_path / 'runs' / 'a'}",
        "steps=4",
        "checkpoint.every=0",
        "eval.every=2",
        "eval.batches=1",
        "memory.enabled=true",
        "optim.lr=2e-3",
        "tracking.system_metrics=false",
    )
    cfg = load_train_config(None, overrides)
    calls = []
    real = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kw):
        calls.append((len(metrics), len(params)))
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    trainer = Trainer(cfg)
    trainer.run()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert trainer.tracker.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", trainer.tracker.uri
    run = client.get_run(trainer.tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "a"
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["memory.enabled"] == "True"
    assert run.data.tags["method"] == "memdlm" and run.data.tags["world_size"] == "1"
    assert len(run.data.tags["git_commit"]) in (40, 7)  # a hash, or "unknown" outside a checkout
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "config.json",
        "manifest.json",
        "loss_curves.png",
    }
    metric_calls = [m for m, _ in calls if m]
    # the layout event at the start (4 metrics at step 0), then all metrics of 4 steps in one batch
    assert len(metric_calls) == 2 and metric_calls[0] == 4 and metric_calls[1] > 4 * 10
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "layout/world_size")] == [
        (0, 1)
    ]
    assert run.data.tags["event.layout.step-000000"] == "TP=1 x DP=1 (grad_accum 1)"
    local = tmp_path / "runs" / "a" / "loss_curves.png"
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(local).shape[1] >= 1200  # the loss panel and the memory-gain panel
    # opens in MLflow 3's model-training view; `step` is the x axis, never a metric
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert "step" not in run.data.metrics
    # the memory's effect at every logged step: gain, update norms, clipped fraction
    for key in ("memory/gain", "memory/loss_phi0", "inner/stage1_update_norm", "inner/stage2_clipped_frac"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
    assert not any(k.startswith("system/") for k in run.data.metrics)  # off here


def test_the_memory_gain_is_measured_on_logged_steps_only_and_system_metrics_are_logged(
    world1, tiny_dataset, tmp_path
):
    overrides = tiny_run_overrides(
        tiny_dataset,
        tmp_path / "runs",
        f"run_dir={tmp_path / 'runs' / 'b'}",
        "steps=5",
        "log_every=2",
        "checkpoint.every=0",
        "eval.every=0",
        "memory.enabled=true",
        "tracking.system_metrics=true",
        "tracking.system_metrics_interval_s=0.2",
    )
    trainer = Trainer(load_train_config(None, overrides))
    records = trainer.run()
    client = MlflowClient(tracking_uri=trainer.tracker.uri)
    run_id = trainer.tracker.run_id
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [m.step for m in client.get_metric_history(run_id, "memory/gain")] == [2, 4, 5]
    assert all("memory/gain" in r for r in records)
    metrics = client.get_run(run_id).data.metrics
    assert (
        "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    )


def test_an_existing_experiment_is_marked_as_a_training_experiment_unless_it_has_a_kind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'k.db'}"
    client = MlflowClient(tracking_uri=uri)
    plain = client.create_experiment("plain")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("plain", "chosen", "new"):
        Tracker(TrackingConfig(uri=uri, experiment=name, root=str(tmp_path)), "r")
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND


def test_runs_logged_through_an_mlflow_server_come_back_from_its_rest_api(tmp_path):
    with MlflowServer(tmp_path) as server:
        server.start()
        url = server.url
        tracker = Tracker(
            TrackingConfig(uri=url, experiment="served", root=str(tmp_path / "runs"), system_metrics=False),
            "via-server",
        )
        run_id = tracker.start({"optim.lr": "0.001"}, {"method": "mdlm"})
        for step in range(1, 4):
            tracker.log(step, {"loss": 5.0 - step})
        tracker.end()
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as r:
            run = json.loads(r.read())["run"]
        assert run["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"optim.lr": "0.001"}
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"loss": 2.0}  # the latest value
        assert Path(tmp_path / "runs").is_dir()

"""The MLflow tracking server failing: killed mid-run and restarted, unreachable at the start.

A real ``mlflow server`` (sqlite store, one worker) is killed with SIGKILL and restarted on the same
port and store; the training (a real Trainer) or the Tracker goes on, and the store ends up with
every logged step at its original timestamp. Unreachable at the start: one ``error:`` line, in
seconds, or an offline run with ``tracking.on_unreachable=offline``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from pipeline.tracking import Tracker, TrackingConfig, TrackingUnavailable
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests import _proc
from tests._mlflow import MlflowServer
from tests.conftest import free_port, tiny_job_args, tiny_trainer_config

OUTAGE_WARNING = "warning: MLflow tracking server "


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.close()


def _outage_lines(err: str) -> list[str]:
    """The outage warnings in ``err`` (the buffer-full warning is another line)."""
    return [
        line for line in err.splitlines() if line.startswith(OUTAGE_WARNING) and "is unreachable (" in line
    ]


@pytest.mark.slow
def test_an_mlflow_server_killed_mid_run_loses_no_step_and_the_gap_is_filled_when_it_returns(
    world1, tiny_dataset, tmp_path, server, capfd
):
    cfg = tiny_trainer_config(
        tiny_dataset,
        tmp_path / "run",
        f"tracking.uri={server.url}",
        "steps=12",
        "checkpoint.every=0",
        "tracking.flush_every=2",
        "tracking.retry_every_s=0.5",
        "tracking.system_metrics=false",
    )
    trainer = Trainer(cfg)
    trainer.run(stop_after=4)  # steps 1-4 reach the server
    server.kill()
    trainer.run(stop_after=4)  # steps 5-8: the server is dead, training goes on
    restarted_ms = int(time.time() * 1000)
    server.start()  # same port, same store
    trainer.run(stop_after=2)  # steps 9-10: the flush at step 10 sends 5-10
    client = MlflowClient(tracking_uri=server.url)
    run_id = trainer.tracker.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 11))
    trainer.run()  # steps 11-12, the end of the run
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 13))  # every step, once
    assert all(m.timestamp < restarted_ms for m in history if 5 <= m.step <= 8)  # logged when trained
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in records]
    assert client.get_run(run_id).info.status == "FINISHED"
    err = capfd.readouterr().err
    lines = _outage_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"warning: MLflow tracking server {server.url} is unreachable (")
    assert "metrics from step 5 are buffered" in lines[0]


@pytest.mark.slow
def test_a_full_buffer_drops_the_oldest_steps_with_one_warning(tmp_path, server, capfd):
    cfg = TrackingConfig(
        uri=server.url,
        experiment="outage",
        root=str(tmp_path / "runs"),
        flush_every=1,
        retry_every_s=60.0,
        max_buffered_steps=5,
        system_metrics=False,
    )
    tracker = Tracker(cfg, "buffer")
    run_id = tracker.start({"optim.lr": "0.001"}, {"method": "mdlm"})
    tracker.log(1, {"loss": 1.0})
    server.kill()
    for step in range(2, 13):
        tracker.log(step, {"loss": float(step)})
    server.start()
    assert tracker.flush() is False  # the next retry is not due: nothing is tried
    assert tracker.flush(force=True) is True
    history = MlflowClient(tracking_uri=server.url).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 8, 9, 10, 11, 12]  # the 5 newest buffered steps
    tracker.end()
    err = capfd.readouterr().err
    assert len(_outage_lines(err)) == 1, err
    full = [line for line in err.splitlines() if "buffer full" in line]
    assert len(full) == 1 and "(from step 2)" in full[0], err


@pytest.mark.slow
def test_a_frozen_server_costs_one_timeout_per_retry_and_no_step_is_stored_twice(
    tmp_path, server, capfd, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(
        uri=server.url, experiment="frozen", root=str(tmp_path / "runs"), flush_every=1, system_metrics=False
    )
    tracker = Tracker(cfg, "frozen")
    run_id = tracker.start({"optim.lr": "0.001"}, {"method": "mdlm"})
    tracker.log(1, {"loss": 1.0})
    os.killpg(server.proc.pid, signal.SIGSTOP)  # hung: connections accepted, never answered
    try:
        t0 = time.monotonic()
        for step in range(2, 13):
            tracker.log(step, {"loss": float(step)})
        took = time.monotonic() - t0
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    # one send waits out the timeout (2 s, and one retry); the other ten wait for the retry time
    assert took < 10.0, took
    assert tracker.flush(force=True) is True
    # The requests that timed out reach the server when it thaws; they are sent again with the
    # same timestamps, which the store keeps once.
    history = MlflowClient(tracking_uri=server.url).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 13))
    tracker.end()
    assert len(_outage_lines(capfd.readouterr().err)) == 1


def test_an_unreachable_tracking_server_fails_within_30_s_naming_the_uri_without_credentials(tmp_path):
    port = free_port()  # nothing listens there
    cfg = TrackingConfig(uri=f"http://alice:s3cret@127.0.0.1:{port}", root=str(tmp_path))  # default timeout
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as caught:
        Tracker(cfg, "r")
    assert time.monotonic() - t0 < 30
    assert str(caught.value) == (
        f"MLflow tracking server http://127.0.0.1:{port} (tracking.uri) is unreachable: Connection refused "
        "(tried for 10 s); start it or correct the URI, or set tracking.on_unreachable=offline to train "
        "without MLflow (metrics in the run's metrics.jsonl only)"
    )


@pytest.mark.slow
def test_training_against_an_unreachable_server_exits_2_with_one_error_line_and_no_traceback(
    tiny_dataset, tmp_path
):
    port = free_port()
    args = tiny_job_args(tiny_dataset, tmp_path, f"tracking.uri=http://alice:s3cret@127.0.0.1:{port}")
    t0 = time.monotonic()
    env = {**os.environ, "MASTER_PORT": str(free_port())}  # not the port of this session's world1
    out = _proc.run([sys.executable, "-m", "pipeline.train", *args], timeout=300, env=env)
    took = time.monotonic() - t0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert errors == [
        f"error: MLflow tracking server http://127.0.0.1:{port} (tracking.uri) is unreachable: Connection "
        "refused (tried for 10 s); start it or correct the URI, or set tracking.on_unreachable=offline to "
        "train without MLflow (metrics in the run's metrics.jsonl only)"
    ], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "s3cret" not in out.stdout + out.stderr
    # interpreter start, imports and the tiny engine build (~15 s on 2 busy cores), then 10 s of probing
    assert took < 60, took


def test_an_unreachable_server_with_on_unreachable_offline_trains_without_mlflow(
    world1, tiny_dataset, tmp_path, capfd
):
    port = free_port()
    cfg = tiny_trainer_config(
        tiny_dataset,
        tmp_path / "run",
        f"tracking.uri=http://127.0.0.1:{port}",
        "tracking.on_unreachable=offline",
        "tracking.connect_timeout_s=2",
        "checkpoint.every=0",
    )
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.tracker is None
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [1, 2, 3, 4]
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: MLflow tracking server http://127.0.0.1:{port} (tracking.uri) is unreachable: Connection "
        "refused (tried for 2 s); tracking.on_unreachable=offline: training without MLflow, metrics in "
        f"{tmp_path / 'run' / 'metrics.jsonl'} only"
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "tracking.on_unreachable=maybe",
            "key 'tracking.on_unreachable': got 'maybe', expected one of 'error', 'offline'",
        ),
        (
            "tracking.max_buffered_steps=10",
            "key 'tracking.max_buffered_steps': got 10, expected >= tracking.flush_every (50)",
        ),
        ("tracking.retry_every_s=0", "key 'tracking.retry_every_s': got 0.0, expected > 0"),
        ("tracking.connect_timeout_s=-1", "key 'tracking.connect_timeout_s': got -1.0, expected > 0"),
    ],
)
def test_the_tracking_failure_keys_are_validated(override, message):
    with pytest.raises(ConfigError) as caught:
        load_train_config(None, ["model_preset=tiny", override])
    assert str(caught.value) == f"None + overrides: {message}"

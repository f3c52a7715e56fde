"""MLflow tracking for rank 0: the resolved config as params, run tags, batched metrics, artifacts.

    tracker = Tracker(TrackingConfig(), run_name="local")         # store under runs/
    tracker.start(params=flat_config, tags={...})
    tracker.log(step, {"loss": 2.3, "lr": 1e-3})     # buffered; one log_batch call per flush
    tracker.log_artifacts([config_path, manifest_path, png])
    tracker.end()

The default store is embedded: ``sqlite:///<run_root>/mlflow.db`` with artifacts under
``<run_root>/mlartifacts`` (no server). ``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) points it
at a team server instead. Metrics are buffered and sent with ``log_batch`` (one sqlite/HTTP call
per flush, never one per metric per step: ~20 ms each on sqlite).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The plots moved to pipeline/plots.py; re-exported for the callers that import them from here.
from pipeline.plots import ema, plot_loss_curves  # noqa: F401

# The user's setting, read once at import: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI
# into os.environ, so any in-process call of it would otherwise redirect our later runs.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
LOGGED_THROUGH_TAG = "memdlm.logged_through_step"
# What MLflow 3's UI reads to open an experiment in its model-training view (runs and charts)
# rather than the GenAI overview (traces): server/js, ExperimentKind.CUSTOM_MODEL_DEVELOPMENT.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui` (PORT=5000)


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "memdlm"
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under ``root``
    root: str = "runs"  # the embedded store: <root>/mlflow.db and <root>/mlartifacts
    flush_every: int = 50  # logged steps per batched write
    # MLflow's system metrics (system/cpu_utilization_percentage, system/gpu_*: GPU ones need
    # nvidia-ml-py) sampled by a background thread. null: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    # if set (the tests set it false), else on.
    system_metrics: bool | None = None
    system_metrics_interval_s: float = 10.0

    def system_metrics_on(self) -> bool:
        if self.system_metrics is not None:
            return self.system_metrics
        env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
        return True if env is None else env.strip().lower() in ("1", "true", "yes")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": "0.001"}`` (values as strings, as MLflow stores them)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_CHARS]
    return out


def redact_uri(uri: str) -> str:
    """``https://user:secret@host/x`` -> ``https://host/x``: credentials are never written or logged
    (the trainer hands them to MLflow as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redact_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config with credentials in ``tracking.uri`` masked (for config.json and MLflow)."""
    tracking = resolved.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        resolved = {**resolved, "tracking": {**tracking, "uri": redact_uri(tracking["uri"])}}
    return resolved


def git_commit(root: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tracking_uri(cfg: TrackingConfig, run_root: Path) -> str:
    return cfg.uri or _USER_TRACKING_URI or f"sqlite:///{run_root.resolve()}/mlflow.db"


def ui_url(uri: str, route: str, local_ui: str = LOCAL_UI) -> str:
    """The dashboard URL of ``route`` (``/experiments/1/runs?...``): on the tracking server itself
    for an http(s) store (credentials removed), else on ``make mlflow-ui``'s address."""
    base = redact_uri(uri) if uri.startswith(("http://", "https://")) else local_ui
    return f"{base.rstrip('/')}/#{route}"


def ensure_training_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name`` (created if missing), tagged as a model-training experiment
    unless someone chose another kind for it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


class Tracker:
    """One MLflow run (created, or resumed by id). Use on rank 0 only."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        run_root = Path(cfg.root) if run_root is None else run_root
        run_root.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.uri = tracking_uri(cfg, run_root)
        self.client = MlflowClient(tracking_uri=self.uri)
        # Artifact root set explicitly: the default would be relative to the working directory.
        artifacts = None if self.uri.startswith("http") else (run_root.resolve() / "mlartifacts").as_uri()
        self.experiment_id = ensure_training_experiment(self.client, cfg.experiment, artifacts)
        self._system = None  # mlflow's SystemMetricsMonitor while the run is open
        self.run_name = run_name
        self.run_id: str | None = None
        self._buffer: list = []
        self._pending_steps = 0
        self._last_step = -1
        self.resumed_through = -1  # the newest step an earlier job of this run sent (-1: none)

    def start(
        self,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create the run (or reopen ``run_id`` after a resume) and log params and tags once."""
        from mlflow.entities import Param

        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            # Steps the interrupted job already sent (it may have got past its last checkpoint):
            # the resumed job recomputes them bit for bit, so they are not sent twice.
            tag = self.client.get_run(run_id).data.tags.get(LOGGED_THROUGH_TAG)
            self.resumed_through = int(tag) if tag is not None else -1
            self._start_system_metrics(resume=True)
            return run_id
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=all_tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        self._start_system_metrics(resume=False)
        return self.run_id

    def _start_system_metrics(self, resume: bool) -> None:
        """CPU/memory/disk/network (and GPU with nvidia-ml-py) as ``system/*`` metrics of this run,
        sampled every ``system_metrics_interval_s`` by MLflow's own monitor thread."""
        if not self.cfg.system_metrics_on():
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval_s,
            resume_logging=resume,
            tracking_uri=self.uri,
        )
        self._system.start()

    def log(self, step: int, metrics: Mapping[str, float], timestamp_ms: int | None = None) -> None:
        """Buffer finite metrics of ``step``; flushed every ``flush_every`` calls (and by ``flush``)."""
        import math
        import time

        from mlflow.entities import Metric

        if step <= self.resumed_through:
            return
        ts = timestamp_ms or int(time.time() * 1000)
        for k, v in metrics.items():
            # "step" is the x axis of every metric, not a metric of its own
            if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                self._buffer.append(Metric(k, float(v), ts, step))
        self._last_step = max(self._last_step, step)
        self._pending_steps += 1
        if self._pending_steps >= self.cfg.flush_every:
            self.flush()

    def log_event(self, step: int, name: str, text: str, metrics: Mapping[str, float]) -> None:
        """Something that happened to the run at ``step`` (its layout at the start, a resize on
        resume): tag ``event.<name>.step-<N>`` = ``text``, and ``metrics`` at ``step``, sent now
        (a resumed job's replayed steps do not apply: the event is new)."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)
        self.client.set_tag(self.run_id, f"event.{name}.step-{step:06d}", text)

    def flush(self) -> None:
        for i in range(0, len(self._buffer), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + MAX_METRICS_PER_BATCH])
        self._buffer.clear()
        self._pending_steps = 0
        if self._last_step >= 0:
            self.client.set_tag(self.run_id, LOGGED_THROUGH_TAG, str(self._last_step))

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for p in paths:
            if Path(p).is_file():
                self.client.log_artifact(self.run_id, str(p))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        if self._system is not None:
            self._system.finish()  # its last samples, before the run closes
            self._system = None
        self.client.set_terminated(self.run_id, status=status)

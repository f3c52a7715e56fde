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

# The user's setting, read once at import: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI
# into os.environ, so any in-process call of it would otherwise redirect our later runs.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
LOGGED_THROUGH_TAG = "memdlm.logged_through_step"


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "memdlm"
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under ``root``
    root: str = "runs"  # the embedded store: <root>/mlflow.db and <root>/mlartifacts
    flush_every: int = 50  # logged steps per batched write


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
    """``https://user:secret@host/x`` -> ``https://***@host/x`` (credentials never logged)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
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


class Tracker:
    """One MLflow run (created, or resumed by id). Use on rank 0 only."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        run_root = Path(cfg.root) if run_root is None else run_root
        run_root.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.uri = tracking_uri(cfg, run_root)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            # Artifact root set explicitly: the default would be relative to the working directory.
            artifacts = None if self.uri.startswith("http") else (run_root.resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
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
            return run_id
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=all_tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        return self.run_id

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
        self.client.set_terminated(self.run_id, status=status)


def plot_loss_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Train loss (raw and smoothed) and eval loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    loss = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot(steps, loss, alpha=0.35, label="train (raw)")
        ax.plot(steps, ema(loss), label="train (EMA 0.9)")
    ev = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, m = [], 0.0
    for i, v in enumerate(values, start=1):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta**i))
    return out

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

A tracking server is never allowed to stop training:

* At the start, an http(s) server is probed for ``tracking.connect_timeout_s``; if it does not
  answer, :class:`TrackingUnavailable` (a :class:`~pipeline.config.ConfigError`: one ``error:``
  line naming the URI, credentials removed), or with ``tracking.on_unreachable: offline`` the
  caller trains without MLflow (``pipeline/build.py``).
* Mid-run, a failed send keeps the metrics buffered (with their original steps and timestamps),
  prints one warning for the gap, and is retried after ``retry_every_s`` (doubling while the
  outage lasts, up to 8x); the gap is filled when the server answers again. At most
  ``max_buffered_steps`` logged steps are kept: past that the oldest are dropped (one warning).
  ``metrics.jsonl`` (written by the trainer, not from here) has every step either way.
* MLflow's own HTTP client would retry a dead server 7 times with backoff and wait 120 s for
  each answer (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_TIMEOUT``): 258 s
  per call with training stopped. Unless set by the user, they are lowered here (:data:`HTTP_DEFAULTS`):
  the buffer is the retry.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests  # MLflow's HTTP client, imported with mlflow
from tqdm import tqdm

from pipeline.config import ConfigError

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
# One immediate retry (a keep-alive connection the server closed), 10 s to answer: a dead server
# costs ~0 s per send (connection refused), a hung one 20 s, and sends are retried only every
# retry_every_s while it lasts. Read by MLflow at each request (mlflow/utils/rest_utils.py).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
MAX_RETRY_BACKOFF = 8  # the retry interval grows to at most 8 x retry_every_s during an outage
T = TypeVar("T")


class TrackingUnavailable(ConfigError):
    """The tracking store cannot be reached (or refuses the run) when the run starts.

    ``problem`` is the first half of the message (which store, what went wrong), without the
    advice: the offline fallback words its warning from it."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow (metrics.jsonl is written either way)
    experiment: str = "memdlm"  # the MLflow experiment runs are grouped under
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under ``root``
    root: str = "runs"  # the embedded store: <root>/mlflow.db and <root>/mlartifacts
    flush_every: int = 50  # logged steps per batched write
    # MLflow's system metrics (system/cpu_utilization_percentage, system/gpu_*: GPU ones need
    # nvidia-ml-py) sampled by a background thread. null: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    # if set (the tests set it false), else on.
    system_metrics: bool | None = None
    system_metrics_interval_s: float = 10.0  # seconds between system metric samples
    # A store that cannot be reached at the start: "error" stops the run (one error line, after
    # trying for connect_timeout_s); "offline" trains without MLflow (metrics.jsonl only, a warning).
    on_unreachable: Literal["error", "offline"] = "error"
    connect_timeout_s: float = 10.0  # how long an http(s) server is tried at the start
    # A failed send mid-run never stops training: the metrics stay buffered (with their steps and
    # timestamps) and are retried after this long, doubling while the outage lasts (up to 8x).
    retry_every_s: float = 30.0
    # Logged steps kept while the store is down; past it the oldest are dropped from MLflow with a
    # warning (metrics.jsonl keeps every step). ~30 metrics a step: ~50 MB at the default.
    max_buffered_steps: int = 10_000
    end_wait_s: float = 60.0  # at the end of a finished run, how long to keep retrying what is unsent

    def validate(self) -> None:
        positive = {
            "flush_every": self.flush_every,
            "system_metrics_interval_s": self.system_metrics_interval_s,
            "connect_timeout_s": self.connect_timeout_s,
            "retry_every_s": self.retry_every_s,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"key 'tracking.{key}': got {value}, expected > 0")
        if self.max_buffered_steps < self.flush_every:
            raise ConfigError(
                f"key 'tracking.max_buffered_steps': got {self.max_buffered_steps}, expected >= "
                f"tracking.flush_every ({self.flush_every})"
            )
        if self.end_wait_s < 0:
            raise ConfigError(f"key 'tracking.end_wait_s': got {self.end_wait_s}, expected >= 0")

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
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


_USERINFO = re.compile(r"(//)[^/@\s]+@")


def scrub(text: str) -> str:
    """``text`` with any ``//user:secret@`` in a URL inside it removed (exception messages quote URLs)."""
    return _USERINFO.sub(r"\1", text)


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


def uri_source(cfg: TrackingConfig) -> str:
    """Where :func:`tracking_uri` found the URI (for messages)."""
    return "tracking.uri" if cfg.uri else "MLFLOW_TRACKING_URI" if _USER_TRACKING_URI else "default"


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


# ---------------------------------------------------------------- failures of the store

_ADVICE = (
    "start it or correct the URI, or set tracking.on_unreachable=offline to train without MLflow "
    "(metrics in the run's metrics.jsonl only)"
)
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"()\[\]<>]+)")


def failure_reason(exc: BaseException) -> str:
    """A short, credential-free reason for a failed request: ``Connection refused``, ``timed out``,
    ``HTTP 503 ...``, or the start of the message."""
    text = scrub(str(exc))
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip()
    if isinstance(exc, TimeoutError) or "timed out" in text.lower():
        return "timed out"
    if isinstance(exc, urllib.error.URLError):
        text = scrub(str(exc.reason))
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return " | ".join(parts)[:200] or type(exc).__name__


def _store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the tracking store failing (unreachable, timing out, answering with an
    error), which a later retry may cure, rather than a bug of ours (which is raised)."""
    from mlflow.exceptions import MlflowException  # heavy: only once a Tracker exists

    return isinstance(exc, MlflowException | requests.RequestException | OSError)


def _rejected(exc: BaseException) -> bool:
    """A request the store refuses as malformed (HTTP 400): retrying the same metrics cannot help."""
    status = getattr(exc, "get_http_status_code", None)
    return status is not None and status() == 400


def probe_server(uri: str, timeout_s: float, source: str = "tracking.uri") -> None:
    """Return once the http(s) tracking server at ``uri`` answers ``/health`` (any HTTP answer below
    500 counts: a 401 is MLflow's to report), trying for ``timeout_s``; else raise
    :class:`TrackingUnavailable` naming the URI (credentials removed) and ``source``."""
    shown = redact_uri(uri)
    url = shown.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(0.5, min(5.0, left))):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return  # it answered (a proxy without /health, or one asking for credentials)
            why = f"HTTP {exc.code} {exc.reason}"
        except (OSError, ValueError) as exc:  # refused, timed out, unknown host; ValueError: a bad URL
            why = failure_reason(exc)
        if time.monotonic() + 1.0 >= deadline:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} ({source}) is unreachable: {why} (tried for {timeout_s:g} s)",
                _ADVICE,
            )
        time.sleep(1.0)


def _warn(message: str) -> None:
    # above the trainer's progress bar, not glued to its end
    tqdm.write(f"warning: {message}", file=sys.stderr)


@dataclass
class _Entry:
    """Metrics of one step not sent yet (MLflow ``Metric`` objects with their original timestamps)."""

    step: int
    metrics: list
    logged: bool  # from log(): counts for LOGGED_THROUGH_TAG (an event's metrics do not)


@dataclass
class _Outage:
    since: float  # time.time() of the first failure
    first_step: int  # the oldest logged step buffered when it began (-1: none)
    failures: int = 0
    retry_at: float = 0.0  # time.monotonic() of the next try
    dropped: int = 0  # logged steps dropped from the full buffer
    dropped_from: int = -1


# ---------------------------------------------------------------- the run


class Tracker:
    """One MLflow run (created, or resumed by id). Use on rank 0 only.

    Raises :class:`TrackingUnavailable` while starting (constructor, :meth:`start`) if the store
    cannot be reached; after that no store failure reaches the caller (see the module docstring)."""

    def __init__(self, cfg: TrackingConfig, run_name: str, run_root: Path | None = None):
        from mlflow.tracking import MlflowClient  # heavy (~1 s): only where tracking is on

        run_root = Path(cfg.root) if run_root is None else run_root
        run_root.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.uri = tracking_uri(cfg, run_root)
        self._source = uri_source(cfg)
        served = self.uri.startswith(("http://", "https://"))
        self._what = f"{'server' if served else 'store'} {redact_uri(self.uri)}"
        if served:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)  # the user's own settings win
            probe_server(self.uri, cfg.connect_timeout_s, self._source)
        self.client = MlflowClient(tracking_uri=self.uri)
        # Artifact root set explicitly: the default would be relative to the working directory.
        artifacts = None if served else (run_root.resolve() / "mlartifacts").as_uri()
        self.experiment_id = self._starting(
            lambda: ensure_training_experiment(self.client, cfg.experiment, artifacts)
        )
        self._system = None  # mlflow's SystemMetricsMonitor while the run is open
        self.run_name = run_name
        self.run_id: str | None = None
        self._buffer: deque[_Entry] = deque()  # oldest first
        self._tags: dict[str, str] = {}  # set with the next send
        self._artifacts: list[Path] = []  # uploaded with the next send
        self._status: str | None = None  # the run's final status, once end() is called
        self._pending_steps = 0
        self._sent_through = -1  # the newest logged step the store has
        self._tagged_through = -1  # LOGGED_THROUGH_TAG's value in the store
        self._outage: _Outage | None = None
        self.resumed_through = -1  # the newest step an earlier job of this run sent (-1: none)

    def _starting(self, call: Callable[[], T]) -> T:
        """``call()`` while the run starts: a store failure is :class:`TrackingUnavailable`."""
        try:
            return call()
        except Exception as exc:
            if not _store_failure(exc):
                raise
            raise TrackingUnavailable(
                f"MLflow tracking {self._what} ({self._source}) failed at the start of the run: "
                f"{failure_reason(exc)}",
                _ADVICE,
            ) from None

    def start(
        self,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create the run (or reopen ``run_id`` after a resume) and log params and tags once."""
        # heavy: MLflow takes seconds to import; only once a Tracker exists
        from mlflow.entities import Param

        if run_id is not None:
            self.run_id = run_id
            self._starting(lambda: self.client.update_run(run_id, status="RUNNING"))
            # Steps the interrupted job already sent (it may have got past its last checkpoint):
            # the resumed job recomputes them bit for bit, so they are not sent twice.
            tag = self._starting(lambda: self.client.get_run(run_id)).data.tags.get(LOGGED_THROUGH_TAG)
            self.resumed_through = int(tag) if tag is not None else -1
            self._sent_through = self._tagged_through = self.resumed_through
            self._start_system_metrics(resume=True)
            return run_id
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._starting(
            lambda: self.client.create_run(self.experiment_id, run_name=self.run_name, tags=all_tags)
        )
        self.run_id = run_id = run.info.run_id
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._starting(lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))
        self._start_system_metrics(resume=False)
        return run_id

    def _start_system_metrics(self, resume: bool) -> None:
        """CPU/memory/disk/network (and GPU with nvidia-ml-py) as ``system/*`` metrics of this run,
        sampled every ``system_metrics_interval_s`` by MLflow's own monitor thread."""
        if not self.cfg.system_metrics_on():
            return
        # heavy: MLflow takes seconds to import; only once a Tracker exists
        from mlflow.system_metrics.system_metrics_monitor import (
            SystemMetricsMonitor,
        )

        self._system = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval_s,
            resume_logging=resume,
            tracking_uri=self.uri,
        )
        self._system.start()

    def _finish_system_metrics(self) -> None:
        if self._system is not None:
            self._system.finish()  # its last samples, before the run closes
            self._system = None

    def log(self, step: int, metrics: Mapping[str, float], timestamp_ms: int | None = None) -> None:
        """Buffer finite metrics of ``step`` (stamped now unless ``timestamp_ms``); flushed every
        ``flush_every`` calls (and by ``flush``)."""
        # heavy: MLflow takes seconds to import; only once a Tracker exists
        from mlflow.entities import (
            Metric,
        )

        if step <= self.resumed_through:
            return
        ts = timestamp_ms or int(time.time() * 1000)
        # "step" is the x axis of every metric, not a metric of its own
        items = [
            Metric(k, float(v), ts, step)
            for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and math.isfinite(v)
        ]
        self._buffer.append(_Entry(step, items, logged=True))
        self._bound_buffer()
        self._pending_steps += 1
        if self._pending_steps >= self.cfg.flush_every:
            self.flush()

    def _bound_buffer(self) -> None:
        """Past ``max_buffered_steps`` logged steps (a long outage) drop the oldest: the newest are
        what the dashboard shows when the server is back. One warning per outage."""
        while len(self._buffer) > self.cfg.max_buffered_steps:
            entry = self._buffer.popleft()
            if self._outage is None or not entry.logged:
                continue
            if not self._outage.dropped:
                self._outage.dropped_from = entry.step
                _warn(
                    f"MLflow buffer full ({self.cfg.max_buffered_steps} logged steps, "
                    f"tracking.max_buffered_steps) while the tracking {self._what} is unreachable: the "
                    f"oldest buffered steps (from step {entry.step}) are dropped from MLflow; metrics.jsonl "
                    "keeps every step"
                )
            self._outage.dropped += 1

    def log_event(self, step: int, name: str, text: str, metrics: Mapping[str, float]) -> None:
        """Something that happened to the run at ``step`` (its layout at the start, a resize on
        resume): tag ``event.<name>.step-<N>`` = ``text``, and ``metrics`` at ``step``, sent now
        (a resumed job's replayed steps do not apply: the event is new)."""
        # heavy: MLflow takes seconds to import; only once a Tracker exists
        from mlflow.entities import (
            Metric,
        )

        ts = int(time.time() * 1000)
        self._buffer.append(_Entry(step, [Metric(k, float(v), ts, step) for k, v in metrics.items()], False))
        self._tags[f"event.{name}.step-{step:06d}"] = text
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is buffered now (``log_batch`` calls of up to 1000 metrics). During an outage
        only once its next retry is due, unless ``force``; returns whether nothing is left to send."""
        self._pending_steps = 0
        return self._sync(force)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Upload the files of ``paths`` that exist (retried by :meth:`end` if the store is down)."""
        self._artifacts += [Path(p) for p in paths if Path(p).is_file()]
        self._sync()

    def end(self, status: str = "FINISHED") -> None:
        """Stop the system metrics, send what is pending, close the run as ``status``. A FINISHED
        run keeps retrying for ``end_wait_s`` if the store is down; any other status tries once (a
        stopped job has little time left). What is still unsent then is named in one warning."""
        self._finish_system_metrics()
        self._status = status
        deadline = time.monotonic() + (self.cfg.end_wait_s if status == "FINISHED" else 0.0)
        while not self._sync(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                self._warn_unsent(status)
                return
            time.sleep(min(5.0, left))

    # ------------------------------------------------------------ sending
    def _sync(self, force: bool = False) -> bool:
        """Send everything pending (metrics, tags, artifacts, the final status), unless an outage's
        next retry is not due yet (``force``: try anyway). Returns whether nothing is pending; a
        store failure keeps it all for the next try and never reaches the caller."""
        if self.run_id is None:
            return not self._buffer
        if self._outage is not None and not force and time.monotonic() < self._outage.retry_at:
            return False
        try:
            self._send_metrics()
            for key, value in list(self._tags.items()):
                self.client.set_tag(self.run_id, key, value)
                del self._tags[key]
                if key == LOGGED_THROUGH_TAG:
                    self._tagged_through = int(value)
            while self._artifacts:
                self.client.log_artifact(self.run_id, str(self._artifacts[0]))
                self._artifacts.pop(0)
            if self._status is not None:
                self.client.set_terminated(self.run_id, status=self._status)
                self._status = None
        except Exception as exc:
            if not _store_failure(exc):
                raise
            self._failed(exc)
            return False
        if self._outage is not None:
            self._recovered()
        return True

    def _send_metrics(self) -> None:
        """The buffer, oldest first, in batches of whole steps (up to 1000 metrics each). What was
        sent leaves the buffer at once: a failure part-way never sends a metric twice."""
        while self._buffer:
            batch: list = []
            for entry in self._buffer:
                room = MAX_METRICS_PER_BATCH - len(batch)
                if room <= 0 or (batch and len(entry.metrics) > room):
                    break
                batch.extend(entry.metrics[:room])
            if batch:
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception as exc:
                    if not _rejected(exc):
                        raise
                    steps = sorted({m.step for m in batch})
                    _warn(
                        f"MLflow tracking {self._what} rejected the metrics of steps {steps[0]}..{steps[-1]} "
                        f"({failure_reason(exc)}): not sent (metrics.jsonl has them)"
                    )
            self._consume(len(batch))
        if self._sent_through > self._tagged_through:
            self._tags[LOGGED_THROUGH_TAG] = str(self._sent_through)

    def _consume(self, n: int) -> None:
        """Remove the first ``n`` buffered metrics (and the steps left empty) after a send."""
        while self._buffer:
            entry = self._buffer[0]
            take = min(n, len(entry.metrics))
            del entry.metrics[:take]
            n -= take
            if entry.metrics:
                return
            self._buffer.popleft()
            if entry.logged:
                self._sent_through = max(self._sent_through, entry.step)

    def _failed(self, exc: BaseException) -> None:
        """Note a failed send: one warning when an outage begins, the next retry scheduled."""
        if self._outage is None:
            first = next((e.step for e in self._buffer if e.logged), -1)
            self._outage = _Outage(since=time.time(), first_step=first)
            where = f"from step {first} " if first >= 0 else ""
            _warn(
                f"MLflow tracking {self._what} is unreachable ({failure_reason(exc)}); training goes on and "
                f"metrics {where}are buffered (up to {self.cfg.max_buffered_steps} steps) and sent when it "
                "is back (metrics.jsonl has every step)"
            )
        self._outage.failures += 1
        backoff = min(MAX_RETRY_BACKOFF, 2 ** (self._outage.failures - 1))
        self._outage.retry_at = time.monotonic() + self.cfg.retry_every_s * backoff

    def _recovered(self) -> None:
        """The store answers again: say what was filled in, restart the system metrics."""
        outage, self._outage = self._outage, None
        assert outage is not None
        filled = (
            f"; sent the buffered steps {outage.first_step}..{self._sent_through}"
            if 0 <= outage.first_step <= self._sent_through
            else ""
        )
        dropped = (
            f"; {outage.dropped} step(s) from step {outage.dropped_from} had been dropped from the full "
            "buffer (metrics.jsonl has them)"
            if outage.dropped
            else ""
        )
        took = time.time() - outage.since
        tqdm.write(f"tracking: MLflow {self._what} answers again after {took:.0f} s{filled}{dropped}")
        self._restart_system_metrics()

    def _restart_system_metrics(self) -> None:
        """MLflow's monitor thread ends at its first failed request: a new one takes over after an
        outage (``resume_logging``: its steps go on)."""
        if self._system is None:
            return
        thread = getattr(self._system, "_process", None)  # the monitor's thread (None: not started)
        if thread is not None and thread.is_alive():
            return
        self._finish_system_metrics()
        self._start_system_metrics(resume=True)

    def _warn_unsent(self, status: str) -> None:
        steps = [e.step for e in self._buffer if e.logged]
        unsent = f"steps {steps[0]}..{steps[-1]} ({len(steps)} logged steps) were not sent, " if steps else ""
        _warn(
            f"MLflow tracking {self._what} still unreachable at the end of the run: {unsent}"
            f"the run is not marked {status} there (metrics.jsonl has every step)"
        )

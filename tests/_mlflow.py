"""A real MLflow server (or UI) for the tests: started, waited for, killed and started again, and
always ended with every process it spawned (tests/_proc.py's ``started``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import _proc
from tests.conftest import free_port


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until ``url``/health answers 200; the test fails if ``proc`` dies or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"mlflow at {url} did not come up within {timeout_s:.0f} s")
        time.sleep(0.5)


class MlflowServer:
    """``mlflow server`` (or ``mlflow ui`` with ``ui=True``) on a fixed port and a sqlite store under
    ``root``, which a test can kill and start again."""

    def __init__(self, root: Path, store: str | None = None, ui: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root, self.ui = root, ui
        self.store = store or f"sqlite:///{root / 'server.db'}"
        self._stack = contextlib.ExitStack()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "ui" if self.ui else "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1", "--backend-store-uri", self.store]
        return cmd if self.ui else [*cmd, "--default-artifact-root", str(self.root / "art")]

    def launch(self) -> subprocess.Popen:
        """Start it without waiting (it imports for 10-40 s: a test may do other work meanwhile)."""
        log = self._stack.enter_context(open(self.root / "server.log", "a"))  # noqa: SIM115 (the stack closes it)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers
        self.proc = self._stack.enter_context(
            _proc.started(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        )
        return self.proc

    def start(self, timeout_s: float = 120.0) -> None:
        self.launch()
        self.wait(timeout_s)

    def wait(self, timeout_s: float = 120.0) -> None:
        assert self.proc is not None
        wait_healthy(self.url, self.proc, timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and every process of its group (a crash, not a shutdown)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._stack.close()  # reaps the rest (started() kills whatever is left)
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A stage's commands: each started in a session of its own with its output appended to
``logs/<stage>.log``, and killed with all its descendants (submitit's tasks included) when the
time budget runs out."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from bench.gpucheck.common import ROOT
from bench.gpucheck.runner import Budget, StageError
from launch import proctree


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, its process group and all its descendants (submitit's tasks included)."""
    tree = proctree.tree(proc.pid)  # listed before anything is killed: orphans lose their ancestry
    # Started with start_new_session: its group id is its pid. No SIGTERM first: a crash, not a stop.
    proctree.end(tree, group=proc.pid, grace_s=0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of the file at ``path`` ('' when it cannot be read)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-chars:].decode(errors="replace")


class Shell:
    """Runs a stage's commands: output appended to ``logs/<stage>.log``, killed at the budget's end."""

    def __init__(self, budget: Budget, logs: Path, env: dict[str, str] | None = None):
        self.budget = budget
        self.logs = logs
        self.env = env or dict(os.environ)
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        path = self.logs / f"{log}.log"
        with open(path, "ab") as f:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
            f.flush()
            return subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def run(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> str:
        """Run to completion within the budget; returns the log's tail; StageError otherwise."""
        path = self.logs / f"{log}.log"
        timeout = max(1.0, self.budget.remaining())
        proc = self.start(cmd, log, env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise StageError(
                f"killed at the time budget after {timeout:.0f} s: {' '.join(cmd)}", tail(path)
            ) from None
        except BaseException:
            kill_tree(proc)
            raise
        if rc != 0:
            raise StageError(f"exit status {rc}: {' '.join(cmd)}", tail(path))
        return tail(path)

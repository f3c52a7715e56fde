"""Process hygiene for the tests: start helpers in their own session, and end everything they started.

Every process started through :func:`run` carries a unique ``MEMDLM_TEST_PROC`` value in its
environment, and every process started during a pytest session carries that session's
``MEMDLM_TEST_SESSION`` value (set by ``tests/conftest.py``). Environments are inherited, so the
tag follows a process into a new session and past its parent's death (torchrun starts each worker
in its own session; a killed parent's children are re-parented to init): reading
``/proc/<pid>/environ`` finds them where ancestry and process groups do not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import proctree

PROC_TAG = "MEMDLM_TEST_PROC"
SESSION_TAG = "MEMDLM_TEST_SESSION"


@dataclass(frozen=True)
class Proc:
    """One live process as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (ppid {self.ppid}, pgid {self.pgid}): {self.cmdline}"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return None


def processes() -> dict[int, Proc]:
    """Every live process (zombies excluded: they hold no CPU and their parent reaps them)."""
    out = {}
    for pid, stat in proctree.stats().items():
        cmdline = (_read(f"/proc/{pid}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace")
        out[pid] = Proc(pid, stat.ppid, stat.pgid, stat.sid, cmdline.strip())
    return out


def has_env(pid: int, key: str, value: str) -> bool:
    """Whether ``key=value`` is in the environment ``pid`` started with."""
    env = _read(f"/proc/{pid}/environ")
    return env is not None and f"{key}={value}".encode() in env.split(b"\0")


def tagged(key: str, value: str) -> list[Proc]:
    """Live processes (other than this one) whose environment holds ``key=value``."""
    me = os.getpid()
    return [p for p in processes().values() if p.pid != me and has_env(p.pid, key, value)]


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    """Live processes whose parent chain leads to ``root`` (not ``root`` itself)."""
    table = processes() if table is None else table
    tree = proctree.tree(root, {pid: p.ppid for pid, p in table.items()})
    return [p for pid, p in table.items() if pid in tree and pid != root]


def kill_tagged(value: str, group: int | None = None, grace_s: float = 5.0) -> None:
    """End every process tagged ``PROC_TAG=value`` and the process group ``group``: SIGTERM once
    (a process shutting its own workers down is not interrupted again), up to ``grace_s`` to exit,
    then SIGKILL until none is left (launch/proctree.py)."""
    left = proctree.end(lambda: {p.pid for p in tagged(PROC_TAG, value)}, group=group, grace_s=grace_s)
    if left:
        table = processes()
        survivors = [table[pid] for pid in sorted(left) if pid in table]
        raise RuntimeError(f"processes tagged {PROC_TAG}={value} survived SIGKILL: {survivors}")


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    grace_s: float = 5.0,
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` that leaves nothing behind.

    The command starts in a new session (its own process group) with a unique ``PROC_TAG``. On
    timeout, error or KeyboardInterrupt the whole group and every tagged process get SIGTERM, then
    SIGKILL, and the exception is re-raised (``TimeoutExpired`` carries the output captured so far).
    Tagged processes still alive after a normal exit (daemonised grandchildren) are ended too.
    Output goes to files, not pipes: a grandchild holding a pipe open would make reading it wait
    past the command's own exit.
    """
    tag = uuid.uuid4().hex
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(cmd),
            env={**(os.environ if env is None else env), PROC_TAG: tag},
            cwd=cwd,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )

        def captured() -> list[str]:
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
            return texts

        try:
            proc.wait(timeout=timeout)
        except BaseException as exc:
            kill_tagged(tag, group=proc.pid, grace_s=grace_s)
            proc.wait()  # reaped: no zombie left for the session guard
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(proc.args, timeout, *captured()) from None
            raise
        kill_tagged(tag, group=proc.pid, grace_s=grace_s)
        return subprocess.CompletedProcess(proc.args, proc.returncode, *captured())


@contextlib.contextmanager
def started(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, grace_s: float = 5.0, **popen: Any
) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen`` for a process a test keeps running (a server) while in the block.

    It starts in a new session with a unique ``PROC_TAG``; leaving the block (normally or not)
    ends it, its process group and everything it started (SIGTERM, then SIGKILL). Terminating the
    top process alone leaves its helpers running (``mlflow server`` leaves its job consumers)."""
    tag = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), PROC_TAG: tag}
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        kill_tagged(tag, group=proc.pid, grace_s=grace_s)
        proc.wait()


def leftovers(session: str, root: int, wait_s: float = 5.0) -> list[Proc]:
    """Processes started during this pytest session (tagged ``SESSION_TAG=session``, or descended
    from ``root``) that are still alive after up to ``wait_s`` for them to finish exiting."""
    deadline = time.monotonic() + wait_s
    while True:
        table = processes()
        left = {p.pid: p for p in descendants(root, table)}
        left.update(
            {p.pid: p for p in table.values() if p.pid != root and has_env(p.pid, SESSION_TAG, session)}
        )
        left = {pid: p for pid, p in left.items() if not _exits_with_parent(p)}
        if not left or time.monotonic() > deadline:
            return sorted(left.values(), key=lambda p: p.pid)
        time.sleep(0.2)


def _exits_with_parent(proc: Proc) -> bool:
    # multiprocessing's helper processes live as long as the interpreter that started them and
    # end with it (they watch a pipe to it): not leaks.
    return "from multiprocessing." in proc.cmdline and "import main" in proc.cmdline


def end(procs: Sequence[Proc], grace_s: float = 2.0) -> None:
    """SIGTERM ``procs``, then SIGKILL those still alive after ``grace_s``."""
    proctree.end({p.pid for p in procs}, grace_s=grace_s)

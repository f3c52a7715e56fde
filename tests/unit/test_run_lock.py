"""The run-directory lock (pipeline/run_lock.py) against real processes holding it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run_lock import LOCK_NAME, RunLocked, RunLockWarning, acquire, check_free, lock_path
from tests import _proc

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

HOLD = "import sys, time; from pipeline.run_lock import acquire; acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
# Locks the file the kernel's way but records whatever holder it is given (a dead PID, another host).
HOLD_AS = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, sys.argv[2].encode()); print('locked', flush=True); "
    "time.sleep(600)"
)


def _wait_locked(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == b"locked"


def _takes_it(run_dir: Path) -> subprocess.CompletedProcess:
    """Another process trying to take the lock (and releasing it at once)."""
    code = "import sys; from pipeline.run_lock import acquire; acquire(sys.argv[1]).release()"
    return _proc.run([sys.executable, "-c", code, str(run_dir)], timeout=60, env=ENV)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_is_refused_naming_the_lock_file_host_and_pid(tmp_path):
    run = tmp_path / "run"
    with _proc.started([sys.executable, "-c", HOLD, str(run)], env=ENV, stdout=subprocess.PIPE) as holder:
        _wait_locked(holder)
        expected = rf"{run / LOCK_NAME}: .*in use by another trainer \(host {socket.gethostname()}, PID {holder.pid}, since "
        with pytest.raises(RunLocked, match=expected):
            acquire(run)
        with pytest.raises(RunLocked, match=expected):
            check_free(run)


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning_naming_it(tmp_path):
    run = tmp_path / "run"
    with _proc.started([sys.executable, "-c", HOLD, str(run)], env=ENV, stdout=subprocess.PIPE) as holder:
        _wait_locked(holder)
        old = holder.pid
        holder.kill()  # kill -9: no clean-up, the file stays
        holder.wait()
    assert json.loads(lock_path(run).read_text())["pid"] == old
    check_free(run)  # a launcher may go ahead
    with pytest.warns(RunLockWarning, match=rf"left by a run that is gone \(host .*, PID {old}, "):
        lock = acquire(run)
    assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path(run).exists()


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    run = tmp_path / "run"
    # the holder forks a child (as a DataLoader worker is forked) that outlives it
    code = HOLD.replace("print(", "os.fork() or time.sleep(600); print(").replace(
        "import sys", "import os, sys"
    )
    with _proc.started([sys.executable, "-c", code, str(run)], env=ENV, stdout=subprocess.PIPE) as holder:
        _wait_locked(holder)
        holder.kill()
        holder.wait()
        with pytest.warns(RunLockWarning, match=rf"left by a run that is gone \(host .*, PID {holder.pid}, "):
            acquire(run, wait_s=0).release()


def test_release_deletes_the_file_and_lets_another_process_take_it(tmp_path):
    run = tmp_path / "run"
    check_free(run)  # no run directory yet: free, and nothing is created
    assert not run.exists()
    lock = acquire(run)
    assert _takes_it(run).returncode == 1
    lock.release()
    lock.release()  # idempotent
    assert not lock_path(run).exists()
    assert _takes_it(run).returncode == 0


def test_holds_in_one_process_are_counted(tmp_path):
    run = tmp_path / "run"
    first, second = acquire(run), acquire(run)
    first.release()
    refused = _takes_it(run)
    assert refused.returncode == 1 and f"PID {os.getpid()}" in refused.stderr
    second.release()
    assert _takes_it(run).returncode == 0


def test_a_lock_held_past_its_dead_holder_is_replaced_after_the_wait(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    me = json.loads(_record_of_this_process(tmp_path))
    record = json.dumps({**me, "pid": _dead_pid(), "start_ticks": -1})
    cmd = [sys.executable, "-c", HOLD_AS, str(lock_path(run)), record]
    with _proc.started(cmd, env=ENV, stdout=subprocess.PIPE) as stuck:
        _wait_locked(stuck)
        check_free(run)
        t0 = time.monotonic()
        with pytest.warns(RunLockWarning, match=r"is gone but the lock was still held"):
            lock = acquire(run, wait_s=0.5)
        assert time.monotonic() - t0 >= 0.5  # a new holder gets time to record itself first
        assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
        assert _takes_it(run).returncode == 1  # the replacement is really locked
        lock.release()


@pytest.mark.parametrize(("job", "taken"), [("77", True), ("78", False)])
def test_a_requeued_slurm_job_takes_over_its_earlier_start_on_another_node(tmp_path, monkeypatch, job, taken):
    run = tmp_path / "run"
    run.mkdir()
    record = json.dumps({"host": "node-b", "pid": 4242, "slurm_job_id": "77", "slurm_restart": 0})
    cmd = [sys.executable, "-c", HOLD_AS, str(lock_path(run)), record]
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with _proc.started(cmd, env=ENV, stdout=subprocess.PIPE) as stuck:
        _wait_locked(stuck)
        if taken:
            with pytest.warns(
                RunLockWarning, match=r"\(host node-b, PID 4242, Slurm job 77 \(restart 0\)\) is gone"
            ):
                acquire(run, wait_s=0.2).release()
        else:
            with pytest.raises(
                RunLocked, match=r"in use by another trainer \(host node-b, PID 4242, Slurm job 77"
            ):
                acquire(run, wait_s=0.2)


def _record_of_this_process(tmp_path: Path) -> str:
    with acquire(tmp_path / "probe") as lock:
        return lock.path.read_text()

"""Process hygiene: helpers that start processes end all of them on timeout or failure.

Each test starts processes shaped like the ones that leaked (a child that spawns a grandchild in
a session of its own, as torchrun does with its workers), records their pids, and then checks
/proc that none of them is alive.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.clusters import ClusterConfig
from launch.submit import make_executor, wait_for
from tests import _proc

# Writes its pid, starts a sleeper in its own process group and one in a new session (out of reach
# of a killpg on the parent's group), writes their pids, then sleeps; or exits if told to.
SPAWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    out, then = sys.argv[1], sys.argv[2]
    same = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    with open(out + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {same.pid} {own.pid}")
    os.rename(out + ".tmp", out)
    print("started", flush=True)
    if then == "sleep":
        time.sleep(3600)
    """
)


def _pids(path: Path, wait_s: float = 60) -> list[int]:
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return [int(x) for x in path.read_text().split()]


def _alive(pids: list[int]) -> list[_proc.Proc]:
    table = _proc.processes()
    return [table[pid] for pid in pids if pid in table]


@pytest.mark.slow
def test_run_kills_the_whole_tree_on_timeout_and_reraises_with_the_output(tmp_path):
    pids = tmp_path / "pids"
    with pytest.raises(subprocess.TimeoutExpired) as err:
        _proc.run([sys.executable, "-c", SPAWNER, str(pids), "sleep"], timeout=5, grace_s=1)
    assert "started" in err.value.stdout  # what it printed before the timeout comes back
    root, same, own = _pids(pids, wait_s=0)
    assert _alive([root, same, own]) == []
    groups = {root, own}  # the helper's process group and the worker's own session
    assert [p for p in _proc.processes().values() if p.pgid in groups] == []


def test_run_ends_what_a_finished_command_left_running(tmp_path):
    pids = tmp_path / "pids"
    proc = _proc.run([sys.executable, "-c", SPAWNER, str(pids), "exit"], timeout=60, grace_s=1)
    assert proc.returncode == 0 and "started" in proc.stdout
    assert _alive(_pids(pids, wait_s=0)) == []


def test_started_server_is_ended_with_everything_it_started_when_the_block_ends(tmp_path):
    pids = tmp_path / "pids"
    with _proc.started([sys.executable, "-c", SPAWNER, str(pids), "sleep"], grace_s=1) as server:
        started = _pids(pids)
        assert len(_alive(started)) == 3 and server.poll() is None
    assert _alive(started) == []


def test_session_guard_finds_an_orphan_that_left_the_process_tree(tmp_path):
    # The spawner exits at once: its new-session sleeper is re-parented away from pytest, found
    # only by the session tag it inherited.
    pids = tmp_path / "pids"
    subprocess.run([sys.executable, "-c", SPAWNER, str(pids), "exit"], check=True, timeout=60)
    _, same, own = _pids(pids, wait_s=0)
    session = os.environ[_proc.SESSION_TAG]
    try:
        table = _proc.processes()
        assert table[own].ppid != os.getpid()
        assert own not in {p.pid for p in _proc.descendants(os.getpid(), table)}
        left = {p.pid for p in _proc.leftovers(session, os.getpid(), wait_s=0)}
        assert {same, own} <= left
    finally:
        _proc.end(_alive([same, own]))
    assert _alive([same, own]) == []


def spawn_and_sleep(out_dir: str) -> None:
    """A local submitit task that starts a child in a session of its own, then sleeps."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    rank = os.environ["SUBMITIT_LOCAL_GLOBALID"]
    Path(out_dir, f"{rank}.tmp").write_text(f"{os.getppid()} {os.getpid()} {child.pid}")
    os.rename(Path(out_dir, f"{rank}.tmp"), Path(out_dir, rank))
    time.sleep(3600)


@pytest.mark.slow
def test_an_abandoned_local_job_is_stopped_with_its_tasks_and_their_children(tmp_path):
    cluster = ClusterConfig(executor="local", tasks_per_node=2, time_min=5)
    job = make_executor(cluster, tmp_path / "submitit").submit(spawn_and_sleep, str(tmp_path))
    pids = [pid for rank in ("0", "1") for pid in _pids(tmp_path / rank)]
    assert int(job.job_id) in pids  # the controller, the parent of both tasks
    with pytest.raises(TimeoutError, match=f"job {job.job_id} still running"):
        wait_for(job, local=True, timeout_s=0.5)
    assert job.done()
    assert _alive(pids) == []

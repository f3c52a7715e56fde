"""launch/proctree.py: a process tree is listed across sessions, and ``end`` sends SIGTERM once,
waits the grace period, then SIGKILLs; with no grace it kills at once, without SIGTERM."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from launch import proctree
from tests import _proc

# Records each SIGTERM it gets (one line per signal) and keeps running; with "spawn", first starts
# a sleeper in a session of its own (outside its process group). Writes "<its pid> [<sleeper pid>]"
# to the ready file once its handler is installed.
STUBBORN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    log, ready, spawn = sys.argv[1], sys.argv[2], sys.argv[3] == "spawn"
    def on_term(signum, frame):
        with open(log, "a") as f:
            f.write("TERM\\n")
    signal.signal(signal.SIGTERM, on_term)
    pids = [os.getpid()]
    if spawn:
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                     start_new_session=True).pid)
    with open(ready + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.rename(ready + ".tmp", ready)
    while True:
        time.sleep(0.05)
    """
)


def _ready(path: Path, wait_s: float = 30) -> list[int]:
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)
    return [int(x) for x in path.read_text().split()]


def _terms(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_end_sends_sigterm_once_then_sigkill_after_the_grace(tmp_path):
    log, ready = tmp_path / "log", tmp_path / "ready"
    with _proc.started([sys.executable, "-c", STUBBORN, str(log), str(ready), "alone"]):
        (pid,) = _ready(ready)
        t0 = time.monotonic()
        left = proctree.end({pid}, grace_s=1.0)
        elapsed = time.monotonic() - t0
        assert left == set()
        assert pid not in proctree.live_parents()
    assert _terms(log) == 1  # a process shutting down is not interrupted again
    assert elapsed >= 1.0  # the grace period was given before SIGKILL


def test_end_without_grace_kills_at_once_without_sigterm(tmp_path):
    log, ready = tmp_path / "log", tmp_path / "ready"
    with _proc.started([sys.executable, "-c", STUBBORN, str(log), str(ready), "alone"]):
        (pid,) = _ready(ready)
        assert proctree.end({pid}, grace_s=0) == set()
        assert pid not in proctree.live_parents()
    assert _terms(log) == 0  # a crash, not a stop: no chance to save anything


def test_tree_lists_a_child_in_its_own_session_and_end_stops_the_tree(tmp_path):
    log, ready = tmp_path / "log", tmp_path / "ready"
    with _proc.started([sys.executable, "-c", STUBBORN, str(log), str(ready), "spawn"]) as top:
        pid, sleeper = _ready(ready)
        assert pid == top.pid
        stats = proctree.stats()
        assert stats[sleeper].sid == sleeper != stats[pid].sid  # out of reach of a killpg on `top`
        tree = proctree.tree(pid)
        assert tree == {pid, sleeper}
        assert proctree.end(tree, grace_s=0.5) == set()
        assert not {pid, sleeper} & proctree.live_parents().keys()
    assert _terms(log) == 1


def test_end_reaches_a_group_member_that_the_listing_does_not_name(tmp_path):
    log, ready = tmp_path / "log", tmp_path / "ready"
    with _proc.started([sys.executable, "-c", STUBBORN, str(log), str(ready), "alone"]) as top:
        (pid,) = _ready(ready)
        # Nothing listed by the callable: the group's live member is found through the group.
        assert proctree.end(lambda: set(), group=top.pid, grace_s=0) == set()
        assert pid not in proctree.live_parents()

"""Process trees from /proc: list a process and its live descendants, and end a set of processes
(SIGTERM once, a grace period to exit, then SIGKILL until none is left).

Used by the local launcher (``launch/submit.py``: a stopped job's controller, tasks and their
children), the GPU check (``bench/gpucheck/shell.py``: a command past the time budget) and the
tests' process hygiene (``tests/_proc.py``). Linux only: where there is no /proc every listing is
empty. Standard library only: the GPU check imports it on a bare machine's Python before any
package is installed.

Zombies are never listed: they are dead already, only not yet reaped by their parent, and no
signal changes that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_POLL_S = 0.1


@dataclass(frozen=True)
class ProcStat:
    """One live process's identity fields from ``/proc/<pid>/stat``."""

    pid: int
    ppid: int
    pgid: int
    sid: int


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile, or not ours to read
        return None


def stats() -> dict[int, ProcStat]:
    """pid -> :class:`ProcStat` of every live process (zombies excluded; empty without /proc)."""
    out: dict[int, ProcStat] = {}
    try:
        entries = os.scandir("/proc")
    except OSError:
        return out
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            stat = _read(f"/proc/{entry.name}/stat")
            try:
                # The command name (field 2) may hold spaces and parentheses; the fields after it may not.
                fields = stat[stat.rindex(b")") + 2 :].split() if stat is not None else []
                if fields and fields[0] not in (b"Z", b"X"):
                    pid = int(entry.name)
                    out[pid] = ProcStat(pid, int(fields[1]), int(fields[2]), int(fields[3]))
            except (ValueError, IndexError):  # a truncated read of a process that is exiting
                continue
    return out


def live_parents() -> dict[int, int]:
    """pid -> parent pid of every live process (zombies excluded; empty without /proc)."""
    return {pid: s.ppid for pid, s in stats().items()}


def tree(root: int, parents: dict[int, int] | None = None) -> set[int]:
    """``root`` and every live descendant of it (``parents``: a :func:`live_parents` listing).

    List a tree before killing any of it: a process whose parent died is re-parented (to init or
    a subreaper) and is no longer found through ancestry."""
    parents = live_parents() if parents is None else parents
    found = {root} & parents.keys()
    while more := {pid for pid, ppid in parents.items() if ppid in found} - found:
        found |= more
    return found


def send(pid: int, sig: int, group: bool = False) -> None:
    """Send ``sig`` to process ``pid`` (to process group ``pid`` if ``group``); a process that is
    gone, or not ours, is skipped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _signal_round(left: set[int], sig: int, group: int | None, sent: set[int | None]) -> None:
    """One round of ``sig``: SIGTERM reaches each process (and the group) once, so that a process
    shutting its own workers down is not interrupted again; SIGKILL is sent every round."""
    if group is not None and (sig == signal.SIGKILL or group not in sent):
        send(group, sig, group=True)
        sent.add(group)
    for pid in sorted(left):  # one by one too: children in sessions of their own are outside `group`
        if sig == signal.SIGKILL or pid not in sent:
            send(pid, sig)
            sent.add(pid)


def end(
    pids: Iterable[int] | Callable[[], Iterable[int]],
    *,
    group: int | None = None,
    grace_s: float = 5.0,
    kill_s: float = 5.0,
) -> set[int]:
    """End processes: SIGTERM once, up to ``grace_s`` for them to exit, then SIGKILL every 0.1 s
    until none is left or ``kill_s`` passed. Returns the pids still alive after that (empty when
    all are gone).

    ``pids``: a set of pids (those alive are signalled), or a callable that lists them afresh
    each round (processes that appear meanwhile are ended too). ``group``: a process group to
    signal as well, while any of its members or of ``pids`` is alive (never this process's own
    group). ``grace_s <= 0`` sends SIGKILL at once, without SIGTERM: a crash, not a stop."""
    if group == os.getpgrp():
        group = None
    fixed = set() if callable(pids) else set(pids)

    def listing() -> set[int]:
        table = stats()
        listed = set(pids()) if callable(pids) else fixed & table.keys()
        return listed | {p for p, s in table.items() if group is not None and s.pgid == group}

    phases = ([(signal.SIGTERM, grace_s)] if grace_s > 0 else []) + [(signal.SIGKILL, kill_s)]
    for sig, wait_s in phases:
        deadline, sent = time.monotonic() + wait_s, set()
        while left := listing():
            _signal_round(left, sig, group, sent)
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        else:
            return set()
    return listing()

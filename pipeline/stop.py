"""The stop protocol: a scheduler's signal becomes a checkpoint at the next step boundary.

    stop = StopSignal()
    signal.signal(signal.SIGUSR2, stop.handler)      # launch/submit.py, in every task
    Trainer(cfg, stop=stop).run()                    # raises StoppedForRequeue after saving

Each rank only records the signal; at every step boundary all ranks agree on it with one
all-reduce (a MAX of the flag), so they save the same step together and stop.

A direct ``python -m pipeline.train`` installs :func:`stop_on_signals` (SIGUSR2, SIGTERM) itself.
Under torchrun each worker also runs :func:`watch_parent`: if the agent dies (``kill -9`` of
torchrun) its workers would otherwise train on, unsupervised; they stop the same way, and exit
regardless once a grace period (``MEMDLM_ORPHAN_GRACE_S``, default 300 s) has passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

STOPPED_EXIT = 3  # pipeline.train's exit status after a requested stop (checkpoint saved)
ORPHANED_EXIT = 4  # a torchrun worker whose agent died and that could not stop within the grace period
ORPHAN_GRACE_ENV = "MEMDLM_ORPHAN_GRACE_S"
ORPHAN_GRACE_S = 300.0  # a checkpoint of a large model takes minutes
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StoppedForRequeue(RuntimeError):
    """The run saved a checkpoint because a stop was requested (a scheduler's time-out signal)."""


class StopSignal:
    """A stop request from a signal handler (or a test), read at step boundaries."""

    def __init__(self) -> None:
        self.signum = 0
        self.reason = ""

    def request(self, signum: int = 15, reason: str = "") -> None:
        self.signum = int(signum)
        self.reason = reason or self.reason

    def handler(self, signum: int, frame: object) -> None:
        """For ``signal.signal``: records the signal, nothing else (safe at any point of a step)."""
        self.request(signum)

    def why(self) -> str:
        """`` (<what asked>)`` for messages: the reason given, else the signal's name; '' if unknown."""
        if self.reason:
            return f" ({self.reason})"
        try:
            return f" ({signal.Signals(self.signum).name})" if self.signum else ""
        except ValueError:
            return ""

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank was asked to stop (the flag lives on the training device)."""
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


@contextlib.contextmanager
def stop_on_signals(stop: StopSignal, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """``signals`` request ``stop`` while in the block; the previous handlers come back after it.

    Outside the main thread (where Python allows no handler) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop.handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun's elastic agent started."""
    return any(key in os.environ for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"))


def orphan_grace_s() -> float:
    """Seconds an orphaned worker has to stop by itself (``MEMDLM_ORPHAN_GRACE_S``)."""
    raw = os.environ.get(ORPHAN_GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else ORPHAN_GRACE_S
    except ValueError:
        value = ORPHAN_GRACE_S
    return value if value > 0 else ORPHAN_GRACE_S


@contextlib.contextmanager
def watch_parent(
    stop: StopSignal, grace_s: float | None = None, interval_s: float = 0.5
) -> Iterator[threading.Thread]:
    """While in the block, a daemon thread watches this process's parent (the torchrun agent).

    When it dies (this process is re-parented): ``stop`` is requested, so the run saves a
    checkpoint at the next step boundary and ends; if the process is still alive ``grace_s``
    later (a hang, a peer that died with the agent) it exits at once with ORPHANED_EXIT."""
    grace = orphan_grace_s() if grace_s is None else grace_s
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(interval_s):
            if os.getppid() == parent:
                continue
            print(
                f"warning: the parent process (PID {parent}, the torchrun agent) died: stopping at the next "
                f"step boundary with a checkpoint; exiting regardless in {grace:g} s",
                file=sys.stderr,
                flush=True,
            )
            stop.request(signal.SIGHUP, f"the torchrun agent, PID {parent}, died")
            if not done.wait(grace):
                print(
                    f"error: no clean stop within {grace:g} s of the torchrun agent's death: exiting now",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(ORPHANED_EXIT)
            return

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        done.set()

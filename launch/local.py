"""N training processes on this machine, listening on loopback only (a local ``torchrun``).

    python -m launch.local --nproc 2 --config configs/train/local.yaml parallel.tp=2

Every argument after launch.local's own (``--nproc``, ``--grace-s``, ``--module``) goes to
``python -m pipeline.train``. Each process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, so rank 0's rendezvous store and gloo's sockets
(pipeline/parallel/dims.py ``init_distributed``) listen on 127.0.0.1 only; torchrun's own store
listens on every interface.

Stopping: SIGINT (Ctrl-C), SIGTERM or SIGHUP here sends SIGTERM to every process (pipeline.train
saves a checkpoint at the next step boundary and exits); those still running ``--grace-s`` later,
or at a second Ctrl-C, are killed. The processes run in sessions of their own, so a terminal's
signals reach them only this way, once; if this launcher is killed outright, the kernel sends
each of them SIGTERM (``PR_SET_PDEATHSIG``, Linux). When one process fails, the others are
stopped the same way. Exit status: the first failing process's (128 + N for a signal N), or
128 + N when this launcher was stopped by signal N, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from launch.submit import LauncherSignals, say
from pipeline.cli import print_error, run_main
from pipeline.config import ConfigError
from pipeline.parallel.rendezvous import drop_chosen_interface

LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Variables of an enclosing torchrun (or elastic agent) that would point the processes elsewhere.
_INHERITED = ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a pipeline.train option must never be taken for one of ours
    )
    parser.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    parser.add_argument(
        "--grace-s",
        type=float,
        default=120.0,
        help="seconds the processes get to save a checkpoint and exit once stopped (default: %(default)s)",
    )
    parser.add_argument("--module", default="pipeline.train", help="module each process runs (%(default)s)")
    return parser


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on at ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of rank ``rank`` of a ``world``-process run on this machine."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _INHERITED}
    env.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    # N processes share the cores: one thread pool each of cores/N (as launch/submit.py's tasks).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return env


def _die_with_launcher(launcher: int) -> None:
    """Runs in each child before exec: SIGTERM when the launcher dies (Linux), even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != launcher:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def start(cmd: Sequence[str], nproc: int) -> list[subprocess.Popen]:
    """Start ``cmd`` as ranks 0..nproc-1 of one world, each in a session of its own."""
    port, me = free_port(), os.getpid()
    return [
        subprocess.Popen(
            list(cmd),
            env=worker_env(rank, nproc, port),
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only, which forwards it
            preexec_fn=functools.partial(_die_with_launcher, me),
        )
        for rank in range(nproc)
    ]


def _status(code: int) -> int:
    """An exit status as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def supervise(procs: list[subprocess.Popen], grace_s: float, signals: LauncherSignals) -> int:
    """Wait for every process; stop them all (SIGTERM, SIGKILL after ``grace_s`` or a second
    Ctrl-C) at the first failure or stop signal. Returns the exit status (module docstring)."""
    failure: int | None = None
    stop_at: float | None = None  # when the SIGTERM went out
    interrupts = 0
    while True:
        codes = [p.poll() for p in procs]  # once for all: a rank exiting meanwhile is seen next time
        if stop_at is None:
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                failure = _status(failed[1])
                print_error(f"rank {failed[0]} exited with status {failure}: stopping the other processes")
            elif signals.received:
                say(
                    f"{signal.Signals(signals.received[0]).name}: stopping every process (each saves a "
                    f"checkpoint at its next step; killed after {grace_s:g} s or at a second Ctrl-C)"
                )
            if failure is not None or signals.received:
                interrupts = signals.received.count(signal.SIGINT)
                _signal_all(procs, signal.SIGTERM)
                stop_at = time.monotonic()
        elif time.monotonic() - stop_at > grace_s or signals.received.count(signal.SIGINT) > interrupts:
            _signal_all(procs, signal.SIGKILL)
        if all(c is not None for c in codes):
            break
        time.sleep(0.1)
    if failure is not None:
        return failure
    return 128 + signals.received[0] if signals.received else 0


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: got {args.nproc}, expected >= 1")
    if args.grace_s < 0:
        raise ConfigError(f"--grace-s: got {args.grace_s:g}, expected >= 0")
    drop_chosen_interface()  # an interface chosen for another world is not this one's
    with LauncherSignals() as signals:
        procs = start([sys.executable, "-m", args.module, *rest], args.nproc)
        try:
            return supervise(procs, args.grace_s, signals)
        finally:
            _signal_all(procs, signal.SIGKILL)  # only an error of ours gets here with one alive
            for proc in procs:
                proc.wait()


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=(ConfigError,)))

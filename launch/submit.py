"""Submit a training job through submitit: LocalExecutor on this machine, Slurm on a cluster.

Each task sets up torch.distributed from submitit's JobEnvironment (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK) and runs ``pipeline.train``. The task is ``Checkpointable``: when Slurm
preempts it or its time runs out, submitit requeues it and the new allocation resumes from the
run's newest checkpoint (``checkpoint.every`` bounds the steps lost).

Where submitit 1.5.4 has no public API for what this module needs, the private entry point is
reached only through ``_submitit_private`` (one place, a clear error naming the installed version);
``tests/unit/test_submitit_api.py`` exercises each of them on the installed submitit.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit
import torch

import pipeline.train as train
from launch import proctree
from launch.clusters import ClusterConfig
from pipeline.parallel.rendezvous import drop_chosen_interface
from pipeline.stop import STOPPED_EXIT, StopSignal

# Signals that mean "stop the run" rather than "requeue it": kill/timeout/scancel (SIGTERM), Ctrl-C
# (SIGINT), a closed terminal (SIGHUP). A local launcher starts its job with SIGINT and SIGHUP
# blocked, so that a terminal's signals reach the tasks only through their own handlers (submitit's
# controller would kill its tasks 1 s after a SIGINT); each task unblocks them once it handles them.
QUIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SHIELDED = {signal.SIGINT, signal.SIGHUP}


class TrainTask(submitit.helpers.Checkpointable):
    """One task of the job: ``python -m pipeline.train <args>`` with the job's distributed env.

    ``launcher`` (local jobs): ``"<pid>:<start time>"`` of the launching process; when it is gone
    (even SIGKILLed), the task saves a checkpoint at the next step boundary and exits."""

    def __call__(self, train_args: list[str], threads: int, launcher: str | None = None) -> int:
        env = submitit.JobEnvironment()
        stop, requeue, quit_signals = _install_stop_handlers()
        if launcher:
            _watch_launcher(
                launcher, lambda: _quit(stop, quit_signals, signal.SIGTERM, "the launcher is gone")
            )
        # Local tasks inherit the submitting process's environment; a torch.distributed setting
        # left there would point every task at another world. The job's environment decides.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        drop_chosen_interface()  # an interface picked for the submitting process's own world
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")

        torch.set_num_threads(threads)

        print(f"task {env.global_rank}/{env.num_tasks} on {env.hostname} (job {env.job_id})", flush=True)
        rc = train.main(train_args, stop=stop)
        if rc == STOPPED_EXIT:
            if reason := _quit_reason(stop, quit_signals):  # the checkpoint is saved; no requeue
                print(f"stopped by {reason}: not requeued", flush=True)
                return rc
            if env.global_rank == 0:
                requeue(stop.signum, None)  # checkpoint() + requeue + exit
            deadline = time.monotonic() + 300  # the other ranks wait for the requeue to end them
            while not quit_signals and time.monotonic() < deadline:
                time.sleep(0.5)
            return rc
        if rc != 0:
            raise RuntimeError(f"training exited with status {rc} on rank {env.global_rank}")
        return rc

    def checkpoint(
        self, train_args: list[str], threads: int, launcher: str | None = None
    ) -> submitit.helpers.DelayedSubmission:
        # Requeue the same task; pipeline.train resumes from the newest checkpoint by itself.
        return submitit.helpers.DelayedSubmission(TrainTask(), train_args, threads, launcher)


def _quit(stop: StopSignal, received: list[int], signum: int, why: str = "") -> None:
    """A request to stop the run: saved at the next step boundary, then the task exits (no requeue)."""
    if not received and why:
        print(f"{why}: saving a checkpoint at the next step boundary, then stopping", flush=True)
    received.append(signum)
    stop.request(signum)


def _quit_reason(stop: StopSignal, quit_signals: list[int], wait_s: float = 10.0) -> str | None:
    """After an agreed stop: why this task was asked to quit (a signal's name), or None when it
    was preempted (requeue).

    The ranks agree on *whether* to stop, not why; a rank that stopped because another one was
    signalled waits up to ``wait_s`` for its own signal (every task of a job gets it: the
    controller or Slurm signals all of them, and each watches its launcher), so a stop request
    never becomes a requeue on one rank and a quit on another. No signal at all: a quit."""
    deadline = time.monotonic() + wait_s
    while stop.signum == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if quit_signals:
        return signal.Signals(quit_signals[0]).name
    return None if stop.signum == preempt_signal() else "a stop of another rank"


def _install_stop_handlers() -> tuple[StopSignal, Any, list[int]]:
    """Every signal becomes a flag the training loop reads at its next step boundary.

    Slurm's time-limit signal (and preemption) reaches every task. submitit's handler would
    requeue at once, mid-step; instead every task only raises a flag, the training loop saves a
    checkpoint at the next step boundary on all ranks together, and then rank 0 hands over to
    submitit's handler (returned: checkpoint() + requeue). The QUIT_SIGNALS (submitit's own
    SIGTERM handler only logs "Bypassing signal SIGTERM") save and stop without a requeue; the
    signals received are recorded in the returned list."""
    sig = preempt_signal()
    submitit_handler = signal.getsignal(sig)
    if not callable(submitit_handler):
        raise RuntimeError(
            f"submitit {submitit.__version__} installed no handler for {sig.name} before running the "
            f"task (1.5.4 does, in JobEnvironment._handle_signals); nothing would requeue the job"
        )
    stop, quit_signals = StopSignal(), []
    signal.signal(sig, stop.handler)
    for quit_sig in QUIT_SIGNALS:
        signal.signal(quit_sig, lambda signum, frame: _quit(stop, quit_signals, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHIELDED)  # blocked by a local launcher
    return stop, submitit_handler, quit_signals


def process_identity(pid: int) -> str | None:
    """``"<pid>:<start time>"`` of a live process (a reused pid has another start time); None
    where /proc cannot tell (not Linux, gone, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return f"{pid}:{int(fields[19])}"  # field 22 of stat: the start time, in clock ticks since boot


def _watch_launcher(launcher: str, on_gone: Any, poll_s: float = 1.0) -> threading.Thread:
    """Call ``on_gone()`` once the process ``launcher`` (:func:`process_identity`) has ended."""

    def watch() -> None:
        while process_identity(int(launcher.split(":")[0])) == launcher:
            time.sleep(poll_s)
        on_gone()

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


SUBMITIT_WRITTEN_FOR = "1.5.4"


def _submitit_private(module: str, name: str) -> Any:
    """``module.name`` from submitit's internals, for what its public API does not offer.

    Raises a RuntimeError naming the installed submitit when the name is gone, rather than an
    AttributeError deep in a launch."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"submitit {submitit.__version__} has no {module}.{name}, which launch/submit.py uses "
            f"(written for submitit {SUBMITIT_WRITTEN_FOR}): pin that version or port launch/submit.py"
        ) from exc


def preempt_signal() -> signal.Signals:
    """The signal submitit treats as "time is up / preempted" (USR2 unless $SUBMITIT_PREEMPT_SIGNAL).

    Public: ``JobEnvironment.USR_SIG`` names it; it is what ``#SBATCH --signal`` asks Slurm to send
    and what submitit installs its checkpoint-and-requeue handler on."""
    name = getattr(submitit.JobEnvironment, "USR_SIG", None)
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise RuntimeError(
            f"submitit {submitit.__version__}: JobEnvironment.USR_SIG is {name!r}, not a signal name "
            f"(submitit {SUBMITIT_WRITTEN_FOR} has 'USR2'; $SUBMITIT_PREEMPT_SIGNAL overrides it)"
        ) from None


def _has_cuda() -> bool:

    return torch.cuda.is_available()


def make_executor(cluster: ClusterConfig, folder: Path) -> submitit.Executor:
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(tasks_per_node=cluster.tasks_per_node, nodes=1, timeout_min=cluster.time_min)
        return ex
    ex = submitit.AutoExecutor(
        folder=str(folder), cluster="slurm", slurm_max_num_timeout=cluster.max_requeues
    )
    ex.update_parameters(**slurm_parameters(cluster))
    return ex


def slurm_parameters(cluster: ClusterConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": cluster.job_name,
        "nodes": cluster.nodes,
        "tasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "timeout_min": cluster.time_min,
        "slurm_partition": cluster.partition,
        "slurm_setup": list(cluster.setup),
        "slurm_additional_parameters": dict(cluster.sbatch_extra),
    }
    if cluster.min_nodes is not None and cluster.min_nodes < cluster.nodes:
        # submitit writes --nodes from an int; an additional parameter of the same name replaces it.
        # With --ntasks-per-node in the request Slurm fixes the task count at min_nodes' and
        # allocates min_nodes even when more are idle (measured on Slurm 22.05); without it, it
        # allocates as many nodes as it can, and srun starts tasks_per_node on each of them.
        params["slurm_additional_parameters"]["nodes"] = f"{cluster.min_nodes}-{cluster.nodes}"
        del params["tasks_per_node"]
        params["slurm_srun_args"] = [f"--ntasks-per-node={cluster.tasks_per_node}"]
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    for key in ("account", "qos", "constraint"):
        if getattr(cluster, key):
            params[f"slurm_{key}"] = getattr(cluster, key)
    if cluster.mem_gb is not None:  # 0: all of the node's memory
        params["mem_gb"] = cluster.mem_gb
    return params


def sbatch_preview(cluster: ClusterConfig, folder: Path) -> str:
    """The sbatch script submitit would submit for this cluster (nothing is submitted).

    submitit's Slurm executor refuses to be built where ``srun`` is missing, and has no public way
    to render its script, so this calls the function it renders with (private) directly, with the
    arguments ``AutoExecutor.update_parameters`` maps ``slurm_parameters`` to; a test compares the
    result with the executor's own script."""
    make_sbatch_string = _submitit_private("submitit.slurm.slurm", "_make_sbatch_string")
    p = slurm_parameters(cluster)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return make_sbatch_string(
        command=command,
        folder=str(folder),
        job_name=p["name"],
        partition=p["slurm_partition"],
        time=p["timeout_min"],
        nodes=p["nodes"],
        ntasks_per_node=p.get("tasks_per_node"),
        cpus_per_task=p["cpus_per_task"],
        gpus_per_node=p.get("gpus_per_node"),
        qos=p.get("slurm_qos"),
        account=p.get("slurm_account"),
        constraint=p.get("slurm_constraint"),
        mem=f"{p['mem_gb']}GB" if "mem_gb" in p else None,  # as submitit converts mem_gb
        setup=p["slurm_setup"],
        additional_parameters=p["slurm_additional_parameters"] or None,
        srun_args=p.get("slurm_srun_args"),
    )


def gone_from_slurm(job: Any) -> bool:
    """A Slurm job (or array task) that left the queue without a result (cancelled, killed, node lost).

    Without Slurm accounting (sacct), submitit 1.5.4 sees such a task as UNKNOWN and never done,
    so the queue itself is asked: a task that squeue no longer lists has ended."""
    if not isinstance(job, submitit.SlurmJob) or job.state not in ("UNKNOWN", "NODE_FAIL"):
        return False
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", job.job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and not out.stdout.strip() and not Path(job.paths.result_pickle).exists()


class Interrupted(KeyboardInterrupt):
    """The launcher was asked to stop (SIGINT, SIGTERM or SIGHUP) while it waited for its job."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LaunchError(Exception):
    """A job cannot be submitted from here (a user error: one ``error:`` line)."""


class JobFailed(RuntimeError):
    """A task of the job failed; the message names its error and where its log is."""


def _failure_summary(job: submitit.Job, exc: BaseException) -> str:
    """``job <id> failed: <the task's last error line>; logs: <folder>`` from submitit's
    FailedJobError, whose text is a whole traceback between two dashed lines."""
    parts = str(exc).split("-" * 22)
    trace = parts[1] if len(parts) > 2 else str(exc)
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return f"job {job.job_id} failed: {lines[-1] if lines else exc}; logs: {Path(job.paths.stdout).parent}"


class LauncherSignals:
    """While a launcher submits and waits: SIGINT, SIGTERM and SIGHUP are recorded, not fatal, and
    read between two polls (:meth:`check`), so a stop request never lands in the middle of a
    submission or a poll. Outside the main thread (no signal handlers there) it does nothing."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> LauncherSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in QUIT_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def check(self) -> None:
        """Raise :class:`Interrupted` for the first stop signal received, if any."""
        if self.received:
            raise Interrupted(self.received[0])


def say(text: str, stream: Any = None) -> None:
    """Print a line, even to a terminal that is gone (a SIGHUP'd launcher still stops its job)."""
    with contextlib.suppress(OSError):
        print(text, file=stream or sys.stdout, flush=True)


class _LogTail:
    """Echoes the rank-0 task's output (stdout, and stderr where the progress bar goes) as it grows."""

    def __init__(self, job: submitit.Job) -> None:
        self.streams = [(Path(job.paths.stdout), sys.stdout), (Path(job.paths.stderr), sys.stderr)]
        self.offsets = [0, 0]

    def pump(self) -> None:
        for i, (path, sink) in enumerate(self.streams):
            if path.is_file():
                with open(path, "rb") as f:
                    f.seek(self.offsets[i])
                    chunk = f.read()
                self.offsets[i] += len(chunk)
                with contextlib.suppress(OSError):  # a closed terminal: the job still has to stop
                    sink.write(chunk.decode(errors="replace"))
                    sink.flush()


def follow(
    job: submitit.Job,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    signals: LauncherSignals | None = None,
    tail: _LogTail | None = None,
) -> None:
    """Echo the rank-0 task's output while the job runs; TimeoutError if it still runs after
    ``timeout_s``, :class:`Interrupted` once ``signals`` received a stop signal."""
    tail = tail or _LogTail(job)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not job.done():
        tail.pump()
        if signals is not None:
            signals.check()
        if gone_from_slurm(job):
            raise RuntimeError(
                f"job {job.job_id} left the Slurm queue without a result (cancelled, or its node was lost); "
                f"logs: {Path(job.paths.stdout).parent}"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still running after {timeout_s} s")
        time.sleep(poll_s)
    tail.pump()


# The job's process tree, from /proc (launch/proctree.py): pid -> parent pid of every live process,
# and a root with its live descendants.
_live_parents = proctree.live_parents
_proc_tree = proctree.tree


def stop_local(job: submitit.Job, grace_s: float = 10.0, known: set[int] | None = None) -> None:
    """Cancel a local job and make sure its controller, its tasks and what they started are gone.

    ``LocalJob.cancel`` only sends SIGINT to the controller process, which interrupts and then
    kills its tasks but not their children; a controller that dies first orphans the tasks. So the
    process tree is listed while the controller lives (orphans are re-parented, lost to ancestry;
    ``known``: processes of the job listed earlier), and what outlives it (or ``grace_s``) gets
    SIGTERM, then SIGKILL."""
    root = int(job.job_id)
    tree = _proc_tree(root, _live_parents()) | (known or set())
    job.cancel()
    deadline = time.monotonic() + grace_s
    while not job.done() and time.monotonic() < deadline:  # done() polls: reaps the controller
        tree |= _proc_tree(root, _live_parents())  # tasks started since the first look
        time.sleep(0.1)
    proctree.end(tree)  # SIGTERM, up to 5 s to exit, then SIGKILL until none is left
    job.done()


def stop_training(job: submitit.Job, grace_s: float, signals: LauncherSignals, tail: _LogTail) -> None:
    """Stop a local training job with a checkpoint first: SIGTERM to its controller, which forwards
    it to the tasks (each saves at its next step boundary, then exits); what still runs after
    ``grace_s`` (or at a second Ctrl-C) is killed, children of the tasks included."""
    root = int(job.job_id)
    tree = _proc_tree(root, _live_parents())
    interrupts = signals.received.count(signal.SIGINT)
    say(
        f"stopping job {job.job_id}: its tasks save a checkpoint at the next step boundary and exit "
        f"(up to {grace_s:g} s; Ctrl-C again to kill them now)"
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(root, signal.SIGTERM)  # submitit's controller forwards SIGTERM to every task
    deadline = time.monotonic() + grace_s
    while not job.done() and time.monotonic() < deadline:
        if signals.received.count(signal.SIGINT) > interrupts:
            say(f"killing job {job.job_id} without a checkpoint")
            break
        tree |= _proc_tree(root, _live_parents())  # orphans stay listed: they keep their pid
        tail.pump()
        time.sleep(0.2)
    else:
        if not job.done():
            say(f"job {job.job_id} did not stop within {grace_s:g} s (stop_grace_s): killing it")
    tail.pump()
    stop_local(job, grace_s=0, known=tree)


def wait_for(job: submitit.Job, local: bool, timeout_s: float | None = None) -> list[Any]:
    """Follow the job to its end and return every task's result (raises if one failed).

    A ``local`` job is stopped, every task and its children, when waiting ends early: Ctrl-C, an
    error, or ``timeout_s`` passed (TimeoutError). A Slurm job is left to Slurm (``scancel``)."""
    try:
        follow(job, timeout_s=timeout_s)
    except BaseException:
        if local:
            stop_local(job)
        raise
    return job.results()  # job.result() asserts on multi-task jobs


def require_slurm() -> None:
    """LaunchError unless Slurm's ``sbatch`` can be run from here."""
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "Slurm's `sbatch` is not available here (not on PATH): submit from the cluster's login node "
            "(DRY_RUN=1 prints the sbatch script without Slurm)"
        )


def _submit_task(cluster: ClusterConfig, folder: Path, train_args: list[str], threads: int) -> submitit.Job:
    executor = make_executor(cluster, folder)
    if cluster.executor != "local":
        return executor.submit(TrainTask(), train_args, threads, None)
    # The controller and its tasks inherit SIGINT and SIGHUP blocked (see SHIELDED).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
    try:
        return executor.submit(TrainTask(), train_args, threads, process_identity(os.getpid()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _announce(job: submitit.Job, cluster: ClusterConfig, folder: Path, grace_s: float) -> None:
    say(f"submitted job {job.job_id} ({cluster.executor}, {cluster.world_size} task(s)); logs: {folder}")
    if cluster.executor == "local":
        say(
            f"local job {job.job_id} lives as long as this command: stopping it (Ctrl-C, kill, a closed "
            f"terminal) saves a checkpoint and ends the job (up to {grace_s:g} s)"
        )
    else:
        say(
            f"Slurm job {job.job_id} runs on its own: it keeps running when this command ends; "
            f"cancel it with `scancel {job.job_id}`"
        )


def submit(
    cluster: ClusterConfig,
    train_args: list[str],
    run_dir: Path,
    wait: bool = True,
    timeout_s: float | None = None,
) -> submitit.Job:
    """Submit the job; with ``wait``, stream rank 0's output and wait for every task (raises if one
    failed). A local job never outlives the wait: a stop signal (:class:`Interrupted`) stops it
    with a checkpoint first (``cluster.stop_grace_s``), an error or ``timeout_s`` stops it at once.
    A Slurm job is left running (its id and ``scancel`` are printed)."""
    if cluster.executor == "slurm":
        require_slurm()
    folder = run_dir / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    local = cluster.executor == "local"
    threads = max(1, (os.cpu_count() or 1) // cluster.tasks_per_node) if local else cluster.cpus_per_task
    with LauncherSignals() as signals:
        job = _submit_task(cluster, folder, train_args, threads)
        _announce(job, cluster, folder, cluster.stop_grace_s)
        if not wait and not signals.received:
            return job
        tail = _LogTail(job)
        try:
            follow(job, timeout_s=timeout_s, signals=signals, tail=tail)
        except Interrupted:
            if local:
                stop_training(job, cluster.stop_grace_s, signals, tail)
            else:
                say(
                    f"stopped waiting: Slurm job {job.job_id} keeps running; cancel it with `scancel {job.job_id}`"
                )
            raise
        except BaseException:
            if local:
                stop_local(job)
            raise
    try:
        job.results()  # raises if a task failed
    except Exception as exc:  # submitit's FailedJobError / UncompletedJobError: a task's traceback
        raise JobFailed(_failure_summary(job, exc)) from exc
    return job

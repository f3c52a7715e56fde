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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from launch.clusters import ClusterConfig
from pipeline.model.parallel import drop_chosen_interface
from pipeline.stop import STOPPED_EXIT, StopSignal


class TrainTask(submitit.helpers.Checkpointable):
    """One task of the job: ``python -m pipeline.train <args>`` with the job's distributed env."""

    def __call__(self, train_args: list[str], threads: int) -> int:
        env = submitit.JobEnvironment()
        # Local tasks inherit the submitting process's environment; a torch.distributed setting
        # left there would point every task at another world. The job's environment decides.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        drop_chosen_interface()  # an interface picked for the submitting process's own world
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
        import torch

        torch.set_num_threads(threads)
        import pipeline.train as train

        # Slurm's time-limit signal (and preemption) reaches every task. submitit's handler would
        # requeue at once, mid-step; instead every task only raises a flag, the training loop saves
        # a checkpoint at the next step boundary on all ranks together, and then rank 0 hands over
        # to submitit's handler (checkpoint() below + requeue).
        sig = preempt_signal()
        submitit_handler = signal.getsignal(sig)
        if not callable(submitit_handler):
            raise RuntimeError(
                f"submitit {submitit.__version__} installed no handler for {sig.name} before running the "
                f"task (1.5.4 does, in JobEnvironment._handle_signals); nothing would requeue the job"
            )
        stop = StopSignal()
        signal.signal(sig, stop.handler)
        print(f"task {env.global_rank}/{env.num_tasks} on {env.hostname} (job {env.job_id})", flush=True)
        rc = train.main(train_args, stop=stop)
        if rc == STOPPED_EXIT:
            if env.global_rank == 0:
                submitit_handler(stop.signum, None)  # checkpoint() + requeue + exit
            time.sleep(300)  # the other ranks wait for the requeue to end them
            return rc
        if rc != 0:
            raise RuntimeError(f"training exited with status {rc} on rank {env.global_rank}")
        return rc

    def checkpoint(self, train_args: list[str], threads: int) -> submitit.helpers.DelayedSubmission:
        # Requeue the same task; pipeline.train resumes from the newest checkpoint by itself.
        return submitit.helpers.DelayedSubmission(TrainTask(), train_args, threads)


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
    import torch

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


def follow(job: submitit.Job, poll_s: float = 1.0, timeout_s: float | None = None) -> None:
    """Echo the rank-0 task's output (stdout, and stderr where the progress bar goes) while the job
    runs; TimeoutError if it still runs after ``timeout_s``."""
    streams = [(Path(job.paths.stdout), sys.stdout), (Path(job.paths.stderr), sys.stderr)]
    offsets = [0, 0]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def pump() -> None:
        for i, (path, sink) in enumerate(streams):
            if path.is_file():
                with open(path, "rb") as f:
                    f.seek(offsets[i])
                    chunk = f.read()
                offsets[i] += len(chunk)
                sink.write(chunk.decode(errors="replace"))
                sink.flush()

    while not job.done():
        pump()
        if gone_from_slurm(job):
            raise RuntimeError(
                f"job {job.job_id} left the Slurm queue without a result (cancelled, or its node was lost); "
                f"logs: {Path(job.paths.stdout).parent}"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still running after {timeout_s} s")
        time.sleep(poll_s)
    pump()


def _live_parents() -> dict[int, int]:
    """pid -> parent pid of every live process, from /proc (empty where there is no /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if fields[0] not in (b"Z", b"X"):  # zombies are dead, only not yet reaped
            parents[int(entry.parent.name)] = int(fields[1])
    return parents


def _proc_tree(root: int, parents: dict[int, int]) -> set[int]:
    """``root`` and its descendants among ``parents``."""
    tree = {root} & parents.keys()
    while found := {pid for pid, ppid in parents.items() if ppid in tree} - tree:
        tree |= found
    return tree


def stop_local(job: submitit.Job, grace_s: float = 10.0) -> None:
    """Cancel a local job and make sure its controller, its tasks and what they started are gone.

    ``LocalJob.cancel`` only sends SIGINT to the controller process, which interrupts and then
    kills its tasks but not their children; a controller that dies first orphans the tasks. So the
    process tree is listed while the controller lives (orphans are re-parented, lost to ancestry),
    and what outlives it (or ``grace_s``) gets SIGTERM, then SIGKILL."""
    root = int(job.job_id)
    tree = _proc_tree(root, _live_parents())
    job.cancel()
    deadline = time.monotonic() + grace_s
    while not job.done() and time.monotonic() < deadline:  # done() polls: reaps the controller
        tree |= _proc_tree(root, _live_parents())  # tasks started since the first look
        time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 5
        while (alive := tree & _live_parents().keys()) and time.monotonic() < deadline:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.1)
    job.done()


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


def submit(
    cluster: ClusterConfig,
    train_args: list[str],
    run_dir: Path,
    wait: bool = True,
    timeout_s: float | None = None,
) -> submitit.Job:
    """Submit the job; with ``wait``, stream rank 0's output and wait for every task (``wait_for``)."""
    folder = run_dir / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    threads = (
        max(1, (os.cpu_count() or 1) // cluster.tasks_per_node)
        if cluster.executor == "local"
        else cluster.cpus_per_task
    )
    executor = make_executor(cluster, folder)
    job = executor.submit(TrainTask(), train_args, threads)
    print(
        f"submitted job {job.job_id} ({cluster.executor}, {cluster.world_size} task(s)); logs: {folder}",
        flush=True,
    )
    if wait:
        wait_for(job, local=cluster.executor == "local", timeout_s=timeout_s)
    return job

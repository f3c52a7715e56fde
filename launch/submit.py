"""Submit a training job through submitit: LocalExecutor on this machine, Slurm on a cluster.

Each task sets up torch.distributed from submitit's JobEnvironment (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK) and runs ``pipeline.train``. The task is ``Checkpointable``: when Slurm
preempts it or its time runs out, submitit requeues it and the new allocation resumes from the
run's newest checkpoint (``checkpoint.every`` bounds the steps lost).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from launch.clusters import ClusterConfig


class TrainTask(submitit.helpers.Checkpointable):
    """One task of the job: ``python -m pipeline.train <args>`` with the job's distributed env."""

    def __call__(self, train_args: list[str], threads: int) -> int:
        env = submitit.JobEnvironment()
        # Local tasks inherit the submitting process's environment; a torch.distributed setting
        # left there would point every task at another world. The job's environment decides.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
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
        submitit_handler = signal.getsignal(env._usr_sig())
        signal.signal(env._usr_sig(), lambda signum, frame: train.STOP_REQUESTED.update(signal=signum))
        print(f"task {env.global_rank}/{env.num_tasks} on {env.hostname} (job {env.job_id})", flush=True)
        rc = train.main(train_args)
        if rc == train.STOPPED_EXIT:
            if env.global_rank == 0 and callable(submitit_handler):
                submitit_handler(train.STOP_REQUESTED["signal"], None)  # checkpoint() + requeue + exit
            time.sleep(300)  # the other ranks wait for the requeue to end them
            return rc
        if rc != 0:
            raise RuntimeError(f"training exited with status {rc} on rank {env.global_rank}")
        return rc

    def checkpoint(self, train_args: list[str], threads: int) -> submitit.helpers.DelayedSubmission:
        # Requeue the same task; pipeline.train resumes from the newest checkpoint by itself.
        return submitit.helpers.DelayedSubmission(TrainTask(), train_args, threads)


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
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    for key in ("account", "qos", "constraint"):
        if getattr(cluster, key):
            params[f"slurm_{key}"] = getattr(cluster, key)
    if cluster.mem_gb is not None:  # 0: all of the node's memory
        params["mem_gb"] = cluster.mem_gb
    return params


def sbatch_preview(cluster: ClusterConfig, folder: Path) -> str:
    """The sbatch script submitit would submit for this cluster (nothing is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    p = slurm_parameters(cluster)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(
        command=command,
        folder=str(folder),
        job_name=p["name"],
        partition=p["slurm_partition"],
        time=p["timeout_min"],
        nodes=p["nodes"],
        ntasks_per_node=p["tasks_per_node"],
        cpus_per_task=p["cpus_per_task"],
        gpus_per_node=p.get("gpus_per_node"),
        qos=p.get("slurm_qos"),
        account=p.get("slurm_account"),
        constraint=p.get("slurm_constraint"),
        mem=(f"{p['mem_gb']}GB" if p["mem_gb"] else "0") if "mem_gb" in p else None,
        setup=p["slurm_setup"],
        additional_parameters=p["slurm_additional_parameters"] or None,
    )


def follow(job: submitit.Job, poll_s: float = 1.0) -> None:
    """Echo the rank-0 task's output (stdout, and stderr where the progress bar goes) while the job runs."""
    streams = [(Path(job.paths.stdout), sys.stdout), (Path(job.paths.stderr), sys.stderr)]
    offsets = [0, 0]

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
        time.sleep(poll_s)
    pump()


def submit(cluster: ClusterConfig, train_args: list[str], run_dir: Path, wait: bool = True) -> submitit.Job:
    """Submit the job; for the local executor, stream rank 0's output and wait for every task."""
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
        follow(job)
        job.results()  # raises if any task failed (job.result() asserts on multi-task jobs)
    return job

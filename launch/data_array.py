"""`make data CLUSTER=... TASKS=N`: the tokenising step of a dataset build as a submitit job array.

    python -m launch.data --corpus 'big/*.jsonl' --out data/big --cluster my-slurm --tasks 16

The pure parts (work units cut by size, their assignment to tasks, one task's tokenising, the
merge in corpus order) are data_prep/array.py; this module submits them on a cluster config's
executor (local processes or a Slurm array), follows them, and re-runs only unfinished units.
It lives in launch/ because it needs the cluster configs and executors: data_prep never
imports launch (tests/unit/test_structure.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit

from data_prep.array import (
    _UNIT_FILE,
    UNIT_BYTES,
    Unit,
    assign,
    merge_units,
    plan_units,
    tokenise_units,
    unit_done,
)
from data_prep.shard import (
    DatasetPrepError,
    _atomic_write_json,
    _Build,
    _token_dtype,
    prepare_dataset,
)
from launch.clusters import ClusterConfig
from launch.submit import gone_from_slurm, slurm_parameters, stop_local
from pipeline.dataset.manifest import Manifest
from pipeline.dataset.prep_config import PrepConfig
from pipeline.dataset.tokenizer import Tokenizer

_POLL_S = 2.0  # seconds between progress lines while the array runs
# How often the tasks' ends are checked: local tasks are processes (a poll is free), so the merge
# starts as soon as the last one exits; a Slurm task's state costs a scheduler query.
_CHECK_S = {"local": 0.05}


def make_array_executor(cluster: ClusterConfig, folder: Path, parallelism: int) -> submitit.Executor:
    """An executor for one-task array jobs on ``cluster`` (no GPUs: tokenising runs on CPUs)."""
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=cluster.time_min)
        return ex

    params = slurm_parameters(cluster)
    params.pop("gpus_per_node", None)
    params.update(
        name=f"{cluster.job_name}-data", nodes=1, tasks_per_node=1, slurm_array_parallelism=parallelism
    )
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    ex.update_parameters(**params)
    return ex


def _reset_units(work: Path, plan_id: str) -> None:
    """Keep finished units only if they were made for this plan (units, tokenizer, dtype)."""
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("id") == plan_id:
        return
    for p in work.iterdir():
        if p.is_file() and _UNIT_FILE.match(p.name):
            p.unlink()
    _atomic_write_json(plan_file, {"id": plan_id})


def _ended(job: Any) -> bool:
    return job.done() or gone_from_slurm(job)


def _follow(
    jobs: list, work: Path, plan: list[Unit], t0: float, base_tokens: int, check_s: float = _POLL_S
) -> None:
    """Print progress (units and tasks done, tokens/s) until every job has ended, checking the
    jobs every ``check_s`` seconds and reading the units' records every ``_POLL_S``."""
    last = ""
    next_line = 0.0
    while True:
        finished = sum(_ended(j) for j in jobs)
        now = time.monotonic()
        if finished == len(jobs) or now >= next_line:
            next_line = now + _POLL_S
            recs = [r for u in plan if (r := unit_done(work, u)) is not None]
            tokens = sum(r["tokens"] for r in recs) - base_tokens
            rate = tokens / max(time.time() - t0, 1e-9)
            line = (
                f"tokenising: {len(recs)}/{len(plan)} units, {finished}/{len(jobs)} task(s) ended, "
                f"{tokens / 1e6:.2f}M tokens this run, {rate / 1e6:.2f}M tokens/s"
            )
            if line.split(", ")[:2] != last.split(", ")[:2]:
                print(line, flush=True)
                last = line
        if finished == len(jobs):
            return
        time.sleep(check_s)


_ERROR_LINE = re.compile(r"^\s*([\w.]+(Error|Exception|Interrupt)\b.*)$")


def _failure(job: Any, group: list[Unit]) -> str | None:
    """What went wrong with a task, in one line (its exception, or how it ended), else None."""
    if not job.done() and gone_from_slurm(job):
        return f"task {job.job_id} (units {', '.join(u.name for u in group)}): left the Slurm queue without a result (cancelled or killed)"
    try:
        job.result()
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        errors = [m.group(1) for ln in lines if (m := _ERROR_LINE.match(ln))]
        why = errors[-1] if errors else (lines[0] if lines else type(exc).__name__)
        return f"task {job.job_id} (units {', '.join(u.name for u in group)}): {why.strip()[:300]}"
    return None


@contextlib.contextmanager
def _tasks_can_import_this_repo() -> Iterator[None]:
    """Array tasks unpickle ``tokenise_units`` by module name: put this repository on the
    PYTHONPATH they inherit (local processes and sbatch both export the submitter's environment),
    whatever directory the build was started from."""
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *(p for p in parts if p != root)])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _task_workers(b: _Build, cluster: ClusterConfig, n: int) -> int:
    if b.cfg.workers:
        return b.cfg.workers
    if cluster.executor == "local":
        return max(1, (os.cpu_count() or 1) // n)
    return cluster.cpus_per_task


def _submit_and_follow(
    b: _Build,
    work: Path,
    plan: list[Unit],
    pending: list[Unit],
    tok: Tokenizer,
    dtype: str,
    cluster: ClusterConfig,
    tasks: int,
    t0: float,
) -> None:
    """Submit the ``pending`` units as up to ``tasks`` array tasks and wait; a failure names them."""
    groups = assign(pending, tasks)
    n = len(groups)
    workers = _task_workers(b, cluster, n)
    folder = (b.work / "array").resolve()
    executor = make_array_executor(cluster, folder, n)
    base = sum(r["tokens"] for u in plan if (r := unit_done(work, u)) is not None)
    with _tasks_can_import_this_repo():
        jobs = executor.map_array(
            tokenise_units, [str(work)] * n, [str(tok.path.resolve())] * n, [dtype] * n, groups, [workers] * n
        )
    print(
        f"submitted {n} array task(s) of {workers} worker(s) ({cluster.executor}): "
        f"{', '.join(j.job_id for j in jobs)}; logs: {folder}",
        flush=True,
    )
    try:
        _follow(jobs, work, plan, t0, base, _CHECK_S.get(cluster.executor, _POLL_S))
    except BaseException:
        if cluster.executor == "local":  # our child processes: never leave them running
            for job in jobs:
                stop_local(job)
        raise
    failed = [f for job, g in zip(jobs, groups, strict=True) if (f := _failure(job, g))]
    if failed:
        left = [u.name for u in plan if unit_done(work, u) is None]
        raise DatasetPrepError(
            f"{b.out}: {len(failed)} of {n} array task(s) failed: {'; '.join(failed)}. Logs: {folder}. "
            f"{len(plan) - len(left)} of {len(plan)} units are finished and kept; run the same command "
            f"again to redo only the {len(left)} unfinished one(s)"
        )


def run_array(
    b: _Build,
    inputs: list[tuple[Path, str]],
    tok: Tokenizer,
    state: dict[str, Any],
    *,
    cluster: ClusterConfig,
    tasks: int,
    unit_bytes: int = UNIT_BYTES,
) -> dict[str, Any]:
    """The tokenising step of :func:`prepare_dataset` as a job array, then the merge."""
    work = (b.work / "units").resolve()  # absolute: array tasks may start in another directory
    dtype = _token_dtype(tok.vocab_size)
    plan = plan_units(inputs, unit_bytes)
    plan_id = hashlib.sha256(
        json.dumps([[asdict(u) for u in plan], tok.sha256, dtype.name], sort_keys=True).encode()
    ).hexdigest()
    _reset_units(work, plan_id)
    for p in work.glob(".u*.tmp-*"):  # what a killed task was writing
        p.unlink(missing_ok=True)
    pending = [u for u in plan if unit_done(work, u) is None]
    print(
        f"tokenising {len(plan)} work unit(s) of up to {unit_bytes / 2**20:.3g} MiB as a job array: "
        f"{len(pending)} to do, {len(plan) - len(pending)} finished earlier",
        flush=True,
    )
    t0 = time.time()
    if pending:
        _submit_and_follow(b, work, plan, pending, tok, dtype.name, cluster, tasks, t0)
    return merge_units(b, inputs, tok, state, work, plan, dtype, time.time() - t0)


def prepare_with_array(
    cfg: PrepConfig,
    cluster: ClusterConfig,
    tasks: int,
    *,
    progress: bool = True,
    unit_bytes: int = UNIT_BYTES,
) -> Manifest:
    """:func:`prepare_dataset` with its tokenising step run as a job array of up to ``tasks`` tasks."""
    if tasks < 1:
        raise DatasetPrepError(f"TASKS={tasks}: expected >= 1 array task")

    def step(b: _Build, inputs: list[tuple[Path, str]], tok: Tokenizer, state: dict[str, Any]) -> dict:
        return run_array(b, inputs, tok, state, cluster=cluster, tasks=tasks, unit_bytes=unit_bytes)

    return prepare_dataset(cfg, progress=progress, tokenise=step)

"""Tokenise a large corpus as a submitit job array (LocalExecutor here, Slurm on a cluster).

    python -m data_prep.prepare --corpus 'big/*.jsonl' --out data/big --cluster ci-slurm --tasks 8

The build is :func:`data_prep.shard.prepare_dataset` with its tokenising step run as an array:

1. The submitting process trains the tokenizer once, before the array, exactly as the
   single-machine build does: on a seeded reservoir sample of at most ``tokenizer.max_sentences``
   lines (default 2,000,000) drawn uniformly from every non-empty line of the corpus (one read
   of the text, no tokenising). A given ``tokenizer.model`` skips this.
2. The corpus is cut into work units by size: consecutive files (a plain ``.jsonl`` larger than a
   unit is cut at line starts) are packed into units of about ``unit_bytes`` (64 MiB). Units do
   not depend on the number of tasks, so a re-run with another ``TASKS`` reuses finished units.
3. The units still to do are spread over at most ``tasks`` array tasks (largest first, to the
   least-loaded task). A task encodes its units' documents in corpus order and writes each unit
   as ``.work/units/uNNNNN.{bin,len.npy}`` under temporary names, renamed when complete, then
   ``uNNNNN.json`` (written last: the unit is done). A killed or failed task leaves its finished
   units; the next invocation submits only the units that are missing.
4. The submitting process merges the units in corpus order into the same ``.work/{train,val}.bin``
   the single-machine build writes (a document's split is a seeded hash of its global index),
   then writes the shards and the manifest as that build does. The sequence-to-shard assignment
   is a function of the merged token streams alone, so the dataset is byte-identical (every
   shard's sha256 and the manifest) whatever the number of tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import submitit

from data_prep.corpus import CorpusError, CorpusStats, iter_documents
from data_prep.shard import (
    DatasetPrepError,
    _atomic_write_json,
    _Build,
    _is_val,
    _token_dtype,
    encode_documents,
    prepare_dataset,
)
from launch.clusters import ClusterConfig
from pipeline.dataset.manifest import Manifest
from pipeline.dataset.prep_config import PrepConfig
from pipeline.dataset.tokenizer import Tokenizer

UNIT_BYTES = 64 << 20
_UNIT_FILE = re.compile(r"^\.?u\d{5}\.(bin|len\.npy|json)(\.tmp-\d+)?$")
_POLL_S = 2.0


@dataclass(frozen=True)
class Unit:
    """A contiguous slice of the corpus: ``(path, text_field, start, end)`` segments in order
    (``(0, None)``: the whole file)."""

    index: int
    segments: tuple[tuple[str, str, int, int | None], ...]
    bytes: int

    @property
    def name(self) -> str:
        return f"u{self.index:05d}"


# ---------------------------------------------------------------- planning


def _line_starts(path: Path, size: int, unit_bytes: int) -> list[int]:
    """Offsets cutting a jsonl file into pieces of about ``unit_bytes``, each at a line start."""
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + unit_bytes < size:
            f.seek(starts[-1] + unit_bytes)
            f.readline()  # to the end of the line the cut fell in
            if f.tell() >= size:
                break
            starts.append(f.tell())
    return starts


def plan_units(inputs: list[tuple[Path, str]], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Cut the corpus into units of about ``unit_bytes`` (by size, in corpus order)."""
    pieces: list[tuple[tuple[str, str, int, int | None], int]] = []
    for path, field in inputs:
        size = path.stat().st_size
        if path.name.lower().endswith(".jsonl") and size > unit_bytes:
            starts = _line_starts(path, size, unit_bytes)
            for a, b in zip(starts, [*starts[1:], size], strict=True):
                pieces.append(((str(path), field, a, b), b - a))
        else:
            pieces.append(((str(path), field, 0, None), size))
    units: list[Unit] = []
    segs: list[tuple[str, str, int, int | None]] = []
    total = 0
    for seg, n in pieces:
        if segs and total + n > unit_bytes:
            units.append(Unit(len(units), tuple(segs), total))
            segs, total = [], 0
        segs.append(seg)
        total += n
    if segs:
        units.append(Unit(len(units), tuple(segs), total))
    return units


def assign(units: list[Unit], tasks: int) -> list[list[Unit]]:
    """Spread ``units`` over at most ``tasks`` groups: largest first, to the least-loaded group."""
    groups: list[list[Unit]] = [[] for _ in range(max(1, min(tasks, len(units))))]
    load = [0] * len(groups)
    for u in sorted(units, key=lambda u: (-u.bytes, u.index)):
        i = load.index(min(load))
        groups[i].append(u)
        load[i] += u.bytes
    return [sorted(g, key=lambda u: u.index) for g in groups]


# ---------------------------------------------------------------- the task


def unit_done(work: Path, unit: Unit) -> dict[str, Any] | None:
    """The record of a finished unit (its files present, sizes as recorded), else None."""
    rec_path = work / f"{unit.name}.json"
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
        ok = (work / f"{unit.name}.bin").stat().st_size == rec["bin_bytes"] and (
            work / f"{unit.name}.len.npy"
        ).is_file()
    except (OSError, ValueError, KeyError):
        return None
    return rec if ok else None


def tokenise_units(work: str, model_path: str, dtype: str, units: list[Unit], workers: int) -> dict[str, Any]:
    """One array task: encode ``units`` (skipping finished ones), each written atomically."""
    out = Path(work)
    done = tokens = 0
    t0 = time.time()
    for unit in units:
        if unit_done(out, unit) is not None:
            continue
        stats = CorpusStats()
        t_unit = time.time()
        lengths: list[int] = []
        pid = os.getpid()
        tmp_bin, tmp_len = out / f".{unit.name}.bin.tmp-{pid}", out / f".{unit.name}.len.npy.tmp-{pid}"
        segments = [(Path(p), f, a, b) for p, f, a, b in unit.segments]
        with open(tmp_bin, "wb") as f:
            docs = iter_documents(segments, stats, require_documents=False)
            for _, ids in encode_documents(docs, Path(model_path), np.dtype(dtype), workers):
                f.write(ids.tobytes())
                lengths.append(len(ids))
        with open(tmp_len, "wb") as f:
            np.save(f, np.asarray(lengths, dtype=np.int64))
        os.replace(tmp_bin, out / f"{unit.name}.bin")
        os.replace(tmp_len, out / f"{unit.name}.len.npy")
        rec = {
            "unit": unit.index,
            "documents": len(lengths),
            "tokens": int(sum(lengths)),
            "bin_bytes": (out / f"{unit.name}.bin").stat().st_size,
            "seconds": time.time() - t_unit,
            "stats": asdict(stats),
        }
        _atomic_write_json(out / f"{unit.name}.json", rec)  # last: marks the unit done
        done += 1
        tokens += rec["tokens"]
        print(f"{unit.name}: {rec['documents']:,} documents, {rec['tokens']:,} tokens", flush=True)
    return {"units": done, "tokens": tokens, "seconds": time.time() - t0}


# ---------------------------------------------------------------- submitting


def make_array_executor(cluster: ClusterConfig, folder: Path, parallelism: int) -> submitit.Executor:
    """An executor for one-task array jobs on ``cluster`` (no GPUs: tokenising runs on CPUs)."""
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=cluster.time_min)
        return ex
    from launch.submit import slurm_parameters

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


def _follow(jobs: list, work: Path, plan: list[Unit], t0: float, base_tokens: int) -> None:
    """Print progress (units and tasks done, tokens/s) until every job has ended."""
    last = ""
    while True:
        finished = sum(j.done() for j in jobs)
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
        time.sleep(_POLL_S)


_ERROR_LINE = re.compile(r"^\s*([\w.]+(Error|Exception|Interrupt)\b.*)$")


def _failure(job: Any, group: list[Unit]) -> str | None:
    """What went wrong with a task, in one line (its exception, or how it ended), else None."""
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
        groups = assign(pending, tasks)
        n = len(groups)
        if b.cfg.workers:
            workers = b.cfg.workers
        elif cluster.executor == "local":
            workers = max(1, (os.cpu_count() or 1) // n)
        else:
            workers = cluster.cpus_per_task
        folder = (b.work / "array").resolve()
        executor = make_array_executor(cluster, folder, n)
        base = sum(r["tokens"] for u in plan if (r := unit_done(work, u)) is not None)
        with _tasks_can_import_this_repo():
            jobs = executor.map_array(
                tokenise_units,
                [str(work)] * n,
                [str(tok.path.resolve())] * n,
                [dtype.name] * n,
                groups,
                [workers] * n,
            )
        print(
            f"submitted {n} array task(s) of {workers} worker(s) ({cluster.executor}): "
            f"{', '.join(j.job_id for j in jobs)}; logs: {folder}",
            flush=True,
        )
        try:
            _follow(jobs, work, plan, t0, base)
        except BaseException:
            if cluster.executor == "local":  # our child processes: never leave them running
                from launch.submit import stop_local

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
    return merge_units(b, inputs, tok, state, work, plan, dtype, time.time() - t0)


def merge_units(
    b: _Build,
    inputs: list[tuple[Path, str]],
    tok: Tokenizer,
    state: dict[str, Any],
    work: Path,
    plan: list[Unit],
    dtype: np.dtype,
    seconds: float,
) -> dict[str, Any]:
    """Concatenate the units in corpus order into ``.work/{train,val}.bin`` (what the
    single-machine build writes: a document's split is a seeded hash of its global index)."""
    cfg = b.cfg
    counts = {"train": 0, "val": 0}
    docs_per_split = {"train": 0, "val": 0}
    stats = CorpusStats()
    first_doc = 0
    with open(b.work / "train.bin.tmp", "wb") as train_f, open(b.work / "val.bin.tmp", "wb") as val_f:
        files = {False: train_f, True: val_f}
        for unit in plan:
            rec = unit_done(work, unit)
            if rec is None:
                raise DatasetPrepError(f"{work / unit.name}.json: unit missing or damaged after the array")
            for key, value in rec["stats"].items():
                if key == "per_file_replaced":
                    for f, n in value.items():
                        stats.per_file_replaced[f] = stats.per_file_replaced.get(f, 0) + n
                elif key != "files":
                    setattr(stats, key, getattr(stats, key) + value)
            lengths = np.load(work / f"{unit.name}.len.npy")
            if len(lengths) == 0:
                continue
            data = np.memmap(work / f"{unit.name}.bin", dtype=dtype, mode="r")
            is_val = np.array(
                [_is_val(cfg.seed, first_doc + i, cfg.val_fraction) for i in range(len(lengths))]
            )
            ends = np.cumsum(lengths)
            starts = ends - lengths
            # Consecutive documents of the same split are written in one slice.
            cuts = [0, *(np.flatnonzero(np.diff(is_val)) + 1).tolist(), len(lengths)]
            for a, z in itertools.pairwise(cuts):
                split = bool(is_val[a])
                files[split].write(np.asarray(data[starts[a] : ends[z - 1]]).tobytes())
                name = "val" if split else "train"
                counts[name] += int(ends[z - 1] - starts[a])
                docs_per_split[name] += z - a
            first_doc += len(lengths)
            del data
    stats.files = len(inputs)
    if stats.documents == 0:
        names = [str(p) for p, _ in inputs]
        raise CorpusError(
            f"corpus is empty: {len(names)} file(s) ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) hold no non-empty document"
        )
    for s in ("train", "val"):
        os.replace(b.work / f"{s}.bin.tmp", b.work / f"{s}.bin")
    return b.record_tokens(state, inputs, tok, dtype, counts, docs_per_split, seconds, stats)


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

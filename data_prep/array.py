"""The pieces of a dataset build whose tokenising runs as a job array (launch/data_array.py submits).

    make data CORPUS='big/*.jsonl' OUT=data/big CLUSTER=ci-slurm TASKS=8

The build is :func:`data_prep.shard.prepare_dataset` with its tokenising step run as an array:

1. The submitting process trains the tokenizer once, before the array, exactly as the
   single-machine build does: on a seeded reservoir sample of at most ``tokenizer.max_sentences``
   lines (default 2,000,000) drawn uniformly from every non-empty line of the corpus (one read
   of the text, no tokenising). A given tokenizer (``tokenizer.model=``: a ``.model`` or a
   ``tokenizer.json``) skips this.
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

import itertools
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.corpus import CorpusError, CorpusStats, iter_documents
from data_prep.shard import (
    DatasetPrepError,
    _atomic_write_json,
    _Build,
    _is_val,
    encode_documents,
)
from pipeline.dataset.tokenizer import Tokenizer

UNIT_BYTES = 64 << 20
_UNIT_FILE = re.compile(r"^\.?u\d{5}\.(bin|len\.npy|json)(\.tmp-\d+)?$")


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
            # when and by which process: where an array's time went (bench/data.py reads these)
            "started": t_unit,
            "ended": time.time(),
            "task": f"{os.uname().nodename}:{pid}",
            "stats": asdict(stats),
        }
        _atomic_write_json(out / f"{unit.name}.json", rec)  # last: marks the unit done
        done += 1
        tokens += rec["tokens"]
        print(f"{unit.name}: {rec['documents']:,} documents, {rec['tokens']:,} tokens", flush=True)
    return {"units": done, "tokens": tokens, "seconds": time.time() - t0}


# ---------------------------------------------------------------- submitting


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

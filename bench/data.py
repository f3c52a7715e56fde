"""Data-path throughput: tokenising (all cores) and the streaming loader vs what training consumes.

    python -m bench.data

Prepares the sample dataset if needed (configs/data/sample.yaml), then measures
* ``tokenize_tokens_per_s``: data_prep's parallel encoder over the whole sample corpus;
* ``loader_tokens_per_s_{1worker,2workers}``: one epoch of the train split through
  TokenBatchLoader (batch 8 x 256), worker start-up included;
* ``train_tokens_per_s_default``: the default CPU run (configs/train/local.yaml: small preset,
  MemDLM, batch 8, DeepSpeed ZeRO-3, in the precision the trainer resolves: ``precision``) stepping through the real Trainer, which the loader
  must outpace by >= 20x (``train_tokens_per_s_mdlm``: the same with the memory off).
* ``array_tokens_per_s_{1,2}tasks``: the job-array tokenising step (launch/data_array.py,
  data_prep/array.py) on this machine's LocalExecutor with 1 and 2 tasks of one worker each, and
  ``array_scaling_2tasks`` (2-task over 1-task throughput; target >= 1.8 on 2 cores). Its corpus
  (``array_corpus``) is the sample corpus ARRAY_COPIES = 4 times (4 files, ~97 MB, ~30M tokens,
  48 units of 2 MiB), so that the array's fixed cost (under 1 s: process starts, imports, the
  tokenizer) is a small part of each run, as it is (even more so) on a corpus of cluster size. That
  cost is reported too: ``array_overhead_s_{1task,2tasks}`` (wall time minus the busiest task's
  encoding time), with ``array_runs`` (per run: busy time, task imbalance, one task's encoding
  rate). The sample corpus alone (12 units, ~5 s a task) scales less: 11 equal units do not split
  evenly over 2 tasks, and the fixed cost is a sixth of the run. Each figure is the mean of
  ARRAY_REPEATS = 2 runs, in the order 1, 2, 2, 1 tasks;
* ``loader_http_tokens_per_s_1worker``: the same epoch with the shards read over loopback HTTP
  (Python's http.server), which must still outpace training by >= 20x.
Writes bench/results/data.json. ``--only array,http`` (or either) measures just those, with no
training run, into bench/results/data-scale.json; ``loader_http_over_train_1worker`` there divides
by the training rate recorded in bench/results/data.json (``train_tokens_per_s_default``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, machine, write
from data_prep.corpus import CorpusStats, iter_documents
from data_prep.sample_corpus import sample_documents
from data_prep.shard import encode_documents, prepare_dataset
from pipeline.config import load_config
from pipeline.dataset.prep_config import PrepConfig
from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.loader.stream import DataConfig, TokenBatchLoader


def tokenize_throughput(prep: PrepConfig) -> dict:
    docs_path = sample_documents()
    tok = load_tokenizer(Path(prep.out_dir))
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    n = sum(
        len(ids)
        for _, ids in encode_documents(
            iter_documents([(docs_path, "text")], CorpusStats()), tok.path, np.dtype(np.uint16), workers
        )
    )
    seconds = time.perf_counter() - t0
    return {"tokenize_tokens_per_s": n / seconds, "tokenize_tokens": n, "tokenize_workers": workers}


def loader_throughput(path: str, workers: int, batch: int = 8) -> float:
    loader = TokenBatchLoader(DataConfig(path=path, batch_size=batch, num_workers=workers), loop=False)
    t0 = time.perf_counter()
    tokens = sum(b["tokens"].numel() for b in loader)
    return tokens / (time.perf_counter() - t0)


ARRAY_COPIES = 4  # the job-array benchmark's corpus: the sample corpus this many times, one file each
ARRAY_UNIT_MB = 2.0
ARRAY_REPEATS = 2  # runs of each task count (their mean is reported)


def array_throughput(
    prep: PrepConfig, tasks: int, copies: int = ARRAY_COPIES, unit_mb: float = ARRAY_UNIT_MB
) -> dict:
    """The job-array tokenising step (launch/data_array.py) with ``tasks`` local tasks of one
    worker each, reusing the prepared dataset's tokenizer, over a corpus of ``copies`` files, each
    a copy of the sample corpus (~24 MB, ~7.6M tokens): ``tokens_per_s`` is the build's own figure
    (tokens over the time from submission until the last task ended; the merge is excluded).

    Where the time went, from the units' records (data_prep/array.py): ``busy_s``, the longest
    task's time encoding its units; ``overhead_s``, the rest of the wall time (process starts,
    imports, unpickling the task, loading the tokenizer, the submitter noticing the end): a fixed
    cost per array, which a corpus of cluster size amortises; ``imbalance``, the busiest task's
    time over the mean; ``encode_tokens_per_s``, tokens over all tasks' busy time (one core's rate
    when the tasks do not slow each other down)."""
    import shutil
    import tempfile

    from launch.clusters import ClusterConfig
    from launch.data_array import prepare_with_array

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        sample = sample_documents(progress=False)
        for i in range(copies):
            shutil.copyfile(sample, corpus / f"part-{i:03d}.jsonl")
        cfg = load_config(
            PrepConfig,
            "configs/data/sample.yaml",
            [
                f"out_dir={tmp}/ds",
                f"corpus=['{corpus}']",
                "workers=1",
                "train_shards=8",
                f"tokenizer.model={Path(prep.out_dir) / 'tokenizer.model'}",
            ],
        )
        prepare_with_array(
            cfg, ClusterConfig(executor="local"), tasks, progress=False, unit_bytes=int(unit_mb * 2**20)
        )
        info = json.loads(Path(f"{tmp}/ds/.work/state.json").read_text())["tokens"]
        recs = [json.loads(p.read_text()) for p in Path(f"{tmp}/ds/.work/units").glob("u*.json")]
        corpus_bytes = sum(p.stat().st_size for p in corpus.iterdir())
    busy: dict[str, float] = {}
    for r in recs:
        busy[r["task"]] = busy.get(r["task"], 0.0) + r["seconds"]
    tokens = sum(info["tokens"].values())
    return {
        "tokens_per_s": info["tokens_per_s"],
        "seconds": info["seconds"],
        "busy_s": max(busy.values()),
        "overhead_s": info["seconds"] - max(busy.values()),
        "imbalance": max(busy.values()) / (sum(busy.values()) / len(busy)),
        "encode_tokens_per_s": tokens / sum(busy.values()),
        "corpus": {
            "files": copies,
            "bytes": corpus_bytes,
            "tokens": tokens,
            "units": len(recs),
            "unit_mb": unit_mb,
        },
    }


def http_loader_throughput(path: str, workers: int = 1) -> float:
    """The loader's tokens/s with the dataset's shards served by http.server on loopback."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import urllib.request

    from pipeline.dataset.manifest import load_manifest, with_base_url, write_manifest

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/manifest.json", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(Path(path) / "tokenizer.model", Path(tmp) / "tokenizer.model")
            write_manifest(with_base_url(load_manifest(path), f"http://127.0.0.1:{port}"), tmp)
            return loader_throughput(tmp, workers)
    finally:
        server.terminate()
        server.wait()


def train_throughput(steps: int = 6) -> dict:
    """Tokens/s of the default run (configs/train/local.yaml: MemDLM, ZeRO-3, the trainer's own
    precision choice) and of its MDLM twin."""
    import tempfile

    from pipeline.train import Trainer
    from pipeline.train_config import load_train_config

    os.environ.setdefault("MASTER_PORT", "29733")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("memdlm", "mdlm"):
            cfg = load_train_config(
                "configs/train/local.yaml",
                [
                    f"run_dir={tmp}/{method}",
                    "checkpoint.resume=false",
                    "tracking.enabled=false",
                    "eval.every=0",
                    f"memory.enabled={'true' if method == 'memdlm' else 'false'}",
                ],
            )
            trainer = Trainer(cfg)
            records = [trainer.train_step() for _ in range(steps)]
            out[method] = statistics.median(r["tokens_per_s"] for r in records[2:])
            precision = {"precision": trainer.precision.dtype, "precision_reason": trainer.precision.reason}
    return {
        "train_tokens_per_s_default": out["memdlm"],
        "train_tokens_per_s_mdlm": out["mdlm"],
        **precision,
    }


def scale_out(prep: PrepConfig, parts: set[str] = frozenset({"array", "http"})) -> dict:
    """Job-array tokenising with 1 and 2 tasks, and the loader over loopback HTTP."""
    out = {}
    if "array" in parts:
        out.update(array_scaling(prep))
    if "http" in parts:
        out["loader_http_tokens_per_s_1worker"] = http_loader_throughput(prep.out_dir, 1)
    return out


def array_scaling(prep: PrepConfig, repeats: int = ARRAY_REPEATS) -> dict:
    """1-task and 2-task arrays, ``repeats`` of each in the order 1, 2, 2, 1, ... (a drift of the
    machine's speed weighs on both alike); the figures are the means."""
    order = [t for i in range(repeats) for t in ((1, 2) if i % 2 == 0 else (2, 1))]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for tasks in order:
        runs[tasks].append(array_throughput(prep, tasks))

    def mean(tasks: int, key: str) -> float:
        return statistics.mean(r[key] for r in runs[tasks])

    return {
        "array_tokens_per_s_1task": mean(1, "tokens_per_s"),
        "array_tokens_per_s_2tasks": mean(2, "tokens_per_s"),
        "array_scaling_2tasks": mean(2, "tokens_per_s") / mean(1, "tokens_per_s"),
        "array_overhead_s_1task": mean(1, "overhead_s"),
        "array_overhead_s_2tasks": mean(2, "overhead_s"),
        "array_corpus": runs[1][0]["corpus"],
        "array_runs": {
            f"{n}task{'s' if n > 1 else ''}": [{k: v for k, v in r.items() if k != "corpus"} for r in runs[n]]
            for n in (1, 2)
        },
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated: array,http (skips the training measurement)")
    args = parser.parse_args()
    prep = load_config(PrepConfig, "configs/data/sample.yaml")
    prepare_dataset(prep)
    if args.only:
        parts = {p.strip() for p in args.only.split(",") if p.strip()}
        if not parts or parts - {"array", "http"}:
            parser.error(f"--only {args.only}: expected array, http or both")
        result = {"dataset": prep.out_dir, **scale_out(prep, parts), "machine": machine()}
        full = RESULTS / "data.json"
        if "http" in parts and full.is_file():
            train = json.loads(full.read_text()).get("train_tokens_per_s_default")
            if train:
                result["train_tokens_per_s_default"] = train
                result["train_tokens_per_s_default_from"] = "bench/results/data.json"
                result["loader_http_over_train_1worker"] = result["loader_http_tokens_per_s_1worker"] / train
        for k, v in result.items():
            if isinstance(v, float):
                print(f"{k:34s} {v:.4g}")
        write("data-scale", result)
        return
    result = {"dataset": prep.out_dir, **tokenize_throughput(prep), **scale_out(prep)}
    result["loader_tokens_per_s_1worker"] = loader_throughput(prep.out_dir, 1)
    result["loader_tokens_per_s_2workers"] = loader_throughput(prep.out_dir, 2)
    result.update(train_throughput())
    result["loader_over_train_1worker"] = (
        result["loader_tokens_per_s_1worker"] / result["train_tokens_per_s_default"]
    )
    result["loader_http_over_train_1worker"] = (
        result["loader_http_tokens_per_s_1worker"] / result["train_tokens_per_s_default"]
    )
    result["targets"] = {
        "tokenize_tokens_per_s": ">= 1.5e6",
        "loader_over_train": ">= 20",
        "loader_http_over_train": ">= 20",
        "array_scaling_2tasks": ">= 1.8",
    }
    result["machine"] = machine()
    for k in (
        "tokenize_tokens_per_s",
        "loader_tokens_per_s_1worker",
        "loader_tokens_per_s_2workers",
        "train_tokens_per_s_default",
        "loader_over_train_1worker",
        "array_tokens_per_s_1task",
        "array_tokens_per_s_2tasks",
        "array_scaling_2tasks",
        "array_overhead_s_1task",
        "array_overhead_s_2tasks",
        "loader_http_tokens_per_s_1worker",
        "loader_http_over_train_1worker",
    ):
        print(f"{k:32s} {result[k]:.4g}")
    write("data", result)


if __name__ == "__main__":
    main()

"""Data-path throughput: tokenising (all cores) and the streaming loader vs what training consumes.

    python -m bench.data

Prepares the sample dataset if needed (configs/data/sample.yaml), then measures
* ``tokenize_tokens_per_s``: data_prep's parallel encoder over the whole sample corpus;
* ``loader_tokens_per_s_{1worker,2workers}``: one epoch of the train split through
  TokenBatchLoader (batch 8 x 256), worker start-up included;
* ``train_tokens_per_s_default``: the default CPU run (configs/train/local.yaml: small preset,
  MemDLM, batch 8, DeepSpeed ZeRO-3, in the precision the trainer resolves: ``precision``) stepping through the real Trainer, which the loader
  must outpace by >= 20x (``train_tokens_per_s_mdlm``: the same with the memory off).
* ``array_tokens_per_s_{1,2}tasks``: the job-array tokenising step (data_prep/array.py) on this
  machine's LocalExecutor with 1 and 2 tasks of one worker each, and ``array_scaling_2tasks``
  (2-task over 1-task throughput; target >= 1.8 on 2 cores);
* ``loader_http_tokens_per_s_1worker``: the same epoch with the shards read over loopback HTTP
  (Python's http.server), which must still outpace training by >= 20x.
Writes bench/results/data.json. ``--only array,http`` measures just those (no training run).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import machine, write
from data_prep.corpus import CorpusStats, iter_documents
from data_prep.sample_corpus import sample_documents
from data_prep.shard import encode_documents, prepare_dataset
from pipeline.config import load_config
from pipeline.data.stream import DataConfig, TokenBatchLoader
from pipeline.dataset.prep_config import PrepConfig
from pipeline.dataset.tokenizer import load_tokenizer


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


def array_throughput(prep: PrepConfig, tasks: int, unit_mb: float = 2.0) -> float:
    """Tokens/s of the job-array tokenising step (submission to the last task's end, merge excluded)
    with ``tasks`` local tasks of one worker each, reusing the prepared dataset's tokenizer."""
    import json
    import tempfile

    from launch.clusters import ClusterConfig
    from launch.data_array import prepare_with_array

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            PrepConfig,
            "configs/data/sample.yaml",
            [
                f"out_dir={tmp}/ds",
                "workers=1",
                "train_shards=8",
                f"tokenizer.model={Path(prep.out_dir) / 'tokenizer.model'}",
            ],
        )
        prepare_with_array(
            cfg, ClusterConfig(executor="local"), tasks, progress=False, unit_bytes=int(unit_mb * 2**20)
        )
        return json.loads(Path(f"{tmp}/ds/.work/state.json").read_text())["tokens"]["tokens_per_s"]


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


def scale_out(prep: PrepConfig) -> dict:
    """Job-array tokenising with 1 and 2 tasks, and the loader over loopback HTTP."""
    one = array_throughput(prep, 1)
    two = array_throughput(prep, 2)
    return {
        "array_tokens_per_s_1task": one,
        "array_tokens_per_s_2tasks": two,
        "array_scaling_2tasks": two / one,
        "loader_http_tokens_per_s_1worker": http_loader_throughput(prep.out_dir, 1),
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
        result = {"dataset": prep.out_dir, **scale_out(prep), "machine": machine()}
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
        "loader_http_tokens_per_s_1worker",
        "loader_http_over_train_1worker",
    ):
        print(f"{k:32s} {result[k]:.4g}")
    write("data", result)


if __name__ == "__main__":
    main()

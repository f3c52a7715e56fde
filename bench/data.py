"""Data-path throughput: tokenising (all cores) and the streaming loader vs what training consumes.

    python -m bench.data

Prepares the sample dataset if needed (configs/data/sample.yaml), then measures
* ``tokenize_tokens_per_s``: data_prep's parallel encoder over the whole sample corpus;
* ``loader_tokens_per_s_{1worker,2workers}``: one epoch of the train split through
  TokenBatchLoader (batch 8 x 256), worker start-up included;
* ``train_tokens_per_s_default``: the default CPU run (configs/train/local.yaml: small preset,
  MemDLM, batch 8, DeepSpeed ZeRO-3, in the precision the trainer resolves: ``precision``) stepping through the real Trainer, which the loader
  must outpace by >= 20x (``train_tokens_per_s_mdlm``: the same with the memory off).
Writes bench/results/data.json.
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
    tok = load_tokenizer(Path(prep.out_dir) / "tokenizer.model")
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


def main() -> None:
    prep = load_config(PrepConfig, "configs/data/sample.yaml")
    prepare_dataset(prep)
    result = {"dataset": prep.out_dir, **tokenize_throughput(prep)}
    result["loader_tokens_per_s_1worker"] = loader_throughput(prep.out_dir, 1)
    result["loader_tokens_per_s_2workers"] = loader_throughput(prep.out_dir, 2)
    result.update(train_throughput())
    result["loader_over_train_1worker"] = (
        result["loader_tokens_per_s_1worker"] / result["train_tokens_per_s_default"]
    )
    result["targets"] = {"tokenize_tokens_per_s": ">= 1.5e6", "loader_over_train": ">= 20"}
    result["machine"] = machine()
    for k in (
        "tokenize_tokens_per_s",
        "loader_tokens_per_s_1worker",
        "loader_tokens_per_s_2workers",
        "train_tokens_per_s_default",
        "loader_over_train_1worker",
    ):
        print(f"{k:32s} {result[k]:.4g}")
    write("data", result)


if __name__ == "__main__":
    main()

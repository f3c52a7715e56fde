"""SFT data from the retrieval-task generators: train/val shards where the prompt is never masked.

    python -m data_prep.task_sft --config configs/data/tasks.yaml [n_train=4096 ...]
    make sft CLUSTER=local          # prepares this, then fine-tunes (configs/train/sft-tasks.yaml)

Each task set (task, context length, difficulty) yields ``n_train`` and ``n_val`` examples from
seeds that differ per split and from the evaluation's (``make eval`` uses seed 1000), so the
model is never scored on a story it was trained on. The pairs are interleaved across tasks,
then written by data_prep/sft.py. Idempotent: a finished directory written from the same
config is only checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.retrieval_tasks import generate, load_filler, resolve_filler_path
from data_prep.sft import write_sft_dataset
from pipeline.cli import run_main
from pipeline.dataset import ConfigError, load_config
from pipeline.dataset.manifest import DatasetError, Manifest, load_manifest
from pipeline.dataset.tokenizer import load_tokenizer


@dataclass
class TaskSFTSet:
    task: str  # niah | variable_tracking | babi
    context_tokens: int = 192
    n_train: int = 1024
    n_val: int = 64
    difficulty: dict[str, int] = field(default_factory=dict)


@dataclass
class TaskDataConfig:
    out_dir: str = "data/tasks-sft"
    # The pretrained model's tokenizer: a tokenizer.model / tokenizer.json, or a dataset or export
    # directory holding one (an import-hf export: its hf_tokenizer/tokenizer.json).
    tokenizer: str = "data/sample/tokenizer.model"
    # "tokenizer": render each (prompt, answer) with the tokenizer's chat template (data_prep/sft.py);
    # "none": prompt + " " + answer as plain text
    chat_template: Literal["none", "tokenizer"] = "none"
    filler: str = "sample"  # "sample" (the sample corpus) or a .jsonl/.txt of prose
    seq_len: int = 256
    seed: int = 0  # train uses seed, val seed + 1; keep both away from the eval seed
    train_shards: int = 8
    val_shards: int = 1
    tasks: list[TaskSFTSet] = field(default_factory=list)

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("key 'tasks': empty, expected at least one task set")
        for i, t in enumerate(self.tasks):
            if t.context_tokens >= self.seq_len:
                raise ConfigError(
                    f"key 'tasks[{i}].context_tokens': {t.context_tokens} leaves no room for the answer "
                    f"within seq_len {self.seq_len}"
                )


def _fingerprint(cfg: TaskDataConfig, tokenizer_sha: str) -> str:
    fields = asdict(cfg)
    if fields["chat_template"] == "none":
        del fields["chat_template"]  # the default: the fingerprint of data written before the key
    blob = json.dumps({"cfg": fields, "tokenizer": tokenizer_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_task_data(cfg: TaskDataConfig) -> Manifest:
    """Write (or confirm) the SFT dataset of ``cfg``; returns its manifest."""

    if not Path(cfg.tokenizer).exists():
        raise DatasetError(
            f"{cfg.tokenizer}: tokenizer not found; task data is tokenised with the pretrained model's "
            "tokenizer (`make pretrain CLUSTER=local` prepares data/sample/tokenizer.model) — or set tokenizer="
        )
    tok = load_tokenizer(cfg.tokenizer)
    fp = _fingerprint(cfg, tok.sha256)
    out = Path(cfg.out_dir)
    if (out / "manifest.json").is_file():
        manifest = load_manifest(out)
        if manifest.config.get("fingerprint") == fp and all(
            (out / s.path).is_file() for sp in manifest.splits.values() for s in sp.shards
        ):
            print(f"task data ready (up to date): {out}")
            return manifest
    filler = load_filler(resolve_filler_path(cfg.filler))
    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": []}
    for split, offset in (("train", 0), ("val", 1)):
        per_set = []
        for t in cfg.tasks:
            n = t.n_train if split == "train" else t.n_val
            examples = generate(
                t.task,
                n,
                seed=cfg.seed + offset,
                context_tokens=t.context_tokens,
                count_tokens=lambda s: len(tok.encode(s)),
                filler=filler,
                **t.difficulty,
            )
            per_set.append([(f"{split}:{e.id}@{t.context_tokens}", e.prompt, e.answer) for e in examples])
        # round-robin across task sets, so every shard (and batch) mixes the tasks
        longest = max((len(s) for s in per_set), default=0)
        splits[split] = [s[i] for i in range(longest) for s in per_set if i < len(s)]
    manifest = write_sft_dataset(
        splits,
        tokenizer=cfg.tokenizer,
        out_dir=out,
        seq_len=cfg.seq_len,
        shards={"train": cfg.train_shards, "val": cfg.val_shards},
        seed=cfg.seed,
        source={"tasks": [asdict(t) for t in cfg.tasks], "filler": cfg.filler},
        config={"fingerprint": fp, **asdict(cfg)},
        chat_template=cfg.chat_template,
    )
    n = {k: v.sequences for k, v in manifest.splits.items()}
    print(f"task data ready: {out} ({n['train']} train / {n['val']} val pairs of {cfg.seq_len} tokens)")
    return manifest


# Bad input of every kind: the config, the dataset, the tokenizer and its chat template, the SFT
# pairs and the task files are ValueErrors (ConfigError, DatasetError, TokenizerError, ...).
USER_ERRORS = (ConfigError, DatasetError, ValueError)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/data/tasks.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    prepare_task_data(load_config(TaskDataConfig, args.config, args.overrides))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_main(main, user_errors=USER_ERRORS))

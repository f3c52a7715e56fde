"""Variable tracking (after the RULER variable-tracking task description).

A chain of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ``VAR C = VAR B``, ... (``hops`` =
chain length - 1) and ``distractors`` other chains with other values are hidden in prose; each
chain's statements keep their order, chains interleave at random. Variable names are 5 random
uppercase letters, unique in the example; values are distinct 5-digit numbers. Prompt (haystack
truncated)::

    Memorize and track the chains of variable assignments hidden in the following text.

    <prose> VAR QWXKZ = 48213. <prose> VAR MPLRT = 90317. <prose> VAR HJDSA = VAR QWXKZ.
    <prose> VAR ZNCVB = VAR MPLRT. <prose> VAR YTREU = VAR HJDSA. <prose> ...

    Question: Find all variables that are assigned the value 48213 in the text above.
    Answer:

``answer`` is the chain's names joined by " " in chain order ("QWXKZ HJDSA YTREU ...");
``values`` are those names. A generation scores 1.0 when every name appears in it as a whole word
(case-insensitive), else 0.0. ``candidates`` are the answer plus ``n_wrong`` wrong name lists of
the same length (a distractor chain, or the true chain with one name swapped), shuffled.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

from data_prep.retrieval_tasks.common import CountTokens, TaskExample, build_prompt, example_rng, place_answer
from pipeline.dataset.task_format import score_variable_tracking

TASK = "variable_tracking"

INSTRUCTIONS = "Memorize and track the chains of variable assignments hidden in the following text."
QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."

_STATEMENT_WORD = re.compile(r"\bVAR\b")


def _reject(sentence: str) -> bool:
    # A stray "VAR" in the prose could read as an assignment.
    return _STATEMENT_WORD.search(sentence) is not None


def _fresh_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in used:
            used.add(name)
            return name


def _interleave(rng: random.Random, chains: list[list[str]]) -> list[str]:
    # A random merge that keeps each chain's own order (a chain must be readable front to back).
    order = [ci for ci, chain in enumerate(chains) for _ in chain]
    rng.shuffle(order)
    cursor = [0] * len(chains)
    out = []
    for ci in order:
        out.append(chains[ci][cursor[ci]])
        cursor[ci] += 1
    return out


def _wrong_sets(
    rng: random.Random, true: list[str], decoys: list[list[str]], used: set[str], k: int
) -> list[str]:
    seen = {frozenset(true)}
    out: list[str] = []
    for chain in rng.sample(decoys, len(decoys)):
        if len(out) < k and frozenset(chain) not in seen:
            seen.add(frozenset(chain))
            out.append(" ".join(chain))
    pool = [n for chain in decoys for n in chain]
    while len(out) < k:
        names = list(true)
        # Swapping in a name from the story is the hard negative; a fresh name keeps this
        # terminating when there are no distractor chains.
        names[rng.randrange(len(names))] = (
            rng.choice(pool) if pool and rng.random() < 0.5 else _fresh_name(rng, used)
        )
        if frozenset(names) not in seen and len(set(names)) == len(names):
            seen.add(frozenset(names))
            out.append(" ".join(names))
    return out


def generate_example(
    seed: int,
    index: int,
    *,
    context_tokens: int,
    count_tokens: CountTokens,
    filler: Sequence[str],
    hops: int = 3,
    distractors: int = 1,
    n_wrong: int = 3,
) -> TaskExample:
    """Example ``index`` of the variable-tracking set under ``seed``."""
    if hops < 0 or distractors < 0 or n_wrong < 0:
        raise ValueError(
            f"variable_tracking needs hops, distractors, n_wrong >= 0 (got {hops}, {distractors}, {n_wrong})"
        )
    rng = example_rng(TASK, seed, index)
    used: set[str] = set()
    values = [str(v) for v in rng.sample(range(10_000, 100_000), 1 + distractors)]
    chains = [[_fresh_name(rng, used) for _ in range(hops + 1)] for _ in values]
    statements_per_chain = [
        [f"VAR {chain[0]} = {value}."]
        + [f"VAR {chain[j]} = VAR {chain[j - 1]}." for j in range(1, len(chain))]
        for chain, value in zip(chains, values, strict=True)
    ]
    hay = build_prompt(
        rng,
        task=TASK,
        instructions=INSTRUCTIONS,
        statements=_interleave(rng, statements_per_chain),
        question=QUESTION.format(value=values[0]),
        context_tokens=context_tokens,
        count_tokens=count_tokens,
        filler=filler,
        reject=_reject,
    )
    true = chains[0]
    answer = " ".join(true)
    candidates, answer_index = place_answer(rng, answer, _wrong_sets(rng, true, chains[1:], used, n_wrong))
    return TaskExample(
        task=TASK,
        id=f"{TASK}-{seed}-{index}",
        prompt=hay.prompt,
        answer=answer,
        values=list(true),
        candidates=candidates,
        answer_index=answer_index,
        meta={
            "context_tokens": context_tokens,
            "prompt_tokens": hay.prompt_tokens,
            "filler_sentences": hay.filler_sentences,
            "value": values[0],
            "hops": hops,
            "distractors": distractors,
            "distractor_chains": chains[1:],
            "positions": hay.positions,
        },
    )


score = score_variable_tracking  # the rule lives in the task-file contract (pipeline/dataset/task_format.py)

"""Multi-value needle in a haystack (after the RULER "multi-value NIAH" task description).

Several distinct 7-digit numbers are stated for ONE key, each in its own needle sentence at a
seeded depth; distractor needles state numbers for OTHER keys. The question asks for all the
numbers of the key. Prompt (haystack truncated)::

    Some special magic numbers are hidden within the following text. Make sure to memorize them.
    I will quiz you about the numbers afterwards.

    <prose> The special magic number for quiet-harbor is: 4817263. <prose> The special magic
    number for amber-lantern is: 9021347. <prose> The special magic number for quiet-harbor
    is: 1938475. <prose> ...

    Question: What are all the special magic numbers for quiet-harbor mentioned in the provided text?
    Answer:

``answer`` is the key's numbers joined by ", " in order of appearance ("4817263, 1938475, ...");
``values`` are those numbers. A generation scores the fraction of the values found in it as whole
digit strings. ``candidates`` are the answer plus ``n_wrong`` same-length wrong lists (one value
swapped for a distractor's value or changed in one digit), shuffled.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from data_prep.retrieval_tasks.common import CountTokens, TaskExample, build_prompt, example_rng, place_answer
from pipeline.dataset.task_format import score_niah

TASK = "niah"

NEEDLE = "The special magic number for {key} is: {value}."
INSTRUCTIONS = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
QUESTION = "Question: What are all the special magic numbers for {key} mentioned in the provided text?"

# Keys are "adjective-noun" pairs: easy to tell apart, unlikely to occur in ordinary prose.
_ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "damp",
    "eager", "faint", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively",
    "lucky", "mellow", "misty", "noble", "odd", "pale", "polite", "proud", "quiet", "rapid",
    "rustic", "silent", "silver", "steady", "sturdy", "swift", "tender", "vivid", "wary", "witty",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "barrel", "beacon", "blanket", "bottle", "candle", "canyon", "castle", "cobbler",
    "compass", "cottage", "falcon", "feather", "gazebo", "glacier", "harbor", "helmet", "island", "kettle",
    "ladder", "lantern", "meadow", "mirror", "orchard", "otter", "pebble", "pepper", "pillow", "quarry",
    "saddle", "sparrow", "spindle", "teapot", "thimble", "tunnel", "violin", "walrus", "window", "zephyr",
)  # fmt: skip


def _reject(sentence: str) -> bool:
    # Prose that already talks about magic numbers would be an unplanned needle.
    return "magic number" in sentence.lower()


def _mutate_digit(rng: random.Random, value: str) -> str:
    pos = rng.randrange(len(value))
    digits = [d for d in "0123456789" if d != value[pos] and not (pos == 0 and d == "0")]
    return value[:pos] + rng.choice(digits) + value[pos + 1 :]


def _wrong_answers(rng: random.Random, true: list[str], decoys: list[str], k: int) -> list[str]:
    # Same number of values as the answer, so a likelihood ranking cannot prefer by length.
    seen = {", ".join(true)}
    out: list[str] = []
    while len(out) < k:
        vals = list(true)
        pos = rng.randrange(len(vals))
        pool = [d for d in decoys if d not in vals]
        vals[pos] = rng.choice(pool) if pool and rng.random() < 0.5 else _mutate_digit(rng, vals[pos])
        text = ", ".join(vals)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def generate_example(
    seed: int,
    index: int,
    *,
    context_tokens: int,
    count_tokens: CountTokens,
    filler: Sequence[str],
    values: int = 4,
    distractors: int = 2,
    n_wrong: int = 3,
) -> TaskExample:
    """Example ``index`` of the multi-value NIAH set under ``seed``."""
    if values < 1 or distractors < 0 or n_wrong < 0:
        raise ValueError(
            f"niah needs values >= 1, distractors >= 0, n_wrong >= 0 (got {values}, {distractors}, {n_wrong})"
        )
    rng = example_rng(TASK, seed, index)
    keys: list[str] = []
    while len(keys) < 1 + distractors:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in keys:
            keys.append(key)
    key, decoy_keys = keys[0], keys[1:]
    # sample() over a range draws distinct numbers without building the range
    nums = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), values + distractors)]
    needles = [(key, v) for v in nums[:values]] + list(zip(decoy_keys, nums[values:], strict=True))
    rng.shuffle(needles)
    true = [v for k, v in needles if k == key]
    hay = build_prompt(
        rng,
        task=TASK,
        instructions=INSTRUCTIONS,
        statements=[NEEDLE.format(key=k, value=v) for k, v in needles],
        question=QUESTION.format(key=key),
        context_tokens=context_tokens,
        count_tokens=count_tokens,
        filler=filler,
        reject=_reject,
    )
    answer = ", ".join(true)
    candidates, answer_index = place_answer(rng, answer, _wrong_answers(rng, true, nums[values:], n_wrong))
    return TaskExample(
        task=TASK,
        id=f"{TASK}-{seed}-{index}",
        prompt=hay.prompt,
        answer=answer,
        values=true,
        candidates=candidates,
        answer_index=answer_index,
        meta={
            "context_tokens": context_tokens,
            "prompt_tokens": hay.prompt_tokens,
            "filler_sentences": hay.filler_sentences,
            "key": key,
            "values": values,
            "distractors": distractors,
            "distractor_keys": decoy_keys,
            "needle_keys": [k for k, _ in needles],
            "positions": hay.positions,
        },
    )


score = score_niah  # the rule lives in the task-file contract (pipeline/dataset/task_format.py)

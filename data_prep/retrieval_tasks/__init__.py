"""Seeded, deterministic long-context retrieval tasks: multi-value NIAH, variable tracking, bAbI.

Each task hides its statements at seeded depths in caller-supplied prose, sized to a token budget,
and asks one question. An example carries the gold ``answer``, the ``values`` a generation is
scored on (:func:`score_generation`) and shuffled ``candidates`` for likelihood ranking::

    from data_prep.retrieval_tasks import generate, load_filler, score_generation, write_jsonl

    filler = load_filler("data/corpus/documents.jsonl")
    examples = generate("niah", 100, seed=0, context_tokens=512,
                        count_tokens=lambda s: len(s.split()), filler=filler, distractors=2)
    write_jsonl(examples, "niah.jsonl")
    score_generation(examples[0], model_output)  # in [0, 1]

See ``python -m data_prep.retrieval_tasks --help`` for the command line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from data_prep.retrieval_tasks import babi, niah, variable_tracking
from data_prep.retrieval_tasks.common import (
    CountTokens,
    TaskExample,
    TaskFileError,
    load_filler,
    read_jsonl,
    resolve_filler_path,
    write_jsonl,
)
from pipeline.dataset.task_format import score_generation

__all__ = [
    "TASKS",
    "TaskExample",
    "TaskFileError",
    "difficulty_knobs",
    "generate",
    "load_filler",
    "read_jsonl",
    "resolve_filler_path",
    "score_generation",
    "write_jsonl",
]

Generator = Callable[..., TaskExample]

TASKS: dict[str, Generator] = {
    niah.TASK: niah.generate_example,
    variable_tracking.TASK: variable_tracking.generate_example,
    babi.TASK: babi.generate_example,
}

_COMMON_ARGS = frozenset({"context_tokens", "count_tokens", "filler"})


def difficulty_knobs(task: str) -> dict[str, object]:
    """The difficulty knobs ``task`` accepts, with their defaults."""
    _check_task(task)
    params = inspect.signature(TASKS[task]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON_ARGS}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(sorted(TASKS))}")


def generate(
    task: str,
    n: int,
    *,
    seed: int,
    context_tokens: int,
    count_tokens: CountTokens,
    filler: Sequence[str],
    **difficulty: int,
) -> list[TaskExample]:
    """Examples ``0..n-1`` of ``task`` under ``seed``; example i does not depend on ``n``."""
    knobs = difficulty_knobs(task)
    unknown = sorted(set(difficulty) - set(knobs))
    if unknown:
        raise ValueError(
            f"task {task!r} has no difficulty knob {', '.join(map(repr, unknown))} (knobs: {', '.join(knobs)})"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    filler = list(filler)  # once, so a generator or iterator argument is indexable by every example
    return [
        TASKS[task](
            seed, i, context_tokens=context_tokens, count_tokens=count_tokens, filler=filler, **difficulty
        )
        for i in range(n)
    ]

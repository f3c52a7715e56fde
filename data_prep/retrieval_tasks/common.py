"""Shared pieces of the long-context retrieval tasks: the example record, seeding, the haystack.

Every task builds a prompt of the same shape::

    {instructions}

    {haystack: filler prose with the task's statements hidden at seeded positions}

    {question}
    Answer:

The haystack is filled with caller-supplied prose sentences until the next one would push the
prompt past ``context_tokens`` (as counted by the caller's ``count_tokens``). Statements keep the
order the task gives them; their slots come from sorted uniform draws, so they land at seeded depths.

Each example draws from its own ``random.Random`` seeded by a stable hash of (task, seed, index):
example ``i`` is the same whether 10 or 100 examples are generated, and the draws never depend on
the tokenizer (so a different ``count_tokens`` changes only how much filler fits).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.corpus import CorpusError, CorpusStats, iter_documents, resolve_inputs
from data_prep.sample_corpus import sample_documents
from pipeline.dataset.seeding import seed_of
from pipeline.dataset.task_format import TaskExample, TaskFileError, numbers, read_jsonl, words, write_jsonl

__all__ = ["TaskExample", "TaskFileError", "numbers", "read_jsonl", "words", "write_jsonl"]

CountTokens = Callable[[str], int]

# --------------------------------------------------------------------------- seeding


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (unlike salted ``hash()``)."""
    return seed_of(*(str(p) for p in parts))


def example_rng(task: str, seed: int, index: int) -> random.Random:
    """The private random stream of example ``index`` of ``task`` under ``seed``."""
    return random.Random(stable_seed(task, seed, index))


def place_answer(rng: random.Random, answer: str, wrong: Sequence[str]) -> tuple[list[str], int]:
    """Shuffle the answer in among wrong candidates so its position says nothing; return (list, index)."""
    candidates = [answer, *wrong]
    if len(set(candidates)) != len(candidates):
        raise AssertionError(f"candidates are not unique: {candidates}")
    rng.shuffle(candidates)
    return candidates, candidates.index(answer)


# --------------------------------------------------------------------------- haystack


@dataclass(frozen=True)
class Haystack:
    prompt: str
    prompt_tokens: int
    filler_sentences: int
    positions: list[float]  # start of each statement as a fraction of the haystack's characters


def _clean(sentence: str) -> str:
    return " ".join(sentence.split())


def _cycle(filler: Sequence[str], start: int, reject: Callable[[str], bool] | None) -> Iterator[str]:
    # Consecutive sentences from a seeded start keep the prose locally coherent (like an essay
    # haystack) and cost O(1) per example, unlike reshuffling a 20k-sentence list each time.
    n = len(filler)
    i, idle = start, 0
    while True:
        sentence = _clean(filler[i % n])
        i += 1
        if sentence and not (reject is not None and reject(sentence)):
            idle = 0
            yield sentence
        else:
            idle += 1
            if idle >= n:
                raise ValueError("no usable filler sentence: all are blank or look like task statements")


def _assemble(
    instructions: str,
    statements: Sequence[str],
    fractions: Sequence[float],
    sentences: Sequence[str],
    question: str,
) -> tuple[str, list[float]]:
    m = len(sentences)
    # sorted fractions -> non-decreasing slots, so statements keep their order
    slots = [min(m, int(f * (m + 1))) for f in fractions]
    pieces: list[str] = []
    starts: list[int] = []
    offset = 0
    j = 0
    for i in range(m + 1):
        while j < len(statements) and slots[j] == i:
            starts.append(offset)
            pieces.append(statements[j])
            offset += len(statements[j]) + 1
            j += 1
        if i < m:
            pieces.append(sentences[i])
            offset += len(sentences[i]) + 1
    context = " ".join(pieces)
    positions = [round(s / max(1, len(context)), 4) for s in starts]
    head = f"{instructions}\n\n" if instructions else ""
    return f"{head}{context}\n\n{question}\nAnswer:", positions


def build_prompt(
    rng: random.Random,
    *,
    task: str,
    instructions: str,
    statements: Sequence[str],
    question: str,
    context_tokens: int,
    count_tokens: CountTokens,
    filler: Sequence[str],
    reject: Callable[[str], bool] | None = None,
) -> Haystack:
    """Hide ``statements`` (in order) in filler prose so the prompt fits ``context_tokens``.

    ``reject`` skips filler sentences that could be mistaken for task statements.
    Raises ValueError when even an empty haystack does not fit.
    """
    if not filler:
        raise ValueError("filler is empty: pass some prose sentences (see load_filler)")
    # Draw everything up front so the random stream does not depend on the tokenizer.
    fractions = sorted(rng.random() for _ in statements)
    source = _cycle(filler, rng.randrange(len(filler)), reject)

    def assemble(sentences: Sequence[str]) -> tuple[str, list[float]]:
        return _assemble(instructions, statements, fractions, sentences, question)

    fixed = count_tokens(assemble([])[0])
    if fixed > context_tokens:
        raise ValueError(
            f"context_tokens={context_tokens} is too small for task {task!r}: its {len(statements)} "
            f"statements, the question and the instructions alone take {fixed} tokens "
            f"(use context_tokens >= {fixed})"
        )
    budget = context_tokens - fixed
    chosen: list[str] = []
    costs: list[int] = []
    total = 0
    while True:
        sentence = next(source)
        cost = max(1, count_tokens(sentence))  # >= 1 so zero-token sentences cannot loop forever
        if total + cost > budget:
            break
        chosen.append(sentence)
        costs.append(cost)
        total += cost
    prompt, positions = assemble(chosen)
    tokens = count_tokens(prompt)
    while tokens > context_tokens:
        # Per-sentence counts can undercount what the joins add (subword merges at boundaries):
        # drop enough trailing sentences to cover the excess, then count the whole prompt again.
        excess = tokens - context_tokens
        while chosen and excess > 0:
            excess -= costs.pop()
            chosen.pop()
        prompt, positions = assemble(chosen)
        tokens = count_tokens(prompt)
    return Haystack(prompt=prompt, prompt_tokens=tokens, filler_sentences=len(chosen), positions=positions)


# --------------------------------------------------------------------------- filler

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str, min_words: int = 4, max_words: int = 60) -> list[str]:
    """Split on . ! ? followed by whitespace; collapse whitespace; keep 4-60 word sentences."""
    out = []
    for raw in _SENTENCE_END.split(text):
        sentence = _clean(raw)
        if min_words <= len(sentence.split()) <= max_words:
            out.append(sentence)
    return out


def resolve_filler_path(spec: str) -> Path:
    """``"sample"`` -> the sample corpus's documents.jsonl (fetched once into the cache); else a path."""
    if spec != "sample":
        return Path(spec)

    return sample_documents(progress=False)


def load_filler(path: str | Path, max_sentences: int = 20000) -> list[str]:
    """Prose sentences for haystacks from any corpus file ``make data`` reads (.txt, .jsonl[.gz]
    with a "text" field, .parquet); read by data_prep/corpus.py, so errors name the file and line."""

    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: filler file not found")
    out: list[str] = []
    try:
        (resolved,) = resolve_inputs([str(path)])
        for doc in iter_documents([(resolved, "text")], CorpusStats()):  # streamed: stops early
            for sentence in split_sentences(doc.text):
                out.append(sentence)
                if len(out) >= max_sentences:
                    return out
    except CorpusError as exc:
        raise TaskFileError(f"filler: {exc}") from None
    if not out:
        raise TaskFileError(f"{path}: no sentences of 4-60 words found")
    return out

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

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CountTokens = Callable[[str], int]

_FIELD_TYPES: dict[str, type] = {
    "task": str,
    "id": str,
    "prompt": str,
    "answer": str,
    "values": list,
    "candidates": list,
    "answer_index": int,
    "meta": dict,
}


@dataclass
class TaskExample:
    """One prompt with its gold answer, what the scorer looks for, and multiple-choice candidates."""

    task: str
    id: str
    prompt: str  # full context + question, ends with "\nAnswer:"
    answer: str  # gold response text (short)
    values: list[str]  # what score_generation looks for in a generation
    candidates: list[str]  # for likelihood ranking; candidates[answer_index] == answer
    answer_index: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (a deep copy: editing it leaves the example alone)."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> TaskExample:
        """Build from :meth:`to_json` output; ValueError names the missing or bad key."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        kwargs: dict[str, Any] = {}
        for name, typ in _FIELD_TYPES.items():
            if name not in obj:
                if name == "meta":  # optional: hand-written files may leave it out
                    kwargs[name] = {}
                    continue
                raise ValueError(f"missing key {name!r}")
            value = obj[name]
            # bool is an int subclass; a true/false answer_index is a bug, not an index
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise ValueError(f"bad key {name!r}: expected {typ.__name__}, got {type(value).__name__}")
            if typ is list and not all(isinstance(v, str) for v in value):
                raise ValueError(f"bad key {name!r}: expected a list of strings")
            kwargs[name] = value
        if not 0 <= kwargs["answer_index"] < len(kwargs["candidates"]):
            raise ValueError(
                f"bad key 'answer_index': {kwargs['answer_index']} is out of range "
                f"for {len(kwargs['candidates'])} candidates"
            )
        return cls(**kwargs)


class TaskFileError(ValueError):
    """A task or filler file that cannot be read; the message names the file (and line)."""


# --------------------------------------------------------------------------- seeding


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process (unlike salted ``hash()``)."""
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def example_rng(task: str, seed: int, index: int) -> random.Random:
    """The private random stream of example ``index`` of ``task`` under ``seed``."""
    return random.Random(stable_seed(task, seed, index))


# --------------------------------------------------------------------------- scoring helpers

_WORD = re.compile(r"[^\W_]+")
_NUMBER = re.compile(r"\d+")


def words(text: str) -> list[str]:
    """Case-folded alphanumeric runs: scorers compare these, so case and punctuation never matter."""
    return _WORD.findall(text.casefold())


def numbers(text: str) -> list[str]:
    """Maximal digit runs, so ``1234567`` does not match inside ``12345678``."""
    return _NUMBER.findall(text)


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
    from data_prep.sample_corpus import sample_documents

    return sample_documents(progress=False)


def load_filler(path: str | Path, max_sentences: int = 20000) -> list[str]:
    """Prose sentences for haystacks from any corpus file ``make data`` reads (.txt, .jsonl[.gz]
    with a "text" field, .parquet); read by data_prep/corpus.py, so errors name the file and line."""
    from data_prep.corpus import CorpusError, CorpusStats, iter_documents, resolve_inputs

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


# --------------------------------------------------------------------------- jsonl


def write_jsonl(examples: Iterable[TaskExample], path: str | Path) -> int:
    """Write one example per line atomically (tmp file + os.replace); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        # a failure part-way leaves the old file (if any) and no stray tmp file
        tmp.unlink(missing_ok=True)
    return count


def read_jsonl(path: str | Path) -> list[TaskExample]:
    """Read :func:`write_jsonl` output; TaskFileError names the file, line and missing/bad key."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found")
    out = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskFileError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                try:
                    out.append(TaskExample.from_json(obj))
                except ValueError as exc:
                    raise TaskFileError(f"{path}:{lineno}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path}:{lineno + 1}: not UTF-8 ({exc.reason})") from None
    return out

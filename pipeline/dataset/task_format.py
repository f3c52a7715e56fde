"""The task-file contract between the generators (data_prep/retrieval_tasks) and evaluation (pipeline/eval).

A task file is JSON lines of :class:`TaskExample`; :func:`score_generation` scores a model's text
for an example with its task's rule. Generators write these files, evaluation reads and scores
them; neither imports the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic_io import atomic_write_text

# the rooms of the bAbI-style task, in candidate order (its generator and its scorer share them)
BABI_ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
_ROOM_SET = frozenset(BABI_ROOMS)

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


# --------------------------------------------------------------------------- scoring helpers

_WORD = re.compile(r"[^\W_]+")
_NUMBER = re.compile(r"\d+")


def words(text: str) -> list[str]:
    """Case-folded alphanumeric runs: scorers compare these, so case and punctuation never matter."""
    return _WORD.findall(text.casefold())


def numbers(text: str) -> list[str]:
    """Maximal digit runs, so ``1234567`` does not match inside ``12345678``."""
    return _NUMBER.findall(text)


def score_niah(values: Sequence[str], text: str) -> float:
    """Fraction of ``values`` that occur in ``text`` as whole digit strings."""
    if not values:
        return 0.0
    found = set(numbers(text))
    return sum(v in found for v in values) / len(values)


def score_variable_tracking(values: Sequence[str], text: str) -> float:
    """1.0 when every name in ``values`` appears in ``text`` as a whole word, else 0.0."""
    if not values:
        return 0.0
    found = set(words(text))
    return 1.0 if all(v.casefold() in found for v in values) else 0.0


def score_babi(values: Sequence[str], text: str) -> float:
    """1.0 when the first room named in ``text`` is ``values[0]``, else 0.0."""
    if not values:
        return 0.0
    first = next((w for w in words(text) if w in _ROOM_SET), None)
    return 1.0 if first == values[0].casefold() else 0.0


SCORERS: dict[str, Callable[[Sequence[str], str], float]] = {
    "niah": score_niah,
    "variable_tracking": score_variable_tracking,
    "babi": score_babi,
}


def score_generation(example: TaskExample, text: str) -> float:
    """Score a model's generated ``text`` for ``example`` in [0, 1] with the task's own rule."""
    if example.task not in SCORERS:
        raise ValueError(f"unknown task {example.task!r}; choose from {', '.join(sorted(SCORERS))}")
    return SCORERS[example.task](example.values, text)


# --------------------------------------------------------------------------- jsonl


def write_jsonl(examples: Iterable[TaskExample], path: str | Path) -> int:
    """Write one example per line atomically; return the count. A failure part-way leaves the old
    file (if any) and no stray temporary file."""
    lines = [json.dumps(ex.to_json(), ensure_ascii=False) + "\n" for ex in examples]
    atomic_write_text(Path(path), "".join(lines))
    return len(lines)


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

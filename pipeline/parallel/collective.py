"""Decisions made once, on rank 0, and shared: a choice, a check, a file write.

    value = on_rank0_all(work, "choosing the checkpoint")   # every rank returns work()'s result

If ``work`` raises on rank 0, rank 0 raises it and every other rank raises the same type with the
same message, so all ranks stop together instead of waiting in the next collective for a rank that
has already left, and each reports the same one-line error.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def on_rank0_all(work: Callable[[], T], what: str) -> T:
    """Collective: ``work()`` on rank 0 only; its result, or the exception it raised, on every rank.

    ``what`` names the step when the exception's type cannot be rebuilt elsewhere (a RuntimeError
    naming it and the original type and message is raised there instead)."""
    answer: list[Any] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            answer[0] = ("ok", work())
        except Exception as exc:
            error = exc
            answer[0] = ("raise", _describe(exc))
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if error is not None:
        raise error
    if kind == "raise":
        raise _rebuild(value, what)
    return value


def _describe(exc: Exception) -> tuple[str, str, str, dict[str, Any]]:
    """What travels: the exception's class (module, name), message and picklable attributes."""
    attrs = {k: v for k, v in vars(exc).items() if _picklable(v)}
    return type(exc).__module__, type(exc).__qualname__, str(exc), attrs


def _rebuild(described: tuple[str, str, str, dict[str, Any]], what: str) -> Exception:
    """The same exception type with the same message (its ``__init__`` is not called: exception
    classes that take other arguments than their message are rebuilt too)."""
    module, name, message, attrs = described
    try:
        cls: Any = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(name)
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        exc.__dict__.update(attrs)
        return exc
    except Exception:
        return RuntimeError(f"{what}: {name}: {message}")


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False

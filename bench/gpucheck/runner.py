"""Stages, the global time budget, and the runner that goes through the stages in order: each
one timed and recorded as ``pass``, ``fail`` (with its error and the tail of its log) or
``skipped: ...``, whatever happens to the others."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class StageError(RuntimeError):
    """A stage's failure: a one-line reason and the tail of what its command printed."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


@dataclass
class Stage:
    name: str
    fn: Callable[[], dict[str, Any]]  # returns the stage's figures; raises on failure
    min_s: float = 0.0  # least time it needs: not started when less of the budget is left
    requires: tuple[str, ...] = ()  # stages that must have passed (when they were run)


@dataclass
class Budget:
    """The global time budget; ``clock`` is injectable for tests."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


def _run_one(st: Stage, rec: dict[str, Any], budget: Budget) -> None:
    """Run ``st`` and fill ``rec`` with its status, figures, error and time."""
    t0 = budget.clock()
    try:
        rec["figures"] = st.fn() or {}
        rec["status"] = "pass"
    except StageError as exc:
        rec["status"] = "fail"
        rec["error"] = str(exc)
        rec["error_tail"] = exc.tail[-3000:]
        rec["figures"] = getattr(exc, "figures", {}) or {}
    except Exception as exc:  # a bug or an unexpected state: recorded, the next stage runs
        rec["status"] = "fail"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["error_tail"] = traceback.format_exc()[-3000:]
    rec["seconds"] = round(budget.clock() - t0, 2)


def run_stages(
    stages: list[Stage], budget: Budget, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run ``stages`` in order; one record per stage, whatever happens to the others."""
    records: list[dict[str, Any]] = []
    status: dict[str, str] = {}
    for st in stages:
        rec: dict[str, Any] = {"name": st.name, "status": "", "seconds": 0.0, "figures": {}}
        unmet = [r for r in st.requires if r in status and status[r] != "pass"]
        if unmet:
            rec["status"] = f"skipped: needs {', '.join(unmet)}"
        elif budget.remaining() < st.min_s:
            rec["status"] = "skipped: time budget"
            rec["error"] = (
                f"{budget.remaining():.0f} s left of {budget.seconds:.0f}, stage needs >= {st.min_s:.0f} s"
            )
        else:
            _run_one(st, rec, budget)
        status[st.name] = rec["status"]
        records.append(rec)
        log(
            f"[gpu-check] {st.name}: {rec['status']} ({rec['seconds']:.1f} s)"
            + (f" -- {rec['error']}" if rec.get("error") else "")
        )
    return records

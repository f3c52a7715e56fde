"""The resume stage's verdict: a run killed at its first checkpoint and resumed must log the
uninterrupted reference run's losses (train ``loss`` and every ``eval/*``) at every step, within a
relative tolerance."""

from __future__ import annotations

from typing import Any


def resume_parity(
    reference: list[dict[str, Any]], resumed: list[dict[str, Any]], rtol: float, after_step: int = 0
) -> dict[str, Any]:
    """Compare the resumed run's losses (train ``loss`` and every ``eval/*``) with the reference's,
    step by step; ``ok`` when every step the reference logged after ``after_step`` is there and
    every value is within ``rtol`` (relative)."""
    ref = {r["step"]: r for r in reference if "step" in r}
    res = {r["step"]: r for r in resumed if "step" in r}
    wanted = [s for s in sorted(ref) if s > after_step]
    missing = [s for s in wanted if s not in res]
    worst: dict[str, Any] = {"rel": 0.0, "abs": 0.0, "step": None, "key": None}
    compared = 0
    for s in wanted:
        if s not in res:
            continue
        for key, a in ref[s].items():
            if not (key == "loss" or key.startswith("eval/")) or not isinstance(a, (int, float)):
                continue
            b = res[s].get(key)
            if not isinstance(b, (int, float)):
                missing.append(s)
                continue
            compared += 1
            diff = abs(a - b)
            rel = diff / max(abs(a), 1e-12)
            if rel > worst["rel"] or worst["step"] is None:
                worst = {"rel": rel, "abs": diff, "step": s, "key": key, "reference": a, "resumed": b}
    ok = compared > 0 and not missing and worst["rel"] <= rtol
    return {
        "ok": ok,
        "rtol": rtol,
        "compared_values": compared,
        "steps_compared": [s for s in wanted if s in res],
        "missing_steps": sorted(set(missing)),
        "exact": compared > 0 and worst["abs"] == 0.0,
        "max_rel_diff": worst["rel"],
        "max_abs_diff": worst["abs"],
        "worst": worst,
    }


def parity_failure(parity: dict[str, Any], before_kill_rel: float, rtol: float, resumed_from: int) -> str:
    """Why a failed :func:`resume_parity` failed. ``before_kill_rel``: the largest relative
    difference over the steps up to the checkpoint, which ran before the kill (a difference there
    is not the resume's)."""
    return (
        f"resumed losses differ from the uninterrupted run: max relative diff {parity['max_rel_diff']:.3g} "
        f"at step {parity['worst'].get('step')} ({parity['worst'].get('key')}), tolerance {rtol:g}; "
        f"missing steps {parity['missing_steps'][:10]}"
        + (
            f"; the runs already differ before the kill (max {before_kill_rel:.3g} up to "
            f"step {resumed_from}): nondeterminism or changed code, not the resume"
            if before_kill_rel > rtol
            else ""
        )
    )

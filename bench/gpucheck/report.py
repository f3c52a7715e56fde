"""The GPU check's JSON report (``bench/results/gpu_check.json``): the environment headline,
every stage's record, the figures by stage, and whether all passed."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from bench.gpucheck.common import SCHEMA
from bench.gpucheck.runner import Budget


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def build_report(
    records: list[dict[str, Any]], budget: Budget, started: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """The JSON document: environment headline, every stage, the figures by stage, overall ok."""
    by_name = {r["name"]: r for r in records}
    env = by_name.get("environment", {}).get("figures", {})
    return {
        "schema": SCHEMA,
        "started": started,
        "finished": now(),
        "elapsed_s": round(budget.elapsed(), 2),
        "budget_s": budget.seconds,
        "ok": bool(records) and all(r["status"] == "pass" for r in records),
        "gpu": env.get("gpu"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda_runtime"),
        "environment": env,
        "settings": settings,
        "stages": [{k: v for k, v in r.items() if k != "figures"} for r in records],
        "figures": {r["name"]: r["figures"] for r in records},
    }


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write ``report`` to ``path`` atomically (a temporary sibling, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path

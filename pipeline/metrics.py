"""What a training step reports besides its loss: peak memory, and the ``metrics.jsonl`` record file
(one record per logged step, across any number of resumes). FLOPs and MFU come from the one cost
model (pipeline/perf/cost.py) and the MFU peak (pipeline/hardware/peak.py)."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic_io import atomic_write_text


def peak_memory_mib() -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsFile:
    """``<run_dir>/metrics.jsonl``: appended by rank 0, one JSON record per logged step."""

    def __init__(self, path: Path):
        self.path = path

    def drop_after(self, step: int) -> None:
        """Keep only records of steps <= ``step`` (atomically): a job killed after its last
        checkpoint logged steps that the resumed job trains again; they must not appear twice."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record so far (none yet: a run resumed at its last step logs nothing new)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

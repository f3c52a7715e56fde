"""The train state: everything a run carries from step to step besides what DeepSpeed holds
(weights, optimizer, LR schedule), saved and restored with every checkpoint as one unit.

    state = TrainState()                               # a fresh run
    state.data = loader.state_dict()                   # this rank's data position, before a save
    record = state.shared()                            # the JSON every rank agrees on
    state = TrainState.restore(train_state_json)       # from a checkpoint (data: per rank)

Shared by every rank: the step, the samples consumed (global batches of every step, void steps
included: the data position moves on), the counters, the MLflow run. Per rank: the data position
(one loader state per data-parallel rank; the trainer restores the right one, or carries them
over slot by slot after a resize) and the RNG states (:func:`capture_rng` / :func:`restore_rng`,
written by the checkpoint as ``rng/rank-K.*``). ``nonfinite_run`` (the current streak of voided
steps) is not saved: a resumed run starts a fresh streak.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.dataset.seeding import seed_of


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    nonfinite_total: int = 0  # steps voided by a non-finite loss
    inner_skipped_total: float = 0.0  # MemDLM inner updates skipped for a non-finite inner loss
    skipped_shards_total: int = 0  # corrupt shards skipped (on_corrupt_shard: skip), all ranks
    mlflow_run_id: str | None = None
    data: dict[str, Any] | None = None  # this rank's loader state
    nonfinite_run: int = field(default=0, compare=False)

    def counters(self) -> dict[str, Any]:
        return {
            "nonfinite_total": self.nonfinite_total,
            "inner_skipped_total": self.inner_skipped_total,
            "skipped_shards_total": self.skipped_shards_total,
        }

    def shared(self) -> dict[str, Any]:
        """The fields every rank agrees on, as ``train_state.json`` holds them (the checkpoint
        adds every rank's ``data`` and its own records: config, manifest hash, layout)."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "counters": self.counters(),
            "mlflow_run_id": self.mlflow_run_id,
        }

    @classmethod
    def restore(cls, saved: dict[str, Any], global_batch: int = 0) -> TrainState:
        """The state a checkpoint's ``train_state.json`` holds (its ``data`` is left to the caller:
        which entry is this rank's depends on the layout). Checkpoints written before
        ``consumed_samples`` existed count ``step * global_batch``."""
        counters = saved.get("counters") or {}
        step = int(saved["step"])
        return cls(
            step=step,
            consumed_samples=int(saved.get("consumed_samples", step * global_batch)),
            nonfinite_total=int(counters.get("nonfinite_total", 0)),
            inner_skipped_total=float(counters.get("inner_skipped_total", 0.0)),
            skipped_shards_total=int(counters.get("skipped_shards_total", 0)),  # older: none recorded
            mlflow_run_id=saved.get("mlflow_run_id"),
        )


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's RNG states: (torch and CUDA, as tensors; numpy and Python, as JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Set this rank's RNG states from what :func:`capture_rng` returned."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """RNG streams of a rank that has no saved state of its own (after a resize)."""
    value = seed_of(seed, step, "global-rng", rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)

"""Atomic checkpoints: a DeepSpeed checkpoint plus the explicit train state, never half-written.

Layout under ``<run_dir>/checkpoints``::

    step-000100/ds/...           engine.save_checkpoint (model, ZeRO optimizer, LR scheduler) per rank
    step-000100/rng/rank-K.pt    torch (and CUDA) RNG state of rank K: tensors only (weights_only load)
    step-000100/rng/rank-K.json  Python and numpy RNG state of rank K
    step-000100/train_state.json step, data-loader state of every data-parallel rank, resolved
                                 config, dataset manifest hash, world layout, counters
    latest                       name of the newest complete checkpoint (replaced atomically)

A save writes everything into ``.tmp-step-000100``; rank 0 renames it to ``step-000100`` only
after every rank has finished, and only then repoints ``latest``. A kill at any moment leaves
``latest`` on the previous complete checkpoint; stale ``.tmp-*`` folders are removed by the next
save. Loading unpickles nothing but what DeepSpeed's own loader requires: train state is JSON,
RNG states are ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


@dataclass
class Layout:
    world: int
    tp: int
    dp: int


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    train_state: dict[str, Any],
    data_states: list[dict[str, Any]],
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``data_states`` holds this rank's loader state(s); rank 0 gathers those of every
    data-parallel rank into ``train_state.json``.
    """
    rank = dist.get_rank()
    name = checkpoint_name(step)
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving a step (e.g. after a resume at that step)
            shutil.rmtree(final)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    tensors, meta = _rng_state()
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(tensors, tmp / "rng" / f"rank-{rank:05d}.pt")
    (tmp / "rng" / f"rank-{rank:05d}.json").write_text(json.dumps(meta))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, data_states)
    dist.barrier()
    if rank == 0:
        state = dict(train_state, step=step, data=gathered)
        _fsync_write(tmp / "train_state.json", json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, final)
        _fsync_write(ckpt_dir / LATEST, name + "\n")
        done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "train_state.json").is_file())
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path, layout: Layout, manifest_sha256: str) -> dict[str, Any]:
    """Collective. Restores engine, RNG; returns the train state (caller restores the loader)."""
    state = json.loads((path / "train_state.json").read_text())
    saved = state.get("layout", {})
    if (saved.get("tp"), saved.get("dp")) != (layout.tp, layout.dp):
        raise CheckpointError(
            f"{path}: written with TP={saved.get('tp')} x DP={saved.get('dp')}, this run is TP={layout.tp} x "
            f"DP={layout.dp}. Resuming needs the same layout (ZeRO-3 optimizer state is partitioned per rank and "
            "the data position per data-parallel rank). Use the same world size, or export the weights and "
            "start a new run from them."
        )
    if state.get("manifest_sha256") != manifest_sha256:
        raise CheckpointError(
            f"{path}: written for a dataset with manifest sha256 {str(state.get('manifest_sha256'))[:12]}…, this "
            f"run's dataset has {manifest_sha256[:12]}…; the data position would not mean the same samples"
        )
    load_path, _ = engine.load_checkpoint(
        str(path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint under tag 'ds'")
    rank = dist.get_rank()
    tensors = torch.load(path / "rng" / f"rank-{rank:05d}.pt", weights_only=True)
    meta = json.loads((path / "rng" / f"rank-{rank:05d}.json").read_text())
    _set_rng_state(tensors, meta)
    return state

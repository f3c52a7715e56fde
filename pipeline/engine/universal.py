"""Elastic resume: DeepSpeed's universal checkpoint over our megatron-core TP layout.

    make reshard CHECKPOINT=runs/local/checkpoints/step-000100        # ahead of time (pipeline/engine/reshard.py)
    convert_to_universal(checkpoint)                                   # what it and an elastic resume call

A ZeRO-3 checkpoint is partitioned per data-parallel rank and, with TP, per tensor-parallel rank:
it only loads at the layout that wrote it. DeepSpeed's ``ds_to_universal`` rewrites it as one
file per parameter and state (fp32 master, Adam ``exp_avg``/``exp_avg_sq``, step), each the
*full* tensor, and ZeRO-3's ``load_universal`` path cuts those tensors again for whatever
TP x DP layout loads them. Nothing here reshards optimizer state by hand; this module only

* relies on the model's description of how its layers are cut, attached before the engine is
  built by its family's parallel plan (pipeline/parallel/tp_layout.py for megatron-core layers);
* converts a published checkpoint once (:func:`convert_to_universal`) into
  ``<checkpoint>/universal/``, written under a temporary name, listed in its own ``files.json``
  and renamed into place, so a kill mid-conversion leaves the original untouched and no
  half-written universal folder that a resume would trust;
* carries the *frozen* parameters over (the base under outer LoRA: not the optimizer's, so
  ``ds_to_universal`` skips them and ZeRO-3's universal load never restores them). They are
  described to DeepSpeed by geometry only (an affine map, no category pattern: the converter's
  strict check counts a category pattern that names no optimizer parameter as unused), and
  written from the checkpoint's own ``frozen_param_fragments`` as one full tensor each,
  ``universal/frozen/<name>.safetensors``; :func:`restore_frozen` cuts them again. After a resize
  the frozen base is therefore bit for bit the checkpoint's, whatever ``init_from`` holds now.

Trust boundary (what is unpickled, when, after which check):

* ``make reshard`` / an elastic resume verify the checkpoint's sizes and sha256 against its
  ``files.json`` (:func:`pipeline.engine.checkpoint.verify_checkpoint`) before anything of it is
  unpickled; a checkpoint without ``files.json`` is refused (nothing to verify it against);
* then DeepSpeed's ``ds_to_universal`` unpickles ``ds/*_optim_states.pt`` and
  ``ds/*_model_states.pt`` with ``weights_only=False``: DeepSpeed's own loader and format (they
  hold DeepSpeed objects such as ``ZeroStageEnum``, which ``weights_only=True`` refuses);
* our own reads are tensors only: the frozen fragments (``torch.load(weights_only=True,
  mmap=True)`` of the model states), the containers rewritten by :func:`pipeline.patches.deepspeed.wrap_bare_universal_tensors`
  (``weights_only=True``), the frozen tensors (safetensors, no pickle);
* the universal copy has its own ``files.json``; a resume verifies it (:func:`has_universal`,
  sha256) before DeepSpeed's universal loader unpickles its files (``weights_only=False``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.engine.checkpoint import (
    FILE_LIST,
    CheckpointError,
    DamagedCheckpoint,
    verify_checkpoint,
    write_file_list,
)
from pipeline.parallel.tp_layout import affine_maps, pattern_of
from pipeline.patches.deepspeed import wrap_bare_universal_tensors

UNIVERSAL_DIR = "universal"
FROZEN_DIR = "frozen"  # <checkpoint>/universal/frozen/<parameter name>.safetensors
_TMP = ".tmp-universal"
_SOURCE = "source.json"
# source.json "format": 2 = with the frozen parameters. An older copy lacks them: converted again.
_FORMAT = 2
_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
# deepspeed is imported inside the functions here: heavy, and pipeline/engine/deepspeed.py chooses
# its accelerator before the first import


def universal_dir(checkpoint: Path) -> Path:
    """Where the universal copy of ``checkpoint`` lives (``<checkpoint>/universal``)."""
    return Path(checkpoint) / UNIVERSAL_DIR


def has_universal(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a complete, verified universal copy of the current format."""
    out = universal_dir(checkpoint)
    if not (out / _SOURCE).is_file():
        return False
    try:
        verify_checkpoint(out, hashes=True, required=_SOURCE)
        source = json.loads((out / _SOURCE).read_text(encoding="utf-8"))
    except (DamagedCheckpoint, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(source, dict) and source.get("format") == _FORMAT


def verify_source(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files cannot be trusted to be unpickled: its sizes and sha256
    against its ``files.json`` (``DamagedCheckpoint`` naming the first bad file), or no
    ``files.json`` at all (``CheckpointError``: nothing to verify it against)."""
    if not (checkpoint / FILE_LIST).is_file():
        raise CheckpointError(
            f"{checkpoint}: no {FILE_LIST}, so its files cannot be verified before DeepSpeed's converter "
            "unpickles them; resume it at the TP x DP layout that wrote it (train_state.json 'layout')"
        )
    verify_checkpoint(checkpoint, hashes=True)


def convert_to_universal(checkpoint: str | Path, quiet: bool = True, verified: bool = False) -> Path:
    """Write ``<checkpoint>/universal/ds`` from ``<checkpoint>/ds`` with DeepSpeed's converter,
    and the frozen parameters to ``<checkpoint>/universal/frozen``.

    One process, no collectives (the trainer runs it on rank 0 while the others wait). A
    complete universal copy already there is reused. The checkpoint is verified against its
    ``files.json`` before anything is unpickled (``verified``: the caller has just hashed it;
    ``files.json`` is still required). Raises ``CheckpointError`` naming the checkpoint (or the
    damaged file) and DeepSpeed's reason when the checkpoint cannot be converted."""
    checkpoint = Path(checkpoint)
    out = universal_dir(checkpoint)
    if has_universal(checkpoint):
        return out
    source = checkpoint / "ds"
    state_file = checkpoint / "train_state.json"
    if not source.is_dir() or not state_file.is_file():
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (expected ds/ and train_state.json)")
    if not (verified and (checkpoint / FILE_LIST).is_file()):  # else hashed by the caller just before
        verify_source(checkpoint)
    tmp = checkpoint / _TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _run_converter(source, tmp / "ds", quiet)
    except Exception as exc:  # DeepSpeed reports most bad input with assert (an Exception too)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{checkpoint}: DeepSpeed's ds_to_universal could not convert it ({type(exc).__name__}: {exc}). "
            "Resume it at the TP x DP layout that wrote it (train_state.json 'layout')."
        ) from exc
    try:
        frozen = _write_frozen(source, tmp / FROZEN_DIR)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{checkpoint}: its frozen parameters could not be carried over ({type(exc).__name__}: {exc}). "
            "Resume it at the TP x DP layout that wrote it (train_state.json 'layout')."
        ) from exc
    wrap_bare_universal_tensors(tmp / "ds" / "zero")
    _publish(checkpoint, tmp, json.loads(state_file.read_text(encoding="utf-8")), frozen)
    return out


def _run_converter(source: Path, out: Path, quiet: bool) -> None:
    """DeepSpeed's ``ds_to_universal`` from ``source`` (a DeepSpeed checkpoint folder) into ``out``."""
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.checkpoint import (
        ds_to_universal,
    )

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(out),
        num_extract_workers=1,  # in-process: no fork of a process that holds a process group
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        ds_to_universal.main(args)


def _publish(checkpoint: Path, tmp: Path, state: dict[str, Any], frozen: int) -> None:
    """``source.json`` and ``files.json`` into ``tmp``, then ``tmp`` renamed to ``universal/``."""
    out = universal_dir(checkpoint)
    record = {"layout": state.get("layout"), "step": state.get("step"), "format": _FORMAT, "frozen": frozen}
    (tmp / _SOURCE).write_text(json.dumps(record, indent=1, sort_keys=True))
    write_file_list(tmp)
    if out.exists():
        shutil.rmtree(out)  # an incomplete or older copy (it failed has_universal above)
    os.replace(tmp, out)
    fd = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------ frozen parameters
def _tensors_only(file: Path) -> dict[str, Any]:
    """A DeepSpeed model-states file read without running any pickled code (memory-mapped: the
    8B base's fragments are not read into memory all at once)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{file}: could not read it as tensors only ({type(exc).__name__}: {exc})"
        ) from exc


def _model_states(source: Path) -> dict[int, list[dict[str, Any]]]:
    """The model-states files of a DeepSpeed checkpoint, read: TP rank -> [DP rank 0, 1, ...]."""
    grid: dict[int, dict[int, Path]] = {}
    for file in source.glob("*model_states.pt"):
        m = _MODEL_STATES.match(file.name)
        if m:
            grid.setdefault(int(m.group(2)), {})[int(m.group(1) or 0)] = file
    if sorted(grid) != list(range(len(grid))) or not grid:
        raise CheckpointError(f"{source}: expected model-states files of TP ranks 0..N, found {sorted(grid)}")
    return {tp: [_tensors_only(by_dp[dp]) for dp in sorted(by_dp)] for tp, by_dp in grid.items()}


def _join_partitions(name: str, fragments: list[torch.Tensor], shape: Any) -> torch.Tensor:
    """One TP rank's tensor of ``shape`` from its ZeRO partitions (DP rank order, the last padded)."""
    numel = math.prod(shape)
    flat = torch.cat([f.reshape(-1) for f in fragments])
    if flat.numel() != math.ceil(numel / len(fragments)) * len(fragments):
        raise CheckpointError(
            f"frozen parameter {name}: partitions of {flat.numel()} elements in all for a tensor of "
            f"{list(shape)} over {len(fragments)} rank(s)"
        )
    return flat[:numel].reshape(tuple(shape)).clone()


def _write_frozen(source: Path, out: Path) -> int:
    """Each frozen parameter (``frozen_param_fragments`` of the model states: ZeRO-2/3 saves the
    parameters outside the optimizer there) as its full tensor, ``out/<name>.safetensors``, in its
    own dtype. TP shards are joined by the parameter's affine map. Returns how many were written."""
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.checkpoint.affine import (
        ParamAffineMap,
    )
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
    )

    states = _model_states(source)
    first = states[0][0]
    shapes = first.get("frozen_param_shapes") or {}
    maps = affine_maps(first.get(UNIVERSAL_CHECKPOINT_INFO) or {})
    out.mkdir(parents=True, exist_ok=True)
    for name in shapes:
        shards = {
            tp: _join_partitions(
                name,
                [s["frozen_param_fragments"][name] for s in per_dp],
                per_dp[0]["frozen_param_shapes"][name],
            )
            for tp, per_dp in states.items()
        }
        if len(shards) == 1:
            full = shards[0]
        elif pattern_of(name) in maps:  # rebuild also checks that replicated shards agree
            full = ParamAffineMap.from_dict(maps[pattern_of(name)]).rebuild(shards)
        else:
            raise CheckpointError(
                f"frozen parameter {name}: the checkpoint does not say how its {len(shards)} TP shards join "
                "(written before frozen parameters were described)"
            )
        save_file({"param": full.contiguous()}, str(out / f"{name}.safetensors"))
    return len(shapes)


def restore_frozen(model: torch.nn.Module, checkpoint: Path) -> int:
    """Copy the frozen parameters of ``checkpoint``'s universal copy into ``model`` at this run's
    layout: each rank reads its TP slice (contiguous along ``partition_dim``, as
    :func:`describe_tensor_parallel_layout` describes it) and keeps its ZeRO-3 partition. No
    collective. Returns how many; ``CheckpointError`` naming a missing or mismatched file."""
    folder = universal_dir(checkpoint) / FROZEN_DIR
    count = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        file = folder / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(
                f"{file}: missing; the universal copy holds no frozen parameter {name} (delete "
                f"{universal_dir(checkpoint)} and convert again: make reshard CHECKPOINT={checkpoint})"
            )
        local = tuple(getattr(p, "ds_shape", p.shape))
        with safe_open(str(file), framework="pt") as f:
            part = f.get_slice("param")
            index = [slice(None)] * len(part.get_shape())
            if getattr(p, "tensor_model_parallel", False):
                tp, tp_rank = model.dims.tp, model.dims.tp_rank
                size = part.get_shape()[p.partition_dim] // tp
                index[p.partition_dim] = slice(tp_rank * size, (tp_rank + 1) * size)
            shard = part[tuple(index)]
        if tuple(shard.shape) != local:
            raise CheckpointError(
                f"{file}: a slice of {list(shard.shape)} for {name}, this run holds {list(local)}"
            )
        _copy_into(p, shard)
        count += 1
    return count


@torch.no_grad()
def _copy_into(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """``value`` (this rank's full TP shard of ``p``) into ``p``: its ZeRO-3 partition, and the
    gathered tensor a persistent (small, never released) ZeRO-3 parameter keeps too."""
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.runtime.zero.partition_parameters import (
        ZeroParamStatus,
    )

    if not hasattr(p, "ds_id"):
        p.data.copy_(value)
        return
    size = p.ds_tensor.ds_numel
    start = size * dist.get_rank(group=p.ds_process_group)
    piece = value.reshape(-1)[start : start + size]
    p.ds_tensor.data.zero_()
    p.ds_tensor.data[: piece.numel()].copy_(piece)
    if p.ds_status == ZeroParamStatus.AVAILABLE:
        p.data.copy_(value.reshape(p.data.shape))

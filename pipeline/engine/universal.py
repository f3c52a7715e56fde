"""Elastic resume: DeepSpeed's universal checkpoint over our megatron-core TP layout.

    make reshard CHECKPOINT=runs/local/checkpoints/step-000100        # ahead of time
    python -m pipeline.engine.universal runs/local/checkpoints/step-000100

A ZeRO-3 checkpoint is partitioned per data-parallel rank and, with TP, per tensor-parallel rank:
it only loads at the layout that wrote it. DeepSpeed's ``ds_to_universal`` rewrites it as one
file per parameter and state (fp32 master, Adam ``exp_avg``/``exp_avg_sq``, step), each the
*full* tensor, and ZeRO-3's ``load_universal`` path cuts those tensors again for whatever
TP x DP layout loads them. Nothing here reshards optimizer state by hand; this module only

* tells DeepSpeed how our layers are cut (:func:`describe_tensor_parallel_layout`): every
  megatron-core parameter with ``tensor_model_parallel`` is a contiguous split along its
  ``partition_dim`` (our fused QKV rows are laid out per KV group and our vocabulary padding is
  TP-independent, see pipeline/model/transformer.py, so a plain split is exact); everything else
  is replicated. DeepSpeed records this per parameter (restore side) and per model (conversion
  side), in the same schema its own AutoTP layers use;
* converts a published checkpoint once (:func:`convert_to_universal`) into
  ``<checkpoint>/universal/``, written under a temporary name, listed in its own ``files.json``
  and renamed into place, so a kill mid-conversion leaves the original untouched and no
  half-written universal folder that a resume would trust.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError

UNIVERSAL_DIR = "universal"
_TMP = ".tmp-universal"
_SOURCE = "source.json"


def describe_tensor_parallel_layout(model: torch.nn.Module, tp: int) -> dict[str, Any]:
    """Attach DeepSpeed's universal-checkpoint metadata to ``model`` (before ``deepspeed.initialize``).

    Per parameter (``ds_autotp_universal_checkpoint_meta``): how a full tensor is cut for this
    rank; read when a universal checkpoint is loaded. Per model (``universal_checkpoint_info``,
    saved into every checkpoint's model states): how ``ds_to_universal`` merges the TP shards.
    Returns the model-level info. Works on ZeRO-3-partitioned parameters (uses ``ds_shape``)."""
    from deepspeed.checkpoint.affine import contiguous_split_map
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META, UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.module_inject.layers import (
        _build_param_uc_restore_meta,
        collect_autotp_universal_checkpoint_info,
    )

    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            continue  # replicated on every TP rank: DeepSpeed's default for undescribed parameters
        dim = int(p.partition_dim)
        local = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves p.shape as an empty partition
        full = list(local)
        full[dim] *= tp
        sizes = [local[dim]] * tp
        setattr(
            p,
            DS_AUTOTP_UC_META,
            _build_param_uc_restore_meta(
                partition_type="row" if dim == 1 else "column",
                partition_dim=dim,
                logical_shape=full,
                partition_sizes=sizes,
                original_shape=full,
                affine_map=contiguous_split_map(full, sizes, dim),
            ),
        )
    # The collector takes the TP degree from a module attribute (AutoTP layers carry one); the
    # replicated parameters' maps need it.
    model.tp_world_size = tp
    info = collect_autotp_universal_checkpoint_info(model)
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, info)
    return info


def universal_dir(checkpoint: Path) -> Path:
    """Where the universal copy of ``checkpoint`` lives (``<checkpoint>/universal``)."""
    return Path(checkpoint) / UNIVERSAL_DIR


def has_universal(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a complete, verified universal copy."""
    from pipeline.engine.checkpoint import DamagedCheckpoint, verify_checkpoint

    out = universal_dir(checkpoint)
    if not (out / _SOURCE).is_file():
        return False
    try:
        verify_checkpoint(out, hashes=True, required=_SOURCE)
    except DamagedCheckpoint:
        return False
    return True


def convert_to_universal(checkpoint: str | Path, quiet: bool = True) -> Path:
    """Write ``<checkpoint>/universal/ds`` from ``<checkpoint>/ds`` with DeepSpeed's converter.

    One process, no collectives (the trainer runs it on rank 0 while the others wait). A
    complete universal copy already there is reused. Raises ``CheckpointError`` naming the
    checkpoint and DeepSpeed's reason when the checkpoint cannot be converted."""
    from deepspeed.checkpoint import ds_to_universal

    from pipeline.engine.checkpoint import CheckpointError, write_file_list

    checkpoint = Path(checkpoint)
    out = universal_dir(checkpoint)
    if has_universal(checkpoint):
        return out
    source = checkpoint / "ds"
    state_file = checkpoint / "train_state.json"
    if not source.is_dir() or not state_file.is_file():
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (expected ds/ and train_state.json)")
    tmp = checkpoint / _TMP
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(tmp / "ds"),
        num_extract_workers=1,  # in-process: no fork of a process that holds a process group
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            ds_to_universal.main(args)
    except Exception as exc:  # DeepSpeed reports most bad input with assert (an Exception too)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{checkpoint}: DeepSpeed's ds_to_universal could not convert it ({type(exc).__name__}: {exc}). "
            "Resume it at the TP x DP layout that wrote it (train_state.json 'layout')."
        ) from exc
    _wrap_bare_tensors(tmp / "ds" / "zero")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    (tmp / _SOURCE).write_text(
        json.dumps({"layout": state.get("layout"), "step": state.get("step")}, indent=1, sort_keys=True)
    )
    write_file_list(tmp)
    if out.exists():
        shutil.rmtree(out)  # an incomplete copy (it failed verification above)
    os.replace(tmp, out)
    fd = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def _wrap_bare_tensors(zero: Path) -> None:
    """Store every state as ``{"param": tensor}``, the form ZeRO-3's universal loader cuts for TP.

    ``ds_to_universal`` writes that form for a TP>1 source but a bare tensor for a TP=1 one, and
    the loader only applies a parameter's TP layout to the dict form: a TP=1 checkpoint resumed at
    TP=2 would load every full tensor into a half-size shard. Same values, another container."""
    from deepspeed.checkpoint.constants import PARAM

    for file in sorted(zero.glob("*/*.pt")):
        if file.stem not in ("fp32", "exp_avg", "exp_avg_sq"):
            continue
        value = torch.load(file, weights_only=False)
        if isinstance(value, torch.Tensor):
            torch.save({PARAM: value}, file)


def _check_target(path: Path, state: dict[str, Any], tp: int | None, dp: int | None) -> str | None:
    """What a resume at ``tp`` x ``dp`` will do (its grad_accum); an error when it cannot."""
    if tp is None and dp is None:
        return None
    from pipeline.engine.checkpoint import Layout
    from pipeline.engine.elastic import plan_resume, saved_layout
    from pipeline.model.config import ModelConfig

    saved = saved_layout(state)
    tp, dp = tp or saved.tp, dp or saved.dp
    ModelConfig(**state["config"]["model"]).check_tp(tp)  # heads, KV heads, FFN, vocab divide by TP
    plan = plan_resume(path, state, Layout(tp * dp, tp, dp, saved.grad_accum, saved.micro_batch))
    return f"resuming at TP={tp} x DP={dp}: {plan.describe()}"


def main(argv: list[str] | None = None) -> int:
    """``make reshard CHECKPOINT=...``: convert a checkpoint so any TP x DP layout can resume it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (runs/<run>/checkpoints/step-NNNNNN) or its run's checkpoints/",
    )
    parser.add_argument("--tp", type=int, help="check that this tensor-parallel size can resume it")
    parser.add_argument("--dp", type=int, help="check that this data-parallel size can resume it")
    args = parser.parse_args(argv)
    from pipeline.engine.checkpoint import CheckpointError, select_checkpoint

    path = Path(args.checkpoint)
    try:
        if not (path / "train_state.json").is_file():
            chosen = select_checkpoint(path)
            if chosen is None:
                raise CheckpointError(
                    f"{path}: no checkpoint here (expected step-NNNNNN folders or one of them)"
                )
            path = chosen
        state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
        layout = state.get("layout", {})
        target = _check_target(path, state, args.tp, args.dp)
        out = convert_to_universal(path)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if target:
        print(target)
    print(
        f"universal checkpoint ready: {out} (written at TP={layout.get('tp')} x DP={layout.get('dp')}); "
        "resume the run at any TP x DP whose grad_accum keeps the global batch: the trainer loads it automatically"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

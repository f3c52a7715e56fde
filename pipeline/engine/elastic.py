"""What a resume at another TP x DP layout keeps, what it changes, and when it must refuse.

Kept exactly: the weights, Adam moments and Adam's step counters (DeepSpeed's universal
checkpoint, gathered to full tensors and cut again: pipeline/engine/universal.py), the frozen
parameters (the base under outer LoRA: from the checkpoint, not from ``init_from`` again), the
step, the LR schedule, the global batch (``dp * grad_accum * batch_size`` sequences:
``grad_accum`` absorbs the change of ``dp``), and the data position (the rest of the epoch in the
same global batches, then the next epoch split for the new layout: pipeline/loader/stream.py). The
anchor noise is keyed by the global micro-batch slot, not by the rank, so MDLM's losses after a
resize equal the uninterrupted run's up to summation order.

Changed: which rank holds which rows, and so MemDLM's memory scope (one memory per micro-batch
slot across the DP ranks: with fewer ranks and more accumulation each memory adapts on fewer
rows), and the per-rank global RNG streams (reseeded from ``(seed, step, rank)``; nothing in the
training step draws from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist

from pipeline.config import ConfigError
from pipeline.engine.checkpoint import (
    CheckpointError,
    Layout,
    check_dataset,
    load_checkpoint,
    load_engine_state,
    on_rank0,
    restore_buffers,
)
from pipeline.engine.universal import convert_to_universal, has_universal, restore_frozen, universal_dir
from pipeline.families.registry import get_family
from pipeline.patches.deepspeed import universal_load_repairs
from pipeline.train_state import reseed_rng


@dataclass(frozen=True)
class ResumePlan:
    """A verified checkpoint to resume from, and the layout it was written at vs this run's."""

    path: Path
    state: dict[str, Any]  # its train_state.json
    saved: Layout
    current: Layout

    @property
    def resized(self) -> bool:
        return (self.saved.tp, self.saved.dp, self.saved.ep) != (
            self.current.tp,
            self.current.dp,
            self.current.ep,
        )

    def describe(self) -> str:
        s, c = self.saved, self.current
        return (
            f"{_sizes(s)} (grad_accum {s.grad_accum}) -> {_sizes(c)} (grad_accum "
            f"{c.grad_accum}): global batch {c.dp * c.grad_accum * c.micro_batch} sequences kept"
        )


def _sizes(layout: Layout) -> str:
    return f"TP={layout.tp} x DP={layout.dp}" + (f" (EP={layout.ep})" if layout.ep > 1 else "")


def saved_layout(state: dict[str, Any]) -> Layout:
    """The layout a checkpoint was written at (older ones lack grad_accum / micro_batch: from its config)."""
    layout = dict(state.get("layout") or {})
    config = (state.get("config") or {}) if isinstance(state.get("config"), dict) else {}
    layout.setdefault("grad_accum", int(config.get("grad_accum", 1)))
    layout.setdefault("micro_batch", int((config.get("data") or {}).get("batch_size", 0)))
    layout.setdefault("ep", 1)  # written before expert parallelism
    return Layout(**{k: int(layout[k]) for k in ("world", "tp", "dp", "grad_accum", "micro_batch", "ep")})


def _unconvertible_experts(state: dict[str, Any], saved: Layout) -> str | None:
    """Why DeepSpeed's converter cannot take this checkpoint's experts to another layout (None:
    it can, or the model has none): written at TP > 1 ('AutoEP + AutoTP' is refused), or with
    frozen experts (outer LoRA: they are not in the optimizer shards the converter reads)."""
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    model = config.get("model") or {}
    try:
        experts = get_family(str(model.get("family", "dense"))).expert_parallel
    except ConfigError:  # a family this installation does not know: the engine build will say so
        return None
    if not experts:
        return None
    if saved.tp > 1:
        return "written at TP > 1 (its converter refuses 'AutoEP + AutoTP')"
    if (config.get("lora") or {}).get("enabled"):
        return "with frozen experts (outer LoRA: they are not in the optimizer shards its converter reads)"
    return None


def plan_resume(path: Path, state: dict[str, Any], current: Layout) -> ResumePlan:
    """The resume of ``path`` at ``current`` (whose ``grad_accum`` is the config's).

    At the saved TP x DP the config's ``grad_accum`` stands. At another one ``grad_accum`` becomes
    whatever keeps the saved global batch; ``CheckpointError`` when no integer does, or when the
    micro-batch size changed (the data position counts micro-batches of that size)."""
    saved = saved_layout(state)
    ranks = sorted({entry[0].get("rank") for entry in state.get("data") or [] if entry})
    if ranks != list(range(saved.dp)):
        raise CheckpointError(
            f"{path / 'train_state.json'}: data-loader states of DP ranks {ranks}, but its layout says DP="
            f"{saved.dp}; the checkpoint is inconsistent (restore it, or resume from an earlier one)"
        )
    if (saved.tp, saved.dp, saved.ep) == (current.tp, current.dp, current.ep):
        return ResumePlan(path, state, saved, current)
    unconvertible = _unconvertible_experts(state, saved)
    if unconvertible:
        raise CheckpointError(
            f"{path}: a mixture-of-experts checkpoint written at {_sizes(saved)}; DeepSpeed 0.19.8 cannot convert "
            f"one {unconvertible} to another layout. Resume it at {_sizes(saved)} (this run is {_sizes(current)})"
        )
    if saved.micro_batch != current.micro_batch:
        raise CheckpointError(
            f"{path}: written with data.batch_size={saved.micro_batch}, this run has {current.micro_batch}; a "
            f"resume at another layout keeps the micro-batch size (set data.batch_size={saved.micro_batch})"
        )
    micro_batches = saved.dp * saved.grad_accum  # per step, over all DP ranks
    if micro_batches % current.dp:
        raise CheckpointError(
            f"{path}: its global batch is {micro_batches} micro-batches of {saved.micro_batch} (DP={saved.dp} x "
            f"grad_accum={saved.grad_accum}), which DP={current.dp} cannot split evenly; resume on a number of "
            f"data-parallel ranks that divides {micro_batches}"
        )
    grown = Layout(
        current.world, current.tp, current.dp, micro_batches // current.dp, current.micro_batch, current.ep
    )
    return ResumePlan(path, state, saved, grown)


def prepare_universal(plan: ResumePlan, reshard: Literal["auto", "never"]) -> None:
    """Collective: make sure ``plan.path`` has its universal copy. Rank 0 converts it (with a log
    line) under ``reshard=auto``; ``never`` without a copy, or a failed conversion, raises the
    same ``CheckpointError`` on every rank, saying what to run."""

    def convert() -> None:
        if has_universal(plan.path):
            return
        if reshard == "never":
            raise CheckpointError(
                f"{plan.path}: written at {_sizes(plan.saved)}, this run is {_sizes(plan.current)}, and "
                "checkpoint.reshard=never. Run `make "
                f"reshard CHECKPOINT={plan.path}` (DeepSpeed's universal checkpoint) and resume again, "
                "or set checkpoint.reshard=auto"
            )
        print(f"elastic resume: converting {plan.path} to a universal checkpoint", flush=True)
        # find_resume_checkpoint verified its sha256 on this rank a moment ago
        convert_to_universal(plan.path, verified=True)

    on_rank0(convert)


def resume_engine(engine, plan: ResumePlan, manifest_sha256: str) -> dict[str, Any]:
    """Collective: restore ``engine`` (and the RNG) from ``plan``; returns its train state.

    At the saved layout: the checkpoint as written (pipeline/engine/checkpoint.py). At another one:
    its universal copy (the engine must be built with ``load_universal``), with DeepSpeed's
    universal-load repairs (pipeline/patches/deepspeed.py), the frozen parameters from the copy
    (bit for bit, not from ``init_from``), and the global RNG reseeded from (seed, step, rank)."""
    if not plan.resized:
        return load_checkpoint(engine, plan.path, plan.state, manifest_sha256)
    check_dataset(plan.path, plan.state, manifest_sha256)
    repairs = universal_load_repairs(engine, engine.module.dims.tp_group)
    load_engine_state(engine, universal_dir(plan.path), repairs)
    # DeepSpeed's universal load restores the optimizer's parameters only: the frozen ones (the
    # base under outer LoRA) come from the checkpoint's universal copy too
    restore_frozen(engine.module, plan.path)
    restore_buffers(engine.module, plan.path)  # nor the buffers (a router's balancing bias)
    seed = int((plan.state.get("config") or {}).get("seed", 0))
    reseed_rng(seed, int(plan.state["step"]), dist.get_rank())
    return plan.state

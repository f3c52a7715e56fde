"""DeepSpeed ZeRO over megatron-core tensor parallelism.

    engine = build_engine(cfg, model_fn)    # after init_distributed(tp)

* ``MegatronMPU`` gives DeepSpeed the names it expects (``get_model_parallel_*``,
  ``get_data_parallel_*``, ...) over megatron's ``parallel_state``. Without it
  (``mpu=None`` with TP=2) ZeRO averages the TP shards across TP ranks: silently wrong.
* ZeRO partitions over the data-parallel group only; ``zero.Init`` gets that group explicitly
  (without ``data_parallel_group`` it partitions over the whole world: silently wrong).
* A client ``torch.optim.AdamW`` (DeepSpeed's fused/CPU Adam would compile C++ first),
  explicit ``gradient_clipping`` (0.19.8 defaults it to 1.0), warm-up + cosine LR, bf16 or fp32
  as :func:`pipeline.hardware.precision.resolve_precision` decides for the device.
* The caller runs inner-loop forwards through ``engine.module`` and only the outer loss
  through ``engine(...)`` / ``engine.backward`` / ``engine.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipeline.families import family_of
from pipeline.hardware.device import training_device
from pipeline.hardware.precision import Precision, resolve_precision
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.mpu import MegatronMPU
from pipeline.patches.deepspeed import skip_shm_comm_build
from pipeline.train_config import TrainConfig


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to ``lr`` over the warm-up steps (``warmup_steps``, or ``warmup_fraction``
    of ``steps``), then cosine down to ``lr * min_lr_ratio``."""
    o = cfg.optim
    total = cfg.steps
    warmup = o.warmup_for(total)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def ds_config(
    cfg: TrainConfig, dp_size: int, precision: Precision, load_universal: bool = False
) -> dict[str, Any]:
    """DeepSpeed's config for ``cfg`` at ``dp_size`` data-parallel ranks. ``load_universal``: the
    next ``load_checkpoint`` reads a universal checkpoint (pipeline/engine/universal.py)."""
    p = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        d2 = cfg.model.d_model**2
        zero.update(
            stage3_param_persistence_threshold=p.param_persistence_threshold,
            overlap_comm=False,  # nothing to overlap on gloo; keeps CPU runs deterministic
            contiguous_gradients=True,
            # Buckets sized to the model (the "auto" rule of the HF integration). DeepSpeed's
            # defaults (5e8 / 5e7 elements) allocated ~3 GiB per rank for a 20M-parameter model.
            reduce_bucket_size=d2,
            stage3_prefetch_bucket_size=int(0.9 * d2),
        )
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        # The trainer owns the accumulation boundary: one engine.step() per training step, after
        # the micro-batches it kept (a non-finite one voids the step on every rank instead of
        # shifting DeepSpeed's micro-step counter off the step count, LR schedule and checkpoints).
        "managed_gradient_accumulation": False,
        "bf16": {"enabled": precision.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def _build_model(
    cfg: TrainConfig, model_fn: Callable[[], torch.nn.Module], mpu: MegatronMPU, precision: Precision
) -> torch.nn.Module:
    """``model_fn()``, inside ``zero.Init`` (partitioned over the DP group at creation) when configured."""
    import deepspeed  # heavy, and it picks its accelerator at import: after skip_shm_comm_build

    if not (cfg.parallel.zero_init and cfg.parallel.zero_stage == 3):
        return model_fn()
    # zero.Init checks the batch sizes against the DP size it reads through deepspeed.comm,
    # which deepspeed.initialize would set up only later: unset, it takes DP=1 and refuses
    # every config with DP > 1 (train_batch_size != micro x accumulation x 1). Set up here
    # the way deepspeed.initialize does it (over the torch process group already there).
    deepspeed.comm.init_distributed(
        dist_backend=deepspeed.get_accelerator().communication_backend_name(), dist_init_required=False
    )
    with deepspeed.zero.Init(
        data_parallel_group=mpu.get_data_parallel_group(),
        mpu=mpu,
        config_dict_or_path=ds_config(cfg, mpu.get_data_parallel_world_size(), precision),
    ):
        return model_fn()


def build_engine(
    cfg: TrainConfig,
    dims: ParallelDims,
    model_fn: Callable[[], torch.nn.Module],
    precision: Precision | None = None,
    load_universal: bool = False,
):
    """Build the model (inside ``zero.Init`` when configured) and wrap it in a DeepSpeed engine.

    ``precision``: the run's resolved precision (bf16 weights + fp32 masters, or fp32 throughout);
    by default ``cfg.parallel.precision`` resolved for the training device. One ``engine.step()``
    per optimizer step, after all its micro-batches' ``engine.backward`` (explicit boundary).
    Returns ``(engine, optimizer, scheduler)``. Weights must be final before this call: ZeRO's
    fp32 master copy overwrites later changes at the next step (load through the engine).
    ``load_universal``: the engine will resume from a universal checkpoint (another TP x DP layout).
    """
    skip_shm_comm_build()
    import deepspeed  # heavy, and it picks its accelerator at import: after skip_shm_comm_build

    if precision is None:
        precision = resolve_precision(cfg.parallel.precision, training_device())

    mpu = MegatronMPU()
    model = _build_model(cfg, model_fn, mpu, precision)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (the base under outer LoRA): not the optimizer's
            continue
        # Under zero.Init a parameter's data is already an empty 1-D partition: p.dim() says 1
        # for every weight, and weight decay silently vanishes. ds_shape is the real shape.
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) < 2 or "norm" in name else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],  # LoRA has no 1-D tensors: no empty group for ZeRO
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    # Every checkpoint records how the shards join, so any checkpoint can become universal.
    family_of(cfg.model).plan.describe(model, dims)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        mpu=mpu,
        config=ds_config(cfg, mpu.get_data_parallel_world_size(), precision, load_universal),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler

"""How our megatron-core tensor-parallel layout is described to DeepSpeed's universal checkpoint.

    describe_tensor_parallel_layout(model, tp)    # before deepspeed.initialize; any family's plan

Every megatron-core parameter with ``tensor_model_parallel`` is a contiguous split along its
``partition_dim`` (our fused QKV rows are laid out per KV group and our vocabulary padding is
TP-independent, so a plain split is exact); everything else is replicated. DeepSpeed records this
per parameter (restore side) and per model (conversion side), in the same schema its own AutoTP
layers use. Frozen parameters (the base under outer LoRA) keep their geometry only: DeepSpeed's
converter handles the optimizer's parameters, and pipeline/engine/universal.py writes the frozen
ones itself.
"""

from __future__ import annotations

import re
from typing import Any

import torch


def describe_tensor_parallel_layout(model: torch.nn.Module, tp: int) -> dict[str, Any]:
    """Attach DeepSpeed's universal-checkpoint metadata to ``model`` (before ``deepspeed.initialize``).

    Per parameter (``ds_autotp_universal_checkpoint_meta``): how a full tensor is cut for this
    rank; read when a universal checkpoint is loaded. Per model (``universal_checkpoint_info``,
    saved into every checkpoint's model states): how ``ds_to_universal`` merges the TP shards.
    Returns the model-level info. Works on ZeRO-3-partitioned parameters (uses ``ds_shape``)."""
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.checkpoint.affine import (
        contiguous_split_map,
    )
    from deepspeed.checkpoint.constants import (
        DS_AUTOTP_UC_META,
        UNIVERSAL_CHECKPOINT_INFO,
    )
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
    _fix_replicated_shapes(model, info, tp)
    _describe_frozen_by_geometry_only(model, info)
    _leave_experts_to_deepspeed(model, info)
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, info)
    return info


def pattern_of(name: str) -> str:
    """The pattern DeepSpeed's collector gives parameter ``name``."""
    return rf"^{re.escape(name)}$"


def affine_maps(info: dict[str, Any]) -> dict[str, Any]:
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.checkpoint.constants import (
        AFFINE_MAP,
        AFFINE_MAP_PARAMS,
    )

    return (info.get(AFFINE_MAP) or {}).get(AFFINE_MAP_PARAMS) or {}


def _fix_replicated_shapes(model: torch.nn.Module, info: dict[str, Any], tp: int) -> None:
    """The replicated parameters' maps at their real shapes.

    The collector sizes them with ``param.shape``, which under ``zero.Init`` is the empty local
    partition: a map of 0 elements, which the converter refuses for every real shard."""
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.checkpoint.affine import (
        replicated_map,
    )

    maps = affine_maps(info)
    for name, p in model.named_parameters():
        if pattern_of(name) in maps and not getattr(p, "tensor_model_parallel", False):
            maps[pattern_of(name)] = replicated_map(tuple(getattr(p, "ds_shape", p.shape)), tp).to_dict()


def _drop_from_categories(info: dict[str, Any], patterns: set[str]) -> None:
    """Remove ``patterns`` from every TP category list of ``info`` (their affine maps stay)."""
    # heavy: DeepSpeed takes seconds to import and picks its accelerator then
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        PARAMETER_WITH_SUB_PARAMS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        VOCABULARY_PARAMETER_PATTERNS,
    )

    for key in (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        VOCABULARY_PARAMETER_PATTERNS,
    ):
        info[key] = [pattern for pattern in info.get(key, []) if pattern not in patterns]
    info[PARAMETER_WITH_SUB_PARAMS] = [
        entry for entry in info.get(PARAMETER_WITH_SUB_PARAMS, []) if not patterns & set(entry["patterns"])
    ]


def _leave_experts_to_deepspeed(model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Expert-parallel parameters (DeepSpeed's AutoEP placement) are joined by DeepSpeed's expert
    path of ``ds_to_universal`` (all E experts from the EP ranks), never by the TP merge: no TP
    category and no TP affine map, or the converter's strict check fails on unused patterns."""
    experts = {
        pattern_of(name)
        for name, p in model.named_parameters()
        if getattr(p, "ds_zero_placement_family", None) == "autoep_expert"
    }
    if not experts:
        return
    _drop_from_categories(info, experts)
    maps = affine_maps(info)
    for pattern in experts:
        maps.pop(pattern, None)


def _describe_frozen_by_geometry_only(model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Drop the frozen parameters from the category lists, keep their affine maps.

    ``ds_to_universal`` converts the optimizer's parameters only, and its strict check fails on a
    category pattern no converted parameter matched; an affine map is only consulted for the
    parameters it converts. :func:`_write_frozen` reads the maps to join the frozen TP shards."""
    frozen = {pattern_of(name) for name, p in model.named_parameters() if not p.requires_grad}
    if frozen:
        _drop_from_categories(info, frozen)

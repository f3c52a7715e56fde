"""A tensor-parallel linear layer with an optional delta on its weight, passed at call time.

    y = delta_linear(layer.gate, x, delta, "gate")   # W x (+ (scale) B A x, or + dW x)

``delta`` maps ``"<name>.A"``/``"<name>.B"`` (low rank, with ``"scale"``) or ``"<name>.W"``
(full) to tensors, optionally with a leading per-sample dimension. The model knows nothing of
what fills it (MemDLM's fast weights, pipeline/memory/fast_weights.py, are one user); it only
knows how each weight's delta is sharded like the weight over tensor-parallel ranks:

==============  =====================================  =====================================
                column-parallel (qkv, gate, up)        row-parallel (out, down)
==============  =====================================  =====================================
low-rank ``A``  [r, in]  replicated over TP             [r, in/tp]  sharded like W
low-rank ``B``  [out/tp, r]  sharded like W             [out, r]  replicated
full ``W``      [out/tp, in]  sharded like W            [out, in/tp]  sharded like W
==============  =====================================  =====================================
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch.distributed import ProcessGroup

COLUMN_TARGETS = ("qkv", "gate", "up")
ROW_TARGETS = ("out", "down")
Delta = Mapping[str, torch.Tensor] | None


def _low_rank(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [B, T, i] times m^T, m [o, i] (shared) or [B, o, i] (per sample) -> [B, T, o]."""
    if m.dim() == 2:
        return x @ m.t().to(x.dtype)
    return torch.einsum("bti,boi->bto", x, m.to(x.dtype))


def apply_column_delta(
    x: torch.Tensor, fast: Mapping[str, torch.Tensor], name: str, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Extra output of a column-parallel linear: x [B, T, in] (replicated) -> [B, T, out/tp].
    ``group``: the linear's tensor-parallel group."""
    if name + ".W" in fast:
        # dW is sharded like W; the copy makes autograd all-reduce x's gradient over TP.
        return _low_rank(copy_to_tensor_model_parallel_region(x, group), fast[name + ".W"])
    u = _low_rank(x, fast[name + ".A"])  # [B, T, r], identical on every TP rank
    # Backward all-reduces dL/du over TP so A (replicated) gets the full gradient.
    u = copy_to_tensor_model_parallel_region(u, group)
    return fast["scale"].to(x.dtype) * _low_rank(u, fast[name + ".B"])


def apply_row_delta(
    x: torch.Tensor, fast: Mapping[str, torch.Tensor], name: str, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Extra output of a row-parallel linear: x [B, T, in/tp] (sharded) -> [B, T, out] (summed over TP)."""
    if name + ".W" in fast:
        return reduce_from_tensor_model_parallel_region(_low_rank(x, fast[name + ".W"]), group)
    u = reduce_from_tensor_model_parallel_region(
        _low_rank(x, fast[name + ".A"]), group
    )  # [B, T, r]: sum of shards
    return fast["scale"].to(x.dtype) * _low_rank(u, fast[name + ".B"])


def delta_linear(
    lin: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor, delta: Delta, name: str
) -> torch.Tensor:
    """``lin(x)`` plus the delta named ``name`` when ``delta`` holds one; x [B, T, in(/tp)]."""
    y, _ = lin(x)
    if delta is not None and (name + ".A" in delta or name + ".W" in delta):
        apply = apply_column_delta if isinstance(lin, ColumnParallelLinear) else apply_row_delta
        y = y + apply(x, delta, name, lin.tp_group)
    return y

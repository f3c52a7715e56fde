"""Full tensors from tensor-parallel shards, for the 2-process workers that compare layouts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests._models import current_dims


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The full tensor whose TP shards along ``dim`` the ranks of this TP group hold (a copy)."""
    if current_dims().tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(current_dims().tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=current_dims().tp_group)
    return torch.cat(parts, dim=dim)

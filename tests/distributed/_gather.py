"""Full tensors from tensor-parallel shards, for the 2-process workers that compare layouts."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.model.parallel import tp_group, tp_size


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The full tensor whose TP shards along ``dim`` the ranks of this TP group hold (a copy)."""
    if tp_size() == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp_size())]
    dist.all_gather(parts, t.detach().contiguous(), group=tp_group())
    return torch.cat(parts, dim=dim)

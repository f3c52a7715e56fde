"""What every distributed worker script does around its own work: switch TP layouts inside one
launch (a 2-process start costs ~10 s, so one launch compares several layouts), save the results on
rank 0, and leave the process group together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pipeline.parallel.dims import ParallelDims, init_distributed


def at_tp(tp: int) -> ParallelDims:
    """Megatron's groups (re)built for ``tp`` over the process group already started."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return init_distributed(tp=tp)


def finish(results: Any, path: str | Path) -> None:
    """Rank 0 writes ``results`` to ``path``; every rank waits for it, then leaves the process group."""
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.barrier()
    dist.destroy_process_group()

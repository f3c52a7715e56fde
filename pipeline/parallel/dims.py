"""The parallel dimensions of a run and their process groups: built once, passed everywhere.

    dims = init_distributed(tp=2)           # after RANK, WORLD_SIZE, MASTER_* are set (or alone)
    model = family.build(cfg.model, dims)   # the model takes its TP size, rank and group from dims
    dims.dp_rank, dims.dp_group             # the data stream, the objectives, evaluation

World = TP x DP, TP ranks adjacent (megatron's order). megatron-core's ``parallel_state`` is
initialised too: its tensor-parallel layers and DeepSpeed's ``mpu`` adapter read it. Our own code
reads the groups from this object, never from globals.

Backend: gloo on CPU; on CUDA ``cpu:gloo,cuda:nccl`` (NCCL alone rejects CPU tensors). The
rendezvous store and gloo bind to loopback when MASTER_ADDR is a loopback address (every local
run), to MASTER_ADDR's interface otherwise (pipeline/parallel/rendezvous.py). Under torchrun the
agent's store is used as torchrun intends.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pipeline.hardware.device import dist_backend
from pipeline.parallel.rendezvous import choose_interface, rendezvous_store
from pipeline.patches import megatron as megatron_patches


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, this process's ranks, and the process groups of a TP x DP world."""

    world: int
    tp: int = 1
    rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = field(default=None, compare=False, repr=False)
    dp_group: Any = field(default=None, compare=False, repr=False)

    @property
    def dp(self) -> int:
        return self.world // self.tp

    def describe(self) -> str:
        return f"TP={self.tp} x DP={self.dp} ({self.world} process{'es' if self.world > 1 else ''})"


def _start_process_group(backend: str | None, timeout_s: int) -> None:
    """torch.distributed from the environment (a one-process world when nothing is set)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    choose_interface(addr)  # gloo's pairs on the interface that reaches MASTER_ADDR, not any
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = backend or dist_backend()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = rendezvous_store(rank, world, addr, port, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def init_distributed(tp: int = 1, backend: str | None = None, timeout_s: int = 600) -> ParallelDims:
    """Start torch.distributed (unless started) and megatron's TP/DP groups; returns the dims.

    Idempotent for the same TP size (tests and tools call it again); another TP size in the same
    process is an error (megatron's groups are process-wide)."""
    megatron_patches.apply()
    if not dist.is_initialized():
        _start_process_group(backend, timeout_s)
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise ValueError("megatron parallel state is already initialised with another TP size")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return ParallelDims(
        world=world,
        tp=tp,
        rank=dist.get_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

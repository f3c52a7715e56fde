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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pipeline.hardware.device import dist_backend
from pipeline.parallel.mpu import MegatronMPU
from pipeline.parallel.rendezvous import choose_interface, rendezvous_store
from pipeline.patches import megatron as megatron_patches
from pipeline.patches.deepspeed import skip_shm_comm_build


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, this process's ranks, and the process groups of a TP x DP world.

    Expert parallelism (EP) is carved out of data parallelism, as Megatron and DeepSpeed do: the
    DP ranks of one TP lane form ``dp / ep`` groups of ``ep`` consecutive ranks, each holding all
    experts between them (``ep_group``); the ranks holding the same experts form the
    expert-data-parallel group (``edp_group``). Everything but the experts stays data-parallel
    over all DP ranks, so changing EP keeps the global batch."""

    world: int
    tp: int = 1
    rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = field(default=None, compare=False, repr=False)
    dp_group: Any = field(default=None, compare=False, repr=False)
    ep: int = 1
    ep_rank: int = 0
    ep_group: Any = field(default=None, compare=False, repr=False)
    edp_group: Any = field(default=None, compare=False, repr=False)

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def ep_group_name(self) -> str:
        """DeepSpeed's name for the EP and EDP groups of this size."""
        return f"ep_size_{self.ep}"

    def describe(self) -> str:
        ep = f" (EP={self.ep})" if self.ep > 1 else ""
        return f"TP={self.tp} x DP={self.dp}{ep} ({self.world} process{'es' if self.world > 1 else ''})"


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


def init_distributed(
    tp: int = 1, ep: int | None = None, backend: str | None = None, timeout_s: int = 600
) -> ParallelDims:
    """Start torch.distributed (unless started) and megatron's TP/DP groups; returns the dims.

    ``ep``: also create DeepSpeed's expert-parallel groups of that size (a model with experts
    needs them before it is built, even at EP=1); None for a model without experts.
    Idempotent for the same sizes (tests and tools call it again); another TP size in the same
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
    dims = ParallelDims(
        world=world,
        tp=tp,
        rank=dist.get_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )
    return dims if ep is None else with_expert_groups(dims, ep)


def with_expert_groups(dims: ParallelDims, ep: int) -> ParallelDims:
    """``dims`` with DeepSpeed's expert-parallel groups of size ``ep`` (created once per size).

    DeepSpeed's ``_create_expert_data_and_model_parallel`` builds EP groups inside each TP lane's
    DP group (with TP=2, world 8, EP=2: EP [0,2] [4,6] [1,3] [5,7], EDP [0,4] [2,6] [1,5] [3,7]).
    Its AutoEP engine path would call ``_create_expert_and_data_parallel`` instead, whose EDP
    groups span TP peers: with experts replicated over TP that double-counts their gradients,
    silently. Both cache under the same name, so creating ours first makes them the ones used."""
    if ep < 1 or dims.dp % ep:
        raise ValueError(f"expert parallel size {ep} does not divide the data-parallel size {dims.dp}")
    skip_shm_comm_build()  # before DeepSpeed's first import picks its accelerator
    # heavy: DeepSpeed takes seconds to import
    import deepspeed
    from deepspeed.utils import groups

    # Over the torch process group already there, as deepspeed.initialize would.
    deepspeed.comm.init_distributed(
        dist_backend=deepspeed.get_accelerator().communication_backend_name(), dist_init_required=False
    )
    groups.mpu = MegatronMPU()
    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_data_and_model_parallel(ep, groups.mpu)
    return replace(
        dims,
        ep=ep,
        ep_rank=groups._get_expert_parallel_rank(name),
        ep_group=groups._get_expert_parallel_group(name),
        edp_group=groups._get_expert_data_parallel_group(name),
    )


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

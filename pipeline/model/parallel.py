"""Process groups for tensor x data parallelism on megatron-core, on GPUs or on this CPU.

    init_distributed(tp=2)   # after torch.distributed env vars (RANK, WORLD_SIZE, MASTER_*) are set

megatron-core's tensor-parallel layers run unchanged on gloo, except for a few calls that
assume CUDA (``torch.cuda.current_device()`` for buffers, the CUDA RNG tracker, and the
autocast decorators of its linear autograd function, which only restore *CUDA* autocast in
backward). :func:`apply_cpu_shim` patches exactly those, and only when CUDA is absent.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.hardware.device import dist_backend

_SHIM_APPLIED = False


def apply_cpu_shim() -> bool:
    """Make megatron-core's TP layers CPU-capable; a no-op (returns False) when CUDA is present."""
    global _SHIM_APPLIED
    if torch.cuda.is_available():
        return False
    if _SHIM_APPLIED:
        return True
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import layers, mappings, random

    # Buffers megatron allocates "on the current device": on CPU that is device "cpu".
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # The RNG tracker forks CUDA RNG state for TP-region dropout; fork the CPU state instead.
    def _cpu_manual_seed(seed: int, *args, **kwargs) -> None:
        tracker = random.get_cuda_rng_tracker()
        tracker.reset()
        torch.manual_seed(seed)

    random.model_parallel_cuda_manual_seed = _cpu_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = _cpu_manual_seed

    # custom_fwd/custom_bwd(device_type="cuda") leave CPU autocast off in backward, so a bf16
    # grad_output meets an fp32 weight. Re-wrap for CPU autocast.
    fn = layers.LinearWithGradAccumulationAndAsyncCommunication
    for name, wrap in (("forward", torch.amp.custom_fwd), ("backward", torch.amp.custom_bwd)):
        raw = getattr(fn, name)
        raw = getattr(raw, "__wrapped__", raw)
        setattr(fn, name, staticmethod(functools.wraps(raw)(wrap(raw, device_type="cpu"))))
    del mappings  # imported so its module-level CUDA lookups resolve through the patched call
    _SHIM_APPLIED = True
    return True


@dataclass(frozen=True)
class ParallelDims:
    world: int
    tp: int

    @property
    def dp(self) -> int:
        return self.world // self.tp


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def _ipv4_of(ifname: str) -> str | None:
    """The (primary) IPv4 address of interface ``ifname`` (Linux ``SIOCGIFADDR``), or None."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_for(addr: str) -> str | None:
    """The network interface this host reaches ``addr`` (a name or IPv4 address) through.

    On MASTER_ADDR's own host that is the interface holding its address; on the other nodes, the
    one the kernel routes to it by. Found by connecting a UDP socket (which picks the route and
    the source address, and sends nothing) and looking the source address up among the
    interfaces. None where it cannot be told (the address does not resolve, no interface holds it).
    """
    try:
        ip = socket.gethostbyname(addr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            source = s.getsockname()[0]
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if _ipv4_of(name) == source), None)


def rendezvous_store(rank: int, world: int, addr: str, port: int, timeout: datetime.timedelta) -> dist.Store:
    """The TCP key-value store ranks meet at, served by rank 0 on ``addr`` only.

    torch's own ``env://`` rendezvous listens on every interface of rank 0's host with no
    authentication; binding the listening socket ourselves keeps a local run on loopback and a
    multi-node run on the interface that ``addr`` (MASTER_ADDR) resolves to.
    """
    if rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    ip = socket.gethostbyname(addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(128)
    # detach: the store's server owns the listening fd from here on
    return dist.TCPStore(ip, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())


# Set when the interface variables below were chosen here, not by the user: a job launched from
# this process must choose its own (launch/submit.py drops them), or a local run's "lo" would
# follow a test or a login shell into a multi-node job.
AUTO_IFNAME = "MEMDLM_AUTO_SOCKET_IFNAME"
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _choose_interface(iface: str) -> None:
    if any(os.environ.get(v) for v in IFNAME_VARS) and not os.environ.get(AUTO_IFNAME):
        return  # the user's choice wins
    for var in IFNAME_VARS:
        os.environ[var] = iface
    os.environ[AUTO_IFNAME] = "1"


def drop_chosen_interface() -> None:
    """Forget an interface this process chose for itself (before starting another world's job)."""
    if os.environ.pop(AUTO_IFNAME, None):
        for var in IFNAME_VARS:
            os.environ.pop(var, None)


def init_distributed(tp: int = 1, backend: str | None = None, timeout_s: int = 600) -> ParallelDims:
    """Start torch.distributed from env vars (or a 1-process world) and megatron's TP/DP groups.

    Backend: gloo on CPU; on CUDA ``cpu:gloo,cuda:nccl`` (NCCL alone rejects CPU tensors).
    World = TP x DP; TP ranks are adjacent (megatron order). The rendezvous store and gloo bind
    to loopback when MASTER_ADDR is a loopback address (every local run), to MASTER_ADDR's
    interface otherwise: the store on MASTER_ADDR's address, gloo's and NCCL's sockets
    (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, unless already set) on the interface each node
    reaches MASTER_ADDR through (:func:`interface_for`, decided on each node at run time). Under
    torchrun the agent's store is used as torchrun intends.
    """
    from megatron.core import parallel_state

    apply_cpu_shim()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        backend = backend or dist_backend()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        iface = "lo" if _is_loopback(addr) else interface_for(addr)  # gloo's pairs, not any address
        if iface:
            _choose_interface(iface)
        timeout = datetime.timedelta(seconds=timeout_s)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            store = rendezvous_store(rank, world, addr, port, timeout)
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world, timeout=timeout
            )
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise ValueError("megatron parallel state is already initialised with another TP size")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return ParallelDims(world=world, tp=tp)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()

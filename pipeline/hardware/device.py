"""The training device and the collective backend that goes with it.

On a CUDA node the process group is created with a device-mapped backend (``cpu:gloo,cuda:nccl``):
NCCL alone rejects CPU tensors, and a few collectives (object gathers, flags in library code) run
on CPU tensors. Our own collectives still keep their tensors on the training device, which a test
checks (tests/unit/test_collective_devices.py).
"""

from __future__ import annotations

import os

import torch


def training_device() -> torch.device:
    """The current CUDA device when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    """torch.distributed backend string for this machine: gloo on CPU, gloo+nccl mapped per device on CUDA."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def deepspeed_accelerator() -> str:
    """The DeepSpeed accelerator that matches the training device (``DS_ACCELERATOR``).

    A ``DS_ACCELERATOR=cpu`` left in the environment of a CUDA node would hand DeepSpeed its CPU
    accelerator while torch trains on the GPU: refused with a message instead.
    """
    want = "cuda" if torch.cuda.is_available() else "cpu"
    given = os.environ.get("DS_ACCELERATOR")
    if given and given != want:
        raise RuntimeError(
            f"DS_ACCELERATOR={given} in the environment, but the training device is {want}: "
            f"unset it (memdlm-train sets it from the device) or set DS_ACCELERATOR={want}"
        )
    return want

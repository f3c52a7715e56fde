"""megatron-core patches (written for 0.16.1).

``cpu_autocast_backward``: megatron's linear autograd function
(``LinearWithGradAccumulationAndAsyncCommunication``) is decorated with
``custom_fwd/custom_bwd(device_type="cuda")``, which restores *CUDA* autocast in backward only: on a
CPU under bf16 autocast a bf16 grad_output then meets an fp32 weight (``expected m1 and m2 to have
the same dtype``). The forward and backward are re-wrapped for CPU autocast; applied only when
CUDA is absent.

Two CPU shims older versions of this code carried are gone: ``torch.cuda.current_device`` (only
megatron's sequence-parallel buffers and GPU initialisation ask for it; we use neither, as
``use_cpu_initialization=True`` builds every weight on the CPU) and the CUDA RNG tracker's seed
(nothing we run calls it). tests/unit/test_patches.py keeps both facts checked.
"""

from __future__ import annotations

import functools

import torch

from pipeline.patches import Patch, require

CPU_AUTOCAST_BACKWARD = Patch(
    name="megatron.cpu_autocast_backward",
    distribution="megatron-core",
    written_for="0.16.1",
    why="its linear autograd function restores CUDA autocast only, so CPU bf16 backward fails",
    test="tests/unit/test_patches.py::test_unpatched_megatron_linear_fails_bf16_autocast_backward_on_cpu",
)
_APPLIED = False


def apply() -> bool:
    """Apply the megatron patches this machine needs (none with CUDA); returns whether any is applied."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    require(CPU_AUTOCAST_BACKWARD)
    from megatron.core.tensor_parallel import layers  # heavy (~4 s): only where a model is built

    fn = layers.LinearWithGradAccumulationAndAsyncCommunication
    for name, wrap in (("forward", torch.amp.custom_fwd), ("backward", torch.amp.custom_bwd)):
        raw = getattr(fn, name)
        raw = getattr(raw, "__wrapped__", raw)
        setattr(fn, name, staticmethod(functools.wraps(raw)(wrap(raw, device_type="cpu"))))
    _APPLIED = True
    return True

"""Which floating-point precision to train in, decided from the device's capability, not a timing.

    choice = resolve_precision("auto", torch.device("cpu"))
    choice.dtype      # "fp32" on an AVX2-only CPU, "bf16" on AMX / AVX512-BF16 CPUs and on CUDA
    choice.reason     # one line, printed at start, written to config.json and MLflow

Why not always bf16: on CPUs without native bf16 matmul (AMD EPYC with AVX2 only) oneDNN emulates
it, and a small-preset MDLM step took 54 s under bf16 autocast against 3.1 s in fp32 (17x slower);
on AMX CPUs bf16 is ~5x faster than fp32. ``auto`` picks whichever the hardware runs natively.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

PrecisionSetting = Literal["auto", "bf16", "fp32"]
# Tests and users on an AMX host can force the AVX2 decision (the bf16/AMX checks read the
# hardware, so capping ATEN_CPU_CAPABILITY alone does not change them): 0 = no native bf16, 1 = native.
NATIVE_BF16_ENV = "MEMDLM_CPU_NATIVE_BF16"


@dataclass(frozen=True)
class Precision:
    """The resolved precision: ``dtype`` is what autocast and DeepSpeed use; ``reason`` says why."""

    dtype: Literal["bf16", "fp32"]
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def cpu_native_bf16() -> tuple[bool, str]:
    """(True, why) when this CPU multiplies bf16 in hardware: AMX tiles or AVX512-BF16."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{NATIVE_BF16_ENV}={forced}"
    cap = torch.backends.cpu.get_cpu_capability()
    if torch.cpu._is_amx_tile_supported():
        return True, f"CPU has AMX tiles (capability {cap})"
    if torch.cpu._is_avx512_bf16_supported():
        return True, f"CPU has AVX512-BF16 (capability {cap})"
    return False, f"CPU has no native bf16 matmul (capability {cap}; no AMX, no AVX512-BF16)"


def device_native_bf16(device: torch.device) -> tuple[bool, str]:
    """(native bf16?, why) for ``device`` (cuda or cpu)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return (
            False,
            f"{name} has no native bf16 (compute capability {torch.cuda.get_device_capability(device)})",
        )
    return cpu_native_bf16()


def resolve_precision(
    setting: PrecisionSetting, device: torch.device, native_bf16: bool | None = None
) -> Precision:
    """Turn the config's ``parallel.precision`` into bf16 or fp32 for ``device``.

    ``native_bf16`` overrides the hardware check (tests of the AVX2 decision on an AMX host).
    An explicit ``bf16`` or ``fp32`` is obeyed; the reason then notes a slow choice.
    """
    native, why = device_native_bf16(device) if native_bf16 is None else (native_bf16, "given")
    if setting == "fp32":
        return Precision("fp32", f"parallel.precision=fp32 (set explicitly; {why})")
    if setting == "bf16":
        note = "" if native else "; emulated here, expect it to be many times slower than fp32"
        return Precision("bf16", f"parallel.precision=bf16 (set explicitly; {why}{note})")
    if setting != "auto":
        raise ValueError(f"precision setting {setting!r}: expected auto, bf16 or fp32")
    return Precision("bf16" if native else "fp32", f"auto: {why}")

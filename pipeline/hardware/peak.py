"""The MFU denominator: a device's peak matmul FLOP/s, without slowing the start of training.

    peak, source = peak_flops(device, precision, configured_tflops=cfg.peak_tflops)

In order: the config's ``peak_tflops`` when set; for CUDA devices in bf16, the vendor's dense
bf16 peak from :data:`KNOWN_BF16_PEAK_TFLOPS` (matched on the device name); otherwise a short
measurement of square matmuls in the training dtype, time-boxed to ``budget_s`` (starting small,
never starting a size that would overrun the budget) and cached per machine, torch version,
thread count and dtype under ``~/.cache/memdlm-train`` (``MEMDLM_CACHE_DIR`` to move it).
A 1024² bf16 matmul on an AVX2-only CPU takes ~4 s; the time box never lets it start there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.atomic_io import atomic_write_text

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (SXM parts
# unless named). Longest names first, so "H100 PCIe" wins over "H100".
KNOWN_BF16_PEAK_TFLOPS: dict[str, float] = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def known_peak_tflops(device_name: str) -> float | None:
    """The table's bf16 dense peak for a CUDA device name such as 'NVIDIA H200', or None."""
    for key in sorted(KNOWN_BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return KNOWN_BF16_PEAK_TFLOPS[key]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, budget_s: float = 1.5) -> float:
    """Best square-matmul FLOP/s within ``budget_s`` seconds in all, sizes 128, 256, ... doubling.

    Each size's cost is predicted from the previous one (x8); a size that would not fit in what
    is left of the budget is never started, so slow hardware only shortens the sweep.
    """
    deadline = time.perf_counter() + budget_s
    best, n, last_mm = 0.0, 128, 0.0
    while n <= (8192 if device.type == "cuda" else 2048):
        left = deadline - time.perf_counter()
        if last_mm * 8 * 3 > left:  # warm-up + at least two timed products of the next size
            break
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        first = time.perf_counter() - t0
        reps, t0 = 0, time.perf_counter()
        stop = min(deadline, t0 + max(first * 2, budget_s / 6))
        while True:
            a @ b
            reps += 1
            _sync(device)
            now = time.perf_counter()
            if now >= stop or (now - t0) / reps > deadline - now:
                break
        last_mm = (now - t0) / reps
        best = max(best, 2 * n**3 / last_mm)
        n *= 2
    return best


def _cache_file(device: torch.device, dtype: torch.dtype) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    try:
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu_model = platform.machine()
    key = json.dumps(
        [
            name,
            cpu_model,
            torch.__version__,
            torch.get_num_threads(),
            str(dtype),
            device.type,
            torch.backends.cpu.get_cpu_capability(),
        ]
    )
    root = Path(os.environ.get("MEMDLM_CACHE_DIR", Path.home() / ".cache" / "memdlm-train"))
    return root / f"peak-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def peak_flops(
    device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0, budget_s: float = 1.5
) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU on ``device`` computing in ``dtype``."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, f"config peak_tflops={configured_tflops:g}"
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        known = known_peak_tflops(name)
        if known is not None:
            return known * 1e12, f"table: {name} bf16 dense {known:g} TFLOP/s"
    path = _cache_file(device, dtype)
    try:
        cached = json.loads(path.read_text())
        return float(cached["flops"]), f"measured earlier ({path})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    flops = measure_matmul_peak(device, dtype, budget_s)
    with contextlib.suppress(OSError):  # a read-only home only costs the next start another measurement
        atomic_write_text(path, json.dumps({"flops": flops, "dtype": str(dtype), "device": device.type}))
    return (
        flops,
        f"measured {str(dtype).removeprefix('torch.')} matmul ({budget_s:g} s time box, cached at {path})",
    )

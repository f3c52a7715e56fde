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
import warnings
from dataclasses import dataclass, field
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


@dataclass
class Peak:
    """The MFU denominator of one device and dtype, and where it came from.

    ``measured_at`` (epoch seconds) is set for a measured peak; ``cache`` is its file. A measured
    peak is only as good as the machine's state when it was taken: measured while the machine was
    busy it stays low for good. So :meth:`mfu` never reports more than 1: a throughput above the
    peak re-measures it (``trials`` time boxes, keeping the maximum with the old value, cached
    again), and if the model still runs faster than the matmul probe, the peak is raised to what
    was achieved (said in ``source``). A configured or table peak below an achieved throughput is
    raised the same way, with a warning: the configured number was wrong."""

    flops: float
    source: str
    measured_at: float | None = None
    cache: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    budget_s: float = 1.5
    trials: int = 3
    raised: bool = False

    def describe(self, now: float | None = None) -> str:
        """``0.131 TFLOP/s (measured float32 matmul ..., 2 h old)``: value, source and age."""
        age = ""
        if self.measured_at is not None:
            age = f", {_age((now or time.time()) - self.measured_at)} old"
        return f"{self.flops / 1e12:.3g} TFLOP/s ({self.source}{age})"

    def as_record(self) -> dict[str, object]:
        """The fields a result file or config.json records about the peak."""
        return {
            "peak_flops": self.flops,
            "peak_flops_source": self.source,
            "peak_flops_measured_at": self.measured_at,
        }

    def mfu(self, achieved: float) -> float:
        """``achieved / peak``, never above 1 (the peak is re-measured or raised first)."""
        if achieved > self.flops:
            self._raise_to(achieved)
        return achieved / self.flops

    def _raise_to(self, achieved: float) -> None:
        if self.measured_at is not None:
            trials = [measure_matmul_peak(self.device, self.dtype, self.budget_s) for _ in range(self.trials)]
            best = max([self.flops, *trials])
            self.flops, self.measured_at = best, time.time()
            self.source = f"re-measured: {self.trials} x {self.budget_s:g} s time boxes, max kept"
            if self.cache is not None:
                _write_cache(self.cache, best, self.dtype, self.device, self.measured_at)
        if achieved > self.flops:
            if not self.raised:
                warnings.warn(
                    f"throughput {achieved / 1e12:.3g} TFLOP/s exceeds the MFU peak {self.describe()}; the peak "
                    "is raised to it (set peak_tflops to the device's real peak)",
                    stacklevel=3,
                )
            self.flops, self.raised = achieved, True
            if "raised to an achieved throughput" not in self.source:
                self.source += "; raised to an achieved throughput"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(0.0, seconds):.0f} s"


def _write_cache(path: Path, flops: float, dtype: torch.dtype, device: torch.device, at: float) -> None:
    record = {"flops": flops, "dtype": str(dtype), "device": device.type, "measured_at": at}
    with contextlib.suppress(OSError):  # a read-only home only costs the next start another measurement
        atomic_write_text(path, json.dumps(record))


def peak(
    device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0, budget_s: float = 1.5
) -> Peak:
    """The MFU peak for ``device`` computing in ``dtype`` (module docstring: config, table, cache,
    measurement)."""
    if configured_tflops > 0:
        return Peak(
            configured_tflops * 1e12, f"config peak_tflops={configured_tflops:g}", device=device, dtype=dtype
        )
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        known = known_peak_tflops(name)
        if known is not None:
            return Peak(
                known * 1e12, f"table: {name} bf16 dense {known:g} TFLOP/s", device=device, dtype=dtype
            )
    path = _cache_file(device, dtype)
    kind = str(dtype).removeprefix("torch.")
    try:
        cached = json.loads(path.read_text())
        at = float(cached.get("measured_at") or path.stat().st_mtime)
        return Peak(
            float(cached["flops"]),
            f"measured {kind} matmul, cached at {path}",
            at,
            path,
            device,
            dtype,
            budget_s,
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    flops, at = measure_matmul_peak(device, dtype, budget_s), time.time()
    _write_cache(path, flops, dtype, device, at)
    source = f"measured {kind} matmul ({budget_s:g} s time box), cached at {path}"
    return Peak(flops, source, at, path, device, dtype, budget_s)


def peak_flops(
    device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0, budget_s: float = 1.5
) -> tuple[float, str]:
    """(peak FLOP/s, its description with source and age): :func:`peak` as a pair."""
    p = peak(device, dtype, configured_tflops, budget_s)
    return p.flops, p.describe()

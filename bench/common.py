"""Shared benchmark helpers: machine info, JSON results, and the precision/peak training would use."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from pipeline.hardware.peak import peak_flops
from pipeline.hardware.precision import Precision, resolve_precision

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
            if k in os.environ
        },
    }


def write(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return path


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (timings); a no-op on the CPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def training_precision(setting: str | None, device: torch.device | str) -> Precision:
    """The precision a training run on ``device`` would use: ``setting`` (auto | bf16 | fp32), or
    when None the default training config's ``parallel.precision``, resolved as the trainer does."""
    if setting is None:
        from pipeline.train_config import load_train_config

        setting = load_train_config("configs/train/local.yaml").parallel.precision
    return resolve_precision(setting or "auto", torch.device(device))


def precision_record(
    precision: Precision, device: torch.device | str, peak_tflops: float = 0.0, peak_budget_s: float = 6.0
) -> tuple[float, dict[str, Any]]:
    """(peak FLOP/s, JSON fields) for MFU: the trainer's ``peak_flops`` in the resolved dtype.

    Benchmarks may measure longer than the trainer's start-up time box (``peak_budget_s``)."""
    peak, source = peak_flops(
        torch.device(device), precision.torch_dtype, peak_tflops, budget_s=peak_budget_s
    )
    return peak, {
        "precision": precision.dtype,
        "precision_reason": precision.reason,
        "peak_flops": peak,
        "peak_flops_source": source,
    }

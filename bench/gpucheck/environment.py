"""What an interpreter on the GPU machine has: Python, torch (version, file, CUDA runtime), the
GPU (name, count, capability, memory, bf16), NCCL, the driver, and the versions of named packages.
The probe runs in that interpreter as a script, so nothing here needs torch."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from bench.gpucheck.common import ROOT
from bench.gpucheck.runner import StageError

PROBE = r"""
import importlib.metadata as md, json, platform, subprocess, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    out.update(torch=torch.__version__, torch_file=torch.__file__, cuda_runtime=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
        try:
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as exc:
            out["nccl"] = f"unavailable: {exc}"
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            out["driver"] = None
except ImportError as exc:
    out["torch_error"] = str(exc)
pk = {}
for n in sys.argv[1:]:
    try:
        pk[n] = md.version(n)
    except md.PackageNotFoundError:
        pk[n] = None
out["packages"] = pk
print("PROBE " + json.dumps(out))
"""


def probe(python: str, packages: list[str]) -> dict[str, Any]:
    """Run :data:`PROBE` in ``python``; its findings, with ``packages`` -> version (None: absent)."""
    proc = subprocess.run(
        [python, "-c", PROBE, *packages], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    raise StageError(
        f"{python}: probe failed (exit {proc.returncode})", proc.stdout[-1500:] + proc.stderr[-1500:]
    )

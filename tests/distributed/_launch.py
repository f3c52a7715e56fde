"""Start a worker script on N real processes (torchrun, gloo) and return its exit status + output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import _proc
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: Path, nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun; on timeout (``TimeoutExpired`` with the output so far), error
    or Ctrl-C, torchrun and its workers (each in a session of its own) are killed, not orphaned."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]
    return _proc.run(cmd, env=env, timeout=timeout, cwd=ROOT)

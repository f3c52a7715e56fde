"""Refactors keep the numbers: the golden 5-step tiny MemDLM run (tests/golden/trajectory.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests import _proc
from tests.conftest import free_port
from tests.golden.trajectory import cpu_kind

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "memdlm_tiny_5steps.json"


@pytest.mark.slow
def test_the_tiny_memdlm_run_reproduces_the_golden_trajectory(tmp_path):
    out = tmp_path / "now.json"
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    }
    env.update(
        OMP_NUM_THREADS="1", MEMDLM_CPU_NATIVE_BF16="0", PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port())
    )
    cmd = [sys.executable, "-m", "tests.golden.trajectory", "--out", str(out)]
    done = _proc.run(cmd, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    golden, now = json.loads(GOLDEN.read_text()), json.loads(out.read_text())
    assert [s["step"] for s in now["steps"]] == [1, 2, 3, 4, 5]
    same_cpu = golden["cpu"] == cpu_kind()
    for want, got in zip(golden["steps"], now["steps"], strict=True):
        assert set(want) == set(got)
        for key, value in want.items():
            if same_cpu:  # the same kernels: bit for bit
                assert got[key] == value, f"step {want['step']} {key}: {got[key]!r} != golden {value!r}"
            else:  # another vector unit sums in another order
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {want['step']} {key}"

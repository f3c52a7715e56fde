"""A mixture-of-experts run resumes at another expert-parallel size (2 real processes): saved at
EP=2 and resumed at EP=1, or the reverse, it continues with the uninterrupted run's losses, and
ends with its expert weights (each EP rank its own experts), Adam moments and routers' balancing
biases (a buffer: DeepSpeed's universal load restores parameters only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_moe_resume_worker.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe-resume")
    for run, ep, stop in (
        ("full", "1", "all"),
        ("a", "2", "2"),
        ("a", "1", "all"),
        ("b", "1", "2"),
        ("b", "2", "all"),
    ):
        proc = torchrun(WORKER, 2, str(tiny_dataset), str(out), run, ep, stop, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return out


@pytest.mark.parametrize(("run", "first", "second"), [("a", "2", "1"), ("b", "1", "2")])
def test_resume_at_another_expert_parallel_size_continues_the_run(runs, run, first, second):
    full = json.loads((runs / "full-ep1.json").read_text())
    got = json.loads((runs / f"{run}-ep{first}.json").read_text()) + json.loads(
        (runs / f"{run}-ep{second}.json").read_text()
    )
    assert [r["step"] for r in got] == [r["step"] for r in full] == [1, 2, 3, 4]
    for g, w in zip(got, full, strict=True):
        for key in ("loss", "grad_norm", "moe/imbalance"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)
    want = torch.load(runs / "full-ep1-rank0.pt")
    for rank in (0, 1):
        ours = torch.load(runs / f"{run}-ep{second}-rank{rank}.pt")
        assert ours.keys() == want.keys()
        assert any(k.endswith("score_bias") and want[k].abs().sum() > 0 for k in want)  # the bias moved
        for key in want:
            expected = want[key]
            if ".experts." in key and second == "2":  # EP=2: rank r holds experts 4r .. 4r+3
                n = expected.shape[0] // 2
                assert ours[key].shape[0] == n, key
                expected = expected[rank * n : (rank + 1) * n]
            torch.testing.assert_close(ours[key], expected, rtol=1e-4, atol=1e-6, msg=key)

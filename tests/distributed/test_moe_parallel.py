"""Expert and tensor parallelism of the mixture-of-experts family through the Trainer, on real
processes: on 2 ranks EP=2 gives the losses, gradient norms and routing metrics of EP=1 (same
DP=2 global batch); TP=2 on 2 ranks gives those of one process (same DP=1 batch). Over 3 steps,
fp32, 1e-5 relative, MDLM and MemDLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_moe_worker.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe")
    for nproc, tp, eps in ((2, "1", "1,2"), (2, "2", "1"), (1, "1", "1")):
        proc = torchrun(WORKER, nproc, tp, str(tiny_dataset), str(out), eps, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return out


def _records(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())


def _assert_same(got: list[dict], want: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)


@pytest.mark.parametrize("method", ["mdlm", "memdlm"])
def test_expert_parallel_gives_the_losses_of_one_expert_rank(runs, method):
    ep1, ep2 = _records(runs, f"w2-tp1-ep1-{method}"), _records(runs, f"w2-tp1-ep2-{method}")
    layers = [k for k in ep1[0] if k.startswith("moe/layer")]
    assert layers, "no routing metrics logged"
    _assert_same(ep2, ep1, ("loss", "grad_norm", *layers))
    assert ep1[-1]["moe/dropped_tokens"] == ep2[-1]["moe/dropped_tokens"] == 0


@pytest.mark.parametrize("method", ["mdlm", "memdlm"])
def test_tensor_parallel_gives_the_losses_of_one_tensor_rank(runs, method):
    tp1, tp2 = _records(runs, f"w1-tp1-ep1-{method}"), _records(runs, f"w2-tp2-ep1-{method}")
    _assert_same(tp2, tp1, ("loss", "grad_norm"))

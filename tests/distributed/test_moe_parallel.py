"""Expert and tensor parallelism of the mixture-of-experts family through the Trainer, on real
processes: on 2 ranks EP=2 gives the losses, gradient norms and routing metrics of EP=1 (same
DP=2 global batch); TP=2 on 2 ranks gives those of one process (same DP=1 batch). Over 3 steps,
fp32, 1e-5 relative, MDLM and MemDLM; and both at once, TP=2 x EP=2 on 4 ranks (DP=2), gives
those of EP=1 on 2. Exports gather the experts over EP: the EP=2 export equals
the EP=1 one, and loads back into an EP=2 run bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_moe_worker.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe")
    for nproc, tp, eps in ((2, "1", "1,2"), (2, "2", "1"), (1, "1", "1"), (4, "2", "2")):
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
    # MemDLM at EP=2 shards its memory with the experts: the inner loop's norms and clipping
    # counts are summed over the EP ranks, and must be the whole memory's
    inner = [
        k
        for k in ep1[0]
        if k.startswith("inner/") and k.endswith(("grad_norm", "update_norm", "clipped_frac"))
    ]
    assert bool(inner) == (method == "memdlm")
    _assert_same(ep2, ep1, ("loss", "grad_norm", *layers, *inner))
    assert ep1[-1]["moe/dropped_tokens"] == ep2[-1]["moe/dropped_tokens"] == 0


@pytest.mark.parametrize("method", ["mdlm", "memdlm"])
def test_tensor_parallel_gives_the_losses_of_one_tensor_rank(runs, method):
    tp1, tp2 = _records(runs, f"w1-tp1-ep1-{method}"), _records(runs, f"w2-tp2-ep1-{method}")
    _assert_same(tp2, tp1, ("loss", "grad_norm"))


def test_export_gathers_the_experts_over_expert_parallel_ranks_and_loads_back_exactly(runs):
    ep1 = load_file(str(runs / "w2-tp1-ep1-memdlm" / "export" / "model.safetensors"))
    ep2 = load_file(str(runs / "w2-tp1-ep2-memdlm" / "export" / "model.safetensors"))
    assert ep1.keys() == ep2.keys()
    experts = [k for k in ep1 if ".experts.w" in k]
    assert experts and all(ep2[k].shape[0] == 8 for k in experts)  # every expert, not one rank's 4
    assert any(k.endswith("router.score_bias") for k in ep1)  # the balancing bias travels with them
    for key in ep1:
        torch.testing.assert_close(ep2[key], ep1[key], rtol=1e-4, atol=1e-6, msg=key)
    for run in ("w2-tp1-ep2-memdlm", "w2-tp2-ep1-memdlm", "w4-tp2-ep2-memdlm"):
        saved = load_file(str(runs / run / "export" / "model.safetensors"))
        reloaded = load_file(str(runs / run / "reloaded.safetensors"))
        assert saved.keys() == reloaded.keys()
        for key in saved:
            assert torch.equal(saved[key], reloaded[key]), (run, key)


@pytest.mark.parametrize("method", ["mdlm", "memdlm"])
def test_tensor_and_expert_parallel_together_give_the_losses_of_neither(runs, method):
    ep1, both = _records(runs, f"w2-tp1-ep1-{method}"), _records(runs, f"w4-tp2-ep2-{method}")
    layers = [k for k in ep1[0] if k.startswith("moe/layer")]
    _assert_same(both, ep1, ("loss", "grad_norm", *layers))

"""TP=2 and DP=2 (2 real gloo processes) equal the single-process TP=1 computation.

Tolerance: 2e-5 relative / 1e-6 absolute (fp32; TP sums partial products in another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed._launch import torchrun

RTOL, ATOL = 2e-5, 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    proc = torchrun(Path(__file__).with_name("_tp_worker.py"), 2, str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / "results.pt"), torch.load(out / "dp2_rank1.pt")


def _close(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{what}[{i}]")
    else:
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=what)


def test_tp2_equals_tp1_for_logits_losses_gradients_and_fast_weights(results):
    res, _ = results
    tp1, tp2 = res["tp1"], res["tp2"]
    _close(tp2["logits"], tp1["logits"], "logits")
    _close(tp2["mdlm_loss"], tp1["mdlm_loss"], "mdlm_loss")
    _close(tp2["mdlm_grads"], tp1["mdlm_grads"], "mdlm_grads")
    for scope in ("batch", "sample", "batch-full"):
        _close(tp2[scope], tp1[scope], scope)
    assert tp1["batch"]["fast"]["3.gate.B"].abs().sum() > 0  # the memory really moved


def test_dp2_batch_scope_memory_is_one_per_global_batch(results):
    res, rank1 = results
    _close(res["dp2"]["fast"], res["tp1"]["batch"]["fast"], "dp2 fast weights vs single process")
    _close(rank1["fast"], res["dp2"]["fast"], "fast weights identical on both DP ranks")
    _close(res["dp2"]["loss"], res["tp1"]["batch"]["loss"], "dp2 mean loss")
    _close(res["dp2"]["inner"], res["tp1"]["batch"]["inner"], "dp2 inner losses")
    _close(res["dp2"]["grads"], res["tp1"]["batch"]["grads"], "dp2 averaged grads")

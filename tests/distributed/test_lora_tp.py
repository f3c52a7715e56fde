"""Outer LoRA on 2 real processes: TP=2 computes what TP=1 does (logits, loss, every adapter's
gradient; tolerance 1e-5), the replicated adapter tensors stay identical on the TP ranks, no base
weight gets a gradient, and the real Trainer at TP=2 and at DP=2 (ZeRO-3, MemDLM inner loop) trains
only the adapters and exports base + (alpha / r) B A gathered over TP / ZeRO partitions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.adapters.lora import is_lora_name
from tests.distributed._launch import torchrun

TOL = 1e-5
TARGETS = ("qkv", "out", "gate", "up", "down")


@pytest.fixture(scope="module")
def results(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-tp")
    proc = torchrun(Path(__file__).with_name("_lora_tp_worker.py"), 2, str(tiny_dataset), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / "results.pt")


def test_tp2_lora_logits_and_gradients_equal_tp1(results):
    tp1, tp2 = results["tp1"], results["tp2"]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=TOL, atol=TOL)
    torch.testing.assert_close(tp2["loss"], tp1["loss"], rtol=TOL, atol=TOL)
    assert tp1["grads"].keys() == tp2["grads"].keys() and len(tp1["grads"]) == 4 * len(TARGETS) * 2
    for name, g in tp1["grads"].items():
        assert g.abs().sum() > 0, f"{name}: no gradient"
        torch.testing.assert_close(tp2["grads"][name], g, rtol=TOL, atol=TOL, msg=name)
    assert tp1["base_grads"] == [] and tp2["base_grads"] == []  # the base is frozen
    assert tp2["replicated_identical"]


@pytest.mark.parametrize("layout,steps", [("tp2", 3), ("dp2", 2)])
def test_trainer_at_tp2_or_dp2_trains_only_lora_and_exports_the_merged_weights(results, layout, steps):
    run = results[f"trainer-{layout}"]
    before, after = run["before"], run["after"]
    assert [r["step"] for r in run["history"]] == list(range(1, steps + 1))
    for k in before:
        if is_lora_name(k):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"frozen {k} changed"
    exported = load_file(str(Path(run["export"]) / "model.safetensors"))
    assert set(exported) == {k for k in after if not is_lora_name(k)}
    for k, v in exported.items():
        want = after[k]
        parts = k.split(".")
        if parts[-1] == "weight" and parts[-2] in TARGETS:
            lora = f"{parts[0]}.{parts[1]}.lora.{parts[-2]}"
            want = want + 2.0 * (after[f"{lora}.B"] @ after[f"{lora}.A"])
        torch.testing.assert_close(v, want, rtol=0, atol=1e-6, msg=k)

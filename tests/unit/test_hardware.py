"""Precision follows the device's native bf16 support, and the MFU peak never probes the machine at length."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.hardware.peak import known_peak_tflops, peak, peak_flops
from pipeline.hardware.precision import NATIVE_BF16_ENV, resolve_precision
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides

CPU = torch.device("cpu")


def test_auto_precision_is_fp32_without_native_bf16_and_bf16_with_it():
    slow = resolve_precision("auto", CPU, native_bf16=False)
    fast = resolve_precision("auto", CPU, native_bf16=True)
    assert (slow.dtype, slow.torch_dtype, slow.bf16) == ("fp32", torch.float32, False)
    assert (fast.dtype, fast.torch_dtype, fast.bf16) == ("bf16", torch.bfloat16, True)
    assert slow.reason.startswith("auto:")


def test_explicit_precision_is_obeyed_and_an_emulated_bf16_is_called_slow():
    assert resolve_precision("fp32", CPU, native_bf16=True).dtype == "fp32"
    forced = resolve_precision("bf16", CPU, native_bf16=False)
    assert forced.dtype == "bf16" and "many times slower" in forced.reason


def test_cpu_bf16_decision_reads_torch_capability_checks_or_the_override(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert resolve_precision("auto", CPU).dtype == "fp32"
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert resolve_precision("auto", CPU).dtype == "bf16"
    monkeypatch.delenv(NATIVE_BF16_ENV)
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_precision("auto", CPU).dtype == ("bf16" if native else "fp32")


def test_old_bf16_key_is_refused_naming_the_new_one():
    with pytest.raises(
        ConfigError, match=r"'parallel\.bf16' \(False\) was replaced by 'parallel\.precision'.*fp32"
    ):
        load_train_config(None, ["parallel.bf16=false"])


def test_known_accelerators_have_their_dense_bf16_peak():
    assert known_peak_tflops("NVIDIA H200") == 989.0
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("NVIDIA B200") == 2250.0
    assert known_peak_tflops("Some Future GPU") is None


def test_peak_comes_from_config_else_a_cached_time_boxed_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDLM_CACHE_DIR", str(tmp_path))
    assert peak_flops(CPU, torch.float32, configured_tflops=0.3) == (
        0.3e12,
        "0.3 TFLOP/s (config peak_tflops=0.3)",
    )
    first = peak(CPU, torch.float32, budget_s=0.2)
    assert first.flops > 0 and first.source.startswith("measured float32 matmul (0.2 s time box)")
    (cache,) = tmp_path.glob("peak-*.json")
    assert json.loads(cache.read_text())["flops"] == first.flops
    again = peak(CPU, torch.float32, budget_s=0.2)
    assert again.flops == first.flops and again.source.startswith("measured float32 matmul, cached at")
    assert again.describe(now=again.measured_at + 7200).endswith(", 2 h old)")


def test_a_throughput_above_a_stale_cached_peak_remeasures_it_and_mfu_stays_at_most_one(
    tmp_path, monkeypatch
):
    """A peak cached while the machine was busy (here: 1 MFLOP/s) is re-measured, not trusted."""
    monkeypatch.setenv("MEMDLM_CACHE_DIR", str(tmp_path))
    stale = peak(CPU, torch.float32, budget_s=0.1)
    (cache,) = tmp_path.glob("peak-*.json")
    cache.write_text(json.dumps({"flops": 1e6, "measured_at": 0.0}))
    stale = peak(CPU, torch.float32, budget_s=0.1)
    assert stale.flops == 1e6
    mfu = stale.mfu(5e6)
    assert stale.flops > 1e6 and mfu <= 1.0 and mfu == pytest.approx(5e6 / stale.flops)
    assert stale.source.startswith("re-measured: 3 x 0.1 s time boxes, max kept")
    assert json.loads(cache.read_text())["flops"] == stale.flops  # the cache holds the better number now


def test_a_configured_peak_below_the_achieved_throughput_is_raised_with_a_warning():
    wrong = peak(CPU, torch.float32, configured_tflops=1e-6)  # 1 MFLOP/s: a typo in the config
    with pytest.warns(UserWarning, match="exceeds the MFU peak"):
        assert wrong.mfu(3e6) == 1.0
    assert wrong.flops == 3e6 and wrong.source.endswith("raised to an achieved throughput")
    assert wrong.mfu(1.5e6) == 0.5


@pytest.mark.parametrize("native", [False, True])
def test_trainer_records_the_precision_it_chose_and_why(world1, tiny_dataset, tmp_path, native):
    """bf16 on the tiny model costs seconds even where it is emulated."""
    cfg = load_train_config(
        None,
        tiny_run_overrides(
            tiny_dataset, tmp_path / "mlruns", f"run_dir={tmp_path / 'run'}", "steps=1", "eval.every=0"
        ),
    )
    trainer = Trainer(cfg, native_bf16=native)
    trainer.run()
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    want = "bf16" if native else "fp32"
    assert written["runtime"]["precision"] == want and written["parallel"]["precision"] == "auto"
    assert trainer.engine.bfloat16_enabled() is native
    # every default is written, not only what the YAML/overrides said
    assert written["optim"]["beta2"] == 0.95 and written["memory"]["rank"] == 32
    params = trainer.tracker.client.get_run(trainer.tracker.run_id).data.params
    assert params["runtime.precision"] == want and params["runtime.precision_reason"].startswith(
        "auto: given"
    )

"""The GPU check's orchestration (bench/gpu_check.py, bench/gpucheck/), on the CPU: the stage runner,
the time budget, the report, the resume-parity comparison, the offline install command, and the CLI
itself on this machine's .venv (environment + a tiny bench-step through `make`, one stage failing)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpucheck.common import RUNTIME_PACKAGES
from bench.gpucheck.install import install_requirements, pip_install_command, requirement_pins
from bench.gpucheck.parity import resume_parity
from bench.gpucheck.report import build_report
from bench.gpucheck.runner import Budget, Stage, StageError, run_stages
from bench.gpucheck.shell import Shell
from pipeline.hardware.precision import resolve_precision
from tests.conftest import write_txt_corpus

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_failing_stage_is_recorded_with_its_error_and_the_rest_still_run():
    def boom() -> dict:
        raise StageError("exit status 2: make pretrain", tail="...\nTraceback: the real reason\n")

    def bug() -> dict:
        raise KeyError("steps")

    stages = [
        Stage("first", lambda: {"x": 1}),
        Stage("second", boom),
        Stage("needs-second", lambda: {"y": 2}, requires=("second",)),
        Stage("unexpected", bug),
        Stage("last", lambda: {"z": 3}, requires=("first", "not-selected")),
    ]
    recs = run_stages(stages, Budget(100.0), log=lambda _: None)
    by = {r["name"]: r for r in recs}
    assert [r["name"] for r in recs] == ["first", "second", "needs-second", "unexpected", "last"]
    assert by["first"]["status"] == "pass" and by["first"]["figures"] == {"x": 1}
    assert by["second"]["status"] == "fail"
    assert by["second"]["error"] == "exit status 2: make pretrain"
    assert "the real reason" in by["second"]["error_tail"]
    assert by["needs-second"]["status"] == "skipped: needs second"
    assert by["unexpected"]["status"] == "fail" and "KeyError" in by["unexpected"]["error"]
    assert "Traceback" in by["unexpected"]["error_tail"]
    assert by["last"]["status"] == "pass"  # a requirement that was not run does not block


def test_the_budget_skips_stages_that_no_longer_fit():
    clock = FakeClock()

    def slow() -> dict:
        clock.t += 8.0
        return {}

    ran = []
    stages = [
        Stage("slow", slow, min_s=1),
        Stage("big", lambda: ran.append("big") or {}, min_s=5),
        Stage("small", lambda: ran.append("small") or {}, min_s=1),
        Stage("bigger", lambda: ran.append("bigger") or {}, min_s=30),
    ]
    recs = run_stages(stages, Budget(10.0, clock=clock), log=lambda _: None)
    assert [r["status"] for r in recs] == ["pass", "skipped: time budget", "pass", "skipped: time budget"]
    assert recs[0]["seconds"] == 8.0
    assert ran == ["small"]
    assert "2 s left of 10" in recs[1]["error"]


def test_a_command_past_the_budget_is_killed_with_its_children(tmp_path):
    shell = Shell(Budget(1.5), tmp_path / "logs")
    t0 = time.monotonic()
    with pytest.raises(StageError, match="killed at the time budget") as info:
        shell.run(["bash", "-c", "sleep 60 & echo CHILD=$!; sleep 60"], "slow")
    assert time.monotonic() - t0 < 15
    child = int(re.search(r"CHILD=(\d+)", info.value.tail).group(1))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # gone, or a zombie waiting for init to reap it
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} of the killed command still runs")


def test_a_command_that_fails_raises_with_its_output_tail(tmp_path):
    shell = Shell(Budget(60), tmp_path / "logs")
    with pytest.raises(StageError, match="exit status 3") as info:
        shell.run(["bash", "-c", "echo the reason; exit 3"], "bad")
    assert "the reason" in info.value.tail
    assert "the reason" in (tmp_path / "logs" / "bad.log").read_text()


def _records(losses: dict[int, float], evals: dict[int, float] | None = None) -> list[dict]:
    out = []
    for step, loss in losses.items():
        rec = {"step": step, "loss": loss, "tokens_per_s": 1000.0 + step}
        if evals and step in evals:
            rec["eval/loss"] = evals[step]
        out.append(rec)
    return out


def test_resume_parity_accepts_equal_losses_and_names_the_worst_difference():
    ref = _records({s: 10.0 - 0.1 * s for s in range(1, 31)}, {10: 9.5, 20: 8.5, 30: 7.5})
    same = resume_parity(ref, [dict(r) for r in ref], rtol=1e-3)
    assert same["ok"] and same["exact"] and same["max_rel_diff"] == 0.0
    assert same["compared_values"] == 33  # 30 train losses + 3 evals
    assert same["steps_compared"] == list(range(1, 31))

    close = [dict(r) for r in ref]
    close[24]["loss"] *= 1 + 5e-4  # step 25, within 1e-3
    near = resume_parity(ref, close, rtol=1e-3)
    assert near["ok"] and not near["exact"]
    assert near["worst"]["step"] == 25 and near["worst"]["key"] == "loss"

    off = [dict(r) for r in ref]
    off[19]["eval/loss"] += 0.1  # step 20's eval, 1.2% off
    bad = resume_parity(ref, off, rtol=1e-3)
    assert not bad["ok"]
    assert bad["worst"]["step"] == 20 and bad["worst"]["key"] == "eval/loss"
    assert bad["max_rel_diff"] == pytest.approx(0.1 / 8.5)


def test_resume_parity_fails_when_steps_are_missing():
    ref = _records({s: 5.0 for s in range(1, 11)})
    gap = [r for r in ref if r["step"] != 7]
    res = resume_parity(ref, gap, rtol=1e-3)
    assert not res["ok"] and res["missing_steps"] == [7]
    assert not resume_parity(ref, [], rtol=1e-3)["ok"]
    assert resume_parity(ref, gap, rtol=1e-3, after_step=7)["ok"]  # only steps after 7 are wanted


def test_report_has_the_required_keys_and_is_ok_only_when_all_passed():
    clock = FakeClock()
    budget = Budget(330, clock=clock)
    env = {"gpu": "NVIDIA H200", "torch": "2.9.0+cu128", "cuda_runtime": "12.8", "nccl": "2.27.3"}
    recs = [
        {"name": "environment", "status": "pass", "seconds": 2.0, "figures": env},
        {"name": "pretrain", "status": "pass", "seconds": 50.0, "figures": {"final_loss": 6.1}},
        {"name": "bench_step_1b", "status": "skipped: time budget", "seconds": 0.0, "figures": {}},
    ]
    clock.t = 300
    rep = build_report(recs, budget, "2026-01-01T00:00:00+00:00", {"preset": "125m"})
    for key in ("gpu", "torch", "cuda", "environment", "stages", "figures", "ok", "elapsed_s", "budget_s"):
        assert key in rep
    assert (rep["gpu"], rep["torch"], rep["cuda"]) == ("NVIDIA H200", "2.9.0+cu128", "12.8")
    assert rep["elapsed_s"] == 300 and not rep["ok"]
    assert [s["status"] for s in rep["stages"]] == ["pass", "pass", "skipped: time budget"]
    assert rep["figures"]["pretrain"] == {"final_loss": 6.1}
    json.dumps(rep)  # serialisable as it is
    assert build_report(recs[:2], budget, "t", {})["ok"]


def test_the_install_is_offline_pinned_and_never_names_torch():
    pins = requirement_pins(ROOT / "requirements.txt")
    assert pins["torch"] and pins["deepspeed"] and pins["megatron-core"]
    reqs = install_requirements(RUNTIME_PACKAGES, pins)
    assert not any(r.lower().startswith("torch") for r in reqs)
    assert f"deepspeed=={pins['deepspeed']}" in reqs and f"megatron-core=={pins['megatron-core']}" in reqs
    with pytest.raises(ValueError, match="never installed"):
        install_requirements(["deepspeed", "torch"], pins)
    cmd = pip_install_command("/venv/bin/python", Path("/w"), reqs)
    assert cmd[:4] == ["/venv/bin/python", "-m", "pip", "install"]
    assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == "/w"


@pytest.mark.slow
def test_the_cli_on_this_cpu_records_each_stage_and_the_bench_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    corpus = write_txt_corpus(tmp_path, n_docs=40, seed=1)  # bench-step trains the tiny preset on it
    bench_data = tmp_path / "bench_data.yaml"
    bench_data.write_text(
        json.dumps(
            {
                "out_dir": str(tmp_path / "bench"),
                "corpus": [str(corpus)],
                "val_fraction": 0.1,
                "train_shards": 8,
            }
        )
    )
    cmd = [
        sys.executable, "-m", "bench.gpu_check", "run",
        "--no-install", "--venv", sys.prefix, "--device-check", "cpu",
        "--stages", "install,environment,data,bench_step",
        "--corpus", str(tmp_path / "no-such-corpus.jsonl.gz"),
        "--bench-presets", "tiny", "--bench-batch", "tiny=2", "--bench-steps", "1",
        "--bench-extra", f"--config-data {bench_data}",
        "--work", str(tmp_path / "work"), "--out", str(out), "--budget-s", "200",
    ]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")
    }
    # the short peak measurement below stays out of the cache training reads
    env["MEMDLM_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the data stage fails: not all passed
    rep = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in rep["stages"]}
    assert status == {"install": "pass", "environment": "pass", "data": "fail", "bench_step_tiny": "pass"}
    data = next(s for s in rep["stages"] if s["name"] == "data")
    assert "no corpus" in data["error"]
    assert not rep["ok"] and rep["torch"] == torch.__version__ and rep["gpu"] is None
    bench = rep["figures"]["bench_step_tiny"]
    assert bench["precision"] == resolve_precision("auto", torch.device("cpu")).dtype  # as training picks
    assert bench["peak_flops"] > 0 and bench["peak_flops_source"]
    assert bench["mdlm_mfu"] > 0 and bench["memdlm_mfu"] > 0
    assert bench["memdlm_over_mdlm_step_ratio"] > 0 and bench["memdlm_over_mdlm_flops_ratio"] > 1
    assert all(s["seconds"] >= 0 for s in rep["stages"])

"""The Trainer on 2 real processes: stop-and-resume parity and a kill -9 during a save.

Resumed runs must log the same losses, gradient norms and eval numbers as the uninterrupted run
(bitwise: same machine, same layout, deterministic kernels; compared with rtol 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_train_worker.py")
KEYS = ("loss", "grad_norm", "lr", "inner/stage1_loss", "inner/stage2_loss")


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    after_crash = {}
    for mode in ("full", "crash", "resume"):
        proc = torchrun(WORKER, 2, mode, str(tiny_dataset), str(out))
        if mode == "crash":
            assert proc.returncode != 0, "the worker was meant to be killed during its second save"
            ckpts = out / "C" / "checkpoints"
            after_crash = {
                "latest": (ckpts / "latest").read_text().strip(),
                "entries": sorted(p.name for p in ckpts.iterdir()),
            }
        else:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return out, after_crash


def _load(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())


def _assert_same(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference, strict=True):
        for key in (*KEYS, *(k for k in want if k.startswith("eval/"))):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)


def test_stop_and_resume_gives_the_uninterrupted_run(runs):
    runs, _ = runs
    full = _load(runs, "A")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert any(k.startswith("eval/") for k in full[2])
    _assert_same(_load(runs, "B-first") + _load(runs, "B-second"), full)


def test_kill_during_save_leaves_the_last_checkpoint_loadable(runs):
    runs, after_crash = runs
    ckpts = runs / "C" / "checkpoints"
    assert after_crash["latest"] == "step-000003"  # never repointed to the dead save
    assert after_crash["entries"] == [
        ".tmp-step-000006",
        "latest",
        "step-000003",
    ]  # the dead save is a tmp dir
    second = _load(runs, "C-second")
    assert second[0]["step"] == 4  # resumed from step 3 ...
    _assert_same(_load(runs, "C-first") + second, _load(runs, "A"))  # ... and matched the clean run
    assert (ckpts / "latest").read_text().strip() == "step-000006"
    assert not list(ckpts.glob(".tmp-*"))  # the next save swept the dead one away
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000003", "step-000006"]  # keep=2

"""The Trainer on 2 real processes: stop-and-resume parity, a kill -9 during a save and one
inside a re-save of an existing step.

Resumed runs must log the same losses, gradient norms and eval numbers as the uninterrupted run
(bitwise: same machine, same layout, deterministic kernels; compared with rtol 1e-6).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from pipeline.engine.checkpoint import CheckpointError, CheckpointWarning, select_checkpoint
from tests.distributed._launch import torchrun

WORKER = Path(__file__).with_name("_train_worker.py")
KEYS = ("loss", "grad_norm", "lr", "inner/stage1_loss", "inner/stage2_loss")


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    after_crash = {}
    for mode, run in (("full", None), ("crash", "C"), ("resave", "D"), ("resume", None)):
        proc = torchrun(WORKER, 2, mode, str(tiny_dataset), str(out))
        if run:
            assert proc.returncode != 0, f"the {mode} worker was meant to be killed inside a save"
            ckpts = out / run / "checkpoints"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", CheckpointWarning)  # no fallback: the kill damaged nothing
                    chosen = getattr(select_checkpoint(ckpts), "name", None)
            except (CheckpointError, CheckpointWarning) as exc:  # judged by the run's own test
                chosen = f"{type(exc).__name__}: {exc}"
            after_crash[run] = {
                "latest": (ckpts / "latest").read_text().strip(),
                "entries": sorted(p.name for p in ckpts.iterdir()),
                "chosen": chosen,
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
    after_crash = after_crash["C"]
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


def test_kill_inside_a_re_save_keeps_the_step_it_was_re_saving(runs):
    runs, after_crash = runs
    after = after_crash["D"]
    assert after["latest"] == "step-000003"
    assert ".old-step-000003" in after["entries"]  # killed with the published copy set aside ...
    assert after["chosen"] == ".old-step-000003"  # ... which a resume verifies and uses
    error = runs / "D-error.txt"
    assert not error.exists(), error.read_text()
    second = _load(runs, "D-second")
    assert second[0]["step"] == 4
    _assert_same(_load(runs, "D-first") + second, _load(runs, "A"))
    ckpts = runs / "D" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000003", "step-000006"]
    assert (ckpts / "latest").read_text().strip() == "step-000006"

"""The Trainer (one process, real DeepSpeed) resuming past a damaged newest checkpoint."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.engine.checkpoint import CheckpointError, CheckpointWarning, verify_checkpoint
from pipeline.train import Trainer
from tests.conftest import tiny_trainer_config


def _cfg(dataset, run_dir, *extra):
    return tiny_trainer_config(dataset, run_dir, "memory.enabled=false", *extra)


def _losses(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_a_truncated_optimizer_file_is_named_and_the_previous_checkpoint_resumes_the_same_run(
    world1, tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    Trainer(_cfg(tiny_dataset, run)).run()
    first = _losses(run)
    assert [s for s, _ in first] == [1, 2, 3, 4]
    (optim,) = (run / "checkpoints" / "step-000004" / "ds").glob("*optim_states.pt")
    optim.write_bytes(optim.read_bytes()[:100])  # a write cut short (full disk, killed copy)

    with pytest.raises(CheckpointError, match=re.escape(f"{optim}: 100 bytes")):
        Trainer(_cfg(tiny_dataset, run, "checkpoint.on_damaged=error"))

    with pytest.warns(CheckpointWarning, match=re.escape(f"{optim}: 100 bytes")):
        trainer = Trainer(_cfg(tiny_dataset, run))
    assert trainer.state.step == 2
    resumed = [(r["step"], r["loss"]) for r in trainer.run()]
    assert [s for s, _ in resumed] == [3, 4]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in first[2:]], rel=1e-6)
    verify_checkpoint(run / "checkpoints" / "step-000004")  # the damaged one was re-saved whole
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"

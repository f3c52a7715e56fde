"""Every collective of a Trainer run (train steps, eval, save, stop check, export) uses tensors on the
training device, so the same code runs under an NCCL process group on a GPU (tests/collective_guard.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.engine.export import export_model
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.collective_guard import CollectiveGuard
from tests.conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_trainer_collectives_keep_their_tensors_on_the_training_device(world1, tiny_dataset, tmp_path):
    cfg = load_train_config(
        None,
        tiny_run_overrides(
            tiny_dataset,
            tmp_path / "mlruns",
            f"run_dir={tmp_path / 'run'}",
            "steps=2",
            "eval.every=1",
            "eval.batches=1",
            "checkpoint.every=1",
            "memory.enabled=true",
            "parallel.precision=fp32",
            "parallel.param_persistence_threshold=0",
        ),
    )
    trainer = Trainer(cfg)
    with CollectiveGuard(trainer.device, roots=[ROOT / "pipeline", ROOT / "launch"]) as guard:
        trainer.run()
        export_model(
            trainer.engine,
            cfg,
            tmp_path / "export",
            tiny_dataset / "tokenizer.model",
            {"mask": 4},
            trainer.state.step,
        )
    files = {site.rsplit("/", 1)[-1].split(":")[0] for site, *_ in guard.calls}
    # the step's finite/skipped-shard agreement and loss mean, the stop check, the eval sums
    assert {"train.py", "stop.py", "heldout.py"} <= files, guard.calls
    assert len(guard.calls) >= 2 * 3 + 2
    guard.check()


def test_guard_catches_a_flag_created_on_the_default_device(world1):
    """The regression it exists for: ``torch.tensor([flag])`` without ``device=`` in a collective."""
    here = Path(__file__).resolve().parent
    with CollectiveGuard(torch.device("cpu"), roots=[here]) as guard:
        flag = torch.tensor([1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        sums = torch.zeros(4, dtype=torch.float64)
        sums[0] += 2.0
        dist.all_reduce(sums)
        ok = torch.tensor([1.0], device="cpu")
        dist.all_reduce(ok)
    assert len(guard.problems) == 2
    assert all("created on the default (CPU) device" in p for p in guard.problems)
    with pytest.raises(AssertionError, match="an NCCL group rejects it"):
        guard.check()

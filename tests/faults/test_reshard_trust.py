"""`make reshard` (python -m pipeline.engine.reshard) on an altered checkpoint and on bad options,
as a real process: it verifies the checkpoint against its files.json before anything of it is
unpickled, and every bad input is one `error:` line naming it, exit 2."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train import Trainer
from tests import _proc
from tests.conftest import tiny_trainer_config

ROOT = Path(__file__).resolve().parents[2]


class _CreatesMarker:
    """Unpickling this runs ``open(path, "w")``: the marker file exists iff the pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _reshard(*args: str) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of ``python -m pipeline.engine.reshard args``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("MEMDLM_DEBUG", None)
    proc = _proc.run([sys.executable, "-m", "pipeline.engine.reshard", *args], env=env, cwd=ROOT, timeout=300)
    return proc.returncode, proc.stderr.splitlines(), proc.stdout


@pytest.fixture(scope="module")
def trained(world1, tiny_dataset, tmp_path_factory) -> Path:
    """A real run directory with checkpoints at steps 2 and 4 (one process, ZeRO-3)."""
    run = tmp_path_factory.mktemp("reshard-trust") / "run"
    Trainer(tiny_trainer_config(tiny_dataset, run, "memory.enabled=false")).run()
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run that a test may damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _plant_pickle(file: Path, marker: Path) -> None:
    """Replace ``file`` by a same-size pickle that creates ``marker`` when unpickled (a byte-level
    alteration the size check cannot see)."""
    size = file.stat().st_size
    payload = pickle.dumps(_CreatesMarker(marker), protocol=2)
    assert len(payload) < size
    file.write_bytes(payload + b"\0" * (size - len(payload)))


@pytest.mark.parametrize("given", ["step_folder", "checkpoints_dir"])
def test_reshard_refuses_an_altered_optimizer_file_before_unpickling_it(run, tmp_path, given):
    ckpt = run / "checkpoints" / "step-000004"
    (optim,) = sorted((ckpt / "ds").glob("*optim_states.pt"))
    marker = tmp_path / "unpickled"
    _plant_pickle(optim, marker)
    target = ckpt if given == "step_folder" else run / "checkpoints"
    # the checkpoints folder's newest is damaged: the previous complete one (step 2) is converted
    rc, err, out = _reshard(str(target))
    assert not marker.exists(), "the altered file was unpickled"
    if given == "step_folder":
        assert rc == 2
        assert err == [
            f"error: {optim}: sha256 differs from files.json (same size, different content: the file was altered)"
        ]
        assert not (ckpt / "universal").exists() and not (ckpt / ".tmp-universal").exists()
    else:
        assert rc == 0, err
        assert f"universal checkpoint ready: {run / 'checkpoints' / 'step-000002' / 'universal'}" in out
        assert any(f"{optim}: sha256 differs from files.json" in line for line in err)  # the warning
        assert not (ckpt / "universal").exists()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch says after the payload ran
        torch.load(optim, weights_only=False)  # what DeepSpeed's converter would have done
    assert marker.exists()  # the planted pickle was live: only the verification kept it from running


def test_reshard_refuses_a_checkpoint_it_cannot_verify(run):
    ckpt = run / "checkpoints" / "step-000004"
    (ckpt / "files.json").unlink()
    rc, err, _ = _reshard(str(ckpt))
    assert rc == 2
    assert err == [
        f"error: {ckpt}: no files.json, so its files cannot be verified before DeepSpeed's converter "
        "unpickles them; resume it at the TP x DP layout that wrote it (train_state.json 'layout')"
    ]


@pytest.mark.parametrize(("option", "value"), [("--dp", "0"), ("--tp", "0"), ("--dp", "-1"), ("--tp", "two")])
def test_a_size_below_one_is_one_error_line_naming_the_option(run, option, value):
    ckpt = run / "checkpoints" / "step-000004"
    rc, err, _ = _reshard(str(ckpt), option, value)
    assert rc == 2
    make_name = option[2:].upper()
    assert err == [
        f"error: argument {option}: got {value!r}, expected an integer >= 1 (make reshard {make_name}=...)"
    ]
    assert not (ckpt / "universal").exists()  # nothing converted on a refused command


def test_make_reshard_with_dp_0_prints_one_error_line(run):
    ckpt = run / "checkpoints" / "step-000004"
    proc = _proc.run(
        ["make", "--no-print-directory", "reshard", f"CHECKPOINT={ckpt}", "DP=0"], cwd=ROOT, timeout=300
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2
    assert errors == ["error: argument --dp: got '0', expected an integer >= 1 (make reshard DP=...)"]

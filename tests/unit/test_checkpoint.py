"""Checkpoint files without DeepSpeed: files.json verification, fallback past a damaged or
missing newest checkpoint, and a re-save killed at every point of its swap (a fake engine)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import pipeline.engine.checkpoint as ckpt
from pipeline.engine.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    DamagedCheckpoint,
    Layout,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
    verify_checkpoint,
)

LAYOUT = Layout(world=1, tp=1, dp=1)
MANIFEST_SHA = "a" * 64


class FakeEngine:
    """Writes what a DeepSpeed checkpoint holds in shape: torch files under ``<dir>/<tag>``."""

    def __init__(self, value: float = 0.0):
        self.value = value
        self.loaded: float | None = None
        self.module = torch.nn.Linear(2, 2)  # a model without persistent buffers

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((64,), self.value)}, out / "mp_rank_00_model_states.pt")
        torch.save({"m": torch.arange(256.0) + self.value}, out / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: object):
        self.loaded = float(torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt")["w"][0])
        torch.load(Path(load_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return load_dir, {}


def _save(ckpt_dir: Path, step: int, value: float | None = None, keep: int = 3) -> Path:
    state = {"layout": {"world": 1, "tp": 1, "dp": 1}, "manifest_sha256": MANIFEST_SHA}
    engine = FakeEngine(float(step) if value is None else value)
    return save_checkpoint(engine, ckpt_dir, step, state, [{"pos": step}], keep=keep)


def _load(engine: FakeEngine, path: Path) -> dict:
    """``load_checkpoint`` at the layout the checkpoint was written at."""
    state = json.loads((path / "train_state.json").read_text())
    return load_checkpoint(engine, path, state, MANIFEST_SHA)


def _truncate(path: Path, keep_bytes: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:keep_bytes])


def _select_quietly(ckpt_dir: Path, **kw) -> Path | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # any fallback warning fails the test
        return select_checkpoint(ckpt_dir, **kw)


@pytest.fixture
def two_saves(world1, tmp_path) -> Path:
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    _save(ckpt_dir, 4)
    return ckpt_dir


def test_a_save_lists_every_file_with_its_size_and_sha256(two_saves):
    path = two_saves / "step-000004"
    listed = json.loads((path / "files.json").read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"files.json"}
    assert set(listed) == on_disk
    assert {
        "train_state.json",
        "rng/rank-00000.pt",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    } <= on_disk
    for rel, info in listed.items():
        assert info["size"] == (path / rel).stat().st_size
        assert info["sha256"] == hashlib.sha256((path / rel).read_bytes()).hexdigest()
    verify_checkpoint(path)
    assert _select_quietly(two_saves) == path


def test_a_truncated_file_in_the_newest_checkpoint_falls_back_with_a_warning_naming_it(two_saves):
    bad = two_saves / "step-000004" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _truncate(bad)
    with pytest.warns(CheckpointWarning, match=r"optim_states\.pt: 10 bytes, files\.json says \d+") as rec:
        chosen = select_checkpoint(two_saves)
    assert chosen == two_saves / "step-000002"
    assert str(bad) in str(rec[0].message) and "resuming from step-000002" in str(rec[0].message)


def test_an_altered_file_of_the_same_size_is_caught_by_its_sha256(two_saves):
    bad = two_saves / "step-000004" / "rng" / "rank-00000.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="sha256 differs") as exc:
        verify_checkpoint(two_saves / "step-000004")
    assert exc.value.file == bad
    verify_checkpoint(two_saves / "step-000004", hashes=False)  # sizes alone cannot see it
    with pytest.warns(CheckpointWarning, match=r"rank-00000\.pt: sha256 differs"):
        assert select_checkpoint(two_saves) == two_saves / "step-000002"


def test_on_damaged_error_refuses_and_names_the_file_and_the_way_on(two_saves):
    bad = two_saves / "step-000004" / "rng" / "rank-00000.json"
    bad.unlink()
    with pytest.raises(CheckpointError) as exc:
        _select_quietly(two_saves, on_damaged="error")
    msg = str(exc.value)
    assert f"{bad}: missing" in msg
    assert "step-000002 is the newest complete checkpoint" in msg and "on_damaged=fallback" in msg


def test_latest_naming_a_missing_step_falls_back_to_the_previous_checkpoint(two_saves):
    shutil.rmtree(two_saves / "step-000004")
    with pytest.warns(CheckpointWarning, match=r"latest names step-000004, which does not exist"):
        assert select_checkpoint(two_saves) == two_saves / "step-000002"
    assert latest_checkpoint(two_saves) == two_saves / "step-000002"


def test_checkpoints_that_all_fail_verification_are_an_error_not_a_fresh_start(two_saves):
    for step in ("step-000002", "step-000004"):
        _truncate(two_saves / step / "train_state.json")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from .*step-000002"):
        select_checkpoint(two_saves)


def test_an_empty_or_absent_checkpoint_folder_resumes_nothing(tmp_path):
    assert _select_quietly(tmp_path / "nothing-here") is None
    (tmp_path / "empty").mkdir()
    assert _select_quietly(tmp_path / "empty") is None


def test_a_checkpoint_from_before_files_json_still_resumes(two_saves):
    for step in ("step-000002", "step-000004"):
        (two_saves / step / "files.json").unlink()
    assert _select_quietly(two_saves) == two_saves / "step-000004"


def test_a_kill_after_the_first_rename_before_latest_resumes_that_checkpoint(world1, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    (ckpt_dir / "latest").unlink()  # the state a kill between rename and pointer write leaves
    assert _select_quietly(ckpt_dir) == ckpt_dir / "step-000002"


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs (``except Exception`` does not catch it)."""


@pytest.mark.parametrize("point", ["set-aside", "publish", "latest", "delete-old"])
def test_a_re_save_killed_at_any_point_leaves_a_complete_checkpoint_of_that_step(
    world1, tmp_path, monkeypatch, point
):
    ckpt_dir = tmp_path / "checkpoints"
    _save(ckpt_dir, 2)
    _save(ckpt_dir, 4, value=40.0)
    real_replace, real_rmtree = ckpt.os.replace, ckpt.shutil.rmtree

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        if (point, src.name) in {("set-aside", "step-000004"), ("publish", ".tmp-step-000004")}:
            raise _Killed
        if point == "latest" and dst.name == "latest":
            raise _Killed
        return real_replace(src, dst)

    def rmtree(path, *args, **kw):
        if point == "delete-old" and Path(path).name == ".old-step-000004":
            next(Path(path).rglob("*.pt")).unlink()  # killed halfway through the delete
            raise _Killed
        return real_rmtree(path, *args, **kw)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        _save(ckpt_dir, 4, value=41.0)  # the re-save, e.g. a stop signal right after the periodic save
    monkeypatch.undo()

    assert (ckpt_dir / "latest").read_text().strip() == "step-000004"
    chosen = _select_quietly(ckpt_dir)
    assert chosen is not None and latest_checkpoint(ckpt_dir) == chosen
    engine = FakeEngine()
    state = _load(engine, chosen)
    assert state["step"] == 4 and engine.loaded in (40.0, 41.0)  # the old copy or the new one, whole

    _save(ckpt_dir, 6)  # the next save tidies up after the kill
    left = sorted(p.name for p in ckpt_dir.iterdir())
    assert left == ["latest", "step-000002", "step-000004", "step-000006"]
    verify_checkpoint(ckpt_dir / "step-000004")


def test_loading_a_truncated_torch_file_names_it(two_saves):
    path = two_saves / "step-000004"
    rng = path / "rng" / "rank-00000.pt"
    _truncate(rng, keep_bytes=rng.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{rng}: could not load the RNG state")):
        _load(FakeEngine(), path)
    optim = path / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _truncate(optim, keep_bytes=optim.stat().st_size // 2)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{optim} (not a complete torch file): DeepSpeed could not")
    ):
        _load(FakeEngine(), path)

"""The job-array build (data_prep/array.py) on submitit's LocalExecutor: byte-identical to the
single-machine build whatever the number of tasks, units cut by size, and a failed task's units
redone alone on the next invocation."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.array import plan_units
from data_prep.shard import DatasetPrepError, prepare_dataset
from launch.clusters import ClusterConfig
from launch.data_array import prepare_with_array
from tests.conftest import make_text, prep_config, write_txt_corpus

UNIT = 8 << 10  # bytes: a few KiB per unit, so the small corpus below makes several


def _corpus(root: Path) -> Path:
    """Short .txt documents plus one jsonl larger than a unit (cut inside, at line starts)."""
    corpus = write_txt_corpus(root, n_docs=10, seed=4, lines=(5, 40))
    rng = random.Random(8)
    lines = [json.dumps({"text": make_text(rng, rng.randint(3, 30))}) for _ in range(60)]
    (corpus / "zz-big.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus


def _build(run_dir: Path, corpus: Path, monkeypatch, tasks: int | None) -> bytes:
    """Build into ``run_dir/ds`` (out_dir relative, so manifests of different builds may be
    compared byte for byte); returns manifest.json's bytes."""
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = prep_config(Path("ds"), [str(corpus)], workers=1)
    if tasks is None:
        prepare_dataset(cfg, progress=False)
    else:
        prepare_with_array(cfg, ClusterConfig(executor="local"), tasks, progress=False, unit_bytes=UNIT)
    return (run_dir / "ds" / "manifest.json").read_bytes()


def _shards(ds: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ds / "shards").glob("*.tar"))}


def test_units_are_cut_by_size_in_corpus_order(tmp_path):
    corpus = _corpus(tmp_path)
    inputs = [(p, "text") for p in sorted(corpus.iterdir())]
    units = plan_units(inputs, UNIT)
    segments = [seg for u in units for seg in u.segments]
    assert [s[0] for s in segments] == sorted(s[0] for s in segments)  # corpus order kept
    big = [s for s in segments if s[0].endswith("zz-big.jsonl")]
    assert len(big) > 1 and big[0][2] == 0 and big[-1][3] == (corpus / "zz-big.jsonl").stat().st_size
    assert all(a[3] == b[2] for a, b in itertools.pairwise(big))  # contiguous byte ranges
    raw = (corpus / "zz-big.jsonl").read_bytes()
    assert all(raw[s[2] - 1 : s[2]] == b"\n" for s in big[1:])  # each cut at a line start
    assert all(u.bytes <= UNIT for u in units if len(u.segments) > 1)  # packed up to the unit size


@pytest.mark.slow
def test_array_build_is_byte_identical_to_the_single_machine_build_for_1_2_3_tasks(
    tmp_path, monkeypatch, capsys
):
    corpus = _corpus(tmp_path)
    reference = _build(tmp_path / "single", corpus, monkeypatch, None)
    ref_shards = _shards(tmp_path / "single" / "ds")
    capsys.readouterr()
    for tasks in (1, 2, 3):
        manifest = _build(tmp_path / f"tasks{tasks}", corpus, monkeypatch, tasks)
        out = capsys.readouterr().out
        assert f"submitted {tasks} array task(s)" in out
        assert manifest == reference
        assert _shards(tmp_path / f"tasks{tasks}" / "ds") == ref_shards
        assert out.strip().splitlines()[-1].startswith("dataset ready: ds ")  # the last line says where


def test_a_failed_task_is_redone_alone_on_the_next_invocation(tmp_path, monkeypatch, capsys):
    corpus = _corpus(tmp_path)
    reference = _build(tmp_path / "single", corpus, monkeypatch, None)
    run_dir = tmp_path / "array"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = prep_config(Path("ds"), [str(corpus)], workers=1)
    # A directory where unit 1's output must go: its task does the work, then cannot rename it.
    blocker = run_dir / "ds" / ".work" / "units" / "u00001.bin"
    blocker.mkdir(parents=True)
    cluster = ClusterConfig(executor="local")
    with pytest.raises(
        DatasetPrepError, match=r"1 of 2 array task\(s\) failed: task \d+ \(units [u0-9, ]*u00001"
    ):
        prepare_with_array(cfg, cluster, 2, progress=False, unit_bytes=UNIT)
    units = run_dir / "ds" / ".work" / "units"
    kept = {p.name: p.stat().st_mtime_ns for p in units.glob("u*.json")}
    assert kept  # the other task's units (and those the failed task finished first) are kept
    blocker.rmdir()
    capsys.readouterr()
    prepare_with_array(cfg, cluster, 1, progress=False, unit_bytes=UNIT)
    out = capsys.readouterr().out
    total = len(list(units.glob("u*.json")))
    assert f"{total - len(kept)} to do, {len(kept)} finished earlier" in out
    assert {n: (units / n).stat().st_mtime_ns for n in kept} == kept  # finished units not redone
    assert (run_dir / "ds" / "manifest.json").read_bytes() == reference


def test_an_array_task_imports_no_torch():
    # ~2 s of every task's start-up went to torch (through webdataset) before it was imported lazily
    out = subprocess.run(
        [sys.executable, "-c", "import sys, submitit, data_prep.array; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

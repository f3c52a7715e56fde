"""`make data ... CLUSTER=ci-slurm` on the real one-node Slurm (.ci/start-slurm.sh): the tokenising
array runs as Slurm array tasks; one task killed mid-way (scancel) fails the build with its name,
the re-run redoes only the unfinished units, and the result is the single-machine build's.

Outside CI this skips (with the reason) when no Slurm answers; in CI (CI=true) it fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from data_prep.shard import prepare_dataset
from pipeline.config import load_config
from pipeline.dataset.prep_config import PrepConfig
from tests import _proc
from tests.conftest import make_text
from tests.integration.test_slurm import slurm  # noqa: F401 - the fixture

OVERRIDES = ["workers=1", "val_fraction=0.01"]
JOB_NAME = "memdlm-ci-data"  # configs/cluster/ci-slurm.yaml's job_name + "-data"


def _corpus(path: Path, docs: int = 24000) -> Path:  # ~30 s of tokenising: the kill lands mid-way
    rng = random.Random(11)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": make_text(rng, rng.randint(5, 25))}) + "\n")
    return path


def _make_data(corpus: Path, out: Path) -> list[str]:
    args = " ".join([*OVERRIDES, "--no-progress", "--unit-mb", "0.25"])
    return [
        # --no-print-directory: under `make test` this is a sub-make, which would print
        # "make[1]: Leaving directory" after the build's own last line
        "make", "--no-print-directory", "data", "DATA_CONFIG=configs/data/ci-tiny.yaml",
        f"CORPUS={corpus}", f"OUT={out}", "CLUSTER=ci-slurm", "TASKS=2", f"ARGS={args}",
    ]  # fmt: skip


def _running_array_tasks() -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", JOB_NAME, "-t", "RUNNING", "-o", "%i"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return out.stdout.split()


def _kill_array_task(job: str, task: str) -> None:
    """SIGKILL every process of array task ``job_task`` (matched on its SLURM_ARRAY_* environment)."""
    want = {b"SLURM_ARRAY_JOB_ID=" + job.encode(), b"SLURM_ARRAY_TASK_ID=" + task.encode()}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _cancel_all() -> None:
    subprocess.run(["scancel", "-n", JOB_NAME], check=False, timeout=30)


def _without_out_dir(manifest: Path) -> dict:
    data = json.loads(manifest.read_text())
    data["config"].pop("out_dir")
    return data


def test_make_data_on_slurm_survives_a_killed_task_and_matches_the_single_machine_build(slurm, tmp_path):  # noqa: F811
    corpus = _corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "array-ds"
    units = out / ".work" / "units"
    log = tmp_path / "first.log"
    try:
        with _proc.started(_make_data(corpus, out), stdout=open(log, "wb"), stderr=subprocess.STDOUT) as make:
            deadline = time.monotonic() + 300
            # Wait until the array is half-way: some units finished, both tasks still running.
            while not (list(units.glob("u*.json")) and len(tasks := _running_array_tasks()) == 2):
                assert make.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    "the array did not start in 300 s: " + log.read_text()[-2000:]
                )
                time.sleep(0.2)
            killed = tasks[-1]
            # SIGKILL the task's own processes (found by their Slurm array ids), then cancel it:
            # with proctrack/linuxproc this CI Slurm's scancel alone let the worker finish its units.
            _kill_array_task(*killed.split("_"))
            subprocess.run(["scancel", killed], check=True, timeout=30)
            rc = make.wait(timeout=300)
        first = log.read_text()
        assert rc != 0, first[-3000:]
        assert "1 of 2 array task(s) failed" in first and killed.split("_")[0] in first, first[-3000:]
        kept = {p.name: p.stat().st_mtime_ns for p in units.glob("u*.json")}
        proc = _proc.run(_make_data(corpus, out), timeout=300)
    finally:
        _cancel_all()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(kept)} finished earlier" in proc.stdout
    assert {n: (units / n).stat().st_mtime_ns for n in kept} == kept  # finished units not redone
    assert proc.stdout.strip().splitlines()[-1].startswith(f"dataset ready: {out}")
    cfg = load_config(
        PrepConfig,
        "configs/data/ci-tiny.yaml",
        [*OVERRIDES, f"corpus=['{corpus}']", f"out_dir={tmp_path / 'single'}"],
    )
    prepare_dataset(cfg, progress=False)
    assert _without_out_dir(out / "manifest.json") == _without_out_dir(tmp_path / "single" / "manifest.json")
    for shard in sorted((tmp_path / "single" / "shards").glob("*.tar")):
        assert (out / "shards" / shard.name).read_bytes() == shard.read_bytes(), shard.name

"""`make data ... CLUSTER=local TASKS=1` under a real submitit LocalExecutor, many times in a row.

The array task is a submitit job process: it bypasses SIGTERM and checkpoints on SIGUSR2. Its
tokenising pool (2 forked workers here) used to inherit those handlers and leave through
``Pool.terminate()``: workers waiting on the task queue's lock ignored the SIGTERM and the task
joined them for ever, in some builds only (a race), so one build proves little: five in a row do,
each with a deadline.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import pytest

from tests import _proc
from tests.conftest import make_text

BUILDS = 5
DEADLINE_S = 240  # a build takes ~15-40 s here (2 cores shared); a stuck one never ends


def _corpus(path: Path, docs: int = 1400, seed: int = 0) -> Path:
    """~3 MB of jsonl prose: three 1 MiB batches for the two tokenising workers."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": make_text(rng, rng.randint(40, 80))}) + "\n")
    return path


@pytest.mark.slow
def test_a_local_array_build_finishes_every_time_without_signalling_its_workers(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    assert corpus.stat().st_size > 2 << 20
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    shas = set()
    for i in range(BUILDS):
        out = tmp_path / f"d{i}"
        cmd = [
            sys.executable,
            "-m",
            "launch.data",
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--cluster",
            "local",
            "--tasks",
            "1",
            "--no-progress",
            "tokenizer.vocab_size=500",
            "seq_len=64",
            "train_shards=2",
            "val_shards=1",
            "workers=2",
        ]
        t0 = time.monotonic()
        try:
            done = _proc.run(cmd, timeout=DEADLINE_S, env=env)
        except Exception as exc:
            logs = sorted((out / ".work" / "array").glob("**/*.err"))
            tail = logs[-1].read_text()[-2000:] if logs else "(no task log)"
            pytest.fail(
                f"build {i + 1} of {BUILDS} did not finish within {DEADLINE_S} s ({exc}); task log:\n{tail}"
            )
        assert done.returncode == 0, f"build {i + 1}: {done.stderr[-2000:]}"
        assert "submitted 1 array task(s) of 2 worker(s) (local)" in done.stdout
        # the pool was closed and joined: its workers exited on the end-of-work sentinel, none was
        # sent the SIGTERM of Pool.terminate() (which submitit's handler logs in the task's log)
        logs = "".join(p.read_text() for p in (out / ".work" / "array").glob("**/*.err"))
        assert "Caught signal" not in logs and "Bypassing signal SIGTERM" not in logs, logs[-2000:]
        manifest = json.loads((out / "manifest.json").read_text())
        shas.add(json.dumps(manifest["splits"], sort_keys=True))
        print(f"build {i + 1}: {time.monotonic() - t0:.1f} s")
    assert len(shas) == 1  # the same dataset every time

"""The golden trajectory: a 5-step tiny MemDLM run whose numbers refactors must not change.

    python -m tests.golden.trajectory --record tests/golden/memdlm_tiny_5steps.json   # re-record
    python -m tests.golden.trajectory --out /tmp/now.json                              # run once

The run: the tiny preset on the seeded test corpus (tests/conftest.py), one process, fp32, ZeRO-3
really partitioning, MemDLM with its inner loop, one OpenMP thread, every step logged. The record
holds each step's loss, grad norm, learning rate and inner-loop numbers, and the CPU it was
recorded on: fp32 matmuls are bit-reproducible on the same kind of CPU only (other vector units
take other summation orders), so tests/unit/test_golden_trajectory.py demands equality there and
a 1e-5 relative match elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

KEYS = (
    "loss",
    "grad_norm",
    "lr",
    "inner/stage1_loss",
    "inner/stage1_grad_norm",
    "inner/stage2_loss",
    "inner/stage2_grad_norm",
    "memory/gain",
)
STEPS = 5


def cpu_kind() -> dict[str, object]:
    """What decides fp32 summation order here: torch's vector level and the CPU's wide units."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512f": "avx512f" in flags,
        "amx_tile": "amx_tile" in flags,
        "torch": torch.__version__.split("+")[0],
    }


def run_trajectory(work: Path) -> dict[str, object]:
    """Build the seeded tiny dataset under ``work``, train 5 steps, return the record."""
    from data_prep.shard import prepare_dataset
    from pipeline.train import Trainer
    from tests.conftest import prep_config, tiny_trainer_config, write_txt_corpus

    corpus = write_txt_corpus(work, n_docs=40, seed=1)
    prepare_dataset(prep_config(work / "ds", [str(corpus)]), progress=False)
    cfg = tiny_trainer_config(
        work / "ds",
        work / "run",
        f"steps={STEPS}",
        "checkpoint.every=0",
        "parallel.precision=fp32",
        "memory.enabled=true",
        "tracking.enabled=false",
    )
    history = Trainer(cfg).run()
    steps = [{k: rec[k] for k in KEYS if k in rec} | {"step": rec["step"]} for rec in history]
    return {"cpu": cpu_kind(), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--record", type=Path, help="write the golden file")
    where.add_argument("--out", type=Path, help="write this run's record")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        record = run_trajectory(Path(tmp))
    (args.record or args.out).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

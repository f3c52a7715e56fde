"""The torchrun helper on timeout: torchrun, its workers (each in a session of its own) and their
children are all killed, and the output so far comes back with the TimeoutExpired."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import _proc
from tests.distributed._launch import torchrun


@pytest.mark.slow
def test_torchrun_timeout_kills_torchrun_its_workers_and_their_children(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as err:
        torchrun(Path(__file__).with_name("_sleep_worker.py"), 2, str(tmp_path), timeout=30)
    assert "--nproc_per_node=2" in " ".join(err.value.cmd)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["0", "1"], f"workers not started within the timeout: {written}"
    pids = {int(x) for rank in written for x in (tmp_path / rank).read_text().split()}
    assert len(pids) == 5  # torchrun, two workers, two grandchildren
    table = _proc.processes()
    assert [table[pid] for pid in pids if pid in table] == []
    assert [p for p in table.values() if p.pgid in pids or p.sid in pids] == []  # nor their groups

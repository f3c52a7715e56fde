"""The launchers under signals and failures, with real processes: `make pretrain CLUSTER=local`
stopped by SIGTERM (kill, timeout), SIGINT (Ctrl-C), SIGHUP (a closed terminal) or SIGKILL leaves
no process of its job behind and saves a checkpoint first where the signal allows; `launch.local`
listens on loopback only, forwards signals and stops every process when one fails; the Slurm and
TASKS errors are one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import _proc
from tests.conftest import require_service, tiny_run_overrides
from tests.integration.test_slurm import _slurm_up

ROOT = Path(__file__).resolve().parents[2]
MARK = "MEMDLM_FAULT_TEST"  # an env tag every process of one launch inherits (found via /proc)


def _env(mark: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", MARK: mark, **extra}
    env.pop("MASTER_ADDR", None)  # the world1 fixture's, if it ran in this session
    env.pop("MASTER_PORT", None)
    return env


def _tiny_cluster(tmp_path: Path, dataset: Path, **fields: object) -> Path:
    """A cluster config (local, 2 tasks, unless ``fields`` say otherwise) on the session's tiny
    dataset (its build config, so it is only checked)."""
    data = tmp_path / "data.yaml"
    data.write_text(
        json.dumps(
            {
                "out_dir": str(dataset),
                "corpus": [str(dataset.parent / "corpus")],
                "seq_len": 32,
                "val_fraction": 0.1,
                "train_shards": 8,
                "val_shards": 2,
                "seed": 7,
                "workers": 2,
                "tokenizer": {"vocab_size": 400},
            }
        )
    )
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        json.dumps(
            {
                "executor": "local",
                "data": str(data),
                "train": "configs/train/ci-tiny.yaml",
                "tasks_per_node": 2,
                "time_min": 10,
                "stop_grace_s": 90,
                **fields,
            }
        )
    )
    return cluster


def _launch_cmd(tmp_path: Path, dataset: Path, *extra: str, cluster: Path | None = None) -> list[str]:
    overrides = tiny_run_overrides(dataset, tmp_path / "mlruns", f"run_dir={tmp_path / 'run'}")
    cluster = cluster or _tiny_cluster(tmp_path, dataset)
    flags = [a for a in extra if a.startswith("--")]  # before the overrides: argparse's positionals end there
    rest = [a for a in extra if not a.startswith("--")]
    return [sys.executable, "-m", "launch.pretrain", "--cluster", str(cluster), *flags, *overrides, *rest]


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the job has logged its first step (the tasks are in the training loop)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, f"the launcher ended early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no step logged in {timeout} s"
        time.sleep(0.2)


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(
        json.loads(p.read_text())["step"] for p in (run_dir / "checkpoints").glob("step-*/train_state.json")
    )


def _job_processes(mark: str) -> list[_proc.Proc]:
    return _proc.tagged(MARK, mark)


# (signal, to the whole process group?): kill <launcher>; timeout(1), which signals the group;
# Ctrl-C and a closed terminal, which reach every process of the foreground group.
STOPS = [
    pytest.param(signal.SIGTERM, False, id="SIGTERM-launcher"),
    pytest.param(signal.SIGTERM, True, id="SIGTERM-group"),
    pytest.param(signal.SIGINT, True, id="SIGINT-group"),
    pytest.param(signal.SIGHUP, True, id="SIGHUP-group"),
]


@pytest.mark.slow
@pytest.mark.parametrize("sig, group", STOPS)
def test_a_stopped_local_launch_saves_a_checkpoint_and_leaves_no_process(sig, group, tiny_dataset, tmp_path):
    mark = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    cmd = _launch_cmd(tmp_path, tiny_dataset, "steps=100000", "checkpoint.every=0", "eval.every=0")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with (
        open(out, "w") as fo,
        open(err, "w") as fe,
        _proc.started(cmd, env=_env(mark), cwd=ROOT, stdout=fo, stderr=fe) as launcher,
    ):
        _wait_for_step(run_dir, launcher)
        tasks = [p for p in _job_processes(mark) if p.pid != launcher.pid]
        assert len(tasks) >= 3, tasks  # the submitit controller and its two tasks
        (os.killpg if group else os.kill)(launcher.pid, sig)
        rc = launcher.wait(timeout=200)
        left = _job_processes(mark)  # right after the launcher ended
    text = out.read_text() + err.read_text()
    assert left == [], f"left running after the launcher ended: {left}\n{text[-3000:]}"
    assert rc == 128 + sig, text[-3000:]
    steps = _checkpoints(run_dir)
    assert len(steps) == 1 and steps[0] >= 1, text[-3000:]  # checkpoint.every=0: the stop's own save
    assert f"checkpoint saved at step {steps[0]}" in text, text[-3000:]


@pytest.mark.slow
def test_a_killed_launcher_s_local_job_saves_a_checkpoint_and_ends(tiny_dataset, tmp_path):
    mark = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    cmd = _launch_cmd(tmp_path, tiny_dataset, "steps=100000", "checkpoint.every=0", "eval.every=0")
    with _proc.started(cmd, env=_env(mark), cwd=ROOT, stdout=subprocess.DEVNULL) as launcher:
        _wait_for_step(run_dir, launcher)
        launcher.kill()  # SIGKILL: nothing runs in the launcher any more
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 120
        while (left := _job_processes(mark)) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert left == []
    steps = _checkpoints(run_dir)
    assert len(steps) == 1 and steps[0] >= 1


@pytest.mark.slow
def test_an_interrupted_wait_for_a_slurm_job_says_it_runs_on_and_how_to_cancel_it(tiny_dataset, tmp_path):
    require_service(_slurm_up(), "Slurm")
    cluster = _tiny_cluster(tmp_path, tiny_dataset, executor="slurm", partition="debug", cpus_per_task=1)
    cmd = _launch_cmd(tmp_path, tiny_dataset, "--wait", "steps=100000", "eval.every=0", cluster=cluster)
    out = tmp_path / "out.txt"
    job_id = None
    try:
        with (
            open(out, "w") as fo,
            _proc.started(cmd, env=_env(uuid.uuid4().hex), cwd=ROOT, stdout=fo) as launcher,
        ):
            _wait_for_step(tmp_path / "run", launcher)
            job_id = re.search(r"submitted job (\d+)", out.read_text()).group(1)
            launcher.send_signal(signal.SIGTERM)
            rc = launcher.wait(timeout=60)
            # before leaving the block: its clean-up ends every process carrying the test's tag,
            # which the job's tasks inherit through sbatch's environment
            queued = subprocess.run(
                ["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30
            )
        text = out.read_text()
        assert rc == 128 + signal.SIGTERM
        # said when it was submitted, and again when the wait was interrupted
        assert text.count(f"cancel it with `scancel {job_id}`") == 2, text[-3000:]
        assert "it keeps running when this command ends" in text and "keeps running;" in text
        assert job_id in queued.stdout  # it does keep running
    finally:
        if job_id is not None:
            subprocess.run(["scancel", job_id], check=False, timeout=30)


# ------------------------------------------------------------------ launch.local


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of ``pids`` holds (/proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                    continue
                addr, port = f[1].split(":")
                raw = bytes.fromhex(addr)
                if family == socket.AF_INET:
                    ip = socket.inet_ntop(family, struct.pack("<I", int(addr, 16)))
                else:
                    ip = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                out.append((ip, int(port, 16)))
    return out


def _local_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.local", *args]


def _worker_files(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.json"))) < n:
        assert proc.poll() is None, f"launch.local ended early with {proc.returncode}"
        assert time.monotonic() < deadline, f"workers not started in {timeout} s"
        time.sleep(0.05)
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(n)]


@pytest.mark.slow
def test_local_launcher_trains_two_ranks_listening_on_loopback_only(tiny_dataset, tmp_path):
    mark = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(dataset=tiny_dataset, tracking_root=tmp_path / "mlruns")
    cmd = _local_cmd("--nproc", "2", "--config", "configs/train/ci-tiny.yaml", *overrides)
    cmd += [f"run_dir={run_dir}", "steps=6", "checkpoint.every=0", "eval.every=0"]
    seen: set[tuple[str, int]] = set()
    with _proc.started(cmd, env=_env(mark), cwd=ROOT, stdout=subprocess.DEVNULL) as launcher:
        deadline = time.monotonic() + 300
        while launcher.poll() is None and time.monotonic() < deadline:
            seen.update(_listening([p.pid for p in _job_processes(mark)]))
            time.sleep(0.1)
        rc = launcher.wait(timeout=1)
    assert rc == 0
    assert seen, "no listening socket seen while the run was on"  # rank 0's store at least
    assert all(ip == "127.0.0.1" for ip, _ in seen), seen
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "train_state.json").read_text())
    assert state["layout"]["world"] == 2 and state["layout"]["dp"] == 2  # one world of two ranks


def test_local_launcher_gives_each_rank_its_loopback_world_and_forwards_ctrl_c_once(tmp_path):
    mark = uuid.uuid4().hex
    cmd = _local_cmd("--nproc", "2", "--module", "tests.faults._local_worker", str(tmp_path), "wait")
    with _proc.started(cmd, env=_env(mark), cwd=ROOT) as launcher:
        workers = _worker_files(tmp_path, 2, launcher)
        os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        rc = launcher.wait(timeout=60)
        left = _job_processes(mark)
    assert rc == 128 + signal.SIGINT and left == []
    ports = {w["MASTER_PORT"] for w in workers}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for rank, w in enumerate(workers):
        assert (w["MASTER_ADDR"], w["RANK"], w["LOCAL_RANK"]) == ("127.0.0.1", str(rank), str(rank))
        assert (w["WORLD_SIZE"], w["LOCAL_WORLD_SIZE"]) == ("2", "2")
        assert w["sid"] == w["pid"]  # a session of its own: the terminal's signal is not theirs
        # only the launcher's SIGTERM: pipeline.train saves a checkpoint on it (SIGINT would not)
        assert (tmp_path / f"{rank}.signals").read_text() == "SIGTERM\n"


def test_local_launcher_stops_every_rank_when_one_fails_and_returns_its_status(tmp_path):
    mark = uuid.uuid4().hex
    cmd = _local_cmd("--nproc", "3", "--grace-s", "1", "--module", "tests.faults._local_worker")
    cmd += [str(tmp_path), "fail"]
    proc = _proc.run(cmd, env=_env(mark), cwd=ROOT, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert "error: rank 1 exited with status 7: stopping the other processes" in proc.stderr
    assert _job_processes(mark) == []
    for rank in (0, 2):  # they ignore SIGTERM: killed after the grace period
        assert (tmp_path / f"{rank}.signals").read_text() == "SIGTERM\n"


def test_a_killed_local_launcher_s_ranks_get_sigterm_and_end(tmp_path):
    mark = uuid.uuid4().hex
    cmd = _local_cmd("--nproc", "2", "--module", "tests.faults._local_worker", str(tmp_path), "wait")
    with _proc.started(cmd, env=_env(mark), cwd=ROOT) as launcher:
        _worker_files(tmp_path, 2, launcher)
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (left := _job_processes(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert left == []
    assert [(tmp_path / f"{r}.signals").read_text() for r in (0, 1)] == ["SIGTERM\n"] * 2


# ------------------------------------------------------------------ one-line errors


@pytest.mark.slow
def test_slurm_cluster_without_sbatch_is_one_error_line_and_its_dry_run_still_works(tmp_path):
    env = _env(uuid.uuid4().hex, PATH=str(tmp_path))  # no sbatch (nor anything else) on PATH
    proc = _proc.run(
        [sys.executable, "-m", "launch.pretrain", "--cluster", "slurm-example"],
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: Slurm's `sbatch` is not available here (not on PATH): submit from the cluster's login node "
        "(DRY_RUN=1 prints the sbatch script without Slurm)"
    ]
    dry = [sys.executable, "-m", "launch.pretrain", "--cluster", "slurm-example", "--dry-run"]
    proc = _proc.run(dry, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "#SBATCH --partition=gpu" in proc.stdout, proc.stderr


def test_dry_run_never_prints_credentials_of_the_tracking_uri():
    cmd = ["make", "--no-print-directory", "pretrain", "CLUSTER=slurm-example", "DRY_RUN=1"]
    cmd.append("ARGS=tracking.uri=http://u:s3cr3t@127.0.0.1:5999")
    proc = _proc.run(cmd, env=_env(uuid.uuid4().hex), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t" not in proc.stdout + proc.stderr
    assert '"uri": "http://127.0.0.1:5999"' in proc.stdout  # the rest of the URI is shown


@pytest.mark.parametrize("tasks", ["0", "-2"])
def test_data_tasks_below_one_is_one_error_line_naming_tasks(tasks, tmp_path):
    cmd = [sys.executable, "-m", "launch.data", "--corpus", str(tmp_path), "--out", str(tmp_path / "ds")]
    proc = _proc.run([*cmd, "--tasks", tasks], env=_env(uuid.uuid4().hex), cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: TASKS (--tasks): got {tasks}, expected >= 1 array task"]
    assert not (tmp_path / "ds").exists()

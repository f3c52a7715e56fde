"""Faults of the trainer process, provoked for real: a second trainer on a run directory, a killed
first one, a killed torchrun agent, a stop signal, a full disk, bad sizes on the command line.

Every trainer here is a real ``python -m pipeline.train`` (or torchrun of it) on the tiny dataset."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.run_lock import LOCK_NAME
from pipeline.stop import ORPHAN_GRACE_ENV, STOPPED_EXIT
from pipeline.train_config import load_train_config
from tests import _proc
from tests.conftest import free_port, tiny_job_args

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
TRAIN = [sys.executable, "-m", "pipeline.train"]
FOREVER = ("steps=100000", "checkpoint.every=0", "eval.every=0")  # trains until stopped


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _wait_training(run: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until the trainer has logged its first step (it holds its lock and is in the loop)."""
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step logged in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _gone(pids: list[int]) -> bool:
    table = _proc.processes()
    return not any(pid in table for pid in pids)


# ------------------------------------------------------------ config sizes (item: bad values)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=0"], "key 'parallel.tp': got 0, expected >= 1"),
        (["parallel.tp=-2"], "key 'parallel.tp': got -2, expected >= 1"),
        (["grad_accum=0"], "key 'grad_accum': got 0, expected >= 1"),
        (["steps=-1"], "key 'steps': got -1, expected >= 1"),
        (["log_every=0"], "key 'log_every': got 0, expected >= 1"),
        (["data.batch_size=0"], "key 'data.batch_size': got 0, expected >= 1"),
        (["checkpoint.keep=0"], "key 'checkpoint.keep': got 0, expected >= 1"),
        (["checkpoint.every=-5"], "key 'checkpoint.every': got -5, expected >= 0"),
        (["eval.batches=0"], "key 'eval.batches': got 0, expected >= 1"),
        (["parallel.zero_stage=4"], "key 'parallel.zero_stage': got 4, expected one of 0, 1, 2, 3"),
        (
            ["lora.enabled=true", "lora.rank=1000000"],
            "key 'lora.rank': got 1000000, expected <= 64 (the smallest side of the adapted weights: qkv is "
            "192 x 64)",
        ),
    ],
)
def test_a_bad_size_is_an_error_naming_the_key_the_value_and_what_was_expected(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(None, ["model_preset=tiny", *overrides])
    assert str(err.value) == f"None + overrides: {message}"  # load_train_config(None, ...) names no file


def test_a_lora_rank_at_the_smallest_side_is_accepted():
    cfg = load_train_config(None, ["model_preset=tiny", "lora.enabled=true", "lora.rank=64"])
    assert cfg.lora.rank == 64


@pytest.mark.slow  # ~20 s: the imports of a trainer process
def test_tp_zero_on_the_command_line_exits_2_with_one_error_line():
    cmd = [*TRAIN, "--config", "configs/train/local.yaml", "parallel.tp=0"]
    done = _proc.run(cmd, env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    assert _error_lines(done.stderr) == [
        "error: configs/train/local.yaml + overrides: key 'parallel.tp': got 0, expected >= 1"
    ]
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------ the run directory's lock
@pytest.mark.slow
def test_a_second_trainer_on_a_run_dir_is_refused_and_a_killed_ones_lock_is_taken_over(
    tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    args = tiny_job_args(tiny_dataset, tmp_path, *FOREVER)
    log = tmp_path / "first.log"
    with (
        log.open("w") as out,
        _proc.started([*TRAIN, *args], env=ENV, cwd=ROOT, stdout=out, stderr=out) as first,
    ):
        _wait_training(run, first, log)
        t0 = time.monotonic()
        second = _proc.run([*TRAIN, *args], env=ENV, cwd=ROOT, timeout=120)
        took = time.monotonic() - t0
        assert second.returncode == 2, second.stderr
        (line,) = _error_lines(second.stderr)
        assert line.startswith(
            f"error: {run / LOCK_NAME}: the run directory {run} is in use by another trainer "
        )
        assert f"(host {socket.gethostname()}, PID {first.pid}, since " in line
        assert "Traceback" not in second.stderr
        assert "building the engine" not in second.stdout and "precision:" not in second.stdout
        assert took < 60
        first.kill()  # kill -9: its lock file stays behind
        first.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid
    third = _proc.run(
        [*TRAIN, *tiny_job_args(tiny_dataset, tmp_path, "steps=1", "eval.every=0")],
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"left by a run that is gone (host {socket.gethostname()}, PID {first.pid}, " in third.stderr
    assert not (run / LOCK_NAME).exists()  # released at the end


# ------------------------------------------------------------ stop signals of a direct start
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_a_stop_signal_saves_a_checkpoint_and_exits_with_stopped_exit(tiny_dataset, tmp_path, sig):
    run = tmp_path / "run"
    args = tiny_job_args(tiny_dataset, tmp_path, *FOREVER)
    out_log, err_log = tmp_path / "out.log", tmp_path / "err.log"
    with (
        out_log.open("w") as out,
        err_log.open("w") as err,
        _proc.started([*TRAIN, *args], env=ENV, cwd=ROOT, stdout=out, stderr=err) as proc,
    ):
        _wait_training(run, proc, err_log)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    stdout = out_log.read_text()
    assert rc == STOPPED_EXIT, err_log.read_text()[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert step >= 1
    assert (
        f"stop requested: checkpoint saved at step {step} in {run / 'checkpoints' / latest} ({sig.name}). "
        f"To resume, run the same command again (python -m pipeline.train {shlex.join(args)}): it continues "
        "from there"
    ) in stdout
    assert not (run / LOCK_NAME).exists()


# ------------------------------------------------------------ torchrun's agent killed
def _torchrun(*args: str) -> list[str]:
    port = f"--master_port={free_port()}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        port,
        "-m",
        "pipeline.train",
        *args,
    ]


@pytest.mark.slow
def test_a_second_torchrun_is_refused_on_every_rank_and_workers_stop_when_their_agent_is_killed(
    tiny_dataset, tmp_path
):
    run, grace = tmp_path / "run", 90.0
    args = tiny_job_args(tiny_dataset, tmp_path, *FOREVER)
    log = tmp_path / "torchrun.log"
    env = {**ENV, ORPHAN_GRACE_ENV: str(grace)}
    with (
        log.open("w") as out,
        _proc.started(_torchrun(*args), env=env, cwd=ROOT, stdout=out, stderr=out) as agent,
    ):
        _wait_training(run, agent, log)
        second = _proc.run(_torchrun(*args), env=env, cwd=ROOT, timeout=300)
        refusals = [line for line in _error_lines(second.stderr) if "is in use by another trainer" in line]
        assert second.returncode != 0 and len(refusals) == 2, second.stderr[-3000:]  # rank 0 and rank 1
        assert "building the engine" not in second.stdout
        workers = [
            p.pid for p in _proc.processes().values() if p.ppid == agent.pid and "pipeline.train" in p.cmdline
        ]
        assert len(workers) == 2, _proc.processes()
        agent.kill()
        agent.wait()
        t0 = time.monotonic()
        while not _gone(workers) and time.monotonic() - t0 < grace + 30:
            time.sleep(0.5)
        took = time.monotonic() - t0
        assert _gone(workers), (
            f"workers still running {took:.0f} s after the agent died:\n{log.read_text()[-3000:]}"
        )
    print(f"both workers gone {took:.1f} s after their agent was killed (grace {grace:g} s)")
    assert took < grace
    text = log.read_text()
    assert "the torchrun agent" in text and "died" in text
    latest = (run / "checkpoints" / "latest").read_text().strip()  # they stopped cleanly, with a checkpoint
    assert f"stop requested: checkpoint saved at step {int(latest.removeprefix('step-'))}" in text
    assert not (run / LOCK_NAME).exists()


# A process whose parent dies while it never reaches a step boundary (a hang): the watcher ends it.
WATCHED_CHILD = """
import sys, time
from pathlib import Path
from pipeline.stop import StopSignal, watch_parent
with watch_parent(StopSignal(), grace_s=1.0, interval_s=0.1):
    Path(sys.argv[1]).write_text("ready")
    time.sleep(600)
"""
PARENT = """
import subprocess, sys, time
err = open(sys.argv[2], "w")
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[3]], stderr=err)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_an_orphan_that_does_not_stop_exits_once_the_grace_period_is_over(tmp_path):
    ready, err = tmp_path / "ready", tmp_path / "child.err"
    cmd = [sys.executable, "-c", PARENT, WATCHED_CHILD, str(err), str(ready)]
    with _proc.started(cmd, env=ENV, stdout=subprocess.PIPE) as parent:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and not _gone([child]), err.read_text()
            time.sleep(0.1)
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        while not _gone([child]) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        assert _gone([child]), err.read_text()
    lines = err.read_text().splitlines()
    assert lines[0].startswith(f"warning: the parent process (PID {parent.pid}, the torchrun agent) died")
    assert lines[1] == "error: no clean stop within 1 s of the torchrun agent's death: exiting now"


# ------------------------------------------------------------ a full disk while saving
SAVE_INTO_SMALL_TMPFS = """
mount -t tmpfs -o size=4m tmpfs "$1" || exit 90
ckpt=$1 out=$2
shift 2
"$@"
rc=$?
ls -A "$ckpt" > "$out/listing"
cp -a "$ckpt/." "$out/checkpoints/"
exit $rc
"""


def _unshare() -> list[str]:
    """``unshare`` into a mount namespace of our own (the tmpfs dies with it), or skip."""
    cmd = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]
    try:
        probe = subprocess.run(
            [*cmd, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {probe.stderr.decode()[-300:]}")
    return cmd


@pytest.mark.slow
def test_a_full_disk_mid_save_is_one_error_line_and_leaves_the_previous_checkpoint(tiny_dataset, tmp_path):
    from pipeline.engine.checkpoint import verify_checkpoint

    unshare = _unshare()
    run, out = tmp_path / "run", tmp_path / "out"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    (out / "checkpoints").mkdir(parents=True)
    # 4 MiB hold the step-2 checkpoint (~2.9 MB), not the step-4 one as well
    args = tiny_job_args(tiny_dataset, tmp_path, "steps=4", "checkpoint.every=2", "eval.every=0")
    cmd = [*unshare, "sh", "-c", SAVE_INTO_SMALL_TMPFS, "sh", str(ckpt), str(out), *TRAIN, *args]
    done = _proc.run(cmd, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = _error_lines(done.stderr)
    assert line.startswith(f"error: {ckpt}: no space left on device (rank 0: ")
    assert "while saving step-000004; the previous checkpoint step-000002 is intact" in line
    assert "Traceback" not in done.stderr
    assert (out / "listing").read_text().split() == ["latest", "step-000002"]  # no .tmp-step-000004
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    verify_checkpoint(out / "checkpoints" / "step-000002")  # sizes and sha256 as files.json lists them

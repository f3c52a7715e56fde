"""Real Slurm (the one-node cluster .ci/start-slurm.sh starts): a 2-task job through sbatch to the
end, and a job interrupted as if it timed out, requeued by submitit, finishing from its checkpoint.

Outside CI these skip (with the reason) when no Slurm answers; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launch.clusters import ClusterConfig
from launch.submit import preempt_signal, submit
from tests import _proc
from tests.conftest import require_service, tiny_job_args


def _slurm_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm client installed (run .ci/start-slurm.sh as root)"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    if out.returncode or not any(s in out.stdout for s in ("idle", "mixed", "alloc")):
        return f"no idle Slurm node answers (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    require_service(_slurm_up(), "Slurm")


@pytest.fixture
def jobs():
    """The Slurm jobs a test submits; whatever it leaves queued or running (a failed assertion, a
    timeout) is cancelled when it ends, so no job outlives its test."""
    submitted: list = []
    yield submitted
    for job in submitted:
        job.cancel(check=False)  # scancel: a no-op for a finished job


def _job(jobs: list, tiny_dataset, tmp_path: Path, steps: int, every: int):
    args = tiny_job_args(
        tiny_dataset,
        tmp_path,
        f"steps={steps}",
        "eval.every=0",
        f"checkpoint.every={every}",
        "checkpoint.keep=2",
        "log_every=5",
    )
    cluster = ClusterConfig(
        executor="slurm", partition="debug", tasks_per_node=2, cpus_per_task=1, time_min=10
    )
    run_dir = tmp_path / "run"
    jobs.append(submit(cluster, args, run_dir, wait=False))
    return jobs[-1], run_dir


def _wait(job, seconds: float = 300) -> list:
    deadline = time.time() + seconds
    while not job.done():
        if time.time() > deadline:
            pytest.fail(f"Slurm job {job.job_id} did not finish in {seconds} s")
        time.sleep(1)
    return job.results()


def test_make_pretrain_on_the_ci_slurm_cluster_runs_to_the_end(slurm, tmp_path):
    run_dir, mlruns = tmp_path / "run", tmp_path / "mlruns"
    cmd = ["make", "pretrain", "CLUSTER=ci-slurm", "WAIT=1", f"ARGS=run_dir={run_dir} tracking.root={mlruns}"]
    try:
        proc = _proc.run(cmd, timeout=600)
    except subprocess.TimeoutExpired as exc:  # make was ended, but its job lives on in Slurm
        for job_id in re.findall(r"submitted job (\d+)", exc.stdout or ""):
            subprocess.run(["scancel", job_id], check=False, timeout=30)
        raise
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run directory: {run_dir}" in proc.stdout
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "train_state.json").read_text())
    assert state["layout"] == {"world": 2, "tp": 1, "dp": 2, "grad_accum": 1, "micro_batch": 4, "ep": 1}
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_two_task_job_runs_through_sbatch_and_leaves_checkpoints_and_metrics(
    slurm, jobs, tiny_dataset, tmp_path
):
    job, run_dir = _job(jobs, tiny_dataset, tmp_path, steps=6, every=3)
    assert _wait(job) == [0, 0]
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "train_state.json").read_text())
    assert state["layout"]["world"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    history = client.get_metric_history(state["mlflow_run_id"], "loss")
    assert [m.step for m in history] == [5, 6]


def test_a_timed_out_job_saves_on_the_signal_is_requeued_and_finishes(slurm, jobs, tiny_dataset, tmp_path):
    # No periodic checkpoints: whatever the requeued job resumes from was saved on the signal.
    job, run_dir = _job(jobs, tiny_dataset, tmp_path, steps=60, every=0)  # signalled at step ~5
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.time() < deadline and not job.done(), "training did not start before the job ended"
        time.sleep(0.5)
    # What Slurm sends every task before the time limit (submitit's own Job._interrupt is private).
    subprocess.run(["scancel", "--signal", preempt_signal().name.removeprefix("SIG"), job.job_id], check=True)
    assert _wait(job, 400) == [0, 0]
    out = Path(job.paths.stdout).read_text()
    saved = re.search(r"stop requested: checkpoint saved at step (\d+)", out)
    assert saved, out[-2000:]
    step = int(saved.group(1))
    assert 0 < step < 60
    assert f"at step {step}" in out.split("resumed from", 1)[1].splitlines()[0]  # resumed right there
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == 60 and steps == sorted(set(steps))  # no step trained twice
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000060"

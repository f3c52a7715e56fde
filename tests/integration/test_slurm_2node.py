"""Real two-node Slurm (``NODES=2 .ci/start-slurm.sh``: hosts memdlm-n1 and memdlm-n2, each in its
own network and UTS namespace on a private bridge): the hosts' names, addresses and interfaces;
``make pretrain CLUSTER=ci-slurm-2node`` training DP=2 across the two hosts to the end, with the
losses of the same run as two local processes; and a time-limit signal that saves on both nodes,
requeues, and resumes at exactly that step.

Outside CI these skip (with the reason) when the two-node cluster does not answer; in CI (CI=true)
they fail instead. Client commands go through the wrappers the script writes (they run sbatch,
squeue, ... inside the controller's namespace), put first on PATH here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launch.clusters import ClusterConfig
from launch.submit import preempt_signal, submit
from tests import _proc
from tests.conftest import require_service, tiny_job_args

CLIENTS = Path("/run/memdlm-slurm-2node/bin")  # written by NODES=2 .ci/start-slurm.sh
HOSTS = ("memdlm-n1", "memdlm-n2")
LOSS_RTOL = 1e-5  # fp32; the same two ranks, data and seeds (measured here: identical)


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{CLIENTS}:{os.environ['PATH']}"}


def _two_nodes_up() -> str | None:
    if not (CLIENTS / "sinfo").is_file():
        return f"no two-node Slurm ({CLIENTS} missing; run NODES=2 .ci/start-slurm.sh as root)"
    out = _proc.run([str(CLIENTS / "sinfo"), "-h", "-N", "-o", "%N %T"], timeout=30)
    states = dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())
    if out.returncode or any(states.get(h) not in ("idle", "mixed", "allocated") for h in HOSTS):
        return f"the two-node Slurm does not answer with {HOSTS} up (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm2():
    require_service(_two_nodes_up(), "the two-node Slurm")


@pytest.fixture
def clients(slurm2, monkeypatch):
    """The cluster's client wrappers first on PATH, for submitit's sbatch/sacct/scancel calls."""
    monkeypatch.setenv("PATH", _env()["PATH"])


@pytest.fixture
def jobs():
    """Jobs a test submits; whatever is left queued or running when it ends is cancelled."""
    submitted: list = []
    yield submitted
    for job in submitted:
        job.cancel(check=False)


def _wait(job, seconds: float = 300) -> list:
    deadline = time.time() + seconds
    while not job.done():
        if time.time() > deadline:
            pytest.fail(f"Slurm job {job.job_id} did not finish in {seconds} s")
        time.sleep(1)
    return job.results()


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _task_logs(run_dir: Path, job_id: str) -> list[str]:
    return [(run_dir / "submitit" / f"{job_id}_{rank}_log.out").read_text() for rank in (0, 1)]


# One task per host: a gloo world of 2 set up by init_distributed with MASTER_ADDR=memdlm-n1, one
# all-reduce, then what the task saw: host name, the gloo interface chosen, its address, the sum,
# and the local address of every socket this process listens on (from /proc, as in
# tests/unit/test_network_exposure.py).
PROBE = r"""
import json, os, socket, struct
os.environ.update(MASTER_ADDR="memdlm-n1", MASTER_PORT=str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000),
                  RANK=os.environ["SLURM_PROCID"], WORLD_SIZE="2")
import torch, torch.distributed as dist
from pipeline.parallel.dims import init_distributed
from pipeline.parallel.rendezvous import ipv4_of as _ipv4_of
init_distributed(tp=1)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
mine = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the listing's own fd, closed meanwhile
        continue
    if target.startswith("socket:["):
        mine.add(target[8:-1])
listening = sorted({socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(f[1].split(":")[0], 16)))
                    for f in (line.split() for line in open("/proc/self/net/tcp").read().splitlines()[1:])
                    if f[3] == "0A" and f[9] in mine})
iface = os.environ["GLOO_SOCKET_IFNAME"]
print(json.dumps([socket.gethostname(), iface, _ipv4_of(iface), t.item(), listening]))
dist.barrier()
"""


def test_two_hosts_with_own_names_and_addresses_form_a_gloo_world_on_the_right_interface(slurm2):
    out = _proc.run(
        ["srun", "-N2", "-n2", "--ntasks-per-node=1", "-t", "3", sys.executable, "-c", PROBE],
        env={**_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = sorted(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    addrs = [socket.gethostbyname(h) for h in HOSTS]  # /etc/hosts (the script's block): no DNS query
    assert len(set(addrs)) == 2
    # Each host its own name and address; gloo's interface derived there at run time (eth0, the one
    # memdlm-n1 is reached by), the all-reduce right, and nothing listening beyond the host's address.
    assert [s[:4] for s in seen] == [[h, "eth0", a, 3.0] for h, a in zip(HOSTS, addrs, strict=True)]
    assert seen[0][4] and seen[0][4] == [addrs[0]]  # rank 0: the store and gloo, on 10.77.0.11 only
    assert set(seen[1][4]) <= {addrs[1]}


def test_make_pretrain_trains_dp2_across_two_hosts_like_two_local_processes(slurm2, tmp_path):
    run_dir, mlruns = tmp_path / "run", tmp_path / "mlruns"
    cmd = [
        "make",
        "pretrain",
        "CLUSTER=ci-slurm-2node",
        "WAIT=1",
        f"ARGS=run_dir={run_dir} tracking.root={mlruns}",
    ]
    try:
        proc = _proc.run(cmd, env=_env(), timeout=600)
    except subprocess.TimeoutExpired as exc:  # make was ended, but its job lives on in Slurm
        for job_id in re.findall(r"submitted job (\d+)", exc.stdout or ""):
            subprocess.run([str(CLIENTS / "scancel"), job_id], check=False, timeout=30)
        raise
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    # One task on each host, in one process group of 2 (DP=2).
    logs = _task_logs(run_dir, job_id)
    assert "task 0/2 on memdlm-n1" in logs[0] and "task 1/2 on memdlm-n2" in logs[1]
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "train_state.json").read_text())
    assert state["layout"] == {"world": 2, "tp": 1, "dp": 2, "grad_accum": 1, "micro_batch": 4, "ep": 1}
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert (run_dir / "export" / "model.safetensors").is_file()

    # The same run as 2 local processes (submitit's LocalExecutor, loopback): the same losses.
    local_dir = tmp_path / "local"
    local = submit(
        ClusterConfig(executor="local", tasks_per_node=2, time_min=10),
        [
            "--config",
            "configs/train/ci-tiny.yaml",
            f"run_dir={local_dir}",
            f"tracking.root={tmp_path / 'ml-local'}",
        ],
        local_dir,
        timeout_s=600,
    )
    assert local.results() == [0, 0]
    two_hosts, two_procs = _losses(run_dir), _losses(local_dir)
    assert sorted(two_hosts) == sorted(two_procs) == [1, 2, 3, 4]
    for step, loss in two_procs.items():
        assert two_hosts[step] == pytest.approx(loss, rel=LOSS_RTOL, abs=0), (step, two_hosts, two_procs)


def test_a_time_limit_signal_saves_on_both_nodes_requeues_and_resumes_there(
    clients, jobs, tiny_dataset, tmp_path
):
    args = tiny_job_args(
        tiny_dataset, tmp_path, "steps=30", "eval.every=0", "checkpoint.every=0", "log_every=5"
    )
    cluster = ClusterConfig(
        executor="slurm", partition="debug", nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=10
    )
    run_dir = tmp_path / "run"
    jobs.append(job := submit(cluster, args, run_dir, wait=False))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.time() < deadline and not job.done(), "training did not start before the job ended"
        time.sleep(0.5)
    # What Slurm sends every task of every node before the time limit.
    subprocess.run(
        ["scancel", "--signal", preempt_signal().name.removeprefix("SIG"), job.job_id],
        check=True,
        env=_env(),
        timeout=30,
    )
    assert _wait(job, 400) == [0, 0]
    rank0, rank1 = _task_logs(run_dir, job.job_id)
    # Both allocations ran one task on each host (rank 1 loads the same checkpoint: the load is collective).
    assert rank0.count("task 0/2 on memdlm-n1") == 2 and rank1.count("task 1/2 on memdlm-n2") == 2
    saved = re.search(r"stop requested: checkpoint saved at step (\d+)", rank0)
    assert saved, rank0[-2000:]
    step = int(saved.group(1))
    assert 0 < step < 30
    assert f"at step {step}" in rank0.split("resumed from", 1)[1].splitlines()[0]  # resumed right there
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == 30 and steps == sorted(set(steps))  # no step trained twice
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000030"


def _node(action: str, host: str) -> None:
    """``.ci/start-slurm.sh lose-node|node-back <host>``: the host dies (every process in its
    namespace SIGKILLed: slurmd, the job step, the task) or comes back (its slurmd again)."""
    out = _proc.run(
        ["bash", ".ci/start-slurm.sh", action, host], env={**os.environ, "NODES": "2"}, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _in_queue(job) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-j", job.job_id], env=_env(), timeout=30, capture_output=True, text=True
    )
    return out.returncode == 0 and bool(out.stdout.strip())


def _wait_until_idle(hosts: tuple[str, ...], seconds: float = 120) -> None:
    """Both hosts idle: a node range starts a job on as many nodes as are free *now*, and an earlier
    test's job may still be ending (its tasks are killed KillWait after the cancel)."""
    deadline = time.time() + seconds
    while True:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=_env(), timeout=30, capture_output=True, text=True
        )
        states = dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())
        if all(states.get(h) == "idle" for h in hosts):
            return
        assert time.time() < deadline, f"the nodes are not idle after {seconds} s: {states}"
        time.sleep(1)


def _log_tail(run_dir: Path, job_id: str) -> str:
    log = run_dir / "submitit" / f"{job_id}_0_log.out"
    return log.read_text()[-3000:] if log.is_file() else "(no log)"


def test_losing_a_node_requeues_on_the_one_left_and_the_run_finishes_every_step_once(
    clients, jobs, tiny_dataset, tmp_path
):
    """--nodes=1-2: started on both hosts; after the step-5 checkpoint memdlm-n2 dies (slurmd, step
    and task killed); Slurm marks it DOWN (SlurmdTimeout 10 s), requeues the job, which comes back on
    memdlm-n1 alone and resumes DP 2 -> 1 (grad_accum 1 -> 2) through the universal checkpoint."""
    steps = 16
    args = tiny_job_args(
        tiny_dataset, tmp_path, f"steps={steps}", "eval.every=0", "checkpoint.every=5", "log_every=1"
    )
    cluster = ClusterConfig(
        executor="slurm",
        partition="debug",
        nodes=2,
        min_nodes=1,
        tasks_per_node=1,
        cpus_per_task=1,
        time_min=10,
    )
    run_dir = tmp_path / "run"
    _wait_until_idle(HOSTS)
    jobs.append(job := submit(cluster, args, run_dir, wait=False))
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-000005"):
        assert time.time() < deadline and _in_queue(job), (
            f"no checkpoint in time: {_log_tail(run_dir, job.job_id)}"
        )
        time.sleep(0.5)
    try:
        _node("lose-node", "memdlm-n2")
        deadline = time.time() + 400
        while latest.read_text().strip() != f"step-{steps:06d}" or _in_queue(job):
            assert time.time() < deadline, (
                f"the requeued job did not finish: {_log_tail(run_dir, job.job_id)}"
            )
            time.sleep(1)
    finally:
        _node("node-back", "memdlm-n2")
    rank0 = (run_dir / "submitit" / f"{job.job_id}_0_log.out").read_text()
    assert rank0.count("task 0/2 on memdlm-n1") == 1 and rank0.count("task 0/1 on memdlm-n1") == 1, rank0[
        -3000:
    ]
    assert (
        "elastic resume from step-000005: TP=1 x DP=2 (grad_accum 1) -> TP=1 x DP=1 (grad_accum 2)" in rank0
    )
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # no gap, none twice
    state = json.loads((run_dir / "checkpoints" / f"step-{steps:06d}" / "train_state.json").read_text())
    assert state["layout"]["dp"] == 1 and state["layout"]["grad_accum"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    world = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "layout/world_size")]
    assert world == [(0, 2.0), (5, 1.0)]
    assert run.data.tags["event.resize.step-000005"].startswith("TP=1 x DP=2 (grad_accum 1) -> TP=1 x DP=1")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, steps + 1))

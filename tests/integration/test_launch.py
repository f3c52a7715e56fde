"""Launching: submitit's LocalExecutor with 2 real tasks, the Slurm dry run, and cluster-config errors."""

from __future__ import annotations

import json

import pytest

from launch.clusters import ClusterConfig, load_cluster
from launch.pretrain import main as pretrain_main
from launch.submit import submit
from pipeline.config import ConfigError
from tests.conftest import tiny_job_args


def test_local_executor_runs_two_tasks_to_a_finished_checkpoint(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    cluster = ClusterConfig(executor="local", tasks_per_node=2, time_min=10)
    job = submit(
        cluster,
        tiny_job_args(tiny_dataset, tmp_path, "steps=3", "eval.every=0", "checkpoint.every=0"),
        run_dir,
        timeout_s=600,  # a hung job fails the test and is stopped, tasks and all (launch.submit.stop_local)
    )
    assert job.results() == [0, 0]
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "train_state.json").read_text())
    assert state["layout"] == {
        "world": 2,
        "tp": 1,
        "dp": 2,
        "grad_accum": 1,
        "micro_batch": 4,
        "ep": 1,
    }  # the two tasks formed one process group
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    logs = sorted(p.name for p in (run_dir / "submitit").glob("*_log.out"))
    assert len(logs) == 2  # one log per task


def test_slurm_dry_run_prints_the_sbatch_script(capsys):
    assert pretrain_main(["--cluster", "slurm-example", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my-project",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --exclusive=true",
        "source .venv/bin/activate",
        "srun --unbuffered",
    ):
        assert line in out, line
    assert "nothing prepared or submitted" in out


def test_cluster_config_errors_name_what_is_allowed(tmp_path, capsys):
    assert pretrain_main(["--cluster", "moon"]) == 2
    assert (
        "unknown cluster 'moon': no configs/cluster/moon.yaml; available: ci-slurm, ci-slurm-2node, local, slurm-2node-h100, slurm-example, slurm-llada21-mini"
        in capsys.readouterr().err
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("executor: kubernetes\n")
    with pytest.raises(
        ConfigError, match=r"key 'executor': got 'kubernetes', expected one of 'local', 'slurm'"
    ):
        load_cluster("bad", cluster_dir=tmp_path)
    bad.write_text("executor: slurm\nnodes: 2\n")
    with pytest.raises(ConfigError, match=r"key 'partition': required for executor 'slurm'"):
        load_cluster("bad", cluster_dir=tmp_path)
    bad.write_text("executor: local\ntasks_per_nodes: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key \(did you mean 'tasks_per_node'\?\)"):
        load_cluster("bad", cluster_dir=tmp_path)


def test_sft_launch_refuses_a_pretraining_config_and_dry_runs_its_own(capsys):
    from launch.sft import main as sft_main

    assert sft_main(["--cluster", "local", "--config", "configs/train/local.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: configs/train/local.yaml: key 'objective.mode' is 'pretrain'")
    assert len(err.strip().splitlines()) == 1
    assert sft_main(["--cluster", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective" in out and "sft" in out
    assert "nothing prepared or submitted" in out

"""The submitit internals launch/submit.py relies on, exercised on the installed submitit.

submitit 1.5.4 has no public API to render the sbatch script without a Slurm installation, and
none to reach the handler it installs on the preemption signal. These tests fail, naming the
installed submitit version, when those entry points or behaviours change.
"""

from __future__ import annotations

import inspect
import os
import signal
import stat

import pytest
import submitit

from launch.clusters import ClusterConfig, load_cluster
from launch.submit import (
    _submitit_private,
    make_executor,
    preempt_signal,
    sbatch_preview,
    slurm_parameters,
    wait_for,
)

VERSION = f"installed submitit {submitit.__version__}"


def test_missing_private_entry_point_fails_naming_the_submitit_version():
    with pytest.raises(
        RuntimeError, match=rf"submitit {submitit.__version__} has no submitit\.slurm\.slurm\._gone"
    ):
        _submitit_private("submitit.slurm.slurm", "_gone")


def test_sbatch_string_function_takes_every_argument_the_preview_passes():
    make_sbatch_string = _submitit_private("submitit.slurm.slurm", "_make_sbatch_string")
    accepted = set(inspect.signature(make_sbatch_string).parameters)
    passed = {
        "command", "folder", "job_name", "partition", "time", "nodes", "ntasks_per_node", "cpus_per_task",
        "gpus_per_node", "qos", "account", "constraint", "mem", "setup", "additional_parameters",
    }  # fmt: skip
    assert passed <= accepted, f"{VERSION}: _make_sbatch_string lost {sorted(passed - accepted)}"


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit's Slurm executor only checks that `srun` is on PATH before it can be built."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")


def test_sbatch_preview_is_the_script_the_slurm_executor_submits(tmp_path, srun_on_path):
    cluster = load_cluster("slurm-example")
    folder = tmp_path / "submitit"
    executor = make_executor(cluster, folder)._executor  # the SlurmExecutor behind AutoExecutor
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    preview = sbatch_preview(cluster, folder)
    assert preview == submitted, f"{VERSION}: the DRY_RUN preview no longer matches the submitted script"
    assert f"#SBATCH --signal={preempt_signal().name.removeprefix('SIG')}@" in preview
    assert "#SBATCH --mem=0GB" in preview and slurm_parameters(cluster)["mem_gb"] == 0


def test_a_node_range_asks_slurm_for_as_many_nodes_as_it_can_and_srun_for_the_tasks(tmp_path, srun_on_path):
    cluster = load_cluster("slurm-example", ["min_nodes=1"])
    folder = tmp_path / "submitit"
    executor = make_executor(cluster, folder)._executor
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert sbatch_preview(cluster, folder) == submitted
    assert f"#SBATCH --nodes=1-{cluster.nodes}\n" in submitted
    # --ntasks-per-node in the request would pin the allocation to min_nodes
    assert "#SBATCH --ntasks-per-node" not in submitted
    assert f"srun --unbuffered --output {folder}/%j_%t_log.out" in submitted
    assert f"--ntasks-per-node={cluster.tasks_per_node} " in submitted


def _preempt_handler() -> str:
    """Runs as a submitit task: what handles the preemption signal when the task starts."""
    handler = signal.getsignal(preempt_signal())
    return getattr(handler, "__qualname__", repr(handler))


@pytest.mark.slow
def test_submitit_installs_its_requeue_handler_on_the_preempt_signal_before_the_task(tmp_path):
    # TrainTask takes this handler over and calls it itself once the checkpoint is saved.
    assert preempt_signal() == signal.SIGUSR2
    job = make_executor(ClusterConfig(executor="local", time_min=2), tmp_path).submit(_preempt_handler)
    (handler,) = wait_for(job, local=True, timeout_s=120)
    assert handler == "SignalHandler.checkpoint_and_try_requeue", f"{VERSION}: {handler}"

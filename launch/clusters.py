"""Cluster configs (``configs/cluster/<name>.yaml``, or any YAML file given by path): where and how a
training job runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, load_config

CLUSTER_DIR = Path("configs/cluster")


@dataclass
class ClusterConfig:
    executor: Literal["local", "slurm"]  # submitit's LocalExecutor on this machine, or Slurm
    data: str = "configs/data/sample.yaml"  # dataset build config (data_prep), prepared before launch
    train: str = "configs/train/local.yaml"  # training config (CONFIG= overrides it)
    nodes: int = 1  # nodes of the allocation (Slurm)
    # Slurm may start the job, or bring it back after a requeue (a lost node, a preemption), on as
    # few as min_nodes nodes (`--nodes=min_nodes-nodes`); the trainer then resumes at that world
    # size through the elastic path (grad_accum keeps the global batch). None: exactly `nodes`.
    min_nodes: int | None = None
    tasks_per_node: int = 1  # one task per GPU (or per CPU process locally)
    gpus_per_node: int = 0  # GPUs asked of Slurm per node (0 on CPU clusters)
    cpus_per_task: int = 1  # CPU cores per task (and the threads each task uses)
    time_min: int = 60  # wall-clock limit of one allocation; the job requeues past it
    max_requeues: int = 3  # timeouts/preemptions after which the job gives up
    job_name: str = "memdlm"  # Slurm job name
    partition: str | None = None  # Slurm partition (required for executor: slurm)
    account: str | None = None  # Slurm account to charge
    qos: str | None = None  # Slurm quality of service
    constraint: str | None = None  # Slurm node feature constraint
    mem_gb: int | None = None  # memory per node in GB (0: the whole node; null: Slurm's default)
    setup: list[str] = field(default_factory=list)  # shell lines run before the tasks (modules, venv)
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # any other #SBATCH key: value
    # Local jobs: when the launcher is stopped (Ctrl-C, SIGTERM, SIGHUP), how long its tasks get to
    # save a checkpoint at the next step boundary and exit before they are killed.
    stop_grace_s: int = 120

    def validate(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}': got {getattr(self, key)}, expected >= 1")
        if self.stop_grace_s < 0:
            raise ConfigError(f"key 'stop_grace_s': got {self.stop_grace_s}, expected >= 0")
        if self.executor == "local" and self.nodes != 1:
            raise ConfigError(
                f"key 'nodes': got {self.nodes}, the local executor runs on this machine only (1)"
            )
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(f"key 'min_nodes': got {self.min_nodes}, expected 1..nodes ({self.nodes})")
        if self.executor == "slurm" and not self.partition:
            raise ConfigError("key 'partition': required for executor 'slurm'")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def available_clusters(cluster_dir: Path = CLUSTER_DIR) -> list[str]:
    return sorted(p.stem for p in cluster_dir.glob("*.yaml"))


def load_cluster(
    name: str, overrides: list[str] | None = None, cluster_dir: Path = CLUSTER_DIR
) -> ClusterConfig:
    """Resolve ``CLUSTER=<name>`` (``configs/cluster/<name>.yaml``, or a path to a YAML file) to its
    typed config; an unknown name lists the known ones."""
    given = Path(name)
    path = given if given.suffix in (".yaml", ".yml") else cluster_dir / f"{name}.yaml"
    if given.suffix in (".yaml", ".yml") and not path.is_file():
        raise ConfigError(f"cluster config {path}: no such file")
    if not path.is_file():
        raise ConfigError(
            f"unknown cluster '{name}': no {path}; available: {', '.join(available_clusters(cluster_dir)) or 'none'}"
        )
    return load_config(ClusterConfig, path, overrides or [])

"""Cluster configs (``configs/cluster/<name>.yaml``): where and how a training job runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, load_config

CLUSTER_DIR = Path("configs/cluster")


@dataclass
class ClusterConfig:
    executor: Literal["local", "slurm"]
    data: str = "configs/data/sample.yaml"  # dataset build config (data_prep), prepared before launch
    train: str = "configs/train/local.yaml"  # training config (CONFIG= overrides it)
    nodes: int = 1
    tasks_per_node: int = 1  # one task per GPU (or per CPU process group locally)

    def validate(self) -> None:
        if self.nodes < 1 or self.tasks_per_node < 1:
            raise ConfigError(f"nodes={self.nodes}, tasks_per_node={self.tasks_per_node}: both must be >= 1")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def available_clusters(cluster_dir: Path = CLUSTER_DIR) -> list[str]:
    return sorted(p.stem for p in cluster_dir.glob("*.yaml"))


def load_cluster(
    name: str, overrides: list[str] | None = None, cluster_dir: Path = CLUSTER_DIR
) -> ClusterConfig:
    """Resolve ``CLUSTER=<name>`` to its typed config; an unknown name lists the known ones."""
    path = cluster_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown cluster '{name}': no {path}; available: {', '.join(available_clusters(cluster_dir)) or 'none'}"
        )
    return load_config(ClusterConfig, path, overrides or [])

"""Pretrain entry point behind ``make pretrain CLUSTER=<name>``.

    python -m launch.pretrain --cluster local [--config configs/train/local.yaml] [steps=50 ...]

Resolves ``configs/cluster/<name>.yaml``, prepares the dataset it names (idempotent: a ready
dataset is only checked), checks the training config against the dataset and the world size,
then trains: in this process for one task, with torchrun for several local tasks. The run
directory (resolved config, metrics, checkpoints, export) is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from data_prep.config import PrepConfig
from data_prep.prepare import USER_ERRORS
from data_prep.shard import prepare_dataset
from launch.clusters import load_cluster
from pipeline.config import ConfigError, load_config
from pipeline.data.manifest import verify_manifest
from pipeline.data.stream import TokenBatchLoader
from pipeline.train_config import load_train_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster", default="local", help="name of configs/cluster/<name>.yaml")
    parser.add_argument("--config", default=None, help="training config YAML (default: the cluster's)")
    parser.add_argument(
        "overrides", nargs="*", help="training key=value overrides, e.g. steps=50 memory.enabled=false"
    )
    args = parser.parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
        train_path = args.config or cluster.train
        cfg = load_train_config(train_path, args.overrides)
        prep = load_config(PrepConfig, cluster.data)
        if Path(prep.out_dir).resolve() != Path(cfg.data.path).resolve():
            raise ConfigError(
                f"{train_path}: data.path={cfg.data.path} but cluster '{args.cluster}' prepares {prep.out_dir} "
                f"({cluster.data}); make them agree"
            )
        manifest = prepare_dataset(prep)
        verify_manifest(manifest, prep.out_dir, vocab_size=cfg.model.vocab_size, seq_len=cfg.model.seq_len)
        dp = cluster.world_size // cfg.parallel.tp
        if cluster.world_size % cfg.parallel.tp:
            raise ConfigError(
                f"parallel.tp={cfg.parallel.tp} does not divide the cluster's {cluster.world_size} tasks"
            )
        # Fails now, not an hour into the job, if the shards cannot be split evenly over the ranks.
        TokenBatchLoader(cfg.data, rank=0, world_size=dp)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cluster.executor != "local":
        print("error: Slurm submission arrives with the launch issue; use CLUSTER=local", file=sys.stderr)
        return 2
    print(
        f"run directory: {Path(cfg.run_dir).resolve()} ({cfg.method}, {cluster.world_size} task(s), TP={cfg.parallel.tp})"
    )
    train_args = ["--config", train_path, "--export", *args.overrides]
    if cluster.world_size == 1:
        from pipeline.train import main as train_main

        rc = train_main(train_args)
    else:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cluster.world_size)))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={cluster.tasks_per_node}",
            "-m",
            "pipeline.train",
            *train_args,
        ]
        rc = subprocess.call(cmd, env=env)
    if rc == 0:
        print(f"run directory: {Path(cfg.run_dir).resolve()} (metrics.jsonl, checkpoints/, export/)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""`make data`: build a dataset on this machine, or with its tokenising step as a job array.

    make data CORPUS='texts/*.jsonl' OUT=data/mine
    make data CORPUS='big/*.jsonl' OUT=data/big CLUSTER=my-slurm TASKS=16
    python -m launch.data --corpus 'big/*.jsonl' --out data/big --cluster local --tasks 2

Without ``--cluster``/``--tasks`` this is data_prep/prepare.py's single-machine build; with them
the tokenising runs on configs/cluster/<name>.yaml's executor (launch/data_array.py). The dataset
is byte-identical either way.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep.prepare import USER_ERRORS, add_dataset_arguments, config_from_arguments
from data_prep.shard import prepare_dataset
from launch.clusters import load_cluster
from launch.data_array import prepare_with_array
from launch.submit import LaunchError, require_slurm
from pipeline.cli import run_main
from pipeline.config import ConfigError


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataset_arguments(parser)
    parser.add_argument(
        "--cluster", help="tokenise as a job array on configs/cluster/<name>.yaml's executor (local, slurm)"
    )
    parser.add_argument(
        "--tasks",
        type=int,
        help="array tasks (implies --cluster local if none is given; default: all cores locally, "
        "nodes x tasks_per_node on Slurm)",
    )
    parser.add_argument("--unit-mb", type=float, default=64.0, help="work unit size of the array build, MiB")
    args = parser.parse_args(argv)
    if args.tasks is not None and args.tasks < 1:
        raise ConfigError(f"TASKS (--tasks): got {args.tasks}, expected >= 1 array task")
    if args.unit_mb <= 0:
        raise ConfigError(f"--unit-mb: got {args.unit_mb:g}, expected > 0")
    cfg = config_from_arguments(args)
    if not (args.cluster or args.tasks):
        prepare_dataset(cfg, progress=not args.no_progress)
        return 0
    cluster = load_cluster(args.cluster or "local")
    if cluster.executor == "slurm":
        require_slurm()
    default = (os.cpu_count() or 1) if cluster.executor == "local" else cluster.world_size
    prepare_with_array(
        cfg,
        cluster,
        args.tasks or default,
        progress=not args.no_progress,
        unit_bytes=int(args.unit_mb * 2**20),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=(*USER_ERRORS, LaunchError))


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=(*USER_ERRORS, LaunchError)))

"""Pretrain entry point behind ``make pretrain CLUSTER=<name>``.

    python -m launch.pretrain --cluster local

Resolves ``configs/cluster/<name>.yaml``, prepares the dataset it names (idempotent: a ready
dataset is only checked), checks that the cluster's data-parallel world can share the shards
evenly, and then hands over to the trainer.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.config import PrepConfig
from data_prep.prepare import USER_ERRORS
from data_prep.shard import prepare_dataset
from launch.clusters import load_cluster
from pipeline.config import load_config
from pipeline.data.manifest import verify_manifest
from pipeline.data.stream import DataConfig, TokenBatchLoader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster", default="local", help="name of configs/cluster/<name>.yaml")
    parser.add_argument("--config", default=None, help="training config YAML (arrives with the engine)")
    parser.add_argument("overrides", nargs="*", help="cluster key=value overrides")
    args = parser.parse_args(argv)
    try:
        cluster = load_cluster(args.cluster, args.overrides)
        prep = load_config(PrepConfig, cluster.data)
        manifest = prepare_dataset(prep)
        verify_manifest(manifest, prep.out_dir)
        # Fails now, not an hour into the job, if the shards cannot be split evenly over the ranks.
        TokenBatchLoader(DataConfig(path=prep.out_dir, num_workers=1), rank=0, world_size=cluster.world_size)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"dataset ready for cluster '{args.cluster}' ({cluster.executor}, world size {cluster.world_size}): "
        f"{prep.out_dir}. Training itself arrives with the engine issue; nothing was trained."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

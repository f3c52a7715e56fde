"""Supervised fine-tuning behind ``make sft CLUSTER=...``: the launch of ``make pretrain`` with an SFT
training config and an SFT dataset, checked to be one.

    python -m launch.sft --cluster local                      # runs/local/export on the retrieval tasks
    python -m launch.sft --cluster slurm-example --config configs/train/my-sft.yaml --data-config configs/data/my-sft.yaml

The training config must say ``objective.mode: sft`` (the prompt is never masked nor scored) and
the dataset config must build (prompt, response) rows (a task-data YAML with ``tasks:``, or SFT
data from your own pairs); ``init_from`` names the export to start from. Everything else (data
preparation, the resolved config, submitit, Slurm, DRY_RUN) is ``launch/pretrain.py``'s.
"""

from __future__ import annotations

import sys

from launch.pretrain import USER_ERRORS, launch, parser, resolve
from pipeline.cli import run_main
from pipeline.config import ConfigError

DEFAULT_CONFIG = "configs/train/sft-tasks.yaml"
DEFAULT_DATA = "configs/data/tasks.yaml"


def _main(argv: list[str]) -> int:
    args = parser(__doc__, config=DEFAULT_CONFIG, data_config=DEFAULT_DATA).parse_args(argv)
    cluster, cfg, train_path = resolve(args)
    if cfg.objective.mode != "sft":
        raise ConfigError(
            f"{train_path}: key 'objective.mode' is '{cfg.objective.mode}', and make sft fine-tunes with "
            "objective.mode=sft (the prompt never masked); use make pretrain for pretraining"
        )
    return launch(args, cluster, cfg, train_path)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py)."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())

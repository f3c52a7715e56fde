"""Pretrain entry point behind ``make pretrain CLUSTER=<name>``.

    python -m launch.pretrain --cluster local [--config configs/train/local.yaml] [steps=50 ...]

Resolves ``configs/cluster/<name>.yaml``, prepares the dataset it names (idempotent: a ready
dataset is only checked), checks the training config against the dataset and the world size,
writes the resolved config (every default) to ``<run_dir>/config.json`` and submits through
submitit (local tasks on this machine, or Slurm) a job that loads exactly that file. ``--dry-run`` prints the
resolved configs and the sbatch script instead. The run directory (resolved config, metrics,
checkpoints, export, submitit logs) is printed at start and end.

A local job never outlives this command: stopped by Ctrl-C, SIGTERM (kill, timeout) or SIGHUP (a
closed terminal), it has its tasks save a checkpoint at the next step boundary and exit (within
the cluster's ``stop_grace_s``, then they are killed), and exits 128 + the signal's number; the
same command resumes the run. Killed outright (SIGKILL), its tasks notice and do the same. A
Slurm job runs on by itself: its id and ``scancel <id>`` are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from data_prep.prepare import USER_ERRORS as DATA_ERRORS
from data_prep.prepare import load_dataset_config, prepare_any
from launch.clusters import ClusterConfig, load_cluster
from launch.submit import Interrupted, JobFailed, LaunchError, require_slurm, sbatch_preview, submit
from pipeline.adapters.lora import lora_summary
from pipeline.build import export_tracking_credentials
from pipeline.cli import print_error, run_main
from pipeline.config import ConfigError
from pipeline.dataset.manifest import verify_manifest
from pipeline.families.registry import count_label
from pipeline.hardware.peak import known_peak_tflops
from pipeline.loader.stream import TokenBatchLoader
from pipeline.perf.cost import expected_step_work, model_cost, step_flops
from pipeline.perf.memory_model import estimate_memory
from pipeline.run_lock import RunLocked, check_free
from pipeline.stop import STOPPED_EXIT
from pipeline.tracking import redact_config
from pipeline.train_config import TrainConfig, load_train_config, write_resolved_config

# What a user can fix: one ``error:`` line and exit 2.
USER_ERRORS = (*DATA_ERRORS, LaunchError, RunLocked)


def parser(
    description: str = __doc__, config: str | None = None, data_config: str | None = None
) -> argparse.ArgumentParser:
    """The launch command's arguments (``config`` / ``data_config``: defaults instead of the cluster's)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cluster", default="local", help="name of configs/cluster/<name>.yaml, or a YAML path"
    )
    parser.add_argument(
        "--config", default=config, help="training config YAML (default: %(default)s, else the cluster's)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="Slurm: wait for the job to finish (local always waits)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configs (and sbatch script); submit nothing",
    )
    parser.add_argument(
        "--data-config",
        default=data_config,
        help="dataset config to prepare instead of the cluster's: a PrepConfig YAML, or a task-data "
        "YAML (with 'tasks:') for SFT (data_prep/task_sft.py)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="training key=value overrides, e.g. steps=50 memory.enabled=false"
    )
    return parser


ASSUMED_MFU = 0.4  # for the dry run's step time: what a tuned bf16 run of this size reaches


def _step_time(cluster: ClusterConfig, cfg: TrainConfig, cost, dp: int) -> str:
    """The cost model's FLOPs per optimizer step, and the step time they take on the cluster's GPUs
    (by its ``constraint``, from the table of known bf16 peaks) at an assumed MFU."""
    tokens = dp * cfg.grad_accum * cfg.data.batch_size * cfg.model.seq_len
    work = expected_step_work(tokens, cfg.memory)
    flops = step_flops(cost, work, cfg.memory, cfg.lora)
    line = f"compute per step (cost model, {tokens} tokens): {flops / 1e15:.3g} PFLOP"
    gpu = (cluster.constraint or "").upper()
    peak = known_peak_tflops(gpu) if gpu and cluster.gpus_per_node else None
    if peak is None:
        return line + " (no known GPU in the cluster's constraint: no step time estimated)"
    seconds = flops / (cluster.world_size * peak * 1e12 * ASSUMED_MFU)
    return (
        line
        + f"; {seconds:.2f} s per step on {cluster.world_size} x {gpu} at {ASSUMED_MFU:.0%} MFU of {peak:g} TFLOP/s"
    )


def _dry_run(cluster: ClusterConfig, cfg: TrainConfig, run_dir: Path) -> None:
    print("# cluster:", json.dumps(asdict(cluster), indent=2))
    print("# training config (resolved):", json.dumps(redact_config(asdict(cfg)), indent=2))
    if cluster.executor == "slurm":
        print("# the sbatch script submitit would submit:")
        print(sbatch_preview(cluster, run_dir / "submitit"))
    par = cfg.parallel
    dp = cluster.world_size // par.tp
    cost = model_cost(cfg.model)
    layout = f"TP={par.tp} x DP={dp}" + (f" (EP={par.ep} within DP)" if par.ep > 1 else "")
    params = f"{count_label(cost.params_total)} parameters"
    if cost.params_active != cost.params_total:
        params += f" ({count_label(cost.params_active)} active per token)"
    print(
        f"# plan: {cluster.world_size} task(s) = {layout}, ZeRO-{par.zero_stage}, "
        f"{cfg.method}, {params}, {cfg.steps} steps "
        f"(warm-up {cfg.optim.warmup_for(cfg.steps)}, lr {cfg.optim.lr:g})"
    )
    est = estimate_memory(
        cfg.model, cfg.memory, micro_batch=cfg.data.batch_size, tp=par.tp, dp=dp,
        zero_stage=par.zero_stage, lora=cfg.lora, ep=par.ep,
    )  # fmt: skip
    parts = ", ".join(f"{k} {v:g}" for k, v in est.as_gib().items() if k != "total")
    print(f"# memory per rank (memory model, bf16): {est.total_gib:.2f} GiB ({parts} GiB)")
    print(f"# {_step_time(cluster, cfg, cost, dp)}")
    if cfg.lora.enabled:
        print(f"# {lora_summary(cfg.model, cfg.lora)}")
    if cfg.init_from and not (Path(cfg.init_from) / "model.safetensors").is_file():
        print(
            f"# note: init_from={cfg.init_from} is not an export directory yet (no model.safetensors); "
            "a real launch stops there (`make import-hf SRC=<hf dir> OUT=<dir>` writes one)"
        )
    print(f"# dry run: nothing prepared or submitted; the run directory would be {run_dir}")


def prepare_data(cluster: ClusterConfig, cfg: TrainConfig, train_path: str, data_config: str) -> None:
    """Build (or check) the dataset the config reads, and check it fits the config and world size."""
    if cfg.init_from and not (Path(cfg.init_from) / "model.safetensors").is_file():
        raise ConfigError(
            f"{train_path}: init_from={cfg.init_from} is not an export directory (no model.safetensors); "
            "train the base model first (`make pretrain CLUSTER=local` writes runs/local/export)"
        )
    prep = load_dataset_config(data_config)
    if Path(prep.out_dir).resolve() != Path(cfg.data.path).resolve():
        raise ConfigError(
            f"{train_path}: data.path={cfg.data.path} but {data_config} prepares {prep.out_dir}; make them agree"
        )
    manifest = prepare_any(prep)
    verify_manifest(
        manifest,
        prep.out_dir,
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.model.seq_len,
        on_corrupt_shard=cfg.data.on_corrupt_shard,
    )
    # Fails now, not an hour into the job, if the shards cannot be split evenly over the ranks.
    TokenBatchLoader(cfg.data, rank=0, world_size=cluster.world_size // cfg.parallel.tp)


def resolve(args: argparse.Namespace) -> tuple[ClusterConfig, TrainConfig, str]:
    """The cluster, the resolved training config and the training config's path."""
    cluster = load_cluster(args.cluster)
    train_path = args.config or cluster.train
    cfg = load_train_config(train_path, args.overrides)  # resolved once, here
    if cluster.world_size % cfg.parallel.tp:
        raise ConfigError(
            f"parallel.tp={cfg.parallel.tp} does not divide the cluster's {cluster.world_size} tasks"
        )
    return cluster, cfg, train_path


def _stopped(cluster: ClusterConfig, run_dir: Path) -> str:
    """What an interrupted launch left: the local job's newest checkpoint, or the Slurm job running."""
    if cluster.executor != "local":
        return f"the Slurm job keeps running (see `scancel` above); run directory: {run_dir}"
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    if not saved:
        return f"the job was stopped before its first checkpoint; run directory: {run_dir}"
    return f"the job was stopped; newest checkpoint {saved[-1]}: run the same command again to resume"


def _launch(cluster: ClusterConfig, cfg: TrainConfig, resolved: Path, run_dir: Path, wait: bool) -> int:
    """Submit the job that loads ``resolved``; with ``wait``, follow it to its end."""
    print(
        f"run directory: {run_dir} ({cfg.method}, {cluster.world_size} task(s), TP={cfg.parallel.tp})",
        flush=True,
    )
    try:
        job = submit(cluster, ["--resolved", str(resolved), "--export"], run_dir, wait=wait)
    except Interrupted as exc:
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP): the job is stopped all the same
            print_error(f"interrupted by {signal.Signals(exc.signum).name}: {_stopped(cluster, run_dir)}")
        return 128 + exc.signum
    except JobFailed as exc:  # the task's own error, and its log
        print_error(exc)
        return 1
    if not wait:
        print(f"job {job.job_id} queued; logs in {run_dir / 'submitit'}")
        return 0
    if STOPPED_EXIT in job.results():  # a task was asked to stop (SIGTERM): saved, not finished
        print(
            f"job {job.job_id} stopped before its last step (a stop was requested) with a checkpoint in "
            f"{run_dir / 'checkpoints'}: run the same command again to resume"
        )
        return STOPPED_EXIT
    print(f"run directory: {run_dir} (config.json, metrics.jsonl, checkpoints/, export/, submitit/)")
    return 0


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return launch(args, *resolve(args))


def launch(args: argparse.Namespace, cluster: ClusterConfig, cfg: TrainConfig, train_path: str) -> int:
    """Prepare the data, write the resolved config, submit the job (or print the plan with
    ``--dry-run``); returns the command's exit status."""
    run_dir = Path(cfg.run_dir).resolve()
    if args.dry_run:
        _dry_run(cluster, cfg, run_dir)
        return 0
    check_free(run_dir)  # a running trainer owns run_dir: refuse before rewriting its config.json
    if cluster.executor == "slurm":
        require_slurm()  # before preparing data that could take an hour
    prepare_data(cluster, cfg, train_path, args.data_config or cluster.data)
    # The job loads exactly this file: every default written out, nothing parsed twice.
    resolved = write_resolved_config(cfg, run_dir / "config.json")
    export_tracking_credentials(cfg)  # the file holds the URI without them; the job's env has them
    return _launch(cluster, cfg, resolved, run_dir, wait=cluster.executor == "local" or args.wait)


def main(argv: list[str] | None = None) -> int:
    """The command; a user error is one ``error:`` line and 2 (pipeline/cli.py), also when called."""
    return run_main(_main, argv, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())

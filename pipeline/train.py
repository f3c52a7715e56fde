"""Training: any objective (MDLM, MemDLM, SFT) on DeepSpeed ZeRO over megatron-core TP, for any
registered model family. Read :meth:`Trainer.run` and :meth:`Trainer.train_step` first.

    make pretrain CLUSTER=local                       # through the launcher (writes run_dir/config.json)
    python -m pipeline.train --resolved runs/local/config.json --export
    python -m pipeline.train --config configs/train/local.yaml steps=50 memory.enabled=false
    python -m launch.local --nproc 2 --config configs/train/local.yaml parallel.tp=2

Per step: stream ``grad_accum`` micro-batches (their position is part of the train state); draw the
anchor noise from a generator seeded by (seed, step, global micro-batch slot) and the memory's
reset from one seeded by (seed, step, micro-batch) alone (the same on every DP rank: one memory per
global batch); the objective computes its loss (MemDLM's inner passes through ``engine.module``,
everything the outer gradient flows through via ``engine``); backward; then one optimizer step
(DeepSpeed's accumulation boundary is ours: ``managed_gradient_accumulation: false``). A non-finite
loss on any rank voids the whole step on every rank (data consumed, LR schedule advanced, no
update); ``max_nonfinite_steps`` in a row stop the run with the last good checkpoint untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.build import (
    build_dataset,
    build_runtime,
    build_tracker,
    check_tracking,
    model_factory,
    run_record,
)
from pipeline.cli import print_error, run_main
from pipeline.config import ConfigError
from pipeline.dataset.manifest import DatasetError
from pipeline.dataset.seeding import seed_of
from pipeline.dataset.tokenizer import TokenizerError
from pipeline.engine.checkpoint import CheckpointError, Layout, find_resume_checkpoint, latest_checkpoint
from pipeline.engine.checkpoint import save_checkpoint as write_checkpoint
from pipeline.engine.deepspeed import build_engine
from pipeline.engine.elastic import ResumePlan, plan_resume, prepare_universal, resume_engine
from pipeline.engine.export import EXPORT_HINT, export_model
from pipeline.eval.heldout import evaluate_heldout
from pipeline.families import family_of
from pipeline.families.registry import param_count
from pipeline.loader.stream import TokenBatchLoader
from pipeline.metrics import MetricsFile, peak_memory_mib
from pipeline.objectives import Batch, Draws, ObjectiveOutput, build_objective
from pipeline.outputs import OutputDirError, check_output_dir
from pipeline.parallel.collective import on_rank0_all
from pipeline.parallel.dims import ParallelDims, destroy_distributed, init_distributed, with_expert_groups
from pipeline.perf.cost import model_cost
from pipeline.plots import plot_loss_curves
from pipeline.run_lock import RunLocked
from pipeline.run_lock import acquire as acquire_run_lock
from pipeline.stop import (
    STOPPED_EXIT,
    StoppedForRequeue,
    StopSignal,
    stop_on_signals,
    under_torchrun,
    watch_parent,
)
from pipeline.train_config import TrainConfig, load_resolved_config, load_train_config
from pipeline.train_state import TrainState

__all__ = ["STOPPED_EXIT", "StoppedForRequeue", "Trainer", "TrainingDiverged", "main"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed_of(*parts))


def _say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


@dataclass
class StepTotals:
    """What the micro-batches of one step add up to before the step's single reduction."""

    losses: list[torch.Tensor] = field(default_factory=list)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over micro-batches
    work: dict[str, torch.Tensor] = field(default_factory=dict)  # loss-position counts, summed

    def add(self, out: ObjectiveOutput) -> None:
        self.losses.append(out.loss.detach())
        for k, v in out.stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v.detach().float()
        for k, v in out.work.items():
            self.work[k] = self.work.get(k, 0.0) + v.detach().float()


def _parallel_dims(cfg: TrainConfig) -> ParallelDims:
    """The run's process groups; the family's parallel plan checks the sizes first (an error naming
    the key), and a family with experts gets DeepSpeed's expert groups before its model is built."""
    dims = init_distributed(cfg.parallel.tp)
    family = family_of(cfg.model)
    family.plan.check(cfg.model, replace(dims, ep=cfg.parallel.ep))
    return with_expert_groups(dims, cfg.parallel.ep) if family.expert_parallel else dims


class Trainer:
    """The run's parts (engine, objective, data stream, tracker) and its explicit train state."""

    def __init__(
        self,
        cfg: TrainConfig,
        parent_run_id: str | None = None,
        native_bf16: bool | None = None,
        stop: StopSignal | None = None,
        export_to: Path | None = None,
    ):
        self.cfg, self.stop = cfg, stop or StopSignal()
        self.dims = _parallel_dims(cfg)
        self.rank = self.dims.rank
        self.run_dir = Path(cfg.run_dir)
        self._unlock: weakref.finalize | None = None  # rank 0: releases this Trainer's hold of run.lock
        self._locked = False
        self._take_run_lock()  # before anything is built or read: a second trainer stops here
        try:
            self._preflight(export_to)
            self._build(parent_run_id, native_bf16)
        except BaseException:
            self.close()
            raise

    def _build(self, parent_run_id: str | None, native_bf16: bool | None) -> None:
        cfg = self.cfg
        runtime = build_runtime(cfg, native_bf16)
        self.device, self.precision, self.peak = runtime.device, runtime.precision, runtime.peak
        self.resolved = run_record(cfg, runtime)
        _say(f"precision: {self.precision.dtype} ({self.precision.reason})")
        _say(f"MFU peak: {self.peak.describe()}")
        self.ckpt_dir = self.run_dir / "checkpoints"
        data = build_dataset(cfg)
        self.manifest, self.manifest_sha = data.manifest, data.manifest_sha256
        self.mask_id, self.pad_id = data.mask_id, data.pad_id
        resume = self._plan_resume() if cfg.checkpoint.resume else None
        if resume is not None and resume.resized:
            _say(f"elastic resume from {resume.path.name}: {resume.describe()}")
            prepare_universal(resume, cfg.checkpoint.reshard)
            self.cfg = cfg = replace(cfg, grad_accum=resume.current.grad_accum)
            self.resolved = run_record(cfg, runtime)
        _say(f"building the engine ({param_count(cfg.model) / 1e6:.1f}M parameters, {self.dims.describe()})")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (and TP size)
        load_universal = resume is not None and resume.resized
        self.engine, _, self.scheduler = build_engine(
            cfg, self.dims, model_factory(cfg, self.dims), self.precision, load_universal
        )
        self.model = self.engine.module
        self.objective = build_objective(cfg.objective, cfg.memory, self.mask_id, self.pad_id)
        self.cost = model_cost(cfg.model)
        self.loader = TokenBatchLoader(cfg.data, rank=self.dims.dp_rank, world_size=self.dims.dp)
        self.state = TrainState()
        self.history: list[dict[str, Any]] = []
        if resume is not None:
            self._resume(resume)
        self.batches = iter(self.loader)
        self.tracker = build_tracker(cfg, self.resolved, self.dims, self.state.mlflow_run_id, parent_run_id)
        self._log_layout(resume)
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl")

    # ------------------------------------------------------------ the run directory's lock
    def _take_run_lock(self) -> None:
        """Collective: rank 0 takes ``run_dir/run.lock`` (pipeline/run_lock.py) unless this Trainer
        holds it; every rank gets rank 0's answer, so all stop together when another run has it."""
        if self._locked:
            return

        def take() -> None:
            lock = acquire_run_lock(self.run_dir)
            self._unlock = weakref.finalize(self, lock.release)  # a dropped Trainer lets go too

        on_rank0_all(take, f"rank 0 could not take the lock of {self.run_dir}")
        self._locked = True

    def _preflight(self, export_to: Path | None) -> None:
        """Collective, before anything slow is built: an unreachable tracking server and an export
        directory that is not ours stop the run now, not after the engine build or the training."""

        def check() -> None:
            check_tracking(self.cfg)
            if export_to is not None:
                check_output_dir(export_to, label="export ", hint=EXPORT_HINT)

        on_rank0_all(check, "rank 0's start-up checks failed")

    def close(self) -> None:
        """Release the run directory's lock (idempotent; ``run`` does it when it ends). The engine
        and the tracker stay usable; a later ``run`` takes the lock again."""
        if self._unlock is not None:
            self._unlock()
            self._unlock = None
        self._locked = False

    # ------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None, release_lock: bool = True) -> list[dict[str, Any]]:
        """Train to ``cfg.steps`` (or ``stop_after`` more steps); returns the logged records.

        Holds the run directory's lock throughout (taken again if released) and releases it when
        it returns or raises, unless ``release_lock`` is false (then :meth:`close` does)."""
        self._take_run_lock()
        try:
            return self._run(stop_after)
        finally:
            if release_lock:
                self.close()

    def _run(self, stop_after: int | None) -> list[dict[str, Any]]:
        cfg, state = self.cfg, self.state
        target = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
        self._write_run_dir()
        bar = tqdm(total=target, initial=state.step, desc=cfg.method, unit="step", disable=self.rank != 0)
        try:
            while state.step < target:
                if self.stop.agreed(self.device):  # every rank stops at the same step
                    saved = self.save()
                    raise StoppedForRequeue(
                        f"stop requested: checkpoint saved at step {state.step} in {saved}{self.stop.why()}"
                    )
                rec = self.train_step()
                bar.update(1)
                if "loss" in rec:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if cfg.eval.every and (state.step % cfg.eval.every == 0 or state.step == cfg.steps):
                    if self.rank == 0:
                        bar.write(f"evaluating at step {state.step}")
                    rec.update(self.evaluate())
                if state.step % cfg.log_every == 0 or state.step == target or "eval/loss" in rec:
                    self._log(rec)
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < target:
                    self.save()
            bar.close()
            self.save()
        except StoppedForRequeue:
            self._end_tracking("KILLED")  # reopened as RUNNING by the resumed job
            raise
        except BaseException:
            self._end_tracking("FAILED")
            raise
        if state.step >= cfg.steps:
            self._end_tracking("FINISHED")
        elif self.tracker:
            self.tracker.flush()
        return self.history

    def _write_run_dir(self) -> None:
        """config.json (resolved + runtime), the dataset's manifest; records past a resume dropped."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics.drop_after(self.state.step)  # logged past the checkpoint we resumed from
        (self.run_dir / "config.json").write_text(json.dumps(self.resolved, indent=2, sort_keys=True))
        shutil.copyfile(Path(self.cfg.data.path) / "manifest.json", self.run_dir / "dataset_manifest.json")

    def _log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.rank == 0:
            self.metrics.append(rec)
            if self.tracker:
                self.tracker.log(self.state.step, rec)

    def _end_tracking(self, status: str) -> None:
        """Artifacts (config, dataset manifest, loss-curve PNG) on a finished run; the run's status."""
        if not self.tracker:
            return
        self.tracker.flush()
        if status == "FINISHED":
            png = plot_loss_curves(
                self.metrics.records(),
                self.run_dir / "loss_curves.png",
                f"{self.cfg.method}: {self.run_dir.name}",
            )
            manifest = Path(self.cfg.data.path) / "manifest.json"
            self.tracker.log_artifacts([self.run_dir / "config.json", manifest, png])
        self.tracker.end(status)

    def evaluate(self) -> dict[str, float]:
        """Held-out numbers (pipeline/eval/heldout.py); collective over DP ranks."""
        return evaluate_heldout(
            self.model, self.cfg, self.mask_id, self.pad_id, self.device, self.precision.bf16
        )

    # ------------------------------------------------------------ checkpoints
    def _layout(self) -> Layout:
        d = self.dims
        return Layout(d.world, d.tp, d.dp, self.cfg.grad_accum, self.cfg.data.batch_size, d.ep)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        return self.cfg.data.batch_size * self.cfg.grad_accum * self.dims.dp

    def _plan_resume(self) -> ResumePlan | None:
        """The newest verified checkpoint and how this layout resumes it (None: start afresh).

        A damaged or missing newest checkpoint falls back to the previous complete one with a
        warning, or raises with ``checkpoint.on_damaged=error`` (see pipeline/engine/checkpoint.py)."""
        path = find_resume_checkpoint(self.ckpt_dir, self.cfg.checkpoint.on_damaged)
        if path is None:
            return None
        state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
        return plan_resume(path, state, self._layout())

    def _resume(self, plan: ResumePlan) -> None:
        """Restore the engine, the train state and this rank's data position from ``plan``."""
        saved = resume_engine(self.engine, plan, self.manifest_sha)
        self.state = TrainState.restore(saved, self.global_batch)
        # one data state per data-parallel rank (the TP ranks of a DP rank share theirs)
        by_rank = {entry[0]["rank"]: entry[0] for entry in saved["data"]}
        old, now = plan.saved, plan.current
        if (old.dp, old.grad_accum) == (now.dp, now.grad_accum):  # same data layout (TP may differ)
            self.loader.load_state_dict(by_rank[self.dims.dp_rank])
        else:
            self.loader.load_resized_state(
                [by_rank[r] for r in range(old.dp)], old.grad_accum, now.grad_accum
            )
        _say(f"resumed from {plan.path} at step {self.state.step}")

    def _log_layout(self, resume: ResumePlan | None) -> None:
        """The layout as metrics at the run's first step and at every resize (an event on the run)."""
        if not self.tracker or (resume is not None and not resume.resized):
            return
        d = self.dims
        metrics = {"layout/world_size": d.world, "layout/tp": d.tp, "layout/dp": d.dp}
        metrics["layout/grad_accum"] = self.cfg.grad_accum
        text = (
            resume.describe()
            if resume is not None
            else f"TP={d.tp} x DP={d.dp} (grad_accum {self.cfg.grad_accum})"
        )
        self.tracker.log_event(self.state.step, "resize" if resume is not None else "layout", text, metrics)

    def save(self) -> Path:
        """Collective: a checkpoint of this step (engine, train state, every rank's data position)."""
        state = self.state
        state.data = self.loader.state_dict()
        state.mlflow_run_id = self.tracker.run_id if self.tracker else state.mlflow_run_id
        record = {
            **state.shared(),
            "config": self.resolved,
            "manifest_sha256": self.manifest_sha,
            "layout": asdict(self._layout()),
        }
        return write_checkpoint(
            self.engine, self.ckpt_dir, state.step, record, [state.data], self.cfg.checkpoint.keep
        )

    # ------------------------------------------------------------ one step
    def _micro(self, raw: dict[str, torch.Tensor], micro: int) -> ObjectiveOutput:
        cfg, step = self.cfg, self.state.step
        # Noise and pre-anchor masks are keyed by the global micro-batch slot (dp_rank * grad_accum +
        # micro), which holds the same rows at every layout (an elastic resume keeps it). The
        # memory's reset is the same on every DP rank: in batch scope the DP-synced inner gradients
        # are only the global batch's gradient if every rank starts from the same phi0.
        slot = self.dims.dp_rank * cfg.grad_accum + micro
        draws = Draws(
            noise=_generator(self.device, cfg.seed, step, "slot", slot),
            reset=_generator(self.device, cfg.seed, step, micro, -1),
        )
        prompt = raw["prompt_mask"].to(self.device) if "prompt_mask" in raw else None
        batch = Batch(raw["tokens"].to(self.device, non_blocking=True), prompt)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16):
            return self.objective(
                self.model,
                self.engine,
                batch,
                draws,
                dp_group=self.dims.dp_group,
                measure=self._logs_next_step(),  # the memory's gain: on logged steps only
            )

    def _logs_next_step(self) -> bool:
        """Whether the step being computed (``state.step + 1``) is logged (see ``run``)."""
        step, cfg = self.state.step + 1, self.cfg
        return (
            step % cfg.log_every == 0
            or step == cfg.steps
            or bool(cfg.eval.every and step % cfg.eval.every == 0)
        )

    def _agree(self, finite: bool) -> tuple[bool, int]:
        """One collective per micro-batch: did every rank get a finite loss, and how many corrupt
        shards have all ranks skipped so far (``on_corrupt_shard: skip`` lets ranks' data diverge)."""
        t = torch.tensor(
            [0.0 if finite else 1.0, float(self.loader.skipped_shards)],
            device=self.device,
            dtype=torch.float64,
        )
        dist.all_reduce(t)
        return bool(t[0].item() == 0), int(t[1].item())

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's record."""
        t0 = time.perf_counter()
        totals, void = StepTotals(), False
        for micro in range(self.cfg.grad_accum):
            raw = next(self.batches)  # consumed even in a void step: the data position moves on
            if void:
                continue
            out = self._micro(raw, micro)
            # The model's own losses (a mixture of experts' balancing), scaled with the loss.
            aux = self.model.auxiliary_loss()
            loss = out.loss if aux is None else out.loss + aux
            finite, skipped_shards = self._agree(bool(torch.isfinite(loss.detach())))
            self._note_skipped_shards(skipped_shards)
            if not finite:
                void = True  # every rank agrees: drop this step's gradients, no update
                continue
            self.engine.backward(loss)
            totals.add(out)
        if void:
            self._void_step()
        else:
            self.state.nonfinite_run = 0
            self.engine.step()  # the accumulation boundary: reduce, clip, AdamW, LR schedule
        model_metrics = self.model.end_step(self.dims.dp_group, applied=not void)
        self.state.step += 1
        self.state.consumed_samples += self.global_batch
        seconds = time.perf_counter() - t0
        tokens_per_step = self.global_batch * self.cfg.model.seq_len
        rec = {"step": self.state.step, "seconds": seconds, "tokens_per_s": tokens_per_step / seconds}
        if not void:
            rec.update(self._step_metrics(totals, tokens_per_step, seconds))
            rec.update(model_metrics)
        rec["nonfinite_total"] = self.state.nonfinite_total
        rec["inner_skipped_total"] = self.state.inner_skipped_total
        rec["data/skipped_shards"] = self.state.skipped_shards_total
        rec["data/consumed_samples"] = self.state.consumed_samples
        rec["peak_memory_mib"] = peak_memory_mib()
        return rec

    def _void_step(self) -> None:
        """A non-finite micro-batch on some rank: no update on any rank, LR follows the step."""
        state = self.state
        state.nonfinite_total += 1
        state.nonfinite_run += 1
        if state.nonfinite_run >= self.cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{state.nonfinite_run} consecutive non-finite losses at step {state.step + 1}; stopping. The last "
                f"good checkpoint is {latest_checkpoint(self.ckpt_dir) or '(none yet)'}"
            )
        # ZeRO's zero_grad restarts its accumulation: the next backward overwrites the partitions.
        self.engine.optimizer.zero_grad()
        self.scheduler.step()

    def _note_skipped_shards(self, total: int) -> None:
        state = self.state
        if total > state.skipped_shards_total and self.rank == 0:
            print(
                f"warning: {total - state.skipped_shards_total} corrupt shard(s) skipped at step {state.step + 1} "
                f"({total} so far over all ranks): data-parallel ranks now read different amounts of data",
                file=sys.stderr,
                flush=True,
            )
        state.skipped_shards_total = total

    def _step_metrics(self, totals: StepTotals, tokens_per_step: int, seconds: float) -> dict[str, float]:
        """Loss, LR, grad norm, inner stats (mean over micro-batches), FLOP/s and MFU of a step."""
        n, keys = len(totals.losses), sorted(totals.work)
        # Loss mean over micro-batches and DP ranks; loss positions summed over both, so the FLOP
        # count covers the same tokens (the whole step) as tokens_per_step. One collective.
        parts = [torch.stack(totals.losses).sum().reshape(1).float()]
        parts += [totals.work[k].reshape(1).float() for k in keys]
        red = torch.cat(parts)
        dist.all_reduce(red, group=self.dims.dp_group)
        out = {"loss": float(red[0]) / (n * self.dims.dp), "lr": float(self.scheduler.get_last_lr()[0])}
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None else float("nan")
        for k, v in totals.stats.items():
            out[k] = float(v) / n
        self.state.inner_skipped_total += sum(v for k, v in out.items() if k.endswith("_skipped")) * n
        work = self.objective.step_work(
            tokens_per_step, {k: float(v) for k, v in zip(keys, red[1:], strict=True)}
        )
        lora = self.cfg.lora if self.cfg.lora.enabled else None
        per_device = self.objective.flops(self.cost, work, lora) / seconds / self.dims.world
        out["model_tflops_per_s"] = per_device / 1e12
        out["mfu"] = self.peak.mfu(per_device)
        return out


# What a user can fix: one ``error:`` line and exit 2 (pipeline/cli.py adds OSError and the rest).
USER_ERRORS = (
    ConfigError,
    DatasetError,
    CheckpointError,
    TokenizerError,
    TrainingDiverged,
    RunLocked,
    OutputDirError,
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--resolved", help="a resolved config.json (what the launcher writes): loaded as is")
    source.add_argument("--config", default="configs/train/local.yaml", help="a training YAML (+ overrides)")
    parser.add_argument("--export", action="store_true", help="write a consolidated export at the end")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of --config, e.g. optim.lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stop: StopSignal | None = None) -> int:
    """Train (and export with ``--export``); returns 0, 2 on a user error, STOPPED_EXIT on a stop.

    Without ``stop`` (a direct start; a submitit task passes its own) SIGUSR2 and SIGTERM request
    a stop: a checkpoint at the next step boundary, then STOPPED_EXIT. Under torchrun a worker
    whose agent dies stops the same way (``MEMDLM_ORPHAN_GRACE_S`` later it exits regardless)."""
    args = _parse_args(argv)
    if args.resolved and args.overrides:  # before the try: nothing to tear down yet
        print_error(f"--resolved {args.resolved} is loaded as is: derive a new config instead")
        return 2
    own_stop = stop is None
    stop = stop or StopSignal()
    with (
        stop_on_signals(stop) if own_stop else contextlib.nullcontext(),
        watch_parent(stop) if under_torchrun() else contextlib.nullcontext(),
    ):
        try:
            return _train(args, stop)
        except StoppedForRequeue as exc:
            if own_stop:  # nothing requeues a direct start: say how to go on
                print(f"{exc}. {_resume_hint(argv)}", flush=True)
            else:
                print(str(exc), flush=True)
            return STOPPED_EXIT
        except USER_ERRORS as exc:
            print_error(exc)
            return 2
        finally:
            destroy_distributed()


def _resume_hint(argv: list[str] | None) -> str:
    if under_torchrun():
        return "To resume, run the same torchrun command again: it continues from the newest checkpoint"
    args = shlex.join(sys.argv[1:] if argv is None else argv)
    return f"To resume, run the same command again (python -m pipeline.train {args}): it continues from there"


def _train(args: argparse.Namespace, stop: StopSignal) -> int:
    cfg = (
        load_resolved_config(args.resolved)
        if args.resolved
        else load_train_config(args.config, args.overrides)
    )
    export_to = Path(cfg.run_dir) / "export" if args.export else None
    trainer = Trainer(cfg, stop=stop, export_to=export_to)
    try:
        trainer.run(release_lock=False)  # the export below still writes into run_dir
        if export_to is not None:
            _say(f"exporting to {export_to}")
            tokenizer = Path(cfg.data.path) / trainer.manifest.tokenizer_file
            export_model(
                trainer.engine, cfg, export_to, tokenizer, trainer.manifest.special_ids, trainer.state.step
            )
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=USER_ERRORS))

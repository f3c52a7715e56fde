"""The training loop: MDLM or MemDLM on DeepSpeed ZeRO over megatron-core TP.

    torchrun --nproc_per_node 2 -m pipeline.train --config configs/train/local.yaml parallel.tp=2
    python -m pipeline.train --config configs/train/local.yaml steps=50 memory.enabled=false

Per step: stream a batch (its position is part of the checkpoint), draw the anchor noise from
a generator seeded by (seed, step, micro-batch, data-parallel rank) and the memory's reset from
one seeded by (seed, step, micro-batch) alone (the same on every DP rank: one memory per global
batch), compute the MDLM loss or MemDLM's outer loss (inner loop through ``engine.module``, outer
loss through ``engine``), backward, and one optimizer step per training step (DeepSpeed's
accumulation boundary is ours: ``managed_gradient_accumulation: false``). A non-finite loss on
any rank voids the whole step on every rank (data consumed, LR schedule advanced, no update);
``max_nonfinite_steps`` in a row stop the run with the last good checkpoint untouched.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import ConfigError
from pipeline.data.manifest import DatasetError, load_manifest, verify_manifest
from pipeline.data.stream import TokenBatchLoader
from pipeline.engine.checkpoint import (
    CheckpointError,
    Layout,
    find_resume_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.hardware.device import training_device
from pipeline.hardware.peak import peak_flops
from pipeline.hardware.precision import Precision, resolve_precision
from pipeline.memory.adapt import adapt_to_context
from pipeline.memory.inner_loop import memdlm_loss
from pipeline.model.flops import estimate_flops, estimate_mfu
from pipeline.model.parallel import (
    ParallelDims,
    destroy_distributed,
    dp_group,
    dp_rank,
    dp_size,
    init_distributed,
)
from pipeline.model.transformer import DLMTransformer
from pipeline.objectives.mdlm import draw_noise, maskable_positions, mdlm_loss
from pipeline.tracking import Tracker, flatten, git_commit, plot_loss_curves, redact_config
from pipeline.train_config import TrainConfig, load_train_config

# DeepSpeed 0.19.8 calls torch.distributed collectives that torch 2.13 marks deprecated; the
# warning repeats every step and buries the progress bar.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


class StoppedForRequeue(RuntimeError):
    """The run saved a checkpoint because a stop was requested (a scheduler's time-out signal)."""


# Set by a signal handler (see launch/submit.py); read at every step boundary, where all ranks
# agree on it with one all-reduce, save a checkpoint together and stop.
STOP_REQUESTED = {"signal": 0}
STOPPED_EXIT = 3  # main()'s status after a requested stop (checkpoint saved, not finished)


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    seed = int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") & (
        2**63 - 1
    )
    return torch.Generator(device).manual_seed(seed)


def _check_init_tokenizer(export: str, dataset_sha: str, dataset: str) -> None:
    from pipeline.data.tokenizer import sha256_file

    tok = Path(export) / "tokenizer.model"
    if tok.is_file() and sha256_file(tok) != dataset_sha:
        raise DatasetError(
            f"init_from={export}: its tokenizer ({tok}) is not the one {dataset} was tokenised with; "
            "prepare the fine-tuning data with the pretrained model's tokenizer"
        )


def drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` in a metrics.jsonl (atomically).

    A job killed after its last checkpoint has logged steps that the resumed job trains again;
    without this they would appear twice.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    """Holds the engine, the data stream and the counters; ``run()`` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, parent_run_id: str | None = None, native_bf16: bool | None = None):
        self.cfg = cfg
        self.dims: ParallelDims = init_distributed(cfg.parallel.tp)
        self.rank = dist.get_rank()
        self.device = training_device()
        # ``native_bf16`` overrides the hardware check (tests of the AVX2 decision on any host)
        self.precision: Precision = resolve_precision(cfg.parallel.precision, self.device, native_bf16)
        self.peak_flops, peak_source = peak_flops(self.device, self.precision.torch_dtype, cfg.peak_tflops)
        # The resolved config (every default) plus what was decided for this machine; credentials
        # in tracking.uri never reach the run directory or MLflow.
        self.resolved = redact_config(asdict(cfg))
        self.resolved["runtime"] = {
            "precision": self.precision.dtype,
            "precision_reason": self.precision.reason,
            "peak_flops": self.peak_flops,
            "peak_flops_source": peak_source,
            "device": str(self.device),
        }
        if self.rank == 0:
            print(f"precision: {self.precision.dtype} ({self.precision.reason})", flush=True)
            print(f"MFU peak: {self.peak_flops / 1e12:.3g} TFLOP/s ({peak_source})", flush=True)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.manifest = load_manifest(cfg.data.path)
        verify_manifest(
            self.manifest,
            cfg.data.path,
            vocab_size=cfg.model.vocab_size,
            seq_len=cfg.model.seq_len,
            on_corrupt_shard=cfg.data.on_corrupt_shard,
        )
        if cfg.objective.mode != self.manifest.kind:
            raise ConfigError(
                f"key 'objective.mode': '{cfg.objective.mode}' does not fit the dataset {cfg.data.path}, whose "
                f"manifest says kind '{self.manifest.kind}' (set objective.mode={self.manifest.kind})"
            )
        self.manifest_sha = hashlib.sha256((Path(cfg.data.path) / "manifest.json").read_bytes()).hexdigest()
        ids = self.manifest.special_ids
        self.mask_id, self.pad_id = int(ids["mask"]), int(ids["pad"])
        from pipeline.engine.deepspeed import build_engine

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (and TP size)
        if cfg.init_from:
            _check_init_tokenizer(cfg.init_from, self.manifest.tokenizer_sha256, cfg.data.path)
        self.engine, _, self.scheduler = build_engine(cfg, self._new_model, self.precision)
        self.model = self.engine.module
        self.loader = TokenBatchLoader(cfg.data, rank=dp_rank(), world_size=dp_size())
        self.flops = estimate_flops(cfg.model, cfg.memory)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.inner_skipped_total = 0.0
        self.skipped_shards_total = 0
        self.history: list[dict[str, Any]] = []
        resumed_run_id = None
        if cfg.checkpoint.resume:
            resumed_run_id = self._maybe_resume()
        self.batches = iter(self.loader)
        self.tracker: Tracker | None = None
        if self.rank == 0 and cfg.tracking.enabled:  # only rank 0 talks to MLflow
            self.tracker = Tracker(cfg.tracking, self.run_dir.name)
            tags = {
                "git_commit": git_commit(Path(__file__).resolve().parent),
                "method": cfg.method,
                "world_size": str(self.dims.world),
                "tp": str(self.dims.tp),
                "dp": str(self.dims.dp),
                "run_dir": str(self.run_dir.resolve()),
                "model_params": str(cfg.model.num_params()),
            }
            self.tracker.start(
                flatten(self.resolved), tags, run_id=resumed_run_id, parent_run_id=parent_run_id
            )

    def _new_model(self) -> DLMTransformer:
        """The model, with the ``init_from`` weights when fine-tuning. They are loaded here, before
        DeepSpeed builds its fp32 master copy: weights set after that are overwritten at step 1."""
        model = DLMTransformer(self.cfg.model)
        if self.cfg.init_from:
            from pipeline.engine.export import load_initial_weights

            load_initial_weights(model, self.cfg.init_from, self.cfg.model)
        return model

    # ------------------------------------------------------------ checkpoints
    def _layout(self) -> Layout:
        return Layout(world=self.dims.world, tp=self.dims.tp, dp=self.dims.dp)

    def _maybe_resume(self) -> str | None:
        """Restore from the newest verified checkpoint, if any; returns its MLflow run id.

        A damaged or missing newest checkpoint falls back to the previous complete one with a
        warning, or raises with ``checkpoint.on_damaged=error`` (see pipeline/engine/checkpoint.py)."""
        path = find_resume_checkpoint(self.ckpt_dir, self.cfg.checkpoint.on_damaged)
        if path is None:
            return None
        state = load_checkpoint(self.engine, path, self._layout(), self.manifest_sha)
        self.loader.load_state_dict(state["data"][self.rank][0])
        self.step = state["step"]
        self.nonfinite_total = state["counters"]["nonfinite_total"]
        self.inner_skipped_total = state["counters"]["inner_skipped_total"]
        # corrupt shards all ranks had skipped (older checkpoints: none recorded)
        self.skipped_shards_total = state["counters"].get("skipped_shards_total", 0)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}")
        return state.get("mlflow_run_id")

    def save(self) -> Path:
        state = {
            "config": self.resolved,
            "manifest_sha256": self.manifest_sha,
            "layout": asdict(self._layout()),
            "counters": {
                "nonfinite_total": self.nonfinite_total,
                "inner_skipped_total": self.inner_skipped_total,
                "skipped_shards_total": self.skipped_shards_total,
            },
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }
        return save_checkpoint(
            self.engine, self.ckpt_dir, self.step, state, [self.loader.state_dict()], self.cfg.checkpoint.keep
        )

    # ------------------------------------------------------------ one step
    def _micro_loss(
        self, tokens: torch.Tensor, micro: int, prompt_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        # Noise and pre-anchor masks differ per DP rank (each rank has its own rows); the memory's
        # reset must not: in batch scope the DP-synced inner gradients are only the global
        # batch's gradient if every rank starts from the same phi0.
        g = _generator(self.device, cfg.seed, self.step, micro, dp_rank())
        g_reset = _generator(self.device, cfg.seed, self.step, micro, -1)
        maskable = maskable_positions(tokens, self.pad_id, prompt_mask)  # SFT: never the prompt
        noise = draw_noise(tokens, maskable, cfg.objective, self.mask_id, g)
        stats: dict[str, torch.Tensor] = {"masked": noise.mask.sum()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16):
            if cfg.memory.enabled:
                out = memdlm_loss(
                    self.model,
                    self.engine,
                    tokens,
                    noise,
                    cfg.objective,
                    cfg.memory,
                    self.mask_id,
                    g,
                    dp_group(),
                    reset_generator=g_reset,
                )
                for k, st in enumerate(out.stage_stats):
                    stats[f"inner/stage{k + 1}_loss"] = st.loss
                    stats[f"inner/stage{k + 1}_grad_norm"] = st.grad_norm
                    stats[f"inner/stage{k + 1}_skipped"] = st.skipped
                return out.loss, stats
            return mdlm_loss(self.engine, tokens, noise, cfg.objective, dp_group()), stats

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
        losses, extra, void = [], {}, False
        masked = torch.zeros((), device=self.device)
        for micro in range(self.cfg.grad_accum):
            batch = next(self.batches)  # consumed even in a void step: the data position moves on
            if void:
                continue
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            prompt = batch["prompt_mask"].to(self.device) if "prompt_mask" in batch else None
            loss, stats = self._micro_loss(tokens, micro, prompt)
            finite, skipped_shards = self._agree(bool(torch.isfinite(loss.detach())))
            self._note_skipped_shards(skipped_shards)
            if not finite:
                void = True  # every rank agrees: drop this step's gradients, no update
                continue
            self.engine.backward(loss)
            losses.append(loss.detach())
            masked += stats.pop("masked")
            for k, v in stats.items():
                extra[k] = extra.get(k, 0.0) + v.detach().float()
        if void:
            self._void_step()
        else:
            self.nonfinite_run = 0
            self.engine.step()  # the accumulation boundary: reduce, clip, AdamW, LR schedule
        self.step += 1
        seconds = time.perf_counter() - t0
        tokens_per_step = (
            self.cfg.data.batch_size * self.cfg.model.seq_len * self.cfg.grad_accum * self.dims.dp
        )
        out = {"step": self.step, "seconds": seconds, "tokens_per_s": tokens_per_step / seconds}
        if not void:
            out.update(self._step_metrics(losses, extra, masked, tokens_per_step, seconds))
        out["nonfinite_total"] = self.nonfinite_total
        out["inner_skipped_total"] = self.inner_skipped_total
        out["data/skipped_shards"] = self.skipped_shards_total
        out["peak_memory_mib"] = _peak_memory_mib()
        return out

    def _void_step(self) -> None:
        """A non-finite micro-batch on some rank: no update on any rank, LR follows ``self.step``."""
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        if self.nonfinite_run >= self.cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{self.nonfinite_run} consecutive non-finite losses at step {self.step + 1}; stopping. The last "
                f"good checkpoint is {latest_checkpoint(self.ckpt_dir) or '(none yet)'}"
            )
        # ZeRO's zero_grad restarts its accumulation: the next backward overwrites the partitions.
        self.engine.optimizer.zero_grad()
        self.scheduler.step()

    def _note_skipped_shards(self, total: int) -> None:
        if total > self.skipped_shards_total and self.rank == 0:
            print(
                f"warning: {total - self.skipped_shards_total} corrupt shard(s) skipped at step {self.step + 1} "
                f"({total} so far over all ranks): data-parallel ranks now read different amounts of data",
                file=sys.stderr,
                flush=True,
            )
        self.skipped_shards_total = total

    def _step_metrics(
        self,
        losses: list[torch.Tensor],
        extra: dict[str, torch.Tensor],
        masked: torch.Tensor,
        tokens_per_step: int,
        seconds: float,
    ) -> dict[str, float]:
        """Loss, LR, grad norm, inner stats (mean over micro-batches), FLOP/s and MFU of a step."""
        n = len(losses)
        # Loss mean over micro-batches and DP ranks; masked positions summed over both, so the
        # FLOP count covers the same tokens (the whole step) as tokens_per_step.
        red = torch.cat([torch.stack(losses).sum().reshape(1).float(), masked.reshape(1).float()])
        dist.all_reduce(red, group=dp_group())
        out = {"loss": float(red[0]) / (n * self.dims.dp), "lr": float(self.scheduler.get_last_lr()[0])}
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None else float("nan")
        for k, v in extra.items():
            out[k] = float(v) / n
        self.inner_skipped_total += sum(v for k, v in out.items() if k.endswith("_skipped")) * n
        masked_step = float(red[1])
        flops = self.flops.mdlm_step(tokens_per_step, masked_step)
        if self.cfg.memory.enabled:
            flops += self.flops.memdlm_extra(
                tokens_per_step,
                [min(tokens_per_step, 1.5 * masked_step)] * self.cfg.memory.pre_anchor_steps,
                masked_step,
            )
        out["model_tflops_per_s"] = flops / seconds / 1e12 / self.dims.world
        out["mfu"] = estimate_mfu(flops / seconds / self.dims.world, self.peak_flops)
        return out

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out loss with the memory off; with ``eval.adapt``, also the continuation loss
        after inference-time adaptation on the context only (never on the scored tokens)."""
        cfg, ev = self.cfg, self.cfg.eval
        val = TokenBatchLoader(
            cfg.data, split="val", rank=dp_rank(), world_size=dp_size(), shuffle=False, loop=False
        )
        C = int(cfg.model.seq_len * ev.context_fraction)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # NCCL takes device tensors only
        for i, batch in enumerate(val):
            if i >= ev.batches:
                break
            tokens = batch["tokens"].to(self.device)
            prompt = batch["prompt_mask"].to(self.device) if "prompt_mask" in batch else None
            maskable = maskable_positions(tokens, self.pad_id, prompt)
            # The context the memory may read: the prompt (SFT) or the first C tokens; the
            # continuation scored after adapting is the rest.
            if prompt is not None:
                context = prompt
            else:
                context = (torch.arange(tokens.shape[1], device=tokens.device) < C).expand_as(tokens)
            g = _generator(self.device, cfg.seed, 10**9, i, dp_rank())  # same draws at every evaluation
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16):
                with torch.no_grad():
                    noise = draw_noise(tokens, maskable, cfg.objective, self.mask_id, g)
                    sums[0] += float(mdlm_loss(self.model, tokens, noise, cfg.objective))
                    cnoise = draw_noise(tokens, maskable & ~context, cfg.objective, self.mask_id, g)
                    sums[1] += float(mdlm_loss(self.model, tokens, cnoise, cfg.objective))
                if ev.adapt and cfg.memory.enabled:
                    rows = [
                        _generator(self.device, cfg.seed, 10**9, i, dp_rank(), b)
                        for b in range(tokens.shape[0])
                    ]
                    fast = adapt_to_context(
                        self.model,
                        torch.where(context, tokens, self.pad_id),
                        context & (tokens != self.pad_id),
                        cfg.memory,
                        self.mask_id,
                        generators=rows,
                        init_generator=g,
                        anchor_ratio=ev.anchor_ratio,
                        pre_anchor_ratio=ev.pre_anchor_ratio,
                    )
                    with torch.no_grad():
                        adapted = functools.partial(self.model, fast=fast.by_layer)
                        sums[2] += float(mdlm_loss(adapted, tokens, cnoise, cfg.objective))
            sums[3] += 1
        dist.all_reduce(sums)
        n = max(1.0, float(sums[3]))
        out = {"eval/loss": float(sums[0]) / n, "eval/continuation_loss": float(sums[1]) / n}
        if ev.adapt and cfg.memory.enabled:
            out["eval/continuation_loss_adapted"] = float(sums[2]) / n
        return out

    # ------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train to ``cfg.steps`` (or ``stop_after`` more steps); returns the logged records."""
        cfg = self.cfg
        target = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            drop_records_after(metrics_path, self.step)  # logged past the checkpoint we resumed from
            (self.run_dir / "config.json").write_text(json.dumps(self.resolved, indent=2, sort_keys=True))
            # the dataset this run reads, beside its config (the manifest names tokenizer and shards)
            shutil.copyfile(Path(cfg.data.path) / "manifest.json", self.run_dir / "dataset_manifest.json")
        bar = tqdm(
            total=target,
            initial=self.step,
            desc=cfg.method,
            unit="step",
            disable=self.rank != 0,
            dynamic_ncols=True,
        )
        try:
            while self.step < target:
                if self._stop_requested():
                    self.save()
                    raise StoppedForRequeue(f"stop requested: checkpoint saved at step {self.step}")
                rec = self.train_step()
                bar.update(1)
                if "loss" in rec:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                    rec.update(self.evaluate())
                if (
                    self.step % cfg.log_every == 0
                    or self.step == target
                    or any(k.startswith("eval/") for k in rec)
                ):
                    self.history.append(rec)
                    if self.rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        if self.tracker:
                            self.tracker.log(self.step, rec)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < target:
                    self.save()
            bar.close()
            if self.step >= target:
                self.save()
        except StoppedForRequeue:
            if self.tracker:
                self.tracker.flush()
                self.tracker.end("KILLED")  # reopened as RUNNING by the resumed job
            raise
        except BaseException:
            if self.tracker:
                self.tracker.end("FAILED")
            raise
        if self.tracker:
            self.tracker.flush()
            if self.step >= cfg.steps:
                self.finish_tracking()
        return self.history

    def _stop_requested(self) -> bool:
        flag = torch.tensor([float(STOP_REQUESTED["signal"])], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item() > 0)

    def finish_tracking(self) -> None:
        """Artifacts (resolved config, dataset manifest, loss-curve PNG) and the run's end."""
        assert self.tracker is not None
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        png = plot_loss_curves(
            records, self.run_dir / "loss_curves.png", f"{self.cfg.method}: {self.run_dir.name}"
        )
        manifest = Path(self.cfg.data.path) / "manifest.json"
        self.tracker.log_artifacts([self.run_dir / "config.json", manifest, png])
        self.tracker.end()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/train/local.yaml")
    parser.add_argument("--export", action="store_true", help="write a consolidated export at the end")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        trainer.run()
        if args.export:
            from pipeline.engine.export import export_model

            export_model(
                trainer.engine,
                cfg,
                Path(cfg.run_dir) / "export",
                Path(cfg.data.path) / trainer.manifest.tokenizer_file,
                trainer.manifest.special_ids,
                trainer.step,
            )
    except StoppedForRequeue as exc:
        print(str(exc), flush=True)
        return STOPPED_EXIT
    except (ConfigError, DatasetError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pieces a training run is built from, one ``build_*`` function each (torchtitan's shape).

    runtime = build_runtime(cfg)             # device, precision, MFU peak: decided once, recorded
    data = build_dataset(cfg)                # manifest checked against the config
    tracker = build_tracker(cfg, record, dims, resumed_run_id, parent_run_id)   # rank 0 only

``pipeline/engine/deepspeed.py:build_engine`` builds the engine; ``pipeline/train.py`` joins them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from pipeline.adapters.lora import add_lora, freeze_base, lora_param_count, lora_summary
from pipeline.config import ConfigError
from pipeline.dataset.manifest import DatasetError, Manifest, load_manifest, verify_manifest
from pipeline.dataset.tokenizer import find_tokenizer, load_tokenizer
from pipeline.engine.export import load_initial_weights
from pipeline.families import family_of
from pipeline.families.registry import param_count
from pipeline.hardware.device import training_device
from pipeline.hardware.peak import Peak, peak
from pipeline.hardware.precision import Precision, resolve_precision
from pipeline.parallel.dims import ParallelDims
from pipeline.tracking import (
    Tracker,
    TrackingUnavailable,
    flatten,
    git_commit,
    probe_server,
    redact_config,
    tracking_uri,
    uri_source,
)
from pipeline.train_config import TrainConfig


@dataclass(frozen=True)
class Runtime:
    """What was decided for this machine: printed at start, kept in config.json and MLflow."""

    device: torch.device
    precision: Precision
    peak: Peak  # the MFU denominator (re-measured or raised if a step ever beats it)

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision.dtype,
            "precision_reason": self.precision.reason,
            **self.peak.as_record(),
            "device": str(self.device),
        }


def build_runtime(cfg: TrainConfig, native_bf16: bool | None = None) -> Runtime:
    """Device, precision (``native_bf16`` overrides the hardware check, for tests) and MFU peak."""
    device = training_device()
    precision = resolve_precision(cfg.parallel.precision, device, native_bf16)
    return Runtime(device, precision, peak(device, precision.torch_dtype, cfg.peak_tflops))


def run_record(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """The resolved config (every default, credentials stripped) plus the ``runtime`` decisions."""
    return {**redact_config(asdict(cfg)), "runtime": runtime.as_dict()}


@dataclass(frozen=True)
class DatasetInfo:
    manifest: Manifest
    manifest_sha256: str  # part of every checkpoint: a resume must read the same samples
    mask_id: int
    pad_id: int


def _init_from_tokenizer(init_from: str | None) -> Path | None:
    """The tokenizer file of an ``init_from`` export (an import's ``hf_tokenizer/`` included);
    None when it has none (nothing to compare the dataset's with)."""
    if not init_from:
        return None
    names = ("tokenizer.model", "tokenizer.json", "hf_tokenizer/tokenizer.json")
    if not any((Path(init_from) / name).is_file() for name in names):
        return None
    return find_tokenizer(init_from)  # both kinds side by side: an error naming them


def build_dataset(cfg: TrainConfig) -> DatasetInfo:
    """The dataset's manifest, checked against the model, the objective and ``init_from``."""
    manifest = load_manifest(cfg.data.path)
    verify_manifest(
        manifest,
        cfg.data.path,
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.model.seq_len,
        on_corrupt_shard=cfg.data.on_corrupt_shard,
    )
    if cfg.objective.mode != manifest.kind:
        raise ConfigError(
            f"key 'objective.mode': '{cfg.objective.mode}' does not fit the dataset {cfg.data.path}, whose "
            f"manifest says kind '{manifest.kind}' (set objective.mode={manifest.kind})"
        )
    tok = _init_from_tokenizer(cfg.init_from)
    if tok is not None and load_tokenizer(tok).sha256 != manifest.tokenizer_sha256:
        raise DatasetError(
            f"init_from={cfg.init_from}: its tokenizer ({tok}) is not the one {cfg.data.path} was "
            "tokenised with; prepare the fine-tuning data with the pretrained model's tokenizer"
        )
    sha = hashlib.sha256((Path(cfg.data.path) / "manifest.json").read_bytes()).hexdigest()
    ids = manifest.special_ids
    return DatasetInfo(manifest, sha, int(ids["mask"]), int(ids["pad"]))


def model_factory(cfg: TrainConfig, dims: ParallelDims) -> Callable[[], torch.nn.Module]:
    """Builds the model of ``cfg.model``'s family at ``dims``, with the ``init_from`` weights when
    fine-tuning. They are loaded inside the factory, before DeepSpeed builds its fp32 master copy:
    weights set after that are overwritten at step 1 (measured: 0.13 away, back at the random
    init). With ``lora.enabled`` the adapters are added and every base weight frozen
    (pipeline/adapters/lora.py)."""
    family = family_of(cfg.model)

    def build() -> torch.nn.Module:
        model = family.build(cfg.model, dims)
        if cfg.init_from:
            load_initial_weights(model, cfg.init_from, cfg.model)
        if cfg.lora.enabled:
            # After the base weights are final: the export holds no adapters (merged), a resumed
            # checkpoint restores them. Only the adapters require grad, so only they reach the
            # optimizer (build_engine), ZeRO's gradient partitions and the clip.
            add_lora(model, cfg.lora, cfg.seed)
            freeze_base(model)
            if dims.rank == 0:
                print(lora_summary(cfg.model, cfg.lora), flush=True)
        return model

    return build


def export_tracking_credentials(cfg: TrainConfig) -> None:
    """Credentials written into ``tracking.uri`` move to the variables MLflow reads them from, so
    the URI itself (in config.json, params, checkpoints) never carries them."""
    if not cfg.tracking.uri:
        return
    parts = urlsplit(cfg.tracking.uri)
    if parts.username:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", parts.username)
    if parts.password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", parts.password)


def check_tracking(cfg: TrainConfig) -> None:
    """Probe an http(s) tracking server before anything slow is built (rank 0, with
    ``tracking.on_unreachable: error``): an unreachable one then stops the run after
    ``tracking.connect_timeout_s`` with :class:`TrackingUnavailable`, not after the engine build.
    (``build_tracker`` checks again; with ``offline`` it alone decides.)"""
    tracking = cfg.tracking
    if not tracking.enabled or tracking.on_unreachable != "error" or torch.distributed.get_rank() != 0:
        return
    uri = tracking_uri(tracking, Path(tracking.root))
    if uri.startswith(("http://", "https://")):
        probe_server(uri, tracking.connect_timeout_s, uri_source(tracking))


def _run_tags(cfg: TrainConfig, dims: ParallelDims) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "method": cfg.method,
        "world_size": str(dims.world),
        "tp": str(dims.tp),
        "dp": str(dims.dp),
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "model_params": str(param_count(cfg.model)),
    }
    if cfg.lora.enabled:
        tags["lora_trainable_params"] = str(lora_param_count(cfg.model, cfg.lora))
    return tags


def build_tracker(
    cfg: TrainConfig,
    record: dict[str, Any],
    dims: ParallelDims,
    resumed_run_id: str | None,
    parent_run_id: str | None,
) -> Tracker | None:
    """The MLflow run (created, or reopened after a resume) on rank 0; None elsewhere or when off.

    A store that cannot be reached raises :class:`TrackingUnavailable` (a ConfigError: one
    ``error:`` line), or with ``tracking.on_unreachable: offline`` warns once and returns None
    (the run trains without MLflow; metrics.jsonl has every step)."""
    if torch.distributed.get_rank() != 0 or not cfg.tracking.enabled:
        return None
    export_tracking_credentials(cfg)
    tracking = replace(cfg.tracking, uri=record["tracking"]["uri"])  # without credentials
    try:
        tracker = Tracker(tracking, Path(cfg.run_dir).name)
        tracker.start(
            flatten(record), _run_tags(cfg, dims), run_id=resumed_run_id, parent_run_id=parent_run_id
        )
    except TrackingUnavailable as exc:
        if cfg.tracking.on_unreachable == "error":
            raise
        print(
            f"warning: {exc.problem}; tracking.on_unreachable=offline: training without MLflow, metrics in "
            f"{Path(cfg.run_dir) / 'metrics.jsonl'} only",
            file=sys.stderr,
            flush=True,
        )
        return None
    return tracker

"""The training config tree (``configs/train/*.yaml``): one typed dataclass per section.

    cfg = load_train_config("configs/train/local.yaml", ["optim.lr=1e-3", "memory.enabled=false"])

``model_preset: small`` loads ``configs/model/small.yaml`` under the ``model`` section (keys given
in ``model`` override it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.adapters.lora import LoraConfig
from pipeline.atomic_io import atomic_write_text
from pipeline.config import ConfigError, from_dict, merge, parse_overrides, read_yaml
from pipeline.diffusion.config import ObjectiveConfig
from pipeline.families import family_of
from pipeline.loader.stream import DataConfig
from pipeline.memory.config import MemoryConfig
from pipeline.model.config import ModelConfig
from pipeline.tracking import TrackingConfig, redact_config

MODEL_DIR = Path("configs/model")


def _at_least(key: str, value: int, least: int) -> None:
    if value < least:
        raise ConfigError(f"key '{key}': got {value}, expected >= {least}")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (after warm-up)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    # Warm-up as a fraction of ``steps`` (the paper: 0.1); when set it replaces warmup_steps (a
    # config may name only one of the two).
    warmup_fraction: float | None = None
    weight_decay: float = 0.1  # AdamW decay on matrices (never on norms or biases)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # set explicitly: DeepSpeed 0.19.8 otherwise defaults to 1.0 silently

    def validate(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"optim: lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, grad_clip >= 0 ({self})"
            )
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"key 'optim.warmup_fraction': got {self.warmup_fraction}, expected 0 <= x < 1")

    def warmup_for(self, steps: int) -> int:
        """Warm-up steps of a run of ``steps`` steps: ``warmup_fraction`` of them when set."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return round(self.warmup_fraction * steps)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size; data-parallel size = world / tp
    # Expert-parallel size (a model with experts): the routed experts are split over groups of
    # `ep` data-parallel ranks; everything else stays data-parallel. Must divide the data-parallel
    # size and model.n_experts; changing it keeps the global batch.
    ep: int = 1
    zero_stage: Literal[0, 1, 2, 3] = (
        3  # DeepSpeed ZeRO stage: 3 partitions weights, gradients and optimizer state over DP
    )
    # Parameters smaller than this stay unpartitioned under ZeRO-3 (DeepSpeed default 1e5); tests use 0.
    param_persistence_threshold: int = 100_000
    zero_init: bool = False  # build the model inside zero.Init (partitioned at creation: large models)
    # auto: bf16 where the device multiplies bf16 natively (CUDA, AMX / AVX512-BF16 CPUs), else fp32
    # (pipeline/hardware/precision.py: emulated bf16 on an AVX2-only CPU is ~17x slower than fp32)
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def validate(self) -> None:
        # zero_stage is a Literal: the loader already names it with its allowed values
        _at_least("parallel.tp", self.tp, 1)
        _at_least("parallel.ep", self.ep, 1)
        _at_least("parallel.param_persistence_threshold", self.param_persistence_threshold, 0)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0 = only at the end
    keep: int = 3  # newest checkpoints kept
    resume: bool = True  # continue from the newest checkpoint in the run directory
    # a damaged or missing newest checkpoint: resume from the previous complete one with a
    # warning (fallback), or stop with an error naming the bad file (error)
    on_damaged: Literal["fallback", "error"] = "fallback"
    # Resuming at another TP x DP layout: convert the checkpoint to DeepSpeed's universal format
    # on the fly (auto, logged), or refuse and say to run `make reshard` first (never)
    reshard: Literal["auto", "never"] = "auto"

    def validate(self) -> None:
        _at_least("checkpoint.every", self.every, 0)
        _at_least("checkpoint.keep", self.keep, 1)  # 0 would delete the checkpoint just written


@dataclass
class EvalConfig:
    every: int = 100  # steps; 0 = never
    batches: int = 4  # validation batches per evaluation
    adapt: bool = True  # also evaluate with inference-time adaptation on the context
    context_fraction: float = 0.5  # the first part of each sequence is the context it adapts on
    anchor_ratio: float = 0.2  # spec section 5
    pre_anchor_ratio: float = (
        0.3  # pre-anchor mask ratio of the inference-time adaptation (docs/method.md section 5)
    )

    def validate(self) -> None:
        _at_least("eval.every", self.every, 0)
        _at_least("eval.batches", self.batches, 1)
        if not 0 < self.context_fraction < 1:
            raise ConfigError(f"key 'eval.context_fraction': got {self.context_fraction}, expected 0 < x < 1")
        for key in ("anchor_ratio", "pre_anchor_ratio"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"key 'eval.{key}': got {getattr(self, key)}, expected 0 <= x <= 1")


@dataclass
class TrainConfig:
    run_dir: str = "runs/local"  # where config.json, metrics.jsonl, checkpoints/ and export/ go
    seed: int = 0  # weights, noise, memory resets and data order all derive from it
    steps: int = 200  # optimizer steps of the whole run
    grad_accum: int = 1  # micro-batches per optimizer step on each data-parallel rank
    log_every: int = 10  # steps between records in metrics.jsonl and MLflow
    max_nonfinite_steps: int = 3  # consecutive non-finite losses before the run stops
    # Peak of one device in TFLOP/s for MFU (e.g. 989 for an H100 SXM); 0 = the table of known
    # accelerators, else a time-boxed (<= 1.5 s), cached matmul measurement (pipeline/hardware/peak.py)
    peak_tflops: float = 0.0
    model_preset: str | None = None  # configs/model/<name>.yaml as the model section's defaults
    # Fine-tuning: an export directory (``make pretrain`` writes runs/<run>/export) whose weights
    # start the run; its model config and tokenizer must match. A resumed checkpoint wins over it.
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Outer LoRA on the base weights (the paper's fine-tuning recipe): base frozen, only the
    # adapters trained, merged into the weights on export (pipeline/adapters/lora.py).
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        for key in ("steps", "grad_accum", "log_every", "max_nonfinite_steps"):
            _at_least(key, getattr(self, key), 1)
        if not self.peak_tflops >= 0:
            raise ConfigError(f"key 'peak_tflops': got {self.peak_tflops}, expected >= 0 (0: look it up)")
        self.lora.check_fits(self.model)  # needs the model's sizes: checked here, not in lora
        family = family_of(self.model)
        if self.parallel.ep > 1 and not family.expert_parallel:
            raise ConfigError(
                f"key 'parallel.ep': {self.parallel.ep} needs a model with experts (the '{family.name}' "
                "family has none); use parallel.ep=1"
            )

    @property
    def method(self) -> str:
        return "memdlm" if self.memory.enabled else "mdlm"


def resolve_train_dict(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = merge(data, parse_overrides(list(overrides)))
    parallel = data.get("parallel")
    if isinstance(parallel, dict) and "bf16" in parallel:
        value = parallel["bf16"]
        raise ConfigError(
            f"{path}: key 'parallel.bf16' ({value!r}) was replaced by 'parallel.precision' (auto | bf16 | fp32); "
            f"write parallel.precision={'bf16' if value else 'fp32'}, or auto to follow the hardware"
        )
    optim = data.get("optim")
    if isinstance(optim, dict) and optim.get("warmup_fraction") is not None and "warmup_steps" in optim:
        raise ConfigError(
            f"{path}: keys 'optim.warmup_steps' ({optim['warmup_steps']!r}) and 'optim.warmup_fraction' "
            f"({optim['warmup_fraction']!r}) both set; name one of them"
        )
    preset = data.get("model_preset")
    if preset is not None:
        preset_path = MODEL_DIR / f"{preset}.yaml"
        if not preset_path.is_file():
            known = ", ".join(sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if not p.stem.startswith("_")))
            raise ConfigError(f"{path}: key 'model_preset': no preset '{preset}' (known: {known})")
        data["model"] = merge(read_yaml(preset_path), data.get("model") or {})
    return data


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a training config (YAML + dotted overrides), resolving ``model_preset``."""
    source = f"{path}{' + overrides' if overrides else ''}"
    return from_dict(TrainConfig, resolve_train_dict(path, overrides), source)


def load_resolved_config(path: str | Path) -> TrainConfig:
    """Load a resolved config (``<run_dir>/config.json``, written by the launcher) exactly as it is.

    No preset, no overrides: every value is in the file. Its ``runtime`` section records what an
    earlier start decided on its machine (precision, peak) and is not an input.
    """

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the resolved config ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    data.pop("runtime", None)
    return from_dict(TrainConfig, data, str(path))


def write_resolved_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write ``cfg`` with every default as JSON (atomically): the file the job loads."""

    return atomic_write_text(
        Path(path), json.dumps(redact_config(asdict(cfg)), indent=2, sort_keys=True) + "\n"
    )

"""MemDLM's memory settings (``memory:`` in a training config), with the spec's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import ConfigError
from pipeline.families.registry import family_of
from pipeline.memory.fast_weights import FastWeightSpec, FastWeightTarget
from pipeline.model.config import ModelConfig


@dataclass
class MemoryConfig:
    """MemDLM's parametric memory; ``enabled: false`` trains plain MDLM."""

    enabled: bool = False  # MemDLM (true) or plain MDLM (false)
    rank: int = 32  # LoRA rank r of every fast weight
    alpha: float = 64.0  # LoRA scale alpha (the delta is alpha / r * B A x)
    layer_fraction: float = 0.1  # fast weights on the last 10 % of layers
    targets: Literal["ffn", "ffn+attn"] = (
        "ffn"  # which projections carry fast weights (the family names them: ffn = gate/up/down)
    )
    adapter: Literal["lora", "full"] = "lora"  # low-rank fast weights, or full-matrix deltas (an ablation)
    # batch: one memory per global batch (inner grads summed over DP ranks when sync_dp);
    # sample: one memory per sequence (batched low-rank products).
    scope: Literal["batch", "sample"] = "batch"
    sync_dp: bool = (
        True  # sum inner gradients over data-parallel ranks (batch scope): one memory per global batch
    )
    inner_lr: float = 0.1  # SGD step of the inner loop
    clip_norm: float = 1.0  # per tensor (per sample in sample scope)
    pre_anchor_scale: float = 1.5  # stage-1 masked fraction = scale x the anchor's (capped at 1)
    pre_anchor_steps: int = 1  # stage-1 steps, most noisy first (scale**k x the anchor ratio)
    anchor_step: bool = True  # stage 2
    inner_loss: Literal["ce", "logit_kl", "reverse_kl", "hidden_cos", "hidden_mse"] = (
        "ce"  # the inner loop's loss (ce; the others are the paper's ablations)
    )
    inner_weighting: Literal["elbo", "uniform"] = (
        "elbo"  # weights of the inner losses: w(rho) as the outer loss, or 1
    )
    # Recompute the memory layers in backward; null = automatic: on for models of >= 1B parameters.
    checkpoint: bool | None = None

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"key 'memory.rank': got {self.rank}, expected >= 1")
        if not 0.0 < self.layer_fraction <= 1.0:
            raise ConfigError(f"key 'memory.layer_fraction': got {self.layer_fraction}, expected 0 < x <= 1")
        if self.pre_anchor_scale < 1.0:
            raise ConfigError(f"key 'memory.pre_anchor_scale': got {self.pre_anchor_scale}, expected >= 1")
        if self.pre_anchor_steps < 0:
            raise ConfigError(f"key 'memory.pre_anchor_steps': got {self.pre_anchor_steps}, expected >= 0")
        if self.clip_norm <= 0 or self.inner_lr < 0:
            raise ConfigError("keys 'memory.clip_norm' (> 0) and 'memory.inner_lr' (>= 0) out of range")

    def use_checkpoint(self, model_params: int) -> bool:
        return self.checkpoint if self.checkpoint is not None else model_params >= 1_000_000_000

    def spec_for(self, model: ModelConfig) -> FastWeightSpec:
        """The fast-weight layout for a model config: the last ``layer_fraction`` of its layers and,
        in each, the projections ``targets`` names in its family, with their shapes and TP split."""
        family = family_of(model)
        layers = family.layer_shapes(model)
        first = FastWeightSpec.first_memory_layer(len(layers), self.layer_fraction)
        if self.targets not in family.fast_weight_targets:
            raise ConfigError(
                f"key 'memory.targets': '{self.targets}' names no projections of the '{family.name}' family "
                f"(it has: {', '.join(sorted(family.fast_weight_targets))})"
            )
        names = family.fast_weight_targets[self.targets]
        targets = []
        for i in range(first, len(layers)):
            chosen = [p for p in layers[i].projections if p.name in names]
            if any(p.parallel == "replicated" for p in chosen):
                raise ConfigError(f"key 'memory.targets': '{self.targets}' names a projection that no "
                                  "fast weight can adapt (a replicated one)")  # fmt: skip
            targets.append(
                tuple(
                    FastWeightTarget(p.name, p.out_features, p.in_features, p.parallel, p.copies)
                    for p in chosen
                )
            )
        return FastWeightSpec(
            layers=tuple(range(first, len(layers))),
            targets=tuple(targets),
            adapter=self.adapter,
            rank=self.rank,
            alpha=self.alpha,
        )

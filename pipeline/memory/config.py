"""MemDLM's memory settings (``memory:`` in a training config), with the spec's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import ConfigError
from pipeline.memory.fast_weights import TARGETS, FastWeightSpec


@dataclass
class MemoryConfig:
    """MemDLM's parametric memory; ``enabled: false`` trains plain MDLM."""

    enabled: bool = False
    rank: int = 32
    alpha: float = 64.0
    layer_fraction: float = 0.1  # fast weights on the last 10 % of layers
    targets: Literal["ffn", "ffn+attn"] = "ffn"
    adapter: Literal["lora", "full"] = "lora"
    # batch: one memory per global batch (inner grads summed over DP ranks when sync_dp);
    # sample: one memory per sequence (batched low-rank products).
    scope: Literal["batch", "sample"] = "batch"
    sync_dp: bool = True
    inner_lr: float = 0.1
    clip_norm: float = 1.0  # per tensor (per sample in sample scope)
    pre_anchor_scale: float = 1.5
    pre_anchor_steps: int = 1  # stage-1 steps, most noisy first (scale**k x the anchor ratio)
    anchor_step: bool = True  # stage 2
    inner_loss: Literal["ce", "logit_kl", "reverse_kl", "hidden_cos", "hidden_mse"] = "ce"
    inner_weighting: Literal["elbo", "uniform"] = "elbo"
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

    def spec_for(self, model) -> FastWeightSpec:
        """The fast-weight layout for a model config (its layers, widths and fused-QKV rows)."""
        return self.spec(model.n_layers, model.d_model, model.ffn_hidden, model.qkv_size)

    def spec(
        self, n_layers: int, d_model: int, ffn_hidden: int, qkv_size: int | None = None
    ) -> FastWeightSpec:
        first = FastWeightSpec.first_memory_layer(n_layers, self.layer_fraction)
        return FastWeightSpec(
            layers=tuple(range(first, n_layers)),
            targets=TARGETS[self.targets],
            adapter=self.adapter,
            rank=self.rank,
            alpha=self.alpha,
            d_model=d_model,
            ffn_hidden=ffn_hidden,
            qkv_size=qkv_size,
        )

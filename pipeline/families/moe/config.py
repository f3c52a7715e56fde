"""The mixture-of-experts family's config: the dense keys plus routing, experts and balancing.

One schema covers the published MoE diffusion and autoregressive layouts we map: LLaDA2 MoE
(sigmoid scores, a score-correction bias, group-limited top-k, shared experts, a dense first
layer), LLaDA-MoE / OLMoE and Qwen3-MoE (softmax top-k), Qwen2-MoE (a gated shared expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig


@dataclass
class MoEConfig(ModelConfig):
    family: str = "moe"
    n_experts: int = 8  # routed experts E
    top_k: int = 2  # routed experts per token
    moe_ffn_hidden: int = 256  # SwiGLU inner width of one routed expert
    n_shared_experts: int = 0  # experts every token passes through (one SwiGLU of their joint width)
    shared_ffn_hidden: int | None = None  # the shared MLP's width; null = n_shared_experts x moe_ffn_hidden
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared output is scaled by sigmoid(g . x)
    first_k_dense_replace: int = 0  # the first k layers use the dense FFN (ffn_hidden wide)
    # Layer i >= first_k_dense_replace is a MoE layer iff (i + 1) % decoder_sparse_step == 0.
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)  # layers that use the dense FFN
    score_func: Literal["softmax", "sigmoid"] = "softmax"  # router scores from its logits (fp32)
    norm_topk_prob: bool = False  # renormalise the chosen experts' scores to sum 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    # Group-limited routing (DeepSeek-V3, LLaDA2): the experts form n_group contiguous groups and
    # each token chooses only among the topk_group best groups (a group's score: group_score).
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    # Auxiliary-loss-free balancing: a bias [E] added to the scores for the choice only, moved after
    # every optimizer step by score_bias_rate towards the mean load (outside the gradient).
    score_bias: bool = False
    score_bias_rate: float = 0.001
    # LLaDA-MoE: the biased scores of the chosen experts are also their weights
    score_bias_in_weights: bool = False
    aux_loss_coef: float = 0.0  # load-balance loss weight (0: off)
    z_loss_coef: float = 0.0  # router z-loss weight (0: off)

    def validate(self) -> None:
        super().validate()
        for key in ("n_experts", "top_k", "moe_ffn_hidden", "decoder_sparse_step", "n_group", "topk_group"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'model.{key}': got {getattr(self, key)}, expected >= 1")
        for key in ("n_shared_experts", "first_k_dense_replace"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key 'model.{key}': got {getattr(self, key)}, expected >= 0")
        for key in ("score_bias_rate", "aux_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key 'model.{key}': got {getattr(self, key)}, expected >= 0")
        if not self.routed_scaling_factor > 0:
            raise ConfigError(
                f"key 'model.routed_scaling_factor': got {self.routed_scaling_factor}, expected > 0"
            )
        if self.top_k > self.n_experts:
            raise ConfigError(f"key 'model.top_k': got {self.top_k}, expected <= n_experts={self.n_experts}")
        self._validate_groups()
        if self.shared_ffn_hidden is not None and self.shared_ffn_hidden < 1:
            raise ConfigError(f"key 'model.shared_ffn_hidden': got {self.shared_ffn_hidden}, expected >= 1")
        if self.shared_ffn_hidden is not None and not self.n_shared_experts:
            raise ConfigError("key 'model.shared_ffn_hidden': set, but n_shared_experts is 0")
        if self.score_bias_in_weights and not self.score_bias:
            raise ConfigError("key 'model.score_bias_in_weights': set, but score_bias is false")
        if self.shared_expert_gate and not self.shared_hidden:
            raise ConfigError("key 'model.shared_expert_gate': set, but the model has no shared experts")
        for i, layer in enumerate(self.mlp_only_layers):
            if not 0 <= layer < self.n_layers:
                raise ConfigError(
                    f"key 'model.mlp_only_layers[{i}]': got {layer}, expected a layer in 0..{self.n_layers - 1}"
                )
        if not self.moe_layers():
            raise ConfigError(
                "keys 'model.first_k_dense_replace', 'model.decoder_sparse_step', 'model.mlp_only_layers': "
                "no layer is left a mixture of experts (use the dense family)"
            )

    def _validate_groups(self) -> None:
        E, G = self.n_experts, self.n_group
        if E % G:
            raise ConfigError(f"key 'model.n_group': {G} does not divide n_experts={E}")
        if self.topk_group > G:
            raise ConfigError(f"key 'model.topk_group': got {self.topk_group}, expected <= n_group={G}")
        if G > 1 and self.group_score == "top2_sum" and E // G < 2:
            raise ConfigError(
                f"key 'model.group_score': top2_sum needs >= 2 experts per group (n_experts={E}, n_group={G})"
            )
        if G > 1 and self.top_k > self.topk_group * (E // G):
            raise ConfigError(
                f"key 'model.top_k': {self.top_k} experts cannot be chosen from topk_group={self.topk_group} "
                f"groups of {E // G}"
            )

    @property
    def shared_hidden(self) -> int:
        """Inner width of the shared-expert MLP (0: none)."""
        if not self.n_shared_experts:
            return 0
        return self.shared_ffn_hidden or self.n_shared_experts * self.moe_ffn_hidden

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` has the mixture of experts (else the dense SwiGLU FFN)."""
        return (
            i >= self.first_k_dense_replace
            and (i + 1) % self.decoder_sparse_step == 0
            and i not in self.mlp_only_layers
        )

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

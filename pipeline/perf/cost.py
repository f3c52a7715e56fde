"""The one cost model: parameters and training FLOPs per step, for every family and objective.

    cost = model_cost(cfg.model)                             # from the family's layer shapes
    cost.params_total, cost.params_active                    # DRY_RUN, tags, MFU
    work = StepWork(tokens=B*T, loss_positions=masked, stage_positions=[p1], anchor_positions=masked)
    flops = step_flops(cost, work, memory=cfg.memory, lora=cfg.lora)   # MFU, bench, docs

Conventions (model FLOPs, as MFU counts them): 2 FLOPs per multiply-add, matmuls only (norms,
softmax, RoPE, routing arithmetic are noise); no recomputation counted (activation checkpointing
costs time, not model FLOPs). Attention is bidirectional: every query attends to all ``seq_len``
keys, ``4 T H hd`` per token forward, twice that backward.

A training pass is ``forward + input gradients + weight gradients``. Input gradients cost what
the forward does for projections and twice it for attention; weight gradients cost the forward
of every *trainable* projection (all of them when pretraining; none of the frozen base under outer
LoRA, where only the adapters' own gradients are paid). The LM head runs at the loss positions
only.

MemDLM adds, per inner stage (spec sections 3-4): the layers below the memory without autograd
(pre-anchor stages only: stage 2 shares the anchor's pass with the outer loss), the memory layers
with the fast-weight adapters, the head at that stage's loss positions, and a backward that only
the fast weights need: input gradients through the head and every memory layer but the lowest, in
the lowest only through what lies between the adapted projections and the layer's output, plus the
adapters' own gradients. The outer pass also runs the adapters (forward and input backward). The
stage positions are the objective's exact counts (``scale**j`` pre-anchor masks), never estimated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.families import family_of
from pipeline.families.registry import LayerShape, Projection
from pipeline.memory.fast_weights import FastWeightSpec
from pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class ModelCost:
    """What the FLOP and memory models need to know about one model config."""

    layers: tuple[LayerShape, ...]
    seq_len: int
    d_model: int
    padded_vocab: int
    tie_embeddings: bool
    fast_weight_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def params_total(self) -> int:
        """Every parameter of the unsharded model (padded vocabulary included; as
        :func:`pipeline.families.registry.param_count` counts them)."""
        embed = self.padded_vocab * self.d_model
        head = 0 if self.tie_embeddings else embed
        return sum(layer.params for layer in self.layers) + embed + head + self.d_model  # + final norm

    @property
    def params_active(self) -> int:
        """Parameters one token passes through (a routed projection counts its top-k experts)."""
        total = self.params_total
        for layer in self.layers:
            for p in layer.projections:
                total -= p.params - round(p.in_features * p.out_features * min(p.copies, p.tokens * p.copies))
        return total

    def layer_forward(self, i: int, seq_len: int | None = None) -> float:
        """Forward FLOPs of one token through block ``i`` (projections + attention)."""
        layer = self.layers[i]
        return sum(p.flops_per_token for p in layer.projections) + layer.attention_flops_per_token(
            seq_len or self.seq_len
        )

    def layer_input_backward(self, i: int, seq_len: int | None = None) -> float:
        """Input-gradient FLOPs of one token back through block ``i``."""
        layer = self.layers[i]
        return sum(p.flops_per_token for p in layer.projections) + 2 * layer.attention_flops_per_token(
            seq_len or self.seq_len
        )

    def layer_weight_backward(self, i: int) -> float:
        """Weight-gradient FLOPs of one token for block ``i``'s projections."""
        return sum(p.flops_per_token for p in self.layers[i].projections)

    @property
    def head_forward(self) -> float:
        """The LM head at one position."""
        return 2.0 * self.d_model * self.padded_vocab

    def projections(self, i: int, names: Sequence[str]) -> list[Projection]:
        """Block ``i``'s projections among ``names`` (a layer has the FFN of its kind only: a
        dense SwiGLU, or experts and shared experts)."""
        return [p for p in self.layers[i].projections if p.name in names]


def model_cost(cfg: ModelConfig, seq_len: int | None = None) -> ModelCost:
    """The cost view of ``cfg`` (its family's layer shapes) at ``seq_len`` (default: the model's)."""
    family = family_of(cfg)
    return ModelCost(
        layers=tuple(family.layer_shapes(cfg)),
        seq_len=seq_len or cfg.seq_len,
        d_model=cfg.d_model,
        padded_vocab=cfg.padded_vocab_size,
        tie_embeddings=cfg.tie_embeddings,
        fast_weight_targets=dict(family.fast_weight_targets),
    )


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step computed, summed over its micro-batches (and data-parallel ranks
    when the step's FLOPs are wanted for all of them): tokens through the model, outer loss
    positions, and MemDLM's inner loss positions per pre-anchor stage and at the anchor."""

    tokens: float
    loss_positions: float
    stage_positions: tuple[float, ...] = ()  # pre-anchor stages, most noisy first
    anchor_positions: float | None = None  # stage 2 (None: no anchor stage)


def adapter_forward(proj: Projection, rank: int | None) -> float:
    """Forward FLOPs per token of a low-rank (``rank``) or full (None) delta on ``proj``."""
    per_pass = 2.0 * (
        rank * (proj.in_features + proj.out_features) if rank else proj.in_features * proj.out_features
    )
    return per_pass * proj.tokens * proj.copies


def _lora_per_layer(cost: ModelCost, lora) -> list[float]:
    """Outer LoRA adapters' forward FLOPs per token, per layer (0 when off)."""
    if lora is None or not lora.enabled:
        return [0.0] * len(cost.layers)
    return [
        sum(adapter_forward(p, lora.rank) for p in cost.projections(i, lora.targets))
        for i in range(len(cost.layers))
    ]


def outer_flops(cost: ModelCost, work: StepWork, lora=None) -> float:
    """Forward + backward of the training pass (MDLM's whole step, MemDLM's outer pass) over
    ``work.tokens`` with the head at ``work.loss_positions``."""
    n, tok, pos = len(cost.layers), work.tokens, work.loss_positions
    lora_layer = _lora_per_layer(cost, lora)
    base_trainable = lora is None or not lora.enabled
    fwd = tok * sum(cost.layer_forward(i) + lora_layer[i] for i in range(n)) + pos * cost.head_forward
    grad_in = (
        tok * sum(cost.layer_input_backward(i) + lora_layer[i] for i in range(n)) + pos * cost.head_forward
    )
    grad_w = tok * sum(lora_layer)  # the adapters' own gradients
    if base_trainable:
        grad_w += tok * sum(cost.layer_weight_backward(i) for i in range(n)) + pos * cost.head_forward
    return fwd + grad_in + grad_w


def _lowest_memory_backward(cost: ModelCost, first: int, targets: Sequence[str]) -> float:
    """Input gradients inside the lowest memory layer, per token: only what lies above the first
    adapted projection. FFN targets: the down projections (the output of gate/up reaches the loss
    through them; a MoE layer's routed and shared ``down``); with attention targets, the whole block."""
    if all(name.rsplit(".", 1)[-1] in ("gate", "up", "down") for name in targets):
        downs = [p for p in cost.layers[first].projections if p.name.rsplit(".", 1)[-1] == "down"]
        return sum(p.flops_per_token for p in downs)
    return cost.layer_input_backward(first)


def memdlm_inner_flops(cost: ModelCost, work: StepWork, memory, lora=None) -> float:
    """MemDLM's inner loop on top of the outer pass (module docstring): every stage, plus the
    adapters the outer pass runs in the memory layers."""
    n = len(cost.layers)
    first = FastWeightSpec.first_memory_layer(n, memory.layer_fraction)
    mem_layers = list(range(first, n))
    targets = cost.fast_weight_targets[memory.targets]
    rank = memory.rank if memory.adapter == "lora" else None
    fast = {i: sum(adapter_forward(p, rank) for p in cost.projections(i, targets)) for i in mem_layers}
    lora_layer = _lora_per_layer(cost, lora)
    tok = work.tokens
    upper = [i for i in mem_layers if i != first]
    stage_fwd = tok * sum(cost.layer_forward(i) + fast[i] + lora_layer[i] for i in mem_layers)
    stage_bwd = tok * (
        sum(cost.layer_input_backward(i) + lora_layer[i] for i in upper)
        + _lowest_memory_backward(cost, first, targets)
        + 2 * sum(fast.values())  # the adapters' input and weight gradients
    )
    below = tok * sum(cost.layer_forward(i) + lora_layer[i] for i in range(first))
    total = 0.0
    for positions in work.stage_positions:
        total += below + stage_fwd + stage_bwd + 2 * positions * cost.head_forward
    if work.anchor_positions is not None:
        total += stage_fwd + stage_bwd + 2 * work.anchor_positions * cost.head_forward
    return total + 2 * tok * sum(fast.values())


def step_flops(cost: ModelCost, work: StepWork, memory=None, lora=None) -> float:
    """Model FLOPs of one training step: the outer pass, plus MemDLM's inner loop when ``memory``
    is enabled."""
    flops = outer_flops(cost, work, lora)
    if memory is not None and memory.enabled:
        flops += memdlm_inner_flops(cost, work, memory, lora)
    return flops


def expected_step_work(tokens: float, memory=None, mask_fraction: float = 0.5) -> StepWork:
    """The work of a step over ``tokens`` before it runs: ``mask_fraction`` of them masked (0.5:
    the mean of the linear schedule), each pre-anchor stage ``pre_anchor_scale`` times more
    (capped at all), the anchor stage at the anchor's positions."""
    loss = tokens * mask_fraction
    if memory is None or not memory.enabled:
        return StepWork(tokens, loss)
    k = memory.pre_anchor_steps
    stages = tuple(
        tokens * min(1.0, mask_fraction * memory.pre_anchor_scale ** (k - j)) for j in range(k)
    )  # most noisy first
    return StepWork(tokens, loss, stages, loss if memory.anchor_step else None)


def estimate_mfu(flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved / peak (the caller guarantees a peak that is not stale;
    pipeline/hardware/peak.py)."""
    return flops_per_s / peak_flops_per_s

"""The objective protocol: MDLM, MemDLM and SFT behind one call.

    objective = build_objective(cfg, mask_id=..., pad_id=...)
    out = objective(model, forward, Batch(tokens, prompt_mask), Draws(noise=g, reset=g_reset),
                    dp_group=dp_group, measure=log_this_step)
    out.loss            # backward this (through ``forward``, a DeepSpeed engine or the module)
    out.stats           # what the step logs (inner-loop numbers, the memory's gain)
    out.work            # loss-position counts the cost model turns into FLOPs (objective.flops)

``model`` is the bare module (MemDLM's inner passes run through it, never through the engine's
hooks); ``forward`` computes everything the outer gradient flows through (the engine in training,
the module itself in evaluation and benchmarks). The trainer, held-out evaluation and the
benchmarks all call objectives this way: there is one call site per use, not one copy of the loss
branch per caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.noise import Noise, draw_noise, maskable_positions
from pipeline.perf.cost import ModelCost, StepWork, outer_flops


@dataclass
class Batch:
    """One micro-batch as an objective sees it."""

    tokens: torch.Tensor  # [B, T] clean token ids
    prompt_mask: torch.Tensor | None = None  # [B, T] True = prompt (SFT data)
    # [B, T] bool: only these positions may be masked and scored (evaluation's continuation)
    region: torch.Tensor | None = None


@dataclass
class Draws:
    """Where an objective's randomness comes from: ``noise`` draws the anchor (t and mask) and
    MemDLM's pre-anchor masks; ``reset`` draws the memory's fresh state (default: ``noise``)."""

    noise: torch.Generator
    reset: torch.Generator | None = None


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: what backward runs on
    noise: Noise  # the anchor draw (evaluation reuses it with an adapted memory)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # Counts (tensors) the cost model needs: "loss_positions", MemDLM's "stage{k}_positions"
    # and "anchor_positions". Summed over micro-batches and ranks, they become a StepWork.
    work: dict[str, torch.Tensor] = field(default_factory=dict)


Forward = Callable[..., torch.Tensor]


class Objective(ABC):
    """One training objective. Subclasses implement :meth:`loss` and :meth:`flops`."""

    name: str = "objective"

    def __init__(self, cfg: ObjectiveConfig, mask_id: int, pad_id: int):
        self.cfg, self.mask_id, self.pad_id = cfg, mask_id, pad_id

    def maskable(self, batch: Batch) -> torch.Tensor:
        """[B, T] bool: positions the forward process may mask (non-padding, inside ``region``)."""
        maskable = maskable_positions(batch.tokens, self.pad_id, batch.prompt_mask)
        return maskable if batch.region is None else maskable & batch.region

    def draw(self, batch: Batch, draws: Draws) -> Noise:
        """The anchor: ``t`` per sequence and the mask over :meth:`maskable` positions."""
        return draw_noise(batch.tokens, self.maskable(batch), self.cfg, self.mask_id, draws.noise)

    def __call__(
        self,
        model: torch.nn.Module,
        forward: Forward,
        batch: Batch,
        draws: Draws,
        *,
        dp_group: dist.ProcessGroup | None = None,
        measure: bool = False,
        noise: Noise | None = None,
    ) -> ObjectiveOutput:
        """The loss of one micro-batch (``noise`` given: that anchor, instead of a new draw)."""
        noise = self.draw(batch, draws) if noise is None else noise
        out = self.loss(model, forward, batch, noise, draws, dp_group=dp_group, measure=measure)
        out.work.setdefault("loss_positions", noise.mask.sum())
        return out

    @abstractmethod
    def loss(
        self,
        model: torch.nn.Module,
        forward: Forward,
        batch: Batch,
        noise: Noise,
        draws: Draws,
        *,
        dp_group: dist.ProcessGroup | None,
        measure: bool,
    ) -> ObjectiveOutput:
        """The loss given the anchor ``noise``."""

    def step_work(self, tokens: float, work: dict[str, float]) -> StepWork:
        """The cost model's view of a step that computed ``tokens`` with these summed counts."""
        return StepWork(tokens=tokens, loss_positions=work["loss_positions"])

    def flops(self, cost: ModelCost, work: StepWork, lora=None) -> float:
        """Model FLOPs of a step of this objective (pipeline/perf/cost.py)."""
        return outer_flops(cost, work, lora)

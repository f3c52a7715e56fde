"""Supervised fine-tuning (docs/method.md section 1): MDLM or MemDLM on (prompt, response) rows whose
prompt is never masked and never scored. Wraps either objective: only *which positions are
maskable* changes, so the memory's inner loop adapts on response positions too."""

from __future__ import annotations

import torch

from pipeline.diffusion.noise import Noise
from pipeline.objectives.base import Batch, Objective, ObjectiveOutput


class SFTDataError(ValueError):
    """An SFT objective got a batch without its prompt mask (a pretraining dataset)."""


class SFT(Objective):
    def __init__(self, base: Objective):
        super().__init__(base.cfg, base.mask_id, base.pad_id)
        self.base = base
        self.name = f"{base.name}+sft"

    def maskable(self, batch: Batch) -> torch.Tensor:
        if batch.prompt_mask is None:
            raise SFTDataError(
                "objective.mode=sft needs (prompt, response) rows with a prompt mask; this batch has none "
                "(a pretraining dataset: set objective.mode=pretrain, or prepare SFT data)"
            )
        return self.base.maskable(batch)  # non-padding minus the prompt, inside the region

    def loss(
        self, model, forward, batch: Batch, noise: Noise, draws, *, dp_group, measure
    ) -> ObjectiveOutput:
        return self.base.loss(model, forward, batch, noise, draws, dp_group=dp_group, measure=measure)

    def step_work(self, tokens, work):
        return self.base.step_work(tokens, work)

    def flops(self, cost, work, lora=None):
        return self.base.flops(cost, work, lora)

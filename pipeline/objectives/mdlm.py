"""MDLM, the baseline objective (docs/method.md section 1): one forward of the anchor, the weighted
cross-entropy at its masked positions."""

from __future__ import annotations

import torch.distributed as dist

from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import Noise
from pipeline.objectives.base import Batch, Draws, Forward, Objective, ObjectiveOutput


class MDLM(Objective):
    name = "mdlm"

    def loss(
        self,
        model,
        forward: Forward,
        batch: Batch,
        noise: Noise,
        draws: Draws,
        *,
        dp_group: dist.ProcessGroup | None,
        measure: bool,
    ) -> ObjectiveOutput:
        return ObjectiveOutput(loss=mdlm_loss(forward, batch.tokens, noise, self.cfg, dp_group), noise=noise)

"""MemDLM (docs/method.md sections 2-4): the anchor drawn as MDLM draws it, the two-stage inner loop
writing a fresh memory (pipeline/memory/inner_loop.py), then the outer MDLM loss with it. Its
ablations are settings of its ``memory`` config (targets, adapter, scope, stages, inner loss)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.noise import Noise
from pipeline.memory.config import MemoryConfig
from pipeline.memory.inner_loop import memdlm_loss
from pipeline.objectives.base import Batch, Draws, Forward, Objective, ObjectiveOutput
from pipeline.perf.cost import ModelCost, StepWork, memdlm_inner_flops, outer_flops

INNER_STATS = ("loss", "grad_norm", "skipped", "update_norm", "clipped_frac")


class MemDLM(Objective):
    name = "memdlm"

    def __init__(self, cfg: ObjectiveConfig, memory: MemoryConfig, mask_id: int, pad_id: int):
        super().__init__(cfg, mask_id, pad_id)
        self.memory = memory

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
        out = memdlm_loss(
            model, forward, batch.tokens, noise, self.cfg, self.memory, self.mask_id, draws.noise, dp_group,
            reset_generator=draws.reset, measure=measure,
        )  # fmt: skip
        stats: dict[str, torch.Tensor] = {}
        for k, st in enumerate(out.stage_stats):
            values = (st.loss, st.grad_norm, st.skipped, st.update_norm, st.clipped)
            for name, value in zip(INNER_STATS, values, strict=True):
                stats[f"inner/stage{k + 1}_{name}"] = value
        if out.gain is not None:
            stats["memory/gain"] = out.gain
            stats["memory/loss_phi0"] = out.loss_phi0
        work = {f"stage{k + 1}_positions": st.positions for k, st in enumerate(out.stage_stats)}
        return ObjectiveOutput(loss=out.loss, noise=noise, stats=stats, work=work)

    def _stages(self) -> tuple[int, bool]:
        """(pre-anchor stages, whether the anchor stage runs)."""
        return self.memory.pre_anchor_steps, self.memory.anchor_step

    def step_work(self, tokens: float, work: dict[str, float]) -> StepWork:
        pre, anchor = self._stages()
        return StepWork(
            tokens=tokens,
            loss_positions=work["loss_positions"],
            stage_positions=tuple(work[f"stage{k + 1}_positions"] for k in range(pre)),
            anchor_positions=work[f"stage{pre + 1}_positions"] if anchor else None,
        )

    def flops(self, cost: ModelCost, work: StepWork, lora=None) -> float:
        return outer_flops(cost, work, lora) + memdlm_inner_flops(cost, work, self.memory, lora)

"""Training objectives behind one protocol (pipeline/objectives/base.py): MDLM, MemDLM, SFT."""

from __future__ import annotations

from pipeline.objectives.base import Batch, Draws, Objective, ObjectiveOutput
from pipeline.objectives.mdlm import MDLM
from pipeline.objectives.memdlm import MemDLM
from pipeline.objectives.sft import SFT, SFTDataError

__all__ = [
    "MDLM",
    "SFT",
    "Batch",
    "Draws",
    "MemDLM",
    "Objective",
    "ObjectiveOutput",
    "SFTDataError",
    "build_objective",
]


def build_objective(
    objective_cfg, memory_cfg, mask_id: int, pad_id: int, *, memory: bool | None = None
) -> Objective:
    """MemDLM when the memory is enabled (``memory`` overrides that), else MDLM; wrapped in SFT
    for ``objective.mode: sft``."""
    use_memory = memory_cfg.enabled if memory is None else memory
    base = (
        MemDLM(objective_cfg, memory_cfg, mask_id, pad_id)
        if use_memory
        else MDLM(objective_cfg, mask_id, pad_id)
    )
    return SFT(base) if objective_cfg.mode == "sft" else base

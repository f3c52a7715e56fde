"""The ``objective:`` section of a training config: the forward process and the outer loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import ConfigError


@dataclass
class ObjectiveConfig:
    schedule: Literal["linear", "cosine"] = "linear"  # alpha(t): 1 - t, or cos(pi t / 2)
    weighting: Literal["elbo", "uniform"] = "elbo"  # elbo: w(t) = -alpha'(t) / (1 - alpha(t))
    # token: / maskable tokens of the global batch; sequence: mean over sequences of their
    # per-maskable-token loss; batch: / number of sequences.
    normalization: Literal["token", "sequence", "batch"] = "token"
    eps: float = 1e-3  # t ~ U(eps, 1)
    mode: Literal["pretrain", "sft"] = (
        "pretrain"  # sft: the prompt is never masked nor scored (the dataset must be an SFT one)
    )

    def validate(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"key 'objective.eps': got {self.eps}, expected 0 < eps < 1")

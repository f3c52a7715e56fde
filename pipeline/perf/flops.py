"""FLOPs of the DLM, for MFU: forward per token, the LM head per loss position, and MemDLM's extra.

    est = estimate_flops(model_cfg, memory_cfg)
    est.mdlm_step(tokens=B*T, head_positions=masked)            # fwd + bwd of one MDLM step
    est.memdlm_extra(tokens=B*T, pre_positions=[...], anchor_positions=masked)

Counts multiply-adds as 2 FLOPs, matmuls only (norms, softmax, RoPE are noise at these sizes).
Attention is bidirectional, so every token attends to all T positions: 4*T*d per token per
layer (scores and the weighted sum), not half of it as a causal count would give.
Backward costs twice the forward; MemDLM's inner passes need gradients for the fast weights
only (base weights are frozen there), which :meth:`FlopsEstimate.memdlm_extra` counts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.memory.config import MemoryConfig
from pipeline.memory.fast_weights import TARGETS
from pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class FlopsEstimate:
    layer_fwd_per_token: float  # one block at seq_len, attention included
    head_fwd_per_position: float
    n_layers: int
    first_memory_layer: int
    adapter_fwd_per_token: float  # all fast-weight products of one memory layer
    lowest_memory_bwd_per_token: float  # inner backward inside the lowest memory layer

    def forward(self, tokens: float, head_positions: float) -> float:
        """One forward pass over ``tokens`` with the head at ``head_positions``."""
        return tokens * self.n_layers * self.layer_fwd_per_token + head_positions * self.head_fwd_per_position

    def mdlm_step(self, tokens: float, head_positions: float) -> float:
        """Forward + backward (2x) of an MDLM step."""
        return 3.0 * self.forward(tokens, head_positions)

    def memdlm_extra(
        self, tokens: float, pre_positions: list[float], anchor_positions: float, anchor_step: bool = True
    ) -> float:
        """Inner-loop work on top of the outer (MDLM-shaped) step.

        Per stage-1 step: the layers below the memory forward without autograd; the memory
        layers forward; the backward w.r.t. the fast weights only: input gradients through the
        head and every memory layer above the lowest, and in the lowest only through the FFN's
        down projection (nothing below needs a gradient); the adapters forward and backward.
        Stage 2 is the same minus the pass below the memory: the anchor's is shared with the
        outer loss.
        """
        mem_layers = self.n_layers - self.first_memory_layer
        fwd = tokens * mem_layers * (self.layer_fwd_per_token + self.adapter_fwd_per_token)
        bwd = tokens * (
            (mem_layers - 1) * self.layer_fwd_per_token
            + self.lowest_memory_bwd_per_token
            + 2 * mem_layers * self.adapter_fwd_per_token
        )
        below = tokens * self.first_memory_layer * self.layer_fwd_per_token
        stage = fwd + bwd
        extra = sum(below + stage + 2 * p * self.head_fwd_per_position for p in pre_positions)
        if anchor_step:
            extra += stage + 2 * anchor_positions * self.head_fwd_per_position
        # The outer pass also runs the adapters in the memory layers (forward + input backward).
        return extra + 2 * tokens * mem_layers * self.adapter_fwd_per_token


def estimate_flops(
    cfg: ModelConfig, memory: MemoryConfig | None = None, seq_len: int | None = None
) -> FlopsEstimate:
    """FLOPs per token / position for ``cfg`` at ``seq_len`` (default: the model's)."""
    T = seq_len or cfg.seq_len
    d, f, V = cfg.d_model, cfg.ffn_hidden, cfg.padded_vocab_size
    layer = 2 * (4 * d * d + 3 * d * f) + 4 * T * d
    adapter = 0.0
    first = cfg.n_layers
    if memory is not None and memory.enabled:
        spec = memory.spec_for(cfg)
        first = spec.layers[0]
        for target in TARGETS[memory.targets]:
            out, inp = spec.global_shape(target)
            adapter += 2 * (out * inp if memory.adapter == "full" else memory.rank * (inp + out))
    return FlopsEstimate(
        layer_fwd_per_token=float(layer),
        head_fwd_per_position=float(2 * d * V),
        n_layers=cfg.n_layers,
        first_memory_layer=first,
        adapter_fwd_per_token=adapter,
        # targets ffn: only the down projection's input gradient; ffn+attn: the whole block.
        lowest_memory_bwd_per_token=float(2 * d * f if memory is None or memory.targets == "ffn" else layer),
    )


def estimate_mfu(flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved / peak."""
    return flops_per_s / peak_flops_per_s

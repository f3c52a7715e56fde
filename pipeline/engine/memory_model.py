"""Per-rank memory of a training step: parameters, gradients, optimizer state, activations, fast weights.

    est = estimate_memory(model_cfg, memory_cfg, micro_batch=1, tp=8, dp=32, zero_stage=3)
    est.total_gib

Model (bytes per rank; P = parameters, N = tp * dp for ZeRO-3, tp for stages 0-2):

* parameters: bf16, ``2 P / N`` persistent under ZeRO-3, plus the largest layer gathered while it
  runs (``2 P_layer / tp``, times 2 for prefetch); ``2 P / tp`` otherwise.
* gradients: ``4 P / N`` (fp32 partition the optimizer reads) plus a bf16 bucket of one layer,
  and under ZeRO-3 the reduce and prefetch buckets (``d^2`` and ``0.9 d^2`` elements, bf16).
* optimizer: fp32 master, Adam m and v: ``12 P / N`` (ZeRO >= 1), ``12 P / tp`` for stage 0.
* activations kept for backward, per token per layer, bf16 (tensors this code saves):
  attention: block input, norm output, q, k, v, rotated q, k, attention output -> ``2d + 6d/tp``;
  FFN: block input, norm output, gate, up, silu(gate), product -> ``2d + 4f/tp``; RMSNorm's fp32
  inputs ``2 x 2d`` (as bf16 element equivalents); times ``micro_batch * seq_len * n_layers``.
  The LM head at the loss positions (``mask_fraction * tokens``): bf16 logits plus fp32 logits and
  softmax for the cross-entropy: ``10 V / tp`` bytes each.
* MemDLM: fast weights (fp32, LoRA: ``r (in + out)`` per target, sharded like the weight),
  their gradients and one inner stage's activations of the memory layers (freed before the
  outer backward; they peak together with the outer forward's saved tensors only in the
  memory layers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.memory.fast_weights import COLUMN_TARGETS, TARGETS
from pipeline.memory.inner_loop import MemoryConfig
from pipeline.model.config import ModelConfig

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    head: float
    fast_weights: float
    total: float

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def as_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in asdict(self).items()}


def estimate_memory(
    cfg: ModelConfig,
    memory: MemoryConfig | None,
    *,
    micro_batch: int,
    tp: int,
    dp: int,
    zero_stage: int = 3,
    seq_len: int | None = None,
    mask_fraction: float = 0.5,
) -> MemoryEstimate:
    """Bytes per rank for one training step (see the module docstring for each term)."""
    T = seq_len or cfg.seq_len
    d, f, V, L = cfg.d_model, cfg.ffn_hidden, cfg.padded_vocab_size, cfg.n_layers
    P = cfg.num_params()
    p_layer = 4 * d * d + 3 * d * f
    shard = tp * dp if zero_stage == 3 else tp
    params = 2 * P / shard + (2 * 2 * p_layer / tp if zero_stage == 3 else 0)
    grads = 4 * P / (tp * dp if zero_stage >= 2 else tp) + 2 * p_layer / tp
    if zero_stage == 3:  # reduce bucket (d^2) and prefetch bucket (0.9 d^2), bf16 (engine/deepspeed.py)
        grads += 2 * 1.9 * d * d
    optimizer = 12 * P / (tp * dp if zero_stage >= 1 else tp)
    per_token_layer = 2 * ((2 * d + 6 * d / tp) + (2 * d + 4 * f / tp) + 2 * 2 * d)
    tokens = micro_batch * T
    activations = per_token_layer * tokens * L
    head = 10 * V / tp * tokens * mask_fraction
    fast = 0.0
    if memory is not None and memory.enabled:
        spec = memory.spec(L, d, f)
        per_layer = 0.0
        for target in TARGETS[memory.targets]:
            out, inp = spec.global_shape(target)
            if memory.adapter == "full":
                per_layer += out * inp / tp
            elif target in COLUMN_TARGETS:  # A [r, in] replicated, B [out/tp, r]
                per_layer += memory.rank * (inp + out / tp)
            else:  # row-parallel: A [r, in/tp], B [out, r] replicated
                per_layer += memory.rank * (inp / tp + out)
        copies = micro_batch if memory.scope == "sample" else 1
        fast = 4 * 2 * per_layer * len(spec.layers) * copies  # values + gradients
        # one inner stage's memory-layer activations and its head at the pre-anchor positions
        fast += (
            per_token_layer * tokens * len(spec.layers) + head * min(1.0, 1.5 * mask_fraction) / mask_fraction
        )
    total = params + grads + optimizer + activations + head + fast
    return MemoryEstimate(params, grads, optimizer, activations, head, fast, total)

"""Per-rank memory of a training step: parameters, gradients, optimizer state, activations, fast weights.

    est = estimate_memory(model_cfg, memory_cfg, micro_batch=1, tp=8, dp=32, zero_stage=3)
    est.total_gib

Model (bytes per rank; P = parameters, N = tp * dp for ZeRO-3, tp for stages 0-2):

* parameters: bf16, ``2 P / N`` persistent under ZeRO-3, plus the largest layer gathered while it
  runs (``2 P_layer / tp``, times 2 for prefetch); ``2 P / tp`` otherwise.
* gradients: ``4 P / N`` (fp32 partition the optimizer reads) plus a bf16 bucket of one layer,
  and under ZeRO-3 the reduce and prefetch buckets (``d^2`` and ``0.9 d^2`` elements, bf16).
* optimizer: fp32 master, Adam m and v: ``12 P / N`` (ZeRO >= 1), ``12 P / tp`` for stage 0.
* activations kept for backward, per token per layer, in bytes: ``20 d`` replicated (the two
  RMSNorms keep fp32 inputs and outputs, the residual stream) plus ``(18 d + 10.25 f) / tp``
  sharded with the heads and the FFN (q, k, v, rotated q/k, attention output and its
  log-sum-exp; gate, up, silu, product). Coefficients measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on this model under bf16 autocast (a unit test
  re-measures them); times ``micro_batch * seq_len * n_layers``. The LM head at the loss
  positions (``mask_fraction * tokens``) keeps bf16 logits and the fp32 softmax: ``6 V / tp``
  bytes each, and its backward briefly holds an fp32 gradient of the logits: ``4 V / tp``.
* MemDLM: fast weights (fp32, LoRA: ``r (in + out)`` per target, sharded like the weight) and
  their gradients; and, if larger than the outer forward's, the stage-2 peak: the anchor's pass
  below the memory plus one inner stage's memory layers and head at the pre-anchor positions
  (inner stages are freed before the outer forward, so the two never add up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.memory.config import MemoryConfig
from pipeline.memory.fast_weights import COLUMN_TARGETS, TARGETS
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
    per_token_layer = 20 * d + (18 * d + 10.25 * f) / tp
    tokens = micro_batch * T
    activations = per_token_layer * tokens * L
    head = (6 + 4) * V / tp * tokens * mask_fraction
    fast = 0.0
    if memory is not None and memory.enabled:
        spec = memory.spec(L, d, f, cfg.qkv_size)
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
        fast = 4 * 2 * per_layer * len(spec.layers) * copies  # fp32 values + gradients
        # Stage 2 runs while the anchor's pass below the memory holds its activations: that pass,
        # plus the memory layers and the head at the (larger) pre-anchor set of one inner stage,
        # is the other candidate for the peak; the outer forward frees the inner stage first.
        below = activations * spec.layers[0] / L
        inner = (
            below
            + per_token_layer * tokens * len(spec.layers)
            + head * min(1.0, 1.5 * mask_fraction) / mask_fraction
        )
        if inner > activations + head:
            fast += inner - (activations + head)
    total = params + grads + optimizer + activations + head + fast
    return MemoryEstimate(params, grads, optimizer, activations, head, fast, total)

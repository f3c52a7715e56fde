"""Per-rank memory of a training step: parameters, gradients, optimizer state, activations, fast weights.

    est = estimate_memory(model_cfg, memory_cfg, micro_batch=1, tp=8, dp=32, zero_stage=3)
    est.total_gib

Model (bytes per rank; P = parameters, N = tp * dp for ZeRO-3, tp for stages 0-2):

* parameters: bf16, ``2 P / N`` persistent under ZeRO-3, plus the largest layer gathered while it
  runs (``2 P_layer / tp``, times 2 for prefetch); ``2 P / tp`` otherwise. Routed experts
  (``P_e`` of P) are not TP-split: an EP rank holds ``P_e / ep`` and ZeRO-3 partitions that over
  the ``dp / ep`` ranks holding the same experts, so ``P_e / dp`` per rank (``P_e / ep`` below
  stage 3); a gathered MoE layer holds its local experts (``1 / ep`` of them).
* gradients: ``4 P / N`` (fp32 partition the optimizer reads) plus a bf16 bucket of one layer,
  and under ZeRO-3 the reduce and prefetch buckets (``d^2`` and ``0.9 d^2`` elements, bf16).
* optimizer: fp32 master, Adam m and v: ``12 P / N`` (ZeRO >= 1), ``12 P / tp`` for stage 0.
* activations kept for backward, per token per layer, in bytes: the family's measured
  coefficients (dense: ``20 d`` replicated plus ``(18 d + 10.25 f) / tp`` sharded;
  pipeline/families/dense/family.py), times ``micro_batch * seq_len * n_layers``. The LM head at the loss
  positions (``mask_fraction * tokens``) keeps bf16 logits and the fp32 softmax: ``6 V / tp``
  bytes each, and its backward briefly holds an fp32 gradient of the logits: ``4 V / tp``.
* MemDLM: fast weights (fp32, LoRA: ``r (in + out)`` per target, sharded like the weight) and
  their gradients; and, if larger than the outer forward's, the stage-2 peak: the anchor's pass
  below the memory plus one inner stage's memory layers and head at the pre-anchor positions
  (inner stages are freed before the outer forward, so the two never add up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.adapters.lora import LoraConfig, lora_param_count
from pipeline.families import family_of
from pipeline.families.registry import param_count
from pipeline.memory.config import MemoryConfig
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


def _fast_weight_bytes(cfg: ModelConfig, memory: MemoryConfig, tp: int, micro_batch: int, ep: int) -> float:
    """fp32 fast weights and their gradients per rank (LoRA: ``r (in + out)`` per target, sharded
    like the weight: column A [r, in] replicated, B [out/tp, r]; row A [r, in/tp], B [out, r];
    routed experts: one adapter per expert, split over EP for a global-batch memory, else all on
    every rank)."""
    copies = micro_batch if memory.scope == "sample" else 1
    shard = ep if memory.scope == "batch" and memory.sync_dp else 1
    return 4 * 2 * memory.spec_for(cfg).floats_per_rank(tp, shard) * copies


def _training_state(
    cfg: ModelConfig, layers, lora: LoraConfig | None, *, tp: int, dp: int, ep: int, zero_stage: int
) -> tuple[float, float, float]:
    """Bytes per rank of the parameters, gradients and optimizer state (module docstring)."""
    d = cfg.d_model
    P = param_count(cfg)
    P_e = sum(p.params for layer in layers for p in layer.projections if p.parallel == "expert")
    lora_on = lora is not None and lora.enabled
    trainable = lora_param_count(cfg, lora) if lora_on else P
    P_all = P + (trainable if trainable != P else 0)
    # per-rank parameters: dense ones TP-split and ZeRO-partitioned over dp; routed experts
    # EP-split and ZeRO-partitioned over the dp / ep ranks that hold the same experts
    dense, experts = (P_all - P_e) / tp, P_e / ep
    dense_trainable, experts_trainable = (trainable / tp, 0.0) if lora_on else ((P - P_e) / tp, P_e / ep)

    def per_rank(dense_part: float, expert_part: float, partitioned: bool) -> float:
        return (dense_part + expert_part * ep) / dp if partitioned else dense_part + expert_part

    p_layer = max(
        sum(p.params / (ep if p.parallel == "expert" else tp) for p in layer.projections) for layer in layers
    )  # the largest, gathered
    params = 2 * per_rank(dense, experts, zero_stage == 3) + (2 * 2 * p_layer if zero_stage == 3 else 0)
    grads = 4 * per_rank(dense_trainable, experts_trainable, zero_stage >= 2) + 2 * p_layer
    if zero_stage == 3:  # reduce bucket (d^2) and prefetch bucket (0.9 d^2), bf16 (engine/deepspeed.py)
        grads += 2 * 1.9 * d * d
    optimizer = 12 * per_rank(dense_trainable, experts_trainable, zero_stage >= 1)
    return params, grads, optimizer


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
    lora: LoraConfig | None = None,
    ep: int = 1,
) -> MemoryEstimate:
    """Bytes per rank for one training step (see the module docstring for each term). With outer
    ``lora`` enabled only the adapters have gradients and optimizer state; the frozen base is
    partitioned bf16 weights only. ``ep``: expert-parallel ranks (carved out of the ``dp``)."""
    T = seq_len or cfg.seq_len
    V = cfg.padded_vocab_size
    family = family_of(cfg)
    layers = family.layer_shapes(cfg)
    params, grads, optimizer = _training_state(cfg, layers, lora, tp=tp, dp=dp, ep=ep, zero_stage=zero_stage)
    per_token_layer = family.activation_bytes(cfg, tp)
    tokens = micro_batch * T
    activations = per_token_layer * tokens * len(layers)
    head = (6 + 4) * V / tp * tokens * mask_fraction
    fast = 0.0
    if memory is not None and memory.enabled:
        fast = _fast_weight_bytes(cfg, memory, tp, micro_batch, ep)
        # Stage 2 runs while the anchor's pass below the memory holds its activations: that pass,
        # plus the memory layers and the head at the (larger) pre-anchor set of one inner stage,
        # is the other candidate for the peak; the outer forward frees the inner stage first.
        first = memory.spec_for(cfg).layers[0]
        below = activations * first / len(layers)
        inner = (
            below
            + per_token_layer * tokens * (len(layers) - first)
            + head * min(1.0, memory.pre_anchor_scale * mask_fraction) / mask_fraction
        )
        if inner > activations + head:
            fast += inner - (activations + head)
    total = params + grads + optimizer + activations + head + fast
    return MemoryEstimate(params, grads, optimizer, activations, head, fast, total)

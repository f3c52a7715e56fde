"""The dense family's registry entry: config, builder, shapes for the cost model, parallel plan."""

from __future__ import annotations

from pipeline.families.dense import hf
from pipeline.families.dense.model import DLMTransformer, check_tp
from pipeline.families.registry import Family, LayerShape, ParallelPlan, Projection, register_family
from pipeline.model.config import ModelConfig
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.tp_layout import describe_tensor_parallel_layout

# memory.targets / lora.targets choices -> the projections they name
FAST_WEIGHT_TARGETS = {"ffn": ("gate", "up", "down"), "ffn+attn": ("qkv", "out", "gate", "up", "down")}


def layer_shapes(cfg: ModelConfig) -> list[LayerShape]:
    """Every block: fused QKV (GQA rows), output, SwiGLU gate/up/down; two RMSNorms (+ QKV bias,
    + q/k norm weights)."""
    d, f, attn = cfg.d_model, cfg.ffn_hidden, cfg.n_heads * cfg.head_size
    shape = LayerShape(
        projections=(
            Projection("qkv", d, cfg.qkv_size, "column"),
            Projection("out", attn, d, "row"),
            Projection("gate", d, f, "column"),
            Projection("up", d, f, "column"),
            Projection("down", f, d, "row"),
        ),
        query_heads=cfg.n_heads,
        head_dim=cfg.head_size,
        other_params=2 * d + (cfg.qkv_size if cfg.qkv_bias else 0) + qk_norm_params(cfg),
    )
    return [shape] * cfg.n_layers


def qk_norm_params(cfg: ModelConfig) -> int:
    """The q_norm and k_norm weights of one block: [hd] each per head, or the whole projections'."""
    if cfg.qk_norm == "head":
        return 2 * cfg.head_size
    if cfg.qk_norm == "full":
        return (cfg.n_heads + cfg.kv_heads) * cfg.head_size
    return 0


def activation_bytes(cfg: ModelConfig, tp: int) -> float:
    """Bytes one token keeps for backward in one block under bf16 autocast, measured with
    ``saved_tensors_hooks`` (tests/unit/test_memory_model.py re-measures): ``20 d`` replicated (the
    RMSNorms' fp32 inputs and outputs, the residual stream) + ``(18 d + 10.25 f) / tp`` sharded with
    the heads and the FFN (q, k, v, rotated q/k, attention output and log-sum-exp; gate, up, silu,
    product)."""
    d, f = cfg.d_model, cfg.ffn_hidden
    return 20 * d + (18 * d + 10.25 * f) / tp


def check_parallel(cfg: ModelConfig, dims: ParallelDims) -> None:
    """Heads, KV heads, FFN width and the padded vocabulary must divide by the TP size."""
    check_tp(cfg, dims.tp)


def build(cfg: ModelConfig, dims: ParallelDims) -> DLMTransformer:
    return DLMTransformer(cfg, dims)


def describe(model: DLMTransformer, dims: ParallelDims) -> None:
    """Its megatron-core layers say how they are cut (``partition_dim``): the generic description."""
    describe_tensor_parallel_layout(model, dims.tp)


DENSE = register_family(
    Family(
        name="dense",
        config_class=ModelConfig,
        build=build,
        layer_shapes=layer_shapes,
        plan=ParallelPlan(check=check_parallel, describe=describe),
        activation_bytes=activation_bytes,
        fast_weight_targets=FAST_WEIGHT_TARGETS,
        hf_layouts=hf.LAYOUTS,
        hf_export_layout=hf.export_layout,
        description="bidirectional transformer, GQA attention, SwiGLU FFN (LLaMA / Qwen2 / LLaDA layouts)",
    )
)

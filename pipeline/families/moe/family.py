"""The mixture-of-experts family's registry entry: config, builder, shapes, parallel plan.

Parallel plan: attention, embedding, head, dense layers and shared experts split over TP exactly
as the dense family's; routed experts are whole on the EP rank that holds them (replicated over
TP: every TP peer computes them for the same tokens); the router is replicated. EP ranks are
carved out of the DP ranks (pipeline/parallel/dims.py), so EP must divide both the experts and
the data-parallel size.
"""

from __future__ import annotations

from pipeline.config import ConfigError
from pipeline.families.dense import family as dense
from pipeline.families.dense.model import check_tp
from pipeline.families.moe import hf
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.model import MoETransformer
from pipeline.families.registry import Family, LayerShape, ParallelPlan, Projection, register_family
from pipeline.parallel.dims import ParallelDims
from pipeline.parallel.tp_layout import describe_tensor_parallel_layout

FFN = ("gate", "up", "down")
# memory.targets -> the projections they name: a dense layer's FFN, or a MoE layer's experts and
# shared experts (each layer has one kind; the memory adapts whichever its layers have)
FAST_WEIGHT_TARGETS = {
    "ffn": (*FFN, *(f"experts.{p}" for p in FFN), *(f"shared.{p}" for p in FFN)),
    "ffn+attn": ("qkv", "out", *FFN, *(f"experts.{p}" for p in FFN), *(f"shared.{p}" for p in FFN)),
}


def _moe_ffn(cfg: MoEConfig) -> tuple[list[Projection], int]:
    """A MoE layer's FFN projections and its parameters no matmul counts (the score bias is a buffer)."""
    d, f, E, k, s = cfg.d_model, cfg.moe_ffn_hidden, cfg.n_experts, cfg.top_k, cfg.shared_hidden
    share = k / E  # of the tokens reach each expert
    projections = [
        Projection("router", d, E, "replicated"),
        Projection("experts.gate", d, f, "expert", tokens=share, copies=E),
        Projection("experts.up", d, f, "expert", tokens=share, copies=E),
        Projection("experts.down", f, d, "expert", tokens=share, copies=E),
    ]
    if s:
        projections += [
            Projection("shared.gate", d, s, "column"),
            Projection("shared.up", d, s, "column"),
            Projection("shared.down", s, d, "row"),
        ]
    if cfg.shared_expert_gate:
        projections.append(Projection("shared_gate", d, 1, "replicated"))
    return projections, 0


def layer_shapes(cfg: MoEConfig) -> list[LayerShape]:
    """Every block: the dense family's (attention and, in dense layers, the SwiGLU FFN); in a MoE
    layer the FFN is the router, E routed experts (top_k / E of the tokens each) and the shared MLP."""
    out = []
    for i, shape in enumerate(dense.layer_shapes(cfg)):
        if not cfg.is_moe_layer(i):
            out.append(shape)
            continue
        ffn, other = _moe_ffn(cfg)
        attention = tuple(p for p in shape.projections if p.name not in FFN)
        out.append(
            LayerShape(attention + tuple(ffn), shape.query_heads, shape.head_dim, shape.other_params + other)
        )
    return out


def activation_bytes(cfg: MoEConfig, tp: int) -> float:
    """Bytes one token keeps for backward in one block (mean over the layers), bf16: the dense
    block's attention part, and in a MoE layer the SwiGLU activations of its top_k expert copies
    (not TP-split) and of the shared MLP (TP-split), plus the dispatched copies (input and output,
    ``4 k d``) and the fp32 routing scores (``8 E``). Derived from the dense measurement, not yet
    measured on a MoE layer."""
    d, k = cfg.d_model, cfg.top_k
    attention = 20 * d + 18 * d / tp
    dense_layer = attention + 10.25 * cfg.ffn_hidden / tp
    moe_layer = (
        attention + 10.25 * (k * cfg.moe_ffn_hidden + cfg.shared_hidden / tp) + 4 * k * d + 8 * cfg.n_experts
    )
    n_moe = len(cfg.moe_layers())
    return (n_moe * moe_layer + (cfg.n_layers - n_moe) * dense_layer) / cfg.n_layers


def check_parallel(cfg: MoEConfig, dims: ParallelDims) -> None:
    """The dense family's TP rules (and the shared MLP's width), and EP dividing the experts and
    the data-parallel size."""
    check_tp(cfg, dims.tp)
    if cfg.shared_hidden % dims.tp:
        raise ConfigError(
            f"model shared-expert width {cfg.shared_hidden} is not divisible by tensor parallel size {dims.tp}"
        )
    if cfg.n_experts % dims.ep:
        raise ConfigError(f"key 'parallel.ep': {dims.ep} does not divide model.n_experts={cfg.n_experts}")
    if dims.dp % dims.ep:
        raise ConfigError(
            f"key 'parallel.ep': {dims.ep} does not divide the data-parallel size {dims.dp} "
            f"(world {dims.world} / tp {dims.tp}): expert-parallel ranks are data-parallel ranks"
        )


def build(cfg: MoEConfig, dims: ParallelDims) -> MoETransformer:
    return MoETransformer(cfg, dims)


def describe(model: MoETransformer, dims: ParallelDims) -> None:
    """The generic description (megatron layers' ``partition_dim``); expert parameters are left to
    DeepSpeed's expert checkpoint path (pipeline/parallel/tp_layout.py)."""
    describe_tensor_parallel_layout(model, dims.tp)


MOE = register_family(
    Family(
        name="moe",
        config_class=MoEConfig,
        build=build,
        layer_shapes=layer_shapes,
        plan=ParallelPlan(check=check_parallel, describe=describe),
        activation_bytes=activation_bytes,
        fast_weight_targets=FAST_WEIGHT_TARGETS,
        expert_parallel=True,
        hf_layouts=hf.LAYOUTS,
        hf_export_layout=hf.export_layout,
        description="bidirectional transformer with mixture-of-experts FFNs (routed + shared experts, "
        "softmax/sigmoid top-k, group-limited routing), expert-parallel over DP ranks",
    )
)

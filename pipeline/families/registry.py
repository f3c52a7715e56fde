"""Model families, found by name: what the rest of the pipeline needs to know about a model.

    family = get_family(cfg.model.family)          # "dense", ... (pipeline/families/<name>/)
    family.plan.check(cfg.model, dims)             # the sizes its parallel plan can split
    model = family.build(cfg.model, dims)          # a module with the DLM interface (below)
    shapes = family.layer_shapes(cfg.model)        # the cost model's input (pipeline/perf/cost.py)

A family is one folder: its config class (a ``ModelConfig`` subclass, or ``ModelConfig``), a
builder, its Hugging Face layouts (import and export name maps), the shapes the cost and memory
models count, and its parallel plan. Trainer, import/export, sampler, benchmarks, DRY_RUN and the
memory model look a family up here and never branch on its name; a new family registers itself
with :func:`register_family` and needs no edit anywhere else.

The DLM interface every built model offers (pipeline/families/dense/model.py is the reference):
``cfg``; ``embed(tokens [B, T]) -> [B, T, D]``; ``run_layers(h, start, end, fast, checkpoint,
key_mask)``; ``final_norm``; ``head`` (vocab-parallel logits); ``head_logits(h, positions)``;
``forward(tokens=..., hidden=..., start_layer=..., end_layer=..., fast=..., positions=...,
checkpoint_layers=..., key_mask=...)``; blocks that apply a weight delta (fast weights, LoRA) to
the projections their :class:`Projection` entries name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig, register_model_config, unregister_model_config
from pipeline.model.hf_format import HFLayout


@dataclass(frozen=True)
class Projection:
    """One weight matrix of a layer as the cost model, fast weights and LoRA see it.

    ``parallel``: how tensor parallelism splits it (column: output rows; row: input columns;
    replicated: not at all; expert: routed experts, whole on the EP rank that holds them).
    ``tokens``: passes per token (1 for a dense projection; a routed expert: top_k / experts of
    the tokens reach each of ``copies`` experts, so ``tokens * copies`` = top_k).
    ``copies``: parameter copies (the experts of one routed projection)."""

    name: str
    in_features: int
    out_features: int
    parallel: Literal["column", "row", "replicated", "expert"]
    tokens: float = 1.0
    copies: int = 1

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.copies

    @property
    def flops_per_token(self) -> float:
        """Forward multiply-add FLOPs (2 per MAC) of one token through it (all passes)."""
        return 2.0 * self.in_features * self.out_features * self.tokens * self.copies


@dataclass(frozen=True)
class LayerShape:
    """What one block computes: its projections, its attention, its other parameters."""

    projections: tuple[Projection, ...]
    query_heads: int
    head_dim: int
    other_params: int = 0  # norms, biases, routers: parameters that no matmul FLOP counts

    def projection(self, name: str) -> Projection:
        for p in self.projections:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.projections) + self.other_params

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Scores and the weighted sum of one query over ``seq_len`` keys (bidirectional)."""
        return 4.0 * seq_len * self.query_heads * self.head_dim


@dataclass(frozen=True)
class ParallelPlan:
    """How a family's model splits: ``check`` refuses sizes it cannot split (naming the
    dimension), ``describe`` records on a built model how each parameter is sharded (what
    DeepSpeed's universal checkpoint needs to join and cut them again)."""

    check: Callable[[ModelConfig, Any], None]
    describe: Callable[[nn.Module, Any], None]


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type[ModelConfig]
    build: Callable[[ModelConfig, Any], nn.Module]
    layer_shapes: Callable[[ModelConfig], list[LayerShape]]
    plan: ParallelPlan
    # Bytes of activations one token keeps for backward in one layer at a TP size (the memory
    # model; pipeline/perf/memory_model.py).
    activation_bytes: Callable[[ModelConfig, int], float]
    # Which projections each ``memory.targets`` / ``lora.targets`` choice names.
    fast_weight_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The Hugging Face layouts it maps (pipeline/model/hf_format.py), and the one an export writes.
    hf_layouts: tuple[HFLayout, ...] = ()
    hf_export_layout: Callable[[ModelConfig], HFLayout] | None = None
    description: str = ""
    # Whether its models have routed experts (``parallel.ep`` > 1 allowed; DeepSpeed's expert
    # groups are created before the model is built, pipeline/parallel/dims.py).
    expert_parallel: bool = False


def param_count(cfg: ModelConfig) -> int:
    """Every parameter of the unsharded model: its family's layers, the (padded) embedding, an
    untied head and the final norm."""
    layers = get_family(cfg.family).layer_shapes(cfg)
    embed = cfg.padded_vocab_size * cfg.d_model
    return sum(layer.params for layer in layers) + embed * (1 if cfg.tie_embeddings else 2) + cfg.d_model


def count_label(n: float) -> str:
    """A parameter count for people: 8.02B, 49.3M, 210K."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` (replacing one of the same name: a test may re-register)."""
    register_model_config(family.name, family.config_class)
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget family ``name`` (a test's throwaway family; the built-in ones stay)."""
    _FAMILIES.pop(name, None)
    unregister_model_config(name)


def get_family(name: str) -> Family:
    """The registered family ``name``; a ConfigError naming the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ConfigError(
            f"key 'model.family': '{name}' is not a registered model family (known: {known})"
        ) from None


def family_of(cfg: ModelConfig) -> Family:
    return get_family(cfg.family)


def families() -> list[Family]:
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]

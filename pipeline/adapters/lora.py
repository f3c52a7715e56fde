"""Outer LoRA: trainable low-rank adapters on the frozen base weights (``lora:`` in a training config).

    add_lora(model, LoraConfig(enabled=True), seed=cfg.seed)   # before DeepSpeed builds the engine
    freeze_base(model)                                          # only LoRA tensors require grad
    state = merge_lora(consolidated_state_dict(model), cfg)     # export: W' = W + (alpha / r) B A

The paper's fine-tuning recipe (spec section 4): r = 32, alpha = 64 on the attention and FFN
projections, base frozen, only LoRA in the optimizer. Each adapted projection computes
``W x + (alpha / r) * B A x``; ``A`` starts Kaiming-uniform (a = sqrt(5), like ``nn.Linear``),
``B`` at zero, so step 0 is the base model exactly.

Unlike MemDLM's fast weights (pipeline/memory/fast_weights.py: per-batch tensors passed as
forward arguments, never parameters), these adapters *are* parameters: the outer optimizer
trains them, ZeRO-3 partitions them and DeepSpeed checkpoints them. Both add their low-rank
product to the same projection output (pipeline/model/delta.py computes both), so the memory's
delta applies on top of the effective weight ``W + (alpha / r) B A``: for linear maps the two
readings are the same sum.

Tensor parallelism, as the weight is sharded (the same rule as the fast weights):

==============  =====================================  =====================================
                column-parallel (qkv, gate, up)        row-parallel (out, down)
==============  =====================================  =====================================
``A``           [r, in]  replicated over TP             [r, in/tp]  sharded on dim 1
``B``           [out/tp, r]  sharded on dim 0           [out, r]  replicated
==============  =====================================  =====================================

Column: ``h = x A^T`` passes ``copy_to_tensor_model_parallel_region`` (backward all-reduces dh
over TP, so the replicated ``A`` gets the same, full gradient on every TP rank). Row:
``h = reduce_from_tensor_model_parallel_region(x_shard A_shard^T)`` (the sum of the partial
products), then ``h B^T`` with the replicated ``B``. Sharded tensors carry megatron's
``tensor_model_parallel``/``partition_dim`` attributes (DeepSpeed's gradient norm and our export
read them); replicated ones ``tensor_model_parallel = False``. Every rank draws the *full* ``A``
from a generator seeded by (seed, layer, target) and keeps its slice, so values are identical
across TP ranks and TP sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from pipeline.config import ConfigError
from pipeline.families.registry import count_label, family_of, param_count
from pipeline.model.delta import COLUMN_TARGETS, ROW_TARGETS
from pipeline.parallel.dims import ParallelDims

LORA_TARGETS = (*COLUMN_TARGETS, *ROW_TARGETS)  # qkv, gate, up, out, down
LORA_KEY = ".lora."  # parameter names of adapters: layers.<i>.lora.<target>.<A|B>


@dataclass
class LoraConfig:
    """Outer LoRA (``enabled: false``: full fine-tuning / pretraining of every base weight)."""

    enabled: bool = False  # train only low-rank adapters on a frozen base
    rank: int = 32  # r of every adapter
    alpha: float = 64.0  # scale: W + alpha / r * B A
    targets: list[str] = field(
        default_factory=lambda: ["qkv", "out", "gate", "up", "down"]
    )  # projections that get an adapter (the model family's names)

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"key 'lora.rank': got {self.rank}, expected >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"key 'lora.alpha': got {self.alpha}, expected > 0")
        for i, t in enumerate(self.targets):
            if t not in LORA_TARGETS:
                raise ConfigError(
                    f"key 'lora.targets[{i}]': '{t}' is not a projection ({', '.join(LORA_TARGETS)})"
                )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"key 'lora.targets': {self.targets} names a projection twice")
        if self.enabled and not self.targets:
            raise ConfigError("key 'lora.targets': empty, but lora.enabled is true")

    def check_fits(self, model_cfg) -> None:
        """With ``enabled``: ``rank`` must not exceed the smaller side of any weight it adapts (a
        product ``B A`` of rank r is no low-rank update of a matrix with fewer rows or columns)."""
        if not self.enabled:
            return
        sides = {t: target_shape(model_cfg, t) for t in self.targets}
        target = min(sides, key=lambda t: min(sides[t]))
        limit = min(sides[target])
        if self.rank > limit:
            out, inp = sides[target]
            raise ConfigError(
                f"key 'lora.rank': got {self.rank}, expected <= {limit} (the smallest side of the adapted "
                f"weights: {target} is {out} x {inp})"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_projections(model_cfg, targets: list[str]) -> list[tuple[str, int, int, str]]:
    """``(name, out, in, column|row)`` of each target projection of one layer, from the model's
    family (its ``layer_shapes``); a ConfigError naming a target the family lacks."""
    layer = family_of(model_cfg).layer_shapes(model_cfg)[0]
    names = [p.name for p in layer.projections]
    out = []
    for i, t in enumerate(targets):
        if t not in names:
            raise ConfigError(
                f"key 'lora.targets[{i}]': '{t}' is not a projection of the '{model_cfg.family}' family "
                f"({', '.join(names)})"
            )
        p = layer.projection(t)
        out.append((t, p.out_features, p.in_features, p.parallel))
    return out


def target_shape(model_cfg, target: str) -> tuple[int, int]:
    """(out, in) of the full (unsharded) projection ``target``."""
    (_, out, inp, _) = target_projections(model_cfg, [target])[0]
    return out, inp


def lora_param_count(model_cfg, lora: LoraConfig) -> int:
    """Trainable parameters of the adapters (unsharded): ``rank * (in + out)`` per target and layer."""
    if not lora.enabled:
        return 0
    per_layer = sum(lora.rank * (out + inp) for _, out, inp, _ in target_projections(model_cfg, lora.targets))
    return model_cfg.n_layers * per_layer


def lora_summary(model_cfg, lora: LoraConfig) -> str:
    """``LoRA: 75.5M trainable of 8.03B parameters (0.94 %), r=32 alpha=64 on qkv,out,...``."""
    n, total = lora_param_count(model_cfg, lora), param_count(model_cfg)
    return (
        f"LoRA: {count_label(n)} trainable parameters on a frozen {count_label(total)} base ({100 * n / total:.2f} %), "
        f"r={lora.rank} alpha={lora.alpha:g} on {','.join(lora.targets)}"
    )


def _seed_for(seed: int, layer: int, target: str) -> int:
    return (seed * 1_000_003 + layer * 16 + LORA_TARGETS.index(target)) % (2**63)


class LoraAdapter(nn.Module):
    """``A``, ``B`` of one projection of one layer; ``forward(x)`` is the extra output
    ``(alpha / r) * B A x``, sharded/summed over TP like the projection's own output.

    A module (not bare parameters on the block) so that ZeRO-3's pre-forward hook gathers its
    partitions when it is called. Initialised in ``__init__``, so ``zero.Init`` partitions the
    final values (it broadcasts data-parallel rank 0's, the same everywhere anyway)."""

    def __init__(
        self,
        target: str,
        out_features: int,
        in_features: int,
        column: bool,
        lora: LoraConfig,
        seed: int,
        dims: ParallelDims,
    ):
        super().__init__()
        tp, rank = dims.tp, dims.tp_rank
        self.target, self.column, self.scale = target, column, lora.scale
        self.tp_group = dims.tp_group
        r = lora.rank
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in = in_features
        g = torch.Generator().manual_seed(seed)
        a_full = torch.empty(r, in_features).uniform_(-bound, bound, generator=g)
        if self.column:
            a_shape, b_shape, a_val = (r, in_features), (out_features // tp, r), a_full
        else:
            shard = in_features // tp
            a_shape, b_shape = (r, shard), (out_features, r)
            a_val = a_full[:, rank * shard : (rank + 1) * shard]
        self.A = nn.Parameter(torch.empty(a_shape))
        self.B = nn.Parameter(torch.empty(b_shape))
        with torch.no_grad():
            self.A.copy_(a_val.to(self.A.device, self.A.dtype))
            self.B.zero_()
        sharded, replicated, dim = (self.B, self.A, 0) if self.column else (self.A, self.B, 1)
        set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=dim, stride=1)
        replicated.tensor_model_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (column: replicated) or [..., in/tp] (row: sharded) -> [..., out/tp] / [..., out]."""
        h = x @ self.A.t().to(x.dtype)  # [..., r]
        # column: backward all-reduces dh over TP (A is replicated); row: sums the partial products
        h = (
            copy_to_tensor_model_parallel_region(h, self.tp_group)
            if self.column
            else reduce_from_tensor_model_parallel_region(h, self.tp_group)
        )
        return (h @ self.B.t().to(x.dtype)) * self.scale


def add_lora(model: nn.Module, lora: LoraConfig, seed: int) -> None:
    """Attach adapters for ``lora.targets`` to every block of a model (in place; its ``cfg`` and
    ``dims`` say the shapes and the TP layout)."""
    shapes = target_projections(model.cfg, lora.targets)
    for i, block in enumerate(model.layers):
        block.lora = nn.ModuleDict(
            {
                t: LoraAdapter(t, out, inp, kind == "column", lora, _seed_for(seed, i, t), model.dims)
                for t, out, inp, kind in shapes
            }
        )


def is_lora_name(name: str) -> bool:
    return LORA_KEY in f".{name}"


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """Every non-LoRA parameter stops requiring grad; returns (trainable, total) local element
    counts (ZeRO-3 partitions counted by their full size, ``ds_numel``)."""
    trainable = total = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if is_lora_name(name):
            p.requires_grad_(True)
            trainable += n
        else:
            p.requires_grad_(False)
    return trainable, total


def merge_lora(state: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, torch.Tensor]:
    """Full (gathered, TP=1) state with adapters -> the same state without them, each target's
    weight replaced by ``W + (alpha / r) * B @ A`` (computed in fp32, stored in W's dtype)."""
    out = {k: v for k, v in state.items() if not is_lora_name(k)}
    for name in state:
        if not (is_lora_name(name) and name.endswith(".A")):
            continue
        prefix, target = name[: -len(".A")].split(".lora.")  # "layers.3", "gate"
        w_name = f"{prefix}.{target}.weight"
        a, b = state[name].float(), state[f"{prefix}.lora.{target}.B"].float()
        w = out[w_name]
        out[w_name] = (w.float() + lora.scale * (b @ a)).to(w.dtype)
    return out

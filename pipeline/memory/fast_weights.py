"""Fast weights: the per-batch (or per-sample) parametric memory of MemDLM.

They are plain tensors made fresh for every batch and passed to the layers as forward
arguments. Never ``nn.Parameter``s: ZeRO-3 partitions every parameter of the module, and
per-batch values set on a partitioned parameter are lost at the next gather (inner gradients
then come out as zeros, silently). Never in the outer optimizer, the outer gradient clip or a
checkpoint.

Shapes per adapted linear ``W`` (out x in), ``r`` = rank, leading ``[B]`` in ``sample`` scope:

==============  =====================================  =====================================
                column-parallel (qkv, gate, up)        row-parallel (out, down)
==============  =====================================  =====================================
LoRA ``A``      [r, in]  replicated over TP             [r, in/tp]  sharded like W
LoRA ``B``      [out/tp, r]  sharded like W             [out, r]  replicated
full ``W``      [out/tp, in]  sharded like W            [out, in/tp]  sharded like W
==============  =====================================  =====================================

Output: ``W x + (alpha / r) * B A x`` (LoRA) or ``(W + dW) x`` (full). A starts
Kaiming-uniform (a = sqrt(5), like ``nn.Linear``) and B (or dW) at zero, so a fresh memory
changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class FastWeights:
    """One memory: tensors per layer plus which of them are sharded over TP.

    ``by_layer[i]`` maps ``"<target>.<A|B|W>"`` (and ``"scale"``) to tensors; ``leaves()`` lists
    the trainable ones in a fixed order. ``per_sample`` means every tensor has a leading
    batch dimension.
    """

    by_layer: dict[int, dict[str, torch.Tensor]]
    sharded: dict[tuple[int, str], bool]
    per_sample: bool
    names: list[tuple[int, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [(i, k) for i in sorted(self.by_layer) for k in sorted(self.by_layer[i]) if k != "scale"]

    def leaves(self) -> list[torch.Tensor]:
        return [self.by_layer[i][k] for i, k in self.names]

    def with_values(self, values: list[torch.Tensor]) -> FastWeights:
        """Same layout, new tensors (in ``names`` order)."""
        by_layer = {i: {"scale": d["scale"]} for i, d in self.by_layer.items()}
        for (i, k), v in zip(self.names, values, strict=True):
            by_layer[i][k] = v
        return FastWeights(by_layer, self.sharded, self.per_sample)

    def detached(self, requires_grad: bool = False) -> FastWeights:
        return self.with_values([v.detach().requires_grad_(requires_grad) for v in self.leaves()])


@dataclass(frozen=True)
class FastWeightSpec:
    """Which layers/projections carry fast weights and how to make a fresh memory for them.

    ``shapes`` maps each target projection to its full (unsharded) ``(out, in)`` and how tensor
    parallelism splits it (``column`` or ``row``), as the model family describes it."""

    layers: tuple[int, ...]
    shapes: tuple[tuple[str, int, int, str], ...]  # (target, out, in, "column" | "row")
    adapter: str  # "lora" | "full"
    rank: int
    alpha: float

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t, *_ in self.shapes)

    @staticmethod
    def first_memory_layer(n_layers: int, fraction: float) -> int:
        """``int(L * (1 - fraction))``: 8 layers -> 7; 24 -> 21 (docs/method.md section 2)."""
        return min(n_layers - 1, max(0, int(n_layers * (1 - fraction))))

    def global_shape(self, target: str) -> tuple[int, int]:
        """(out, in) of ``target``'s full weight."""
        for name, out, inp, _ in self.shapes:
            if name == target:
                return out, inp
        raise KeyError(target)

    def is_column(self, target: str) -> bool:
        return next(kind for name, _, _, kind in self.shapes if name == target) == "column"

    def reset(
        self,
        batch_size: int | None,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        tp_rank: int = 0,
        tp: int = 1,
    ) -> FastWeights:
        """A fresh memory: A ~ Kaiming-uniform (drawn from ``generator``, on ``device``), B / dW = 0.

        ``batch_size=None`` gives one memory (``batch`` scope); an int gives one per sample,
        all starting from the same A (the memory's content is what the inner loop writes).
        The full A is drawn on every rank and sliced for TP rank ``tp_rank`` of ``tp``, so values
        do not depend on the TP size.
        """
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        sharded: dict[tuple[int, str], bool] = {}

        def expand(t: torch.Tensor) -> torch.Tensor:
            if batch_size is None:
                return t.requires_grad_(True)
            return t.unsqueeze(0).expand(batch_size, *t.shape).clone().requires_grad_(True)

        for layer in self.layers:
            d: dict[str, torch.Tensor] = {"scale": torch.tensor(self.alpha / self.rank, device=device)}
            for target, out, inp, kind in self.shapes:
                column = kind == "column"
                if self.adapter == "full":
                    shape = (out // tp, inp) if column else (out, inp // tp)
                    d[f"{target}.W"] = expand(torch.zeros(shape, device=device))
                    sharded[(layer, f"{target}.W")] = tp > 1
                    continue
                bound = 1.0 / math.sqrt(inp)  # kaiming_uniform_(a=sqrt(5)) on fan_in = inp
                a_full = torch.empty(self.rank, inp, device=device).uniform_(
                    -bound, bound, generator=generator
                )
                if column:
                    d[f"{target}.A"] = expand(a_full)
                    d[f"{target}.B"] = expand(torch.zeros(out // tp, self.rank, device=device))
                    sharded[(layer, f"{target}.A")], sharded[(layer, f"{target}.B")] = False, tp > 1
                else:
                    shard = inp // tp
                    d[f"{target}.A"] = expand(a_full[:, tp_rank * shard : (tp_rank + 1) * shard].contiguous())
                    d[f"{target}.B"] = expand(torch.zeros(out, self.rank, device=device))
                    sharded[(layer, f"{target}.A")], sharded[(layer, f"{target}.B")] = tp > 1, False
            by_layer[layer] = d
        return FastWeights(by_layer, sharded, per_sample=batch_size is not None)

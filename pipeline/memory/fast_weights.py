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

A routed expert projection (``expert``: the E experts of a mixture-of-experts layer, never split
over TP) has one adapter per expert, stacked: A [E, r, in], B [E, out, r], dW [E, out, in]; the
inner loop clips each expert's slice as a tensor of its own. A memory shared by the whole global
batch (``batch`` scope synced over DP) under expert parallelism is sharded with the experts: EP
rank r holds only its experts' adapters, [E/ep, ...] (``experts_sharded``); otherwise every rank
holds all E (each of its tokens may reach any expert with its own rank's memory).

Output: ``W x + (alpha / r) * B A x`` (LoRA) or ``(W + dW) x`` (full). A starts
Kaiming-uniform (a = sqrt(5), like ``nn.Linear``) and B (or dW) at zero, so a fresh memory
changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class FastWeights:
    """One memory: tensors per layer plus which of them are sharded over TP or stacked per expert.

    ``by_layer[i]`` maps ``"<target>.<A|B|W>"`` (and ``"scale"``) to tensors; ``leaves()`` lists
    the trainable ones in a fixed order. ``per_sample`` means every tensor has a leading
    batch dimension; an expert tensor's next dimension is the expert (``experts``).
    """

    by_layer: dict[int, dict[str, torch.Tensor]]
    sharded: dict[tuple[int, str], bool]
    per_sample: bool
    experts: frozenset[tuple[int, str]] = frozenset()
    experts_sharded: bool = False  # expert tensors hold this EP rank's experts only
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
        return FastWeights(by_layer, self.sharded, self.per_sample, self.experts, self.experts_sharded)

    def detached(self, requires_grad: bool = False) -> FastWeights:
        return self.with_values([v.detach().requires_grad_(requires_grad) for v in self.leaves()])


@dataclass(frozen=True)
class FastWeightTarget:
    """One adapted projection: its full (unsharded) ``out x in`` weight, how tensor parallelism
    splits it (``column`` / ``row``), or ``expert``: ``experts`` routed experts' weights."""

    name: str
    out: int
    inp: int
    kind: Literal["column", "row", "expert"]
    experts: int = 1


@dataclass(frozen=True)
class FastWeightSpec:
    """Which layers/projections carry fast weights and how to make a fresh memory for them.

    ``targets[j]`` are the adapted projections of layer ``layers[j]`` as the model family
    describes them (layers of one model may differ: dense and mixture-of-experts layers)."""

    layers: tuple[int, ...]
    targets: tuple[tuple[FastWeightTarget, ...], ...]
    adapter: str  # "lora" | "full"
    rank: int
    alpha: float

    @staticmethod
    def first_memory_layer(n_layers: int, fraction: float) -> int:
        """``int(L * (1 - fraction))``: 8 layers -> 7; 24 -> 21 (docs/method.md section 2)."""
        return min(n_layers - 1, max(0, int(n_layers * (1 - fraction))))

    def targets_of(self, layer: int) -> tuple[FastWeightTarget, ...]:
        return self.targets[self.layers.index(layer)]

    def floats_per_rank(self, tp: int, ep: int = 1) -> float:
        """Fast-weight elements one memory holds per rank (all memory layers); ``ep``: the EP size
        its expert adapters are sharded over (1: all on every rank)."""
        total = 0.0
        for targets in self.targets:
            for t in targets:
                if t.kind == "expert" and ep > 1:
                    t = FastWeightTarget(t.name, t.out, t.inp, t.kind, t.experts // ep)
                if self.adapter == "full":
                    total += t.out * t.inp * t.experts / (1 if t.kind == "expert" else tp)
                elif t.kind == "expert":
                    total += self.rank * (t.inp + t.out) * t.experts
                elif t.kind == "column":
                    total += self.rank * (t.inp + t.out / tp)
                else:
                    total += self.rank * (t.inp / tp + t.out)
        return total

    def reset(
        self,
        batch_size: int | None,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        tp_rank: int = 0,
        tp: int = 1,
        dtype: torch.dtype = torch.float32,
        ep_rank: int = 0,
        ep: int = 1,
    ) -> FastWeights:
        """A fresh memory: A ~ Kaiming-uniform (drawn from ``generator``, on ``device``), B / dW = 0.

        ``batch_size=None`` gives one memory (``batch`` scope); an int gives one per sample,
        all starting from the same A (the memory's content is what the inner loop writes).
        The full A is drawn on every rank and sliced for TP rank ``tp_rank`` of ``tp``, so values
        do not depend on the TP size (nor, for experts, on the EP size: every rank holds all).
        Values are drawn in float32 and held in ``dtype`` (float64 for a float64 model), so the
        draw is the same in every precision. With ``ep`` > 1 expert adapters are sharded: EP rank
        ``ep_rank`` keeps its block of experts (of the full draw).
        """
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        sharded: dict[tuple[int, str], bool] = {}
        experts: set[tuple[int, str]] = set()

        def expand(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dtype)
            if batch_size is None:
                return t.requires_grad_(True)
            return t.unsqueeze(0).expand(batch_size, *t.shape).clone().requires_grad_(True)

        for layer, targets in zip(self.layers, self.targets, strict=True):
            d: dict[str, torch.Tensor] = {"scale": torch.tensor(self.alpha / self.rank, device=device)}
            for t in targets:
                for key, (value, is_sharded) in self._fresh(t, generator, device, tp_rank, tp).items():
                    if t.kind == "expert" and ep > 1:
                        local = t.experts // ep
                        value = value[ep_rank * local : (ep_rank + 1) * local].clone()
                    d[key] = expand(value)
                    sharded[(layer, key)] = is_sharded
                    if t.kind == "expert":
                        experts.add((layer, key))
            by_layer[layer] = d
        return FastWeights(
            by_layer, sharded, batch_size is not None, frozenset(experts), ep > 1 and bool(experts)
        )

    def _fresh(
        self, t: FastWeightTarget, generator: torch.Generator, device, tp_rank: int, tp: int
    ) -> dict[str, tuple[torch.Tensor, bool]]:
        """One target's fresh tensors and whether each is sharded over TP."""
        column, expert = t.kind == "column", t.kind == "expert"
        lead = (t.experts,) if expert else ()
        if self.adapter == "full":
            shape = (t.out, t.inp) if expert else (t.out // tp, t.inp) if column else (t.out, t.inp // tp)
            return {f"{t.name}.W": (torch.zeros(*lead, *shape, device=device), tp > 1 and not expert)}
        bound = 1.0 / math.sqrt(t.inp)  # kaiming_uniform_(a=sqrt(5)) on fan_in = inp
        a_full = torch.empty(*lead, self.rank, t.inp, device=device).uniform_(
            -bound, bound, generator=generator
        )
        if expert:
            b = torch.zeros(t.experts, t.out, self.rank, device=device)
            return {f"{t.name}.A": (a_full, False), f"{t.name}.B": (b, False)}
        if column:
            b = torch.zeros(t.out // tp, self.rank, device=device)
            return {f"{t.name}.A": (a_full, False), f"{t.name}.B": (b, tp > 1)}
        shard = t.inp // tp
        a = a_full[:, tp_rank * shard : (tp_rank + 1) * shard].contiguous()
        return {
            f"{t.name}.A": (a, tp > 1),
            f"{t.name}.B": (torch.zeros(t.out, self.rank, device=device), False),
        }

"""The routed experts of one EP rank as fused 3-D weights, with MemDLM's per-expert fast weights.

    experts = GroupedExperts(cfg, first=ep_rank * E_local, n_local=E_local, ...)
    y = experts(rows, counts, fast, memory_of_row)   # rows [M, D] grouped by local expert

Weights (DeepSpeed AutoEP's names and layouts, which its ZeRO-3 expert placement and checkpoint
code read): ``w1`` gate [E_local, F, D], ``w3`` up [E_local, F, D], ``w2`` down [E_local, D, F].
Every rank draws the weights of *all* E experts from the same generator state and keeps its
slice, so values do not depend on the EP (or TP) size.

All local experts live in one module called once per MoE forward, even for an expert (or a rank)
that receives no rows: ZeRO-3 gathers and reduces ``w1/w2/w3`` in this module's hooks, and every
rank must take part in them.

Fast weights (``fast``): ``{gate,up,down}.{A,B}`` (low rank, with ``scale``) or ``.W`` (full),
each [S, E_local, ...]: S memories (``memory_of_row`` [M] says which one each row uses; None when
S = 1). Expert e computes ``W_e x + scale * B_e (A_e x)`` per projection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_WEIGHTS = {"gate": "w1", "up": "w3", "down": "w2"}


class GroupedExperts(nn.Module):
    def __init__(
        self,
        n_experts: int,
        first: int,
        n_local: int,
        d_model: int,
        hidden: int,
        init: Callable[[torch.Tensor], object],
        init_out: Callable[[torch.Tensor], object],
        dtype: torch.dtype,
    ):
        super().__init__()
        for name, shape, fill in (
            ("w1", (n_experts, hidden, d_model), init),
            ("w2", (n_experts, d_model, hidden), init_out),
            ("w3", (n_experts, hidden, d_model), init),
        ):
            full = torch.empty(shape, dtype=dtype)
            fill(full)  # all experts drawn on every rank: EP-size invariant values
            setattr(self, name, nn.Parameter(full[first : first + n_local].clone()))

    def forward(
        self,
        rows: torch.Tensor,
        counts: list[int],
        fast: Mapping[str, torch.Tensor] | None = None,
        memory_of_row: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """rows [M, D] grouped by local expert (``counts[e]`` rows each) -> outputs [M, D]."""
        # One unbind per tensor, not an index per expert: the backward of E selects would add E
        # full-size zero-padded gradients; unbind's stacks the E slices once.
        weights = {name: getattr(self, w).unbind(0) for name, w in EXPERT_WEIGHTS.items()}
        deltas = _per_expert(fast)
        outs, start = [], 0
        for e, xe in enumerate(rows.split(counts)):
            mem = None if memory_of_row is None else memory_of_row[start : start + counts[e]]
            start += counts[e]
            g = self._project("gate", xe, weights, e, deltas, mem)
            u = self._project("up", xe, weights, e, deltas, mem)
            outs.append(self._project("down", F.silu(g) * u, weights, e, deltas, mem))
        return torch.cat(outs) if outs else rows

    def _project(
        self,
        name: str,
        x: torch.Tensor,
        weights: dict[str, tuple[torch.Tensor, ...]],
        e: int,
        deltas: dict[str, tuple[torch.Tensor, ...] | torch.Tensor],
        mem: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [m, in] through expert e's projection ``name``, plus its fast-weight delta."""
        y = x @ weights[name][e].t()
        if name + ".W" in deltas:
            return y + _rows_matmul(x, deltas[name + ".W"][e], mem)
        if name + ".A" not in deltas:
            return y
        u = _rows_matmul(x, deltas[name + ".A"][e], mem)  # [m, r]
        return y + deltas["scale"].to(x.dtype) * _rows_matmul(u, deltas[name + ".B"][e], mem)


def _per_expert(
    fast: Mapping[str, torch.Tensor] | None,
) -> dict[str, tuple[torch.Tensor, ...] | torch.Tensor]:
    """Fast weights [S, E_local, ...] -> per expert [S, ...] (one unbind each); ``scale`` as is."""
    if fast is None:
        return {}
    return {k: v if k == "scale" else v.unbind(1) for k, v in fast.items()}


def _rows_matmul(x: torch.Tensor, m: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
    """x [n, i] times m^T row by row: m [S, o, i]; row j uses memory ``mem[j]`` (all use m[0]
    when ``mem`` is None) -> [n, o]."""
    if mem is None:
        return x @ m[0].t().to(x.dtype)
    return torch.einsum("ni,noi->no", x, m.index_select(0, mem).to(x.dtype))

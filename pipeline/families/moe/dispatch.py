"""Token dispatch over the expert-parallel group: each EP rank holds ``E / ep`` experts; a token's
copies travel by all-to-all to the ranks of its experts and come back the same way.

    plan = DispatchPlan.of(counts, ep_group, n_local)   # counts [E]: this rank's choices per expert
    rows = plan.send(rows)          # [sum(counts), D] sorted by expert -> [received, D]
    rows = rows[plan.by_expert]     # grouped by local expert (rows arrive grouped by source rank)
    out = plan.back(y)              # the reverse trip

The all-to-alls are autograd functions whose backward is the reverse all-to-all, so gradients
(of the base weights in the outer pass, of the fast weights in MemDLM's inner loop) flow across
ranks exactly. Split sizes cross the host once per layer (gloo and NCCL want lists). A rank that
receives no tokens still joins every collective: all EP ranks run the same layers in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The reverse trip, itself differentiable (the inner loop differentiates through it).
        return None, _AllToAll.apply(ctx.group, grad.contiguous(), ctx.in_splits, ctx.out_splits), None, None


def all_to_all(group, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Rows of ``x`` [sum(in_splits), ...]: block j goes to rank j of ``group``; returns the
    received rows [sum(out_splits), ...], block j from rank j."""
    return _AllToAll.apply(group, x, out_splits, in_splits)


@dataclass
class DispatchPlan:
    """Who sends how many rows to whom, for one MoE forward."""

    group: object  # the EP process group (None: one EP rank, no communication)
    in_splits: list[int]  # rows this rank sends to each EP rank
    out_splits: list[int]  # rows it receives from each
    local_counts: list[int]  # received rows per local expert (all sources)
    by_expert: torch.Tensor | None  # [received] order that groups the received rows by local expert
    source: torch.Tensor | None  # [received] EP rank each received row (in by_expert order) came from

    @classmethod
    def of(cls, counts: torch.Tensor, group, n_local: int) -> DispatchPlan:
        """``counts`` [E]: this rank's rows per expert (its rows sorted by expert)."""
        ep = 1 if group is None else dist.get_world_size(group)
        if ep == 1:
            local = counts.tolist()
            return cls(None, [sum(local)], [sum(local)], local, None, None)
        send = counts.view(ep, n_local)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=group)
        recv_cpu = recv.cpu()
        # Received rows: block s from source s, inside it sorted by local expert.
        expert_of_row = torch.arange(n_local).repeat(ep).repeat_interleave(recv_cpu.reshape(-1))
        source_of_row = torch.arange(ep).repeat_interleave(recv_cpu.sum(1))
        by_expert = torch.argsort(expert_of_row, stable=True)
        return cls(
            group,
            send.sum(1).tolist(),
            recv_cpu.sum(1).tolist(),
            recv_cpu.sum(0).tolist(),
            by_expert.to(counts.device),
            source_of_row[by_expert].to(counts.device),
        )

    def send(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (sorted by expert) -> the rows of its local experts, grouped by expert."""
        if self.group is None:
            return rows
        return all_to_all(self.group, rows, self.out_splits, self.in_splits).index_select(0, self.by_expert)

    def back(self, rows: torch.Tensor) -> torch.Tensor:
        """The experts' outputs (grouped by local expert) -> this rank's rows, sorted by expert."""
        if self.group is None:
            return rows
        ungrouped = torch.empty_like(rows).index_copy(0, self.by_expert, rows)
        return all_to_all(self.group, ungrouped, self.in_splits, self.out_splits)


def exchange_expert_tensor(t: torch.Tensor, group, n_local: int) -> torch.Tensor:
    """A per-rank tensor over all experts -> every rank's slice of this rank's local experts.

    ``t`` [S, E, ...] (S memories of this rank: one per sample, or 1) -> [ep * S, E_local, ...],
    block s holding source rank s's memories for this rank's experts (rank r's local experts are
    ``r * E_local ... (r + 1) * E_local - 1``). Differentiable: gradients return to their owner."""
    ep = dist.get_world_size(group)
    S, rest = t.shape[0], t.shape[2:]
    blocks = t.reshape(S, ep, n_local, *rest).transpose(0, 1).reshape(ep * S, n_local, *rest)
    return all_to_all(group, blocks, [S] * ep, [S] * ep)

"""One mixture-of-experts FFN: router, routed experts (expert-parallel), shared experts.

    moe = build_moe_layer(cfg, mp, dims, index=i, log=log, init=..., init_out=...)
    y = moe(h, fast)          # h [B, T, D] (normed) -> [B, T, D]

Per token: the router picks ``top_k`` experts; the token's copies are sorted by expert, sent to
the EP ranks holding them (pipeline/families/moe/dispatch.py), run through those experts
(pipeline/families/moe/experts.py), sent back, and summed with the routing weights; the shared
experts (megatron TP linears, sharded like a dense FFN) run on every token. Dropless: every
choice reaches its expert.

DeepSpeed ZeRO-3 handles expert parameters only for layers it recognises as its own AutoEP
layers (it checks ``isinstance``): the class built by :func:`moe_layer_class` derives from
DeepSpeed's ``AutoEPMoELayer`` *without running its constructor* (which converts a Hugging Face
block) and carries the attributes its engine reads: the experts are partitioned over the
expert-data-parallel group, their gradients reduced there, their norm counted once, and
checkpoints record which experts each rank holds, so a universal checkpoint can resume at
another EP size. No ``expert_parallel`` key in the DeepSpeed config: that starts AutoEP's own
module replacement, which refuses megatron tensor parallelism.

MemDLM's fast weights: ``experts.{gate,up,down}.{A,B}`` [E, ...] (or [B, E, ...] per sample) for
every expert on every rank, and ``shared.{gate,up,down}.{A,B}`` as pipeline/model/delta.py. With
EP > 1 each rank's memories of this rank's experts travel with the tokens (an all-to-all of the
fast weights, differentiable: the inner gradient returns to the memory it belongs to).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from megatron.core import ModelParallelConfig
from torch import nn

from pipeline.families.dense.model import column_linear, row_linear
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.dispatch import DispatchPlan, exchange_expert_tensor
from pipeline.families.moe.experts import GroupedExperts
from pipeline.families.moe.router import Router, Routing, RoutingStats, routing_stats
from pipeline.model.delta import delta_linear
from pipeline.parallel.dims import ParallelDims
from pipeline.patches.deepspeed import skip_shm_comm_build

Init = Callable[[torch.Tensor], object]


class RoutingLog:
    """Routing statistics of the training passes, collected by the model's MoE layers.

    The model turns ``recording`` on for its own ``forward`` in training mode with autograd on
    (the passes the optimizer step is computed from); the memory's inner passes (which call the
    layers directly), evaluation and the recompute of checkpointed layers are not recorded."""

    def __init__(self) -> None:
        self.recording = False
        self.records: list[tuple[int, RoutingStats]] = []

    def take(self) -> list[tuple[int, RoutingStats]]:
        out, self.records = self.records, []
        return out


class SharedExperts(nn.Module):
    """The shared experts as one SwiGLU MLP (their joint width), TP-sharded like a dense FFN."""

    def __init__(
        self, d: int, hidden: int, mp: ModelParallelConfig, dims: ParallelDims, init: Init, init_out: Init
    ):
        super().__init__()
        self.gate = column_linear(d, hidden, mp, init, dims.tp_group)
        self.up = column_linear(d, hidden, mp, init, dims.tp_group)
        self.down = row_linear(hidden, d, mp, init_out, dims.tp_group)

    def forward(self, h: torch.Tensor, fast: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """h [B, T, D] -> [B, T, D]; ``fast``: ``{gate,up,down}.{A,B}`` and ``scale`` (or None)."""
        g = delta_linear(self.gate, h, fast, "gate")
        u = delta_linear(self.up, h, fast, "up")
        return delta_linear(self.down, torch.nn.functional.silu(g) * u, fast, "down")


def _sub(fast: Mapping[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of ``fast`` under ``prefix.`` (prefix stripped) plus ``scale``; None if none."""
    if not fast:
        return None
    out = {k[len(prefix) + 1 :]: v for k, v in fast.items() if k.startswith(prefix + ".")}
    if not out:
        return None
    if "scale" in fast:
        out["scale"] = fast["scale"]
    return out


class MoELayer(nn.Module):
    """The layer's logic (see the module docstring); :func:`moe_layer_class` adds DeepSpeed's base."""

    def __init__(
        self,
        cfg: MoEConfig,
        mp: ModelParallelConfig,
        dims: ParallelDims,
        *,
        index: int,
        log: RoutingLog,
        init: Init,
        init_out: Init,
    ):
        nn.Module.__init__(self)  # not AutoEPMoELayer.__init__: it converts a Hugging Face block
        E, ep = cfg.n_experts, dims.ep
        self.cfg, self.index, self.log = cfg, index, log
        self.ep_group = dims.ep_group if ep > 1 else None
        self.num_experts, self.num_local_experts = E, E // ep
        self.ep_size, self.ep_rank = ep, dims.ep_rank
        self.top_k = cfg.top_k
        self.router = Router(cfg, init, mp.params_dtype)
        self.experts = GroupedExperts(
            E, dims.ep_rank * self.num_local_experts, self.num_local_experts, cfg.d_model,
            cfg.moe_ffn_hidden, init, init_out, mp.params_dtype,
        )  # fmt: skip
        self.shared = (
            SharedExperts(cfg.d_model, cfg.shared_hidden, mp, dims, init, init_out)
            if cfg.shared_hidden
            else None
        )
        self.shared_gate = (
            nn.Linear(cfg.d_model, 1, bias=False, dtype=mp.params_dtype) if cfg.shared_expert_gate else None
        )
        if self.shared_gate is not None:
            init(self.shared_gate.weight)
        _describe_for_deepspeed(self, dims)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False, folding_group_handles=None):
        """Called by DeepSpeed's engine on every AutoEP layer. Our groups exist already (created
        with the model's parallel dims); the inherited method would create AutoEP's own, whose
        expert-data-parallel groups span TP peers and double-count expert gradients."""
        if folding_group_handles is not None:
            raise ValueError("AutoEP tensor-parallel folding is not used by this layer")

    def forward(self, h: torch.Tensor, fast: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """h [B, T, D] -> [B, T, D]: routed experts + shared experts."""
        B, T, D = h.shape
        flat = h.reshape(B * T, D)
        routing = Routing(*self.router(flat))
        routed, plan = self._routed(flat, routing.experts, routing.weights, _sub(fast, "experts"), T)
        if self.log.recording:
            stats = routing_stats(routing, self.cfg)
            stats.processed = sum(plan.local_counts)  # what this rank's experts computed
            self.log.records.append((self.index, stats))
        y = routed.view(B, T, D)
        if self.shared is not None:
            s = self.shared(h, _sub(fast, "shared"))
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h)) * s
            y = y + s
        return y

    def _routed(
        self,
        flat: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        fast: dict[str, torch.Tensor] | None,
        seq_len: int,
    ) -> tuple[torch.Tensor, DispatchPlan]:
        """flat [N, D], experts/weights [N, k] -> the weighted sum of each token's experts [N, D]
        (and the dispatch plan)."""
        N, K = experts.shape
        choice = experts.reshape(-1)
        order = torch.argsort(choice, stable=True)  # the N*k copies sorted by expert
        counts = torch.bincount(choice, minlength=self.num_experts)
        plan = DispatchPlan.of(counts, self.ep_group, self.num_local_experts)
        rows = plan.send(flat.index_select(0, order // K))
        fast_local, memory_of_row = self._memories(fast, order // K // seq_len, plan)
        out = plan.back(self.experts(rows, plan.local_counts, fast_local, memory_of_row))
        out = torch.empty_like(out).index_copy(0, order, out).view(N, K, -1)
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(1), plan

    def _memories(
        self, fast: dict[str, torch.Tensor] | None, sample_of_copy: torch.Tensor, plan: DispatchPlan
    ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """This rank's experts' fast weights [S', E_local, ...] and the memory each received row
        uses (None: every row uses the one memory). ``fast`` holds per-sample memories [B, E, ...]
        or one per batch [E, ...] (or [E_local, ...]: sharded with the experts, used as it is);
        ``sample_of_copy`` [N*k] is the sample of each sent row. With EP > 1 every source rank's
        memories of this rank's experts are received (source-major)."""
        if fast is None:
            return None, None
        per_sample = next(v for k, v in fast.items() if k != "scale").dim() == 4
        lead = {k: v if k == "scale" or per_sample else v.unsqueeze(0) for k, v in fast.items()}
        if plan.group is None:
            return lead, sample_of_copy if per_sample else None
        if next(v for k, v in lead.items() if k != "scale").shape[1] == self.num_local_experts:
            # a global-batch memory sharded with the experts: this rank holds its experts' part
            return lead, None
        S = next(v for k, v in lead.items() if k != "scale").shape[0]
        received = {
            k: v if k == "scale" else exchange_expert_tensor(v, plan.group, self.num_local_experts)
            for k, v in lead.items()
        }
        memory = plan.source * S
        if per_sample:
            memory = memory + plan.send(sample_of_copy.unsqueeze(1)).squeeze(1)
        return received, memory


def _describe_for_deepspeed(layer: MoELayer, dims: ParallelDims) -> None:
    """The attributes DeepSpeed's engine reads from an AutoEP layer and its expert parameters
    (DeepSpeed 0.19.8: engine placement, gradient reduction, checkpoint metadata)."""
    # heavy: DeepSpeed takes seconds to import (and picks its accelerator then: after the patch)
    from deepspeed.checkpoint.autoep_affine import (
        autoep_experts_for_rank,
        autoep_placement_to_affine_map,
        legacy_uniform_autoep_placement_descriptor,
    )
    from deepspeed.checkpoint.constants import (
        AFFINE_MAP,
        AUTOEP_EXPERT_PLACEMENT,
        AUTOEP_PARAM_EP_RANK,
        AUTOEP_PARAM_LOCAL_EXPERTS,
        AUTOEP_PARAM_LOGICAL_SHAPE,
        DS_AUTOEP_UC_META,
    )

    layer.ep_group_name = dims.ep_group_name
    layer.expert_placement_descriptor = placement = legacy_uniform_autoep_placement_descriptor(
        layer.num_experts, layer.num_local_experts, layer.ep_size
    )
    local = list(autoep_experts_for_rank(placement, layer.ep_rank))
    for p in layer.experts.parameters():
        logical = [layer.num_experts, *p.shape[1:]]
        p.allreduce = False  # an expert parameter: broadcast and reduced within its EDP group only
        p.group_name = dims.ep_group_name
        p.is_expert_group = True
        p.ds_zero_placement_family = "autoep_expert"
        p.ds_zero_partition_group_name = dims.ep_group_name
        if dims.edp_group is not None:  # zero.Init partitions it over this group at creation
            p.ds_zero_partition_process_group = dims.edp_group
        setattr(p, DS_AUTOEP_UC_META, {
            AUTOEP_EXPERT_PLACEMENT: placement,
            AFFINE_MAP: autoep_placement_to_affine_map(placement, logical).to_dict(),
            AUTOEP_PARAM_LOGICAL_SHAPE: logical,
            AUTOEP_PARAM_EP_RANK: layer.ep_rank,
            AUTOEP_PARAM_LOCAL_EXPERTS: local,
        })  # fmt: skip


@functools.cache
def moe_layer_class() -> type[MoELayer]:
    """:class:`MoELayer` with DeepSpeed's ``AutoEPMoELayer`` as a base (see the module docstring)."""
    skip_shm_comm_build()  # before DeepSpeed's first import picks its accelerator
    # heavy: DeepSpeed takes seconds to import
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return type("ExpertParallelMoE", (MoELayer, AutoEPMoELayer), {"__module__": __name__})


def build_moe_layer(cfg: MoEConfig, mp: ModelParallelConfig, dims: ParallelDims, **kwargs) -> MoELayer:
    """A MoE layer DeepSpeed recognises as expert-parallel (``kwargs``: :class:`MoELayer`'s)."""
    return moe_layer_class()(cfg, mp, dims, **kwargs)

"""The mixture-of-experts family's model: the dense family's transformer with MoE feed-forwards.

    model = MoETransformer(cfg, dims)       # dims = init_distributed(tp, ep) (expert groups made)
    logits = model(tokens=tokens)           # the DLM interface of pipeline/families/registry.py
    aux = model.auxiliary_loss()            # after a training forward: the balancing losses
    metrics = model.end_step(dp_group, applied=True)   # after the optimizer step

Attention, embedding, head and the dense layers (``first_k_dense_replace``, ``mlp_only_layers``,
``decoder_sparse_step``) are the dense family's; a MoE layer's FFN is
pipeline/families/moe/layer.py. The balancing losses are added to the training loss by the
trainer (``auxiliary_loss``), so they are scaled with it under gradient accumulation; routing
statistics of the whole step (summed over data-parallel ranks) drive the score-bias update and
the ``moe/*`` metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig

from pipeline.families.dense.model import Block, DLMTransformer
from pipeline.families.moe.config import MoEConfig
from pipeline.families.moe.layer import MoELayer, RoutingLog, build_moe_layer
from pipeline.families.moe.router import update_score_bias
from pipeline.model.layers import LayerFast
from pipeline.parallel.dims import ParallelDims


class MoEBlock(Block):
    """A transformer block whose FFN is a mixture of experts (``self.moe``)."""

    def __init__(
        self, cfg: MoEConfig, mp: ModelParallelConfig, dims: ParallelDims, index: int, log: RoutingLog
    ):
        super().__init__(cfg, mp, dims)
        self.moe = build_moe_layer(
            cfg, mp, dims, index=index, log=log, init=self.init, init_out=self.init_out
        )

    def build_ffn(self, cfg: MoEConfig, mp: ModelParallelConfig, dims: ParallelDims) -> None:
        """No dense FFN: the experts (built after the attention) take its place."""

    def ffn(self, h: torch.Tensor, fast: LayerFast) -> torch.Tensor:
        return self.moe(h, fast)


class MoETransformer(DLMTransformer):
    def __init__(self, cfg: MoEConfig, dims: ParallelDims, *, params_dtype: torch.dtype = torch.float32):
        self.routing_log = RoutingLog()
        self._step: dict[int, torch.Tensor] = {}  # layer -> the step's routing sums (auxiliary_loss)
        super().__init__(cfg, dims, params_dtype=params_dtype)

    def make_block(self, cfg: MoEConfig, mp: ModelParallelConfig, dims: ParallelDims, index: int) -> Block:
        if cfg.is_moe_layer(index):
            return MoEBlock(cfg, mp, dims, index, self.routing_log)
        return Block(cfg, mp, dims)

    def moe_layers(self) -> list[MoELayer]:
        return [block.moe for block in self.layers if isinstance(block, MoEBlock)]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The DLM forward; a training pass (training mode, autograd on) records its routing."""
        log = self.routing_log
        log.recording = self.training and torch.is_grad_enabled()
        try:
            return super().forward(*args, **kwargs)
        finally:
            log.recording = False

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``aux_loss_coef * mean(aux) + z_loss_coef * mean(z)`` over the MoE layers of the
        training passes since the last call (None when nothing was recorded); their statistics
        are kept for :meth:`end_step`."""
        records = self.routing_log.take()
        if not records:
            return None
        cfg = self.cfg
        n = len(cfg.moe_layers())
        for index, st in records:
            # counts [E], then aux, z, entropy, passes, choices (N * k), rows the experts computed
            extra = [st.aux.detach(), st.z.detach(), st.entropy, 1.0, st.tokens * cfg.top_k, st.processed]
            row = torch.cat([st.counts, torch.tensor([float(v) for v in extra], dtype=st.counts.dtype,
                                                     device=st.counts.device)])  # fmt: skip
            self._step[index] = self._step[index] + row if index in self._step else row
        aux = sum(st.aux for _, st in records) / n
        z = sum(st.z for _, st in records) / n
        return cfg.aux_loss_coef * aux + cfg.z_loss_coef * z

    def end_step(self, dp_group, applied: bool) -> dict[str, float]:
        """After the optimizer step: sum the step's routing over the data-parallel ranks (one
        all-reduce), move the score biases (``applied`` steps only) and return the ``moe/*``
        metrics: per layer the load imbalance (max / mean choices per expert), the least-loaded
        expert's share of the mean, the balancing losses, the routing entropy; over all layers the
        worst imbalance and the choices no expert computed (0 unless tokens were lost)."""
        self.routing_log.take()
        step, self._step = self._step, {}
        if not applied or not step:
            return {}
        layers = sorted(step)
        flat = torch.stack([step[i] for i in layers])  # [layers, E + 6]
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(flat, group=dp_group)
        E, out = self.cfg.n_experts, {}
        routers = {m.index: m.router for m in self.moe_layers()}
        dropped = 0.0
        for i, row in zip(layers, flat, strict=True):
            counts, (aux, z, entropy, passes, choices, processed) = row[:E], row[E:].tolist()
            update_score_bias(routers[i], counts, self.cfg.score_bias_rate)
            mean = counts.mean().clamp(min=1e-12)
            out[f"moe/layer{i}/imbalance"] = float(counts.max() / mean)
            out[f"moe/layer{i}/min_load"] = float(counts.min() / mean)
            out[f"moe/layer{i}/aux_loss"] = aux / passes
            out[f"moe/layer{i}/z_loss"] = z / passes
            out[f"moe/layer{i}/entropy"] = entropy / passes
            dropped += choices - processed
        out["moe/imbalance"] = max(out[f"moe/layer{i}/imbalance"] for i in layers)
        out["moe/dropped_tokens"] = dropped
        return out

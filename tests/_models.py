"""Models for tests that build one directly (most go through the Trainer or the family registry)."""

from __future__ import annotations

from megatron.core import parallel_state

from pipeline.families.dense.model import DLMTransformer
from pipeline.model.config import ModelConfig
from pipeline.parallel.dims import ParallelDims, init_distributed


def current_dims() -> ParallelDims:
    """The dims of the process group a test (or a worker) already started: TP as megatron has it,
    else a one-process TP=1 world."""
    tp = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    return init_distributed(tp=tp)


def dense_model(cfg: ModelConfig, dims: ParallelDims | None = None) -> DLMTransformer:
    """The dense family's model of ``cfg`` at ``dims`` (default: :func:`current_dims`)."""
    return DLMTransformer(cfg, dims or current_dims())

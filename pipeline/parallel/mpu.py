"""DeepSpeed's ``mpu`` interface over megatron-core's ``parallel_state``.

Without it (``mpu=None`` with TP=2) ZeRO averages the TP shards across TP ranks: silently wrong.
DeepSpeed's expert-parallel groups are carved out of the data-parallel groups it reports
(pipeline/parallel/dims.py).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's parallel_state (no pipeline stages)."""

    def __init__(self) -> None:
        self.ps = parallel_state

    # tensor (= model) parallel
    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # no pipeline parallelism
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return None

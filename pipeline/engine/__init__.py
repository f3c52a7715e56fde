"""The distributed engine: DeepSpeed ZeRO-3 over megatron-core TP, checkpoints, export."""

"""The DLM: megatron-core tensor-parallel transformer, process groups, FLOPs."""

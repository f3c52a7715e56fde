"""Cost models above the model and the memory: FLOPs per step (for MFU) and bytes per rank."""

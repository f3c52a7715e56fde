"""MemDLM training pipeline: data, model, objectives, memory, engine."""

"""MemDLM training pipeline: data, model, objectives, memory, engine."""

from pipeline.warnings_filter import quiet_known_warnings

# Before megatron-core / DeepSpeed are imported by any pipeline module: their known-harmless
# warnings (pipeline/warnings_filter.py) would otherwise repeat at every start and every step.
quiet_known_warnings()

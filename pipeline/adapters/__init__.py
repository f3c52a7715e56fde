"""Trainable adapters on a frozen base (outer LoRA, the paper's fine-tuning recipe)."""

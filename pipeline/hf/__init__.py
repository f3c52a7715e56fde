"""Hugging Face format: import dense LLaMA/Qwen2/LLaDA checkpoints, export Llama/Qwen2 layouts.

``layouts.py`` holds the tensor-name and config-key mappings (written out there), ``convert.py``
the conversions; ``make import-hf`` / ``make export-hf`` call them through ``launch/hf.py``.
"""

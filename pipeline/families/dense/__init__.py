"""The dense family: bidirectional pre-norm transformer, fused-QKV attention (MHA or GQA, optional
Q/K/V biases, RoPE with optional scaling), SwiGLU FFN, on megatron-core tensor-parallel layers.
LLaMA-, Qwen2/Dream- and LLaDA-style checkpoints map onto it exactly (pipeline/families/dense/hf.py).
"""

from pipeline.families.dense.family import DENSE

__all__ = ["DENSE"]

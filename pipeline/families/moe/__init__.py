"""The mixture-of-experts family: the dense family's attention with routed and shared experts in
place of the FFN (all or some layers), expert-parallel under DeepSpeed ZeRO-3
(pipeline/families/moe/layer.py). LLaDA2 MoE, LLaDA-MoE / OLMoE, Qwen3-MoE and Qwen2-MoE layouts."""

from pipeline.families.moe.family import MOE

__all__ = ["MOE"]

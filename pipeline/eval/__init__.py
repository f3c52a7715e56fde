"""Evaluation: exposure bias, likelihood scoring, retrieval tasks, the lm-eval adapter."""

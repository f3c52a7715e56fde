"""What every part of the GPU check shares: the repository root, where the carried wheels and
corpus live (``bench/gpu_check/``, written by ``python -m bench.gpu_check prepare``), where the
report goes, and which packages the bare machine gets."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "bench" / "gpu_check"
DEFAULT_WHEELS = HERE / "wheels"
DEFAULT_CORPUS = HERE / "corpus.jsonl.gz"
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
# What the bare GPU machine lacks (its torch stays); pins come from requirements.txt.
RUNTIME_PACKAGES = [
    "deepspeed",
    "megatron-core",
    "webdataset",
    "sentencepiece",
    "submitit",
    "safetensors",
    "numpy",
    "pyyaml",
    "tqdm",
    "matplotlib",  # loss-curve and exposure-bias plots (not pinned: mlflow's dependency on the CPU)
]
OPTIONAL_PACKAGES = ["mlflow"]  # tracking: ~160 MB of wheels with its closure; off when absent
REQUIRED_IMPORTS = ["deepspeed", "megatron.core", "webdataset", "sentencepiece", "submitit", "safetensors"]
SCHEMA = 1

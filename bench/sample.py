"""Sampler throughput and the cost of inference-time adaptation, on a preset's random weights.

    python -m bench.sample [--preset small] [--batch 8] [--prompt 128] [--gen 64] [--block 16] [--precision auto]

Times ``DiffusionSampler.generate`` (one token committed per step, so ``gen`` forward passes
over prompt + response) with the memory off and with each prompt adapted first (the two-stage
inner loop on the prompt), best of ``--repeats``, in the precision training would pick on this
device (``auto``: bf16 autocast where native, fp32 on an AVX2-only CPU; ``--precision`` to force). Reports generated tokens/s,
the adaptation's own time and its share of a generation. Writes bench/results/sample.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import machine, sync, training_precision, write
from pipeline.config import load_config
from pipeline.families import family_of
from pipeline.memory.config import MemoryConfig
from pipeline.model.config import ModelConfig
from pipeline.parallel.dims import init_distributed
from pipeline.sampler import DiffusionSampler, SamplerConfig


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(
    preset: str,
    batch: int,
    prompt: int,
    gen: int,
    block: int,
    repeats: int,
    device: str,
    precision: str | None = None,
) -> dict:
    resolved = training_precision(precision, device)
    cfg = load_config(ModelConfig, f"configs/model/{preset}.yaml")
    torch.manual_seed(0)
    model = family_of(cfg).build(cfg, init_distributed(tp=1)).to(device).eval()
    sampler = DiffusionSampler(
        model, vocab_size=cfg.vocab_size, mask_id=4, pad_id=0, memory=MemoryConfig(enabled=True)
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(6, cfg.vocab_size, (prompt,), generator=g).tolist() for _ in range(batch)]
    base = dict(gen_length=gen, steps=gen, block_length=block, bf16=resolved.bf16)
    sampler.generate(prompts[:1], SamplerConfig(**{**base, "gen_length": block, "steps": block}))  # warm-up
    off = _best(lambda: sampler.generate(prompts, SamplerConfig(**base)), repeats)
    on = _best(lambda: sampler.generate(prompts, SamplerConfig(**base, adapt=True)), repeats)
    adapt = _best(lambda: sampler.adapt_prompts(prompts, bf16=resolved.bf16), repeats)
    return {
        "machine": machine(),
        "device": device,
        "precision": resolved.dtype,
        "precision_reason": resolved.reason,
        "preset": preset,
        "batch": batch,
        "prompt_tokens": prompt,
        "gen_tokens": gen,
        "block_length": block,
        "seconds_memory_off": off,
        "seconds_adapted": on,
        "seconds_adaptation_only": adapt,
        "tokens_per_s_memory_off": batch * gen / off,
        "tokens_per_s_adapted": batch * gen / on,
        "adaptation_share_of_generation": adapt / on,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None)
    p.add_argument("--out", default="sample")
    args = p.parse_args()
    os.environ.setdefault("MASTER_PORT", "29732")
    init_distributed(tp=1)
    result = run(
        args.preset,
        args.batch,
        args.prompt,
        args.gen,
        args.block,
        args.repeats,
        args.device,
        args.precision,
    )
    print(f"precision: {result['precision']} ({result['precision_reason']})")
    for k in (
        "tokens_per_s_memory_off",
        "tokens_per_s_adapted",
        "seconds_adaptation_only",
        "adaptation_share_of_generation",
    ):
        print(f"{k:32s} {result[k]:.4g}")
    write(args.out, result)


if __name__ == "__main__":
    main()

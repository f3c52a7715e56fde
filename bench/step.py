"""MemDLM vs MDLM step time on the small config, same batch, one process, alternating.

    python -m bench.step [--preset small] [--batch 8] [--steps 16] [--precision auto|bf16|fp32]

The precision is picked the way training picks it (``parallel.precision`` of the default training
config, ``auto`` unless ``--precision`` says otherwise, resolved by
``pipeline.hardware.precision.resolve_precision``): bf16 where the device multiplies it natively
(GPUs, AMX CPUs), fp32 on an AVX2-only CPU. Each step is forward + backward + AdamW; in bf16 under
autocast with bf16 weights in the model and fp32 masters in the optimizer (DeepSpeed's bf16 mode),
in fp32 with fp32 weights throughout. MFU is against ``pipeline.hardware.peak.peak_flops`` in that
dtype (``--peak-tflops``, else the table of known GPUs' dense bf16 peaks, else a cached matmul
measurement time-boxed to ``--peak-budget`` s), as the trainer computes it. Also the FLOP ratio from
``estimate_flops`` (the lower bound the measured time ratio is compared to).
Writes bench/results/<--out>.json (default step.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.common import machine, precision_record, sync, training_precision, write
from pipeline.config import load_config
from pipeline.diffusion.config import ObjectiveConfig
from pipeline.diffusion.loss import mdlm_loss
from pipeline.diffusion.noise import draw_noise, maskable_positions
from pipeline.hardware.precision import Precision
from pipeline.memory.inner_loop import MemoryConfig, memdlm_loss, pre_anchor_masks
from pipeline.model.config import ModelConfig
from pipeline.model.parallel import init_distributed
from pipeline.model.transformer import DLMTransformer
from pipeline.perf.flops import estimate_flops, estimate_mfu

MASK_ID = 4


class StepBench:
    """One model + optimizer; ``step(method)`` runs a full training step on a fresh noise draw."""

    def __init__(
        self,
        preset: str,
        batch: int,
        device: str,
        seed: int = 0,
        memory: MemoryConfig | None = None,
        precision: Precision | None = None,
    ):
        self.cfg = load_config(ModelConfig, f"configs/model/{preset}.yaml")
        self.precision = precision or training_precision(None, device)
        torch.manual_seed(seed)
        # As DeepSpeed does: in bf16, bf16 weights in the model and fp32 masters in the optimizer;
        # in fp32, the optimizer steps the model's own fp32 weights.
        self.model = DLMTransformer(self.cfg).to(device=device, dtype=self.precision.torch_dtype)
        self.params = [p for p in self.model.parameters()]
        if self.precision.bf16:
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        else:
            self.master = self.params
        self.opt = torch.optim.AdamW(self.master, lr=1e-4)
        self.device = device
        g = torch.Generator(device).manual_seed(seed)
        self.tokens = torch.randint(
            6, self.cfg.vocab_size, (batch, self.cfg.seq_len), generator=g, device=device
        )
        self.obj = ObjectiveConfig()
        self.mem = memory or MemoryConfig(enabled=True)
        self.est = estimate_flops(self.cfg, self.mem)
        self.step_no = 0

    def step(self, method: str) -> tuple[float, float]:
        """Run one step; returns (seconds, model FLOPs of the step from estimate_flops)."""
        g = torch.Generator(self.device).manual_seed(1000 + self.step_no)
        self.step_no += 1
        noise = draw_noise(self.tokens, maskable_positions(self.tokens, 0), self.obj, MASK_ID, g)
        n_tok = self.tokens.numel()
        sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(
            torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision.bf16
        ):
            if method == "mdlm":
                loss = mdlm_loss(self.model, self.tokens, noise, self.obj)
            else:
                pre = pre_anchor_masks(
                    noise.mask, noise.maskable, self.mem.pre_anchor_scale, self.mem.pre_anchor_steps, g
                )
                loss = memdlm_loss(
                    self.model, self.model, self.tokens, noise, self.obj, self.mem, MASK_ID, g, pre_masks=pre
                ).loss
        loss.backward()
        if self.precision.bf16:
            for p, m in zip(self.params, self.master, strict=True):
                m.grad = p.grad.float()
                p.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.precision.bf16:
            with torch.no_grad():
                for p, m in zip(self.params, self.master, strict=True):
                    p.copy_(m)
        sync(self.device)
        seconds = time.perf_counter() - t0
        masked = float(noise.mask.sum())
        flops = self.est.mdlm_step(n_tok, masked)
        if method == "memdlm":
            flops += self.est.memdlm_extra(n_tok, [float(p.sum()) for p in pre], masked)
        return seconds, flops


def run(
    preset: str,
    batch: int,
    steps: int,
    device: str,
    precision: str | None = None,
    peak_tflops: float = 0.0,
    peak_budget_s: float = 6.0,
) -> dict:
    resolved = training_precision(precision, device)
    bench = StepBench(preset, batch, device, precision=resolved)
    for method in ("mdlm", "memdlm"):  # warm-up (allocator, autocast caches)
        bench.step(method)
        bench.step(method)
    times: dict[str, list[float]] = {"mdlm": [], "memdlm": []}
    flops: dict[str, list[float]] = {"mdlm": [], "memdlm": []}
    for _ in range(steps):
        for method in ("mdlm", "memdlm"):  # alternate so drift hits both equally
            s, f = bench.step(method)
            times[method].append(s)
            flops[method].append(f)
    med = {m: statistics.median(v) for m, v in times.items()}
    tokens = batch * bench.cfg.seq_len
    peak, peak_fields = precision_record(resolved, device, peak_tflops, peak_budget_s)
    mdlm_flops_per_s = statistics.mean(flops["mdlm"]) / med["mdlm"]
    result = {
        "preset": preset,
        "device": device,
        "batch": batch,
        "seq_len": bench.cfg.seq_len,
        "params": bench.cfg.num_params(),
        "steps": steps,
        "mdlm_step_s": med["mdlm"],
        "memdlm_step_s": med["memdlm"],
        "mdlm_tokens_per_s": tokens / med["mdlm"],
        "memdlm_tokens_per_s": tokens / med["memdlm"],
        # median of per-pair ratios: each MemDLM step against the MDLM step right before it,
        # robust to the machine's drift over the run (2 shared cores vary by ~5 %)
        "memdlm_over_mdlm_step_ratio": statistics.median(
            m / d for m, d in zip(times["memdlm"], times["mdlm"], strict=True)
        ),
        "memdlm_over_mdlm_flops_ratio": statistics.mean(flops["memdlm"]) / statistics.mean(flops["mdlm"]),
        **peak_fields,
        "mdlm_model_flops_per_s": mdlm_flops_per_s,
        "mdlm_mfu": estimate_mfu(mdlm_flops_per_s, peak),
        "memdlm_mfu": estimate_mfu(statistics.mean(flops["memdlm"]) / med["memdlm"], peak),
        "machine": machine(),
    }
    result["step_ratio_over_flops_ratio"] = (
        result["memdlm_over_mdlm_step_ratio"] / result["memdlm_over_mdlm_flops_ratio"]
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default=None,
        help="default: the training config's parallel.precision (auto: bf16 where native, else fp32)",
    )
    p.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator; 0 = table/measure")
    p.add_argument("--peak-budget", type=float, default=6.0, help="seconds for a peak measurement")
    p.add_argument("--out", default="step")
    args = p.parse_args()
    os.environ.setdefault("MASTER_PORT", "29731")
    init_distributed(tp=1)
    result = run(
        args.preset,
        args.batch,
        args.steps,
        args.device,
        args.precision,
        args.peak_tflops,
        args.peak_budget,
    )
    print(f"precision: {result['precision']} ({result['precision_reason']})")
    print(f"MFU peak: {result['peak_flops'] / 1e12:.3g} TFLOP/s ({result['peak_flops_source']})")
    for k in (
        "mdlm_tokens_per_s",
        "memdlm_tokens_per_s",
        "memdlm_over_mdlm_step_ratio",
        "memdlm_over_mdlm_flops_ratio",
        "peak_flops",
        "mdlm_mfu",
    ):
        print(f"{k:32s} {result[k]:.4g}")
    write(args.out, result)


if __name__ == "__main__":
    main()

"""One configuration of bench-scale (started by bench/scale.py through torchrun)."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

from pipeline.model.parallel import dp_group, dp_rank, dp_size, init_distributed

GLOBAL_BATCH = 8


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def main(tp: int, steps: int, out: str, preset: str = "small", global_batch: int = GLOBAL_BATCH) -> None:
    init_distributed(tp=tp)
    from pipeline.diffusion.noise import draw_noise, maskable_positions
    from pipeline.engine.deepspeed import build_engine
    from pipeline.hardware.precision import resolve_precision
    from pipeline.memory.inner_loop import memdlm_loss
    from pipeline.model.transformer import DLMTransformer
    from pipeline.train_config import load_train_config

    per_rank = global_batch // dp_size()
    cfg = load_train_config(
        "configs/train/local.yaml",
        [f"parallel.tp={tp}", f"data.batch_size={per_rank}", f"model_preset={preset}"],
    )
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    precision = resolve_precision(cfg.parallel.precision or "auto", device)  # as the trainer resolves it
    baseline = rss_mib()  # interpreter, torch, DeepSpeed, megatron: not part of the memory model
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, lambda: DLMTransformer(cfg.model), precision)
    g = torch.Generator(device).manual_seed(dp_rank())
    tokens = torch.randint(6, cfg.model.vocab_size, (per_rank, cfg.model.seq_len), generator=g, device=device)
    times = []
    for step in range(steps + 2):
        noise = draw_noise(tokens, maskable_positions(tokens, 0), cfg.objective, 4, g)
        dist.barrier()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.bf16):
            loss = memdlm_loss(
                engine.module, engine, tokens, noise, cfg.objective, cfg.memory, 4, g, dp_group()
            ).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    rec = {
        "rank": dist.get_rank(),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": rss_mib(),
        "peak_device_mib": device_mib(),  # torch.cuda.max_memory_allocated on GPUs
        "step_s": statistics.median(times),
        "precision": precision.dtype,
        "precision_reason": precision.reason,
    }
    recs = [None] * dist.get_world_size()
    dist.all_gather_object(recs, rec)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(recs, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))

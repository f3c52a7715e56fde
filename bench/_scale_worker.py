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


def main(tp: int, steps: int, out: str) -> None:
    init_distributed(tp=tp)
    from pipeline.engine.deepspeed import build_engine
    from pipeline.memory.inner_loop import memdlm_loss
    from pipeline.model.transformer import DLMTransformer
    from pipeline.objectives.mdlm import draw_noise, maskable_positions
    from pipeline.train_config import load_train_config

    per_rank = GLOBAL_BATCH // dp_size()
    cfg = load_train_config("configs/train/local.yaml", [f"parallel.tp={tp}", f"data.batch_size={per_rank}"])
    baseline = rss_mib()  # interpreter, torch, DeepSpeed, megatron: not part of the memory model
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, lambda: DLMTransformer(cfg.model))
    g = torch.Generator().manual_seed(dp_rank())
    tokens = torch.randint(6, cfg.model.vocab_size, (per_rank, cfg.model.seq_len), generator=g)
    times = []
    for step in range(steps + 2):
        noise = draw_noise(tokens, maskable_positions(tokens, 0), cfg.objective, 4, g)
        dist.barrier()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
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
        "step_s": statistics.median(times),
    }
    recs = [None] * dist.get_world_size()
    dist.all_gather_object(recs, rec)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(recs, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

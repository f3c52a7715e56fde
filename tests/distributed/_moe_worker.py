"""Worker for test_moe_parallel: the real Trainer on a tiny mixture-of-experts model, several runs
in one process group (megatron's TP size is process-wide: one TP size per launch).

    _moe_worker.py <tp> <dataset> <out> <ep>[,<ep>...]
Runs 3 steps for each EP size listed, memory off and on, and rank 0 writes each run's records to
<out>/w<world>-tp<tp>-ep<ep>-<mdlm|memdlm>.json; each MemDLM run is exported (experts gathered
over EP) to <out>/<name>/export, loaded back into a fresh run of the same layout (init_from:
each rank reads its experts) and gathered again to <out>/<name>/reloaded.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from pipeline.engine.export import consolidated_state_dict, export_model
from pipeline.train import Trainer
from pipeline.train_config import load_train_config
from tests.conftest import tiny_run_overrides

TINY_MOE = ("model_preset=tiny-moe", "model.vocab_size=400", "model.seq_len=32")


def _config(dataset: str, out: Path, run: str, tp: str, ep: str, memory: str, *extra: str):
    return load_train_config(
        None,
        [
            *tiny_run_overrides(dataset, out / "mlruns"),
            *TINY_MOE,
            f"run_dir={out / run}",
            "steps=3",
            "checkpoint.every=0",
            "tracking.enabled=false",
            "parallel.param_persistence_threshold=0",
            "parallel.precision=fp32",
            f"parallel.tp={tp}",
            f"parallel.ep={ep}",
            f"memory.enabled={memory}",
            "optim.lr=3e-3",
            *extra,
        ],
    )


def _export_and_reload(trainer: Trainer, cfg, dataset: str, out: Path, name: str, tp: str, ep: str) -> None:
    export = out / name / "export"
    tokenizer = Path(dataset) / "tokenizer.model"
    export_model(trainer.engine, cfg, export, tokenizer, trainer.manifest.special_ids, trainer.state.step)
    again = Trainer(_config(dataset, out, f"{name}-reload", tp, ep, "true", f"init_from={export}"))
    state = consolidated_state_dict(again.engine.module)
    again.close()
    if dist.get_rank() == 0:
        save_file(state, str(out / name / "reloaded.safetensors"))


def main(tp: str, dataset: str, out_dir: str, eps: str) -> None:
    out = Path(out_dir)
    for ep in eps.split(","):
        for memory in ("false", "true"):
            method = "memdlm" if memory == "true" else "mdlm"
            name = f"w{os.environ['WORLD_SIZE']}-tp{tp}-ep{ep}-{method}"
            cfg = _config(dataset, out, name, tp, ep, memory)
            trainer = Trainer(cfg)
            records = trainer.run()
            if memory == "true":
                _export_and_reload(trainer, cfg, dataset, out, name, tp, ep)
            trainer.close()
            if dist.get_rank() == 0:
                (out / f"{name}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Worker for test_hf_tp: imported checkpoints and the architecture options at TP=2.

argv: <dir> holding imports/<kind>/ (our export format), archs/<arch>/ (exports with architecture
options: GQA, Q/K/V biases, a tied head, a padded vocabulary, q/k norms, partial RoPE) and
tokens.pt. Rank 0 writes <dir>/results.pt:
  kinds[<kind>]   full logits at TP=2, each rank having read only its slices (load_initial_weights)
  arch[<arch>]["tp2"/"tp1"]  logits and gradients of a cross-entropy loss at TP=2 and TP=1
  init[<arch>]["tp2"/"tp1"]  the random initialisation of the arch config at both sizes
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.diffusion.loss import position_ce
from pipeline.engine.export import export_model_config, load_initial_weights
from pipeline.model.config import ModelConfig
from tests._models import current_dims, dense_model
from tests.distributed._gather import gather
from tests.distributed._worker import at_tp, finish


def full(model, grads: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.data
        sharded = getattr(p, "tensor_model_parallel", False) and current_dims().tp > 1
        out[name] = gather(t, p.partition_dim) if sharded else t.detach().clone()
    return out


def loaded(path: Path):
    cfg = ModelConfig(**export_model_config(path))
    model = dense_model(cfg)
    load_initial_weights(model, path, cfg)
    return model


def arch_run(path: Path, tokens: torch.Tensor) -> dict:
    model = loaded(path)
    logits = model(tokens=tokens)
    # targets include the last real id, so the masked padded columns sit next to a scored one
    targets = (tokens + 1) % model.cfg.vocab_size
    position_ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).mean().backward()
    return {"logits": gather(logits, -1), "grads": full(model, grads=True)}


def arch_init(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return full(dense_model(ModelConfig(**export_model_config(path))), grads=False)


def main(root: str) -> None:
    root = Path(root)
    tokens = torch.load(root / "tokens.pt")
    res: dict = {"kinds": {}, "arch": {}, "init": {}}
    at_tp(2)
    for path in sorted((root / "imports").iterdir()):
        with torch.no_grad():
            res["kinds"][path.name] = gather(loaded(path)(tokens=tokens), -1)
    archs = sorted((root / "archs").iterdir())
    for tp in (2, 1):  # TP=1: the reference, each rank alone (TP=1 x DP=2)
        at_tp(tp)
        for path in archs:
            res["arch"].setdefault(path.name, {})[f"tp{tp}"] = arch_run(path, tokens)
            res["init"].setdefault(path.name, {})[f"tp{tp}"] = arch_init(path)
    finish(res, root / "results.pt")


if __name__ == "__main__":
    main(sys.argv[1])

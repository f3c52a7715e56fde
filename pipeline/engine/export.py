"""Consolidated export: TP=1 safetensors + model config + tokenizer, loadable without DeepSpeed.

    export_model(engine, cfg, out_dir, tokenizer_path)   # collective, at the end of training
    model, info = load_exported("runs/local/export")     # anywhere, one process, no DeepSpeed

``out_dir/model.safetensors`` holds full (unsharded) fp32 weights under the module's parameter
names (outer LoRA adapters merged into their weights) and its persistent buffers (a router's
balancing bias); ``config.json`` the model config, the
method and memory config, and the special ids;
``tokenizer.model`` the tokenizer. Written into a temporary folder and renamed
(:func:`pipeline.outputs.write_output_dir`): an earlier export there is replaced (put aside, deleted
once the new one is in place); any other non-empty directory is refused, not deleted.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.adapters.lora import merge_lora
from pipeline.config import ConfigError, from_dict
from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.engine.checkpoint import persistent_buffers
from pipeline.families import family_of
from pipeline.model.config import ModelConfig
from pipeline.outputs import OutputDirError, write_output_dir
from pipeline.parallel.dims import ParallelDims, init_distributed

# The trainer has no --force: a directory of the user's at run_dir/export stays, and the run says so.
EXPORT_HINT = "the trainer's export never replaces it: move it away (or choose another run_dir)"


def _is_expert(param: torch.Tensor) -> bool:
    """A routed-expert parameter [local experts, ...]: split over the EP group along dim 0."""
    return bool(getattr(param, "is_expert_group", False))


def _gather_model_parallel(param: torch.Tensor, full: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """One parameter's full tensor: TP shards concatenated along ``partition_dim``, an expert
    parameter's EP shards (contiguous blocks of experts) along the expert dimension."""
    if _is_expert(param) and dims.ep > 1:
        group, size, dim = dims.ep_group, dims.ep, 0
    elif getattr(param, "tensor_model_parallel", False) and dims.tp > 1:
        group, size, dim = dims.tp_group, dims.tp, param.partition_dim
    else:
        return full.detach().float().cpu().clone()
    parts = [torch.empty_like(full) for _ in range(size)]
    dist.all_gather(parts, full.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim).float().cpu()


def _local_slice(f, name: str, param: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This rank's part of stored tensor ``name``: its TP shard, or its EP block of experts;
    safetensors reads only that slice from the memory map."""
    if _is_expert(param) and dims.ep > 1:
        dim, size, rank = 0, dims.ep, dims.ep_rank
    elif getattr(param, "tensor_model_parallel", False) and dims.tp > 1:
        dim, size, rank = param.partition_dim, dims.tp, dims.tp_rank
    else:
        return f.get_tensor(name)
    sl = f.get_slice(name)
    shape = sl.get_shape()
    part = shape[dim] // size
    index = [slice(None)] * len(shape)
    index[dim] = slice(rank * part, (rank + 1) * part)
    return sl[tuple(index)]


def consolidated_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank: ZeRO-3 partitions gathered, TP and EP shards concatenated."""
    import deepspeed  # heavy: only when exporting

    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[name] = _gather_model_parallel(p, p.data, module.dims)
    # state outside the optimizer that shapes the outputs (a router's balancing bias), equal on all ranks
    out.update({name: buf.float() for name, buf in persistent_buffers(module).items()})
    return out


def export_model(
    engine, cfg, out_dir: str | Path, tokenizer_path: str | Path, special_ids: dict[str, Any], step: int
) -> Path:
    """Collective; rank 0 writes ``out_dir`` atomically. Outer LoRA adapters are merged into their
    weights (``W + (alpha / r) B A``): the export holds base-model names only, like any other."""
    state = consolidated_state_dict(engine.module)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.enabled:
        state = merge_lora(state, lora)
    out_dir = Path(out_dir)
    info = {
        "model": asdict(cfg.model),
        "method": cfg.method,
        "memory": asdict(cfg.memory),
        "objective": asdict(cfg.objective),
        "special_ids": special_ids,
        "step": step,
    }
    if lora is not None and lora.enabled:
        info["lora"] = {**asdict(lora), "merged": True}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        # sentencepiece .model or tokenizer.json (+ its config), under the names load_tokenizer finds
        load_tokenizer(tokenizer_path).save(tmp)

    _write_on_rank0(out_dir, fill)
    return out_dir


def _write_on_rank0(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Collective: rank 0 writes ``out_dir``; when it fails every rank raises (none waits forever).
    A refused directory is a ConfigError (a user error) on every rank."""
    error: BaseException | None = None
    failure: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            write_output_dir(out_dir, fill, written_by="train --export", hint=EXPORT_HINT, label="export ")
        except OutputDirError as exc:
            error = ConfigError(str(exc))
        except Exception as exc:
            error = exc
        failure[0] = None if error is None else f"{type(error).__name__}: {error}"
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise ConfigError(f"export to {out_dir} failed on rank 0 ({failure[0]})")


# Keys that shape no weight: a fine-tuning run may train on another length (RoPE is computed),
# its init scale is irrelevant once weights are loaded, and a mixture of experts' balancing
# (the router bias's update rate, the aux and z loss weights) is a training choice.
_WEIGHT_FREE_KEYS = ("seq_len", "init_std", "score_bias_rate", "aux_loss_coef", "z_loss_coef")


def export_model_config(path: str | Path) -> dict[str, Any]:
    """The export's model config with every key a newer ModelConfig added set to its default
    (the default is the architecture older exports were written with)."""
    return {**asdict(ModelConfig()), **json.loads((Path(path) / "config.json").read_text())["model"]}


def load_initial_weights(module: torch.nn.Module, path: str | Path, model_cfg: ModelConfig) -> None:
    """Copy an export's weights into a (possibly ZeRO-3 partitioned, TP-sharded) module.

    Collective under ZeRO-3 (every rank gathers each parameter in turn). Each rank reads only its
    tensor-parallel slice of each weight (and its expert-parallel block of experts) from the file (safetensors slices a memory map), one
    parameter at a time, so no rank ever holds the full model; the data-parallel rank 0 copy is
    broadcast. Raises ConfigError naming what differs when the export's model config is not
    ``model_cfg`` (``seq_len`` and ``init_std`` may differ).
    """
    import deepspeed  # heavy: only when fine-tuning from an export

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"init_from={path}: not an export directory (no model.safetensors)")
    theirs = export_model_config(path)
    ours = asdict(model_cfg)
    diff = {
        k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v and k not in _WEIGHT_FREE_KEYS
    }
    if diff:
        detail = ", ".join(f"{k}: export {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"init_from={path}: model config differs ({detail})")
    buffers = dict(module.named_buffers())
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        names = {n for n, _ in module.named_parameters()} | set(persistent_buffers(module))
        if names != stored:
            raise ConfigError(
                f"init_from={path}: parameter names differ (missing {sorted(names - stored)[:5]}, "
                f"unexpected {sorted(stored - names)[:5]})"
            )
        for name, p in module.named_parameters():
            part = _local_slice(f, name, p, module.dims)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(part.to(p.dtype))
        with torch.no_grad():
            for name in persistent_buffers(module):
                buffers[name].copy_(f.get_tensor(name))


def load_exported(path: str | Path, device: str = "cpu"):
    """Load an export as a TP=1 model of its family in eval mode; returns ``(model, info)``.

    Starts a one-process TP=1 group on its own if none exists (the megatron layers need one)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (not an export directory)")
    info = json.loads((path / "config.json").read_text())
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dims = init_distributed(tp=1)
    cfg = from_dict(ModelConfig, export_model_config(path), str(path / "config.json"))
    with torch.device("meta"):
        model = family_of(cfg).build(cfg, dims)
    model.load_full_state(load_file(str(path / "model.safetensors"), device=device), device)
    return model.eval(), info

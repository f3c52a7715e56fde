"""What a model family says about Hugging Face checkpoints: one :class:`HFLayout` per layout it maps.

    layout = HFLayout(name="llama", family="dense", detects=..., read_config=..., hf_shapes=...,
                      to_ours=..., from_ours=..., hf_config=...)
    family = Family(..., hf_layouts=(layout, ...), hf_export_layout=lambda cfg: layout)

pipeline/hf/convert.py runs ``make import-hf`` / ``make export-hf`` for every registered layout:
it finds the one whose ``detects`` accepts a source, checks the tensors against ``hf_shapes``,
and converts with ``to_ours`` / ``from_ours``. The helpers below read ``config.json`` values with
errors that name the key (:func:`number`, :func:`first_id`, :func:`rope_options`, :func:`refuse`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.model.config import ModelConfig

Read = Callable[[str], torch.Tensor]  # a source tensor by its Hugging Face name


class HFFormatError(ValueError):
    """A source checkpoint or config this importer cannot convert exactly; says what and why."""


class KeyProblem(HFFormatError):
    """A config.json key that is missing or of the wrong type (the file's path is added by the caller)."""


@dataclass(frozen=True)
class Source:
    """What the importer read from ``config.json``: our model config and the layout's facts."""

    layout: str
    model: ModelConfig
    mask_id: int | None
    special_ids: dict[str, int | None]
    model_type: str


@dataclass(frozen=True)
class HFLayout:
    """One Hugging Face layout a family maps (names, fused tensors, config keys), both ways.

    ``detects(config, tensor_names)``: whether a source is in this layout. ``read_config(config,
    tensor_names, seq_len, vocab_multiple)``: our model config and special ids (raise
    :class:`KeyProblem` / :class:`HFFormatError`). ``hf_shapes(cfg)``: every tensor a checkpoint of
    ``cfg`` holds, with its shape. ``to_ours(read, cfg)``: our full fp32 TP=1 state dict.
    ``from_ours(state, cfg)``: the layout's tensors. ``hf_config(cfg, special_ids)``: its
    ``config.json``. ``tied_head``: the head's name when a tied checkpoint may store it too."""

    name: str
    family: str
    detects: Callable[[dict[str, Any], set[str]], bool]
    read_config: Callable[[dict[str, Any], set[str], int | None, int], Source]
    hf_shapes: Callable[[ModelConfig], dict[str, tuple[int, ...]]]
    to_ours: Callable[[Read, ModelConfig], dict[str, torch.Tensor]]
    from_ours: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]
    hf_config: Callable[[ModelConfig, dict[str, Any]], dict[str, Any]]
    tied_head: Callable[[ModelConfig], tuple[str, str] | None] = lambda cfg: None  # (head, embedding)
    ignored_suffixes: tuple[str, ...] = field(default=(".rotary_emb.inv_freq",))
    model_types: tuple[str, ...] = ()  # the ``model_type`` values it maps (for messages)


# Keys that make a checkpoint a mixture of experts: a dense layout never reads it, whatever its names.
MOE_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
)


def is_moe(config: dict[str, Any], tensor_names: set[str]) -> bool:
    """Whether a source config (or its tensor names) describes a mixture-of-experts model."""
    return any(config.get(k) for k in MOE_KEYS) or any(".experts." in n for n in tensor_names)


_REQUIRED = object()


def number(config: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``config[key]`` as an ``int`` or ``float`` (``default`` when absent or null); names the key when
    a required one is missing or the value is not a number of that kind."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise KeyProblem(f"no '{key}' (expected {'an integer' if kind is int else 'a number'})")
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        raise KeyProblem(f"'{key}' is {value!r}, expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def first_id(config: dict[str, Any], key: str) -> int | None:
    """An id, or the first of a list of ids (eos_token_id may be a list)."""
    value = config.get(key)
    if isinstance(value, list):
        return number({key: value[0]}, key, int) if value else None
    return number(config, key, int, None)


def special_ids(config: dict[str, Any]) -> dict[str, int | None]:
    """The special token ids a model config names (pad, mask, bos, eos)."""
    return {
        "pad": first_id(config, "pad_token_id"),
        "mask": first_id(config, "mask_token_id"),
        "bos": first_id(config, "bos_token_id"),
        "eos": first_id(config, "eos_token_id"),
        "unk": None,
        "newline": None,
    }


def rope_options(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE theta and scaling from transformers v5 ``rope_parameters`` or v4 ``rope_theta``/``rope_scaling``."""
    params, scaling = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise KeyProblem(f"'{key}' is {value!r}, expected an object")
    theta = number(params, "rope_theta", float, number(config, "rope_theta", float, 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": number(merged, "factor", float)}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": number(merged, "factor", float),
            "rope_low_freq_factor": number(merged, "low_freq_factor", float),
            "rope_high_freq_factor": number(merged, "high_freq_factor", float),
            "rope_original_max_len": number(merged, "original_max_position_embeddings", int),
        }
    raise HFFormatError(f"RoPE scaling '{kind}' is not supported (supported: default, linear, llama3)")


def hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` for a config.json (the inverse of :func:`rope_options`)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        return {**rope, "rope_type": "linear", "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        return {
            **rope,
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return rope


def refuse(config: dict[str, Any], checks: dict[str, Any]) -> None:
    """Config keys whose non-default value changes the architecture in a way we do not model."""
    bad = [f"{k}={config[k]!r} (need {v!r})" for k, v in checks.items() if k in config and config[k] != v]
    if bad:
        raise HFFormatError(f"unsupported architecture options: {', '.join(bad)}")


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[v, D] -> [rows, D], the extra rows zero (their logits are masked; they are never used)."""
    out = torch.zeros(rows, t.shape[1], dtype=torch.float32)
    out[: t.shape[0]] = t
    return out

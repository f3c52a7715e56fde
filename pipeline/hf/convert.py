"""Hugging Face checkpoints <-> our export format (pipeline/engine/export.py).

    import_hf("hf/LLaDA-8B-Base", "runs/llada-export")            # config.json + *.safetensors -> export
    export_hf("runs/local/export", "runs/local/hf")                 # export -> Llama/Qwen2 layout

An import writes ``model.safetensors`` (fp32, our TP=1 names, vocabulary rows zero-padded to
``vocab_multiple``), ``config.json`` (model config, ``method: mdlm``, default memory/objective,
special ids, and a ``source`` record) and the tokenizer: ``tokenizer.model`` when the source has
a sentencepiece model our loader accepts, and every tokenizer file under ``hf_tokenizer/``; there,
when the source's ``tokenizer.json`` loads in our pipeline, ``tokenizer_config.json`` also names
the special tokens found in the model config (the mask token), so ``make data``
``tokenizer.model=<export>/hf_tokenizer/tokenizer.json`` needs no more options
(``source.tokenizer.data_tokenizer``).
An export writes ``config.json`` for ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when the model
has Q/K/V biases) with ``is_causal: false`` (transformers then builds a bidirectional mask),
``model.safetensors`` with the padded vocabulary rows dropped, and the tokenizer files.

The whole model passes through one process once (an import holds the fp32 model in memory);
fine-tuning then loads it at any TP x DP, each rank reading only its slices.

OUT is written by :func:`pipeline.outputs.write_output_dir`: a non-empty OUT that is not an earlier
output of ours is refused unless ``force``; OUT equal to, inside or around the source is always
refused; a replaced OUT is put aside and deleted only once the new one is in place. A damaged
source (a truncated or garbled safetensors file, a config.json that is not a JSON object) is an
HFFormatError naming the file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.hf.layouts import (
    IGNORED_SUFFIXES,
    HFFormatError,
    Source,
    expected_names,
    global_names,
    layer_names,
    read_source_config,
)
from pipeline.model.config import ModelConfig
from pipeline.outputs import check_output_dir, write_output_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
SENTENCEPIECE_ONLY = (
    "the source has no sentencepiece tokenizer.model with [PAD]/[MASK]/BOS/EOS; our data pipeline "
    "(make data, pipeline/dataset/tokenizer.py) reads its tokenizer.json instead: prepare fine-tuning "
    "data with tokenizer.model=<export>/hf_tokenizer/tokenizer.json (source.tokenizer.data_tokenizer)"
)


_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object (``what`` it should hold names it in the error otherwise)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise HFFormatError(f"{path}: not valid JSON ({exc}); expected a JSON object: {what}") from None
    if not isinstance(value, dict):
        got = _JSON_KINDS.get(type(value), "null")
        raise HFFormatError(f"{path}: expected a JSON object, got {got} ({what})")
    return value


def _damaged(file: Path, exc: Exception) -> HFFormatError:
    return HFFormatError(
        f"{file}: not a complete safetensors file ({exc}); expected an 8-byte header length, a JSON header "
        "and every tensor's bytes (a truncated download or copy? fetch or write it again)"
    )


def open_safetensors(file: Path):
    """``safe_open(file)``; a truncated file or a garbled / oversized header is an HFFormatError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as exc:
        raise _damaged(file, exc) from None


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``file`` (like ``safetensors.torch.load_file``, with :func:`open_safetensors` errors)."""
    with open_safetensors(file) as f:
        try:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open: no __iter__)
        except SafetensorError as exc:
            raise _damaged(file, exc) from None


def _shard_index(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors.index.json`` or a glob)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HFFormatError(
                f"{index}: expected a JSON object with a 'weight_map' (tensor name -> shard file name)"
            )
        where = {name: src / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in where.values() if not f.is_file()})
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise HFFormatError(f"{index}: its weight_map names {missing[0]}: no such file{more}")
        return where
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise HFFormatError(
            f"{src}: no *.safetensors files (convert .bin checkpoints with transformers first)"
        )
    out: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


class _Reader:
    """Reads tensors by name across shards, keeping one shard open at a time."""

    def __init__(self, where: dict[str, Path]):
        self.where = where
        self._file: Path | None = None
        self._handle = None

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if file != self._file:
            self._handle = open_safetensors(file)
            self._file = file
        try:
            return self._handle.get_tensor(name)
        except SafetensorError as exc:
            raise _damaged(file, exc) from None


def _tokenizer_mask_check(src: Path, mask_id: int, vocab_size: int) -> dict[str, Any]:
    """Check ``mask_id`` against the source tokenizer; returns what was found (recorded in config.json)."""
    if not 0 <= mask_id < vocab_size:
        raise HFFormatError(f"mask token id {mask_id} is outside the vocabulary [0, {vocab_size})")
    info: dict[str, Any] = {"mask_id": mask_id}
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        token = tok.id_to_token(mask_id)
        if token is None:
            raise HFFormatError(f"mask token id {mask_id} is not a token of {src / 'tokenizer.json'}")
        info.update(kind="tokenizer.json", mask_token=token, tokenizer_size=tok.get_vocab_size())
        declared = _declared_mask_token(src)
        if declared is not None and tok.token_to_id(declared) != mask_id:
            raise HFFormatError(
                f"mask token id {mask_id} is '{token}', but tokenizer_config.json declares mask_token "
                f"'{declared}' (id {tok.token_to_id(declared)}); pass the right MASK_ID"
            )
    elif (src / "tokenizer.model").is_file():
        import sentencepiece as spm

        proc = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        if mask_id >= proc.get_piece_size():
            raise HFFormatError(f"mask token id {mask_id} is not a piece of {src / 'tokenizer.model'}")
        info.update(kind="sentencepiece", mask_token=proc.id_to_piece(mask_id))
    else:
        info.update(kind=None, note="no tokenizer files in the source: the mask id was not checked")
    return info


def _declared_mask_token(src: Path) -> str | None:
    cfg_file = src / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    mask = read_json_object(cfg_file, "the tokenizer config").get("mask_token")
    return mask.get("content") if isinstance(mask, dict) else mask


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[v, D] -> [rows, D], the extra rows zero (their logits are masked; they are never used)."""
    out = torch.zeros(rows, t.shape[1], dtype=torch.float32)
    out[: t.shape[0]] = t
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """q [H*hd(, D)], k/v [KV*hd(, D)] -> our fused [(H + 2 KV) * hd(, D)], per kv group [q..q|k|v]."""
    kv, g, hd = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(kv, g * hd, *tail), k.reshape(kv, hd, *tail), v.reshape(kv, hd, *tail))
    return torch.cat(parts, dim=1).reshape(cfg.qkv_size, *tail)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fuse_qkv`."""
    kv, g, hd = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(kv, (g + 2) * hd, *tail)
    q, k, v = grouped.split([g * hd, hd, hd], dim=1)
    return (
        q.reshape(cfg.n_heads * hd, *tail).contiguous(),
        k.reshape(kv * hd, *tail).contiguous(),
        v.reshape(kv * hd, *tail).contiguous(),
    )


def _shapes(cfg: ModelConfig, layout: str, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    d, f, hd = cfg.d_model, cfg.ffn_hidden, cfg.head_dim
    g = global_names(layout)
    out = {g["embed"]: (vocab_rows, d), g["norm"]: (d,), g["head"]: (vocab_rows, d)}
    for i in range(cfg.n_layers):
        ln = layer_names(layout, i)
        kvd = cfg.kv_heads * hd
        out.update(
            {
                ln["attn_norm"]: (d,),
                ln["ffn_norm"]: (d,),
                ln["q"]: (cfg.n_heads * hd, d),
                ln["k"]: (kvd, d),
                ln["v"]: (kvd, d),
                ln["q_bias"]: (cfg.n_heads * hd,),
                ln["k_bias"]: (kvd,),
                ln["v_bias"]: (kvd,),
                ln["out"]: (d, cfg.n_heads * hd),
                ln["gate"]: (f, d),
                ln["up"]: (f, d),
                ln["down"]: (d, f),
            }
        )
    return out


def convert_state(read, src: Source) -> dict[str, torch.Tensor]:
    """Source tensors (``read(name)``) -> our full fp32 TP=1 state dict (names of DLMTransformer)."""
    cfg, layout = src.model, src.layout
    g = global_names(layout)
    V = cfg.padded_vocab_size
    state = {
        "embedding.weight": _pad_rows(read(g["embed"]).float(), V),
        "final_norm.weight": read(g["norm"]).float(),
    }
    if not cfg.tie_embeddings:
        state["head.weight"] = _pad_rows(read(g["head"]).float(), V)
    for i in range(cfg.n_layers):
        ln, p = layer_names(layout, i), f"layers.{i}."
        state[p + "qkv.weight"] = fuse_qkv(*(read(ln[x]).float() for x in "qkv"), cfg)
        if cfg.qkv_bias:
            state[p + "qkv.bias"] = fuse_qkv(*(read(ln[x + "_bias"]).float() for x in "qkv"), cfg)
        for ours, theirs in (("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm"), ("out", "out")):
            state[p + ours + ".weight"] = read(ln[theirs]).float()
        for name in ("gate", "up", "down"):
            state[p + name + ".weight"] = read(ln[name]).float()
    return state


def _check_tensors(where: dict[str, Path], src: Source, reader: _Reader) -> None:
    """Missing/unknown tensors and wrong shapes fail with the names listed."""
    cfg, layout = src.model, src.layout
    present = {n for n in where if not n.endswith(IGNORED_SUFFIXES)}
    expected = expected_names(layout, cfg)
    head = global_names(layout)["head"]
    if cfg.tie_embeddings and head in present:
        # Some tied checkpoints store the head too; it must then be the embedding.
        if not torch.equal(reader.get(head), reader.get(global_names(layout)["embed"])):
            raise HFFormatError(f"tie_word_embeddings is set but {head} differs from the embedding")
        expected = expected | {head}
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        raise HFFormatError(
            f"tensor names do not match the {layout} layout of this config: "
            f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
            f"unknown {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    shapes = _shapes(cfg, layout, cfg.vocab_size)
    wrong = []
    for name in sorted(expected):
        with open_safetensors(where[name]) as f:
            shape = tuple(f.get_slice(name).get_shape())
        if shape != shapes[name]:
            wrong.append(f"{name} {shape} (config says {shapes[name]})")
    if wrong:
        raise HFFormatError(f"tensor shapes disagree with config.json: {', '.join(wrong[:20])}")


def _check_options(seq_len: int | None, mask_id: int | None) -> None:
    """The command-line options, before any file is read (``0`` is not "the default")."""
    if seq_len is not None and seq_len < 1:
        raise HFFormatError(
            f"SEQ_LEN / --seq-len: got {seq_len}, expected >= 1 (the context length in tokens; leave it out "
            "for the source's maximum)"
        )
    if mask_id is not None and mask_id < 0:
        raise HFFormatError(f"MASK_ID / --mask-id: got {mask_id}, expected a token id >= 0")


def import_hf(
    src: str | Path,
    out: str | Path,
    *,
    mask_id: int | None = None,
    seq_len: int | None = None,
    vocab_multiple: int = 128,
    force: bool = False,
) -> Path:
    """Convert a Hugging Face checkpoint directory into our export format at ``out`` (atomic).

    ``mask_id`` overrides the source config's ``mask_token_id``; ``seq_len`` defaults to the
    source's maximum. ``out`` may be new, empty or an earlier output of ours; ``force`` replaces
    any other directory (never ``src`` or one inside or around it). Raises HFFormatError naming
    what does not fit, OutputDirError for an ``out`` it must not write.
    """
    src, out = Path(src), Path(out)
    _check_options(seq_len, mask_id)
    check_output_dir(out, src=src, force=force)
    if not (src / "config.json").is_file():
        raise HFFormatError(f"{src}: no config.json (expected a Hugging Face model directory)")
    config = read_json_object(src / "config.json", "a Hugging Face model config")
    where = _shard_index(src)
    source = read_source_config(config, set(where), seq_len, vocab_multiple, where=str(src / "config.json"))
    mask = _mask_id(src, source.mask_id, mask_id)
    tokenizer = _tokenizer_mask_check(src, mask, source.model.vocab_size)
    reader = _Reader(where)
    _check_tensors(where, source, reader)
    state = convert_state(reader.get, source)
    sp_ok = _sentencepiece_usable(src / "tokenizer.model")
    hf_tok, data_tokenizer = _data_tokenizer(src, tokenizer, sp_ok)
    info = _import_info(src, source, mask, {**tokenizer, "sentencepiece_usable": sp_ok, **data_tokenizer})

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _copy_tokenizer(src, tmp, hf_tok, sp_ok)

    return write_output_dir(out, fill, written_by="import-hf", src=src, force=force)


def _import_info(src: Path, source: Source, mask: int, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """The export's ``config.json``: model, default method/memory/objective, special ids, provenance."""
    from pipeline.memory.config import MemoryConfig
    from pipeline.objectives.mdlm import ObjectiveConfig

    return {
        "model": asdict(source.model),
        "method": "mdlm",
        "memory": asdict(MemoryConfig()),
        "objective": asdict(ObjectiveConfig()),
        "special_ids": {**source.special_ids, "mask": mask},
        "step": 0,
        "source": {
            "format": "huggingface",
            "layout": source.layout,
            "model_type": source.model_type,
            "path": str(src.resolve()),
            "tokenizer": tokenizer,
        },
    }


def _copy_tokenizer(src: Path, tmp: Path, hf_tok: Any, sp_ok: bool) -> None:
    """Every tokenizer file of ``src`` into ``hf_tokenizer/`` (its tokenizer_config.json naming the
    special tokens when the tokenizer.json loads in our pipeline); a usable tokenizer.model on top."""
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if copied:
        (tmp / "hf_tokenizer").mkdir()
        for name in copied:
            shutil.copyfile(src / name, tmp / "hf_tokenizer" / name)
        if hf_tok is not None:
            hf_tok.save(tmp / "hf_tokenizer")
    if sp_ok:
        shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")


def _mask_id(src: Path, from_config: int | None, given: int | None) -> int:
    """The [MASK] id: the source config's ``mask_token_id`` or the explicit option (never both differing)."""
    mask = given if given is not None else from_config
    if mask is None:
        raise HFFormatError(
            f"{src / 'config.json'} has no mask_token_id (an autoregressive checkpoint?): pass the id of the "
            "tokenizer's mask token explicitly (MASK_ID=... / --mask-id)"
        )
    if from_config is not None and given is not None and given != from_config:
        raise HFFormatError(f"--mask-id {given} contradicts the source config's mask_token_id {from_config}")
    return mask


def _sentencepiece_usable(path: Path) -> bool:
    """Whether our loader (which requires [PAD]/[MASK]/BOS/EOS) accepts this tokenizer.model."""
    if not path.is_file():
        return False
    from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer

    try:
        load_tokenizer(path)
    except TokenizerError:
        return False
    return True


def _data_tokenizer(src: Path, tokenizer: dict[str, Any], sp_ok: bool) -> tuple[Any, dict[str, Any]]:
    """``(the source's tokenizer.json as our loader reads it, or None; what config.json records)``:
    ``data_tokenizer``, the export's file to prepare data with, and a ``note`` when not sentencepiece."""
    from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer

    if sp_ok:
        return None, {"data_tokenizer": "tokenizer.model"}
    if tokenizer["kind"] != "tokenizer.json":
        note = (
            "our data pipeline reads a sentencepiece tokenizer.model with [PAD]/[MASK]/BOS/EOS or a "
            "tokenizer.json; the source has neither, so fine-tuning data must be tokenised outside make data"
        )
        return None, {"data_tokenizer": None, **({"note": note} if tokenizer["kind"] else {})}
    try:  # the mask token was checked against the source config (or --mask-id) just before
        tok = load_tokenizer(src / "tokenizer.json", special_tokens={"mask": tokenizer["mask_token"]})
    except TokenizerError as exc:
        note = (
            f"{SENTENCEPIECE_ONLY}, but it does not load as it is ({exc}); give what is missing when "
            "preparing data (tokenizer.pad_token=... etc.)"
        )
        return None, {"data_tokenizer": None, "note": note}
    return tok, {"data_tokenizer": "hf_tokenizer/tokenizer.json", "note": SENTENCEPIECE_ONLY}


def hf_config(cfg: ModelConfig, special_ids: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the Llama (or, with Q/K/V biases, Qwen2) model equal to ``cfg``."""
    qwen = cfg.qkv_bias
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope = {
            **rope,
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # A masked diffusion LM attends both ways: transformers builds a bidirectional mask from it.
        "is_causal": False,
        "use_cache": False,
        "dtype": "float32",
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "mask_token_id": special_ids.get("mask"),
    }
    if qwen:
        out.update(use_sliding_window=False, max_window_layers=cfg.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim)
    return out


def hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our full state dict -> Llama/Qwen2 tensor names (padded vocabulary rows dropped)."""
    layout = "qwen2" if cfg.qkv_bias else "llama"
    g = global_names(layout)
    v = cfg.vocab_size
    out = {g["embed"]: state["embedding.weight"][:v], g["norm"]: state["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out[g["head"]] = state["head.weight"][:v]
    for i in range(cfg.n_layers):
        ln, p = layer_names(layout, i), f"layers.{i}."
        out.update(zip((ln["q"], ln["k"], ln["v"]), split_qkv(state[p + "qkv.weight"], cfg), strict=True))
        if cfg.qkv_bias:
            names = (ln["q_bias"], ln["k_bias"], ln["v_bias"])
            out.update(zip(names, split_qkv(state[p + "qkv.bias"], cfg), strict=True))
        for ours in ("attn_norm", "ffn_norm", "out", "gate", "up", "down"):
            out[ln[ours]] = state[p + ours + ".weight"]
    return {k: t.to(dtype).contiguous() for k, t in out.items()}


def _read_export(checkpoint: Path) -> tuple[dict[str, Any], ModelConfig, dict[str, torch.Tensor]]:
    """An export directory's ``(config.json, model config, weights)``; HFFormatError naming the file."""
    from pipeline.engine.export import export_model_config

    if not (checkpoint / "model.safetensors").is_file():
        raise HFFormatError(f"{checkpoint}: not an export directory (no model.safetensors)")
    info = read_json_object(checkpoint / "config.json", "an export's config with 'model' and 'special_ids'")
    for key in ("model", "special_ids"):
        if not isinstance(info.get(key), dict):
            raise HFFormatError(
                f"{checkpoint / 'config.json'}: no '{key}' object (expected an export's config)"
            )
    try:
        cfg = ModelConfig(**export_model_config(checkpoint))
    except TypeError as exc:  # a key this ModelConfig does not know
        raise HFFormatError(
            f"{checkpoint / 'config.json'}: 'model' does not fit our ModelConfig ({exc})"
        ) from None
    return info, cfg, load_safetensors(checkpoint / "model.safetensors")


def export_hf(
    checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False
) -> Path:
    """Write our export ``checkpoint`` as a transformers Llama/Qwen2 model directory ``out`` (atomic;
    ``out`` and ``force`` as for :func:`import_hf`, ``checkpoint`` being the source)."""
    checkpoint, out = Path(checkpoint), Path(out)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise HFFormatError(f"dtype '{dtype}': expected float32, bfloat16 or float16")
    check_output_dir(out, src=checkpoint, force=force)
    info, cfg, weights = _read_export(checkpoint)
    try:
        state = hf_state(weights, cfg, torch_dtype)
    except KeyError as exc:
        raise HFFormatError(
            f"{checkpoint / 'model.safetensors'}: no tensor {exc.args[0]!r} (expected the weights of the model "
            "its config.json describes)"
        ) from None
    config = {**hf_config(cfg, info.get("special_ids") or {}), "dtype": dtype}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        hf_tok = checkpoint / "hf_tokenizer"
        if hf_tok.is_dir():
            for file in sorted(hf_tok.iterdir()):
                shutil.copyfile(file, tmp / file.name)
        else:  # the tokenizer the run trained with: tokenizer.model, or tokenizer.json + its config
            for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
                if (checkpoint / name).is_file():
                    shutil.copyfile(checkpoint / name, tmp / name)

    return write_output_dir(out, fill, written_by="export-hf", src=checkpoint, force=force)

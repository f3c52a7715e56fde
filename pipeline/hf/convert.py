"""Hugging Face checkpoints <-> our export format (pipeline/engine/export.py), for every layout a
registered model family maps (pipeline/model/hf_format.py; the dense family's are LLaMA, Qwen2 and
LLaDA: pipeline/families/dense/hf.py).

    import_hf("hf/LLaDA-8B-Base", "runs/llada-export")            # config.json + *.safetensors -> export
    export_hf("runs/local/export", "runs/local/hf")                 # export -> the family's export layout

An import writes ``model.safetensors`` (fp32, our TP=1 names, vocabulary rows zero-padded to
``vocab_multiple``), ``config.json`` (model config, ``method: mdlm``, default memory/objective,
special ids, and a ``source`` record) and the tokenizer: ``tokenizer.model`` when the source has
a sentencepiece model our loader accepts, and every tokenizer file under ``hf_tokenizer/``; there,
when the source's ``tokenizer.json`` loads in our pipeline, ``tokenizer_config.json`` also names
the special tokens found in the model config (the mask token), so ``make data``
``tokenizer.model=<export>/hf_tokenizer/tokenizer.json`` needs no more options
(``source.tokenizer.data_tokenizer``).
An export writes the ``config.json`` and ``model.safetensors`` of the family's export layout
(dense: ``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` with Q/K/V biases, ``is_causal: false``) with
the padded vocabulary rows dropped, and the tokenizer files.

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

from pipeline.config import ConfigError, from_dict
from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer
from pipeline.diffusion.config import ObjectiveConfig
from pipeline.engine.export import export_model_config
from pipeline.families import families, family_of
from pipeline.memory.config import MemoryConfig
from pipeline.model.config import ModelConfig
from pipeline.model.hf_format import HFFormatError, HFLayout, KeyProblem, Source, is_moe
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
        from tokenizers import Tokenizer  # optional: only for a tokenizer.json source

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
        import sentencepiece as spm  # only for a sentencepiece source

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


def find_layout(config: dict[str, Any], tensor_names: set[str]) -> HFLayout:
    """The registered layout (of any model family) a source is in; an HFFormatError naming the
    source's ``model_type`` and the layouts we map otherwise."""
    for family in families():
        for layout in family.hf_layouts:
            if layout.detects(config, tensor_names):
                return layout
    model_type = config.get("model_type")
    known = sorted({t for f in families() for layout in f.hf_layouts for t in layout.model_types})
    moe = is_moe(config, tensor_names)
    kind = "a mixture-of-experts checkpoint of a layout" if moe else "a layout"
    raise HFFormatError(
        f"model_type '{model_type}' is {kind} we do not map (we map: {', '.join(known)}); first tensor names: "
        f"{sorted(tensor_names)[:5]}"
    )


def read_source(
    config: dict[str, Any], names: set[str], seq_len: int | None, multiple: int, where: str
) -> Source:
    """The layout of a source and what its ``config.json`` (``where``) says: errors name the file."""
    layout = find_layout(config, names)
    try:
        return layout.read_config(config, names, seq_len, multiple)
    except KeyProblem as exc:
        raise HFFormatError(f"{where}: {exc}") from None
    except HFFormatError as exc:
        raise HFFormatError(f"{where}: {exc}") from None


def _check_tensors(where: dict[str, Path], layout: HFLayout, cfg: ModelConfig, reader: _Reader) -> None:
    """Missing/unknown tensors and wrong shapes fail with the names listed."""
    present = {n for n in where if not n.endswith(layout.ignored_suffixes)}
    shapes = layout.hf_shapes(cfg)
    tied = layout.tied_head(cfg)
    if tied is not None and tied[0] in present:
        # Some tied checkpoints store the head too; it must then be the embedding.
        if not torch.equal(reader.get(tied[0]), reader.get(tied[1])):
            raise HFFormatError(f"tie_word_embeddings is set but {tied[0]} differs from the embedding")
        shapes = {**shapes, tied[0]: shapes[tied[1]]}
    expected = set(shapes)
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        raise HFFormatError(
            f"tensor names do not match the {layout.name} layout of this config: "
            f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
            f"unknown {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
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
    source = read_source(config, set(where), seq_len, vocab_multiple, str(src / "config.json"))
    layout = find_layout(config, set(where))
    mask = _mask_id(src, source.mask_id, mask_id)
    tokenizer = _tokenizer_mask_check(src, mask, source.model.vocab_size)
    reader = _Reader(where)
    _check_tensors(where, layout, source.model, reader)
    state = layout.to_ours(reader.get, source.model)
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
    try:
        load_tokenizer(path)
    except TokenizerError:
        return False
    return True


def _data_tokenizer(src: Path, tokenizer: dict[str, Any], sp_ok: bool) -> tuple[Any, dict[str, Any]]:
    """``(the source's tokenizer.json as our loader reads it, or None; what config.json records)``:
    ``data_tokenizer``, the export's file to prepare data with, and a ``note`` when not sentencepiece."""
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


def _read_export(checkpoint: Path) -> tuple[dict[str, Any], ModelConfig, dict[str, torch.Tensor]]:
    """An export directory's ``(config.json, model config, weights)``; HFFormatError naming the file."""
    if not (checkpoint / "model.safetensors").is_file():
        raise HFFormatError(f"{checkpoint}: not an export directory (no model.safetensors)")
    info = read_json_object(checkpoint / "config.json", "an export's config with 'model' and 'special_ids'")
    for key in ("model", "special_ids"):
        if not isinstance(info.get(key), dict):
            raise HFFormatError(
                f"{checkpoint / 'config.json'}: no '{key}' object (expected an export's config)"
            )
    try:
        cfg = from_dict(ModelConfig, export_model_config(checkpoint), str(checkpoint / "config.json"))
    except ConfigError as exc:  # a key no model family knows, a value out of range
        raise HFFormatError(
            f"{checkpoint / 'config.json'}: 'model' does not fit our model configs ({exc})"
        ) from None
    return info, cfg, load_safetensors(checkpoint / "model.safetensors")


def export_hf(
    checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", force: bool = False
) -> Path:
    """Write our export ``checkpoint`` as a transformers model directory ``out`` in its family's export
    layout (atomic;
    ``out`` and ``force`` as for :func:`import_hf`, ``checkpoint`` being the source)."""
    checkpoint, out = Path(checkpoint), Path(out)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise HFFormatError(f"dtype '{dtype}': expected float32, bfloat16 or float16")
    check_output_dir(out, src=checkpoint, force=force)
    info, cfg, weights = _read_export(checkpoint)
    layout = family_of(cfg).hf_export_layout
    if layout is None:
        raise HFFormatError(
            f"{checkpoint}: model family '{cfg.family}' has no Hugging Face layout to export to"
        )
    layout = layout(cfg)
    try:
        state = {k: t.to(torch_dtype).contiguous() for k, t in layout.from_ours(weights, cfg).items()}
    except KeyError as exc:
        raise HFFormatError(
            f"{checkpoint / 'model.safetensors'}: no tensor {exc.args[0]!r} (expected the weights of the model "
            "its config.json describes)"
        ) from None
    config = {**layout.hf_config(cfg, info.get("special_ids") or {}), "dtype": dtype}

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

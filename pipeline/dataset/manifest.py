"""The dataset manifest: what ``data_prep`` wrote and what training checks before reading it.

``manifest.json`` sits in the dataset directory beside the tokenizer (``tokenizer.model``, or
``tokenizer.json`` + ``tokenizer_config.json``) and ``shards/``. It records the tokenizer's kind
and hash, vocabulary size, sequence length, token dtype and, per split,
the shards with their sha256 and sample counts. Training refuses a dataset whose manifest
disagrees with the tokenizer or the model config, or whose shards do not have the recorded
sizes (:func:`verify_manifest`): a vocab or sequence-length mismatch otherwise trains on
garbage without any error. The shards' sha256 is checked by the loader while it reads them.

A shard path is relative to the dataset directory, or a URL (``http(s)://``, ``pipe:<command>``,
see :mod:`pipeline.dataset.remote`): :func:`with_base_url` turns a prepared dataset's manifest
into one whose shards are read from where they were uploaded.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.atomic_io import atomic_write_text
from pipeline.dataset.remote import RemoteReadError, is_url, locate, remote_size
from pipeline.dataset.tokenizer import SENTENCEPIECE, TOKENIZER_KINDS, load_tokenizer

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("pretrain", "sft")


class DatasetError(ValueError):
    """A dataset directory, manifest or shard that cannot be used; the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset directory
    sha256: str
    bytes: int
    samples: int


@dataclass(frozen=True)
class SplitInfo:
    sequences: int
    tokens: int
    shards: list[ShardInfo]

    @property
    def samples_per_shard(self) -> int:
        return self.shards[0].samples if self.shards else 0

    def supported_world_sizes(self, num_workers: int = 1) -> list[int]:
        """Data-parallel sizes W for which ``W * max(1, num_workers)`` divides the shard count."""
        n = len(self.shards)
        per = max(1, num_workers)
        return [w for w in range(1, n + 1) if n % (w * per) == 0]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    seq_len: int
    dtype: str  # numpy dtype of the stored token ids: "uint16" or "int32"
    vocab_size: int
    tokenizer_file: str
    tokenizer_sha256: str
    special_ids: dict[str, int | None]
    splits: dict[str, SplitInfo]
    seed: int
    corpus: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # pretrain: packed documents, every token maskable; sft: one (prompt, response) pair per
    # sequence with a ``prompt_len`` per sample, the prompt never masked (objective.mode: sft)
    kind: str = "pretrain"
    # "sentencepiece" (tokenizer_file tokenizer.model) or "tokenizer.json" (tokenizer_file
    # tokenizer.json; tokenizer_sha256 covers its tokenizer_config.json too)
    tokenizer_kind: str = SENTENCEPIECE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(f"dataset has no '{name}' split (splits: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


def _require(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise DatasetError(f"{where}: missing key '{key}'")
    if not isinstance(obj[key], typ):
        raise DatasetError(f"{where}: key '{key}' is {type(obj[key]).__name__}, expected {typ}")
    return obj[key]


def manifest_from_json(data: dict[str, Any], where: str) -> Manifest:
    """Parse and structurally validate a manifest dict (``where`` names the file in errors)."""
    version = _require(data, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise DatasetError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    splits = {}
    for name, s in _require(data, "splits", dict, where).items():
        shards = [
            ShardInfo(
                path=_require(sh, "path", str, f"{where} splits.{name}"),
                sha256=_require(sh, "sha256", str, f"{where} splits.{name}"),
                bytes=_require(sh, "bytes", int, f"{where} splits.{name}"),
                samples=_require(sh, "samples", int, f"{where} splits.{name}"),
            )
            for sh in _require(s, "shards", list, f"{where} splits.{name}")
        ]
        if len({sh.samples for sh in shards}) > 1:
            raise DatasetError(f"{where}: split '{name}' has shards of unequal sample counts")
        splits[name] = SplitInfo(
            sequences=_require(s, "sequences", int, f"{where} splits.{name}"),
            tokens=_require(s, "tokens", int, f"{where} splits.{name}"),
            shards=shards,
        )
    dtype = _require(data, "dtype", str, where)
    if dtype not in ("uint16", "int32"):
        raise DatasetError(f"{where}: dtype '{dtype}' not supported (expected uint16 or int32)")
    kind = data.get("kind", "pretrain")
    if kind not in KINDS:
        raise DatasetError(f"{where}: kind '{kind}' not supported (expected one of {', '.join(KINDS)})")
    tokenizer_kind = data.get("tokenizer_kind", SENTENCEPIECE)
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise DatasetError(
            f"{where}: tokenizer_kind '{tokenizer_kind}' not supported (expected one of {', '.join(TOKENIZER_KINDS)})"
        )
    return Manifest(
        kind=kind,
        tokenizer_kind=tokenizer_kind,
        format_version=version,
        seq_len=_require(data, "seq_len", int, where),
        dtype=dtype,
        vocab_size=_require(data, "vocab_size", int, where),
        tokenizer_file=_require(data, "tokenizer_file", str, where),
        tokenizer_sha256=_require(data, "tokenizer_sha256", str, where),
        special_ids=_require(data, "special_ids", dict, where),
        splits=splits,
        seed=_require(data, "seed", int, where),
        corpus=data.get("corpus", {}),
        config=data.get("config", {}),
    )


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Read ``<dataset_dir>/manifest.json``; errors name the file and the offending key."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(
            f"{path}: no dataset manifest (prepare the dataset first: make data, or make pretrain CLUSTER=local)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return manifest_from_json(data, str(path))


def write_manifest(manifest: Manifest, dataset_dir: str | Path) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename): a reader never sees half of it."""
    return atomic_write_text(
        Path(dataset_dir) / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    )


def build_manifest(
    tok,
    *,
    kind: str,
    seq_len: int,
    dtype: str,
    splits: dict[str, SplitInfo],
    seed: int,
    corpus: dict[str, Any],
    config: dict[str, Any],
) -> Manifest:
    """The manifest of a finished build (pretraining shards or SFT pairs) tokenised with ``tok``:
    the one place its tokenizer fields are filled, for both writers."""
    return Manifest(
        kind=kind,
        format_version=FORMAT_VERSION,
        seq_len=seq_len,
        dtype=dtype,
        vocab_size=tok.vocab_size,
        tokenizer_file=tok.file_name,
        tokenizer_kind=tok.kind,
        tokenizer_sha256=tok.sha256,
        special_ids=tok.special_ids(),
        splits=splits,
        seed=seed,
        corpus=corpus,
        config=config,
    )


def shard_size_errors(manifest: Manifest, dataset_dir: str | Path) -> list[str]:
    """One message per shard that is missing or whose size differs from its manifest entry.

    A stat per shard, no read: truncation and replacement are caught before training starts;
    a same-size change is caught by the sha256 the loader computes while reading a shard. An
    ``http(s)`` shard is asked its size (a HEAD request, retried); a ``pipe:`` shard's size is
    known only once read, so the loader checks it then.
    """
    errors = []
    for split in manifest.splits.values():
        for sh in split.shards:
            path = locate(str(dataset_dir), sh.path)
            if is_url(path):
                try:
                    size = remote_size(path)
                except RemoteReadError as exc:
                    errors.append(f"shard {exc} (manifest: {sh.bytes:,} bytes)")
                    continue
                if size is None:
                    continue
            else:
                try:
                    size = os.stat(path).st_size
                except OSError:
                    errors.append(f"shard {path}: missing (manifest: {sh.bytes:,} bytes)")
                    continue
            if size != sh.bytes:
                errors.append(
                    f"shard {path}: {size:,} bytes, manifest says {sh.bytes:,} (truncated or replaced)"
                )
    return errors


def with_base_url(manifest: Manifest, base_url: str) -> Manifest:
    """``manifest`` with every relative shard path ``p`` replaced by ``<base_url>/p`` (or by
    ``base_url`` with ``{path}`` replaced by ``p``, for a command: ``pipe:aws s3 cp s3://b/ds/{path} -``):
    the manifest of a dataset whose ``shards/`` directory was uploaded there (sizes and sha256 stay)."""
    if not is_url(base_url):
        raise DatasetError(f"base URL '{base_url}': expected http://, https:// or pipe:<command>")

    def url(rel: str) -> str:
        return base_url.replace("{path}", rel) if "{path}" in base_url else f"{base_url.rstrip('/')}/{rel}"

    splits = {
        name: replace(
            split, shards=[sh if is_url(sh.path) else replace(sh, path=url(sh.path)) for sh in split.shards]
        )
        for name, split in manifest.splits.items()
    }
    return replace(manifest, splits=splits)


def verify_manifest(
    manifest: Manifest,
    dataset_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    on_corrupt_shard: str = "fail",
) -> None:
    """Check the dataset against the tokenizer and model config it will be used with, and
    every shard's size against the manifest.

    ``tokenizer_path`` (a file, or a directory holding one) defaults to the tokenizer stored with
    the dataset; its kind and hash must be the manifest's. ``vocab_size`` is
    the model's (it may be padded above the tokenizer's for tensor-parallel divisibility, never
    below). Raises DatasetError naming what differs. With ``on_corrupt_shard="skip"`` (the
    loader's setting of that name) shards of the wrong size are a warning instead: the loader
    will skip and count them.
    """
    where = str(Path(dataset_dir) / MANIFEST_NAME)
    bad = shard_size_errors(manifest, dataset_dir)
    if bad:
        listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        msg = f"{where}: {len(bad)} shard(s) do not match the manifest: {listed}"
        if on_corrupt_shard != "skip":
            raise DatasetError(f"{msg}. Re-run the dataset build (make data) to repair them")
        warnings.warn(f"{msg}; on_corrupt_shard=skip: they will be skipped", stacklevel=2)
    tok_path = (
        Path(tokenizer_path) if tokenizer_path is not None else Path(dataset_dir) / manifest.tokenizer_file
    )
    tok = load_tokenizer(tok_path)
    if tok.kind != manifest.tokenizer_kind:
        raise DatasetError(
            f"{where}: the dataset was tokenised with a {manifest.tokenizer_kind} tokenizer, but {tok_path} "
            f"is a {tok.kind} one"
        )
    if tok.sha256 != manifest.tokenizer_sha256:
        raise DatasetError(
            f"{where}: tokenizer mismatch: the dataset was tokenised with sha256 "
            f"{manifest.tokenizer_sha256[:12]}…, but {tok_path} has {tok.sha256[:12]}…"
        )
    if tok.vocab_size != manifest.vocab_size:
        raise DatasetError(
            f"{where}: vocab_size {manifest.vocab_size} != tokenizer {tok_path} ({tok.vocab_size})"
        )
    if vocab_size is not None and vocab_size < manifest.vocab_size:
        raise DatasetError(
            f"{where}: model vocab_size {vocab_size} is smaller than the dataset's {manifest.vocab_size}; "
            "token ids would index past the embedding"
        )
    if seq_len is not None and seq_len != manifest.seq_len:
        raise DatasetError(
            f"{where}: model seq_len {seq_len} != dataset seq_len {manifest.seq_len} (re-prepare the dataset "
            "with seq_len to match, or set the model's seq_len)"
        )

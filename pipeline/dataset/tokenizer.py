"""The tokenizer as the DLM sees it: a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json``,
its special-token ids checked on load.

A masked diffusion LM needs four ids besides the text pieces: ``[PAD]`` (never predicted),
``[MASK]`` (the absorbing state of the forward process), ``BOS`` and ``EOS`` (document
boundaries in packed sequences). A tokenizer lacking any of them is rejected here, at load
time, rather than producing a model that silently predicts ``<unk>`` for masks.

Both kinds load into one :class:`Tokenizer` (``kind`` says which), with the same API, so no
consumer branches on the kind:

* ``sentencepiece``: a ``.model`` file; its special ids are fixed by the model
  (data_prep/tokenizer.py trains one with ``[PAD]``, ``[MASK]``, ``BOS``, ``EOS``);
* ``tokenizer.json``: a Hugging Face ``tokenizers`` file, with the ``tokenizer_config.json``
  beside it when there is one (special tokens, chat template); see
  :mod:`pipeline.dataset.hf_tokenizer`. Its hash covers both files.

A tokenizer is stored with a dataset or an export under canonical names
(:meth:`Tokenizer.save`): ``tokenizer.model``, or ``tokenizer.json`` + ``tokenizer_config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from pipeline.dataset.hf_tokenizer import load_tokenizer_json
from pipeline.dataset.tokenizer_types import (
    HF_TOKENIZER_DIR,
    MASK_PIECE,
    NEWLINE_PIECE,
    SENTENCEPIECE,
    SENTENCEPIECE_FILE,
    SPECIAL_TOKEN_NAMES,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_JSON,
    TOKENIZER_KINDS,
    Backend,
    Tokenizer,
    TokenizerError,
    chunks,
    sha256_file,
    tokenizer_json_sha256,
)

__all__ = [
    "HF_TOKENIZER_DIR",
    "MASK_PIECE",
    "NEWLINE_PIECE",
    "SENTENCEPIECE",
    "SENTENCEPIECE_FILE",
    "SPECIAL_TOKEN_NAMES",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_JSON",
    "TOKENIZER_KINDS",
    "Backend",
    "Tokenizer",
    "TokenizerError",
    "chunks",
    "find_tokenizer",
    "load_tokenizer",
    "sha256_file",
    "tokenizer_json_sha256",
]


class _SentencePiece:
    """sentencepiece behind the :class:`Backend` API; long texts are encoded in newline-cut chunks."""

    def __init__(self, proc: spm.SentencePieceProcessor):
        self.proc = proc

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        pieces = [list(chunks(t)) or [""] for t in texts]
        # One thread: sentencepiece's default (-1) starts a thread per online CPU in every call,
        # so a data_prep worker (or a job-array task of one worker) would use every core of the
        # node; data_prep parallelises with worker processes instead (multithreaded is False).
        flat = self.proc.encode([p for ps in pieces for p in ps], num_threads=1)
        out, k = [], 0
        for ps in pieces:
            out.append([i for ids in flat[k : k + len(ps)] for i in ids])
            k += len(ps)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.proc.decode(list(ids))


def find_tokenizer(directory: str | Path) -> Path:
    """The tokenizer file of a dataset, export or model directory: its ``tokenizer.model`` or
    ``tokenizer.json`` (never both), else an import-hf export's ``hf_tokenizer/tokenizer.json``."""
    directory = Path(directory)
    found = [directory / n for n in (SENTENCEPIECE_FILE, TOKENIZER_JSON) if (directory / n).is_file()]
    if len(found) > 1:
        raise TokenizerError(
            f"{directory}: holds both {SENTENCEPIECE_FILE} and {TOKENIZER_JSON}; name the one to use "
            f"({found[0]} or {found[1]})"
        )
    if found:
        return found[0]
    nested = directory / HF_TOKENIZER_DIR / TOKENIZER_JSON
    if nested.is_file():
        return nested
    raise TokenizerError(
        f"{directory}: no tokenizer in this directory (looked for {SENTENCEPIECE_FILE}, {TOKENIZER_JSON} "
        f"and {HF_TOKENIZER_DIR}/{TOKENIZER_JSON})"
    )


def load_tokenizer(path: str | Path, *, special_tokens: Mapping[str, str] | None = None) -> Tokenizer:
    """Load and validate a sentencepiece ``.model``, a ``tokenizer.json``, or the one in a directory
    (:func:`find_tokenizer`).

    ``special_tokens`` (``{"mask": "<|mask|>", "pad": ...}``, names from SPECIAL_TOKEN_NAMES) gives
    tokens a tokenizer.json's config does not declare (or overrides it); a sentencepiece model's are
    fixed. Raises TokenizerError naming the file when it is missing, unreadable, or lacks
    ``[PAD]``, ``[MASK]``, ``BOS`` or ``EOS``.
    """
    path = Path(path)
    if path.is_dir():
        path = find_tokenizer(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    unknown = sorted(set(special_tokens or {}) - set(SPECIAL_TOKEN_NAMES))
    if unknown:
        raise TokenizerError(
            f"special token name(s) {', '.join(unknown)}: expected {', '.join(SPECIAL_TOKEN_NAMES)}"
        )
    if path.suffix == ".json":
        return load_tokenizer_json(path, dict(special_tokens or {}))
    given = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    if given:
        raise TokenizerError(
            f"{path}: special tokens ({', '.join(f'{k}_token' for k in sorted(given))}) can be given only "
            f"for a {TOKENIZER_JSON} tokenizer; a sentencepiece model's are fixed by the model"
        )
    return _load_sentencepiece(path)


def _load_sentencepiece(path: Path) -> Tokenizer:
    proc = spm.SentencePieceProcessor()
    try:
        proc.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: not a sentencepiece model ({exc})") from None
    unk = proc.unk_id()
    missing = [
        name for name, i in (("PAD", proc.pad_id()), ("BOS", proc.bos_id()), ("EOS", proc.eos_id())) if i < 0
    ]
    mask_id = proc.piece_to_id(MASK_PIECE)
    if mask_id == unk:
        missing.append(MASK_PIECE)
    if missing:
        raise TokenizerError(
            f"{path}: tokenizer lacks special token(s) {', '.join(missing)}; a diffusion LM needs "
            f"[PAD], {MASK_PIECE}, BOS and EOS (train one with `make data`, which adds them: "
            f"pad_id=0, bos_id=2, eos_id=3, user_defined_symbols=['{MASK_PIECE}'])"
        )
    nl = proc.piece_to_id(NEWLINE_PIECE)
    ids = {"pad": proc.pad_id(), "mask": mask_id, "bos": proc.bos_id(), "eos": proc.eos_id()}
    return Tokenizer(
        kind=SENTENCEPIECE,
        path=path,
        sha256=sha256_file(path),
        backend=_SentencePiece(proc),
        vocab_size=proc.get_piece_size(),
        pad_id=ids["pad"],
        mask_id=mask_id,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=unk,
        newline_id=None if nl == unk else nl,
        special_tokens={name: proc.id_to_piece(i) for name, i in ids.items()},
    )

"""The sentencepiece tokenizer as the DLM sees it: special-token ids checked on load.

A masked diffusion LM needs four ids besides the text pieces: ``[PAD]`` (never predicted),
``[MASK]`` (the absorbing state of the forward process), ``BOS`` and ``EOS`` (document
boundaries in packed sequences). A ``.model`` file lacking any of them is rejected here, at
load time, rather than producing a model that silently predicts ``<unk>`` for masks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

MASK_PIECE = "[MASK]"
NEWLINE_PIECE = "\n"


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable, or lacks a special token the DLM needs."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Tokenizer:
    """A loaded sentencepiece model plus the special ids the DLM relies on."""

    path: Path
    sha256: str
    processor: spm.SentencePieceProcessor
    vocab_size: int
    pad_id: int
    mask_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    newline_id: int | None  # None: the model has no newline piece (line breaks are normalised away)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; PAD/BOS/EOS/[MASK] decode to nothing (they are control/special pieces)."""
        return self.processor.decode(ids)

    def special_ids(self) -> dict[str, int | None]:
        return {
            "pad": self.pad_id,
            "mask": self.mask_id,
            "bos": self.bos_id,
            "eos": self.eos_id,
            "unk": self.unk_id,
            "newline": self.newline_id,
        }


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load and validate a sentencepiece ``.model``.

    Raises TokenizerError naming the file when it is missing, not a sentencepiece model, or
    lacks ``[PAD]``, ``[MASK]``, ``BOS`` or ``EOS``.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
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
    return Tokenizer(
        path=path,
        sha256=sha256_file(path),
        processor=proc,
        vocab_size=proc.get_piece_size(),
        pad_id=proc.pad_id(),
        mask_id=mask_id,
        bos_id=proc.bos_id(),
        eos_id=proc.eos_id(),
        unk_id=unk,
        newline_id=None if nl == unk else nl,
    )

"""The tokenizer types every loader shares: :class:`Tokenizer`, its errors, file names and hashes.

pipeline/dataset/tokenizer.py loads sentencepiece models and dispatches ``tokenizer.json`` files to
pipeline/dataset/hf_tokenizer.py; both build the :class:`Tokenizer` defined here.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.atomic_io import atomic_path, atomic_write_bytes

MASK_PIECE = "[MASK]"
NEWLINE_PIECE = "\n"
SENTENCEPIECE = "sentencepiece"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_KINDS = (SENTENCEPIECE, TOKENIZER_JSON)
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The special tokens a DLM needs, by the names tokenizer_config.json gives them (``<name>_token``).
SPECIAL_TOKEN_NAMES = ("mask", "pad", "bos", "eos")
# An import-hf export keeps the source's tokenizer files here (pipeline/hf/convert.py).
HF_TOKENIZER_DIR = "hf_tokenizer"

# Long strings make sentencepiece BPE encoding super-linear: encode in chunks cut after newlines.
_ENCODE_CHUNK_CHARS = 8192


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable, or lacks a special token the DLM needs."""


class Backend(Protocol):
    """What :class:`Tokenizer` needs from a tokenizer library (one implementation per kind)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def chunks(text: str, size: int = _ENCODE_CHUNK_CHARS) -> Iterator[str]:
    """Cut ``text`` after newlines into pieces of about ``size`` characters (concatenation == text)."""
    start = 0
    n = len(text)
    while start < n:
        end = start + size
        if end < n:
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer plus the special ids the DLM relies on."""

    kind: str  # "sentencepiece" | "tokenizer.json"
    path: Path  # the .model or the tokenizer.json
    sha256: str  # of the files :meth:`save` writes (see tokenizer_json_sha256)
    vocab_size: int  # one past the largest id
    pad_id: int
    mask_id: int
    bos_id: int
    eos_id: int
    unk_id: int | None  # None: no unknown token (byte-level vocabularies)
    newline_id: int | None  # None: "\n" is not one token (or line breaks are normalised away)
    backend: Backend = field(repr=False, compare=False)
    special_tokens: dict[str, str] = field(default_factory=dict)  # name -> token text (pad, mask, ...)
    chat_template: str | None = field(default=None, repr=False)  # Jinja, tokenizer_config.json's
    # tokenizer_config.json as :meth:`save` writes it (the file's bytes, or with the special tokens
    # resolved from elsewhere added); None: no config. tokenizer.json kind only.
    config_bytes: bytes | None = field(default=None, repr=False, compare=False)
    # Renders ``chat_template`` (its loader sets it: pipeline/dataset/hf_tokenizer.py's sandboxed,
    # time- and size-limited renderer); None: this tokenizer has no template.
    renderer: Callable[..., str] | None = field(default=None, repr=False, compare=False)

    @property
    def file_name(self) -> str:
        """The name of the main file in a dataset or export directory."""
        return SENTENCEPIECE_FILE if self.kind == SENTENCEPIECE else TOKENIZER_JSON

    @property
    def file_sha256(self) -> str:
        """sha256 of the main file alone (the vocabulary), without tokenizer_config.json: the same
        for two copies of a tokenizer.json whose special tokens were given differently."""
        return sha256_file(self.path)

    @property
    def multithreaded(self) -> bool:
        """Whether :meth:`encode_batch` runs on the library's own thread pool (then parallelise by
        batching, not by forking worker processes)."""
        return self.kind == TOKENIZER_JSON

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.backend.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, faster (tokenizer.json: on all the library's threads)."""
        return self.backend.encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; PAD/BOS/EOS/[MASK] decode to nothing (they are control/special tokens)."""
        return self.backend.decode(ids)

    def special_ids(self) -> dict[str, int | None]:
        return {
            "pad": self.pad_id,
            "mask": self.mask_id,
            "bos": self.bos_id,
            "eos": self.eos_id,
            "unk": self.unk_id,
            "newline": self.newline_id,
        }

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool
    ) -> str:
        """``messages`` (``[{"role": ..., "content": ...}]``) rendered with the tokenizer's chat template.

        Raises TokenizerError when the tokenizer has none, or the template fails.
        """
        if self.chat_template is None or self.renderer is None:
            raise TokenizerError(
                f"{self.path}: no chat template (a tokenizer.json tokenizer whose "
                f"{TOKENIZER_CONFIG_FILE} has 'chat_template' is needed)"
            )
        return self.renderer(self, messages, add_generation_prompt=add_generation_prompt)

    def save(self, directory: str | Path) -> Path:
        """Write this tokenizer's files into ``directory`` under canonical names (each atomically);
        returns the main file, which :func:`load_tokenizer` loads back with the same ``sha256``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / self.file_name
        if self.path.resolve() != dest.resolve():
            with atomic_path(dest) as tmp:
                shutil.copyfile(self.path, tmp)
        if self.kind == TOKENIZER_JSON:
            cfg = directory / TOKENIZER_CONFIG_FILE
            if self.config_bytes is None:
                cfg.unlink(missing_ok=True)
            elif not cfg.is_file() or cfg.read_bytes() != self.config_bytes:
                atomic_write_bytes(cfg, self.config_bytes)
        return dest


def tokenizer_json_sha256(json_path: str | Path, config_bytes: bytes | None) -> str:
    """The hash of a tokenizer.json tokenizer: the file's sha256 when there is no config, else the
    sha256 of ``"tokenizer.json <sha256>\\ntokenizer_config.json <sha256>\\n"`` (both files' hashes)."""
    digest = sha256_file(json_path)
    if config_bytes is None:
        return digest
    cfg = hashlib.sha256(config_bytes).hexdigest()
    return hashlib.sha256(f"{TOKENIZER_JSON} {digest}\n{TOKENIZER_CONFIG_FILE} {cfg}\n".encode()).hexdigest()

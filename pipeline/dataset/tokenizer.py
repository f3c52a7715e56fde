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

import hashlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm

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
        if self.chat_template is None:
            raise TokenizerError(
                f"{self.path}: no chat template (a tokenizer.json tokenizer whose "
                f"{TOKENIZER_CONFIG_FILE} has 'chat_template' is needed)"
            )
        from pipeline.dataset.hf_tokenizer import render_chat_template

        return render_chat_template(self, messages, add_generation_prompt=add_generation_prompt)

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
        from pipeline.dataset.hf_tokenizer import load_tokenizer_json

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

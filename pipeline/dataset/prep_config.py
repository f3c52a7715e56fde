"""Typed config of a dataset build (``configs/data/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import ConfigError
from pipeline.dataset.tokenizer import SPECIAL_TOKEN_NAMES

SAMPLE_CORPUS = "sample"  # corpus entry that stands for the embedded sample corpus


@dataclass
class TokenizerConfig:
    """Train a sentencepiece model, or reuse ``model`` as it is: a sentencepiece ``.model``, a
    Hugging Face ``tokenizer.json`` (its ``tokenizer_config.json`` beside it is read too), or a
    directory holding one (pipeline/dataset/tokenizer.py). A given tokenizer is copied into the
    dataset; the training keys below are then unused."""

    model: str | None = None  # an existing tokenizer (.model or tokenizer.json) instead of training one
    # Special tokens of a given tokenizer.json that its tokenizer_config.json does not declare (or
    # declares otherwise): the token text, e.g. mask_token: "<|mdm_mask|>". PAD may be the EOS
    # token only when said so here or in the config. Written into the dataset's tokenizer_config.json.
    mask_token: str | None = None  # tokenizer.json only: the mask token, when its config does not name one
    pad_token: str | None = None  # tokenizer.json only: the padding token
    bos_token: str | None = None  # tokenizer.json only: the begin-of-document token
    eos_token: str | None = None  # tokenizer.json only: the end-of-document token
    vocab_size: int = 8000  # pieces of a trained sentencepiece tokenizer (the model's vocab_size)
    model_type: Literal["bpe", "unigram"] = (
        "bpe"  # sentencepiece algorithm (bpe trains in seconds, unigram in minutes)
    )
    character_coverage: float = 0.9995  # characters a trained tokenizer covers (rarer ones become <unk>)
    # Lines sampled (seeded reservoir) from the corpus to train on; bounds memory and time.
    max_sentences: int = 2_000_000

    def special_tokens(self) -> dict[str, str]:
        """The special tokens given, by name (``{"mask": "<|mask|>"}``)."""
        return {
            name: value
            for name in SPECIAL_TOKEN_NAMES
            if (value := getattr(self, f"{name}_token")) is not None
        }

    def validate(self) -> None:
        for name, value in self.special_tokens().items():
            key = f"tokenizer.{name}_token"
            if self.model is None or self.model.endswith(".model"):
                raise ConfigError(
                    f"key '{key}': given as '{value}', but special tokens can be given only for a "
                    "tokenizer.json tokenizer (tokenizer.model=path/to/tokenizer.json or its directory); "
                    "a sentencepiece model's are fixed"
                )
            if not value:
                raise ConfigError(f"key '{key}': empty, expected the token's text")
        if self.vocab_size < 300:
            raise ConfigError(
                f"key 'tokenizer.vocab_size': got {self.vocab_size}, expected >= 300 "
                "(256 byte-fallback pieces plus special tokens)"
            )
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError(
                f"key 'tokenizer.character_coverage': got {self.character_coverage}, expected 0.9..1.0"
            )
        if self.max_sentences < 1:
            raise ConfigError(f"key 'tokenizer.max_sentences': got {self.max_sentences}, expected >= 1")


@dataclass
class PrepConfig:
    """Raw corpus -> tokenizer -> packed sequences -> WebDataset shards + manifest."""

    out_dir: str  # where manifest.json, the tokenizer and shards/ are written
    # Paths, directories or globs of .txt / .jsonl / .jsonl.gz / .parquet; "sample" = the sample corpus.
    corpus: list[str] = field(default_factory=lambda: [SAMPLE_CORPUS])
    text_field: str = "text"  # the field of .jsonl / .parquet records that holds the text
    seq_len: int = 256  # tokens per training sequence (documents joined with EOS and cut)
    val_fraction: float = 0.01  # documents held out for evaluation (whole documents, seeded)
    # Every shard of a split holds the same number of sequences, so a data-parallel world of
    # size W with N workers per rank is balanced whenever W * N divides the shard count.
    train_shards: int = 64  # equal-size train shards (DP size x loader workers must divide it)
    val_shards: int = 8  # equal-size held-out shards
    seed: int = 1234  # document split and row shuffle
    workers: int = 0  # tokenising processes; 0 = all cores
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("key 'corpus': empty list, expected at least one path, glob or 'sample'")
        if self.seq_len < 8:
            raise ConfigError(f"key 'seq_len': got {self.seq_len}, expected >= 8")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"key 'val_fraction': got {self.val_fraction}, expected 0 <= x < 0.5")
        for key in ("train_shards", "val_shards"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}': got {getattr(self, key)}, expected >= 1")
        if self.workers < 0:
            raise ConfigError(f"key 'workers': got {self.workers}, expected >= 0 (0 = all cores)")

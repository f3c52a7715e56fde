"""Train a sentencepiece model with the special tokens a diffusion LM needs.

Layout of the special ids (checked again by :func:`pipeline.dataset.tokenizer.load_tokenizer`):
``0 [PAD]``, ``1 <unk>``, ``2 BOS``, ``3 EOS``, ``4 [MASK]``, ``5 "\\n"``. Normalisation is the
identity, whitespace is kept, and unknown characters fall back to bytes, so
``decode(encode(text)) == text`` exactly: what the shards hold is exactly the corpus text.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tqdm import tqdm

from pipeline.dataset import atomic_write_bytes
from pipeline.dataset.prep_config import TokenizerConfig
from pipeline.dataset.tokenizer import MASK_PIECE, NEWLINE_PIECE, Tokenizer, load_tokenizer

# sentencepiece's own default: the trainer silently drops longer sentences, and a corpus whose
# lines are all longer (one-line documents) ends in its "!sentences_.empty()" internal error.
MAX_LINE_BYTES = 4192


class TokenizerTrainingError(ValueError):
    """Tokenizer training failed for a reason the user can act on (named in the message)."""


def _cut_long_line(line: str, limit: int = MAX_LINE_BYTES) -> list[str]:
    """Cut ``line`` into pieces of at most ``limit`` UTF-8 bytes, after a space where there is one."""
    raw = line.encode("utf-8")
    pieces = []
    start = 0
    while len(raw) - start > limit:
        end = start + limit
        space = raw.rfind(b" ", start + limit // 2, end)
        if space > start:
            end = space + 1
        else:
            while raw[end] & 0xC0 == 0x80:  # never cut inside a UTF-8 sequence
                end -= 1
        pieces.append(raw[start:end].decode("utf-8"))
        start = end
    pieces.append(raw[start:].decode("utf-8"))
    return [p for p in pieces if p.strip()]


def sample_lines(texts: Iterable[str], max_lines: int, seed: int, progress: bool = True) -> list[str]:
    """A seeded reservoir sample of at most ``max_lines`` non-empty lines (Algorithm R).

    Deterministic for a given input order and seed; memory is bounded by ``max_lines``. Lines
    over ``MAX_LINE_BYTES`` (sentencepiece would skip them) are cut into pieces first, and a
    note says how many and how long.
    """
    rng = np.random.default_rng(seed)
    reservoir: list[str] = []
    seen = 0
    cut, longest = 0, 0
    for text in tqdm(texts, desc="sampling lines", unit="doc", disable=not progress, leave=False):
        for whole in text.split("\n"):
            if not whole.strip():
                continue
            # 4 bytes per character at most: only possibly long lines pay for the encode.
            if len(whole) * 4 > MAX_LINE_BYTES and len(whole.encode("utf-8")) > MAX_LINE_BYTES:
                cut += 1
                longest = max(longest, len(whole.encode("utf-8")))
                pieces = _cut_long_line(whole)
            else:
                pieces = [whole]
            for line in pieces:
                if seen < max_lines:
                    reservoir.append(line)
                else:
                    j = int(rng.integers(0, seen + 1))
                    if j < max_lines:
                        reservoir[j] = line
                seen += 1
    if cut:
        print(
            f"note: {cut:,} line(s) longer than {MAX_LINE_BYTES} bytes (longest {longest:,} bytes) were cut "
            f"into pieces to train the tokenizer on (sentencepiece skips longer lines)"
        )
    return reservoir


def train_tokenizer(
    lines: list[str],
    cfg: TokenizerConfig,
    out_path: Path,
    *,
    threads: int | None = None,
    source: str = "corpus",
    progress: bool = True,
) -> Tokenizer:
    """Train on ``lines`` and write ``out_path`` atomically; returns the validated tokenizer.

    Raises TokenizerTrainingError when the corpus cannot support ``cfg.vocab_size``.
    """
    if not lines:
        raise TokenizerTrainingError(f"{source}: no text lines to train a tokenizer on")
    buf = io.BytesIO()
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(
                tqdm(lines, desc="training tokenizer", unit="line", disable=not progress, leave=False)
            ),
            model_writer=buf,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece="[PAD]",
            user_defined_symbols=[MASK_PIECE, NEWLINE_PIECE],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            # Lines were sampled by us (seeded); stop sentencepiece from re-sampling them.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=MAX_LINE_BYTES,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc)
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if m:
            raise TokenizerTrainingError(
                f"{source}: tokenizer.vocab_size={m.group(1)} is larger than this corpus supports "
                f"(at most {m.group(2)}); lower tokenizer.vocab_size or add text"
            ) from None
        raise TokenizerTrainingError(f"{source}: sentencepiece training failed: {msg}") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The trainer records its thread count in the model; pin it so the file (and its sha256,
    # which the dataset manifest carries) does not depend on the machine that trained it.
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    proto.trainer_spec.num_threads = 1
    atomic_write_bytes(out_path, proto.SerializeToString())
    tok = load_tokenizer(out_path)
    print(
        f"trained {cfg.model_type} tokenizer: vocab {tok.vocab_size} on {len(lines):,} lines in {time.time() - t0:.1f}s"
    )
    return tok

"""Tokenizer: special-token layout, exact round trip, and clear errors for unusable models."""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm

from data_prep.tokenizer import MAX_LINE_BYTES, TokenizerTrainingError, sample_lines, train_tokenizer
from pipeline.dataset.prep_config import TokenizerConfig
from pipeline.dataset.tokenizer import TokenizerError, load_tokenizer
from tests.conftest import make_text


@pytest.fixture(scope="module")
def lines():
    rng = random.Random(3)
    return sample_lines([make_text(rng, 200) for _ in range(10)], max_lines=5000, seed=0, progress=False)


def test_trained_tokenizer_has_dlm_special_ids_and_exact_round_trip(tmp_path, lines):
    tok = train_tokenizer(lines, TokenizerConfig(vocab_size=400), tmp_path / "t.model", progress=False)
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.newline_id) == (0, 1, 2, 3, 4, 5)
    text = "Naïve café  owner,\nsaid 3.14!\n\n  Ünïcode ✓ 𝔘 end"
    assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback
    assert tok.unk_id not in tok.encode(text)


def test_sample_lines_is_seeded_and_bounded():
    texts = [f"line {i}\n\nother {i}" for i in range(100)]
    a = sample_lines(texts, 30, seed=1, progress=False)
    assert a == sample_lines(texts, 30, seed=1, progress=False)
    assert a != sample_lines(texts, 30, seed=2, progress=False)
    assert len(a) == 30 and all(x.strip() for x in a)


def test_vocab_larger_than_corpus_supports_is_a_clear_error(tmp_path):
    with pytest.raises(
        TokenizerTrainingError,
        match=r"mycorpus: tokenizer\.vocab_size=5000 is larger than this corpus supports \(at most \d+\)",
    ):
        train_tokenizer(
            ["tiny corpus here"] * 20,
            TokenizerConfig(vocab_size=5000),
            tmp_path / "t.model",
            source="mycorpus",
            progress=False,
        )
    assert not (tmp_path / "t.model").exists()


def test_model_without_mask_token_is_rejected(tmp_path, lines):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, model_type="bpe", minloglevel=2
    )  # sentencepiece defaults: no [PAD], no [MASK]
    (tmp_path / "plain.model").write_bytes(buf.getvalue())
    with pytest.raises(
        TokenizerError, match=r"plain\.model: tokenizer lacks special token\(s\) PAD, \[MASK\]"
    ):
        load_tokenizer(tmp_path / "plain.model")


def test_missing_or_garbage_model_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"none\.model: tokenizer model not found"):
        load_tokenizer(tmp_path / "none.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_one_line_document_over_the_sentencepiece_limit_still_trains_a_tokenizer(tmp_path, capsys):
    rng = random.Random(4)
    words = make_text(rng, 400).split()
    line = " ".join(words * 4)  # one line of ~60 KB: sentencepiece alone drops it and has nothing left
    assert len(line.encode()) > 10 * MAX_LINE_BYTES
    lines = sample_lines([line], max_lines=10_000, seed=0, progress=False)
    assert "note: 1 line(s) longer than 4192 bytes" in capsys.readouterr().out
    assert all(len(x.encode()) <= MAX_LINE_BYTES for x in lines)
    assert "".join(lines) == line  # cut after spaces, nothing lost
    tok = train_tokenizer(lines, TokenizerConfig(vocab_size=400), tmp_path / "t.model", progress=False)
    assert tok.decode(tok.encode(line[:500])) == line[:500]

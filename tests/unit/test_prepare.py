"""Dataset build: round trip, determinism, idempotence, interrupted writes, manifest checks, bad shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.shard import DatasetPrepError, prepare_dataset
from pipeline.dataset.manifest import DatasetError, load_manifest, verify_manifest
from pipeline.dataset.tokenizer import load_tokenizer
from pipeline.loader.stream import CorruptShardError, DataConfig, TokenBatchLoader
from tests.conftest import prep_config, write_txt_corpus


def _all_batches(path: Path, **kw) -> list[dict]:
    cfg = DataConfig(path=str(path), **{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 0, **kw})
    return list(TokenBatchLoader(cfg, loop=False))


def test_round_trip_text_to_batches_to_text(tmp_path):
    corpus = write_txt_corpus(tmp_path, n_docs=12, seed=5)
    cfg = prep_config(tmp_path / "ds", [str(corpus)], train_shards=1, val_fraction=0.0)
    manifest = prepare_dataset(cfg, progress=False)
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer.model")
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    # The packed input, computed independently: documents joined by EOS, cut into seq_len rows.
    stream = np.concatenate([np.array([*tok.encode(t), tok.eos_id]) for t in texts])
    L = manifest.seq_len
    n_seq = len(stream) // L
    got = {}
    for b in _all_batches(tmp_path / "ds", batch_size=1):
        got[int(b["index"][0])] = b["tokens"][0].numpy()
    assert sorted(got) == list(range(n_seq))  # one shard: only the final partial row is dropped
    delivered = np.concatenate([got[i] for i in range(n_seq)])
    np.testing.assert_array_equal(delivered, stream[: n_seq * L])
    # Detokenised, every complete document comes back byte-for-byte.
    cuts = np.flatnonzero(delivered == tok.eos_id)
    decoded = [tok.decode(seg.tolist()) for seg in np.split(delivered, cuts + 1)[: len(cuts)]]
    segs = [seg[seg != tok.eos_id] for seg in np.split(delivered, cuts + 1)[: len(cuts)]]
    assert [tok.decode(s.tolist()) for s in segs] == texts[: len(cuts)] == decoded
    assert manifest.corpus["dropped_tokens"]["train"] == len(stream) - n_seq * L


def test_build_is_deterministic_and_idempotent(tmp_path):
    corpus = write_txt_corpus(tmp_path, n_docs=20, seed=2)
    m1 = prepare_dataset(prep_config(tmp_path / "a", [str(corpus)]), progress=False)
    m2 = prepare_dataset(prep_config(tmp_path / "b", [str(corpus)], workers=1), progress=False)
    assert [s.sha256 for s in m1.splits["train"].shards] == [s.sha256 for s in m2.splits["train"].shards]
    assert m1.tokenizer_sha256 == m2.tokenizer_sha256
    assert {s.samples for s in m1.splits["train"].shards} == {m1.splits["train"].samples_per_shard}
    shard = tmp_path / "a" / m1.splits["train"].shards[0].path
    before = shard.stat().st_mtime_ns
    m3 = prepare_dataset(prep_config(tmp_path / "a", [str(corpus)]), progress=False)
    assert shard.stat().st_mtime_ns == before  # nothing rewritten
    assert m3 == m1


def test_interrupted_shard_write_is_not_picked_up_and_rerun_finishes(tmp_path, monkeypatch):
    corpus = write_txt_corpus(tmp_path, n_docs=20, seed=2)
    cfg = prep_config(tmp_path / "ds", [str(corpus)])
    real_init, real_write = wds.TarWriter.__init__, wds.TarWriter.write

    def remember_path(self, fileobj, *args, **kw):
        self.memdlm_path = str(fileobj)
        real_init(self, fileobj, *args, **kw)

    def crash_on_third_shard(self, obj):
        real_write(self, obj)
        if ".train-00002.tar.tmp-" in self.memdlm_path:
            raise KeyboardInterrupt  # as if killed after the first sample of the third shard

    monkeypatch.setattr(wds.TarWriter, "__init__", remember_path)
    monkeypatch.setattr(wds.TarWriter, "write", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, progress=False)
    shards = tmp_path / "ds" / "shards"
    assert sorted(p.name for p in shards.glob("*.tar")) == ["train-00000.tar", "train-00001.tar"]
    assert list(shards.glob(".train-00002.tar.tmp-*"))  # the half-written file has a temporary name
    with pytest.raises(DatasetError, match=r"no dataset manifest"):
        load_manifest(tmp_path / "ds")  # readers refuse an unfinished dataset
    done_mtime = (shards / "train-00000.tar").stat().st_mtime_ns
    monkeypatch.undo()
    manifest = prepare_dataset(cfg, progress=False)
    assert (shards / "train-00000.tar").stat().st_mtime_ns == done_mtime  # finished shards skipped
    assert not list(shards.glob(".*tmp*"))
    reference = prepare_dataset(prep_config(tmp_path / "ref", [str(corpus)]), progress=False)
    assert [s.sha256 for s in manifest.splits["train"].shards] == [
        s.sha256 for s in reference.splits["train"].shards
    ]


def test_same_out_dir_with_other_config_is_refused(tmp_path, tiny_dataset):
    corpus = write_txt_corpus(tmp_path, n_docs=20, seed=2)
    prepare_dataset(prep_config(tmp_path / "ds", [str(corpus)]), progress=False)
    with pytest.raises(DatasetPrepError, match=r"ds: was prepared from a different config or corpus"):
        prepare_dataset(prep_config(tmp_path / "ds", [str(corpus)], seq_len=16), progress=False)


def test_corpus_too_small_for_shard_count(tmp_path):
    corpus = write_txt_corpus(tmp_path, n_docs=3, seed=2, lines=(5, 6))
    with pytest.raises(
        DatasetPrepError, match=r"corpus too small for split 'train': .* fewer than train_shards=64"
    ):
        prepare_dataset(
            prep_config(tmp_path / "ds", [str(corpus)], train_shards=64, val_fraction=0.0), progress=False
        )


def test_reused_tokenizer_is_copied_and_hashed(tmp_path, tiny_dataset):
    corpus = write_txt_corpus(tmp_path, n_docs=20, seed=2)
    model = tiny_dataset / "tokenizer.model"
    m = prepare_dataset(
        prep_config(tmp_path / "ds", [str(corpus)], tokenizer={"model": str(model)}), progress=False
    )
    assert m.tokenizer_sha256 == load_manifest(tiny_dataset).tokenizer_sha256


def test_manifest_verification_catches_mismatches(tmp_path, tiny_dataset):
    m = load_manifest(tiny_dataset)
    verify_manifest(m, tiny_dataset, vocab_size=m.vocab_size + 64, seq_len=m.seq_len)  # padded vocab is fine
    with pytest.raises(DatasetError, match=r"model seq_len 64 != dataset seq_len 32"):
        verify_manifest(m, tiny_dataset, seq_len=64)
    with pytest.raises(DatasetError, match=r"model vocab_size 100 is smaller than the dataset's 400"):
        verify_manifest(m, tiny_dataset, vocab_size=100)
    other = tmp_path / "other"
    corpus = write_txt_corpus(tmp_path, n_docs=20, seed=9)
    prepare_dataset(prep_config(other, [str(corpus)]), progress=False)
    with pytest.raises(DatasetError, match=r"tokenizer mismatch: the dataset was tokenised with sha256"):
        verify_manifest(m, tiny_dataset, tokenizer_path=other / "tokenizer.model")
    with pytest.raises(DatasetError, match=r"tokenizer mismatch"):
        TokenBatchLoader(DataConfig(path=str(tiny_dataset)), tokenizer_path=other / "tokenizer.model")


def _copy(ds: Path, dst: Path) -> Path:
    shutil.copytree(ds, dst)
    return dst


def test_truncated_shard_fails_with_its_name(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    shard = ds / "shards" / "train-00003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CorruptShardError,
        match=rf"shard .*train-00003\.tar: {len(data) // 2:,} bytes, manifest says {len(data):,} \(truncated",
    ):
        _all_batches(ds)


def test_corrupt_shard_is_skipped_and_counted_when_configured(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    (ds / "shards" / "train-00005.tar").write_bytes(b"\0garbage" * 300)
    full = len(_all_batches(tiny_dataset))
    loader = TokenBatchLoader(
        DataConfig(path=str(ds), batch_size=4, num_workers=0, shuffle_buffer=0, on_corrupt_shard="skip"),
        loop=False,
    )
    with pytest.warns(UserWarning, match=r"skipping corrupt shard .*train-00005\.tar"):
        got = list(loader)
    per_shard = load_manifest(ds).splits["train"].samples_per_shard
    assert loader.skipped_shards == 1
    assert full * 4 - len(got) * 4 >= per_shard - 3  # that shard's samples are missing


def test_sample_with_wrong_length_is_reported(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    m["seq_len"] = 16  # manifest no longer matches what the shards hold
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptShardError, match=r"has uint16\[32\], expected uint16\[16\]"):
        _all_batches(ds)

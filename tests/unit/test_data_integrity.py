"""Datasets that lie are not trained on: shard sizes and sha256 checked by the loader and by
``make data`` (which repairs what is damaged), a failed build never locks its output folder,
and the loader's count of skipped corrupt shards survives epochs and resume."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from data_prep.corpus import CorpusError
from data_prep.shard import DatasetPrepError, prepare_dataset
from pipeline.dataset.manifest import DatasetError, load_manifest, verify_manifest
from pipeline.loader.stream import CorruptShardError, DataConfig, TokenBatchLoader
from tests.conftest import make_text, prep_config, write_txt_corpus


def _copy(ds: Path, dst: Path) -> Path:
    shutil.copytree(ds, dst)
    return dst


def _loader(ds: Path, loop: bool = False, **kw) -> TokenBatchLoader:
    cfg = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 0, "seed": 3, **kw}
    return TokenBatchLoader(DataConfig(path=str(ds), **cfg), loop=loop)


def _flip_a_token_byte(shard: Path) -> None:
    """Change one byte inside the first sample's token array: same size, still a valid tar."""
    with tarfile.open(shard) as tar:
        first = tar.getmembers()[0]
        pos = first.offset_data + first.size - 1  # high byte of the last token id
    data = bytearray(shard.read_bytes())
    data[pos] ^= 0x01
    shard.write_bytes(bytes(data))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loader_refuses_a_same_size_shard_whose_sha256_differs(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    shard = ds / "shards" / "train-00002.tar"
    recorded = _sha256(shard)
    _flip_a_token_byte(shard)
    with pytest.raises(
        CorruptShardError,
        match=rf"shard .*train-00002\.tar: sha256 {_sha256(shard)}, manifest says {recorded} \(contents changed",
    ):
        list(_loader(ds))


def test_loader_refuses_a_manifest_whose_shard_sha256_is_wrong(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        CorruptShardError, match=r"shard .*train-00001\.tar: sha256 [0-9a-f]{64}, manifest says 0{64}"
    ):
        list(_loader(ds))
    assert len(list(_loader(tiny_dataset))) == _loader(tiny_dataset).batches_per_epoch  # the original reads


def test_sha256_mismatch_is_skipped_and_counted_with_on_corrupt_shard_skip(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    _flip_a_token_byte(ds / "shards" / "train-00006.tar")
    loader = _loader(ds, on_corrupt_shard="skip")
    with pytest.warns(UserWarning, match=r"skipping corrupt shard .*train-00006\.tar: sha256"):
        list(loader)
    assert loader.skipped_shards == 1


def test_shard_of_wrong_size_fails_before_any_sample_and_verify_manifest_names_it(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    shard = ds / "shards" / "train-00004.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)  # appended: every sample still reads fine
    m = load_manifest(ds)
    with pytest.raises(
        DatasetError,
        match=rf"1 shard\(s\) do not match the manifest: shard .*train-00004\.tar: {size + 512:,} bytes, "
        rf"manifest says {size:,}.*make data",
    ):
        verify_manifest(m, ds)
    with pytest.warns(UserWarning, match=r"train-00004\.tar.*they will be skipped"):
        verify_manifest(m, ds, on_corrupt_shard="skip")
    # One worker on one rank reading that shard only: it must fail before yielding anything.
    loader = TokenBatchLoader(
        DataConfig(path=str(ds), batch_size=1, num_workers=0, shuffle_buffer=0),
        rank=4,
        world_size=8,
        shuffle=False,
    )
    got = []
    with pytest.raises(
        CorruptShardError, match=rf"train-00004\.tar: {size + 512:,} bytes, manifest says {size:,}"
    ):
        for batch in loader:
            got.append(batch)
    assert got == []


def test_make_data_rewrites_damaged_shards_instead_of_saying_up_to_date(tmp_path, capsys):
    corpus = write_txt_corpus(tmp_path, n_docs=16, seed=4)
    cfg = prep_config(tmp_path / "ds", [str(corpus)], workers=1)
    first = prepare_dataset(cfg, progress=False)
    shards = tmp_path / "ds" / "shards"
    truncated, altered, intact = (
        shards / "train-00001.tar",
        shards / "val-00000.tar",
        shards / "train-00005.tar",
    )
    truncated.write_bytes(truncated.read_bytes()[:1000])
    _flip_a_token_byte(altered)  # same size: only the sha256 tells
    (tmp_path / "ds" / "tokenizer.model").write_bytes(b"not a model")
    intact_mtime = intact.stat().st_mtime_ns
    capsys.readouterr()
    again = prepare_dataset(cfg, progress=False)
    out = capsys.readouterr().out
    assert "up to date" not in out
    assert "train-00001.tar: 1,000 bytes" in out and "val-00000.tar: sha256" in out
    assert "repairing" in out and "tokenizer.model: missing or not the tokenizer" in out
    assert again == first
    assert _sha256(tmp_path / "ds" / "tokenizer.model") == first.tokenizer_sha256
    for sh in (*first.splits["train"].shards, *first.splits["val"].shards):
        assert _sha256(tmp_path / "ds" / sh.path) == sh.sha256, sh.path
    assert intact.stat().st_mtime_ns == intact_mtime  # only the damaged shards were rewritten
    prepare_dataset(cfg, progress=False)
    assert "up to date, sizes and sha256 of 10 shards checked" in capsys.readouterr().out


def test_failed_build_does_not_block_the_corrected_rerun(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    rng = random.Random(5)
    rows = [{"body": make_text(rng, 30)} for i in range(30)]
    (corpus / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (corpus / "b.jsonl").write_text('{"body": "fine"}\n{"body": broken\n')
    out = tmp_path / "ds"
    with pytest.raises(CorpusError, match=r"a\.jsonl:1: no field 'text'"):
        prepare_dataset(prep_config(out, [str(corpus)], train_shards=2, val_fraction=0.0), progress=False)
    with pytest.raises(CorpusError, match=r"b\.jsonl:2: not valid JSON"):  # the field fixed, a bad line left
        prepare_dataset(
            prep_config(out, [str(corpus)], text_field="body", train_shards=2, val_fraction=0.0),
            progress=False,
        )
    (corpus / "b.jsonl").write_text('{"body": "fine"}\n')
    m = prepare_dataset(
        prep_config(out, [str(corpus)], text_field="body", train_shards=2, val_fraction=0.0), progress=False
    )
    assert m.corpus["documents"] == 31
    with pytest.raises(DatasetPrepError, match=r"was prepared from a different config or corpus"):
        prepare_dataset(prep_config(out, [str(corpus)], text_field="body", train_shards=4), progress=False)


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        (0, r"split 'val': 0 tokens .*val_fraction=0\.1 held out 0 of 1 document\(s\); set val_fraction=0"),
        (
            7,
            r"split 'train': 0 tokens .*val_fraction=0\.1 put all 1 document\(s\) in the held-out .*val_fraction=0",
        ),
    ],
)
def test_one_document_corpus_points_at_val_fraction(tmp_path, seed, message):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "only.txt").write_text("one document of plain words, repeated.\n" * 400)
    # val_fraction holds out whole documents by a seeded hash: seed 0 keeps document 0, seed 7 holds it out
    cfg = prep_config(
        tmp_path / "ds", [str(tmp_path / "c")], train_shards=1, seed=seed, tokenizer={"vocab_size": 300}
    )
    with pytest.raises(DatasetPrepError, match=message):
        prepare_dataset(cfg, progress=False)


def _take(loader: TokenBatchLoader, n: int) -> list:
    return [b["index"].clone() for b in itertools.islice(iter(loader), n)]


@pytest.mark.filterwarnings("ignore:skipping corrupt shard")
def test_skipped_shards_accumulate_over_epochs_and_are_restored_on_resume(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    (ds / "shards" / "train-00005.tar").write_bytes(b"\0garbage" * 300)
    kw = {"on_corrupt_shard": "skip", "loop": True}
    per_epoch = len(list(_loader(ds, **{**kw, "loop": False})))  # batches of an epoch with that shard skipped
    # seed 3 orders the shards [6 7 2 1 4 5 3 0], [2 1 4 0 5 7 6 3], [1 7 4 0 2 6 3 5] in epochs 0-2:
    # shard 5 is hit once in each of the first two epochs and not yet in the third.
    probe = _loader(ds, **kw)
    total = 2 * per_epoch + 1
    reference = _take(probe, total)
    assert probe.skipped_shards == 2
    k = per_epoch + 120  # in epoch 1, after its skip (its first 4 shards make 108 batches)
    first = _loader(ds, **kw)
    head = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["skipped_shards"] == first.skipped_shards == 2
    resumed = _loader(ds, **kw)
    resumed.load_state_dict(state)
    assert resumed.skipped_shards == 2
    tail = _take(resumed, total - k)
    assert all(bool((x == y).all()) for x, y in zip(head + tail, reference, strict=True))
    assert resumed.skipped_shards == 2  # the skip in epoch 1 is re-read on resume, not counted twice


def test_failed_sft_build_leaves_no_temporary_directory(tmp_path, tiny_dataset):
    from data_prep.sft import SFTDataError, write_sft_dataset

    pairs = [("ok", "a short prompt", "yes"), ("long", "word " * 200, "no")]  # the second exceeds seq_len
    with pytest.raises(SFTDataError, match=r"split 'train', example 'long': prompt"):
        write_sft_dataset(
            {"train": pairs},
            tokenizer=tiny_dataset / "tokenizer.model",
            out_dir=tmp_path / "sft",
            seq_len=32,
            shards={"train": 1},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []

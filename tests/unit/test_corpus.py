"""Corpus reading: formats, deterministic order, and a clear error for each kind of bad input."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from data_prep.corpus import CorpusError, CorpusStats, iter_documents, resolve_inputs


def _docs(paths, field="text"):
    stats = CorpusStats()
    docs = list(iter_documents([(p, field) for p in paths], stats))
    return docs, stats


def test_directory_glob_and_formats_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two\n")
    (tmp_path / "b" / "1.txt").write_text("one\n")
    (tmp_path / "b" / "skip.md").write_text("not a corpus file")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "three"}) + "\n\n" + json.dumps({"body": "four"}) + "\n")
    files = resolve_inputs([str(tmp_path / "b"), str(tmp_path / "*.jsonl.gz")])
    assert [f.name for f in files] == ["1.txt", "2.txt", "c.jsonl.gz"]
    stats = CorpusStats()
    docs = list(iter_documents([(files[0], "x"), (files[1], "x"), (files[2], "body")], stats))
    assert [d.text for d in docs] == ["one\n", "two\n", "three", "four"]
    assert docs[3].source.endswith("c.jsonl.gz:3")
    assert stats.documents == 4 and stats.files == 3


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", "beta"]}), tmp_path / "t.parquet")
    docs, _ = _docs(resolve_inputs([str(tmp_path / "t.parquet")]), field="content")
    assert [d.text for d in docs] == ["alpha", "beta"]
    with pytest.raises(CorpusError, match=r"t\.parquet: no column 'text' \(columns: content\)"):
        _docs([tmp_path / "t.parquet"])


def test_missing_path_and_empty_glob_and_bad_format(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus path '.*nope\.txt' does not exist"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(CorpusError, match=r"corpus glob '.*\*\.jsonl' matches no files"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match=r"x\.csv': unsupported format '\.csv', expected one of \.txt"):
        resolve_inputs([str(tmp_path / "x.csv")])


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("  \n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(
        CorpusError, match=r"corpus is empty: 2 file\(s\) .*a\.txt.*hold no non-empty document"
    ):
        _docs([tmp_path / "a.txt", tmp_path / "b.jsonl"])


def test_jsonl_line_not_json_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"d\.jsonl:2: not valid JSON"):
        _docs([p])


def test_jsonl_line_without_field_names_file_line_and_keys(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "id": 3}) + "\n")
    with pytest.raises(CorpusError, match=r"d\.jsonl:2: no field 'text' \(keys: content, id\)"):
        _docs([p])
    p.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(CorpusError, match=r"d\.jsonl:1: field 'text' is int, expected a string"):
        _docs([p])
    p.write_text("[1, 2]\n")
    with pytest.raises(CorpusError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        _docs([p])


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    blob = gzip.compress((json.dumps({"text": "hello " * 1000}) + "\n").encode())
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorpusError, match=r"d\.jsonl\.gz: cannot read"):
        _docs([p])


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café crème\n".encode("latin-1") + b"ok \xff\xfe end\n")
    docs, stats = _docs([p])
    assert docs[0].text == "caf\ufffd cr\ufffdme\nok \ufffd\ufffd end\n"
    assert stats.replaced_bytes == 4
    assert stats.per_file_replaced == {str(p): 4}


def test_tilde_in_a_quoted_corpus_glob_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert resolve_inputs(["~/texts/*.jsonl"]) == [tmp_path / "texts" / "a.jsonl"]
    with pytest.raises(
        CorpusError, match=r"corpus path '~/none\.txt' does not exist \(expanded: .*/none\.txt\)"
    ):
        resolve_inputs(["~/none.txt"])


def test_random_bytes_named_txt_are_refused_but_latin1_prose_is_read(tmp_path):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CorpusError, match=r"noise\.txt: [\d,]+ of 4,096 bytes \(\d+%\) are not UTF-8 text"):
        _docs([noise])
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("plain words in UTF-16\n".encode("utf-16") * 20)
    with pytest.raises(CorpusError, match=r"utf16\.txt: .*NUL bytes: UTF-16 text\?"):
        _docs([utf16])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("Le café est déjà prêt, à côté de la forêt.\n" * 50).encode("latin-1"))
    docs, stats = _docs([latin1])
    assert len(docs) == 1 and stats.replaced_bytes == 50 * 8  # replaced and counted, not refused


def test_json_error_message_reads_at_column_once(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a\tb"}\n')  # a raw tab inside a JSON string is invalid
    with pytest.raises(CorpusError) as err:
        _docs([p])
    assert str(err.value).endswith("d.jsonl:1: not valid JSON (Invalid control character at column 12)")

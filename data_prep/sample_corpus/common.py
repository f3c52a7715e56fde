"""What every part of the sample corpus shares: the corpus's name and file layout, the
document type, the errors, sha256 helpers and how registry clients are run (timeout, output tail)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

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
COMMAND_TIMEOUT_S = 900


class SampleCorpusError(RuntimeError):
    """The sample corpus could not be built; the message names the package and what to do."""


class RegistryUnreachableError(SampleCorpusError):
    """A package registry (or its client program) is not reachable from this machine."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document: cleaned text plus ``<package>:<path>[#unit]`` provenance."""

    text: str
    source: str


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tail(output: str, lines: int = 6) -> str:
    """The last ``lines`` non-blank lines of a client's ``output``, joined with `` | ``."""
    kept = [line for line in output.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"

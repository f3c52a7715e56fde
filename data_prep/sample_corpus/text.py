"""Text cleaning, the same for every source: UTF-8 with BOM removed, CRLF -> LF, trailing
whitespace removed from each line, runs of blank lines collapsed to one, and documents shorter
than ``MIN_DOC_BYTES`` or byte-identical to an earlier one dropped."""

from __future__ import annotations

import re
from collections.abc import Iterable

from data_prep.sample_corpus.common import MIN_DOC_BYTES, Document, SampleCorpusError, sha256_bytes


def decode(raw: bytes, where: str) -> str:
    """``raw`` as text (UTF-8, a BOM removed); ``where`` names it in the error."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Every file chosen here is UTF-8; anything else means the package changed under us.
        raise SampleCorpusError(
            f"{where}: not UTF-8 ({exc}); the package's contents changed -- update "
            f"data_prep/sample_corpus/ for the new version"
        ) from None


_BLANK_RUNS = re.compile(r"\n{3,}")


def clean(text: str) -> str:
    """LF line ends, no trailing whitespace, at most one blank line in a row, no outer blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def slug(text: str) -> str:
    """``text`` in lower case with each run of other characters than a-z and 0-9 one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def finish(documents: Iterable[Document], source: str) -> list[Document]:
    """Clean, drop short documents and byte-identical duplicates (first by source wins)."""
    kept: list[Document] = []
    seen: set[str] = set()
    for doc in sorted(documents, key=lambda d: d.source):
        text = clean(doc.text)
        digest = sha256_bytes(text.encode("utf-8"))
        if len(text.encode("utf-8")) < MIN_DOC_BYTES or digest in seen:
            continue
        seen.add(digest)
        kept.append(Document(text, doc.source))
    if not kept:
        raise SampleCorpusError(f"{source}: produced no documents; the package contents changed")
    return kept

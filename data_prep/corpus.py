"""Read a user's corpus as a deterministic stream of documents.

Formats: ``.txt`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one document per line,
text under a configurable field), ``.parquet`` (one document per row, when pyarrow is
installed — it comes with mlflow). Inputs are files, directories (searched recursively) and
globs; each is expanded in sorted order so a re-run sees the same documents in the same order.

Bad input is a :class:`CorpusError` naming the file (and line, for jsonl). Bytes that are not
UTF-8 are replaced by U+FFFD and counted in :class:`CorpusStats`; a ``.txt`` file that is mostly
not text (over ``MAX_NON_TEXT_FRACTION`` of its bytes undecodable or NUL: a binary file or
another encoding) is refused rather than trained on. ``~`` in paths and globs is expanded.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# Latin-1 prose has a few percent of undecodable bytes; random bytes about half, UTF-16 text
# about half NULs. Above this fraction a .txt file is not text this pipeline can learn from.
MAX_NON_TEXT_FRACTION = 0.2
_MIN_NON_TEXT = 8  # a tiny file with a stray byte or two is not judged by its ratio


class CorpusError(ValueError):
    """A corpus input that cannot be read as documents; the message names file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "file" or "file:line"


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    replaced_bytes: int = 0  # undecodable UTF-8 sequences replaced by U+FFFD
    text_bytes: int = 0
    per_file_replaced: dict[str, int] = field(default_factory=dict)


_REPLACED = [0]


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    # A codec error handler: count each undecodable run, substitute U+FFFD, go on.
    assert isinstance(exc, UnicodeDecodeError)
    _REPLACED[0] += 1
    return "\ufffd", exc.end


codecs.register_error("memdlm_count_replace", _count_and_replace)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def resolve_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand paths, directories and globs into a sorted, de-duplicated file list.

    Raises CorpusError for a path that does not exist, a glob that matches nothing, a file of
    an unsupported format, or when nothing readable is found at all.
    """
    files: list[Path] = []
    for given in patterns:
        # The shell does not expand ~ inside quotes (CORPUS='~/texts/*.jsonl'), so do it here.
        pattern = os.path.expanduser(given)
        expanded = f" (expanded: {pattern})" if pattern != given else ""
        path = Path(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            if not matches:
                raise CorpusError(f"corpus glob '{given}' matches no files{expanded}")
            candidates = matches
        elif path.exists():
            candidates = [path]
        else:
            raise CorpusError(f"corpus path '{given}' does not exist{expanded}")
        for cand in candidates:
            if cand.is_dir():
                found = sorted(p for p in cand.rglob("*") if p.is_file() and _suffix(p) in SUFFIXES)
                if not found:
                    raise CorpusError(f"corpus directory '{cand}' holds no {'/'.join(SUFFIXES)} files")
                files.extend(found)
            elif _suffix(cand) in SUFFIXES:
                files.append(cand)
            elif not glob.has_magic(pattern):
                raise CorpusError(
                    f"corpus file '{cand}': unsupported format '{_suffix(cand) or '(none)'}', "
                    f"expected one of {', '.join(SUFFIXES)}"
                )
    seen: set[Path] = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    if not unique:
        raise CorpusError(f"corpus {list(patterns)}: no {'/'.join(SUFFIXES)} files found")
    return unique


def _decode(raw: bytes, source: str, stats: CorpusStats) -> str:
    before = _REPLACED[0]
    text = raw.decode("utf-8", errors="memdlm_count_replace")
    replaced = _REPLACED[0] - before
    if replaced:
        stats.replaced_bytes += replaced
        stats.per_file_replaced[source] = stats.per_file_replaced.get(source, 0) + replaced
    return text


def _check_is_text(raw: bytes, replaced: int, path: Path) -> None:
    """Refuse a .txt file whose bytes are mostly undecodable or NUL (binary, or not UTF-8)."""
    nul = raw.count(b"\0")
    bad = replaced + nul
    if bad >= _MIN_NON_TEXT and bad > MAX_NON_TEXT_FRACTION * len(raw):
        hint = (
            "it holds NUL bytes: UTF-16 text? convert it with iconv -f utf-16 -t utf-8"
            if nul > replaced
            else "a binary file, or text in another encoding (convert it, e.g. iconv -f latin1 -t utf-8)"
        )
        raise CorpusError(
            f"{path}: {bad:,} of {len(raw):,} bytes ({bad / len(raw):.0%}) are not UTF-8 text "
            f"(undecodable: {replaced:,}, NUL: {nul:,}; at most {MAX_NON_TEXT_FRACTION:.0%} expected); "
            f"this does not look like a text file: {hint}, or leave it out of the corpus"
        )


def _jsonl_lines(f: Any, path: Path, start: int, end: int | None) -> Iterator[tuple[str, bytes]]:
    """``(where, raw line)`` of a jsonl file; with a byte range, the lines starting in ``[start, end)``
    (``start`` is a line start), named by byte offset since the line number is not known there."""
    if start == 0 and end is None:
        for lineno, raw in enumerate(f, start=1):
            yield f"{path}:{lineno}", raw
        return
    f.seek(start)
    pos = start
    while end is None or pos < end:
        raw = f.readline()
        if not raw:
            return
        yield f"{path}: line at byte {pos:,}", raw
        pos += len(raw)


def _iter_jsonl(
    path: Path, text_field: str, stats: CorpusStats, start: int = 0, end: int | None = None
) -> Iterator[Document]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for where, raw in _jsonl_lines(f, path, start, end):
                if not raw.strip():
                    continue
                line = _decode(raw, str(path), stats)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    # Some json messages end in "at" already ("Invalid control character at").
                    raise CorpusError(
                        f"{where}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                if text_field not in obj:
                    keys = ", ".join(sorted(obj)[:10]) or "none"
                    raise CorpusError(
                        f"{where}: no field '{text_field}' (keys: {keys}); "
                        f"set text_field=<name> to the field holding the text"
                    )
                text = obj[text_field]
                if not isinstance(text, str):
                    raise CorpusError(
                        f"{where}: field '{text_field}' is {type(text).__name__}, expected a string"
                    )
                yield Document(text, where)
    except (OSError, EOFError, zlib.error) as exc:  # truncated / not-gzip files
        raise CorpusError(f"{path}: cannot read ({exc})") from None


def _iter_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:  # optional: only .parquet corpora need pyarrow
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with mlflow
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own hierarchy
        raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"{path}: row {row}: column '{text_field}' is not a string")
            yield Document(text or "", f"{path}:row{row}")


def _non_empty(docs: Iterator[Document], stats: CorpusStats) -> Iterator[Document]:
    """The documents with text, counted in ``stats`` (empty ones are counted and dropped)."""
    for doc in docs:
        if not doc.text.strip():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        stats.text_bytes += len(doc.text.encode("utf-8"))
        yield doc


def iter_documents(
    inputs: Sequence[tuple[Path, str] | tuple[Path, str, int, int | None]],
    stats: CorpusStats,
    *,
    require_documents: bool = True,
) -> Iterator[Document]:
    """Yield every non-empty document of ``inputs`` (``(file, text_field)`` pairs) in order.

    An input may also be ``(file, text_field, start, end)``: the lines of an uncompressed jsonl
    file that start in that byte range (a work unit of a job-array build; ``start`` is a line
    start). Updates ``stats``; raises CorpusError when no file holds a non-empty document, unless
    ``require_documents`` is False (a part of a corpus may hold none).
    """
    for path, text_field, *byte_range in inputs:
        stats.files += 1
        suffix = _suffix(path)
        if byte_range and tuple(byte_range) != (0, None):
            if suffix != ".jsonl":
                raise CorpusError(f"{path}: a byte range {byte_range} is only readable in a .jsonl file")
            start, end = byte_range
            yield from _non_empty(_iter_jsonl(path, text_field, stats, start, end), stats)
            continue
        if suffix == ".txt":
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise CorpusError(f"{path}: cannot read ({exc})") from None
            before = stats.replaced_bytes
            text = _decode(raw, str(path), stats)
            _check_is_text(raw, stats.replaced_bytes - before, path)
            docs: Iterator[Document] = iter([Document(text, str(path))])
        elif suffix in (".jsonl", ".jsonl.gz"):
            docs = _iter_jsonl(path, text_field, stats)
        else:
            docs = _iter_parquet(path, text_field)
        yield from _non_empty(docs, stats)
    if stats.documents == 0 and require_documents:
        names = [str(p) for p, _ in inputs]
        raise CorpusError(
            f"corpus is empty: {len(names)} file(s) ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) hold no non-empty document"
        )

"""bible-kjv-text: the Bible Retrieval System's data file -> one document per book (66).

The package ships the text in BRS's own format (64 KiB windows, each compressed with the LZW
scheme of Unix ``compress``); it is decoded here in pure Python rather than by running the
``bible`` program, so no binary from ``bible-kjv`` is needed."""

from __future__ import annotations

import re
import struct

from data_prep.sample_corpus.common import Document, SampleCorpusError
from data_prep.sample_corpus.text import decode, slug

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
BIBLE_DATA = "usr/lib/bible.data"
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
            f"bible-kjv-text:{BIBLE_DATA}: not a BRS 'EC02' data file; the package format "
            f"changed -- update data_prep/sample_corpus/bible.py or drop the source"
        )
    window_size, windows = struct.unpack_from(">II", data, 84)
    starts = struct.unpack_from(f">{windows + 1}I", data, 92)
    parts = []
    for i in range(windows):
        part = _lzw_decompress(data[starts[i] : starts[i + 1]])
        if len(part) != window_size and i != windows - 1:
            raise SampleCorpusError(
                f"bible-kjv-text:{BIBLE_DATA}: window {i} decompressed to {len(part)} bytes, "
                f"expected {window_size}; the data file is corrupt -- delete the cached archive"
            )
        parts.append(part)
    return decode(b"".join(parts), f"bible-kjv-text:{BIBLE_DATA}")


def bible_documents(name: str, members: dict[str, bytes]) -> list[Document]:
    """One document per book: its name, then ``Chapter N`` headings and numbered verses."""
    text = _decode_brs(members[BIBLE_DATA])
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
                f"{name}:{BIBLE_DATA}: unexpected verse line {line[:60]!r}; the text format "
                f"changed -- update data_prep/sample_corpus/bible.py"
            )
        abbrev, chapter, verse, words = match.groups()
        lines = books.setdefault(abbrev, [names[abbrev]])
        if chapter_of.get(abbrev) != chapter:
            chapter_of[abbrev] = chapter
            lines += ["", f"Chapter {chapter}", ""]
        lines.append(f"{verse} {words}")
    if len(books) != len(_BIBLE_BOOKS):
        raise SampleCorpusError(f"{name}:{BIBLE_DATA}: found {len(books)} books, expected 66")
    return [
        Document("\n".join(lines), f"{name}:{BIBLE_DATA}#{order[abbrev]:02d}-{slug(names[abbrev])}")
        for abbrev, lines in books.items()
    ]

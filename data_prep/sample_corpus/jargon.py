"""jargon-text: the Jargon File 4.4.7 -> one document per chapter/appendix and one per initial
letter of the glossary. The navigation lists that the HTML-to-text conversion left between
sections (runs of one-line headings) are dropped."""

from __future__ import annotations

import gzip
import re

from data_prep.sample_corpus.common import Document, SampleCorpusError
from data_prep.sample_corpus.text import clean, decode, slug

JARGON_FILE = "usr/share/doc/jargon-text/jargon.txt.gz"
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


def jargon_documents(name: str, members: dict[str, bytes]) -> list[Document]:
    """One document per chapter/appendix (navigation dropped) and one per initial letter of the
    glossary's headwords."""
    where = f"{name}:{JARGON_FILE}"
    text = clean(decode(gzip.decompress(members[JARGON_FILE]), where))
    sections: list[tuple[str, list[str]]] = [("front matter", [])]
    for line in text.split("\n"):
        if _JARGON_HEADING.match(line):
            sections.append((line, []))
        sections[-1][1].append(line)
    if not any(title == "Glossary" for title, _ in sections):
        raise SampleCorpusError(f"{where}: no 'Glossary' section; the file layout changed")
    docs: list[Document] = []
    for index, (title, lines) in enumerate(sections):
        unit = f"{where}#{index:02d}-{slug(title)}"
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

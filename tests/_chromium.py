"""Headless Chromium driven over the DevTools protocol with the standard library only.

    with _chromium.browser(url, profile_dir) as page:
        page.wait_for(lambda text: "loss" in text, timeout=60)
        page.screenshot(path)

The browser is started through ``tests._proc.started`` (it and its helper processes end with the
block). The DevTools endpoint listens on loopback only; a minimal websocket client (RFC 6455
text frames, client-masked) sends the protocol's JSON commands.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests import _proc

# Flags that keep a headless run on loopback and quiet (no first-run, sync, component updates).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1920,1200",
)


def find() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


class _WebSocket:
    def __init__(self, url: str, timeout: float = 30.0):
        assert url.startswith("ws://")
        hostport, _, path = url[len("ws://") :].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the websocket handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the websocket: {head[:200]!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools closed the websocket")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x81])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0x9, 0xA):  # ping / pong: not sent by DevTools in practice
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Page:
    """One tab: ``evaluate`` JavaScript, ``text`` of the page, ``screenshot``."""

    def __init__(self, ws: _WebSocket):
        self.ws = ws
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, ready: Callable[[str], bool], timeout: float, poll: float = 0.5) -> str:
        """Poll the page's text until ``ready(text)``; returns it (the last text on timeout)."""
        return self.wait_until("document.body ? document.body.innerText : ''", ready, timeout, poll) or ""

    def wait_until(self, expression: str, ready: Callable[[Any], bool], timeout: float, poll: float = 0.5):
        """Poll the value of ``expression`` until ``ready(value)``; returns it (the last on timeout)."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if ready(value):
                return value
            time.sleep(poll)
        return value

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    """Chromium writes the port it chose (``--remote-debugging-port=0``) into the profile."""
    deadline = time.monotonic() + timeout
    f = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if f.is_file() and (lines := f.read_text().splitlines()):
            return int(lines[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before DevTools came up")
        time.sleep(0.2)
    raise TimeoutError("chromium's DevTools did not come up")


@contextlib.contextmanager
def browser(url: str, profile: Path, binary: str | None = None, timeout: float = 30.0) -> Iterator[Page]:
    """Headless Chromium showing ``url`` (a fresh profile in ``profile``), as a :class:`Page`."""
    binary = binary or find()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH")
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url]
    with _proc.started(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        port = _devtools_port(profile, proc, timeout)
        deadline = time.monotonic() + timeout
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not pages:
            raise TimeoutError("chromium opened no page")
        ws = _WebSocket(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
        try:
            yield Page(ws)
        finally:
            ws.close()

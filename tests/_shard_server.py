"""A loopback HTTP file server for the URL-shard tests, with faults on demand.

    python -m tests._shard_server DIR PORT [--range] [--drop NAME:TIMES ...]

Serves DIR on 127.0.0.1:PORT (GET and HEAD). ``--range`` honours ``Range: bytes=N-`` with a 206
reply (Python's http.server does not). ``--drop NAME:TIMES`` makes the first TIMES GETs of the
file NAME send the full headers and half the body, then close the connection: a server that
drops the connection mid-shard. Each GET is logged to stdout as ``GET <path> <range|->``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("port", type=int)
    parser.add_argument("--range", action="store_true")
    parser.add_argument("--drop", action="append", default=[])
    args = parser.parse_args()
    drops = {name: int(times) for name, times in (d.rsplit(":", 1) for d in args.drop)}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _target(self) -> str | None:
            path = os.path.normpath(os.path.join(args.root, self.path.lstrip("/")))
            return path if path.startswith(os.path.abspath(args.root)) and os.path.isfile(path) else None

        def do_HEAD(self) -> None:
            path = self._target()
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.end_headers()

        def do_GET(self) -> None:
            path = self._target()
            if path is None:
                self.send_error(404)
                return
            with open(path, "rb") as f:
                data = f.read()
            rng = self.headers.get("Range")
            print(f"GET {self.path} {rng or '-'}", flush=True)
            start = 0
            if rng and args.range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            name = os.path.basename(path)
            with lock:
                drop = drops.get(name, 0) > 0
                if drop:
                    drops[name] -= 1
            if drop:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the client sees the connection end mid-body
                return
            self.wfile.write(body)

        def log_message(self, *a) -> None:  # quiet: the GET lines above are the log
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving {args.root} on {args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""A local HTTP server standing in for a dataset host: serves a folder, honours Range requests.

Python's own ``http.server`` ignores ``Range``; this handler answers ``bytes=N-`` with 206
(or 416 past the end), logs every request, and can break a response off part-way, as a
dropped connection does.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Request:
    path: str
    range: str | None
    status: int


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        name = self.path.split("?")[0].lstrip("/")
        file = self.server.root / name
        wanted = self.headers.get("Range")
        if not file.is_file():
            self._reply(name, wanted, 404, b"not found")
            return
        data = file.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and self.server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self._reply(name, wanted, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            self._reply(name, wanted, 206, data[start:], extra)
        else:
            self._reply(name, wanted, 200, data)

    def _reply(self, name, wanted, status, body, headers=None) -> None:
        self.server.requests.append(Request(name, wanted, status))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        cut = self.server.cut_after.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args) -> None:  # keep test output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_port = False  # a second server on a port in use fails (SO_REUSEPORT would let both listen)

    def __init__(self, root: Path, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.root = root
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}  # file name → bytes sent before the next reply breaks
        self.ranges = True  # False: ignore Range headers, like a server without resume support


class DatasetHost:
    """The running server: `put` files, take their `url`, inspect `requests`.

    It listens on 127.0.0.1 at `port` (0: any free port).
    """

    def __init__(self, root: Path, port: int = 0) -> None:
        self._server = _Server(root, port)  # first: a port in use leaves no folder behind
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            self._server.server_close()
            raise
        self.root = root
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[Request]:
        return self._server.requests

    def put(self, name: str, data: bytes) -> str:
        """Serve `data` as `name`; returns its URL."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def break_next(self, name: str, after_bytes: int) -> None:
        """Make the next reply for `name` stop after `after_bytes` body bytes."""
        self._server.cut_after[name] = after_bytes

    def set_ranges(self, enabled: bool) -> None:
        self._server.ranges = enabled

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

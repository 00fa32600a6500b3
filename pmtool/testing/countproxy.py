"""A loopback HTTP proxy that counts the requests it passes on to a server.

A real Headless PM keeps no request count a benchmark can read (the stand-in has
`/_sandbox/stats`), so benchmarks put this in front of a real server and point the agents
at it: what it counts is what the agents cost the server, whatever the server is. Measure
the server's own latency past it, straight at the server.

Answers pass through as they came (status, content type, body), 5xx included; a request
the server could not answer at all (refused, reset, timed out) gets a plain-text 502, so
the client sees a server error as it would have.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from pmtool.client import Connections, Unreachable

# Headers that describe the hop, not the message: never passed on (RFC 9110 7.6.1), nor
# Content-Length, which is set from the body as forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "host", "content-length", "accept-encoding"}


class CountingProxy:
    """`CountingProxy(upstream).start()`; `.url` to point clients at, `.total()` and
    `.counts()` (by method and path, no query) so far, `.stop()` at the end."""

    def __init__(self, upstream: str, timeout: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.timeout = timeout
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._upstream = Connections(self.upstream, keep=64)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients use the real server

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                proxy._forward(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> CountingProxy:
        threading.Thread(target=self._server.serve_forever, name="count-proxy",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        with self._lock:
            self._counts[f"{handler.command} {urlsplit(handler.path).path}"] += 1
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
        try:
            resp = self._upstream.request(handler.command, handler.path, body, headers,
                                          self.timeout)
            status, content = resp.status_code, resp.content
            ctype = resp.headers.get("Content-Type", "application/json")
        except Unreachable as exc:
            status, ctype = 502, "text/plain; charset=utf-8"
            content = f"proxy: {type(exc).__name__}".encode()
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(content)

"""A loopback HTTP proxy that counts the requests it passes on to a server.

Two kinds in one: given an upstream, clients are pointed at it as if it were the server (a
reverse proxy); given none, it is a forward proxy as HTTP_PROXY/HTTPS_PROXY name one:
absolute-URI requests are passed to the server they name, CONNECT opens a tunnel (counted
as `CONNECT host:port`, its bytes relayed unread).

A real Headless PM keeps no request count a benchmark can read (the stand-in has
`/_sandbox/stats`), so benchmarks put this in front of a real server and point the agents
at it: what it counts is what the agents cost the server, whatever the server is. Measure
the server's own latency past it, straight at the server.

Answers pass through as they came (status, content type, body), 5xx included; a request
the server could not answer at all (refused, reset, timed out) gets a plain-text 502, so
the client sees a server error as it would have.
"""

from __future__ import annotations

import selectors
import socket
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

    def __init__(self, upstream: str | None = None, timeout: float = 120.0) -> None:
        self.upstream = (upstream or "").rstrip("/")
        self.timeout = timeout
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Always direct: this process's own proxy variables may point at this proxy.
        self._origins: dict[str, Connections] = {}
        if self.upstream:
            self._origins[""] = Connections(self.upstream, keep=64)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients use the real server

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                proxy._forward(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

            def do_CONNECT(self) -> None:
                proxy._tunnel(self)

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
        with self._lock:
            origins = list(self._origins.values())
        for upstream in origins:
            upstream.close()

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def _origin(self, target: str) -> tuple[Connections | None, str]:
        """Where a request goes, and its path there: the server an absolute URI names,
        else the upstream."""
        parts = urlsplit(target)
        if not parts.scheme:
            return self._origins.get(""), target
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            if origin not in self._origins:
                self._origins[origin] = Connections(origin, keep=64)
            return self._origins[origin], target[len(origin):] or "/"

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        self._count(f"{handler.command} {urlsplit(handler.path).path}")
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in _HOP and k.lower() != "proxy-authorization"}
        upstream, path = self._origin(handler.path)
        if upstream is None:
            handler.send_error(400, "not an absolute URI, and no upstream")
            return
        try:
            resp = upstream.request(handler.command, path, body, headers, self.timeout)
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

    def _tunnel(self, handler: BaseHTTPRequestHandler) -> None:
        """CONNECT host:port: 200 once the server is reached (502 when not), then the
        bytes both ways until either side closes."""
        self._count(f"CONNECT {handler.path}")
        host, _, port = handler.path.rpartition(":")
        try:
            server = socket.create_connection((host.strip("[]"), int(port)), self.timeout)
        except (OSError, ValueError):
            handler.send_error(502, f"cannot reach {handler.path}")
            return
        handler.send_response(200, "Connection Established")
        handler.end_headers()
        handler.close_connection = True
        client = handler.connection
        with server, selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, server)
            sel.register(server, selectors.EVENT_READ, client)
            while events := sel.select(self.timeout):  # none: idle too long
                for key, _ in events:
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if data:
                            key.data.sendall(data)
                    except OSError:
                        data = b""
                    if not data:
                        return

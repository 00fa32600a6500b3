"""The client's own HTTP (pmtool.client over http.client): what requests did for us before
and a server in the wild needs, each against a real server on loopback."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import Answers, serve
from pmtool.client import PMClient
from pmtool.errors import ServerError, UsageError


@pytest.fixture
def answers() -> Iterator[tuple[ThreadingHTTPServer, type[Answers]]]:
    handler = type("Fresh", (Answers,), {"seen": [], "closing": False})
    server = serve(handler)
    yield server, handler
    server.shutdown()
    server.server_close()


def test_query_body_key_and_agent_go_out_as_given(answers) -> None:
    server, handler = answers
    client = PMClient(f"http://127.0.0.1:{server.server_address[1]}/", "sekret", agent="t")
    got = client.request("PUT", "/api/v1/tasks/3/status",
                         params={"agent_id": "a b", "skip": None}, json={"status": "x"})
    assert got == {"method": "PUT", "path": "/api/v1/tasks/3/status?agent_id=a+b",
                   "body": {"status": "x"}}
    assert handler.seen[-1][3] == "sekret"


def test_a_connection_the_server_closed_meanwhile_is_not_reused(answers) -> None:
    """uvicorn drops idle keep-alive connections after 5 s. A change sent on one would
    fail with no answer and need a read-back; the client must notice before sending."""
    server, handler = answers
    handler.closing = True
    client = PMClient(f"http://127.0.0.1:{server.server_address[1]}", "k", retries=0)
    for i in range(5):
        client.request("POST", f"/change/{i}", json={"i": i}, idempotent=False)
        time.sleep(0.05)  # the server's close reaches us while the connection is idle
    assert [path for _m, path, _b, _k in handler.seen] == [f"/change/{i}" for i in range(5)]


def test_connections_are_kept_alive_between_calls(answers) -> None:
    server, _handler = answers
    client = PMClient(f"http://127.0.0.1:{server.server_address[1]}", "k")
    client.request("GET", "/one")
    first = client.connections._idle[0].sock.getsockname()
    client.request("GET", "/two")
    assert client.connections._idle[0].sock.getsockname() == first


def test_not_an_http_url_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not an http"):
        PMClient("localhost:6969", "k")


def test_a_server_that_accepts_and_never_answers_times_out() -> None:
    class Silent(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(3)

    server = serve(Silent)
    try:
        client = PMClient(f"http://127.0.0.1:{server.server_address[1]}", "k",
                          timeout=0.3, retries=0)
        with pytest.raises(ServerError, match=r"did not answer within 0\.3s"):
            client.request("GET", "/health")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_https_with_the_systems_way_of_naming_certificates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """https verifies the server against the CA file OpenSSL is told of (SSL_CERT_FILE),
    and refuses a server it cannot verify."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    handler = type("Tls", (Answers,), {"seen": [], "closing": False})
    server = serve(handler, lambda sock: tls.wrap_socket(sock, server_side=True))
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ServerError):  # not trusted: no answer taken from it
            PMClient(url, "k", retries=0).request("GET", "/untrusted")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert PMClient(url, "k", retries=0).request("GET", "/trusted")["path"] == "/trusted"
        assert [path for _m, path, _b, _k in handler.seen] == ["/trusted"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_thousand_failed_calls_leave_no_connection_open(free_port: int) -> None:
    """Overnight against a server that is down, or that answers every call by dropping the
    connection: each failure closes its connection, so nothing piles up."""
    import psutil

    class Drops(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.close_connection = True  # no answer: the peer just goes away

    server = serve(Drops)
    me = psutil.Process()
    try:
        down = PMClient(f"http://127.0.0.1:{free_port}", "k", retries=0)
        dropping = PMClient(f"http://127.0.0.1:{server.server_address[1]}", "k", retries=0)
        before = me.num_fds()
        for i in range(500):
            with pytest.raises(ServerError):
                down.request("GET", "/health")
            with pytest.raises(ServerError) as err:
                dropping.request("POST", f"/api/v1/tasks/{i}/lock", idempotent=False)
            assert getattr(err.value, "unsure", False)  # may have landed: read back
        assert me.num_fds() <= before + 2  # the server's own threads may hold one or two
        assert down.connections._idle == [] and dropping.connections._idle == []
    finally:
        server.shutdown()
        server.server_close()

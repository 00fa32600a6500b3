"""Reaching the server: through the proxy the environment names (a real forward proxy on
loopback), and when it cannot be reached, the cause in words with its fix."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import pmtool
from pmtool.client import PMClient
from pmtool.errors import EXIT_SERVER, EXIT_USAGE, ApiError, ServerError, UsageError
from pmtool.testing.countproxy import CountingProxy

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
              "no_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def _no_proxy_of_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the proxy a test names (an empty lower-case variable would unset an upper-case
    one, as urllib and curl read them: so they are removed, not emptied)."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def forward_proxy() -> Iterator[CountingProxy]:
    proxy = CountingProxy().start()  # no upstream: a forward proxy
    yield proxy
    proxy.stop()


def health(url: str, key: str, **env: str) -> tuple[int, dict, str]:
    result = pmtool("health", "--check", "api", "--check", "auth",
                    env={"HEADLESS_PM_API_URL": url,
                         "HEADLESS_PM_API_KEY": key, **env})
    return result.code, result.out, result.stderr


def test_http_goes_through_the_proxy_the_environment_names(pm_server, forward_proxy) -> None:
    code, out, _ = health(pm_server.url, pm_server.api_key, http_proxy=forward_proxy.url)
    assert code == 0, out
    counts = forward_proxy.counts()
    assert counts.get("GET /health") == 1 and counts.get("GET /api/v1/agents") == 1, counts


def test_no_proxy_skips_the_proxy(pm_server, forward_proxy) -> None:
    host = pm_server.url.split("://")[1].split(":")[0].split("/")[0]
    code, out, _ = health(pm_server.url, pm_server.api_key, HTTP_PROXY=forward_proxy.url,
                          NO_PROXY=f"example.org,{host}")
    assert code == 0, out
    assert forward_proxy.total() == 0


def test_a_proxy_that_is_down_is_named_with_the_way_around_it(pm_server) -> None:
    down = socket.socket()
    down.bind(("127.0.0.1", 0))
    port = down.getsockname()[1]
    down.close()
    code, out, stderr = health(pm_server.url, pm_server.api_key,
                               HTTP_PROXY=f"http://user:s3cret@127.0.0.1:{port}")
    assert code == EXIT_SERVER
    detail = out["checks"][0]["detail"]
    assert f"through the proxy http://127.0.0.1:{port}" in detail, detail
    assert "connection refused" in detail and "NO_PROXY" in detail
    assert out["checks"][0]["hint"].startswith("start the proxy")
    assert "s3cret" not in out.__repr__() + stderr  # the proxy's password is not shown


def test_a_socks_proxy_is_refused_in_words(monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1")
    with pytest.raises(UsageError, match="not an http:// proxy") as caught:
        PMClient("http://127.0.0.1:6969", "k")
    assert caught.value.exit_code == EXIT_USAGE


def test_a_write_goes_through_the_proxy_and_keep_alive_holds(pm_server, forward_proxy,
                                                         monkeypatch) -> None:
    """A write (POST) passes the proxy like a read, on one pooled connection to it."""
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = PMClient(pm_server.url, pm_server.api_key)
    assert client.connections.proxy == forward_proxy.url
    client.register("proxy-tester", "backend_dev", "senior")
    client.list_tasks(status="committed")
    counts = forward_proxy.counts()
    assert counts.get("POST /api/v1/register") == 1 and counts.get("GET /api/v1/tasks") == 1
    assert len(client.connections._idle) == 1  # one kept-alive connection to the proxy
    client.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_https_goes_through_a_connect_tunnel(tmp_path: Path, forward_proxy,
                                             monkeypatch) -> None:
    import ssl

    from helpers import Answers, serve

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    handler = type("Tls", (Answers,), {"seen": [], "closing": False})
    server = serve(handler, lambda sock: tls.wrap_socket(sock, server_side=True))
    port = server.server_address[1]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # not for https
    try:
        client = PMClient(f"https://127.0.0.1:{port}", "k", retries=0)
        assert client.request("GET", "/a")["path"] == "/a"
        assert client.request("PUT", "/b", json={})["path"] == "/b"
        # Two calls, one tunnel: the pool keeps the tunnelled connection.
        assert forward_proxy.counts() == {f"CONNECT 127.0.0.1:{port}": 1}
        # The server saw the key; the proxy only saw encrypted bytes.
        assert [k for _m, _p, _b, k in handler.seen] == ["k", "k"]
        client.close()
    finally:
        server.shutdown()
        server.server_close()


# -- the cause of "cannot reach" ----------------------------------------------------------

def reach(url: str, **kw) -> ServerError:
    with pytest.raises(ServerError) as caught:
        PMClient(url, "k", retries=0, **kw).request("GET", "/health")
    return caught.value


def test_refused(free_port: int) -> None:
    error = reach(f"http://127.0.0.1:{free_port}")
    assert f"connection refused: nothing listens at 127.0.0.1:{free_port}" in error.message
    assert "HEADLESS_PM_API_URL" in (error.hint or "")


def test_dns_failure() -> None:
    error = reach("http://no-such-host.invalid:6969")
    assert "does not resolve" in error.message and "DNS" in error.message, error.message
    assert "host name" in (error.hint or "")


def test_https_asked_of_a_plain_http_port(pm_server) -> None:
    if not pm_server.url.startswith("http://"):
        pytest.skip("the server under test speaks https")
    error = reach("https://" + pm_server.url.removeprefix("http://"))
    assert "does not speak TLS" in error.message, error.message
    assert "use http://" in (error.hint or "")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_http_asked_of_an_https_port(tmp_path: Path) -> None:
    """A TLS server (Python's, as under uvicorn) resets a plain-http request."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    import ssl

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = listener.accept()
        with conn, tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) \
                as wrapped, contextlib.suppress(ssl.SSLError, OSError):
            wrapped.do_handshake()

    threading.Thread(target=accept, daemon=True).start()
    try:
        error = reach(f"http://127.0.0.1:{listener.getsockname()[1]}")
    finally:
        listener.close()
    assert "https" in (error.hint or ""), (error.message, error.hint)


def test_a_timeout_says_how_long_it_waited() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        error = reach(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
    finally:
        listener.close()
    assert "did not answer within 0.3s" in error.message
    assert "PMTOOL_HTTP_TIMEOUT" in (error.hint or "")


def test_a_wrong_path_prefix_points_at_the_url(pm_server) -> None:
    client = PMClient(pm_server.url + "/api/v1", pm_server.api_key, retries=0)
    with pytest.raises(ApiError) as caught:
        client.agents()
    assert caught.value.status == 404
    assert "HEADLESS_PM_API_URL" in (caught.value.hint or "")
    assert "without /api/v1" in (caught.value.hint or "")
    # A 404 the server means (no such task) gets no such hint.
    with pytest.raises(ApiError) as real:
        PMClient(pm_server.url, pm_server.api_key).lock(10**9, "nobody-here")
    assert real.value.hint is None


def test_verbose_logs_each_request(free_port: int) -> None:
    """`pmtool --verbose` (or PMTOOL_DEBUG=1) logs every request with what came of it and
    its time on stderr."""
    result = pmtool("--verbose", "health", "--check", "api", "--check", "auth",
                    env={"HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port}",
                         "HEADLESS_PM_API_KEY": "k"})
    assert result.code == EXIT_SERVER
    assert "pmtool: http: GET /health -> ConnectionRefusedError in" in result.stderr
    assert "pmtool: http: GET /api/v1/agents -> ConnectionRefusedError" in result.stderr
    quiet = pmtool("health", "--check", "api",
                   env={"HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port}"})
    assert "pmtool: http:" not in quiet.stderr


def test_run_says_an_unreachable_server_once(free_port: int, tmp_path: Path) -> None:
    """The runner's health step fails two checks (api, auth) on one cause: one line."""
    import os
    import signal

    from helpers import PMTOOL

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    env = {**os.environ, "HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port}",
           "HEADLESS_PM_API_KEY": "kkkk", "PMTOOL_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([PMTOOL, "run", "--role", "backend_dev", "--level", "senior",
                             "--agent-id", "once-1", "--agent-cmd", "true", "--repo",
                             str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "server trouble" in line:
                break
        else:
            pytest.fail("the runner ended without reporting the server")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert line.count("cannot reach") == 1, line
    assert "connection refused" in line


def test_a_proxy_that_cannot_reach_the_server_says_so(forward_proxy, free_port: int,
                                                      monkeypatch) -> None:
    """The proxy is up, the server behind it is not: http gets the proxy's 502, https its
    refused CONNECT; both name the proxy."""
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    plain = reach(f"http://127.0.0.1:{free_port}")
    assert "502" in plain.message and f"through the proxy {forward_proxy.url}" in plain.message
    tls = reach(f"https://127.0.0.1:{free_port}")
    assert "could not open a tunnel (502" in tls.message, tls.message
    assert "NO_PROXY" in (tls.hint or "")
    assert forward_proxy.counts() == {"GET /health": 1, f"CONNECT 127.0.0.1:{free_port}": 1}

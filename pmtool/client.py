"""The Headless PM client: a small keep-alive pool, a timeout on every call, typed errors.

It speaks HTTP with the standard library's http.client rather than requests: requests and
urllib3 cost a pmtool process about 70 ms of start-up, more than everything else an empty
`pmtool claim` does, and pmtool needs none of what they add over http.client for one
JSON API (no cookies, redirects, auth schemes or compression). The proxy variables are
honoured as curl and urllib read them (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, and lower case):
plain http goes to the proxy as absolute-URI requests, https through a CONNECT tunnel.

The server fails in measured ways (../shared/headless-pm-api.md, quirks 7-8): under load it
answers a plain-text 500, and the next request on that connection may be reset. So:
- idempotent calls (GET, register) are retried on 5xx, resets and timeouts, with full
  jitter and a capped backoff, which also spreads a burst of registrations out;
- a lock or status change is never blindly resent (it could act twice): after a 5xx or a
  reset the task is read back, and the call is repeated at most once, only if the read
  shows it did not land. A timeout is not read back: the request may still be in flight.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import os
import random
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

from pmtool.errors import ApiError, AuthError, ServerError

KEY_ENV_HINT = "set HEADLESS_PM_API_KEY (or API_KEY_HEADLESS_PM) to the server's key"
BACKOFF_CAP = 5.0  # seconds; the longest pause between two tries of one call
MAX_IN_FLIGHT = 8  # requests one client has open at the server at once, at most


class Response:
    """One answer as it came: status, headers (case-insensitive `get`), body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Any, content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return jsonlib.loads(self.content)


class Unreachable(OSError):
    """No answer: refused, reset or closed before a whole answer came. `reason` names the
    cause in a person's words, `fix` what to do about it."""

    def __init__(self, reason: str, fix: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


class TimedOut(Unreachable):
    """No answer within the timeout."""


URL_FIX = "set HEADLESS_PM_API_URL or --api-url"


def explain(exc: BaseException, where: str, https: bool, proxy: bool = False) -> Unreachable:
    """Why a call to `where` (host:port, or the proxy's URL when `proxy`) got no answer,
    with the fix: every cause otherwise reads as the same "cannot reach"."""
    import socket

    text = str(exc)
    fix_where = ("fix HTTP_PROXY/HTTPS_PROXY, or add the server's host to NO_PROXY"
                 if proxy else URL_FIX)
    if isinstance(exc, TimeoutError):
        return TimedOut(text or "timed out")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(f"connection refused: nothing listens at {where}",
                           f"start the {'proxy' if proxy else 'server'}, or fix the host "
                           f"and port ({fix_where})")
    if isinstance(exc, socket.gaierror):
        return Unreachable(f"the host name in {where} does not resolve (DNS: "
                           f"{exc.strerror or text})",
                           f"check the host name ({fix_where}) and the machine's DNS")
    ssl = sys.modules.get("ssl")  # only loaded when https was asked for
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return Unreachable(f"the TLS certificate of {where} is not trusted "
                           f"({exc.verify_message})",
                           "point SSL_CERT_FILE at the CA that signed it, or fix the host name")
    if ssl is not None and isinstance(exc, ssl.SSLError) and any(
            sign in text for sign in ("WRONG_VERSION_NUMBER", "record layer failure",
                                      "packet length too long", "HTTP_REQUEST")):
        return Unreachable(f"{where} does not speak TLS: https:// was asked of a plain http "
                           "port", f"use http:// ({URL_FIX})")
    # A TLS server hangs up on plain http (Python's and uvicorn's reset; some close).
    maybe_tls = "" if https else f"if it serves https, use https:// ({URL_FIX}); else "
    if isinstance(exc, http.client.RemoteDisconnected):
        return Unreachable(f"{where} closed the connection without an answer",
                           f"{maybe_tls}try again; see `pmtool health`")
    if isinstance(exc, ConnectionResetError):
        return Unreachable(f"{where} reset the connection",
                           f"{maybe_tls}try again; see `pmtool health`")
    if text.startswith("Tunnel connection failed"):  # the proxy's answer to CONNECT
        return Unreachable(f"the proxy at {where} could not open a tunnel ({text[26:]})",
                           "check that the proxy can reach the server, or set NO_PROXY")
    return Unreachable(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def proxy_for(url: str) -> str | None:
    """The proxy to reach `url` through, from the environment as curl and urllib read it
    (HTTP_PROXY/HTTPS_PROXY, lower case first; NO_PROXY), or None.

    urllib.request costs 11-16 ms of start-up, so it is imported only when some proxy
    variable is set; then its own readers keep the semantics exact (the CGI rule for
    HTTP_PROXY, NO_PROXY's suffixes and `*`)."""
    if not any(name[-6:].lower() == "_proxy" for name in os.environ):
        return None
    import urllib.request

    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    host = parts.hostname or ""
    # proxy_bypass_environment is urllib's own NO_PROXY reading (typeshed omits it).
    if not proxy or urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            f"{host}:{parts.port}" if parts.port else host, proxies):
        return None
    return proxy


def _debug() -> bool:
    return os.environ.get("PMTOOL_DEBUG", "") not in ("", "0")


class Connections:
    """Keep-alive connections to one server, shared by threads: a call takes an idle one
    (or opens one), and gives it back after reading the whole answer."""

    def __init__(self, url: str, keep: int = 8, proxy: str | None = None) -> None:
        """`proxy`: an http:// proxy to go through (see `proxy_for`), else direct."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.keep = keep
        self.where = f"{self.host}:{self.port or (443 if self.https else 80)}"
        self.proxy: str | None = None  # the proxy's URL without its credentials
        self._proxy_auth: dict[str, str] = {}
        if proxy:
            self._use_proxy(proxy)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, target: str, body: bytes | None, headers: dict[str, str],
                timeout: float) -> Response:
        """`target`: the path and query below the server's URL. Raises TimedOut or
        Unreachable; a connection that failed is never used again."""
        conn = self._take(timeout)
        path = self.prefix + target
        if self.proxy and not self.https:  # the proxy is told where to, in the request line
            host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
            path = f"http://{host}{f':{self.port}' if self.port else ''}{path}"
            headers = {**headers, **self._proxy_auth}
        start = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            content = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if _debug():
                _log(method, path, type(exc).__name__, start)
            raise explain(exc, self.proxy or self.where, self.https, bool(self.proxy)) from exc
        if _debug():
            _log(method, path, str(answer.status), start)
        if answer.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return Response(answer.status, answer.headers, content)

    def _use_proxy(self, proxy: str) -> None:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.scheme != "http" or not parts.hostname:
            from pmtool.errors import UsageError

            raise UsageError(f"the proxy {parts.scheme}://{parts.hostname or ''} is not an "
                             "http:// proxy, the only kind pmtool speaks to",
                             hint="set HTTP_PROXY/HTTPS_PROXY to an http:// proxy, or "
                                  "NO_PROXY to the server's host")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
        self.proxy = f"http://{host}:{parts.port or 80}"
        if parts.username:
            import base64
            from urllib.parse import unquote

            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._proxy_auth = {"Proxy-Authorization":
                                "Basic " + base64.b64encode(pair.encode()).decode()}

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self, timeout: float) -> http.client.HTTPConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _still_open(conn):
                    conn.timeout = timeout
                    assert conn.sock is not None
                    conn.sock.settimeout(timeout)
                    return conn
                conn.close()
        host, port = self.host, self.port
        if self.proxy:
            proxy = urlsplit(self.proxy)
            host, port = proxy.hostname or "", proxy.port
        if self.https:
            import ssl  # only for https: it costs a plain-http process 10 ms

            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ssl.create_default_context())
            if self.proxy:  # TLS end to end with the server, inside the proxy's tunnel
                conn.set_tunnel(self.host, self.port, headers=self._proxy_auth)
            return conn
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(conn)
                return
        conn.close()


def _log(method: str, path: str, status: str, start: float) -> None:
    """PMTOOL_DEBUG (or --verbose): one line per request on stderr. The key travels in a
    header, never in the path, so nothing secret is written."""
    ms = (time.monotonic() - start) * 1000
    sys.stderr.write(f"pmtool: http: {method} {path} -> {status} in {ms:.1f} ms\n")
    sys.stderr.flush()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection the server has not closed meanwhile (uvicorn closes
    them after 5 s): readable while idle means closed, or data nobody asked for."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no poll() (Windows)
        return not select.select([sock], [], [], 0)[0]


class PMClient:
    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.3, agent: str = "pmtool") -> None:
        """`agent`: the User-Agent, e.g. naming the process."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        try:
            self.connections = Connections(self.url, keep=MAX_IN_FLIGHT,
                                           proxy=proxy_for(self.url))
        except ValueError:
            from pmtool.errors import UsageError

            raise UsageError(f"the server URL {url} is not an http:// or https:// URL",
                             hint="set HEADLESS_PM_API_URL or --api-url, e.g. "
                                  "http://localhost:6969") from None
        self.headers = {"User-Agent": agent, "Accept": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key
        # However many threads share this client (`run --agents 200`), at most this many
        # requests are open at the server at once: its database pool is 5 + 10, and 200
        # registrations at once wedged a real server (quirk 7) where 60 did not.
        self._in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        # Told of every request's end (method, "2xx".."5xx"/"timeout"/"unreachable",
        # seconds): pmtool.views.metrics counts them for `run --metrics-addr`.
        self.observe: Callable[[str, str, float], None] | None = None

    def raw(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
            timeout: float | None = None) -> Response:
        """One call with the key and no retries, its answer as it came (any status).
        `path` is below the server's URL (`/api/v1/tasks`); raises TimedOut or Unreachable."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        target = path + ("?" + urlencode(query) if query else "")
        headers = dict(self.headers)
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        with self._in_flight:
            if self.observe is None:
                return self.connections.request(method, target, body, headers,
                                                timeout or self.timeout)
            started, result = time.monotonic(), "unreachable"
            try:
                resp = self.connections.request(method, target, body, headers,
                                                timeout or self.timeout)
                result = f"{resp.status_code // 100}xx"
                return resp
            except TimedOut:
                result = "timeout"
                raise
            finally:
                self.observe(method, result, time.monotonic() - started)

    # -- transport ---------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict | None = None,
                json: Any = None, idempotent: bool | None = None,
                timeout: float | None = None) -> Any:
        """One API call; raises ServerError (with `unsure` True when a change may or may
        not have landed: a 5xx or a reset), AuthError, or ApiError for other 4xx."""
        if idempotent is None:
            idempotent = method == "GET"
        attempts = self.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            unsure = False
            try:
                resp = self.raw(method, path, params=params, json=json, timeout=timeout)
            except TimedOut:
                error = ServerError(f"{method} {path}: server at {self.url} did not answer "
                                    f"within {timeout or self.timeout:g}s{self._via()}",
                                    hint="is the server overloaded? see PMTOOL_HTTP_TIMEOUT")
            except Unreachable as exc:
                # Refused (nothing sent) or reset after a 500 (quirk 8): either way the
                # server may be fine now; a later read tells what landed.
                unsure = True
                error = ServerError(f"cannot reach the Headless PM server at {self.url}"
                                    f"{self._via()}: {exc.reason}",
                                    hint=exc.fix or "is it running? " + URL_FIX)
                error.__cause__ = exc
            else:
                if resp.status_code < 500:
                    return self._answer(resp, method, path)
                unsure = True
                error = ServerError(f"{method} {path}: server error {resp.status_code}: "
                                    f"{_detail_text(resp)}{self._via()}",
                                    status=resp.status_code)
                # After a 500 the server may reset the next request on a connection it
                # kept (quirk 8): the next ones start on fresh connections.
                self.connections.close()
            error.unsure = unsure  # type: ignore[attr-defined]
            if attempt + 1 < attempts:
                time.sleep(self.pause(attempt))
        raise error

    def _via(self) -> str:
        proxy = self.connections.proxy
        return f" through the proxy {proxy} (HTTP_PROXY/HTTPS_PROXY; NO_PROXY skips it)" \
            if proxy else ""

    def pause(self, attempt: int) -> float:
        """Seconds before try `attempt + 2`: full jitter under a doubling, capped ceiling,
        so clients that failed together do not come back together."""
        return random.uniform(0, min(BACKOFF_CAP, self.backoff * 2 ** attempt)) \
            + self.backoff / 10

    def _change(self, method: str, path: str, task_id: int, landed: Any, *,
                status: str | None = None, params: dict | None = None,
                json: Any = None) -> Any:
        """A non-idempotent task change: on a 5xx or reset, read the task back (listed,
        filtered by `status` when given); `landed(task)` answers what to return if the
        change is there (or raises), None if it is not: then send it once more."""
        try:
            return self.request(method, path, params=params, json=json)
        except ServerError as exc:
            if not getattr(exc, "unsure", False) or isinstance(exc, AuthError):
                raise
            first = exc
        time.sleep(self.pause(0))
        task = self.get_task(task_id, status=status)
        if task is None and status is not None:
            task = self.get_task(task_id)
        if task is not None:
            answer = landed(task)
            if answer is not None:
                return answer
        try:
            return self.request(method, path, params=params, json=json)
        except ServerError as exc:
            raise exc from first
    def _answer(self, resp: Any, method: str, path: str) -> Any:
        if resp.status_code == 401:
            if "X-API-Key" not in self.headers:
                raise AuthError("HEADLESS_PM_API_KEY is not set", hint=KEY_ENV_HINT)
            raise AuthError(f"the server at {self.url} rejected the API key", hint=KEY_ENV_HINT)
        if resp.status_code >= 400:
            hint = None
            if resp.status_code in (404, 405) and _detail(resp) in ("Not Found",
                                                                   "Method Not Allowed"):
                # The framework's answer for a path it has no route for (the server's own
                # 404s name the task or agent): the URL's path prefix is wrong.
                hint = (f"{self.url} has no {path}: HEADLESS_PM_API_URL (or --api-url) "
                        "must be the server's root, e.g. http://localhost:6969, without "
                        "/api/v1")
            raise ApiError(resp.status_code, _detail(resp), hint=hint,
                           message=f"{method} {path}: {resp.status_code} {_detail_text(resp)}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise ServerError(f"{method} {path}: the answer is not JSON "
                              f"(is {self.url} a Headless PM server?)",
                              hint=f"check HEADLESS_PM_API_URL (or --api-url){self._via()}"
                              ) from None

    def close(self) -> None:
        self.connections.close()

    # -- unauthenticated ---------------------------------------------------------------

    def health(self, timeout: float | None = None) -> dict:
        return self.request("GET", "/health", timeout=timeout)

    def context(self) -> dict:
        return self.request("GET", "/api/v1/context")

    # -- agents ------------------------------------------------------------------------

    def register(self, agent_id: str, role: str, level: str,
                 connection_type: str = "client") -> dict:
        # Re-registering only refreshes last_seen, so repeating it is harmless.
        return self.request("POST", "/api/v1/register", idempotent=True,
                            json={"agent_id": agent_id, "role": role, "level": level,
                                  "connection_type": connection_type})

    def agents(self) -> list[dict]:
        return self.request("GET", "/api/v1/agents")

    # -- tasks -------------------------------------------------------------------------

    def list_tasks(self, status: str | None = None, role: str | None = None) -> list[dict]:
        return self.request("GET", "/api/v1/tasks", params={"status": status, "role": role})

    def get_task(self, task_id: int, status: str | None = None) -> dict | None:
        """The server has no single-task read (quirk 1): list and pick."""
        for task in self.list_tasks(status=status):
            if task["id"] == task_id:
                return task
        return None

    def next_task(self, role: str, level: str, simulate: bool = True,
                  timeout: int | None = None) -> dict | None:
        # simulate=true makes one immediate check; a long poll would hold a server
        # worker thread for up to `timeout` seconds (quirk 5).
        params: dict[str, Any] = {"role": role, "level": level,
                                  "simulate": "true" if simulate else "false"}
        if timeout is not None:
            params["timeout"] = timeout
        wait = None if simulate else (timeout or 180) + self.timeout
        return self.request("GET", "/api/v1/tasks/next", params=params, timeout=wait)

    def lock(self, task_id: int, agent_id: str) -> dict:
        def landed(task: dict) -> dict | None:
            holder = task.get("locked_by")
            if holder == agent_id:
                return task
            if holder:  # what the server would have answered had we been later
                raise ApiError(409, f"Task {task_id} is already locked by another agent "
                               f"({holder}; read back after a failed lock call)")
            return None

        return self._change("POST", f"/api/v1/tasks/{task_id}/lock", task_id, landed,
                            params={"agent_id": agent_id})

    def set_status(self, task_id: int, agent_id: str, status: str,
                   notes: str | None = None) -> dict:
        body: dict[str, Any] = {"status": status}
        if notes is not None:
            body["notes"] = notes

        def landed(task: dict) -> dict | None:
            # The server replaces notes only when non-empty; with them, they tell our
            # write from an older move to the same status.
            if task.get("status") != status or (notes and task.get("notes") != notes):
                return None
            return {"task": task, "next_task": None, "workflow_status": "no_tasks",
                    "task_completed": task_id, "auto_continue": False,
                    "continuation_prompt": "", "session_momentum": "low", "read_back": True}

        return self._change("PUT", f"/api/v1/tasks/{task_id}/status", task_id, landed,
                            status=status, params={"agent_id": agent_id}, json=body)

    def comment(self, task_id: int, agent_id: str, comment: str) -> dict:
        return self.request("POST", f"/api/v1/tasks/{task_id}/comment",
                            params={"agent_id": agent_id}, json={"comment": comment})

    def changelog(self, limit: int = 50) -> list[dict]:
        # The status changes of every task, newest first: how often QA failed a task is
        # counted from here (pmtool.failure_policy.qa_bounces), so it holds across machines.
        return self.request("GET", "/api/v1/changelog", params={"limit": limit})


class PMApi(Protocol):
    """What the library asks of a Headless PM client: PMClient is one, a test's scripted
    server is another. Parameters typed with it take either."""

    url: str

    def health(self, timeout: float | None = None) -> dict: ...

    def request(self, method: str, path: str, *, params: dict | None = None,
                json: Any = None, idempotent: bool | None = None,
                timeout: float | None = None) -> Any: ...

    def register(self, agent_id: str, role: str, level: str,
                 connection_type: str = "client") -> dict: ...

    def agents(self) -> list[dict]: ...

    def list_tasks(self, status: str | None = None, role: str | None = None) -> list[dict]: ...

    def next_task(self, role: str, level: str, simulate: bool = True,
                  timeout: int | None = None) -> dict | None: ...

    def lock(self, task_id: int, agent_id: str) -> dict: ...

    def set_status(self, task_id: int, agent_id: str, status: str,
                   notes: str | None = None) -> dict: ...

    def comment(self, task_id: int, agent_id: str, comment: str) -> dict: ...

    def changelog(self, limit: int = 50) -> list[dict]: ...


def _detail(resp: Any) -> Any:
    try:
        return resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        return resp.text[:200]


def _detail_text(resp: Any) -> str:
    from pmtool.errors import detail_text

    return detail_text(_detail(resp))

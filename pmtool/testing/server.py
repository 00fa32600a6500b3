"""A stand-in Headless PM server, standard library only.

It follows /work/shared/headless-pm-api.md (the contract) and, where the contract is
silent, the real server's code (madviking/headless-pm: src/api/routes.py,
src/services/task_management_service.py, task_service.py, agent_service.py), flaws included:
the lock endpoint checks and sets without a row lock, long polls hold a worker thread,
re-registering keeps the old role.

Read from the real code, beyond the contract:
- Setting `under_work` never touches the lock: update_task_status only *releases* a lock
  when a task moves out of `under_work`; the caller shows up only in the changelog.
- Locking neither refreshes the agent's `last_seen` nor looks at the task's status. It
  checks task (404), then any lock (409), then the agent (404), in that order.
- `notes` replace only when non-empty; comments join with a blank line and the commenter
  need not be registered.
- Deletes answer 404 for an unknown requester, 403 for a non-pm one.
- `/tasks/next` picks for a throwaway agent built from the query; it refreshes nobody.

Measured against a real server (contract quirks 7-11), and the default here:
- The lock's check-then-set window is open: each lock sleeps a random part of
  `race_window` (default DEFAULT_RACE_WINDOW) between its check and its set, so concurrent
  lockers can all be answered 200. `race_window=0` makes locking atomic.
- A 500 is uvicorn's: `text/plain` "Internal Server Error"; afterwards the next request on
  that keep-alive connection is reset (RST, no answer) with probability `reset_after_500`.
- The database pool: `db_pool` connections (5 + 10 overflow), a request that cannot get one
  within `db_pool_timeout` (30 s) answers 500; each request holds its connection for
  `db_latency` seconds. `/health` waits for a connection too, so it stalls under load.
- Task ids are SQLite rowids: deleting the newest task makes its id the next one again.
- Deleting an agent frees its locks; deleting one that created a task is a 500 that
  deletes nothing.
- `@agent_id` in a comment makes a mention for that (registered) agent, listed in its
  register answers until read (`GET /mentions`, `PUT /mentions/{id}/read`).
- `connection_type: null` registers as "client"; the keys `development-key` and `XXXXXX`
  work only with `production=False` (the real server's development mode).

Not part of the real API: the `/_sandbox/*` admin endpoints (clock, per-agent ageing, race
window, injected 500s, stats, the log of recent requests, reset). Documents, services and
`/changes` are not modelled.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import re
import selectors
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from time import monotonic
from typing import Any
from urllib.parse import parse_qsl, urlsplit

STATUSES = ("pending", "created", "under_work", "dev_done", "qa_done", "documentation_done",
            "committed", "evaluation", "approved")
ROLES = ("frontend_dev", "backend_dev", "qa", "architect", "pm")
LEVELS = ("junior", "senior", "principal")
COMPLEXITIES = ("minor", "major")
CONNECTION_TYPES = ("mcp", "client")
STALE_AFTER = timedelta(minutes=30)
DEV_KEYS = ("development-key", "XXXXXX")
# Seconds: each lock sleeps a random part of it between check and set, about what a
# SQLite check, update and commit take. The real server double-locked 7 of 20 tasks raced
# by 20 agents; 20 threads on loopback racing this stand-in double-lock more (14-18 of 20, as
# with any window from 1 ms up), so tests see double locks at least as often as in real
# use, while the window stays far under pmtool's claim settle time (0.3 s).
DEFAULT_RACE_WINDOW = 0.005
# The real server's SQLAlchemy pool: pool_size 5 + max_overflow 10, pool_timeout 30 s.
DEFAULT_DB_POOL, DEFAULT_DB_POOL_TIMEOUT = 5 + 10, 30.0
# Measured: after a 500, the next request on the same connection was reset in 1 of 3 tries.
DEFAULT_RESET_AFTER_500 = 1 / 3
POOL_EXHAUSTED = ("QueuePool limit of size 5 overflow 10 reached, connection timed out, "
                  "timeout {:.2f}")
MENTION = re.compile(r"@([A-Za-z0-9_-]+)")
AGENT_404 = ("Agent '{}' not found. Please ensure the agent is registered using "
             "POST /api/v1/register before attempting this operation.")
TASK_404 = "Task with ID {} not found. Please verify the task ID exists."
TASK_409 = ("Task {} is already locked by another agent. "
            "The task must be unlocked before you can lock it.")
REQUEST_LOG = 5000  # requests kept for /_sandbox/requests
_MISSING = object()  # an absent body, or no default (a required parameter)

Payload = Any
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Naive UTC now, the way the real server stamps rows (datetime.utcnow())."""
    return datetime.now(UTC).replace(tzinfo=None)


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


class HTTPError(Exception):
    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class Crash(Exception):
    """An unhandled server-side error: answered as uvicorn does, plain-text 500."""


class _Degraded(Exception):
    """/health could not reach the database."""


class PlainText(str):
    """A payload sent as text/plain instead of JSON."""


INTERNAL_ERROR = PlainText("Internal Server Error")


# ---- pydantic-like validation ----------------------------------------------------------
# A parameter spec is (source, kind, default, nullable): source "path" | "query" | "body";
# kind "str" | "int" | "bool" | "number" or a tuple of enum values.


def P(kind: Any) -> tuple:  # reads like FastAPI's Path(), Query(), Body()
    return ("path", kind, _MISSING, False)


def Q(kind: Any, default: Any = _MISSING) -> tuple:
    return ("query", kind, default, False)


def B(kind: Any, default: Any = _MISSING, nullable: bool = False) -> tuple:
    return ("body", kind, default, nullable)


_MESSAGES = {
    "missing": "Field required",
    "string_type": "Input should be a valid string",
    "int_type": "Input should be a valid integer",
    "int_parsing": "Input should be a valid integer, unable to parse string as an integer",
    "int_from_float": "Input should be a valid integer, got a number with a fractional part",
    "bool_parsing": "Input should be a valid boolean, unable to interpret input",
    "float_type": "Input should be a valid number",
    "model_attributes_type": "Input should be a valid dictionary or object to extract fields from",
}
_TRUE, _FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")


def _convert(kind: Any, value: Any) -> tuple[Any, str | None]:
    """(value, None) or (None, pydantic error type)."""
    if isinstance(kind, tuple):
        return (value, None) if isinstance(value, str) and value in kind else (None, "enum")
    if kind == "str":
        return (value, None) if isinstance(value, str) else (None, "string_type")
    if kind == "int":
        if isinstance(value, int):
            return int(value), None
        if isinstance(value, float):
            return (int(value), None) if value.is_integer() else (None, "int_from_float")
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.strip()), None
            return None, "int_parsing"
        return None, "int_type"
    if kind == "bool":
        text = str(value).lower()
        return (text in _TRUE, None) if text in _TRUE + _FALSE else (None, "bool_parsing")
    if isinstance(value, int | float) and not isinstance(value, bool):  # "number"
        return float(value), None
    if isinstance(value, str):  # a query parameter
        with contextlib.suppress(ValueError):
            return float(value.strip()), None
    return None, "float_type"


def _validate(spec: dict[str, tuple], path: dict, query: dict, body: Any) -> dict[str, Any]:
    """Every error at once, in FastAPI's order (path, query, body), as one 422."""
    errors: list[dict] = []

    def fail(kind: str, loc: list, value: Any, choices: Any = None) -> None:
        err = {"type": kind, "loc": loc, "msg": _MESSAGES.get(kind, ""), "input": value}
        if kind == "enum":
            quoted = [f"'{c}'" for c in choices]
            expected = ", ".join(quoted[:-1]) + " or " + quoted[-1]
            err.update(msg=f"Input should be {expected}", ctx={"expected": expected})
        errors.append(err)

    if any(s[0] == "body" for s in spec.values()):
        if body is _MISSING:
            fail("missing", ["body"], None)
        elif not isinstance(body, dict):
            fail("model_attributes_type", ["body"], body)
    sources = {"path": path, "query": query, "body": body if isinstance(body, dict) else None}
    args = {}
    for name, (source, kind, default, nullable) in spec.items():
        given = sources[source]
        if given is None:
            continue  # a bad body, reported once above
        if name not in given:
            if default is _MISSING:
                fail("missing", [source, name], body if source == "body" else None)
            args[name] = default
        elif given[name] is None and nullable:
            args[name] = None
        else:
            args[name], problem = _convert(kind, given[name])
            if problem:
                fail(problem, [source, name], given[name], kind)
    if errors:
        raise HTTPError(422, errors)
    return args


class _Handler(BaseHTTPRequestHandler):
    """Parses one request per call; the connection outlives it and returns to the selector."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # a client stalled mid-request must not hold a worker forever
    server: StandInServer  # type: ignore[assignment]

    def _any(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.send_error(400, "Bad Content-Length")
            return
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            status, payload, headers = self.server.dispatch(self.command, self.path, self.headers,
                                                            raw)
        except Exception:  # a stand-in bug must answer 500, not kill the worker thread
            if self.server.log:
                raise
            status, payload, headers = 500, INTERNAL_ERROR, {}
        if isinstance(payload, PlainText):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
            ctype = "application/json"
        if status == 500:  # quirk 8: the connection may not survive the next request
            self.reset_next = random.random() < self.server.reset_after_500
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _any

    def version_string(self) -> str:
        return "uvicorn"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log:
            super().log_message(format, *args)


class StandInServer:
    """The stand-in: in-memory state behind the real API's paths, shapes and quirks.

    Requests run on a bounded pool of `workers` threads, like uvicorn's threadpool for sync
    FastAPI endpoints, so long polls starve it the way quirk 5 describes. Idle keep-alive
    connections wait in a selector and hold no worker.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str = "sandbox-key",
                 production: bool = True, workers: int = 40, poll_check_interval: float = 5.0,
                 race_window: float = DEFAULT_RACE_WINDOW, log: bool = False,
                 clock: Clock | None = None, db_pool: int = DEFAULT_DB_POOL,
                 db_pool_timeout: float = DEFAULT_DB_POOL_TIMEOUT, db_latency: float = 0.0,
                 reset_after_500: float = DEFAULT_RESET_AFTER_500,
                 fail_rate: float = 0.0) -> None:
        self.host, self.port, self.api_key, self.production = host, port, api_key, production
        self.workers, self.poll_check_interval = workers, poll_check_interval
        self.race_window, self.log = race_window, log
        self.db_pool, self.db_pool_timeout, self.db_latency = db_pool, db_pool_timeout, db_latency
        self.reset_after_500, self.fail_rate = reset_after_500, fail_rate
        self._pool = threading.BoundedSemaphore(db_pool)
        self._failures: list[dict[str, Any]] = []  # injected 500s, see inject_failure
        # Development keys only in the real server's development mode (ENVIRONMENT unset).
        self._keys = {api_key} | (set() if production else set(DEV_KEYS))
        self._clock = clock or utcnow
        self._offset = timedelta()
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._jobs: queue.Queue[_Handler | None] = queue.Queue()
        self._returned: deque[_Handler] = deque()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._routes = [(m, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", t) + "$"),
                         t, fn, auth, spec) for m, t, fn, auth, spec in self._route_table()]
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> StandInServer:
        self._sock = socket.create_server((self.host, self.port), backlog=1024)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        for i in range(self.workers):
            threading.Thread(target=self._worker, name=f"standin-worker-{i}", daemon=True).start()
        self._thread = threading.Thread(target=self._loop, name="standin-io", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()  # also ends long polls and race sleeps early
        self._wake()
        self._thread.join(5)
        for _ in range(self.workers):
            self._jobs.put(None)

    @property
    def url(self) -> str:
        if self._sock is None:
            raise RuntimeError("StandInServer is not started")
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> StandInServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- admin (also reachable under /_sandbox/) -------------------------------------

    def now(self) -> datetime:
        return self._clock() + self._offset

    def advance_clock(self, seconds: float) -> datetime:
        with self._lock:
            self._offset += timedelta(seconds=seconds)
            return self.now()

    def set_race_window(self, seconds: float) -> float:
        """Longest pause between the lock endpoint's check and its set (each lock sleeps a
        random part of it); 0 makes locking atomic. Answers the window before the change."""
        before, self.race_window = self.race_window, max(0.0, float(seconds))
        return before

    def land_late_lock(self, task_id: int, agent_id: str) -> dict:
        """The second half of a lock request whose check passed while the task was still
        free, landing now (quirk 2): `agent_id` overwrites whatever lock the task has, as
        a lock that lands after the winner's settle time does. Answers the task."""
        with self._lock:
            return self._set_lock(self._find_task(task_id), self._find_agent(agent_id))

    def age_agent(self, agent_id: str, seconds: float) -> dict:
        """Move one agent's `last_seen` `seconds` into the past (the others keep theirs)."""
        with self._lock:
            agent = self._find_agent(agent_id)
            agent["last_seen"] -= timedelta(seconds=seconds)
            return self._agent_json(agent)

    def inject_failure(self, route: str | None = None, times: int = 1,
                       after: bool = False) -> dict:
        """Answer the next `times` requests to `route` ("POST /api/v1/tasks/{task_id}/lock",
        as in stats(); None: any /api/v1 route) with a real-shaped 500. With `after`, the
        endpoint does its work first, so the change lands but its answer is lost."""
        rule = {"route": route, "times": int(times), "after": bool(after)}
        with self._stats_lock:
            self._failures.append(rule)
        return rule

    def reset(self) -> None:
        """Forget every agent, epic, feature, task and changelog entry; ids restart at 1."""
        with self._lock:
            self._agents: dict[str, dict] = {}
            self._agents_pk: dict[int, dict] = {}
            self._epics: dict[int, dict] = {}
            self._features: dict[int, dict] = {}
            self._tasks: dict[int, dict] = {}
            self._changelog: list[dict] = []
            self._mentions: dict[int, dict] = {}
            self._ids: Counter[str] = Counter()
            self._offset = timedelta()
        with self._stats_lock:
            self._failures = []
            self._counts: Counter[str] = Counter()
            self._log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG)
            self._busy = self._peak_busy = self._resets = 0

    def requests(self, route: str | None = None) -> list[dict[str, Any]]:
        """The last REQUEST_LOG requests, oldest first: `at` (the server's monotonic
        clock), method, route template, query and User-Agent; only `route`'s if given
        ("GET /api/v1/tasks", as in stats())."""
        with self._stats_lock:
            return [r for r in self._log
                    if route is None or f"{r['method']} {r['route']}" == route]

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"total": sum(self._counts.values()), "requests": dict(self._counts),
                    "busy_workers": self._busy, "peak_busy_workers": self._peak_busy,
                    "queued": self._jobs.qsize(), "workers": self.workers,
                    "resets": self._resets}

    # ---- connection handling ---------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake is already pending
            self._wake_w.send(b"\0")

    def _loop(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stopping.is_set():
            for key, _ in sel.select(timeout=1.0):
                if key.data == "accept":
                    while True:
                        try:
                            conn, addr = self._sock.accept()
                        except OSError:
                            break
                        sel.register(conn, selectors.EVENT_READ, self._new_handler(conn, addr))
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(65536)
                    while self._returned:
                        handler = self._returned.popleft()
                        sel.register(handler.connection, selectors.EVENT_READ, handler)
                else:
                    sel.unregister(key.fileobj)
                    self._jobs.put(key.data)
        for key in list(sel.get_map().values()):
            if isinstance(key.data, _Handler):
                self._close(key.data)
        while self._returned:
            self._close(self._returned.popleft())
        sel.close()
        self._sock.close()

    def _new_handler(self, conn: socket.socket, addr: Any) -> _Handler:
        handler = _Handler.__new__(_Handler)
        handler.request, handler.client_address, handler.server = conn, addr, self
        handler.close_connection = True
        handler.setup()
        return handler

    @staticmethod
    def _close(handler: _Handler) -> None:
        with contextlib.suppress(OSError):
            handler.finish()
        handler.connection.close()

    def _worker(self) -> None:
        while (handler := self._jobs.get()) is not None:
            if getattr(handler, "reset_next", False):
                # Quirk 8: the request after a 500 gets no answer, the peer resets.
                with self._stats_lock:
                    self._resets += 1
                with contextlib.suppress(OSError):
                    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                  b"\1\0\0\0\0\0\0\0")
                self._close(handler)
                continue
            with self._stats_lock:
                self._busy += 1
                self._peak_busy = max(self._peak_busy, self._busy)
            try:
                handler.handle_one_request()
                keep = not handler.close_connection and not self._stopping.is_set()
            except Exception:
                keep = False
            finally:
                with self._stats_lock:
                    self._busy -= 1
            if keep:
                self._returned.append(handler)
                self._wake()
            else:
                self._close(handler)

    # ---- routing ---------------------------------------------------------------------

    def dispatch(self, method: str, target: str, headers: Any,
                 raw: bytes) -> tuple[int, Payload, dict[str, str]]:
        """Answer one request: (status, JSON payload, extra headers). Starlette's routing rules."""
        parts = urlsplit(target)
        path, query = parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))
        full, partial = self._match(method, path)
        template = (full or partial or (None, None, "<unmatched>"))[2]
        with self._stats_lock:
            self._counts[f"{method} {template}"] += 1
            self._log.append({"at": monotonic(), "method": method, "route": template,
                              "query": query, "user_agent": headers.get("User-Agent")})
        try:
            if full is None:
                if partial is not None:
                    raise HTTPError(405, "Method Not Allowed", {"allow": partial[0]})
                other = path[:-1] if path.endswith("/") and path != "/" else path + "/"
                if any(self._match(method, other)):
                    query_part = f"?{parts.query}" if parts.query else ""
                    location = f"http://{headers.get('Host', self.host)}{other}{query_part}"
                    return 307, None, {"location": location}
                raise HTTPError(404, "Not Found")
            _, rx, _, fn, auth, spec = full
            body: Any = None
            if any(s[0] == "body" for s in spec.values()):
                body = self._decode_body(headers, raw)  # FastAPI does so before the key check
            if auth and headers.get("X-API-Key") not in self._keys:
                raise HTTPError(401, "Invalid API key")
            args = _validate(spec, rx.match(path).groupdict(), query, body)
            if not path.startswith("/api/v1/") and path not in ("/health", "/status"):
                return 200, fn(args), {}  # /_sandbox/* needs no database
            fail = self._failure_for(f"{method} {template}")
            if fail == "before":
                raise Crash(template)
            if template == "/api/v1/tasks/next":
                payload = fn(args)  # takes a connection per check, not for its whole wait
            else:
                with self._db_connection(path):
                    payload = fn(args)
            if fail == "after":
                raise Crash(template)
            return 200, payload, {}
        except HTTPError as err:
            return err.status, {"detail": err.detail}, err.headers
        except Crash:
            return 500, INTERNAL_ERROR, {}
        except _Degraded as err:
            return 200, {**self._health({}), "status": "degraded",
                         "database": f"unhealthy: {err}"}, {}

    def _failure_for(self, route: str) -> str | None:
        """"before" or "after" when this request is to fail (injected or at fail_rate)."""
        with self._stats_lock:
            for rule in self._failures:
                if rule["route"] in (None, route) and route.split()[1].startswith("/api/v1/"):
                    rule["times"] -= 1
                    if rule["times"] <= 0:
                        self._failures.remove(rule)
                    return "after" if rule["after"] else "before"
        if self.fail_rate and route.split()[1].startswith("/api/v1/") \
                and random.random() < self.fail_rate:
            return "before"
        return None

    @contextlib.contextmanager
    def _db_connection(self, path: str) -> Any:
        """Quirk 7: a pooled database connection for the request, or a 500 after the
        pool's timeout; held for `db_latency` seconds on top of the work itself."""
        if not self._pool.acquire(timeout=self.db_pool_timeout):
            if path == "/health":  # the health check catches it and reports it
                raise _Degraded(POOL_EXHAUSTED.format(self.db_pool_timeout))
            raise Crash("pool exhausted")
        try:
            if self.db_latency > 0:
                self._stopping.wait(self.db_latency)
            yield
        finally:
            self._pool.release()

    def _match(self, method: str, path: str) -> tuple[tuple | None, tuple | None]:
        """(route matching path and method, else None; first route matching the path only)."""
        partial = None
        for route in self._routes:
            if route[1].match(path):
                if route[0] == method:
                    return route, None
                partial = partial or route
        return None, partial

    @staticmethod
    def _decode_body(headers: Any, raw: bytes) -> Any:
        if not raw:
            return _MISSING
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype and not (ctype.endswith("/json") or ctype.endswith("+json")):
            return raw.decode("utf-8", "replace")
        try:
            return json.loads(raw)
        except ValueError as err:
            pos, msg = getattr(err, "pos", 0), getattr(err, "msg", str(err))
            raise HTTPError(422, [{"type": "json_invalid", "loc": ["body", pos],
                                   "msg": "JSON decode error", "input": {},
                                   "ctx": {"error": msg}}]) from None

    def _route_table(self) -> list[tuple[str, str, Callable[[dict], Payload], bool, dict]]:
        v1, task = "/api/v1", "/api/v1/tasks/{task_id}"
        agent_q, task_p = {"agent_id": Q("str")}, {"task_id": P("int")}
        return [
            ("GET", "/health", self._health, False, {}),
            ("GET", "/status", self._status, False, {}),
            ("GET", f"{v1}/context", self._context, False, {}),
            ("POST", f"{v1}/register", self._register, True, {
                "agent_id": B("str"), "role": B(ROLES), "level": B(LEVELS),
                "connection_type": B(CONNECTION_TYPES, "client", nullable=True)}),
            ("GET", f"{v1}/agents", self._list_agents, True, {}),
            ("DELETE", f"{v1}/agents/{{agent_id}}", self._delete_agent, True, {
                "agent_id": P("str"), "requester_agent_id": Q("str")}),
            ("POST", f"{v1}/epics", self._create_epic, True, {
                **agent_q, "name": B("str"), "description": B("str")}),
            ("POST", f"{v1}/features", self._create_feature, True, {
                **agent_q, "epic_id": B("int"), "name": B("str"), "description": B("str")}),
            ("POST", f"{v1}/tasks/create", self._create_task, True, {
                **agent_q, "feature_id": B("int"), "title": B("str"), "description": B("str"),
                "target_role": B(ROLES), "difficulty": B(LEVELS),
                "complexity": B(COMPLEXITIES, "major"), "branch": B("str")}),
            ("GET", f"{v1}/tasks", self._list_tasks, True, {
                "status": Q(STATUSES, None), "role": Q(ROLES, None)}),
            ("GET", f"{v1}/tasks/next", self._next_task, True, {
                "role": Q(ROLES, None), "level": Q(LEVELS, None), "simulate": Q("bool", False),
                "timeout": Q("int", None)}),
            ("POST", f"{task}/lock", self._lock_task, True, {**task_p, **agent_q}),
            ("PUT", f"{task}/status", self._update_status, True, {
                **task_p, **agent_q, "status": B(STATUSES), "notes": B("str", None, True)}),
            ("POST", f"{task}/comment", self._comment, True, {
                **task_p, **agent_q, "comment": B("str")}),
            ("DELETE", task, self._delete_task, True, {**task_p, **agent_q}),
            ("GET", f"{v1}/changelog", self._get_changelog, True, {"limit": Q("int", 50)}),
            ("GET", f"{v1}/mentions", self._list_mentions, True, {
                "agent_id": Q("str"), "unread_only": Q("bool", True), "limit": Q("int", 50)}),
            ("PUT", f"{v1}/mentions/{{mention_id}}/read", self._read_mention, True, {
                "mention_id": P("int"), **agent_q}),
            ("POST", "/_sandbox/clock", lambda a: {"now": _iso(self.advance_clock(
                a["advance_seconds"]))}, False, {"advance_seconds": B("number")}),
            ("POST", "/_sandbox/age", lambda a: self.age_agent(a["agent_id"], a["seconds"]),
             False, {"agent_id": Q("str"), "seconds": Q("number")}),
            ("POST", "/_sandbox/race", lambda a: {"was": self.set_race_window(a["window"]),
                                                  "window": self.race_window},
             False, {"window": B("number")}),
            ("POST", "/_sandbox/fail", lambda a: self.inject_failure(**a), False, {
                "route": B("str", None, True), "times": B("int", 1), "after": B("bool", False)}),
            ("GET", "/_sandbox/stats", lambda a: self.stats(), False, {}),
            ("GET", "/_sandbox/requests", lambda a: self.requests(a["route"]), False,
             {"route": Q("str", None)}),
            ("POST", "/_sandbox/reset", lambda a: self.reset() or {"reset": True},  # type: ignore[func-returns-value]
             False, {}),
        ]

    # ---- state helpers (call with self._lock held) -----------------------------------

    def _next_id(self, table: str) -> int:
        if table == "task":  # quirk 9: a rowid, so the newest task's id comes back
            return max(self._tasks, default=0) + 1
        self._ids[table] += 1
        return self._ids[table]

    def _agent_json(self, agent: dict) -> dict:
        return {**agent, "last_seen": _iso(agent["last_seen"])}

    def _task_json(self, t: dict) -> dict:
        locker, creator = self._agents_pk.get(t["locked_by"]), self._agents_pk.get(t["created_by"])
        return {"id": t["id"], "feature_id": t["feature_id"],
                "epic_id": self._features[t["feature_id"]]["epic_id"], "title": t["title"],
                "description": t["description"],
                "created_by": creator["agent_id"] if creator else "unknown",
                "target_role": t["target_role"], "difficulty": t["difficulty"],
                "complexity": t["complexity"], "branch": t["branch"], "status": t["status"],
                "locked_by": locker["agent_id"] if locker else None,
                "locked_at": _iso(t["locked_at"]), "notes": t["notes"],
                "created_at": _iso(t["created_at"]), "updated_at": _iso(t["updated_at"]),
                "task_type": "regular", "poll_interval": None}

    def _find_task(self, task_id: int) -> dict:
        if task_id not in self._tasks:
            raise HTTPError(404, TASK_404.format(task_id))
        return self._tasks[task_id]

    def _find_agent(self, agent_id: str, roles: tuple[str, ...] = ROLES) -> dict:
        if agent_id not in self._agents:
            raise HTTPError(404, AGENT_404.format(agent_id))
        if self._agents[agent_id]["role"] not in roles:
            raise HTTPError(403, f"Only {', '.join(roles)} agents can perform this operation")
        return self._agents[agent_id]

    def _log_change(self, task_id: int, old: str, new: str, by: str, notes: str | None) -> None:
        self._changelog.append({"id": self._next_id("changelog"), "task_id": task_id,
                                "old_status": old, "new_status": new, "changed_by": by,
                                "notes": notes, "changed_at": self.now()})

    def _pick(self, role: str, level: str) -> dict | None:
        """The real get_next_task_for_agent: drop stale locks, then the oldest match."""
        cutoff = self.now() - STALE_AFTER
        for t in self._tasks.values():
            locker = self._agents_pk.get(t["locked_by"])
            if locker and locker["last_seen"] < cutoff:
                t["locked_by"] = t["locked_at"] = None
        if role == "qa":
            found = [t for t in self._tasks.values() if t["status"] == "dev_done"]
        else:
            found = [t for t in self._tasks.values() if t["status"] in ("created", "approved")
                     and t["target_role"] == role
                     and LEVELS.index(t["difficulty"]) <= LEVELS.index(level)]
        best = min((t for t in found if t["locked_by"] is None),
                   key=lambda t: (t["created_at"], t["id"]), default=None)
        return self._task_json(best) if best else None

    # ---- endpoints -------------------------------------------------------------------

    def _health(self, a: dict) -> Payload:
        return {"status": "healthy", "service": "headless-pm-api", "version": "1.0.0",
                "database": "healthy", "dashboard": "stopped", "timestamp": _iso(self.now())}

    def _status(self, a: dict) -> Payload:
        with self._lock:
            since = self.now().replace(microsecond=0) - timedelta(minutes=5)
            metrics = {"total_agents": len(self._agents),
                       "active_agents": sum(a["last_seen"] > since for a in self._agents.values()),
                       "total_tasks": len(self._tasks), "total_documents": 0, "total_services": 0}
        return {"service": "headless-pm-api", "version": "1.0.0", "metrics": metrics,
                "timestamp": _iso(self.now())}

    def _context(self, a: dict) -> Payload:
        return {"project_name": "Headless PM", "shared_path": "./shared",
                "instructions_path": "./agent_instructions", "project_docs_path": "./docs",
                "database_type": "sqlite"}

    def _register(self, a: dict) -> Payload:
        with self._lock:
            agent = self._agents.get(a["agent_id"])
            kind = a["connection_type"] or "client"  # null registers as the default
            if agent:  # quirk 4: an existing agent keeps its role and level
                agent["last_seen"], agent["connection_type"] = self.now(), kind
            else:
                agent = {"id": self._next_id("agent"), **a, "connection_type": kind,
                         "last_seen": self.now()}
                self._agents[agent["agent_id"]] = self._agents_pk[agent["id"]] = agent
            return {"agent": self._agent_json(agent),
                    "next_task": self._pick(agent["role"], agent["level"]),
                    "mentions": self._mentions_of(agent["agent_id"], True, 50)}

    def _list_agents(self, a: dict) -> Payload:
        with self._lock:
            agents = sorted(self._agents.values(), key=lambda a: a["last_seen"], reverse=True)
            return [self._agent_json(agent) for agent in agents]

    def _delete_agent(self, a: dict) -> Payload:
        with self._lock:
            self._find_agent(a["requester_agent_id"], ("pm",))
            if a["agent_id"] == a["requester_agent_id"]:
                raise HTTPError(400, "Cannot delete your own agent record")
            if a["agent_id"] not in self._agents:
                raise HTTPError(404, "Agent not found")
            pk = self._agents[a["agent_id"]]["id"]
            if any(t["created_by"] == pk for t in self._tasks.values()):
                raise Crash("foreign key: the agent created tasks")  # quirk 10: nothing goes
            for t in self._tasks.values():  # quirk 10: its locks go with it
                if t["locked_by"] == pk:
                    t["locked_by"] = t["locked_at"] = None
            del self._agents_pk[self._agents.pop(a["agent_id"])["id"]]
        return {"message": f"Agent {a['agent_id']} deleted successfully"}

    def _create_epic(self, a: dict) -> Payload:
        with self._lock:
            self._find_agent(a["agent_id"], ("pm", "architect"))
            epic = {"id": self._next_id("epic"), "name": a["name"],
                    "description": a["description"], "created_at": _iso(self.now())}
            self._epics[epic["id"]] = epic
        return {**epic, "task_count": 0, "completed_task_count": 0, "in_progress_task_count": 0}

    def _create_feature(self, a: dict) -> Payload:
        with self._lock:
            self._find_agent(a.pop("agent_id"), ("pm", "architect"))
            if a["epic_id"] not in self._epics:
                raise HTTPError(404, "Epic not found")
            feature = {"id": self._next_id("feature"), **a}
            self._features[feature["id"]] = feature
            return dict(feature)

    def _create_task(self, a: dict) -> Payload:
        with self._lock:
            creator = self._agents.get(agent_id := a.pop("agent_id"))
            if creator is None:
                raise HTTPError(404, "Creator agent not found")
            if a["feature_id"] not in self._features:
                raise HTTPError(404, "Feature not found")
            now = self.now()
            task = {**a, "id": self._next_id("task"), "created_by": creator["id"],
                    "status": "pending", "locked_by": None, "locked_at": None, "notes": None,
                    "created_at": now, "updated_at": now}
            self._tasks[task["id"]] = task
            self._log_change(task["id"], "pending", "pending", agent_id, "Task created (pending)")
            return self._task_json(task)

    def _list_tasks(self, a: dict) -> Payload:
        with self._lock:
            tasks = [t for t in self._tasks.values()
                     if a["status"] in (None, t["status"])
                     and a["role"] in (None, t["target_role"])]
            tasks.sort(key=lambda t: (t["created_at"], t["id"]), reverse=True)
            return [self._task_json(t) for t in tasks]

    def _next_task(self, a: dict) -> Payload:
        for name, example in (("role", "frontend_dev"), ("level", "senior")):
            if a[name] is None:
                raise HTTPError(400, f"Missing required parameter '{name}'. Please provide a "
                                     f"valid {name} (e.g., ?{name}={example})")
        # Quirk 5: a long poll keeps this worker thread until a task shows up or time runs out.
        deadline = monotonic() + (180 if a["timeout"] is None else a["timeout"])
        while True:
            with self._db_connection("/api/v1/tasks/next"), self._lock:
                task = self._pick(a["role"], a["level"])
            if task or a["simulate"]:
                return task
            remaining = deadline - monotonic()
            if remaining <= 0 or self._stopping.wait(min(self.poll_check_interval, remaining)):
                return None

    def _lock_task(self, a: dict) -> Payload:
        window = self.race_window
        with self._lock:
            task = self._find_task(a["task_id"])
            if task["locked_by"] is not None:  # any lock, even the caller's own
                raise HTTPError(409, TASK_409.format(a["task_id"]))
            agent = self._find_agent(a["agent_id"])
            if window <= 0:
                return self._set_lock(task, agent)
        # Quirk 2: check and set are separate steps with no row lock between them, so
        # concurrent lockers all pass the check, all get 200, the last one wins.
        self._stopping.wait(random.uniform(0, window))
        with self._lock:
            return self._set_lock(task, agent)

    def _set_lock(self, task: dict, agent: dict) -> Payload:
        task["locked_by"], task["locked_at"] = agent["id"], self.now()
        return self._task_json(task)

    def _update_status(self, a: dict) -> Payload:
        with self._lock:
            task = self._find_task(a["task_id"])
            agent = self._find_agent(a["agent_id"])
            old, new = task["status"], a["status"]
            task["status"], task["updated_at"] = new, self.now()
            if a["notes"]:  # the real code tests truthiness: "" leaves the notes alone
                task["notes"] = a["notes"]
            # The only thing that ever releases a lock. Setting under_work takes none.
            if old == "under_work" and new != "under_work":
                task["locked_by"] = task["locked_at"] = None
            self._log_change(task["id"], old, new, a["agent_id"], a["notes"])
            nxt = self._pick(agent["role"], agent["level"])
            return {"task": self._task_json(task), "next_task": nxt,
                    "workflow_status": "continue" if nxt else "no_tasks",
                    "task_completed": task["id"], "auto_continue": bool(nxt),
                    "continuation_prompt": "Continue with the next task without waiting for "
                    "confirmation" if nxt else "No more tasks available",
                    "session_momentum": "high" if nxt else "low"}

    def _comment(self, a: dict) -> Payload:
        with self._lock:
            task = self._find_task(a["task_id"])
            line = f"{a['agent_id']}: {a['comment']}"
            task["notes"] = f"{task['notes']}\n\n{line}" if task["notes"] else line
            task["updated_at"] = self.now()
            for name in dict.fromkeys(MENTION.findall(a["comment"])):  # quirk 11
                if name in self._agents:
                    mention = {"id": self._next_id("mention"), "document_id": None,
                               "task_id": task["id"], "mentioned_agent_id": name,
                               "created_by": a["agent_id"], "is_read": False,
                               "created_at": self.now()}
                    self._mentions[mention["id"]] = mention
        return {"message": "Comment added successfully"}

    def _mention_json(self, m: dict) -> dict:
        task = self._tasks.get(m["task_id"])
        return {**m, "created_at": _iso(m["created_at"]), "document_title": None,
                "task_title": task["title"] if task else None}

    def _mentions_of(self, agent_id: str, unread_only: bool, limit: int) -> list[dict]:
        found = [m for m in self._mentions.values() if m["mentioned_agent_id"] == agent_id
                 and not (unread_only and m["is_read"])]
        found.sort(key=lambda m: (m["created_at"], m["id"]), reverse=True)
        return [self._mention_json(m) for m in found[:limit]]

    def _list_mentions(self, a: dict) -> Payload:
        with self._lock:
            return self._mentions_of(a["agent_id"], a["unread_only"], a["limit"])

    def _read_mention(self, a: dict) -> Payload:
        with self._lock:
            mention = self._mentions.get(a["mention_id"])
            if mention is None or mention["mentioned_agent_id"] != a["agent_id"]:
                raise HTTPError(404, "Mention not found")
            mention["is_read"] = True
            return self._mention_json(mention)

    def _delete_task(self, a: dict) -> Payload:
        with self._lock:
            self._find_agent(a["agent_id"], ("pm",))
            if self._tasks.pop(a["task_id"], None) is None:
                raise HTTPError(404, "Task not found")
            self._mentions = {k: m for k, m in self._mentions.items()
                              if m["task_id"] != a["task_id"]}
            # the real Task cascades to its changelog rows
            self._changelog = [c for c in self._changelog if c["task_id"] != a["task_id"]]
        return {"message": f"Task {a['task_id']} deleted successfully"}

    def _get_changelog(self, a: dict) -> Payload:
        with self._lock:
            entries = sorted(self._changelog, key=lambda c: (c["changed_at"], c["id"]),
                             reverse=True)
            if a["limit"] >= 0:  # SQL's LIMIT -1 means no limit
                entries = entries[:a["limit"]]
            return [{**c, "changed_at": _iso(c["changed_at"])} for c in entries]


def main(argv: list[str] | None = None) -> None:
    """`python -m pmtool.testing.server`: a stand-in with every switch, until Ctrl-C.

    Prints one JSON line with its URL when ready. The defaults are the real server's."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pmtool.testing.server",
                                     description=main.__doc__)
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=6969)
    add("--api-key", default="sandbox-key")
    add("--dev-keys", action="store_true",
        help="also accept development-key and XXXXXX (the real server's development mode)")
    add("--workers", type=int, default=40)
    add("--poll-interval", type=float, default=5.0)
    add("--race-window", type=float, default=DEFAULT_RACE_WINDOW,
        help="longest lock check-to-set pause in seconds; 0 makes locking atomic")
    add("--db-pool", default="5+10", help="pool size + overflow (or one number)")
    add("--db-pool-timeout", type=float, default=DEFAULT_DB_POOL_TIMEOUT)
    add("--db-latency", type=float, default=0.0,
        help="seconds each request holds its database connection")
    add("--reset-after-500", type=float, default=DEFAULT_RESET_AFTER_500)
    add("--fail-rate", type=float, default=0.0, help="share of /api/v1 requests that answer 500")
    add("--log", action="store_true")
    opts = parser.parse_args(argv)
    server = StandInServer(
        opts.host, opts.port, opts.api_key, production=not opts.dev_keys, workers=opts.workers,
        poll_check_interval=opts.poll_interval, race_window=opts.race_window, log=opts.log,
        db_pool=sum(int(n) for n in opts.db_pool.split("+")),
        db_pool_timeout=opts.db_pool_timeout, db_latency=opts.db_latency,
        reset_after_500=opts.reset_after_500, fail_rate=opts.fail_rate).start()
    print(json.dumps({"url": server.url}), flush=True)
    try:
        while not server._stopping.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def server_under_test(pmtool: str) -> tuple[str, str, Any]:
    """For benchmarks: the real server from PMTOOL_TEST_PM_URL/KEY, else a stand-in in its
    own process (`pmtool sandbox serve`), so the server's threads do not share the
    benchmark's interpreter. Answers (url, key, process or None); stop the process after."""
    import os
    import subprocess

    url, key = os.environ.get("PMTOOL_TEST_PM_URL"), os.environ.get("PMTOOL_TEST_PM_KEY")
    if url and key:
        return url.rstrip("/"), key, None
    key = "bench-" + os.urandom(6).hex()
    proc = subprocess.Popen([pmtool, "sandbox", "serve", "--port", "0", "--api-key", key],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())["url"], key, proc


if __name__ == "__main__":
    main()

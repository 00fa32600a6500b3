"""The Headless PM client: one requests session, a timeout on every call, typed errors.

The server fails in measured ways (../shared/headless-pm-api.md, quirks 7-8): under load it
answers a plain-text 500, and the next request on that connection may be reset. So:
- idempotent calls (GET, register) are retried on 5xx, resets and timeouts, with full
  jitter and a capped backoff, which also spreads a burst of registrations out;
- a lock or status change is never blindly resent (it could act twice): after a 5xx or a
  reset the task is read back, and the call is repeated at most once, only if the read
  shows it did not land. A timeout is not read back: the request may still be in flight.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from pmtool.errors import ApiError, AuthError, ServerError

KEY_ENV_HINT = "set HEADLESS_PM_API_KEY (or API_KEY_HEADLESS_PM) to the server's key"
BACKOFF_CAP = 5.0  # seconds; the longest pause between two tries of one call
MAX_IN_FLIGHT = 8  # requests one client has open at the server at once, at most


class PMClient:
    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.3, pool: int | None = None,
                 agent: str = "pmtool") -> None:
        """`pool`: connections kept per host, for that many threads calling at once (a
        `pmtool run --agents N`); requests' default of 10 would make the 11th caller open
        and drop a connection per call. `agent`: the User-Agent, e.g. naming the process."""
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = requests.Session()
        if pool and pool > 10:
            from requests.adapters import HTTPAdapter

            for prefix in ("http://", "https://"):
                self.session.mount(prefix, HTTPAdapter(pool_connections=4, pool_maxsize=pool))
        if api_key:
            self.session.headers["X-API-Key"] = api_key
        # The key travels as a header; with no auth of its own, requests would look for
        # ~/.netrc credentials before every call (importing netrc and shlex for the first).
        self.session.auth = _as_is
        self.session.headers["User-Agent"] = agent
        # However many threads share this client (`run --agents 200`), at most this many
        # requests are open at the server at once: its database pool is 5 + 10, and 200
        # registrations at once wedged a real server (quirk 7) where 60 did not.
        self._in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    # -- transport ---------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict | None = None,
                json: Any = None, idempotent: bool | None = None,
                timeout: float | None = None) -> Any:
        """One API call; raises ServerError (with `unsure` True when a change may or may
        not have landed: a 5xx or a reset), AuthError, or ApiError for other 4xx."""
        import requests

        if idempotent is None:
            idempotent = method == "GET"
        url = self.url + path
        params = {k: v for k, v in (params or {}).items() if v is not None}
        attempts = self.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            unsure = False
            try:
                with self._in_flight:
                    resp = self.session.request(method, url, params=params, json=json,
                                                timeout=timeout or self.timeout)
            except requests.Timeout:
                error = ServerError(f"{method} {path}: server at {self.url} did not answer "
                                    f"within {timeout or self.timeout:g}s",
                                    hint="is the server overloaded? see PMTOOL_HTTP_TIMEOUT")
            except requests.ConnectionError as exc:
                # Refused (nothing sent) or reset after a 500 (quirk 8): either way the
                # server may be fine now; a later read tells what landed.
                unsure = True
                error = ServerError(f"cannot reach the Headless PM server at {self.url}",
                                    hint="is it running? set HEADLESS_PM_API_URL or --api-url")
                error.__cause__ = exc
            else:
                if resp.status_code < 500:
                    return self._answer(resp, method, path)
                unsure = True
                error = ServerError(f"{method} {path}: server error {resp.status_code}: "
                                    f"{_detail_text(resp)}", status=resp.status_code)
                # After a 500 the server may reset the next request on this connection
                # (quirk 8): start the next one on a fresh connection.
                self.session.close()
            error.unsure = unsure  # type: ignore[attr-defined]
            if attempt + 1 < attempts:
                time.sleep(self.pause(attempt))
        raise error

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
            if "X-API-Key" not in self.session.headers:
                raise AuthError("HEADLESS_PM_API_KEY is not set", hint=KEY_ENV_HINT)
            raise AuthError(f"the server at {self.url} rejected the API key", hint=KEY_ENV_HINT)
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _detail(resp),
                           message=f"{method} {path}: {resp.status_code} {_detail_text(resp)}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise ServerError(f"{method} {path}: the answer is not JSON "
                              f"(is {self.url} a Headless PM server?)") from None

    def close(self) -> None:
        self.session.close()

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
        # counted from here (pmtool.failures.qa_bounces), so it holds across machines.
        return self.request("GET", "/api/v1/changelog", params={"limit": limit})


def _as_is(request: Any) -> Any:
    """An auth that adds nothing (see PMClient.__init__)."""
    return request


def _detail(resp: Any) -> Any:
    try:
        return resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        return resp.text[:200]


def _detail_text(resp: Any) -> str:
    from pmtool.errors import detail_text

    return detail_text(_detail(resp))

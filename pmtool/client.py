"""The Headless PM client: one requests session, a timeout on every call, typed errors.

Only idempotent calls are retried (connection errors and 5xx, with backoff): a retried
lock or status change could act twice. See ../shared/headless-pm-api.md for the contract.
"""

from __future__ import annotations

import random
import time
from typing import Any

from pmtool.errors import ApiError, AuthError, ServerError

KEY_ENV_HINT = "set HEADLESS_PM_API_KEY (or API_KEY_HEADLESS_PM) to the server's key"


class PMClient:
    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.3) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key
        self.session.headers["User-Agent"] = "pmtool"

    # -- transport ---------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict | None = None,
                json: Any = None, idempotent: bool | None = None,
                timeout: float | None = None) -> Any:
        import requests

        if idempotent is None:
            idempotent = method == "GET"
        url = self.url + path
        params = {k: v for k, v in (params or {}).items() if v is not None}
        attempts = self.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                resp = self.session.request(method, url, params=params, json=json,
                                            timeout=timeout or self.timeout)
            except requests.Timeout:
                error = ServerError(f"{method} {path}: server at {self.url} did not answer "
                                    f"within {timeout or self.timeout:g}s",
                                    hint="is the server overloaded? see PMTOOL_HTTP_TIMEOUT")
            except requests.ConnectionError:
                error = ServerError(f"cannot reach the Headless PM server at {self.url}",
                                    hint="is it running? set HEADLESS_PM_API_URL or --api-url")
            else:
                if resp.status_code < 500:
                    return self._answer(resp, method, path)
                error = ServerError(f"{method} {path}: server error {resp.status_code}: "
                                    f"{_detail(resp)}", status=resp.status_code)
            if attempt + 1 < attempts:
                time.sleep(self.backoff * (2 ** attempt) * (0.5 + random.random()))
        raise error

    def _answer(self, resp: Any, method: str, path: str) -> Any:
        if resp.status_code == 401:
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
        return self.request("POST", f"/api/v1/tasks/{task_id}/lock",
                            params={"agent_id": agent_id})

    def set_status(self, task_id: int, agent_id: str, status: str,
                   notes: str | None = None) -> dict:
        body: dict[str, Any] = {"status": status}
        if notes is not None:
            body["notes"] = notes
        return self.request("PUT", f"/api/v1/tasks/{task_id}/status",
                            params={"agent_id": agent_id}, json=body)

    def comment(self, task_id: int, agent_id: str, comment: str) -> dict:
        return self.request("POST", f"/api/v1/tasks/{task_id}/comment",
                            params={"agent_id": agent_id}, json={"comment": comment})

    def changelog(self, limit: int = 50) -> list[dict]:
        return self.request("GET", "/api/v1/changelog", params={"limit": limit})

    # -- planning (tests and the demo) ---------------------------------------------------

    def create_epic(self, agent_id: str, name: str, description: str = "") -> dict:
        return self.request("POST", "/api/v1/epics", params={"agent_id": agent_id},
                            json={"name": name, "description": description})

    def create_feature(self, agent_id: str, epic_id: int, name: str,
                       description: str = "") -> dict:
        return self.request("POST", "/api/v1/features", params={"agent_id": agent_id},
                            json={"epic_id": epic_id, "name": name,
                                  "description": description})

    def create_task(self, agent_id: str, feature_id: int, title: str, description: str,
                    target_role: str, difficulty: str = "senior",
                    complexity: str = "major", branch: str = "main") -> dict:
        return self.request("POST", "/api/v1/tasks/create", params={"agent_id": agent_id},
                            json={"feature_id": feature_id, "title": title,
                                  "description": description, "target_role": target_role,
                                  "difficulty": difficulty, "complexity": complexity,
                                  "branch": branch})


def _detail(resp: Any) -> Any:
    try:
        return resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        return resp.text[:200]


def _detail_text(resp: Any) -> str:
    from pmtool.errors import detail_text

    return detail_text(_detail(resp))

"""Seed a Headless PM server through its real HTTP API, so the same helpers work against the
stand-in and against a real server (tests, the demo, benchmarks).
"""

from __future__ import annotations

import uuid
from typing import Any

import requests


class SeedError(RuntimeError):
    """The server refused a seeding call; `status` and `detail` are what it answered."""

    def __init__(self, method: str, path: str, status: int, detail: Any) -> None:
        super().__init__(f"{method} {path} -> {status}: {detail}")
        self.status, self.detail = status, detail


def unique_id(prefix: str = "agent") -> str:
    """A fresh agent id, so runs against a shared real server never collide."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


class Seeder:
    """Creates agents, epics, features and tasks as a registered pm agent of its own.

    Tasks come out `pending` from the server; `create_task(promote=True)` sets them to
    `created` so agents can pick them. A default epic and feature are made on first need.
    """

    def __init__(self, url: str, api_key: str, pm_agent_id: str | None = None,
                 session: requests.Session | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.pm_agent_id = pm_agent_id or unique_id("seed_pm")
        self.session = session or requests.Session()
        self.timeout = timeout
        self._pm_ready = False
        self.created: list[int] = []  # task ids this seeder made, for retire_created()
        self._feature: dict[str, Any] | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One raw call with the key: `tasks` means /api/v1/tasks; `/health` is taken as is."""
        full = path if path.startswith("/") else "/api/v1/" + path
        headers = {"X-API-Key": self.api_key, **kwargs.pop("headers", {})}
        return self.session.request(method, self.url + full, headers=headers,
                                    timeout=kwargs.pop("timeout", self.timeout), **kwargs)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like `request`, but answers the decoded JSON and raises SeedError unless 200."""
        resp = self.request(method, path, **kwargs)
        if resp.status_code != 200:
            try:
                detail = resp.json().get("detail")
            except ValueError:
                detail = resp.text
            raise SeedError(method, path, resp.status_code, detail)
        return resp.json()

    # ---- agents ----------------------------------------------------------------------

    def register(self, agent_id: str, role: str, level: str = "senior",
                 connection_type: str = "client") -> dict[str, Any]:
        """POST /register; returns the whole answer ({"agent", "next_task", "mentions"})."""
        return self.call("POST", "register", json={"agent_id": agent_id, "role": role,
                                                   "level": level,
                                                   "connection_type": connection_type})

    def ensure_pm(self) -> str:
        if not self._pm_ready:
            self.register(self.pm_agent_id, "pm", "principal")
            self._pm_ready = True
        return self.pm_agent_id

    # ---- epics, features, tasks ------------------------------------------------------

    def create_epic(self, name: str = "Seeded epic",
                    description: str = "Created by pmtool's seeder") -> dict[str, Any]:
        return self.call("POST", "epics", params={"agent_id": self.ensure_pm()},
                         json={"name": name, "description": description})

    def create_feature(self, epic_id: int | None = None, name: str = "Seeded feature",
                       description: str = "Created by pmtool's seeder") -> dict[str, Any]:
        if epic_id is None:
            epic_id = self.create_epic()["id"]
        return self.call("POST", "features", params={"agent_id": self.ensure_pm()},
                         json={"epic_id": epic_id, "name": name, "description": description})

    def default_feature_id(self) -> int:
        if self._feature is None:
            self._feature = self.create_feature()
        return int(self._feature["id"])

    def create_task(self, feature_id: int | None = None, title: str = "Seeded task",
                    description: str = "Created by pmtool's seeder",
                    target_role: str = "backend_dev", difficulty: str = "junior",
                    complexity: str = "major", branch: str = "main",
                    promote: bool = True) -> dict[str, Any]:
        """Create a task (server status `pending`); with promote, set it to `created`."""
        task = self.call("POST", "tasks/create", params={"agent_id": self.ensure_pm()},
                         json={"feature_id": feature_id or self.default_feature_id(),
                               "title": title, "description": description,
                               "target_role": target_role, "difficulty": difficulty,
                               "complexity": complexity, "branch": branch})
        self.created.append(task["id"])
        if promote:
            task = self.set_status(task["id"], "created")["task"]
        return task

    def set_status(self, task_id: int, status: str, agent_id: str | None = None,
                   notes: str | None = None) -> dict[str, Any]:
        """PUT /tasks/{id}/status as `agent_id` (default: the seeder's pm); the whole answer."""
        body: dict[str, Any] = {"status": status}
        if notes is not None:
            body["notes"] = notes
        return self.call("PUT", f"tasks/{task_id}/status",
                         params={"agent_id": agent_id or self.ensure_pm()}, json=body)

    def lock(self, task_id: int, agent_id: str) -> dict[str, Any]:
        return self.call("POST", f"tasks/{task_id}/lock", params={"agent_id": agent_id})

    def comment(self, task_id: int, comment: str, agent_id: str | None = None) -> dict[str, Any]:
        return self.call("POST", f"tasks/{task_id}/comment",
                         params={"agent_id": agent_id or self.ensure_pm()},
                         json={"comment": comment})

    def delete_task(self, task_id: int) -> dict[str, Any]:
        return self.call("DELETE", f"tasks/{task_id}", params={"agent_id": self.ensure_pm()})

    def release(self, task_id: int, status: str = "created") -> dict[str, Any]:
        """Drop any lock (there is no unlock endpoint): under_work, then `status`."""
        self.set_status(task_id, "under_work")
        return self.set_status(task_id, status)["task"]

    def drain(self, role: str) -> None:
        """Park every task the server would offer `role` (lock it with a parking agent), so
        a shared server's leftovers cannot come before a test's own tasks."""
        parker = unique_id("parker")
        self.register(parker, role, "principal")
        for _ in range(500):
            task = self.next_task(role, "principal")
            if task is None:
                return
            try:
                self.lock(task["id"], parker)
            except SeedError as err:
                if err.status != 409:
                    raise
        raise RuntimeError(f"could not drain the {role} queue")

    def retire_created(self) -> None:
        """Move every task this seeder made to `committed`, unlocked, so that leftovers never
        reach another test's next-task pick on a shared server. Deleted ones are skipped."""
        for task_id in self.created:
            try:
                self.release(task_id, "committed")
            except SeedError as err:
                if err.status != 404:
                    raise
        self.created.clear()

    # ---- reading ---------------------------------------------------------------------

    def list_tasks(self, status: str | None = None, role: str | None = None) -> list[dict]:
        params = {k: v for k, v in (("status", status), ("role", role)) if v is not None}
        return self.call("GET", "tasks", params=params)

    def get_task(self, task_id: int, status: str | None = None) -> dict[str, Any] | None:
        """Quirk 1: there is no GET /tasks/{id}; list (filtered when the status is known)."""
        return next((t for t in self.list_tasks(status) if t["id"] == task_id), None)

    def next_task(self, role: str, level: str, timeout: int | None = None,
                  simulate: bool = True) -> dict[str, Any] | None:
        params: dict[str, Any] = {"role": role, "level": level,
                                  "simulate": str(simulate).lower()}
        if timeout is not None:
            params["timeout"] = timeout
        return self.call("GET", "tasks/next", params=params,
                         timeout=self.timeout + (timeout or 0))

    def changelog(self, limit: int = 50) -> list[dict]:
        return self.call("GET", "changelog", params={"limit": limit})

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Seeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

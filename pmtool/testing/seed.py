"""Seed a Headless PM server through its real HTTP API, so the same helpers work against the
stand-in and against a real server (tests, the demo, benchmarks).

It talks through pmtool's own PMClient (one client: the same retries and read-backs that
pmtool relies on), and adds what only seeding needs: epics, features, task creation, the
changelog, deletes and raw calls for tests that look at status codes.
"""

from __future__ import annotations

import uuid
from typing import Any

from pmtool.client import PMClient
from pmtool.errors import ApiError


def unique_id(prefix: str = "agent") -> str:
    """A fresh agent id, so runs against a shared real server never collide."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


class Seeder:
    """Creates agents, epics, features and tasks as a registered pm agent of its own.

    Tasks come out `pending` from the server; `create_task(promote=True)` sets them to
    `created` so agents can pick them. A default epic and feature are made on first need.
    A refused call raises pmtool.errors.ApiError (`status`, `detail`).
    """

    def __init__(self, url: str, api_key: str, pm_agent_id: str | None = None,
                 timeout: float = 30.0) -> None:
        self.client = PMClient(url, api_key, timeout=timeout)
        self.url, self.api_key, self.timeout = self.client.url, api_key, timeout
        self.pm_agent_id = pm_agent_id or unique_id("seed_pm")
        self._pm_ready = False
        self.created: list[int] = []  # task ids this seeder made, for retire_created()
        self._feature: dict[str, Any] | None = None

    @staticmethod
    def _path(path: str) -> str:
        return path if path.startswith("/") else "/api/v1/" + path

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One raw call with the key, no retries, the requests.Response as it came:
        `tasks` means /api/v1/tasks; `/health` is taken as is."""
        return self.client.session.request(method, self.url + self._path(path),
                                           timeout=kwargs.pop("timeout", self.timeout),
                                           **kwargs)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like `request`, but answers the decoded JSON; ApiError (or ServerError) unless 2xx."""
        return self.client.request(method, self._path(path), **kwargs)

    # ---- agents ----------------------------------------------------------------------

    def register(self, agent_id: str, role: str, level: str = "senior",
                 connection_type: str = "client") -> dict[str, Any]:
        """POST /register; returns the whole answer ({"agent", "next_task", "mentions"})."""
        return self.client.register(agent_id, role, level, connection_type)

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
        return self.client.set_status(task_id, agent_id or self.ensure_pm(), status, notes)

    def lock(self, task_id: int, agent_id: str) -> dict[str, Any]:
        return self.client.lock(task_id, agent_id)

    def comment(self, task_id: int, comment: str, agent_id: str | None = None) -> dict[str, Any]:
        return self.client.comment(task_id, agent_id or self.ensure_pm(), comment)

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
            except ApiError as err:
                if err.status != 409:
                    raise
        raise RuntimeError(f"could not drain the {role} queue")

    def retire_created(self) -> None:
        """Move every task this seeder made to `committed`, unlocked, so that leftovers never
        reach another test's next-task pick on a shared server. Deleted ones are skipped."""
        for task_id in self.created:
            try:
                self.release(task_id, "committed")
            except ApiError as err:
                if err.status != 404:
                    raise
        self.created.clear()

    # ---- reading ---------------------------------------------------------------------

    def list_tasks(self, status: str | None = None, role: str | None = None) -> list[dict]:
        return self.client.list_tasks(status, role)

    def get_task(self, task_id: int, status: str | None = None) -> dict[str, Any] | None:
        """Quirk 1: there is no GET /tasks/{id}; list (filtered when the status is known)."""
        return self.client.get_task(task_id, status)

    def next_task(self, role: str, level: str, timeout: int | None = None,
                  simulate: bool = True) -> dict[str, Any] | None:
        return self.client.next_task(role, level, simulate=simulate, timeout=timeout)

    def changelog(self, limit: int = 50) -> list[dict]:
        return self.call("GET", "changelog", params={"limit": limit})

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Seeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

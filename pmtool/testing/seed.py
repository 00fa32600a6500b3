"""Seed a Headless PM server through its real HTTP API, so the same helpers work against the
stand-in and against a real server (tests, the demo, benchmarks).

It talks through pmtool's own PMClient (one client: the same retries and read-backs that
pmtool relies on), and adds what only seeding needs: epics, features, task creation, the
changelog, deletes and raw calls for tests that look at status codes.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from pmtool.client import PMClient
from pmtool.errors import ApiError


def unique_id(prefix: str = "agent") -> str:
    """A fresh agent id, so runs against a shared real server never collide."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


RUN_ID_ENV = "PMTOOL_TEST_RUN_ID"
# Every task any Seeder of this process made, as (id, created_at): what a test session
# sweeps into a final state at its end, and nothing else.
MADE: list[tuple[int, str | None]] = []


def _named(name: str) -> str:
    """Epics and features carry the run id when there is one, so a person looking at a
    shared server can tell which test run made them."""
    run_id = os.environ.get(RUN_ID_ENV)
    return f"{name} [{run_id}]" if run_id and run_id not in name else name


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
        # A guest on a shared server: tasks that were there before us, as (id, created_at)
        # (ids alone are reused, quirk 9). None: the server is ours alone (a private
        # stand-in). `drain` never touches these; it calls `on_foreign` (tests: skip).
        self.foreign: set[tuple[int, str | None]] | None = None
        self.on_foreign: Any = None

    @staticmethod
    def _path(path: str) -> str:
        return path if path.startswith("/") else "/api/v1/" + path

    def request(self, method: str, path: str, *, params: dict | None = None,
                json: Any = None, timeout: float | None = None) -> Any:
        """One raw call with the key, no retries, the answer as it came (pmtool.client.
        Response: status_code, headers, text, json()): `tasks` means /api/v1/tasks;
        `/health` is taken as is."""
        return self.client.raw(method, self._path(path), params=params, json=json,
                               timeout=timeout or self.timeout)

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
                         json={"name": _named(name), "description": description})

    def create_feature(self, epic_id: int | None = None, name: str = "Seeded feature",
                       description: str = "Created by pmtool's seeder") -> dict[str, Any]:
        if epic_id is None:
            epic_id = self.create_epic()["id"]
        return self.call("POST", "features", params={"agent_id": self.ensure_pm()},
                         json={"epic_id": epic_id, "name": _named(name),
                               "description": description})

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
        MADE.append((task["id"], task.get("created_at")))
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
        """Retire (to `committed`) every task of ours the server would offer `role`, so
        our own leftovers cannot come before a test's new tasks.

        A guest parks nothing it did not create: when a task that was on the server before
        us (`foreign`) could be offered to `role`, it is left alone and `on_foreign` is
        called with a message (tests skip), else RuntimeError.
        """
        tasks = (self.list_tasks(status="dev_done") if role == "qa" else
                 [t for s in ("created", "approved") for t in self.list_tasks(status=s)
                  if t.get("target_role") == role])
        theirs = [t for t in tasks if not self.ours(t)]
        if theirs:
            ids = ", ".join(str(t["id"]) for t in theirs[:10])
            message = (f"the server has {len(theirs)} task(s) {role} agents could be given "
                       f"that this run did not create ({ids}); a guest does not park them")
            if self.on_foreign:
                self.on_foreign(message)
            raise RuntimeError(message)
        for task in tasks:
            if task.get("locked_by"):
                self.release(task["id"], "committed")
            else:
                self.set_status(task["id"], "committed")

    def ours(self, task: dict[str, Any]) -> bool:
        """True unless the task was on the server before this run (see `foreign`)."""
        return self.foreign is None or (task["id"], task.get("created_at")) not in self.foreign

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

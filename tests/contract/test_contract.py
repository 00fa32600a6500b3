"""The stand-in against the contract, and against a real server when one is given.

One probe sequence of API calls runs against the stand-in (always) and, when
PMTOOL_TEST_PM_URL and PMTOOL_TEST_PM_KEY are set, against that real Headless PM too. Each
call is reduced to what pmtool depends on: the status code, the content type, the JSON
keys and the values that matter (ids only as relations, such as "the same id again").
Both runs must give the expected reductions below, and the same as each other, so the
next drift between the stand-in and the real server fails here, not in production.

On a real server the probe is a guest: its agents, epic, feature and tasks carry a run id,
it touches nothing else, and its tasks end `committed` and unlocked (or deleted).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from pmtool.testing.server import StandInServer

TASK_KEYS = ["branch", "complexity", "created_at", "created_by", "description", "difficulty",
             "epic_id", "feature_id", "id", "locked_at", "locked_by", "notes", "poll_interval",
             "status", "target_role", "task_type", "title", "updated_at"]
AGENT_KEYS = ["agent_id", "connection_type", "id", "last_seen", "level", "role"]
STATUS_ANSWER_KEYS = ["auto_continue", "continuation_prompt", "next_task", "session_momentum",
                      "task", "task_completed", "workflow_status"]
MENTION_KEYS = ["created_at", "created_by", "document_id", "document_title", "id",
                "is_read", "mentioned_agent_id", "task_id", "task_title"]
JSON, TEXT = "application/json", "text/plain"

# name -> (status, content type, keys of the JSON object (None: not compared), values)
EXPECTED: dict[str, tuple[int, str, list[str] | None, dict[str, Any]]] = {
    "health": (200, JSON, None, {"service": "headless-pm-api", "status": "healthy"}),
    "bad key": (401, JSON, ["detail"], {"detail": "Invalid API key"}),
    "development key in production": (401, JSON, ["detail"], {"detail": "Invalid API key"}),
    "register, connection_type null": (200, JSON, ["agent", "mentions", "next_task"],
                                       {"connection_type": "client", "role": "pm",
                                        "agent keys": AGENT_KEYS, "mentions": []}),
    "re-register keeps the role": (200, JSON, ["agent", "mentions", "next_task"],
                                   {"role": "backend_dev", "level": "senior"}),
    "bad role": (422, JSON, ["detail"], {"type": "enum", "loc": ["body", "role"]}),
    "epic": (200, JSON, None, {"name": True}),
    "feature": (200, JSON, None, {"epic_id": True}),
    "create task": (200, JSON, TASK_KEYS, {"status": "pending", "created_by": True,
                                           "locked_by": None, "complexity": "major"}),
    "single-task read": (405, JSON, ["detail"], {"detail": "Method Not Allowed"}),
    "promote": (200, JSON, STATUS_ANSWER_KEYS, {"status": "created"}),
    "lock": (200, JSON, TASK_KEYS, {"locked_by": "dev A", "status": "created"}),
    "lock by another": (409, JSON, ["detail"], {"detail": "already locked"}),
    "lock again by the holder": (409, JSON, ["detail"], {"detail": "already locked"}),
    "lock unknown task": (404, JSON, ["detail"], {"detail": "Task with ID"}),
    "lock by unregistered agent": (404, JSON, ["detail"], {"detail": "Agent '"}),
    "under_work keeps the lock": (200, JSON, STATUS_ANSWER_KEYS,
                                  {"status": "under_work", "locked_by": "dev A"}),
    "dev_done by another releases": (200, JSON, STATUS_ANSWER_KEYS,
                                     {"status": "dev_done", "locked_by": None}),
    "comment with a mention": (200, JSON, ["message"],
                               {"message": "Comment added successfully"}),
    "notes after the comment": (200, JSON, None, {"notes": "ends with the comment"}),
    "mention in the next register": (200, JSON, ["agent", "mentions", "next_task"],
                                     {"mentions": 1, "mention keys": MENTION_KEYS,
                                      "task_id": "task 1", "is_read": False}),
    "mentions list": (200, JSON, None, {"ids": "the register's"}),
    "mention read": (200, JSON, None, {"is_read": True}),
    "delete newest task": (200, JSON, ["message"], {"message": True}),
    "next task gets the deleted id": (200, JSON, TASK_KEYS, {"same id": True}),
    "delete agent holding a lock": (200, JSON, ["message"], {"message": True}),
    "lock freed by the deletion": (200, JSON, TASK_KEYS, {"locked_by": "dev B",
                                                          "status": "created"}),
    "delete agent that created tasks": (500, TEXT, None, {"text": "Internal Server Error"}),
    "creator still there": (200, JSON, None, {"listed": True}),
    "next without role": (400, JSON, ["detail"], {"detail": "Missing required parameter"}),
    "next, simulate": (200, JSON, None, {"answer": "task or null"}),
    "changelog": (200, JSON, None, {"entry keys": ["changed_at", "changed_by", "id",
                                                   "new_status", "notes", "old_status",
                                                   "task_id"]}),
}


class Probe:
    """Calls one server and records each answer's reduction under a name."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url.rstrip("/"), key
        self.run = secrets.token_hex(4)
        self.seen: dict[str, tuple[int, str, list[str] | None, dict[str, Any]]] = {}
        self.tasks: list[int] = []

    def agent(self, name: str) -> str:
        return f"contract_{self.run}_{name.replace(' ', '_')}"

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        # A connection per call: after a 500 the real server may reset the next request
        # on the same connection (quirk 8), which would blur the next probe.
        headers = {"X-API-Key": key or self.key, "Connection": "close"}
        full = path if path.startswith("/") else "/api/v1/" + path
        return requests.request(method, self.url + full, headers=headers, timeout=60,
                                **kwargs)

    def note(self, name: str, resp: Any, values: dict[str, Any],
             keys: bool = True) -> Any:
        ctype = resp.headers.get("content-type", "").split(";")[0]
        body = resp.json() if ctype == JSON else resp.text
        found = sorted(body) if keys and isinstance(body, dict) else None
        self.seen[name] = (resp.status_code, ctype, found, values)
        return body

    def task(self, pm: str, feature_id: int, title: str) -> tuple[Any, dict[str, Any]]:
        resp = self.call("POST", "tasks/create", params={"agent_id": pm},
                         json={"feature_id": feature_id, "title": f"{title} {self.run}",
                               "description": "contract probe", "target_role": "backend_dev",
                               "difficulty": "junior", "branch": f"contract-{self.run}"})
        task = resp.json()
        self.tasks.append(task["id"])
        return resp, task

    def run_all(self) -> None:
        pm, pm2, a, b = (self.agent(n) for n in ("pm", "pm 2", "dev A", "dev B"))
        names = {a: "dev A", b: "dev B"}

        body = self.note("health", requests.get(f"{self.url}/health", timeout=60), {},
                         keys=False)
        self.seen["health"][3].update(service=body["service"], status=body["status"])
        body = self.note("bad key", self.call("GET", "tasks", key="wrong-" + self.run), {})
        self.seen["bad key"][3].update(body)
        body = self.note("development key in production",
                         self.call("GET", "agents", key="development-key"), {})
        self.seen["development key in production"][3].update(body)

        resp = self.call("POST", "register", json={"agent_id": pm, "role": "pm",
                                                   "level": "principal",
                                                   "connection_type": None})
        body = self.note("register, connection_type null", resp, {})
        self.seen["register, connection_type null"][3].update(
            connection_type=body["agent"]["connection_type"], role=body["agent"]["role"],
            mentions=body["mentions"], **{"agent keys": sorted(body["agent"])})
        for agent_id, role in ((pm2, "pm"), (a, "backend_dev"), (b, "backend_dev")):
            self.call("POST", "register", json={"agent_id": agent_id, "role": role,
                                                "level": "senior"}).raise_for_status()
        resp = self.call("POST", "register", json={"agent_id": a, "role": "qa",
                                                   "level": "principal"})
        body = self.note("re-register keeps the role", resp, {})
        self.seen["re-register keeps the role"][3].update(role=body["agent"]["role"],
                                                          level=body["agent"]["level"])
        resp = self.call("POST", "register", json={"agent_id": self.agent("bad"),
                                                   "role": "fullstack_dev", "level": "senior"})
        [err] = self.note("bad role", resp, {})["detail"]
        self.seen["bad role"][3].update(type=err["type"], loc=err["loc"])

        resp = self.call("POST", "epics", params={"agent_id": pm},
                         json={"name": f"contract {self.run}", "description": "probe"})
        epic = self.note("epic", resp, {}, keys=False)
        self.seen["epic"][3]["name"] = epic["name"] == f"contract {self.run}"
        resp = self.call("POST", "features", params={"agent_id": pm},
                         json={"epic_id": epic["id"], "name": f"contract {self.run}",
                               "description": "probe"})
        feature = self.note("feature", resp, {}, keys=False)
        self.seen["feature"][3]["epic_id"] = feature["epic_id"] == epic["id"]

        resp, t1 = self.task(pm, feature["id"], "one")
        self.note("create task", resp, {"status": t1["status"],
                                        "created_by": t1["created_by"] == pm,
                                        "locked_by": t1["locked_by"],
                                        "complexity": t1["complexity"]})
        resp = self.call("GET", f"tasks/{t1['id']}")
        self.note("single-task read", resp, {"detail": resp.json()["detail"]})
        resp = self.call("PUT", f"tasks/{t1['id']}/status", params={"agent_id": pm},
                         json={"status": "created"})
        self.note("promote", resp, {"status": resp.json()["task"]["status"]})
        _, t2 = self.task(pm, feature["id"], "two")
        self.call("PUT", f"tasks/{t2['id']}/status", params={"agent_id": pm},
                  json={"status": "created"}).raise_for_status()

        def lock(name: str, task_id: int, agent_id: str) -> None:
            resp = self.call("POST", f"tasks/{task_id}/lock", params={"agent_id": agent_id})
            body = self.note(name, resp, {})
            if resp.status_code == 200:
                self.seen[name][3].update(locked_by=names.get(body["locked_by"]),
                                          status=body["status"])
            else:
                detail = body["detail"]
                for marker in ("already locked", "Task with ID", "Agent '"):
                    if marker in detail:
                        self.seen[name][3]["detail"] = marker

        lock("lock", t1["id"], a)
        lock("lock by another", t1["id"], b)
        lock("lock again by the holder", t1["id"], a)
        lock("lock unknown task", 2_000_000_000, a)
        lock("lock by unregistered agent", t2["id"], self.agent("ghost"))

        for name, who, status in (("under_work keeps the lock", a, "under_work"),
                                  ("dev_done by another releases", b, "dev_done")):
            resp = self.call("PUT", f"tasks/{t1['id']}/status", params={"agent_id": who},
                             json={"status": status})
            task = resp.json()["task"]
            self.note(name, resp, {"status": task["status"],
                                   "locked_by": names.get(task["locked_by"])})

        comment = f"@{b} please look"
        resp = self.call("POST", f"tasks/{t1['id']}/comment", params={"agent_id": pm},
                         json={"comment": comment})
        self.note("comment with a mention", resp, {"message": resp.json()["message"]})
        notes = next(t for t in self.call("GET", "tasks").json() if t["id"] == t1["id"])["notes"]
        self.note("notes after the comment", self.call("GET", "tasks"),
                  {"notes": "ends with the comment" if notes.endswith(f"{pm}: {comment}")
                   else notes})
        resp = self.call("POST", "register", json={"agent_id": b, "role": "backend_dev",
                                                   "level": "senior"})
        mentions = self.note("mention in the next register", resp, {})["mentions"]
        ours = [m for m in mentions if m["task_id"] == t1["id"]]
        self.seen["mention in the next register"][3].update(
            {"mentions": len(ours), "mention keys": sorted(ours[0]) if ours else None,
             "task_id": "task 1" if ours else None,
             "is_read": ours[0]["is_read"] if ours else None})
        resp = self.call("GET", "mentions", params={"agent_id": b})
        listed = [m["id"] for m in self.note("mentions list", resp, {}, keys=False)]
        self.seen["mentions list"][3]["ids"] = ("the register's" if ours and ours[0]["id"]
                                                in listed else listed)
        if ours:
            resp = self.call("PUT", f"mentions/{ours[0]['id']}/read", params={"agent_id": b})
            self.note("mention read", resp, {"is_read": resp.json().get("is_read")},
                      keys=False)

        _, t3 = self.task(pm, feature["id"], "three (deleted)")
        resp = self.call("DELETE", f"tasks/{t3['id']}", params={"agent_id": pm})
        self.note("delete newest task", resp, {"message": "deleted" in resp.json()["message"]})
        self.tasks.remove(t3["id"])
        resp, t4 = self.task(pm, feature["id"], "four")
        self.note("next task gets the deleted id", resp, {"same id": t4["id"] == t3["id"]})

        self.call("POST", f"tasks/{t2['id']}/lock", params={"agent_id": a}).raise_for_status()
        resp = self.call("DELETE", f"agents/{a}", params={"requester_agent_id": pm})
        self.note("delete agent holding a lock", resp,
                  {"message": "deleted" in resp.json()["message"]})
        lock("lock freed by the deletion", t2["id"], b)

        resp = self.call("DELETE", f"agents/{pm}", params={"requester_agent_id": pm2})
        self.note("delete agent that created tasks", resp, {"text": resp.text})
        resp = self.call("GET", "agents")
        self.note("creator still there", resp,
                  {"listed": pm in [x["agent_id"] for x in resp.json()]}, keys=False)

        resp = self.call("GET", "tasks/next", params={"level": "senior", "simulate": "true"})
        detail = self.note("next without role", resp, {})["detail"]
        self.seen["next without role"][3]["detail"] = (
            "Missing required parameter" if "Missing required parameter" in detail else detail)
        resp = self.call("GET", "tasks/next", params={"role": "backend_dev", "level": "junior",
                                                      "simulate": "true"})
        answer = self.note("next, simulate", resp, {}, keys=False)
        self.seen["next, simulate"][3]["answer"] = (
            "task or null" if answer is None or "id" in answer else answer)
        resp = self.call("GET", "changelog", params={"limit": 2})
        entries = self.note("changelog", resp, {}, keys=False)
        self.seen["changelog"][3]["entry keys"] = sorted(entries[0]) if entries else None

    def clean_up(self) -> None:
        """Leave our tasks committed and unlocked, so no other client's pick meets them."""
        pm = self.agent("pm 2")  # never deleted, unlike the first pm might be
        for task_id in self.tasks:
            for status in ("under_work", "committed"):
                self.call("PUT", f"tasks/{task_id}/status", params={"agent_id": pm},
                          json={"status": status})


def _probe(url: str, key: str) -> Probe:
    probe = Probe(url, key)
    try:
        probe.run_all()
    finally:
        probe.clean_up()
    return probe


@pytest.fixture(scope="module")
def standin_probe() -> Iterator[Probe]:
    # At its defaults, as conftest starts it: production mode, race window on.
    with StandInServer(api_key=f"contract-{secrets.token_hex(8)}") as server:
        yield _probe(server.url, server.api_key)


def _diff(seen: dict, expected: dict) -> list[str]:
    problems = []
    for name, want in expected.items():
        got = seen.get(name)
        if got is None:
            problems.append(f"{name}: not probed")
        elif got != want:
            problems.append(f"{name}: got {got}, expected {want}")
    return problems


def test_standin_answers_as_the_contract_says(standin_probe):
    assert _diff(standin_probe.seen, EXPECTED) == []


@pytest.mark.skipif(not (os.environ.get("PMTOOL_TEST_PM_URL")
                         and os.environ.get("PMTOOL_TEST_PM_KEY")),
                    reason="set PMTOOL_TEST_PM_URL and PMTOOL_TEST_PM_KEY to probe a real server")
def test_real_server_answers_as_the_standin(standin_probe):
    real = _probe(os.environ["PMTOOL_TEST_PM_URL"], os.environ["PMTOOL_TEST_PM_KEY"])
    assert _diff(real.seen, EXPECTED) == []
    assert _diff(real.seen, standin_probe.seen) == []

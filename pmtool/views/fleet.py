"""The fleet as the server sees it (`pmtool fleet`): every agent, every task in flight,
the stale agents whose locks the server will drop, parked tasks and the queue per role.

Any machine with the key can ask; nothing here reads a state folder. Which agents are
pmtool's is read from what pmtool writes into the tasks' notes: a claim appends
`claimed by <agent> on <host> (pid <n>) at <time>` (pmtool.work.claim), and those notes travel
with the task through every later status change. An agent no listed task names may still
be pmtool's (idle since its tasks were committed): `pmtool` is then false, i.e. not known.

A fixed number of filtered requests, however long the history: GET /health (the server's
clock: `last_seen` is its time, and machines drift), GET /agents, and GET /tasks for the
statuses that matter now (under_work, pending, created, dev_done); finished tasks
(qa_done and on) are never listed.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as fl
from pmtool.errors import ApiError, ServerError
from pmtool.results import Result
from pmtool.state import parse_time
from pmtool.work.recover import SERVER_LOCK_AGE

if TYPE_CHECKING:
    from pmtool.client import PMApi

ROLES = ("backend_dev", "frontend_dev", "architect", "pm", "qa")
LEVELS = ("junior", "senior", "principal")
CLAIM_NOTE = re.compile(r"claimed by (\S+) on (\S+) \(pid (\d+)\) at (\S+)")
PARK_CAUSE = re.compile(re.escape(fl.PARKED_MARK) + r" \(([\w-]+)\):\s*(.*?)"
                        r"(?: -- set the task back.*)?$", re.S)
STATUSES = ("under_work", "pending", "created", "dev_done")


def _age(when: Any, now: datetime) -> float | None:
    moment = parse_time(when)
    return round((now - moment).total_seconds(), 1) if moment else None


def claims_in(notes: str | None) -> list[dict[str, Any]]:
    """pmtool's claim notes in a task's notes, oldest first."""
    return [{"agent_id": m[1], "host": m[2], "pid": int(m[3]), "at": m[4]}
            for m in CLAIM_NOTE.finditer(notes or "")]


def _parked(task: dict[str, Any]) -> dict[str, Any] | None:
    notes = task.get("notes") or ""
    at = notes.rfind(fl.PARKED_MARK)
    if at < 0:
        return None
    match = PARK_CAUSE.match(notes[at:].strip())
    cause, reason = (match[1], match[2].strip()) if match else (None, notes[at:].strip())
    return {"task_id": task.get("id"), "title": task.get("title"),
            "target_role": task.get("target_role"), "difficulty": task.get("difficulty"),
            "cause": cause, "reason": reason, "since": task.get("updated_at")}


def _queue(created: list[dict[str, Any]], dev_done: list[dict[str, Any]]
           ) -> dict[str, dict[str, Any]]:
    """Tasks waiting per role (unlocked): a developer role's `created` tasks by difficulty;
    QA's are every `dev_done` task (the server's pick, contract "How the server picks")."""
    out: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        tasks = dev_done if role == "qa" else [t for t in created
                                                if t.get("target_role") == role]
        waiting = [t for t in tasks if not t.get("locked_by")]
        by_level = {lv: sum(1 for t in waiting if t.get("difficulty") == lv) for lv in LEVELS}
        oldest = min((str(t.get("created_at")) for t in waiting), default=None)
        out[role] = {"waiting": len(waiting), "by_difficulty": by_level, "oldest": oldest}
    return out


@dataclass
class FleetPicture(Result):
    """`pmtool fleet`: the server's agents and the tasks in flight, stale and unlocked,
    parked for a person, and waiting per role; `counts` sums them up."""

    time: str
    agents: list[dict[str, Any]]
    in_flight: list[dict[str, Any]]
    stale: list[dict[str, Any]]
    unlocked: list[dict[str, Any]]
    parked: list[dict[str, Any]]
    queue: dict[str, dict[str, Any]]
    counts: dict[str, int]


def fleet(client: PMApi, now: datetime | None = None,
          stale_after: float = SERVER_LOCK_AGE) -> FleetPicture:
    """One picture of the fleet from the server (see the module's docstring)."""
    if now is None:
        with contextlib.suppress(ApiError, ServerError):
            now = parse_time(client.health().get("timestamp"))
    now = now or datetime.now(UTC)
    agents = client.agents()
    tasks = {status: client.list_tasks(status=status) for status in STATUSES}
    seen_by: dict[str, dict[str, Any]] = {}  # agent -> its newest claim note
    for status in STATUSES:
        for task in tasks[status]:
            for note in claims_in(task.get("notes")):
                if str(note["at"]) >= str(seen_by.get(note["agent_id"], {}).get("at", "")):
                    seen_by[note["agent_id"]] = note
    holding: dict[str, dict[str, Any]] = {}
    in_flight = []
    for task in tasks["under_work"]:
        holder = task.get("locked_by")
        claim: dict[str, Any] | None = next(
            (c for c in reversed(claims_in(task.get("notes"))) if c["agent_id"] == holder),
            None)
        started = (claim or {}).get("at") or task.get("locked_at") or task.get("updated_at")
        row = {"task_id": task.get("id"), "title": task.get("title"),
               "target_role": task.get("target_role"), "difficulty": task.get("difficulty"),
               "locked_by": holder, "host": (claim or {}).get("host"),
               "since": started, "running_s": _age(started, now)}
        in_flight.append(row)
        if holder:
            holding[holder] = row
    rows, stale = [], []
    for agent in sorted(agents, key=lambda a: str(a.get("agent_id"))):
        agent_id = str(agent.get("agent_id"))
        unseen = _age(agent.get("last_seen"), now)
        held = holding.get(agent_id)
        claim = seen_by.get(agent_id)
        row = {"agent_id": agent_id, "role": agent.get("role"), "level": agent.get("level"),
               "pmtool": claim is not None, "host": (claim or {}).get("host"),
               "pid": (claim or {}).get("pid"), "last_seen": agent.get("last_seen"),
               "unseen_s": unseen, "task_id": (held or {}).get("task_id"),
               "title": (held or {}).get("title"), "task_s": (held or {}).get("running_s"),
               "stale": unseen is not None and unseen > stale_after,
               # The server drops the agent's locks at the next pick once it is unseen for
               # 30 minutes (quirk 3); negative: already due.
               "lock_expires_in_s": round(stale_after - unseen, 1)
               if held and unseen is not None else None}
        rows.append(row)
        if row["stale"] and held:
            stale.append({"agent_id": agent_id, "task_id": held["task_id"],
                          "unseen_s": unseen, "host": row["host"]})
    # Under work with nobody's lock: the server dropped it, or a claim died between.
    unlocked = [t for t in in_flight if not t["locked_by"]]
    parked = [p for p in map(_parked, tasks["pending"]) if p]
    queue = _queue(tasks["created"], tasks["dev_done"])
    return FleetPicture(
        time=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        agents=rows, in_flight=in_flight,
        stale=stale, unlocked=unlocked, parked=parked,
        queue=queue,
        counts={"agents": len(rows), "pmtool_agents": sum(1 for r in rows if r["pmtool"]),
                "working": len(in_flight), "stale": len(stale), "parked": len(parked),
                "waiting": sum(q["waiting"] for q in queue.values())},
    )

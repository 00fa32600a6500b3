"""The bounds of work on one machine, applied where a claim starts and ends.

`pmtool.failure_policy` decides (pure functions); this module reads and writes what those
decisions need: the machine's attempt lines in the state folder's history, and the
server calls that park a task. `pmtool.work.claim`'s claim, release and finish call it, so a
bash pipeline of `pmtool claim` / `pmtool release` / `pmtool finish` is bounded exactly
like `pmtool run`.

Parking: the task goes to `pending` (the server never offers a pending task, and only a
person sets it back to `created`), the reason and the task's attempts go into its notes,
the reason also as a comment, and a `park` line into the history. A person who sets the
task back to `created` gives it fresh attempts.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as f
from pmtool.errors import ApiError, PmtoolError
from pmtool.state import StateDir

if TYPE_CHECKING:
    from pmtool.client import PMApi

PENDING = "pending"
CHANGELOG_LIMIT = 500


def parked_tasks(client: PMApi) -> list[dict[str, Any]]:
    """The server's tasks parked by pmtool (pending, with a park comment): id, title, why."""
    out = []
    for task in client.list_tasks(status=PENDING):
        notes = task.get("notes") or ""
        if f.PARKED_MARK not in notes:
            continue
        tail = notes.rsplit(f.PARKED_MARK, 1)[-1]
        reason = tail.split(" -- set the task back", 1)[0].strip(" :")
        out.append({"id": task.get("id"), "title": task.get("title"),
                    "target_role": task.get("target_role"), "reason": reason})
    return out


_CACHE: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]] = {}


class Ledger:
    """The attempt and park lines of this machine, in the state folder's history (shared
    by every runner and every pmtool command on the machine, kept across restarts)."""

    def __init__(self, state: StateDir | str | Path) -> None:
        self.state = state if isinstance(state, StateDir) else StateDir(state)

    def lines(self) -> list[dict[str, Any]]:
        # An idle runner screens the same cooling task every poll: read the history (which
        # holds whole closed records too) only when it changed.
        path = self.state.history_path
        try:
            stat = path.stat()
            stamp: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = None
        cached = _CACHE.get(str(path))
        if stamp is not None and cached is not None and cached[0] == stamp:
            return list(cached[1])
        lines = [h for h in self.state.history() if h.get("kind") in (f.ATTEMPT, f.PARK)]
        if stamp is not None:
            _CACHE[str(path)] = (stamp, lines)
        return list(lines)

    def add(self, entry: dict[str, Any]) -> None:
        self.state.append_history(entry)


@dataclass
class Screen:
    """One claim round's view of the candidates: what it let cool and what it parked."""

    limits: f.Limits
    role: str
    agent_id: str
    history: list[dict[str, Any]]
    changelog: list[dict[str, Any]] | None = None
    cooling: dict[int, str] = field(default_factory=dict)
    parked: list[dict[str, Any]] = field(default_factory=list)


def new_screen(ledger: Ledger, limits: f.Limits, role: str, agent_id: str) -> Screen:
    """A claim round's screen; the history is read once per round."""
    return Screen(limits, role, agent_id, ledger.lines())


def changelog(client: PMApi) -> list[dict[str, Any]]:
    """The server's recent status changes; [] when it cannot be had (the notes still count
    QA fails: never fail a claim or a finish on this)."""
    try:
        answer = client.changelog(limit=CHANGELOG_LIMIT)
    except PmtoolError:
        return []
    return answer if isinstance(answer, list) else []


def _changelog(client: PMApi, screen: Screen) -> list[dict[str, Any]]:
    """The changelog, once per claim round, only when a candidate needs it."""
    if screen.changelog is None:
        screen.changelog = changelog(client)
    return screen.changelog


def screen_task(client: PMApi, ledger: Ledger, screen: Screen,
                task: Mapping[str, Any]) -> str:
    """"claim", "cool" or "park" for this candidate; an exhausted one is parked here."""
    changelog: list[dict[str, Any]] = []
    if screen.role != "qa" and screen.limits.max_bounces and task.get("status") == "created":
        changelog = _changelog(client, screen)
    decision = f.decide(task, screen.history, screen.limits, changelog, screen.role)
    if decision.action == "cool":
        assert decision.until is not None
        screen.cooling[int(task["id"])] = f.iso(decision.until)
    elif decision.action == "park":
        rows = f.attempts_of(screen.history, task)
        reason = decision.reason or "parked"
        cause = ("max_bounces" if reason.startswith("QA failed") else
                 "task_budget" if reason.startswith("task budget") else "max_attempts")
        answer = park(client, ledger, screen.agent_id, task, reason, rows, cause=cause)
        screen.history.append(answer["line"])
        screen.parked.append({"task_id": task["id"], "reason": decision.reason,
                              "status": answer.get("status")})
    return decision.action


def _append(notes: str | None, extra: str) -> str:
    old = notes or ""
    return f"{old.rstrip()}\n\n{extra}" if old.strip() else extra


def park_comment(cause: str, reason: str) -> str:
    """The comment of a park; it starts with PARKED_MARK (QA fails before it are settled)."""
    return (f"{f.PARKED_MARK} ({cause}): {reason} -- set the task back to created when it "
            "can be worked again")


def attempts_note(attempts: list[Mapping[str, Any]]) -> str:
    return (f"attempts on {socket.gethostname()}:\n" + f.history_note(attempts)
            if attempts else "")


def park(client: PMApi, ledger: Ledger, agent_id: str, task: Mapping[str, Any], reason: str,
         attempts: list[Mapping[str, Any]] | None = None,
         cause: str = "parked") -> dict[str, Any]:
    """Park a task nobody holds (a candidate of a claim, found exhausted): status
    `pending`, the attempts in its notes, the reason as a comment, a park line in the
    history. A task another agent has locked is left alone (`parked` False). For the
    agent's own task, `pmtool.work.claim.park` does the same with its record."""
    holder = task.get("locked_by")
    line = f.park_line(task, agent_id, reason, cause=cause)
    if holder and holder != agent_id:
        return {"status": task.get("status"), "line": line, "parked": False,
                "reason": f"locked by {holder}"}
    notes = task.get("notes")
    if attempts:
        notes = _append(notes, attempts_note(list(attempts)))
    answer = client.set_status(task["id"], agent_id, PENDING, notes=notes or None)
    ledger.add(line)
    # After the status change: a status update's notes would overwrite the comment.
    with contextlib.suppress(ApiError):
        client.comment(task["id"], agent_id, park_comment(cause, reason))
    new = (answer or {}).get("task") or {**task, "status": PENDING}
    return {"status": PENDING, "line": line, "parked": True, "task": new}


def account(ledger: Ledger, task: Mapping[str, Any], agent_id: str, *, outcome: str,
            kind: str, cost_usd: float, reason: str | None,
            claimed_at: str | None = None) -> dict[str, Any]:
    """Write the attempt line of a claim that ends; answer it."""
    line = f.attempt_line(task, agent_id, outcome=outcome, kind=kind, cost_usd=cost_usd,
                          reason=reason, host=socket.gethostname(), claimed_at=claimed_at)
    ledger.add(line)
    return line


def attempt_summary(line: Mapping[str, Any], attempts: list[Mapping[str, Any]],
                    limits: f.Limits) -> str:
    """The words for the task's notes about this claim's end: attempt n of max, kind, cost."""
    n = len(f.counted(attempts))
    return (f"attempt {n}/{limits.max_attempts} ({line.get('stop')}, "
            f"${float(line.get('cost_usd') or 0):.4f}; "
            f"${f.task_cost(attempts):.4f} over all claims)")

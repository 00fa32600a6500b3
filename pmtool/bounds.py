"""The bounds of work on one machine, applied where a claim starts and ends.

`pmtool.failures` decides (pure functions); this module reads and writes what those
decisions need: the machine's attempt lines in the state folder's history, and the
server calls that park a task. `pmtool.work`'s claim, release and finish call it, so a
bash pipeline of `pmtool claim` / `pmtool release` / `pmtool finish` is bounded exactly
like `pmtool run`.

Parking: the task goes to `pending` (the server never offers a pending task, and only a
person sets it back to `created`), the reason and the task's attempts go into its notes,
the reason also as a comment, and a `park` line into the history. A person who sets the
task back to `created` gives it fresh attempts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pmtool import failures as f
from pmtool.errors import ApiError, PmtoolError

PENDING = "pending"
CHANGELOG_LIMIT = 500


class Ledger:
    """The attempt and park lines of this machine (in `<state>/history.jsonl`, shared by
    every runner and every pmtool command on the machine, kept across restarts)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir).expanduser() / "history.jsonl"

    def lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            fh = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except FileNotFoundError:
            return out
        with fh:
            for line in fh:
                if '"attempt"' not in line and '"park"' not in line:
                    continue  # closed records are big; attempt lines are what we need
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue  # a torn line from a crash: skip it, keep the rest
                if isinstance(obj, dict) and obj.get("kind") in (f.ATTEMPT, f.PARK):
                    out.append(obj)
        return out

    def add(self, entry: dict[str, Any]) -> None:
        """One line in a single write() (O_APPEND), fsynced: writers never interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(entry, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


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
    return Screen(limits, role, agent_id, ledger.lines())


def changelog(client: Any) -> list[dict[str, Any]]:
    """The server's recent status changes; [] when it cannot be had (the notes still count
    QA fails: never fail a claim or a finish on this)."""
    try:
        answer = client.changelog(limit=CHANGELOG_LIMIT)
    except (PmtoolError, AttributeError):
        return []
    return answer if isinstance(answer, list) else []


def _changelog(client: Any, screen: Screen) -> list[dict[str, Any]]:
    """The changelog, once per claim round, only when a candidate needs it."""
    if screen.changelog is None:
        screen.changelog = changelog(client)
    return screen.changelog


def screen_task(client: Any, ledger: Ledger, screen: Screen,
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
        answer = park(client, ledger, screen.agent_id, task, decision.reason or "parked",
                      rows)
        screen.history.append(answer["line"])
        screen.parked.append({"task_id": task["id"], "reason": decision.reason,
                              "status": answer.get("status")})
    return decision.action


def _append(notes: str | None, extra: str) -> str:
    old = notes or ""
    return f"{old.rstrip()}\n\n{extra}" if old.strip() else extra


def park_note(agent_id: str, reason: str,
              attempts: list[Mapping[str, Any]] | None = None) -> str:
    text = f"{f.PARKED_MARK} by {agent_id} on {socket.gethostname()}: {reason}. A person " \
           "sets the task back to created to have it worked again."
    if attempts:
        text += "\nattempts on this machine:\n" + f.history_note(attempts)
    return text


def park(client: Any, ledger: Ledger, agent_id: str, task: Mapping[str, Any], reason: str,
         attempts: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Park the task for a person: status `pending` with the reason in notes and as a
    comment, and a park line in the history. Our own lock goes with the status change;
    a task under work by another agent is not touched (`status` is then unchanged)."""
    holder = task.get("locked_by")
    line = f.park_line(task, agent_id, reason)
    status = task.get("status")
    if holder and holder != agent_id:
        return {"status": status, "line": line, "parked": False,
                "reason": f"locked by {holder}"}
    notes = _append(task.get("notes"), park_note(agent_id, reason, list(attempts or [])))
    if holder == agent_id and status != "under_work":
        # A lock is only dropped by a move out of under_work (contract).
        client.set_status(task["id"], agent_id, "under_work", notes=notes)
    answer = client.set_status(task["id"], agent_id, PENDING, notes=notes)
    ledger.add(line)
    # After the status change: a status update's notes would overwrite the comment.
    with contextlib.suppress(ApiError):
        client.comment(task["id"], agent_id, f"parked: {reason}")
    new = (answer or {}).get("task") or {**task, "status": PENDING}
    return {"status": PENDING, "line": line, "parked": True, "task": new, "notes": notes}


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


def now() -> datetime:
    return datetime.now(UTC)

"""The operator's views of the state folder: what runs now (`status`), a task's story
(`logs`), what it cost (`report`).

Everything here reads and nothing writes: no lock is taken (a runner's lock is only looked
at), no file is made or removed. Nothing prints either: the CLI (pmtool.cli.ops) draws the
tables and `report_html` gives the page as text.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pmtool.errors import UsageError
from pmtool.records import RecordStore, TaskRecord, pid_alive, safe_name
from pmtool.results import Result
from pmtool.state import StateDir, parse_time

BY_KEYS = ("task", "agent", "model", "day", "outcome")

# The step a runner is in, from its last event (the loop's event kinds).
EVENT_STEP = {
    "health": "polling", "idle": "polling", "recovered": "polling",
    "claimed": "claiming", "resumed": "claiming", "worktree": "agent", "heartbeat": "agent",
    "lock_retaken": "agent",
    "agent": "finishing", "finished": "finishing", "stopped": "stopped",
}
# ... and from the last step noted in its task record (newer than the last event, or the
# only thing there is when events are not logged).
RECORD_STEP = {
    "claiming": "claiming", "locked": "claiming", "under_work": "claiming",
    "claimed": "claiming", "resumed": "claiming", "recovered": "claiming",
    "worktree": "agent", "agent_starting": "agent", "agent_running": "agent",
    "agent_finished": "finishing", "agent-done": "finishing", "finishing": "finishing",
}


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(since: Any, now: datetime) -> float | None:
    when = parse_time(since)
    return round((now - when).total_seconds(), 1) if when else None


# -- status ------------------------------------------------------------------------------


def _locked_inodes() -> set[int] | None:
    """Inodes with a lock on them (Linux /proc/locks); None where it cannot be read."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    inodes = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK":
            inodes.add(int(parts[5].rsplit(":", 1)[-1]))
    return inodes


def _runner_pid(lock: Path, locked: set[int] | None) -> tuple[int | None, bool]:
    """The pid in a runner lock file, and whether that runner lives. Only looked at, never
    locked: taking the flock even briefly could turn a starting runner away."""
    try:
        text, inode = lock.read_text().strip(), lock.stat().st_ino
    except OSError:
        return None, False
    pid = int(text) if text.isdigit() else None
    # This very process (a runner serving its own /metrics) lives: no need to ask.
    live = bool(pid and (pid == os.getpid() or pid_alive(pid))) and \
        (locked is None or inode in locked)
    return pid, live


def step_of(event: dict[str, Any] | None) -> str | None:
    if not event:
        return None
    kind = event.get("event")
    if event.get("cooling_down") or event.get("cooldown_until") or kind in ("cooldown",
                                                                              "cooling_down"):
        return "cooling down"
    if kind == "error" and event.get("retry_in_s") is not None:
        return "waiting for the server"
    if kind == "hook":
        return "pre_task" if event.get("hook") == "pre_task" else "finishing"
    return EVENT_STEP.get(str(kind))


def _runner_row(agent_id: str, record: TaskRecord | None, events: list[dict[str, Any]],
                pid: int | None, live: bool, now: datetime) -> dict[str, Any]:
    last = events[-1] if events else None
    step, step_at = step_of(last), (last or {}).get("time")
    if record and record.steps:
        noted = record.steps[-1]
        when = noted.get("at")
        newer = not step_at or (when and str(when) > str(step_at))
        if newer and noted.get("step") in RECORD_STEP:
            step, step_at = RECORD_STEP[noted["step"]], when
    if record is None and step in ("claiming", "agent", "finishing", "pre_task"):
        step = "polling"  # the task's record is closed: the runner moved on
    if not live:
        step = "stopped" if last and last.get("event") == "stopped" else "dead"
    task = record.task if record else {}
    return {
        "agent_id": agent_id, "role": record.role if record else None,
        "level": record.level if record else None, "pid": pid, "live": live,
        "task_id": record.task_id if record else None, "title": task.get("title"),
        "step": step, "task_s": _seconds(record.claimed_at, now) if record else None,
        "step_s": _seconds(step_at, now), "cost_usd": round(record.cost_usd, 6) if record else 0.0,
        "attempts": record.attempts if record else 0,
        "last_event": {k: last.get(k) for k in ("event", "time", "task_id", "outcome")
                       if last.get(k) is not None} if last else None,
    }


def _task_of(entry: dict[str, Any]) -> str:
    return str(entry.get("task_id") or (entry.get("task") or {}).get("id"))


def parked_tasks(state: StateDir) -> list[dict[str, Any]]:
    """Tasks this machine parked for a person (a record closed as `parked`, see
    pmtool.work.claim.park) that no later history line shows worked again."""
    open_: dict[str, dict[str, Any]] = {}
    for entry in state.history():
        note_parked(open_, entry)
    return list(open_.values())


def note_parked(open_: dict[str, dict[str, Any]], entry: dict[str, Any]) -> None:
    """One history line's part in `parked_tasks` (pmtool.views.metrics folds them one by one)."""
    task_id = _task_of(entry)
    if entry.get("kind") == "parked" or entry.get("outcome") == "parked":
        closing = (entry.get("steps") or [{}])[-1]
        task = entry.get("task") or {}
        open_[task_id] = {
            "task_id": entry.get("task_id", task.get("id")), "title": task.get("title"),
            "agent_id": entry.get("agent_id"), "at": entry.get("closed_at") or entry.get("at"),
            "cause": entry.get("cause") or closing.get("cause"),
            "reason": entry.get("reason") or closing.get("reason")}
    elif entry.get("kind") in ("closed", "unparked"):
        open_.pop(task_id, None)


def cooling_tasks(state: StateDir, now: datetime) -> list[dict[str, Any]]:
    """History lines of kind `cooldown` whose `until` is still ahead."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in state.history():
        if entry.get("kind") == "cooldown":
            latest[_task_of(entry)] = entry
        elif entry.get("kind") == "closed":
            latest.pop(_task_of(entry), None)
    return [e for e in latest.values() if (parse_time(e.get("until")) or now) > now]


def runner_rows(state: StateDir, now: datetime,
                events_of: Callable[[str], list[dict[str, Any]]],
                agents_only: set[str] | None = None,
                scanned: tuple[list[TaskRecord], list[Any]] | None = None
                ) -> tuple[list[dict[str, Any]], list[Any]]:
    """The `runners` rows of `status` (and the corrupt records seen), each runner's events
    from `events_of(agent_id)`: status reads the logs, pmtool.views.metrics passes the last
    event it folded. `agents_only`: just these agents (a process's own); `scanned`: the
    records and corrupt ones, when the caller read them already."""
    store = RecordStore(state.root)
    # A view: moves nothing.
    records, corrupt = scanned if scanned is not None else store.scan(quarantine=False)
    by_agent = {r.agent_id: r for r in records}
    locked = _locked_inodes()
    agents: dict[str, tuple[int | None, bool]] = {}
    if state.runners_dir.is_dir():
        for lock in sorted(state.runners_dir.glob("*.lock")):
            agents[lock.stem] = _runner_pid(lock, locked)
    rows = []
    for agent_id in sorted(set(agents) - {safe_name(a) for a in by_agent} | set(by_agent)):
        if agents_only is not None and agent_id not in agents_only:
            continue
        record = by_agent.get(agent_id)
        pid, live = agents.get(safe_name(agent_id), (None, False))
        if record and not live and record.pid and store.is_live(record):
            pid, live = record.pid, True  # a `claim` without `run`: its record names it
        events = events_of(agent_id)
        if not live and record is None and not events:
            # A runner that ran here once: nothing to resume or recover, nothing said for
            # two days. Its lock file stays: unlinking a file a starting runner may have
            # just opened would let two runners of one agent lock two different files.
            continue
        rows.append(_runner_row(agent_id, record, events, pid, live, now))
    return rows, corrupt


@dataclass
class MachineStatus(Result):
    """`pmtool status`: the runners of this machine (one row each, as `runner_rows` makes
    them), the parked and cooling tasks, the corrupt records set aside, the state's size."""

    runners: list[dict[str, Any]]
    live: int
    parked: list[dict[str, Any]]
    cooling_down: list[dict[str, Any]]
    corrupt_records: list[str]
    usage: dict[str, int]
    state_dir: str
    time: str


def status(state_root: str | Path, now: datetime | None = None,
           agents_only: set[str] | None = None) -> MachineStatus:
    """Every runner on this machine (live or dead), parked and cooling tasks, state sizes."""
    now = now or _now()
    state = StateDir(state_root)
    rows, corrupt = runner_rows(
        state, now, lambda agent_id: state.events(agent_id=agent_id,
                                                  since=now - timedelta(days=2)),
        agents_only)
    return MachineStatus(
        runners=rows,
        live=sum(1 for r in rows if r["live"]),
        parked=parked_tasks(state),
        cooling_down=cooling_tasks(state, now),
        corrupt_records=[str(c.moved_to) for c in corrupt],
        usage=state.usage(),
        state_dir=str(state.root),
        time=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


# -- logs --------------------------------------------------------------------------------


def _jsonl_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of `path` from byte `offset`; a half-written last line waits."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out, offset + end


class TaskLog:
    """A task's story on this machine: pmtool's events with each agent run's transcript
    placed before the `agent` event that ended it; read again for what is new."""

    def __init__(self, state_root: str | Path, task_id: int) -> None:
        self.state = StateDir(state_root)
        self.task_id = task_id
        self.seen_events = 0
        self.offsets: dict[Path, int] = {}

    def _transcript(self, path: Path) -> list[dict[str, Any]]:
        path = path.resolve()  # the same file named by an event and by a listing
        lines, self.offsets[path] = _jsonl_from(path, self.offsets.get(path, 0))
        return [{"source": "claude", "log": path.name, "line": line} for line in lines]

    def read(self) -> list[dict[str, Any]]:
        """What was written since the last call (everything, the first time)."""
        out: list[dict[str, Any]] = []
        events = self.state.events(task_id=self.task_id)
        for event in events[self.seen_events:]:
            log = event.get("log") if event.get("event") == "agent" else None
            if log:
                out += self._transcript(Path(log))
            out.append({"source": "pmtool", "line": event})
        self.seen_events = len(events)
        for path in self.state.transcripts(self.task_id):
            out += self._transcript(path)
        return out

    def running(self) -> bool:
        """A live runner still holds this task."""
        store = RecordStore(self.state.root)
        records, _ = store.scan()
        return any(r.task_id == self.task_id and store.is_live(r) for r in records)

    def follow(self, poll: float = 0.5, stop: Callable[[], bool] = lambda: False
               ) -> Iterator[dict[str, Any]]:
        """Everything, then what is new until the task is no longer running here."""
        yield from self.read()
        while not stop():
            running = self.running()
            time.sleep(poll)
            yield from self.read()
            if not running:
                return


def _short(value: Any, width: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def render(item: dict[str, Any]) -> list[str]:
    """Readable lines for one story item (assistant text, tool calls, results, cost)."""
    line = item["line"]
    if item["source"] == "pmtool":
        extra = {k: v for k, v in line.items()
                 if k not in ("ok", "event", "time", "agent", "task_id", "log") and v is not None}
        stamp = str(line.get("time", ""))[11:19]
        return [f"{stamp} [{line.get('agent')}] {line.get('event')}"
                + (f" {_short(extra, 100)}" if extra else "")]
    kind = line.get("type")
    if kind == "system" and line.get("subtype") == "init":
        return [f"  claude session {line.get('session_id')} ({line.get('model')})"]
    if kind == "result":
        turns = line.get("num_turns") or 0
        return [f"  result: {line.get('subtype')}, {turns} turn{'' if turns == 1 else 's'}, "
                f"${line.get('total_cost_usd') or 0:.4f}, "
                f"{(line.get('duration_ms') or 0) / 1000:.1f}s"]
    out = []
    for block in (line.get("message") or {}).get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and block.get("text", "").strip():
            out.append(f"  {_short(block['text'], 200)}")
        elif block.get("type") == "tool_use":
            out.append(f"  -> {block.get('name')} {_short(block.get('input'), 100)}")
        elif block.get("type") == "tool_result":
            content = block.get("content")
            if isinstance(content, list):
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            mark = "<- error" if block.get("is_error") else "<-"
            out.append(f"  {mark} {_short(content, 100)}")
    return out


# -- report ------------------------------------------------------------------------------


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`24h`, `7d`, `30m`, `2w`, or a date / ISO time (UTC unless it says otherwise)."""
    if not value:
        return None
    now = now or _now()
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", value)
    if match:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 604800}[match[2]]
        return now - timedelta(seconds=float(match[1]) * unit)
    when = parse_time(value)
    if when is None:
        raise UsageError(f'--since "{value}": give a span (24h, 7d) or a date (2026-11-01)')
    return when


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _facts(entry: dict[str, Any]) -> dict[str, Any]:
    """One closed task's numbers, from its history line."""
    steps = entry.get("steps") or []
    turns, agent_s, started = 0, 0.0, None
    for step in steps:
        if step.get("step") == "agent_starting":
            started = parse_time(step.get("at"))
        elif step.get("step") == "agent_finished":
            turns += int(step.get("num_turns") or 0)
            ended = parse_time(step.get("at"))
            if started and ended:
                agent_s += (ended - started).total_seconds()
            started = None
    if "num_turns" in entry:
        turns = int(entry["num_turns"] or 0)
    if "agent_s" in entry:
        agent_s = float(entry["agent_s"] or 0)
    closed, claimed = parse_time(entry.get("closed_at")), parse_time(entry.get("claimed_at"))
    task = entry.get("task") or {}
    return {
        "task_id": task.get("id", entry.get("task_id")), "title": task.get("title"),
        "agent": entry.get("agent_id"), "model": entry.get("model"),
        "outcome": entry.get("outcome"), "cost_usd": float(entry.get("cost_usd") or 0),
        "attempts": int(entry.get("attempts") or 0), "turns": turns,
        "agent_s": round(agent_s, 1),
        "task_s": (closed - claimed).total_seconds() if closed and claimed else None,
        "day": day.strftime("%Y-%m-%d") if (day := closed or claimed) else None,
    }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["task_s"] for r in rows if r["task_s"] is not None]
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[str(r["outcome"])] = outcomes.get(str(r["outcome"]), 0) + 1
    return {
        "tasks": len(rows), "outcomes": outcomes,
        "attempts": sum(r["attempts"] for r in rows),
        "cost_usd": round(sum(r["cost_usd"] for r in rows), 6),
        "turns": sum(r["turns"] for r in rows),
        "agent_s": round(sum(r["agent_s"] for r in rows), 1),
        "mean_task_s": round(sum(times) / len(times), 1) if times else None,
        "p95_task_s": round(p95, 1) if (p95 := _p95(times)) is not None else None,
    }


@dataclass
class CostReport(Result):
    """`pmtool report`: totals of the tasks closed since `since`, per `by` group, and the
    most expensive ones; `html` is the page written, when one was."""

    since: str | None
    by: str
    totals: dict[str, Any]
    groups: list[dict[str, Any]]
    most_expensive: list[dict[str, Any]]
    html: str | None = None

    def to_json(self) -> dict[str, Any]:
        answer = super().to_json()
        if self.html is None:
            del answer["html"]
        return answer


def report(state_root: str | Path, since: datetime | None = None, by: str = "day",
           top: int = 5) -> CostReport:
    """Totals of the tasks closed on this machine since `since`, and per `by` group."""
    if by not in BY_KEYS:
        raise UsageError(f'--by "{by}" is not one of ' + ", ".join(BY_KEYS), valid=list(BY_KEYS))
    rows = [_facts(e) for e in StateDir(state_root).history(kind="closed", since=since)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["task_id" if by == "task" else by]), []).append(r)
    expensive = sorted(rows, key=lambda r: r["cost_usd"], reverse=True)[:top]
    return CostReport(
        since=since.strftime("%Y-%m-%dT%H:%M:%SZ") if since else None, by=by,
        totals=_totals(rows),
        groups=[{"key": key, **_totals(items)} for key, items in sorted(groups.items())],
        most_expensive=[{k: r[k] for k in ("task_id", "title", "outcome", "cost_usd",
                                            "attempts", "agent")} for r in expensive],
    )


def usd(amount: float) -> str:
    """Dollars as a person reads them: cents from a cent up, two significant digits below
    (a cheap task's $0.00021 is not "$0.00")."""
    if amount == 0:
        return "$0"
    places = 2 if abs(amount) >= 0.01 else 1 - math.floor(math.log10(abs(amount)))
    return f"${amount:.{places}f}"


def duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h10m`; `-` when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# The report's totals, as a reader names them, each with how its value is shown.
REPORT_LABELS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "tasks": ("Tasks closed", str),
    "outcomes": ("Outcomes", lambda o: ", ".join(f"{n} {k.replace('_', ' ')}"
                                                 for k, n in sorted(o.items())) or "none"),
    "cost_usd": ("Cost", usd),
    "attempts": ("Attempts", str),
    "turns": ("Model turns", str),
    "agent_s": ("Agent time", duration),
    "mean_task_s": ("Time per task, mean", duration),
    "p95_task_s": ("Time per task, 95th percentile", duration),
}


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def report_html(result: CostReport) -> str:
    """A self-contained page a manager can read: the totals under plain labels, an inline
    SVG bar chart of cost per group, the groups and the most expensive tasks."""
    groups, by = result.groups, result.by
    peak = max((g["cost_usd"] for g in groups), default=0) or 1
    bar_h, width = 22, 420
    bars = []
    for i, g in enumerate(groups):
        w = max(1, round(width * g["cost_usd"] / peak))
        y = i * bar_h
        bars.append(f'<text x="0" y="{y + 15}">{html.escape(g["key"])}</text>'
                    f'<rect x="160" y="{y + 3}" width="{w}" height="{bar_h - 6}" fill="#4a7">'
                    f'<title>{html.escape(usd(g["cost_usd"]))}</title></rect>'
                    f'<text x="{166 + w}" y="{y + 15}">{html.escape(usd(g["cost_usd"]))}</text>')
    totals = result.totals
    summary = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(show(totals[k]))}"
                      "</td></tr>" for k, (label, show) in REPORT_LABELS.items() if k in totals)
    per_group = _html_table(
        [by.capitalize(), "Tasks", "Attempts", "Cost", "Mean time per task"],
        [[g["key"], str(g["tasks"]), str(g["attempts"]), usd(g["cost_usd"]),
          duration(g["mean_task_s"])] for g in groups])
    costly = _html_table(
        ["Task", "Title", "Outcome", "Attempts", "Agent", "Cost"],
        [[str(e["task_id"]), e.get("title") or "", str(e["outcome"]).replace("_", " "),
          str(e["attempts"]), str(e.get("agent") or ""), usd(e["cost_usd"])]
         for e in result.most_expensive])
    svg_h = max(bar_h, bar_h * len(groups))
    return (f"<!doctype html><meta charset=utf-8><title>pmtool report</title>"
            f"<style>body{{font:14px sans-serif;margin:2em}}td,th{{text-align:left;"
            f"padding:2px 12px}}svg text{{font:12px sans-serif}}</style>"
            f"<h1>What the closed tasks cost</h1><p>Tasks closed on this machine since "
            f"{html.escape(str(result.since or 'the start'))}, grouped by "
            f"{html.escape(by)}.</p><table>{summary}</table>"
            f"<h2>Cost per {html.escape(by)}</h2>"
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 260}" height="{svg_h}" '
            f'role="img" aria-label="cost per {html.escape(by)}">{"".join(bars)}</svg>'
            f"{per_group}<h2>The most expensive tasks</h2>"
            + (costly if result.most_expensive else "<p>None.</p>") + "\n")

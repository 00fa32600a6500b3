"""Prices, transcript runs, cost notes: what a task's agent runs cost, read from pmtool's
transcripts, and the notes a finished (or given back) task gets from it.

A run that died before claude printed its result line is counted from its assistant
messages, its cost estimated from their token usage at `PRICES` (`estimated`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pmtool.errors import PmtoolError
from pmtool.records import RecordStore, TaskRecord
from pmtool.results import Result

# $ per million tokens (input, output), to estimate the cost of a run that died before
# claude printed its result line; cache reads cost a tenth of input, cache writes 1.25x.
PRICES = {"opus": (15.0, 75.0), "sonnet": (3.0, 15.0), "haiku": (1.0, 5.0)}


def summary(store: RecordStore, record: TaskRecord, verdict: dict[str, Any],
            done: dict[str, dict[str, Any]] | None = None, head: str | None = None) -> str:
    """The notes a finished task gets: where its work is, and what the agent runs cost."""
    done = done or {}
    where = [f"pmtool: {verdict.get('outcome')}"]
    if record.branch:
        where.append(f"branch {record.branch}" + (f" at {head[:12]}" if head else ""))
    left = done.get("leftover") or {}
    if left.get("committed"):
        where.append(f"uncommitted work committed by pmtool as {left['committed'][:12]}")
    if left.get("rescued"):
        where.append(f"uncommitted work saved at {left['rescued']}")
    push = done.get("push") or {}
    if push.get("pushed"):
        where.append(f"pushed to {push.get('remote')}")
    elif push:
        where.append(f"not pushed ({push.get('reason')})")
    acc = accounting(store, record)
    text = "; ".join(where) + (f"\n{runs_line(acc)}" if acc.attempts or acc.session_id
                               else "")
    if (done.get("land") or {}).get("note"):
        text += f"\n{done['land']['note']}"
    said = verdict.get("summary")
    if said and verdict.get("outcome") in ("blocked", "fail"):
        return f"{said}\n{text}"  # the reason first: it is what a park or a bounce shows
    return f"{text}\n{said}" if said else text


def runs_note(store: RecordStore, agent_id: str) -> str:
    """"\nagent: session ..., cost ..." for the notes of a task given back ("" without
    agent runs or a record), so a give-back says what the attempt cost too."""
    with contextlib.suppress(PmtoolError):
        record = store.get(agent_id)
        acc = accounting(store, record) if record else None
        if acc and (acc.attempts or acc.session_id):
            return f"\n{runs_line(acc)}"
    return ""


def runs_line(acc: Accounting) -> str:
    cost = f"${acc.cost_usd:.4f}" + (" (some estimated)" if acc.estimated else "")
    crashed = f", {acc.crashed} without a result" if acc.crashed else ""
    return (f"agent: session {acc.session_id}, model {acc.model}, {acc.turns} turns, "
            f"{cost} over {acc.attempts} runs{crashed}, {acc.duration_s}s")


@dataclass
class Accounting(Result):
    """What the agent runs of one claim came to (`accounting`); the history's `runs`."""

    session_id: str | None
    model: str | None
    attempts: int
    turns: int
    crashed: int  # runs without a result line
    estimated: bool  # some cost estimated from token usage
    duration_s: float
    cost_usd: float


def accounting(store: RecordStore, record: TaskRecord) -> Accounting:
    """Session, model, turns, cost and duration over every agent run of this claim, from
    the transcripts: a run that died before its result line is counted from its
    assistant messages (cost estimated from their token usage, `estimated`)."""
    runs = [r for path in _transcripts(store, record.task_id)
            for r in transcript_runs(_lines(path)) if (r["at"] or "") >= record.claimed_at]
    cost = sum(r["cost_usd"] or 0.0 for r in runs)
    return Accounting(
        session_id=record.session_id,
        model=(runs[-1]["model"] if runs else None) or record.model,
        attempts=len(runs), turns=sum(r["turns"] for r in runs),
        crashed=sum(1 for r in runs if not r["result"]),
        estimated=any(r["estimated"] for r in runs),
        duration_s=round(sum(r["duration_s"] or 0 for r in runs), 1),
        # The record adds each finished run's cost: the larger of the two is the honest one.
        cost_usd=round(max(cost, record.cost_usd or 0.0), 6))


def _transcripts(store: RecordStore, task_id: int) -> list[Path]:
    folder = store.state_dir / "logs"
    return sorted(folder.glob(f"task-{task_id}-*.jsonl")) if folder.is_dir() else []


def _lines(path: Path) -> Iterable[dict[str, Any]]:
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    yield obj


def transcript_runs(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per agent run in a transcript (pmtool's `start` lines divide them):
    `{"at", "session_id", "model", "turns", "cost_usd", "estimated", "result",
    "duration_s"}`."""
    runs: list[dict[str, Any]] = []
    run: dict[str, Any] | None = None
    for obj in lines:
        if obj.get("type") == "pmtool" and obj.get("event") == "start":
            run = {"at": obj.get("at"), "session_id": obj.get("session_id"),
                   "model": obj.get("model"), "turns": 0, "cost_usd": None,
                   "estimated": False, "result": False, "duration_s": None,
                   "_messages": {}}
            runs.append(run)
        elif run is None:
            continue
        elif obj.get("type") == "assistant":
            message = obj.get("message") or {}
            run["_messages"][message.get("id") or len(run["_messages"])] = message
        elif obj.get("type") == "result":
            run.update(result=True, cost_usd=obj.get("total_cost_usd"),
                       turns=obj.get("num_turns") or 0)
        elif obj.get("type") == "pmtool" and obj.get("event") == "end":
            run["duration_s"] = _seconds(run["at"], obj.get("at"))
    for run in runs:
        messages = run.pop("_messages")
        if not run["result"]:
            run["turns"] = len(messages)
            run["cost_usd"] = _estimate(messages.values())
            run["estimated"] = run["cost_usd"] is not None
    return runs


def _estimate(messages: Iterable[dict[str, Any]]) -> float | None:
    total, known = 0.0, False
    for message in messages:
        price = next((p for name, p in PRICES.items() if name in str(message.get("model"))),
                     None)
        usage = message.get("usage") or {}
        if price is None or not usage:
            continue
        known = True
        fresh = float(usage.get("input_tokens") or 0) \
            + 1.25 * float(usage.get("cache_creation_input_tokens") or 0) \
            + 0.1 * float(usage.get("cache_read_input_tokens") or 0)
        total += (fresh * price[0] + float(usage.get("output_tokens") or 0) * price[1]) / 1e6
    return round(total, 6) if known else None


def _seconds(start: Any, end: Any) -> float | None:
    try:
        return round((datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start)))
                     .total_seconds(), 1)
    except ValueError:
        return None

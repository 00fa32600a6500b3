"""Prometheus metrics of the runners on this machine, derived from what they already write.

The source is the state folder (pmtool.state): each runner's event log (the events `pmtool
run` prints), the history (attempt, park and closed-record lines), the task records and
the runner locks. `Fold` reads those files once (`pmtool metrics`) or again and again,
each time only what was appended since (`pmtool run --metrics-addr`, on every scrape), so
the one-shot command and the live endpoint count the same things the same way. Only the
requests to the server are not in any file: a live process counts its own (`Requests`).

Labels are bounded: agent, role, level, and a kind or outcome from a fixed set, never a
task id (the task in flight is a gauge's value). prometheus_client is imported only where
the text is made (`render`, `serve`), so no other command pays for it at start-up.
The names and their labels are listed in METRICS; the README lists the same (a test).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pmtool import failure_policy as fl
from pmtool.errors import UsageError
from pmtool.records import CorruptRecord, RecordStore, TaskRecord
from pmtool.results import Result
from pmtool.state import StateDir, atomic_write_json, history_entry, parse_time
from pmtool.views.status import note_parked, runner_rows

TASK_BUCKETS = (60.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
STEP_BUCKETS = (0.5, 2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The one-hot states of `pmtool_agent_state`.
STATES = ("polling", "working", "paused", "breaker_open", "fatal", "stopped", "dead")
AGENT = ("agent", "role", "level")

# name -> (type, labels, help). Counters are named without `_total` here, as
# prometheus_client names them; the text has `<name>_total`.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pmtool_tasks_claimed": ("counter", AGENT, "Tasks claimed."),
    "pmtool_tasks_finished": ("counter", (*AGENT, "outcome"),
                              "Tasks finished, by outcome (the verdict, or given_back)."),
    "pmtool_claude_runs": ("counter", (*AGENT, "kind"),
                           "claude runs, by how they ended (pmtool.failure_policy kinds)."),
    "pmtool_claude_cost_usd": ("counter", AGENT, "What the claude runs cost, in USD."),
    "pmtool_attempts": ("counter", (*AGENT, "kind"),
                        "Claims that ended (attempt lines), by stop kind."),
    "pmtool_give_backs": ("counter", (*AGENT, "kind"), "Tasks given back, by stop kind."),
    "pmtool_parks": ("counter", (*AGENT, "cause"), "Tasks parked for a person, by cause."),
    # Histograms per role and level, not per agent: 14 series per bucket set and agent
    # would be most of a big fleet's scrape.
    "pmtool_task_duration_seconds": ("histogram", ("role", "level", "outcome"),
                                     "From claim to finish, per task."),
    "pmtool_step_duration_seconds": ("histogram", ("role", "level", "step"),
                                     "Time per step: pre_task, agent, post_task, finish."),
    "pmtool_server_requests": ("counter", ("method", "result"),
                               "Requests to the Headless PM server, by result "
                               "(2xx, 4xx, 5xx, timeout, unreachable); live endpoint only."),
    "pmtool_server_request_duration_seconds": ("histogram", ("method",),
                                               "Latency of the requests to the server; "
                                               "live endpoint only."),
    "pmtool_agent_up": ("gauge", AGENT, "1 while the agent's runner process lives."),
    "pmtool_agent_state": ("gauge", (*AGENT, "state"),
                           "1, one series per agent, labelled with the state it is in: "
                           + ", ".join(STATES) + "."),
    "pmtool_agent_paused_until_timestamp_seconds": (
        "gauge", AGENT, "When a pause (usage limit, daily budget) or an open breaker ends; "
                        "only while paused."),
    "pmtool_agent_task_id": ("gauge", AGENT, "The id of the task in flight; only while "
                                             "there is one."),
    "pmtool_agent_task_running_seconds": ("gauge", AGENT,
                                          "How long the task in flight has run."),
    "pmtool_last_finish_timestamp_seconds": ("gauge", AGENT,
                                             "When the agent last finished a task (not "
                                             "given back)."),
    "pmtool_tasks_parked": ("gauge", ("cause",),
                            "Tasks this machine parked that nobody set back yet."),
    "pmtool_daily_spent_usd": ("gauge", (), "This machine's spend today (UTC), in USD."),
    "pmtool_daily_budget_usd": ("gauge", (), "The daily budget (daily_budget_usd); "
                                             "absent when none is set."),
    "pmtool_queue_task_available": ("gauge", ("role", "level"),
                                    "1 when the machine's last poll for the role and level "
                                    "saw a task to take."),
    "pmtool_queue_polled_timestamp_seconds": ("gauge", ("role", "level"),
                                              "When that poll was made."),
}


def _ts(value: Any) -> float | None:
    when = parse_time(value)
    return when.timestamp() if when else None


@dataclass
class Hist:
    """A histogram's buckets (not cumulative), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        counts = self.counts or [0] * (len(self.bounds) + 1)
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Requests:
    """The requests this process made to the server (PMClient.observe), thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Hist] = {}

    def observe(self, method: str, result: str, seconds: float) -> None:
        with self.lock:
            self.counts[(method, result)] = self.counts.get((method, result), 0) + 1
            self.latency.setdefault(method, Hist(REQUEST_BUCKETS)).observe(seconds)


class Fold:
    """The metrics of a state folder, brought up to date by `refresh()` from what was
    appended since the last call. `agents`: count only these (a process's own agents);
    None: every agent of the folder."""

    def __init__(self, state_root: str | Path, agents: Iterable[str] | None = None,
                 daily_budget_usd: float | None = None) -> None:
        self.state = StateDir(state_root)
        self.agents = set(agents) if agents is not None else None
        self.daily_budget_usd = daily_budget_usd
        self.lock = threading.Lock()  # the folded state, between refresh and save
        self._render_lock = threading.Lock()
        self.offsets: dict[Path, tuple[int, int]] = {}  # file -> (inode, bytes read)
        self.counters: dict[str, dict[tuple[str, ...], float]] = {}
        self.hists: dict[str, dict[tuple[str, ...], Hist]] = {}
        self.where: dict[str, tuple[str, str]] = {}  # agent -> (role, level)
        self.last: dict[str, dict[str, Any]] = {}  # agent -> its last event
        self.pause: dict[str, float] = {}  # agent -> until (epoch seconds)
        self.fatal: dict[str, bool] = {}
        self.claimed_at: dict[str, tuple[Any, float]] = {}  # agent -> (task_id, when)
        self.agent_at: dict[str, float] = {}  # agent -> when its last claude run ended
        self.finished_at: dict[str, float] = {}
        self.spent: dict[str, float] = {}  # UTC day -> USD (attempt lines)
        self.parked: dict[str, dict[str, Any]] = {}
        self.requests: Requests | None = None
        self._record_cache: dict[Path, tuple[tuple[int, int, int], TaskRecord | None]] = {}
        self._own_paths = [self.state.events_path(a) for a in sorted(self.agents or ())]

    # -- kept between runs ----------------------------------------------------------------

    FOLD_VERSION = 1
    KEPT = ("where", "last", "pause", "fatal", "claimed_at", "agent_at", "finished_at",
            "spent", "parked")

    def save(self) -> None:
        """Keep what was counted, and where each file was read up to (atomically)."""
        with self.lock:
            today = datetime.now(UTC).strftime("%Y-%m-%d")
            data: dict[str, Any] = {k: getattr(self, k) for k in self.KEPT}
            data["spent"] = {d: v for d, v in self.spent.items() if d >= today}
            data.update(
                version=self.FOLD_VERSION, names=sorted(METRICS),
                offsets=[[str(p), ino, off] for p, (ino, off) in self.offsets.items()],
                counters={n: [[*k, v] for k, v in series.items()]
                          for n, series in self.counters.items()},
                hists={n: [[*k, h.counts, h.total, h.count] for k, h in series.items()]
                       for n, series in self.hists.items()})
        atomic_write_json(self.state.metrics_fold_path, data)

    def load(self) -> None:
        """Go on from what a `save` kept; a file that does not parse (or is of another
        version of the metrics) is moved aside and everything is read again."""
        path = self.state.metrics_fold_path
        try:
            kept = _kept(json.loads(path.read_text()))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            with contextlib.suppress(OSError):  # derived data, but moved aside all the same
                os.replace(path, path.with_name(f"{path.name}.corrupt-{stamp}"))
            return
        with self.lock:
            for name, value in kept.items():
                setattr(self, name, value)

    # -- reading -------------------------------------------------------------------------

    def _new_lines(self, path: Path, wanted: Callable[[str], bool] = lambda _l: True
                   ) -> Iterator[dict[str, Any]]:
        """The complete JSON lines appended to `path` since the last look that `wanted`
        keeps (the last line always: it is the newest state), one by one: `wanted` sees
        a line after the caller folded the ones before it. A file that was replaced
        (pruned, made anew) is read from its start; a torn last line waits."""
        try:
            fh = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError:
            return
        with fh:
            inode = os.fstat(fh.fileno()).st_ino
            seen_inode, offset = self.offsets.get(path, (inode, 0))
            if seen_inode != inode:
                offset = 0
            fh.seek(0, 2)
            if fh.tell() < offset:
                offset = 0
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offsets[path] = (inode, offset + end)
        # Decoded once, parsed as str: json.loads of bytes guesses the encoding per line.
        lines = data[:end].decode("utf-8", "replace").split("\n")[:-1]
        for i, line in enumerate(lines):
            if not wanted(line) and i < len(lines) - 1:
                continue  # never parsed: most lines of a long history count for nothing
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                yield item

    def _event_paths(self) -> list[Path]:
        if self.agents is not None:
            return self._own_paths
        if not self.state.events_dir.is_dir():
            return []
        return sorted(self.state.events_dir.glob("*.jsonl"))

    def refresh(self) -> None:
        with self.lock:
            for path in self._event_paths():
                for event in self._new_lines(path, _folded_event):
                    self._event(event)
            for entry in self._new_lines(self.state.history_path, self._folded_history):
                self._history(history_entry(entry))

    def _folded_history(self, line: str) -> bool:
        """Attempt and park lines count; a closed record only matters when it ends a park
        (pmtool.views.status.note_parked), so while nothing is parked it is not even parsed."""
        if line.startswith('{"kind": "cooldown"'):
            return False
        return bool(self.parked) or not line.startswith('{"kind": "closed"')

    # -- folding -------------------------------------------------------------------------

    def _add(self, name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
        series = self.counters.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + value

    def _observe(self, name: str, labels: tuple[str, ...], value: float,
                 bounds: tuple[float, ...]) -> None:
        self.hists.setdefault(name, {}).setdefault(labels, Hist(bounds)).observe(value)

    def _event(self, e: dict[str, Any]) -> None:
        agent, kind = e.get("agent"), e.get("event")
        if not isinstance(agent, str) or (self.agents is not None and agent not in self.agents):
            return
        if e.get("role"):
            self.where[agent] = (str(e["role"]), str(e.get("level") or ""))
        where = self.where.get(agent, ("", ""))
        self.last[agent] = e
        timed = kind in ("claimed", "resumed", "agent", "finished", "paused")
        when = (_ts(e.get("time")) or time.time()) if timed else 0.0
        if kind not in ("error", "stopped"):  # a fatal error is followed by `stopped`;
            self.fatal[agent] = False  # a start begins with `preflight`
        if kind == "claimed":
            self._add("pmtool_tasks_claimed", (agent,))
            self.claimed_at[agent] = (e.get("task_id"), when)
        elif kind == "resumed" and self.claimed_at.get(agent, (None,))[0] != e.get("task_id"):
            self.claimed_at[agent] = (e.get("task_id"), when)
        elif kind == "agent":
            stop = e.get("stop")
            stop = stop if isinstance(stop, dict) else {}
            run_kind = stop.get("kind") or (fl.OK if e.get("ok") else fl.FAILED)
            self._add("pmtool_claude_runs", (agent, str(run_kind)))
            self._add("pmtool_claude_cost_usd", (agent,), float(e.get("total_cost_usd") or 0))
            if e.get("duration_s") is not None:
                self._observe("pmtool_step_duration_seconds", (*where, "agent"),
                              float(e["duration_s"]), STEP_BUCKETS)
            self.agent_at[agent] = when
        elif kind == "hook" and not e.get("skipped") and e.get("duration_s") is not None:
            self._observe("pmtool_step_duration_seconds", (*where, str(e.get("hook"))),
                          float(e["duration_s"]), STEP_BUCKETS)
        elif kind == "finished":
            outcome = str(e.get("outcome") or "unknown")
            self._add("pmtool_tasks_finished", (agent, outcome))
            task, started = self.claimed_at.pop(agent, (None, None))
            if started is not None and task == e.get("task_id"):
                self._observe("pmtool_task_duration_seconds", (*where, outcome),
                              max(0.0, when - started), TASK_BUCKETS)
            ended = self.agent_at.pop(agent, None)
            if outcome != "given_back":
                self.finished_at[agent] = when
                if ended is not None:
                    self._observe("pmtool_step_duration_seconds", (*where, "finish"),
                                  max(0.0, when - ended), STEP_BUCKETS)
        elif kind == "paused":
            until = _ts(e.get("until"))
            if until is None and e.get("wait_s") is not None:
                until = when + float(e["wait_s"])
            self.pause[agent] = until or 0.0
        elif kind == "breaker" and e.get("state") == "open":
            self.pause[agent] = _ts(e.get("until")) or 0.0
        elif kind == "error" and (e.get("error") or {}).get("fatal"):
            self.fatal[agent] = True

    def _history(self, h: dict[str, Any]) -> None:
        note_parked(self.parked, h)
        kind, agent = h.get("kind"), h.get("agent_id")
        if kind == fl.ATTEMPT:
            day = str(h.get("at") or "")[:10]
            self.spent[day] = self.spent.get(day, 0.0) + float(h.get("cost_usd") or 0)
        if not isinstance(agent, str) or (self.agents is not None and agent not in self.agents):
            return
        if kind == fl.ATTEMPT:
            stop = str(h.get("stop") or "unknown")
            self._add("pmtool_attempts", (agent, stop))
            if h.get("outcome") == "given_back":
                self._add("pmtool_give_backs", (agent, stop))
        elif kind == fl.PARK:
            self._add("pmtool_parks", (agent, str(h.get("cause") or "unknown")))

    # -- the current state ---------------------------------------------------------------

    def gauges(self, now: datetime | None = None) -> dict[str, dict[tuple[str, ...], float]]:
        """The gauges as of now: agents (from the records and runner locks, with the last
        event folded), parked tasks, today's spend, the queue the poller last saw."""
        now = now or datetime.now(UTC)
        stamp = now.timestamp()
        out: dict[str, dict[tuple[str, ...], float]] = {name: {} for name, spec in
                                                        METRICS.items() if spec[0] == "gauge"}
        with self.lock:
            last = dict(self.last)
        rows, _ = runner_rows(self.state, now, lambda a: [last[a]] if a in last else [],
                              self.agents, self._records())
        for row in rows:
            agent = row["agent_id"]
            if row.get("role"):
                self.where[agent] = (row["role"], row.get("level") or "")
            out["pmtool_agent_up"][(agent,)] = 1.0 if row["live"] else 0.0
            state = self._state(agent, row, stamp)
            # Only the series that hold something: a scrape of a big fleet is mostly the
            # formatting of its samples (benchmarks/metrics.py).
            out["pmtool_agent_state"][(agent, state)] = 1.0
            if state in ("paused", "breaker_open"):
                out["pmtool_agent_paused_until_timestamp_seconds"][(agent,)] = \
                    self.pause.get(agent, 0.0)
            if row.get("task_id") is not None:
                out["pmtool_agent_task_id"][(agent,)] = float(row["task_id"])
                out["pmtool_agent_task_running_seconds"][(agent,)] = float(row.get("task_s")
                                                                           or 0)
        for agent, when in self.finished_at.items():
            out["pmtool_last_finish_timestamp_seconds"][(agent,)] = when
        for entry in self.parked.values():
            cause = (str(entry.get("cause") or "unknown"),)
            out["pmtool_tasks_parked"][cause] = out["pmtool_tasks_parked"].get(cause, 0) + 1
        out["pmtool_daily_spent_usd"][()] = round(self.spent.get(now.strftime("%Y-%m-%d"),
                                                                 0.0), 6)
        if self.daily_budget_usd is not None:
            out["pmtool_daily_budget_usd"][()] = float(self.daily_budget_usd)
        for role, level, offer in _polls(self.state):
            out["pmtool_queue_task_available"][(role, level)] = 1.0 if offer.get("task") else 0.0
            out["pmtool_queue_polled_timestamp_seconds"][(role, level)] = float(
                offer.get("at") or 0)
        return out

    def _records(self) -> tuple[list[TaskRecord], list[Any]]:
        """The task records, each parsed again only when its file changed (a record is
        replaced whole on every save: a new inode)."""
        store = RecordStore(self.state.root)
        good, corrupt, seen = [], [], {}
        paths = sorted(store.dir.glob("*.json")) if store.dir.is_dir() else []
        for path in paths:
            try:
                info = path.stat()
            except OSError:
                continue
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            cached = self._record_cache.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, store._read(path, quarantine=False))
                except CorruptRecord as exc:
                    corrupt.append(exc)
                    continue
            seen[path] = cached
            if cached[1] is not None:
                good.append(cached[1])
        self._record_cache = seen
        return good, corrupt

    def _state(self, agent: str, row: dict[str, Any], now: float) -> str:
        last = self.last.get(agent) or {}
        if self.fatal.get(agent) or (last.get("event") == "stopped"
                                     and last.get("reason") == "fatal"):
            return "fatal"
        if not row["live"]:
            return "stopped" if row["step"] == "stopped" else "dead"
        if last.get("event") in ("paused", "breaker") and self.pause.get(agent, 0.0) > now:
            return "paused" if last["event"] == "paused" else "breaker_open"
        return "polling" if row["step"] in (None, "polling", "cooling down",
                                            "waiting for the server") else "working"

    # -- the text format -----------------------------------------------------------------

    def labels(self, name: str, key: tuple[str, ...]) -> list[str]:
        """The label values of a series: role and level put in after the agent."""
        if METRICS[name][1][:3] == AGENT:
            role, level = self.where.get(key[0], ("", ""))
            return [key[0], role, level, *key[1:]]
        return list(key)

    def families(self, now: datetime | None = None) -> list[Any]:
        """prometheus_client metric families of everything above."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        self.refresh()
        gauges = self.gauges(now)
        with self.lock:
            counters = {k: dict(v) for k, v in self.counters.items()}
            hists = {k: dict(v) for k, v in self.hists.items()}
        if self.requests is not None:
            with self.requests.lock:
                counters["pmtool_server_requests"] = {
                    k: float(v) for k, v in self.requests.counts.items()}
                hists["pmtool_server_request_duration_seconds"] = {
                    (k,): Hist(v.bounds, list(v.counts), v.total, v.count)
                    for k, v in self.requests.latency.items()}
        out = []
        for name, (kind, labels, text) in METRICS.items():
            family: Any
            if kind == "counter":
                family = CounterMetricFamily(name, text, labels=labels)
                for key, value in sorted(counters.get(name, {}).items()):
                    family.add_metric(self.labels(name, key), value)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, text, labels=labels)
                for key, value in sorted(gauges.get(name, {}).items()):
                    family.add_metric(self.labels(name, key), value)
            else:
                family = HistogramMetricFamily(name, text, labels=labels)
                for key, hist in sorted(hists.get(name, {}).items()):
                    family.add_metric(self.labels(name, key), hist.buckets(), hist.total)
            out.append(family)
        return out

    def render(self, now: datetime | None = None) -> bytes:
        """The metrics in Prometheus's text format (one scrape at a time: two at once
        would only race over the same files)."""
        with self._render_lock:
            return self._render(now)

    def _render(self, now: datetime | None) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        fold = self

        class Collector:
            def collect(self) -> Any:
                return fold.families(now)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector())  # type: ignore[arg-type]
        return generate_latest(registry)


def _kept(data: Any) -> dict[str, Any]:
    """The attributes of a Fold from what `Fold.save` wrote; ValueError if it is not that."""
    if not isinstance(data, dict) or data.get("version") != Fold.FOLD_VERSION \
            or data.get("names") != sorted(METRICS):
        raise ValueError("not a fold of these metrics")
    kept = {key: dict(data[key]) for key in Fold.KEPT}
    kept["claimed_at"] = {a: tuple(v) for a, v in kept["claimed_at"].items()}
    kept["where"] = {a: tuple(v) for a, v in kept["where"].items()}
    kept["offsets"] = {Path(p): (int(ino), int(off)) for p, ino, off in data["offsets"]}
    kept["counters"] = {n: {tuple(row[:-1]): float(row[-1]) for row in rows}
                        for n, rows in data["counters"].items()}
    bounds = {"pmtool_task_duration_seconds": TASK_BUCKETS,
              "pmtool_step_duration_seconds": STEP_BUCKETS}
    kept["hists"] = {n: {tuple(row[:-3]): Hist(bounds[n], [int(c) for c in row[-3]],
                                               float(row[-2]), int(row[-1]))
                         for row in rows} for n, rows in data["hists"].items()}
    return kept


# The events the fold looks at; the others (idle, health, worktree, heartbeat...) are
# most of a log, and only the newest line of each log matters of them.
FOLDED = {"claimed", "resumed", "agent", "hook", "finished", "paused", "breaker", "error",
          "stopped", "preflight"}
EVENT_KIND = re.compile(r'"event": "(\w+)"')


def _folded_event(line: str) -> bool:
    match = EVENT_KIND.search(line, 0, 160)  # `ok`, then `event`: pmtool.run.loop.Runner.event
    return match is None or match[1] in FOLDED


def _polls(state: StateDir) -> list[tuple[str, str, dict[str, Any]]]:
    """What each role and level's poller last saw (pmtool.run.poller.Poller's file)."""
    folder = state.root / "poll"
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            offer = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        role, _, level = path.stem.rpartition("-")
        if isinstance(offer, dict) and role:
            out.append((role, level, offer))
    return out


def metrics_text(state_root: str | Path, daily_budget_usd: float | None = None,
                 now: datetime | None = None, keep: bool = True) -> bytes:
    """`pmtool metrics`: every agent of the state folder, once. With `keep`, what was
    counted is kept in the state folder (`metrics-fold.json`), so the next run (cron's,
    a minute later) reads only what the runners appended since."""
    fold = Fold(state_root, daily_budget_usd=daily_budget_usd)
    if keep:
        fold.load()
    text = fold.render(now)
    if keep and fold.state.root.is_dir():  # a look at no state folder makes none
        with contextlib.suppress(OSError):  # a read-only state folder: next time from 0
            fold.save()
    return text


@dataclass
class MetricsFile(Result):
    """`pmtool metrics --output`: the file written, its size, and how many series it holds."""

    output: str
    bytes: int
    series: int


def write_metrics(path: str | Path, text: bytes) -> MetricsFile:
    """Write the metrics `text` (metrics_text's) to `path` atomically; what was written."""
    write_atomic(path, text)
    series = sum(1 for line in text.decode().splitlines() if line and line[0] != "#")
    return MetricsFile(output=str(path), bytes=len(text), series=series)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename, so a
    reader (node_exporter's textfile collector) sees the old file or the new, never half."""
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # node_exporter runs as its own user
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}",
                         hint="give --output a file in a folder you may write") from None


# -- the live endpoint ---------------------------------------------------------------------


def parse_addr(value: str) -> tuple[str, int]:
    """`HOST:PORT`, or a bare `PORT` on 127.0.0.1."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f'--metrics-addr "{value}": give HOST:PORT or a port',
                         hint="e.g. --metrics-addr 9464 (127.0.0.1) or 0.0.0.0:9464")
    return host, int(port)


class Endpoint:
    """`/metrics` and `/status` of the agents one process hosts, on a thread of its own."""

    def __init__(self, addr: str, state_root: str | Path, agents: Iterable[str],
                 daily_budget_usd: float | None = None,
                 on_error: Callable[[str], None] = lambda _msg: None) -> None:
        from http.server import ThreadingHTTPServer

        host, port = parse_addr(addr)
        self.fold = Fold(state_root, agents, daily_budget_usd)
        self.fold.requests = Requests()
        self.on_error = on_error
        try:
            self.server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:  # in use, or not an address of this machine
            raise UsageError(f"--metrics-addr {addr}: cannot listen on {host}:{port}: "
                             f"{exc.strerror or exc}",
                             hint="give another port, or stop what listens there") from None
        self.server.daemon_threads = True
        self.addr = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self._serve, name="pmtool-metrics", daemon=True)

    def start(self) -> Endpoint:
        self.thread.start()
        return self

    def _serve(self) -> None:
        try:
            self.server.serve_forever(poll_interval=0.2)
        except Exception as exc:  # said once, loudly; and the port closed, so that
            # scrapes fail at once (Prometheus: up == 0) instead of hanging.
            with contextlib.suppress(OSError):
                self.server.server_close()
            self.on_error(f"the metrics endpoint on {self.addr} stopped: "
                          f"{type(exc).__name__}: {exc}; the agents go on without it")

    def status(self) -> dict[str, Any]:
        from pmtool.views.status import status

        return {"ok": True,
                **status(self.fold.state.root, agents_only=self.fold.agents).to_json()}

    def close(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for a serve_forever that never ran
            self.server.shutdown()
        self.server.server_close()


def _handler(endpoint: Endpoint) -> Any:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            from prometheus_client import CONTENT_TYPE_LATEST

            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    body, kind = endpoint.fold.render(), CONTENT_TYPE_LATEST
                elif path == "/status":
                    body = (json.dumps(endpoint.status(), default=str) + "\n").encode()
                    kind = "application/json"
                else:
                    self.send_error(404, "try /metrics or /status")
                    return
            except Exception as exc:  # one bad scrape is said, and the next one tried
                endpoint.on_error(f"{path}: {type(exc).__name__}: {exc}")
                self.send_error(500, f"{type(exc).__name__}")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass  # stderr is the runner's: one scrape a second must not fill it

    return Handler


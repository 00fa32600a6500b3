"""What watching costs: a scrape of `run --metrics-addr` hosting 100 agents, and `pmtool
metrics` over a state folder of 10,000 finished tasks.

    .venv/bin/python benchmarks/metrics.py            # 100 agents; 10,000 tasks
    .venv/bin/python benchmarks/metrics.py --smoke    # the smallest run (CI, tests)

The state folders are written with the shapes the runner writes (pmtool.run.loop's events,
pmtool.failure_policy's attempt lines, closed task records), through pmtool.state, so the fold
reads what it reads in production; no server or claude is needed for what is measured.

1. scrape: an `Endpoint` (what `run --metrics-addr` starts) for A agents, their runner
   locks held as a live process holds them, half with a task in flight, each with the
   event log of T earlier tasks. The first scrape reads every log (cold); later scrapes
   read only what was appended since (a few events per agent between scrapes, as a busy
   fleet writes in 15 s): p50/p95 over HTTP, on loopback;
2. once: `pmtool metrics` as cron runs it (a new process, the console script) over a state
   folder of N finished tasks: the first run, which reads every log, and the next ones,
   which go on from what the last run kept (`metrics-fold.json`) after a minute's events;
   and the first run's fold in-process, without the start-up.

Targets (issue 22): a scrape of 100 agents < 50 ms; `pmtool metrics` over 10,000 finished
tasks < 1 s. Figures, not assertions: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pmtool import failure_policy as fl
from pmtool.records import RecordStore, TaskRecord
from pmtool.state import StateDir
from pmtool.views.metrics import Endpoint, Fold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop import pct  # a sibling script: one percentile for every benchmark

PMTOOL = str(Path(sys.executable).with_name("pmtool"))
ROLE, LEVEL = "backend_dev", "senior"


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def task_events(agent: str, task_id: int, start: datetime) -> list[dict[str, Any]]:
    """One task's events, as a runner writes them (pmtool.run.loop.Runner.event)."""
    def at(seconds: float) -> str:
        return iso(start + timedelta(seconds=seconds))

    def base(kind: str, seconds: float) -> dict[str, Any]:  # the keys in the runner's order
        return {"ok": True, "event": kind, "time": at(seconds), "agent": agent, "role": ROLE,
                "level": LEVEL, "task_id": task_id}

    cost = round(random.uniform(0.05, 2.0), 4)
    outcome = random.choice(["done"] * 8 + ["given_back"])
    return [
        {**base("claimed", 0), "title": f"Task {task_id}",
         "status": "under_work", "previous_status": "created", "difficulty": LEVEL,
         "complexity": "major", "record": f"/state/records/{agent}.json"},
        {**base("hook", 1), "hook": "pre_task", "ok": True,
         "skipped": False, "exit_code": 0, "duration_s": 0.8},
        {**base("worktree", 2), "path": f"/wt/task-{task_id}",
         "branch": f"feature/t{task_id}", "base": "main", "created": True},
        {**base("agent", 300), "outcome": "done", "summary": "Did it.",
         "session_id": "s", "model": "claude-sonnet", "num_turns": 12,
         "total_cost_usd": cost, "task_cost_usd": cost, "duration_s": 298.0,
         "log": f"/state/logs/task-{task_id}-s.jsonl", "stop": {"kind": "ok", "message": ""}},
        {**base("hook", 303), "hook": "post_task", "ok": True,
         "skipped": False, "exit_code": 0, "duration_s": 1.5},
        {**base("finished", 305), "outcome": outcome,
         "status": "dev_done", "action": "finished", "cost_usd": cost},
        {**base("worktree", 306), "path": f"/wt/task-{task_id}",
         "removed": True, "rescued": None},
        {**base("idle", 340), "task_id": None, "waited_s": 30.0},
    ]


def write_state(root: Path, agents: int, tasks_per_agent: int,
                in_flight: bool = False) -> StateDir:
    """A state folder of `agents` agents that each finished `tasks_per_agent` tasks."""
    state = StateDir(root)
    state.ensure()
    store = RecordStore(root)
    start = datetime.now(UTC) - timedelta(days=2)
    task_id = 0
    history: list[str] = []
    for a in range(agents):
        agent = f"dev-{a + 1}"
        lines = []
        for t in range(tasks_per_agent):
            task_id += 1
            when = start + timedelta(seconds=t * 360 + a)
            events = task_events(agent, task_id, when)
            lines += [json.dumps(e) for e in events]
            task = {"id": task_id, "title": f"Task {task_id}", "created_at": iso(when)}
            finished = events[5]
            attempt = fl.attempt_line(task, agent, outcome=finished["outcome"],
                                      kind=fl.OK if finished["outcome"] == "done" else
                                      fl.FAILED, cost_usd=finished["cost_usd"],
                                      at=when + timedelta(seconds=305),
                                      claimed_at=iso(when))
            record = TaskRecord(agent_id=agent, role=ROLE, level=LEVEL,
                                server_url="http://pm", task=task, previous_status="created",
                                claimed_at=iso(when), cost_usd=finished["cost_usd"])
            for step in ("under_work", "worktree", "agent_starting", "agent_finished",
                         "finishing"):
                record.step(step)
            history.append(json.dumps(attempt))
            history.append(json.dumps({"kind": "closed", "closed_at": finished["time"],
                                       "outcome": finished["outcome"], **record.to_json()}))
        state.events_path(agent).write_text("\n".join(lines) + "\n")
        if in_flight and a % 2 == 0:
            task_id += 1
            store.save(TaskRecord(agent_id=agent, role=ROLE, level=LEVEL,
                                  server_url="http://pm", task={"id": task_id},
                                  previous_status="created"))
    state.history_path.write_text("\n".join(history) + "\n")
    return state


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<52} {value:>12}  {note}")


def scrape(root: Path, agents: int, tasks: int, scrapes: int) -> None:
    state = write_state(root, agents, tasks, in_flight=True)
    store = RecordStore(root)
    ids = [f"dev-{a + 1}" for a in range(agents)]
    locks = [store.runner_lock(agent).acquire() for agent in ids]
    endpoint = Endpoint("127.0.0.1:0", root, ids).start()
    url = f"http://{endpoint.addr}/metrics"
    try:
        began = time.perf_counter()
        with urllib.request.urlopen(url) as resp:
            body = resp.read()
        cold = time.perf_counter() - began
        times, cpu = [], []
        for i in range(scrapes):
            for agent in random.sample(ids, min(len(ids), 10)):  # what 15 s of a fleet writes
                for event in task_events(agent, 10**6 + i, datetime.now(UTC))[:3]:
                    state.append_event(agent, event)
            began, used = time.perf_counter(), time.process_time()
            with urllib.request.urlopen(url) as resp:
                body = resp.read()
            times.append(time.perf_counter() - began)
            cpu.append(time.process_time() - used)  # the endpoint is a thread of ours
    finally:
        endpoint.close()
        for lock in locks:
            lock.release()
    series = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
    print(f"scrape: {agents} agents, {tasks} earlier tasks each, {series} series, "
          f"{len(body) / 1000:.0f} kB")
    row("first scrape (every log read)", f"{cold * 1000:.1f} ms")
    p50, p95 = pct(times, 0.5), pct(times, 0.95)
    row("scrape p50 (what was appended since)", f"{p50 * 1000:.1f} ms")
    row("scrape p95", f"{p95 * 1000:.1f} ms",
        f"target < 50 ms: {'met' if p95 < 0.05 else 'NOT met'} ({p95 / 0.05:.2f}x of it)")
    row("CPU per scrape, p50 (client and endpoint)", f"{pct(cpu, 0.5) * 1000:.1f} ms",
        "wall time on a busy machine is mostly waiting for a core")


def once(root: Path, tasks: int, runs: int) -> None:
    agents = 20
    state = write_state(root, agents, tasks // agents)
    env = {"PMTOOL_STATE_DIR": str(root), "PMTOOL_CONFIG": os.devnull,
           "PATH": "/usr/bin:/bin"}

    def timed() -> tuple[float, bytes]:
        began = time.perf_counter()
        out = subprocess.run([PMTOOL, "metrics"], env=env, capture_output=True, check=True)
        return time.perf_counter() - began, out.stdout

    cold, warm = [], []
    for _ in range(runs):
        state.metrics_fold_path.unlink(missing_ok=True)
        seconds, text = timed()
        cold.append(seconds)
    for i in range(runs):  # cron, a minute later: what the runners wrote meanwhile
        for a in range(agents):
            for event in task_events(f"dev-{a + 1}", 10**6 + i * agents + a,
                                     datetime.now(UTC))[:4]:
                state.append_event(f"dev-{a + 1}", event)
        seconds, text = timed()
        warm.append(seconds)
    fold, fold_cpu = [], []
    for _ in range(runs):
        began, used = time.perf_counter(), time.process_time()
        Fold(root).render()
        fold.append(time.perf_counter() - began)
        fold_cpu.append(time.process_time() - used)
    start = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([PMTOOL, "model-for", "senior"], env=env, capture_output=True,
                       check=True)
        start.append(time.perf_counter() - began)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"once: {tasks} finished tasks of {agents} agents, state folder "
          f"{size / 1e6:.1f} MB, {len(text) / 1000:.0f} kB of metrics")
    for label, values in (("`pmtool metrics`, first run: every log read", cold),
                          ("`pmtool metrics` from cron, a minute later", warm)):
        med = statistics.median(values)
        row(f"{label} (median)", f"{med * 1000:.0f} ms",
            f"target < 1 s: {'met' if med < 1 else 'NOT met'} ({med:.2f}x of it)")
    row("the first run's fold and text, in-process (median)",
        f"{statistics.median(fold) * 1000:.0f} ms",
        f"CPU {statistics.median(fold_cpu) * 1000:.0f} ms")
    row("for scale: `pmtool model-for` start-up (median)",
        f"{statistics.median(start) * 1000:.0f} ms")
    row("the cron run as a multiple of that start-up",
        f"{statistics.median(warm) / statistics.median(start):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the smallest run")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--tasks-per-agent", type=int, default=50)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.tasks_per_agent, args.scrapes, args.tasks, args.runs = 4, 3, 3, 40, 1
    random.seed(22)
    work = Path(tempfile.mkdtemp(prefix="pmtool-metrics-"))
    try:
        scrape(work / "scrape", args.agents, args.tasks_per_agent, args.scrapes)
        once(work / "once", args.tasks, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

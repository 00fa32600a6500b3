"""A fleet against one server: idle load, /health under it, pickup, drain, double claims.

    .venv/bin/python benchmarks/fleet.py            # 10 processes x 10 agents, 100 singles
    .venv/bin/python benchmarks/fleet.py --smoke    # the smallest run (CI, tests)

Every agent is a real `pmtool run` (the stand-in agent `pmtool.testing.fake_agent` via
--agent-cmd, pmtool's default settings unless given: poll 2 s backing off to 10 s, settle
0.3 s). Each process is one machine: its own state folder and repository. The server is a
stand-in started for the purpose (`pmtool sandbox serve`, its own process), or a real
Headless PM when PMTOOL_TEST_PM_URL and PMTOOL_TEST_PM_KEY are set (the run stops if that
server holds backend_dev tasks it did not create that our runners could be given). A real
server keeps no request count, so there the agents talk to it through a counting proxy on
loopback (pmtool.testing.countproxy), and /health is probed straight at the server.

1. idle: P processes x A agents (`--agents A`), then S single-agent processes, each left
   idle until their polls have backed off; requests per minute per idle agent (server's
   count, less our own probe), and /health p50/p95 from a probe every 50 ms, as ratios to
   /health on the idle server measured first;
2. pickup: tasks created one at a time at random moments while each fleet is idle; from
   creation to the `claimed` event, p50/p95;
3. drain: T tasks released at once to one process of D agents (one machine) and to D
   single processes (D machines); the first's time as a ratio to the second's;
4. claims run twice: tasks claimed by more than one agent over the whole run (must be 0).

Targets (issue 11): 100 idle agents on 10 machines <= 150 requests/min in all, /health p95
<= 50 ms, pickup p95 <= 5 s; D agents on one machine drain within 1.2x of D machines.
Loopback only; processes start in batches (--start-batch) so registrations never pile up
on a real server (200 at once broke one; 60 did not); every wait has a deadline, and
every process is stopped (SIGTERM, then SIGKILL) before the benchmark ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from pmtool.config import SPECS
from pmtool.testing import fake_agent
from pmtool.testing.countproxy import CountingProxy
from pmtool.testing.seed import Seeder
from pmtool.testing.server import server_under_test

sys.path.insert(0, str(Path(__file__).resolve().parent))
from claim import health_probe  # sibling scripts: one probe, one percentile
from loop import pct

PMTOOL = str(Path(sys.executable).with_name("pmtool"))
ROLE, LEVEL = "backend_dev", "senior"
IDENTITY = {"GIT_AUTHOR_NAME": "pmtool bench", "GIT_AUTHOR_EMAIL": "bench@pmtool.invalid",
            "GIT_COMMITTER_NAME": "pmtool bench", "GIT_COMMITTER_EMAIL": "bench@pmtool.invalid"}
# task id -> its claimed and finished events, in arrival order, over every process
STORY: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
STORY_LOCK = threading.Lock()


def row(name: str, value: str, note: str = "") -> None:
    print(f"  {name:46} {value:>14}  {note}", flush=True)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


class Server:
    def __init__(self) -> None:
        self.url, self.key, self.proc = server_under_test(PMTOOL)
        host = urlsplit(self.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            self.stop()
            raise SystemExit(f"fleet.py runs against a loopback server only, not {host}")
        self.standin = self.proc is not None
        self.seeder = Seeder(self.url, self.key)
        self.proxy: CountingProxy | None = None
        if not self.standin:
            self.seeder.drain(ROLE)  # a real server's own tasks must not reach our runners
            self.proxy = CountingProxy(self.url).start()
        # Where the agents send their requests: the proxy that counts them, on a real server.
        self.agent_url = self.proxy.url if self.proxy else self.url

    def counts(self) -> dict[str, int]:
        """Requests the server has had from the agents and the /health probe so far, by
        call (our /_sandbox/ calls and the seeder's, which go straight to a real server,
        left out)."""
        if self.proxy:
            return self.proxy.counts()
        stats = requests.get(f"{self.url}/_sandbox/stats", timeout=10).json()
        return {k: v for k, v in stats["requests"].items() if "/_sandbox/" not in k}

    def probed(self, probes: int) -> int:
        """How many of `probes` /health calls `counts` saw (none past the proxy)."""
        return 0 if self.proxy else probes

    def stop(self) -> None:
        if getattr(self, "seeder", None):
            self.seeder.retire_created()
            self.seeder.close()
        if self.proxy:
            self.proxy.stop()
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


class Machine:
    """One `pmtool run` process (one machine: its own state folder and repository)."""

    def __init__(self, server: Server, work: Path, name: str, agents: int,
                 extra: list[str]) -> None:
        self.root = work / name
        repo = self.root / "repo"
        repo.mkdir(parents=True)
        for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "0"]):
            subprocess.run(["git", "-C", str(repo), *args], check=True,
                           env={**os.environ, **IDENTITY})
        (self.root / "hooks").mkdir()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMTOOL_", "HEADLESS_PM_", "API_KEY_HEADLESS_PM"))}
        env.update(IDENTITY, HEADLESS_PM_API_URL=server.agent_url, HEADLESS_PM_API_KEY=server.key,
                   PMTOOL_STATE_DIR=str(self.root / "state"),
                   PMTOOL_CONFIG=os.devnull,
                   HEADLESS_PM_HOOKS_DIR=str(self.root / "hooks"))
        many = ["--agents", str(agents)] if agents > 1 else []
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [PMTOOL, "run", "--role", ROLE, "--level", LEVEL, "--agent-id", name, *many,
             "--repo", str(repo), "--agent-cmd", fake_agent.command(), "--idle-poll", "600",
             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append((time.monotonic(), event))
            if event.get("event") in ("claimed", "finished"):
                with STORY_LOCK:
                    STORY[event["task_id"]].append(
                        (event["event"], event["agent"],
                         event.get("reason") or event.get("outcome") or ""))

    def seen(self, kind: str) -> dict[int, float]:
        with self.lock:
            return {e["task_id"]: t for t, e in self.events if e.get("event") == kind}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Fleet:
    def __init__(self, server: Server, work: Path, label: str, machines: int, agents: int,
                 extra: list[str], batch: int) -> None:
        self.label, self.agents = label, machines * agents
        self.machines: list[Machine] = []
        for i in range(machines):
            self.machines.append(Machine(server, work, f"{label}{i}", agents, extra))
            if (i + 1) % batch == 0:
                time.sleep(1.0)  # registrations in batches, never all at once

    def seen(self, kind: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for machine in self.machines:
            for task_id, at in machine.seen(kind).items():
                out[task_id] = min(at, out.get(task_id, at))
        return out

    def stop(self) -> None:
        for machine in self.machines:
            machine.stop()
        deadline = time.monotonic() + 60
        for machine in self.machines:
            machine.reap(max(1.0, deadline - time.monotonic()))


def probe(url: str, seconds: float) -> list[float]:
    """/health latencies for `seconds`, one request at a time, 50 ms apart."""
    stop, out = threading.Event(), []
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    health_probe(url, stop, out)
    return out


def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def idle_and_pickup(server: Server, fleet: Fleet, warmup: float, window: float,
                    pickups: int, spacing: float, pickup_wait: float,
                    health_base: float) -> dict[str, float]:
    print(f"{fleet.label}: {len(fleet.machines)} processes, {fleet.agents} agents, idle")
    time.sleep(warmup)  # the polls back off to their idle pace
    before = server.counts()
    lat = probe(server.url, window)
    during = {k: v - before.get(k, 0) for k, v in server.counts().items()}
    probes = server.probed(len(lat))
    if probes:
        during = {k: v - probes if k.endswith(" /health") else v for k, v in during.items()}
    out: dict[str, float] = {}
    rate = sum(during.values()) / window * 60
    out["rate"] = rate
    row("requests/min, whole fleet", f"{rate:.1f}")
    row("requests/min per idle agent", f"{rate / fleet.agents:.2f}")
    top = sorted(((n, k) for k, n in during.items() if n), reverse=True)[:4]
    row("  of which, per minute", "", ", ".join(f"{k} {n / window * 60:.0f}" for n, k in top))
    p50, p95 = statistics.median(lat), pct(lat, 0.95)
    out["health_p95"] = p95
    row("/health p50 under the idle fleet", f"{p50 * 1000:.1f} ms",
        f"{p50 / health_base:.1f}x idle server")
    row("/health p95 under the idle fleet", f"{p95 * 1000:.1f} ms",
        f"{p95 / health_base:.1f}x; target <= 50 ms: {verdict(p95 <= 0.05)}")
    created: dict[int, float] = {}
    for i in range(pickups):
        time.sleep(spacing * random.uniform(0.5, 1.5))
        task = server.seeder.create_task(title=f"pickup {fleet.label} {i}",
                                         difficulty="junior")
        created[task["id"]] = time.monotonic()
    wait_until(lambda: set(created) <= set(fleet.seen("claimed")), pickup_wait)
    claimed = fleet.seen("claimed")
    times = [claimed[t] - c for t, c in created.items() if t in claimed]
    if times:
        out["pickup_p95"] = pct(times, 0.95)
        row("pickup p50 (created -> claimed)", f"{statistics.median(times):.2f} s")
        row("pickup p95", f"{pct(times, 0.95):.2f} s",
            f"target <= 5 s: {verdict(pct(times, 0.95) <= 5)}")
    row("tasks picked up", f"{len(times)}/{pickups}")
    return out


def drain(server: Server, work: Path, label: str, machines: int, agents: int, tasks: int,
          extra: list[str], batch: int, timeout: float) -> float | None:
    """Seconds from releasing `tasks` at once to the last one finished."""
    ids = [server.seeder.create_task(title=f"drain {label} {i}", difficulty="junior",
                                     promote=False)["id"] for i in range(tasks)]
    fleet = Fleet(server, work, label, machines, agents, extra, batch)
    try:
        time.sleep(3.0)  # every runner up and waiting
        start = time.monotonic()
        for task_id in ids:
            server.seeder.set_status(task_id, "created")
        done = wait_until(lambda: set(ids) <= set(fleet.seen("finished")), timeout)
        return (max(fleet.seen("finished")[t] for t in ids) - start) if done else None
    finally:
        fleet.stop()


def double_claims() -> tuple[list[int], int]:
    """Tasks an agent claimed while another's claim of it was still open (never finished
    nor given back), and how many tasks were claimed again after being given back."""
    twice, again = [], 0
    with STORY_LOCK:
        for task_id, story in STORY.items():
            holder, claims = None, 0
            for kind, agent, _outcome in story:
                if kind == "claimed":
                    claims += 1
                    if holder is not None and holder != agent:
                        twice.append(task_id)
                        break
                    holder = agent
                elif agent == holder:
                    holder = None
            again += claims > 1
    return twice, again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run: 2 processes x 2 agents, 4 singles, short waits")
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--drain-agents", type=int, default=10)
    parser.add_argument("--drain-tasks", type=int, default=50)
    parser.add_argument("--pickups", type=int, default=20)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of idle counted")
    parser.add_argument("--poll-interval", type=float, default=None)
    parser.add_argument("--poll-max", type=float, default=None)
    parser.add_argument("--start-batch", type=int, default=20,
                        help="processes started at once, at most")
    args = parser.parse_args()
    if args.smoke:
        args.processes, args.agents, args.singles = 2, 2, 4
        args.drain_agents, args.drain_tasks, args.pickups, args.window = 2, 4, 2, 3.0
        args.poll_interval = args.poll_interval or 0.2
        args.poll_max = args.poll_max or 0.8
    extra = [*(["--poll-interval", str(args.poll_interval)] if args.poll_interval else []),
             *(["--poll-max", str(args.poll_max)] if args.poll_max else [])]
    poll_max = args.poll_max or SPECS["poll_max"].default
    base_interval = args.poll_interval or SPECS["poll_interval"].default
    # Idle polls double from poll_interval up to poll_max: wait that ramp out.
    ramp, step = 0.0, base_interval
    while step < poll_max:
        ramp, step = ramp + step, step * 2
    warmup = ramp + 3.0
    # A window shorter than the idle interval counts 0 or 1 poll per machine: noise.
    args.window = max(args.window, poll_max)
    began = time.monotonic()
    server = Server()
    work = Path(tempfile.mkdtemp(prefix="pmtool-fleet-"))
    print(f"server: {'stand-in' if server.standin else 'real, agents through a counting proxy'}"
          f" at {server.url}; "
          f"poll {base_interval:g} s .. {poll_max:g} s")
    results: dict[str, dict[str, float]] = {}
    try:
        idle = probe(server.url, min(5.0, args.window))
        base = pct(idle, 0.95)
        row("/health p95, idle server (baseline)", f"{base * 1000:.1f} ms", "1.00x")
        for label, machines, agents in (("fleet", args.processes, args.agents),
                                        ("single", args.singles, 1)):
            fleet = Fleet(server, work, label, machines, agents, extra, args.start_batch)
            try:
                results[label] = idle_and_pickup(
                    server, fleet, warmup, args.window, args.pickups,
                    spacing=min(poll_max, 5.0), pickup_wait=poll_max * 2 + 15,
                    health_base=base)
            finally:
                fleet.stop()
        fleet_rate, single_rate = (results["fleet"].get("rate"), results["single"].get("rate"))
        if fleet_rate is not None and single_rate:
            per_fleet = fleet_rate / (args.processes * args.agents)
            per_single = single_rate / args.singles
            row("idle requests per agent, fleet vs singles", f"{per_fleet / per_single:.2f}x")
            scaled = per_fleet * 100
            row("idle requests/min for 100 agents like these", f"{scaled:.0f}",
                "smoke: fast polls, not the target's settings" if args.smoke
                else f"target <= 150: {verdict(scaled <= 150)}")
        print(f"drain: {args.drain_tasks} tasks, {args.drain_agents} agents")
        one = drain(server, work, "dm", 1, args.drain_agents, args.drain_tasks, extra,
                    args.start_batch, timeout=300)
        many = drain(server, work, "ds", args.drain_agents, 1, args.drain_tasks, extra,
                     args.start_batch, timeout=300)
        if one and many:
            row("drain, one machine of N agents", f"{one:.2f} s")
            row("drain, N single-agent machines", f"{many:.2f} s")
            row("one machine vs N machines", f"{one / many:.2f}x",
                f"target <= 1.2x: {verdict(one / many <= 1.2)}")
        else:
            row("drain", "did not finish", f"one machine {one}, N machines {many}")
        twice, again = double_claims()
        row("claims run twice", str(len(twice)), "must be 0")
        row("tasks claimed again after a give-back", str(again))
        for task_id, story in STORY.items():
            if task_id in twice or sum(kind == "claimed" for kind, _, _ in story) > 1:
                print(f"    task {task_id}: {story}")
        if twice:
            sys.exit(1)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()

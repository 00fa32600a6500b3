"""The run loop: per-task overhead, pickup latency and idle server load, each next to a
baseline measured in the same run.

    .venv/bin/python benchmarks/loop.py [--quick]

Every runner is a real `pmtool run` process with the stand-in agent
(`pmtool.testing.fake_agent` via --agent-cmd) and default settings (claim settle 0.3 s,
idle poll 30 s), no hooks. The server is a stand-in started for the purpose (`pmtool
sandbox serve`, its own process; one per concurrent measurement, so their request counts
stay apart), or a real Headless PM when PMTOOL_TEST_PM_URL and PMTOOL_TEST_PM_KEY are set
(it stops if the server holds pickable backend_dev tasks it did not create; the load
figures and the concurrent baselines need the stand-in and are skipped).

1. overhead: ~10 major tasks on a generated 1,000-file repository (nested folders, one
   commit). Per task, the loop's wall time (from the end of the previous task, or the
   process start, to the event that removed its worktree) minus the agent's own run time
   (the `agent` event's duration_s). Baseline: the same agent command run directly in a
   worktree of that repository. Also `pmtool run --single-task` as one process per task.
2. pickup: an idle `pmtool run`; tasks are created one at a time at random moments, and
   the latency runs from the moment the task became `created` to the runner's `claimed`
   event (printed once the server shows it `under_work`). Baseline, at the same time on a
   second stand-in: a fresh `pmtool claim --wait` process per task.
3. idle load: requests per minute per idle runner, from the stand-in's /_sandbox/stats
   over 30 s, with 1 and with 5 idle `pmtool run` processes; baseline: one idle
   `pmtool claim --wait`. The three run at the same time on three stand-ins.

Targets (issue 5): overhead <= 1.5 s per task; pickup p50 <= 2 s, p95 <= 5 s.
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
from pathlib import Path
from typing import Any

import requests

from pmtool.testing import fake_agent
from pmtool.testing.seed import Seeder, unique_id
from pmtool.testing.server import server_under_test

PMTOOL = str(Path(sys.executable).with_name("pmtool"))
ROLE, LEVEL = "backend_dev", "senior"
IDENTITY = {"GIT_AUTHOR_NAME": "pmtool bench", "GIT_AUTHOR_EMAIL": "bench@pmtool.invalid",
            "GIT_COMMITTER_NAME": "pmtool bench", "GIT_COMMITTER_EMAIL": "bench@pmtool.invalid"}
ROWS: list[tuple[str, str, str, str, str]] = []


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def secs(value: float) -> str:
    return f"{value:.2f} s"


def row(name: str, value: str, baseline: str = "", ratio: str = "", target: str = "") -> None:
    ROWS.append((name, value, baseline, ratio, target))
    print(f"  {name:46} {value:>12} {baseline:>12} {ratio:>7}  {target}", flush=True)


def verdict(value: float, limit: float, unit: str = "s") -> str:
    return f"<= {limit:g} {unit}: {'met' if value <= limit else 'MISSED'}"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True, env={**os.environ, **IDENTITY}).stdout.strip()


def make_repo(path: Path, files: int = 1000) -> Path:
    """A git repository with `files` committed files in nested folders (10 x 10 x n)."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for i in range(files):
        folder = path / "src" / f"pkg{i // 100:02d}" / f"mod{i // 10 % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{i:04d}.py").write_text(
            f'"""Generated file {i}."""\n\n\ndef f{i}(x: int) -> int:\n    return x + {i}\n')
    (path / "README.md").write_text("# benchmark project\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", f"{files} generated files")
    return path


# -- servers and runners --------------------------------------------------------------------


class Server:
    """A stand-in in its own process, or the real server from the environment."""

    def __init__(self) -> None:
        self.url, self.key, self.proc = server_under_test(PMTOOL)
        self.standin = self.proc is not None
        self.seeder = Seeder(self.url, self.key)
        if not self.standin:
            # A guest: someone else's pickable task stops the run rather than being parked.
            self.seeder.foreign = {(t["id"], t.get("created_at"))
                                   for t in self.seeder.list_tasks()}
            self.seeder.drain(ROLE)

    def requests(self) -> dict[str, int]:
        """Requests served so far, by endpoint; our own /_sandbox/ calls left out."""
        stats = requests.get(f"{self.url}/_sandbox/stats", timeout=10).json()
        return {k: v for k, v in stats["requests"].items() if "/_sandbox/" not in k}

    def env(self, state: Path, hooks: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMTOOL_", "HEADLESS_PM_", "API_KEY_HEADLESS_PM"))}
        return {**env, **IDENTITY, "HEADLESS_PM_API_URL": self.url,
                "HEADLESS_PM_API_KEY": self.key, "PMTOOL_STATE_DIR": str(state),
                "PMTOOL_CONFIG": os.devnull,
                "HEADLESS_PM_HOOKS_DIR": str(hooks)}

    def stop(self) -> None:
        self.seeder.retire_created()
        self.seeder.close()
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


class Runner:
    """A `pmtool run` process; its events are stamped with our clock as they arrive."""

    def __init__(self, server: Server, work: Path, repo: Path, *extra: str) -> None:
        self.agent = unique_id("bench")
        state = work / self.agent
        hooks = work / "hooks"
        hooks.mkdir(parents=True, exist_ok=True)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.done = False
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [PMTOOL, "run", "--role", ROLE, "--level", LEVEL, "--agent-id", self.agent,
             "--repo", str(repo), "--agent-cmd", fake_agent.command(), *extra],
            env=server.env(state, hooks), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.changed:
                self.events.append((time.monotonic(), event))
                self.changed.notify_all()
        with self.changed:
            self.done = True  # no more events: waiters stop waiting
            self.changed.notify_all()

    def wait_for(self, test: Any, timeout: float = 60) -> tuple[float, dict[str, Any]]:
        """The first event (arrival time, event) that passes `test`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for stamp, event in self.events:
                    if test(event):
                        return stamp, event
                left = deadline - time.monotonic()
                if left <= 0 or self.done:
                    raise TimeoutError(f"{self.agent}: no such event; last: "
                                       f"{[e for _, e in self.events[-3:]]}")
                self.changed.wait(left)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def task_done(task_id: int) -> Any:
    """The event that ends a task's turn: its worktree removed (major tasks)."""
    return lambda e: (e.get("task_id") == task_id and e["event"] == "worktree"
                      and "removed" in e)


# -- 0. baseline: the agent alone -----------------------------------------------------------


def agent_alone(repo: Path, runs: int) -> float:
    """The agent command run directly on a prompt in a worktree, as pmtool would run it."""
    tree = repo / ".worktrees" / "baseline"
    git(repo, "worktree", "add", "-q", "-b", "bench/baseline", str(tree))
    cmd = fake_agent.command().split()
    env = {**os.environ, **IDENTITY, "PMTOOL_ROLE": ROLE}
    times = []
    for i in range(runs):
        prompt = f"Role: {ROLE}\n\nTask base{i}: baseline run\n\nDo the work.\n"
        start = time.perf_counter()
        subprocess.run(cmd, input=prompt, cwd=tree, capture_output=True, text=True,
                       env={**env, "PMTOOL_TASK_ID": f"base{i}"}, check=True)
        times.append(time.perf_counter() - start)
    git(repo, "worktree", "remove", "--force", str(tree))
    return statistics.median(times)


# -- 1. overhead per task -------------------------------------------------------------------


def overhead(server: Server, work: Path, repo: Path, tasks: int, single_runs: int,
             base: float) -> None:
    print(f"overhead: {tasks} major tasks, one `pmtool run`, 1,000-file repository")
    ids = [server.seeder.create_task(title=f"overhead {i}", complexity="major",
                                     branch=f"bench/overhead-{i}")["id"]
           for i in range(tasks)]
    runner = Runner(server, work, repo, "--max-tasks", str(tasks))
    walls, agents = [], []
    parts: dict[str, list[float]] = {"claim": [], "pre_task + worktree": [],
                                      "agent start and stop": [],
                                      "finish + post_task + removal": []}
    previous = runner.started
    for task_id in ids:
        end, _ = runner.wait_for(task_done(task_id), timeout=120)

        def at(kind: str, t: int = task_id) -> tuple[float, dict[str, Any]]:
            return runner.wait_for(lambda e: e["event"] == kind and e.get("task_id") == t
                                   and "removed" not in e)

        (claimed, _), (tree, _), (ran, agent) = at("claimed"), at("worktree"), at("agent")
        walls.append(end - previous)
        agents.append(float(agent["duration_s"]))
        for name, value in zip(parts, (claimed - previous, tree - claimed,
                                       ran - tree - agents[-1], end - ran), strict=True):
            parts[name].append(value)
        previous = end
    runner.stop()
    over = [w - a for w, a in zip(walls, agents, strict=True)]
    row("agent run inside the loop (duration_s), median", secs(statistics.median(agents)),
        secs(base), f"{statistics.median(agents) / base:.2f}x")
    row("loop wall time per task, median", secs(statistics.median(walls)), secs(base),
        f"{statistics.median(walls) / base:.1f}x")
    row("loop overhead per task (wall - agent), median", secs(statistics.median(over)),
        secs(base), f"{statistics.median(over) / base:.1f}x", verdict(statistics.median(over),
                                                                     1.5))
    row("loop overhead per task, p95", secs(pct(over, 0.95)), secs(base),
        f"{pct(over, 0.95) / base:.1f}x", verdict(pct(over, 0.95), 1.5))
    row("  overhead of the first task (with start-up)", secs(over[0]))
    print("    per step, medians: " + ", ".join(
        f"{name} {statistics.median(values):.2f} s" for name, values in parts.items()))

    # One process per task, as a cron job or `--single-task` script would run it.
    singles = []
    for i in range(single_runs):
        task_id = server.seeder.create_task(title=f"single {i}", complexity="major",
                                            branch=f"bench/single-{i}")["id"]
        start = time.monotonic()
        one = Runner(server, work, repo, "--single-task")
        code = one.proc.wait(120)
        wall = time.monotonic() - start
        one.reader.join(5)
        _, agent = one.wait_for(lambda e, t=task_id: e["event"] == "agent"
                                and e.get("task_id") == t)
        assert code == 0, one.events[-1]
        singles.append(wall - float(agent["duration_s"]))
    med = statistics.median(singles)
    row("`pmtool run --single-task` overhead, median", secs(med), secs(base),
        f"{med / base:.1f}x", "(a process per task)")


# -- 2. pickup latency ----------------------------------------------------------------------


def pickup_runner(server: Server, work: Path, repo: Path, tasks: int,
                  out: list[float]) -> None:
    runner = Runner(server, work, repo)
    time.sleep(3)  # start-up done: health check, recover, the first polls
    for i in range(tasks):
        time.sleep(random.uniform(1.0, 4.0))  # a random moment of an idle runner
        task_id = server.seeder.create_task(title=f"pickup {i}", complexity="major",
                                            branch=f"bench/pickup-{i}")["id"]
        created = time.monotonic()
        claimed, _ = runner.wait_for(lambda e, t=task_id: e["event"] == "claimed"
                                     and e.get("task_id") == t)
        out.append(claimed - created)
        runner.wait_for(task_done(task_id))
    runner.stop()


def pickup_claim(server: Server, work: Path, tasks: int, out: list[float]) -> None:
    """Baseline: the claim subcommand waiting on its own, a new process per task."""
    hooks = work / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    for i in range(tasks):
        agent = unique_id("claimer")
        proc = subprocess.Popen(
            [PMTOOL, "claim", "--agent-id", agent, "--role", ROLE, "--level", LEVEL,
             "--wait", "60"], env=server.env(work / agent, hooks),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(random.uniform(1.0, 4.0))
        server.seeder.create_task(title=f"claim pickup {i}")
        created = time.monotonic()
        stdout, _ = proc.communicate(timeout=60)
        out.append(time.monotonic() - created)
        assert json.loads(stdout)["ok"], stdout


def pickup(server: Server, second: Server | None, work: Path, repo: Path,
           tasks: int) -> None:
    print(f"pickup: {tasks} tasks created at random moments for an idle runner")
    loop: list[float] = []
    claim: list[float] = []
    threads = [threading.Thread(target=pickup_runner, args=(server, work, repo, tasks, loop))]
    if second:
        threads.append(threading.Thread(target=pickup_claim,
                                        args=(second, work / "claim", tasks, claim)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    base50 = statistics.median(claim) if claim else None
    base95 = pct(claim, 0.95) if claim else None
    for name, value, b, limit in (("pickup latency p50 (created -> under_work)",
                                   statistics.median(loop), base50, 2.0),
                                  ("pickup latency p95", pct(loop, 0.95), base95, 5.0)):
        row(name, secs(value), secs(b) if b else "n/a", f"{value / b:.2f}x" if b else "",
            verdict(value, limit))
    if claim:
        row("  baseline: `pmtool claim --wait`, p50 / p95",
            f"{base50:.2f}/{base95:.2f} s")


# -- 3. idle load ---------------------------------------------------------------------------


def idle_load(servers: list[Server], work: Path, repo: Path, seconds: float) -> None:
    one, five, claim_server = servers
    print(f"idle load: requests per minute over {seconds:g} s, no tasks")
    runners = [Runner(one, work / "one", repo)]
    runners += [Runner(five, work / "five", repo) for _ in range(5)]
    hooks = work / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    agent = unique_id("idleclaim")
    claimer = subprocess.Popen(
        [PMTOOL, "claim", "--agent-id", agent, "--role", ROLE, "--level", LEVEL,
         "--wait", str(seconds + 60)], env=claim_server.env(work / agent, hooks),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # past start-up (health check, recover, register)
    before = [s.requests() for s in servers]
    start = time.monotonic()
    time.sleep(seconds)
    after = [s.requests() for s in servers]
    minutes = (time.monotonic() - start) / 60
    for r in runners:
        r.stop()
    claimer.terminate()
    claimer.wait(10)
    rates = [(sum(a.values()) - sum(b.values())) / minutes
             for a, b in zip(after, before, strict=True)]
    base = rates[2]
    row("baseline: one idle `pmtool claim --wait`", f"{base:.0f}/min")
    row("1 idle `pmtool run`, requests per minute", f"{rates[0]:.0f}/min", f"{base:.0f}/min",
        f"{rates[0] / base:.1f}x")
    row("5 idle `pmtool run`, per runner", f"{rates[1] / 5:.0f}/min", f"{base:.0f}/min",
        f"{rates[1] / 5 / base:.1f}x", f"({rates[1]:.0f}/min in all)")
    mix = {k: v - before[0].get(k, 0) for k, v in after[0].items()}
    print("    1 runner, by endpoint: " + ", ".join(
        f"{k} {v / minutes:.0f}/min" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])
        if v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tasks, shorter windows")
    parser.add_argument("--tasks", type=int, default=10, help="tasks for overhead and pickup")
    args = parser.parse_args()
    tasks = 5 if args.quick else args.tasks
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pmtool-bench-loop-"))
    servers: list[Server] = []
    try:
        server = Server()
        servers.append(server)
        print(f"server: {'stand-in' if server.standin else 'real'} at {server.url}")
        repo = make_repo(work / "repo")
        print(f"repository: {work / 'repo'}, {git(repo, 'ls-files').count(chr(10)) + 1} files")
        print(f"  {'':46} {'value':>12} {'baseline':>12} {'ratio':>7}  target")
        base = agent_alone(repo, runs=7)
        row("baseline: the agent alone in a worktree, median", secs(base), secs(base),
            "1.00x")
        overhead(server, work, repo, tasks, single_runs=3 if args.quick else 5, base=base)
        if server.standin:
            servers += [Server(), Server()]
        pickup(server, servers[1] if server.standin else None, work, repo, tasks)
        if server.standin:
            idle_load(servers, work, repo, seconds=15 if args.quick else 30)
        else:
            print("idle load: skipped (needs the stand-in's /_sandbox/stats)")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()

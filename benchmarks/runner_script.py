"""`scripts/pm-runner.sh` next to `pmtool run`: overhead, CPU time and processes per task.

    .venv/bin/python benchmarks/runner_script.py [--tasks 5] [--rounds 2] [--files 1000]
    .venv/bin/python benchmarks/runner_script.py --script /tmp/old-pm-runner.sh  # also that one

Each round gives N major tasks to `pm-runner.sh --max-tasks N`, then N more to
`pmtool run --max-tasks N` (the baseline, measured in the same run, one after the other so
that the machine's load falls on both), both with the stand-in agent
(`pmtool.testing.fake_agent` via --agent-cmd), default settings and no hooks, on a
generated repository (1,000 files by default, as benchmarks/loop.py). The server is a
stand-in started for the purpose, or a real Headless PM when PMTOOL_TEST_PM_URL and
PMTOOL_TEST_PM_KEY are set (it stops if the server holds pickable tasks of the role it did
not create: `--role` picks one nobody else uses).

- overhead per task: wall time from the end of the previous task (or the process start)
  to the task's last line (the script: the last line before the next claim; `pmtool run`:
  the event that removed the worktree), minus the agent's own run time (`duration_s` of
  exec-claude's answer, of the `agent` event); median and p95, and the ratio to
  `pmtool run`'s.
- CPU time per task: user + system time of the runner and everything it started
  (RUSAGE_CHILDREN, taken around each runner process), less the agent's own CPU time
  (the agent command run alone, measured first). Steadier than wall time on a shared
  machine.
- processes per task: a separate, untimed run with logging `pmtool` and `jq` wrappers
  (they cost a bash start each, so they stay out of the timed runs).

Every runner has a deadline (60 s, and 30 s a task): past it, its process group is stopped
and the run ends with an error; a SIGTERM ends the run the same way. Either way our tasks
are retired (committed) on the server, which is left as it was otherwise.

`--script PATH` (repeatable) measures another version of the script in the same run, e.g.
main's: `git show main:scripts/pm-runner.sh >/tmp/main-runner.sh; chmod +x /tmp/main-runner.sh`.

Target (issue 11): pm-runner.sh overhead <= 1.5 s per task.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import resource
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

import pmtool
from pmtool.testing import fake_agent
from pmtool.testing.seed import unique_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loop
from loop import IDENTITY, LEVEL, PMTOOL, Server, git, make_repo, pct

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pm-runner.sh"
BIN = str(Path(PMTOOL).parent)
JQ = shutil.which("jq")
DEADLINE, TASK_DEADLINE = 60.0, 30.0  # seconds a runner may take: then it is stopped


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Lines:
    """A runner's stdout, each JSON line stamped with our clock as it arrives. A runner
    still going after `deadline` seconds (a task it never gets) is stopped, its whole
    process group: SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path,
                 deadline: float) -> None:
        self.cpu_before = cpu()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self.stderr = ""
        self.timed_out = False
        errors = threading.Thread(target=self._errors, daemon=True)
        errors.start()
        timer = threading.Timer(deadline, self._stop)
        timer.start()
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), json.loads(line)))
            self.code = self.proc.wait(60)
        finally:
            timer.cancel()
            if self.proc.poll() is None:
                self._stop()
        errors.join(10)
        self.cpu = cpu() - self.cpu_before  # every child reaped: the whole tree's time

    def _stop(self) -> None:
        self.timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
                return
            except subprocess.TimeoutExpired:
                continue

    def _errors(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()


def script_tasks(run: Lines) -> list[tuple[float, float]]:
    """(wall, agent) per task: a task ends at the last line before the next claim."""
    tasks: list[tuple[float, float]] = []
    start, end, agent, claimed = run.started, None, 0.0, False
    for stamp, obj in run.lines:
        if ("claim" in obj and "record" in obj) or obj.get("event") == "stopped":
            if claimed and end is not None:
                tasks.append((end - start, agent))
                start = end
            claimed, agent = "claim" in obj, 0.0
        elif "verdict_source" in obj:  # exec-claude's answer
            agent += float(obj.get("duration_s") or 0.0)
        end = stamp
    return tasks


def loop_tasks(run: Lines) -> list[tuple[float, float]]:
    """(wall, agent) per task: a task ends with the event that removed its worktree."""
    tasks: list[tuple[float, float]] = []
    start, agent = run.started, 0.0
    for stamp, event in run.lines:
        if event.get("event") == "agent":
            agent += float(event.get("duration_s") or 0.0)
        elif event.get("event") == "worktree" and "removed" in event:
            tasks.append((stamp - start, agent))
            start, agent = stamp, 0.0
    return tasks


class Bench:
    def __init__(self, server: Server, work: Path, repo: Path, role: str) -> None:
        self.server, self.work, self.repo, self.role = server, work, repo, role
        self.hooks = work / "hooks"
        self.hooks.mkdir(exist_ok=True)
        self.made = 0

    def env(self, agent: str, **extra: str) -> dict[str, str]:
        env = self.server.env(self.work / agent, self.hooks)
        return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                "PMTOOL": PMTOOL, **extra}

    def tasks(self, n: int, label: str) -> list[int]:
        ids = []
        for _ in range(n):
            self.made += 1
            ids.append(self.server.seeder.create_task(
                title=f"{label} {self.made}", complexity="major", target_role=self.role,
                branch=f"bench/{label}-{self.made}")["id"])
        return ids

    def check(self, run: Lines, ids: list[int], what: str) -> None:
        if run.timed_out:
            raise SystemExit(f"{what}: stopped at its deadline, {len(ids)} tasks not done "
                             f"in time:\n{run.stderr[-2000:]}")
        if run.code != 0:
            raise SystemExit(f"{what} exited {run.code}:\n{run.stderr[-2000:]}")
        for task_id in ids:
            status = (self.server.seeder.get_task(task_id) or {}).get("status")
            if status != "dev_done":
                raise SystemExit(f"{what}: task {task_id} is {status}, not dev_done")

    def script(self, path: Path, n: int, **env: str) -> Lines:
        agent = unique_id("benchsh")
        ids = self.tasks(n, "script")
        run = Lines([str(path), "--role", self.role, "--level", LEVEL, "--agent-id", agent,
                     "--repo", str(self.repo), "--agent-cmd", fake_agent.command(),
                     "--max-tasks", str(n)], self.env(agent, **env), self.repo,
                    deadline=DEADLINE + TASK_DEADLINE * n)
        self.check(run, ids, str(path))
        return run

    def loop(self, n: int) -> Lines:
        agent = unique_id("benchrun")
        ids = self.tasks(n, "run")
        run = Lines([PMTOOL, "run", "--role", self.role, "--level", LEVEL, "--agent-id", agent,
                     "--repo", str(self.repo), "--agent-cmd", fake_agent.command(),
                     "--max-tasks", str(n)], self.env(agent), self.repo,
                    deadline=DEADLINE + TASK_DEADLINE * n)
        self.check(run, ids, "pmtool run")
        return run

    def processes(self, path: Path, n: int) -> dict[str, float]:
        """pmtool and jq processes per task (after the first: start-up apart), counted by
        wrappers that log each start, then exec the real one."""
        wrappers = self.work / f"count-{self.made}"
        wrappers.mkdir()
        log = wrappers / "starts.log"
        for name, real in (("pmtool", PMTOOL), ("jq", JQ)):
            wrapper = wrappers / name
            wrapper.write_text(f"#!/bin/bash\nprintf '%s %s\\n' {name} \"$1\" >>'{log}'\n"
                               f"exec '{real}' \"$@\"\n")
            wrapper.chmod(0o755)
        env = self.env("counting")
        self.script(path, n, PMTOOL=str(wrappers / "pmtool"),
                    PATH=f"{wrappers}{os.pathsep}{env['PATH']}")
        starts = log.read_text().split("\n")
        claims = [i for i, s in enumerate(starts) if s == "pmtool claim"]
        steady = starts[claims[1]:claims[-1]] if len(claims) > 2 else starts[claims[0]:]
        per = max(len(claims) - 2, 1) if len(claims) > 2 else len(claims)
        return {"pmtool": sum(s.startswith("pmtool ") for s in steady) / per,
                "jq": sum(s.startswith("jq ") for s in steady) / per,
                "pmtool_all": sum(s.startswith("pmtool ") for s in starts) / n,
                "jq_all": sum(s.startswith("jq ") for s in starts) / n}


def agent_alone(repo: Path, runs: int, role: str) -> tuple[float, float]:
    """The agent command run directly in a worktree: (median wall, mean CPU time)."""
    tree = repo / ".worktrees" / "baseline"
    git(repo, "worktree", "add", "-q", "-b", "bench/baseline", str(tree))
    env = {**os.environ, **IDENTITY, "PMTOOL_ROLE": role}
    walls = []
    before = cpu()
    for i in range(runs):
        start = time.perf_counter()
        subprocess.run(fake_agent.command().split(),
                       input=f"Role: {role}\n\nTask base{i}: baseline\n\nDo the work.\n",
                       cwd=tree, capture_output=True, text=True,
                       env={**env, "PMTOOL_TASK_ID": f"base{i}"}, check=True)
        walls.append(time.perf_counter() - start)
    spent = (cpu() - before) / runs
    git(repo, "worktree", "remove", "--force", str(tree))
    return statistics.median(walls), spent


def show(name: str, over: list[float], cpus: list[float], base: dict[str, float] | None,
         target: bool) -> dict[str, float]:
    med, p95, cpu_med = statistics.median(over), pct(over, 0.95), statistics.median(cpus)

    def ratio(value: float, key: str) -> str:
        return f"{value / base[key]:.2f}x" if base else "1.00x"

    mark = f"<= 1.5 s: {'met' if med <= 1.5 else 'MISSED'}" if target else ""
    print(f"  {name:34} {med:7.2f} s {ratio(med, 'med'):>7} {p95:7.2f} s "
          f"{ratio(p95, 'p95'):>7} {cpu_med:7.2f} s {ratio(cpu_med, 'cpu'):>7}  {mark}",
          flush=True)
    return {"med": med, "p95": p95, "cpu": cpu_med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5, help="tasks per runner per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (script, then run)")
    parser.add_argument("--files", type=int, default=1000, help="files in the repository")
    parser.add_argument("--role", default=loop.ROLE,
                        help="the tasks' role, not qa (a real server: one nobody else uses)")
    parser.add_argument("--script", type=Path, action="append", default=[],
                        help="another pm-runner.sh to measure too (repeatable)")
    args = parser.parse_args()
    if JQ is None:
        raise SystemExit("pm-runner.sh needs jq")
    scripts = [SCRIPT, *[p.resolve() for p in args.script]]
    # Byte-code, as an installed pmtool has it: without it (PYTHONDONTWRITEBYTECODE in a
    # checkout) every pmtool process compiles its modules, and the script pays that 4x a task.
    compileall.compile_dir(Path(pmtool.__file__).parent, quiet=1)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pmtool-bench-script-"))
    server = None
    loop.ROLE = args.role  # the role whose pickable tasks a real server must not have
    # A SIGTERM (timeout, CI) still runs the clean-up below: runners stopped, our tasks
    # retired on the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        server = Server()
        print(f"server: {'stand-in' if server.standin else 'real'} at {server.url}; "
              f"load {os.getloadavg()[0]:.1f} at the start")
        repo = make_repo(work / "repo", args.files)
        bench = Bench(server, work, repo, args.role)
        wall_alone, cpu_alone = agent_alone(repo, runs=5, role=args.role)
        print(f"agent alone: {wall_alone:.2f} s wall, {cpu_alone:.2f} s CPU per run; "
              f"{args.rounds} rounds x {args.tasks} major tasks per runner, "
              f"{args.files}-file repository, no hooks, role {args.role}")
        over: dict[str, list[float]] = {str(s): [] for s in [*scripts, "run"]}
        cpus: dict[str, list[float]] = {k: [] for k in over}
        firsts: dict[str, list[float]] = {k: [] for k in over}
        for _ in range(args.rounds):
            for name in over:
                if name == "run":
                    run, tasks = bench.loop(args.tasks), None
                    tasks = loop_tasks(run)
                else:
                    run = bench.script(Path(name), args.tasks)
                    tasks = script_tasks(run)
                assert len(tasks) == args.tasks, (name, tasks, run.lines[-3:])
                gaps = [w - a for w, a in tasks]
                firsts[name].append(gaps[0])
                over[name] += gaps
                cpus[name].append(run.cpu / args.tasks - cpu_alone)
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              "(1 / 5 / 15 min)")
        print(f"  {'per task (wall - agent; CPU - agent)':34} {'median':>9} {'ratio':>7} "
              f"{'p95':>9} {'ratio':>7} {'CPU':>9} {'ratio':>7}")
        base = show("`pmtool run` (baseline)", over["run"], cpus["run"], None, False)
        for path in scripts:
            label = "pm-runner.sh" if path == SCRIPT else path.name
            show(label, over[str(path)], cpus[str(path)], base, True)
        print("  first task of each run (with start-up): " + "; ".join(
            f"{'run' if k == 'run' else Path(k).name} "
            + "/".join(f"{v:.2f}" for v in firsts[k]) + " s" for k in over))
        for path in scripts:
            count = bench.processes(path, 3)
            print(f"  processes per task, {path.name}: {count['pmtool']:g} pmtool, "
                  f"{count['jq']:g} jq (with start and stop, over 3 tasks: "
                  f"{count['pmtool_all']:.1f} pmtool, {count['jq_all']:.1f} jq); "
                  "`pmtool run`: 0 (one process for all tasks)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()

"""`pmtool run` left alone overnight: every failure ends bounded and visible (issue 9).

Real `pmtool run` processes against a private stand-in server, in real git repositories,
with the fake agent (the real claude binary: tests/e2e/test_claude_loop.py). The
counts the issue asks for are asserted here: a `blocked` task runs once, an always-failing
task at most max_attempts times, a ping-pong task is parked after max_bounces QA fails,
a missing claude or a wrong key ends the run before any claim, and an outage of the
server in the middle of a task ends with the task dev_done once and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    PMTOOL,
    ROOT,
    Run,
    World,
    attempt_lines,
    dev_done_count,
    events,
    wait_for,
)
from pmtool.testing.fake_agent import command as fake_agent_command


class Watched:
    """A running `pmtool run`: its events as they come (stdout and stderr read by threads,
    so neither pipe fills up), and its end on SIGTERM."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.events, self.err = proc, [], []
        self.readers = [threading.Thread(target=self._out, daemon=True),
                        threading.Thread(target=self._err, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.events.extend(events(line))

    def _err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def count(self, kind: str, **match: Any) -> int:
        return sum(1 for e in list(self.events) if e["event"] == kind
                   and all(e.get(k) == v for k, v in match.items()))

    def end(self, signal_it: bool = True, timeout: float = 60) -> Run:
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        finally:
            self.proc.kill()
        for reader in self.readers:
            reader.join(10)
        return Run(self.proc.returncode, list(self.events), "".join(self.err))


# ---- 2. blocked parks the task: it runs exactly once ----------------------------------------


def test_blocked_task_runs_exactly_once_and_is_parked(world: World) -> None:
    task = world.task()
    runner = Watched(world.start(env={"PMTOOL_FAKE_AGENT_OUTCOME": "blocked"}))
    try:
        wait_for(lambda: world.status(task["id"])["status"] == "pending", what="the park")
        # The runner goes on looking for work and does not take the parked task again.
        wait_for(lambda: runner.count("idle") >= 2, what="two idle rounds after the park")
    finally:
        run = runner.end()
    assert len(run.of("agent")) == 1
    # Missing hooks are said, once each, not skipped silently.
    assert run.stderr.count("no pre_task hook in") == 1
    on_server = world.status(task["id"])
    assert on_server["status"] == "pending" and on_server["locked_by"] is None
    assert "parked by pmtool (blocked)" in on_server["notes"]
    assert run.of("parked")[0]["task_id"] == task["id"]
    assert "pending" in run.of("idle")[-1]["why"][0]  # "no task" says why
    assert [h["kind"] for h in attempt_lines(world)] == ["attempt", "parked"]
    # `recover` lists it for a person; `health` too.
    listed = subprocess.run([PMTOOL, "health", "--check", "parked"], env=world.env,
                            capture_output=True, text=True, timeout=60)
    assert f"#{task['id']} (blocked): " in listed.stdout


def notify_hook(world: World) -> Path:
    """A notify hook that keeps every JSON context it is given, one per line."""
    log = world.hooks.parent / "notified.jsonl"
    hook = world.hooks / "notify.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {log}\n")
    hook.chmod(0o755)
    return log


def notified(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_person_is_told_once_when_a_task_is_parked(world: World) -> None:
    log = notify_hook(world)
    parked, done = world.task(title="cannot be done"), world.task(title="fine")
    runner = Watched(world.start(env={"PMTOOL_FAKE_AGENT_OUTCOME": "blocked"}))
    try:
        wait_for(lambda: world.status(parked["id"])["status"] == "pending", what="the park")
        wait_for(lambda: runner.count("idle") >= 2, what="two idle rounds after the park")
    finally:
        run = runner.end()
    told = [n for n in notified(log) if n["event"] == "parked"]
    assert len(told) == len(run.of("parked")) == 2  # both said blocked: two parks, two calls
    assert {n["task_id"] for n in told} == {parked["id"], done["id"]}
    assert all("is parked for a person" in n["message"] and n["hook"] == "notify"
               for n in told)
    assert "api_key" not in json.dumps(told) and world.env["HEADLESS_PM_API_KEY"] not in \
        log.read_text()


def test_a_given_up_task_is_told_as_given_up(world: World) -> None:
    log = notify_hook(world)
    task = world.task()
    run = world.run("--single-task", "--on-agent-failure", "release",
                    env={"PMTOOL_FAKE_AGENT_EXIT": "1"})
    assert run.code == 1, run.stderr
    kinds = [n["event"] for n in notified(log)]
    assert kinds == ["given_up"], kinds
    assert notified(log)[0]["task_id"] == task["id"]


# ---- 3. bounded retries --------------------------------------------------------------------


def test_always_failing_task_runs_at_most_max_attempts_times(world: World) -> None:
    task = world.task()
    # The machine's poller paces the looks: a fast one, so that the cooled task is taken
    # again before idle rounds pass (the idle rounds counted are those after the park).
    runner = Watched(world.start("--on-agent-failure", "release", "--max-attempts", "3",
                                 "--retry-cooldown", "0.2", "--poll-interval", "0.1",
                                 env={"PMTOOL_FAKE_AGENT_EXIT": "1"}))
    try:
        wait_for(lambda: world.status(task["id"])["status"] == "pending", timeout=60,
                 what="the park after 3 attempts")
        wait_for(lambda: runner.count("idle") >= 2, what="idle rounds after the park")
    finally:
        run = runner.end()
    assert len(run.of("claimed")) == 3
    assert len(run.of("agent")) == 3
    notes = world.status(task["id"])["notes"]
    assert "parked by pmtool (max_attempts): 3 attempts failed" in notes
    for n in (1, 2):
        assert f"released: attempt {n}/3 (failed" in notes
    attempts = [h for h in attempt_lines(world) if h["kind"] == "attempt"]
    assert [a["stop"] for a in attempts] == ["failed"] * 3
    # The circuit breaker opened after three failures in a row, and said so.
    states = [e["state"] for e in run.of("breaker")]
    assert states[:2] == ["open", "half_open"], states  # then one try (nothing left to try)


def test_ping_pong_is_parked_after_max_bounces(world: World) -> None:
    task = world.task()
    dev = Watched(world.start("--max-bounces", "3"))
    qa = Watched(world.start("--role", "qa", "--agent-id", "qa_1", "--max-bounces", "3",
                             env={"PMTOOL_FAKE_AGENT_OUTCOME": "fail"}))
    try:
        wait_for(lambda: world.status(task["id"])["status"] == "pending", timeout=90,
                 what="the park after three QA fails")
        time.sleep(1.5)  # time for a storm to show, if there were one
    finally:
        dev.end()
        qa_run = qa.end()
    assert qa_run.of("parked")[0]["task_id"] == task["id"]
    fails = [c for c in world.seeder.changelog(500)
             if c["task_id"] == task["id"] and c["old_status"] == "under_work"
             and c["new_status"] in ("created", "pending")]
    assert len(fails) == 3
    assert dev_done_count(world, task["id"]) == 3
    assert "parked by pmtool (max_bounces): QA failed it 3 times" in \
        world.status(task["id"])["notes"]


# ---- 4. fatal problems stop before a claim ---------------------------------------------------


@pytest.mark.parametrize(("case", "code", "words"), [
    ("no claude", 7, "claude not found"),
    ("wrong key", 6, "rejected the key"),
    ("no key", 6, "HEADLESS_PM_API_KEY is not set"),
    ("not a repo", 2, "is not a git repository"),
])
def test_fatal_problems_end_the_run_before_any_claim(world: World, tmp_path: Path, case: str,
                                                     code: int, words: str) -> None:
    task = world.task()
    env: dict[str, str] = {}
    args = ["--real-claude"]  # no --agent-cmd: claude is what runs
    if case == "no claude":
        env["PMTOOL_CLAUDE_BIN"] = str(tmp_path / "nowhere" / "claude")
    else:
        args = []
    if case == "wrong key":
        env["HEADLESS_PM_API_KEY"] = "wrong-" + "7" * 16
    if case == "no key":
        env["HEADLESS_PM_API_KEY"] = ""
    if case == "not a repo":
        (tmp_path / "plain").mkdir()
        args += ["--repo", str(tmp_path / "plain")]
    start = time.monotonic()
    run = world.run(*args, env=env, timeout=10)  # without --single-task: it must still end
    assert time.monotonic() - start < 10
    assert run.code == code, run.stderr
    assert not run.of("claimed")
    assert words in run.of("error")[0]["error"]["message"]
    fatal = [line for line in run.stderr.splitlines() if "fatal: " in line]
    assert len(fatal) == 1 and words in fatal[0] and "fix: " in fatal[0]
    on_server = world.status(task["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None
    assert "wrong-7777" not in run.stderr + str(run.events)


# ---- 4. transient problems never end the run ---------------------------------------------------


def test_a_server_outage_mid_task_ends_dev_done_once_and_exit_0(world: World) -> None:
    task = world.task()
    proc = world.start("--single-task", env={"PMTOOL_FAKE_AGENT_SLEEP": "2"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="the agent")
    world.server.stop()  # the server goes away while the agent works ...
    world.server_error_seen()
    world.server._stopping.clear()  # ... and comes back on the same port, data intact
    world.server.start()
    out, err = proc.communicate(timeout=120)
    run = Run(proc.returncode, events(out), err)
    assert run.code == 0, err
    assert any(e["error"]["type"] == "server" for e in run.of("error"))
    assert "is alive" not in err
    assert world.status(task["id"])["status"] == "dev_done"
    assert dev_done_count(world, task["id"]) == 1
    assert world.store.load("dev_1") is None


# ---- 4. the daily budget --------------------------------------------------------------------


def test_daily_budget_stops_claims_for_the_day(world: World) -> None:
    first, second = world.task(title="first"), world.task(title="second")
    run = world.run("--single-task", "--daily-budget-usd", "0.0001")  # the fake costs more
    assert run.code == 0, run.stderr
    done = run.of("finished")[0]["task_id"]
    again = world.run("--single-task", "--daily-budget-usd", "0.0001")
    assert again.code == 3 and not again.of("claimed")
    (paused,) = again.of("paused")
    assert paused["reason"] == "daily_budget" and paused["spent_usd"] >= 0.0001
    assert "daily budget $0.0001 spent" in again.stderr
    left = second if done == first["id"] else first
    assert world.status(left["id"])["status"] == "created"


# A continuous runner (no --single-task) on a clock the test moves: the day's budget is
# spent at START, the runner waits until the next midnight of *that* clock (its waits move
# the clock instead of passing), then claims. Run in a process of its own: a runner makes
# itself a subreaper, which pytest must not become.
BUDGET_RUNNER = """
import json, sys
from datetime import UTC, datetime, timedelta
from pmtool import failure_policy as failures, ledger as bounds
from pmtool.config import load_settings
from pmtool.run.loop import Runner, RunOptions

start = datetime.fromisoformat(sys.argv[3])
now = [start]
waits = []

def wait(seconds):
    waits.append(seconds)
    now[0] += timedelta(seconds=seconds)

settings = load_settings({})
task = {"id": 999, "created_at": "x", "title": "an earlier task"}
bounds.Ledger(settings.state_path).add(failures.attempt_line(
    task, "dev_1", outcome="done", kind="ok", cost_usd=2.0, at=start))
opts = RunOptions.from_settings(settings, agent_id="dev_1", role="backend_dev",
                                level="senior", repo=sys.argv[1], max_tasks=1,
                                agent_cmd=sys.argv[2], settle=0.05, idle_poll=0.5)
runner = Runner(settings, opts, lambda e: print(json.dumps(e), flush=True),
                clock=lambda: now[0], wait=wait)
code = runner.run()
print(json.dumps({"code": code, "waits": waits, "now": now[0].isoformat()}),
      file=sys.stderr, flush=True)
"""


def test_daily_budget_waits_until_midnight_in_the_continuous_loop(world: World) -> None:
    import sys
    import textwrap
    from datetime import UTC, datetime, timedelta

    task = world.task()
    # Late in the day of a clock the test sets (relative to now, never a calendar date),
    # so that a real wait until midnight would take the test's whole time limit and more.
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = day + timedelta(hours=23, minutes=50)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BUDGET_RUNNER), str(world.repo),
         fake_agent_command(), start.isoformat()],
        env={**world.env, "PMTOOL_DAILY_BUDGET_USD": "1.0"}, cwd=world.repo,
        capture_output=True, text=True, timeout=120, check=False)
    run = Run(proc.returncode, events(proc.stdout), proc.stderr)
    assert run.code == 0, run.stderr[-3000:]
    (paused,) = [e for e in run.of("paused") if e.get("reason") == "daily_budget"]
    assert paused["spent_usd"] == 2.0 and paused["until"].startswith(
        (day + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00"))
    done = json.loads(proc.stderr.strip().splitlines()[-1])
    assert done["code"] == 0
    # The wait went to midnight of the runner's clock (10 minutes), and no further.
    assert sum(done["waits"]) == pytest.approx(600, abs=1)
    assert datetime.fromisoformat(done["now"]) >= day + timedelta(days=1)
    kinds = [e["event"] for e in run.events]
    assert kinds.index("paused") < kinds.index("claimed")
    assert run.of("finished")[0]["task_id"] == task["id"]
    assert world.status(task["id"])["status"] == "dev_done"


def test_random_500s_and_resets_never_end_the_run_nor_finish_twice(world: World) -> None:
    """A server that answers 500 (plain text, and resets the next request on that
    connection, as the real one does) to one call in ten: every task ends dev_done once."""
    tasks = [world.task(title=f"t{n}") for n in range(2)]
    world.server.fail_rate = 0.1
    try:
        run = world.run("--max-tasks", "2", timeout=240)
    finally:
        world.server.fail_rate = 0.0
    assert run.code == 0, run.stderr
    for task in tasks:
        assert world.status(task["id"])["status"] == "dev_done"
        assert dev_done_count(world, task["id"]) == 1
    assert "is alive" not in run.stderr


def test_a_hanging_server_mid_task_ends_dev_done_once_and_exit_0(world: World) -> None:
    """Every call hangs past the client's timeout for a while (the database stalls)."""
    task = world.task()
    proc = world.start("--single-task", env={"PMTOOL_FAKE_AGENT_SLEEP": "1",
                                             "PMTOOL_HTTP_TIMEOUT": "1"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="the agent")
    world.server.db_latency = 2.5
    # Hang until the agent is done and the finish has met the stall for a while: on a
    # loaded machine the agent alone can outlast any fixed sleep.
    wait_for(lambda: any(s.get("step") == "agent_finished"
                         for s in getattr(world.store.load("dev_1"), "steps", [])),
             timeout=90, what="the agent's end")
    # Until the stall has outlasted the client's own retries of a read (4 tries of 1 s)
    # and reached the loop, reported, not absorbed.
    world.server_error_seen()
    world.server.db_latency = 0.0
    out, err = proc.communicate(timeout=120)
    run = Run(proc.returncode, events(out), err)
    assert run.code == 0, err
    assert any(e["error"]["type"] == "server" for e in run.of("error")), err
    assert world.status(task["id"])["status"] == "dev_done"
    assert dev_done_count(world, task["id"]) == 1


# ---- 5. health inside the loop ---------------------------------------------------------------


def test_failing_health_check_hook_keeps_the_loop_from_claiming(world: World) -> None:
    task = world.task()
    flag = world.tmp / "unhealthy"
    flag.write_text("yes")
    hook = world.hooks / "health_check.sh"
    hook.write_text(f"#!/bin/sh\nif [ -e {flag} ]; then echo 'vpn is down' >&2; exit 1; fi\n")
    hook.chmod(0o755)
    runner = Watched(world.start("--max-tasks", "1"))
    wait_for(lambda: runner.count("health", ok=False) >= 2, what="failed checks")
    assert world.status(task["id"])["status"] == "created"  # nothing claimed meanwhile
    flag.unlink()
    wait_for(lambda: runner.proc.poll() is not None, timeout=90, what="the task")
    run = runner.end(signal_it=False)
    failed = [e for e in run.of("health") if not e["ok"]]
    assert "hook:health_check" in failed[0]["failed"]
    assert "vpn is down" in failed[0]["details"]["hook:health_check"]
    assert run.code == 0, run.stderr
    assert world.status(task["id"])["status"] == "dev_done"


# ---- 7. health advises what really frees a dead runner's task ---------------------------------


def test_health_advice_for_a_dead_runners_record_names_what_frees_it(world: World) -> None:
    import json

    world.task()
    dead = subprocess.Popen(["true"])
    dead.wait()
    env = {**world.env, "PMTOOL_RUNNER_PID": str(dead.pid)}
    claim = subprocess.run([PMTOOL, "claim", "--agent-id", "dev_gone", "--role",
                            "backend_dev"], env=env, capture_output=True, text=True, timeout=60)
    assert claim.returncode == 0, claim.stderr
    health = subprocess.run([PMTOOL, "health", "--check", "records"], env=world.env,
                            capture_output=True, text=True, timeout=60)
    (check,) = json.loads(health.stdout)["checks"]
    assert not check["ok"] and "dev_gone" in check["detail"]
    assert "pmtool run --agent-id dev_gone" in check["hint"]
    assert "pmtool recover --give-back" in check["hint"]
    # What the hint promises: --give-back frees it now.
    back = subprocess.run([PMTOOL, "recover", "--give-back"], env=world.env,
                          capture_output=True, text=True, timeout=60)
    assert json.loads(back.stdout)["entries"][0]["action"] == "released"


# ---- 8. hooks: found in the repo, and missing ones said -------------------------------------


def test_a_relative_hooks_folder_is_the_repos_not_the_current_directory(world: World) -> None:
    task = world.task()
    folder = world.repo / "ops-hooks"
    folder.mkdir()
    ran = world.tmp / "pre_task-ran"
    (folder / "pre_task.sh").write_text(f"#!/bin/sh\ntouch {ran}\n")
    (folder / "pre_task.sh").chmod(0o755)
    elsewhere = world.tmp / "elsewhere"
    elsewhere.mkdir()
    env = {**world.env, "HEADLESS_PM_HOOKS_DIR": "ops-hooks"}
    proc = subprocess.run([PMTOOL, "run", *world.args("--single-task")], env=env,
                          cwd=elsewhere, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert ran.exists()
    assert world.status(task["id"])["status"] == "dev_done"
    # The same for `pmtool hook run` from a subfolder of the repo.
    ran.unlink()
    (world.repo / "sub").mkdir()
    hook = subprocess.run([PMTOOL, "hook", "run", "pre_task"], env=env, cwd=world.repo / "sub",
                          capture_output=True, text=True, timeout=60)
    assert hook.returncode == 0, hook.stderr
    assert ran.exists()


# ---- 8. the README's bash pipeline -------------------------------------------------------------


def readme_pipeline() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("**One task.**")  # the first pipeline of "Pipelines that survive a crash"
    block = text[text.index("```bash\n", start) + 8:]
    return block[:block.index("```")]


@pytest.mark.parametrize("claude_works", [False, True])
def test_readme_pipeline_never_finishes_a_failed_run(world: World, claude_works: bool) -> None:
    """With claude failing, the pipeline gives the task back (an attempt), never
    `finish --outcome null`; with it working, the task is finished."""
    task = world.task()
    bindir = world.tmp / "bin"
    bindir.mkdir()
    fake = bindir / "claude"
    if claude_works:  # the fake agent speaks claude's stream-json; flags are ignored
        fake.write_text(f"#!/bin/sh\nexec {fake_agent_command()}\n")
    else:
        fake.write_text("#!/bin/sh\necho 'claude: crashed' >&2\nexit 1\n")
    fake.chmod(0o755)
    script = readme_pipeline().replace("~/src/app", str(world.repo))
    env = {**world.env, "PATH": f"{bindir}:{Path(PMTOOL).parent}:{os.environ['PATH']}",
           "PMTOOL_CLAUDE_BIN": str(fake)}
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=world.repo, text=True,
                          capture_output=True, timeout=120)
    notes = world.status(task["id"])["notes"] or ""
    if claude_works:
        assert proc.returncode == 0, proc.stderr
        assert world.status(task["id"])["status"] == "dev_done"
    else:
        assert "--outcome" not in proc.stderr and "null" not in notes
        assert world.status(task["id"])["status"] == "created"
        assert "released: attempt 1/3 (failed" in notes

"""The bash scripts in scripts/, run for real: bash, jq and the installed `pmtool` against a
private stand-in server, the stand-in agent, and a scratch git repository.

Each test is a user's session: start a script, read what it printed, then look at the
server, the repository and the task records on disk.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, wait_for
from pmtool.testing import fake_agent
from pmtool.testing.seed import Seeder
from pmtool.testing.server import StandInServer

SCRIPTS = ROOT / "scripts"
BIN = Path(sys.executable).parent  # the venv's bin: `pmtool` resolves here first
ROLE = "backend_dev"

pytestmark = pytest.mark.skipif(shutil.which("jq") is None or shutil.which("bash") is None,
                                reason="the scripts need bash and jq")


@dataclass
class Box:
    """One private world: server, seeder, repository, state and hooks folders, environment."""

    server: StandInServer
    seeder: Seeder
    repo: Path
    state: Path
    hooks: Path
    env: dict[str, str]

    def run(self, script: str, *args: str, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPTS / script), *args], env={**self.env, **(env or {})},
                              input=input, capture_output=True, text=True, timeout=timeout,
                              cwd=self.repo, check=False)

    def start(self, script: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        # Its own session, so a test can send a signal to the whole group as a terminal's
        # Ctrl-C does.
        return subprocess.Popen([str(SCRIPTS / script), *args],
                                env={**self.env, **(env or {})}, cwd=self.repo,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def pmtool(self, *args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run([str(BIN / "pmtool"), *args], env=self.env, capture_output=True,
                              text=True, timeout=30, check=False)
        return proc.returncode, json.loads(proc.stdout)

    def task(self, task_id: int) -> dict[str, Any]:
        task = self.seeder.get_task(task_id)
        assert task is not None
        return task

    def history(self) -> list[dict[str, Any]]:
        """The closed records (the history also keeps attempt and park lines)."""
        path = self.state / "history.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []
        return [h for h in lines if h.get("kind", "closed") == "closed"]

    def transitions(self, task_id: int, to: str) -> int:
        return sum(1 for c in self.seeder.changelog(limit=-1)
                   if c["task_id"] == task_id and c["new_status"] == to
                   and c["old_status"] != to)

    def hook(self, name: str, body: str) -> Path:
        path = self.hooks / name
        path.write_text("#!/usr/bin/env bash\nset -eu\n" + body)
        path.chmod(0o755)
        return path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def new_box(make_standin: Callable[..., StandInServer], root: Path) -> Box:
    key = f"scripts-{secrets.token_hex(8)}"
    server = make_standin(api_key=key, production=True)
    repo = root / "repo"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# scratch\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "-q", "-m", "start")
    hooks = root / "hooks"
    hooks.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMTOOL_", "HEADLESS_PM_", "API_KEY_HEADLESS_PM"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        "HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": key,
        "PMTOOL_STATE_DIR": str(root / "state"),
        "PMTOOL_CONFIG": os.devnull,
        "HEADLESS_PM_HOOKS_DIR": str(hooks), "PMTOOL_CLAIM_SETTLE": "0.05",
        "PMTOOL_HEALTH_LOG": str(root / "health.log"),
        # A given-back task may be taken again at once (the cooldown has its own tests).
        "PMTOOL_RETRY_COOLDOWN": "0",
    })
    return Box(server, Seeder(server.url, key), repo, root / "state", hooks, env)


@pytest.fixture
def box(make_standin: Callable[..., StandInServer], tmp_path: Path) -> Iterator[Box]:
    made = new_box(make_standin, tmp_path)
    with made.seeder:
        yield made


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line is one JSON object with "ok"."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and all(isinstance(o, dict) and isinstance(o.get("ok"), bool) for o in lines)
    return lines


def runner_args(agent: str, *extra: str) -> list[str]:
    return ["--role", ROLE, "--agent-id", agent, "--agent-cmd", fake_agent.command(), *extra]


def wait_for_step(box: Box, agent: str, step: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, out = box.pmtool("lock", "show", "--agent-id", agent)
        if code == 0 and any(s["step"] == step for s in out["record"]["steps"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {step} step in {agent}'s record within {timeout}s")


# ---- pm-runner.sh ------------------------------------------------------------------------


def test_pm_runner_single_task_takes_a_major_task_to_dev_done(box: Box) -> None:
    task = box.seeder.create_task(title="Add /ping", complexity="major", branch="feature/ping")
    box.hook("post_task", f"cat >{box.hooks}/post_task.json\n")

    proc = box.run("pm-runner.sh", *runner_args("dev_1", "--repo", str(box.repo),
                                                "--single-task"))

    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert lines[-1]["event"] == "stopped" and lines[-1]["tasks_done"] == 1
    assert box.task(task["id"])["status"] == "dev_done"
    assert f"task {task['id']}: backend_dev notes (fake agent)" in git(
        box.repo, "log", "--format=%s", "feature/ping")
    assert not list((box.repo / ".worktrees").glob(f"task-{task['id']}*"))
    assert git(box.repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert box.pmtool("lock", "show", "--agent-id", "dev_1")[0] == 3  # record closed...
    closed = [h for h in box.history() if h["task"]["id"] == task["id"]]
    assert [h["outcome"] for h in closed] == ["done"]  # ...into the history
    # post_task gets the same flat context as under `pmtool run`
    context = json.loads((box.hooks / "post_task.json").read_text())
    assert context["task_id"] == task["id"] and context["outcome"] == "done"
    assert context["status"] == "dev_done" and context["branch"] == "feature/ping"


def test_pm_runner_minor_task_commits_on_the_base_branch(box: Box) -> None:
    task = box.seeder.create_task(title="Fix a typo", complexity="minor")
    proc = box.run("pm-runner.sh", *runner_args("dev_minor", "--repo", str(box.repo),
                                                "--single-task"))
    assert proc.returncode == 0, proc.stderr
    assert box.task(task["id"])["status"] == "dev_done"
    assert git(box.repo, "log", "-1", "--format=%s", "main") == \
        f"task {task['id']}: backend_dev notes (fake agent)"
    # Its own worktree and short-lived branch, landed by fast-forward (by `finish --full`),
    # then both removed.
    (events,) = [o["events"] for o in json_lines(proc.stdout) if "events" in o]
    (landed,) = [e for e in events if e["event"] == "landed"]
    assert landed["branch"].startswith("pmtool/task-") and landed["base"] == "main"
    assert "landed on main by fast-forward" in box.task(task["id"])["notes"]
    assert [e["removed"] for e in events if e["event"] == "worktree"] == [True]
    assert git(box.repo, "branch", "--list", landed["branch"]) == ""
    assert git(box.repo, "worktree", "list", "--porcelain").count("worktree ") == 1


def test_pm_runner_commits_what_the_agent_left_and_pushes_the_branch(box: Box,
                                                                      tmp_path: Path) -> None:
    # As under `pmtool run`: the finish commits leftovers on the task branch and pushes it.
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(box.repo, "remote", "add", "origin", str(remote))
    task = box.seeder.create_task(title="Left uncommitted", branch="feature/left")

    proc = box.run("pm-runner.sh", *runner_args("dev_left", "--repo", str(box.repo),
                                                "--single-task"),
                   env={"PMTOOL_FAKE_AGENT_NO_COMMIT": "1", "PMTOOL_PUSH": "1"})

    assert proc.returncode == 0, proc.stderr
    assert box.task(task["id"])["status"] == "dev_done"
    subject = f"pmtool: uncommitted work the agent left on task {task['id']}"
    assert git(remote, "log", "-1", "--format=%s", "feature/left") == subject
    assert git(remote, "show", f"feature/left:notes/task-{task['id']}.md")  # the agent's file
    notes = box.task(task["id"])["notes"]
    assert "uncommitted work committed by pmtool" in notes and "pushed to origin" in notes
    assert git(box.repo, "for-each-ref", "refs/pmtool/rescue") == ""  # committed, not rescued
    assert not list((box.repo / ".worktrees").glob(f"task-{task['id']}*"))


def test_pm_runner_agent_without_verdict_is_retried_once_then_given_back(box: Box) -> None:
    task = box.seeder.create_task(title="Unclear", branch="feature/unclear")
    proc = box.run("pm-runner.sh", *runner_args("dev_fail", "--repo", str(box.repo),
                                                "--single-task"),
                   env={"PMTOOL_FAKE_AGENT_OUTCOME": "none"})
    assert proc.returncode == 1, proc.stderr
    runs = [o for o in json_lines(proc.stdout) if "verdict_source" in o]
    assert [o["resumed"] for o in runs] == [False, True]  # the retry continues the session
    after = box.task(task["id"])
    assert after["status"] == "created" and after["locked_by"] is None
    assert "agent failed: " in after["notes"]
    # the agent's commits stay on the task branch; the worktree is gone
    assert git(box.repo, "log", "--format=%s", "feature/unclear").count("fake agent") == 2
    assert not list((box.repo / ".worktrees").glob(f"task-{task['id']}*"))


def test_pm_runner_gives_back_a_park_and_lock_release_parks_it(box: Box) -> None:
    """exec-claude's `next` says park (max_attempts 1): the script releases the give-back
    it names, and the release parks the task with the reason `next` gave."""
    task = box.seeder.create_task(title="Hopeless", branch="feature/hopeless")
    proc = box.run("pm-runner.sh", *runner_args("dev_park", "--repo", str(box.repo),
                                                "--single-task"),
                   env={"PMTOOL_FAKE_AGENT_OUTCOME": "none", "PMTOOL_MAX_ATTEMPTS": "1",
                        "PMTOOL_ON_AGENT_FAILURE": "release"})
    assert proc.returncode == 1, proc.stderr
    lines = json_lines(proc.stdout)
    said = next(o["next"] for o in lines if "verdict_source" in o)
    assert said["step"] == "park" and said["cause"] == "max_attempts"
    released = next(o for o in lines if o.get("action") == "parked")
    assert released["parked"] == said["reason"] and released["cause"] == said["cause"]
    assert released["attempt"]["reason"] == said["give_back"]["reason"]
    assert box.task(task["id"])["status"] == "pending"


def limited_once(box: Box, resets_in: int) -> Path:
    """An agent whose first run hits a usage limit resetting in `resets_in` seconds, and
    whose later runs are the fake agent's."""
    agent = box.repo.parent / "limited-once.sh"
    agent.write_text(
        "#!/bin/sh\n"
        'if [ ! -e "$0.done" ]; then\n'
        '  touch "$0.done"; cat >/dev/null\n'
        '  echo "{\\"type\\": \\"rate_limit_event\\", \\"rate_limit_info\\": {\\"status\\": '
        f'\\"rejected\\", \\"resetsAt\\": $(( $(date +%s) + {resets_in} ))}}}}"\n'
        '  echo \'{"type": "result", "subtype": "success", "is_error": true, "num_turns": 1, '
        '"result": "limit", "total_cost_usd": 0}\'\n'
        "  exit 0\n"
        "fi\n"
        f"exec {fake_agent.command()}\n")
    agent.chmod(0o755)
    return agent


def test_pm_runner_waits_out_a_rate_limit_and_goes_on_with_the_session(box: Box) -> None:
    """exec-claude's `next` says pause until the limit resets: the script keeps the task,
    waits, and resumes the session (no give-back, no attempt used up)."""
    task = box.seeder.create_task(title="Limited", branch="feature/limited")
    agent = limited_once(box, resets_in=2)
    started = time.monotonic()
    proc = box.run("pm-runner.sh", "--role", ROLE, "--agent-id", "dev_limit", "--agent-cmd",
                   str(agent), "--repo", str(box.repo), "--single-task")
    assert proc.returncode == 0, proc.stderr
    runs = [o for o in json_lines(proc.stdout) if "verdict_source" in o]
    assert [o.get("next", {}).get("step") for o in runs] == ["pause", None]
    assert [o["resumed"] for o in runs] == [False, True] and runs[1]["outcome"] == "done"
    assert "rate_limit; task kept, going on in" in proc.stderr
    assert 1 < time.monotonic() - started < 25
    assert box.task(task["id"])["status"] == "dev_done"


def test_pm_runner_keeps_the_lock_alive_while_it_waits_out_a_rate_limit(box: Box) -> None:
    """A usage limit can last hours and the server drops the locks of agents unseen for 30
    minutes: while the script waits, it re-registers every heartbeat, as the runner's
    heartbeats go on during its pause; a stop meanwhile keeps the task and its record."""
    task = box.seeder.create_task(title="Limited for long", branch="feature/long-limit")
    agent = limited_once(box, resets_in=600)
    proc = box.start("pm-runner.sh", "--role", ROLE, "--agent-id", "dev_hold", "--agent-cmd",
                     str(agent), "--repo", str(box.repo), env={"PMTOOL_HEARTBEAT": "1"})
    try:
        def paused() -> bool:
            code, out = box.pmtool("lock", "show", "--agent-id", "dev_hold")
            return code == 0 and any((s.get("next") or {}).get("step") == "pause"
                                     for s in out["record"]["steps"])

        wait_for(paused, what="the run that hit the limit")
        before = len(box.server.requests("POST /api/v1/register"))
        wait_for(lambda: len(box.server.requests("POST /api/v1/register")) - before >= 3,
                 what="re-registrations while the script waits")
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "rate_limit; task kept, going on in" in stderr
    stopped = json_lines(stdout)[-1]
    assert stopped["record_kept"] is True and stopped["task_id"] == task["id"]
    assert box.task(task["id"])["locked_by"] == "dev_hold"


def test_pm_runner_single_task_without_a_task_exits_3(box: Box) -> None:
    start = time.monotonic()
    proc = box.run("pm-runner.sh", *runner_args("dev_idle", "--single-task"))
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - start < 10  # looks once, as `pmtool run --single-task`
    assert json_lines(proc.stdout)[-1]["record_kept"] is False


def test_pm_runner_gives_the_task_back_when_pre_task_fails_and_goes_on(box: Box) -> None:
    task = box.seeder.create_task(title="Needs a database")
    # Fails the first time (no database yet), passes afterwards.
    box.hook("pre_task", f"""
if [ ! -e {box.hooks}/db-up ]; then touch {box.hooks}/db-up; echo "database down" >&2; exit 1; fi
""")

    proc = box.run("pm-runner.sh", *runner_args("dev_hook", "--repo", str(box.repo),
                                                "--wait", "0.5", "--max-tasks", "1"))

    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    released = [o for o in lines if o.get("action") == "released"]
    assert len(released) == 1 and released[0]["task"]["status"] == "created"
    assert "pre_task hook failed: database down" in released[0]["task"]["notes"]
    # given back (under_work -> created), then taken again and finished
    assert box.transitions(task["id"], "created") == 2
    assert box.task(task["id"])["status"] == "dev_done"
    assert "given back: pre_task hook failed" in proc.stderr


def test_pm_runner_single_task_exits_1_when_pre_task_keeps_failing(box: Box) -> None:
    task = box.seeder.create_task(title="Never ready")
    box.hook("pre_task", "exit 1\n")
    proc = box.run("pm-runner.sh", *runner_args("dev_nope", "--single-task"))
    assert proc.returncode == 1, proc.stderr
    assert box.task(task["id"])["status"] == "created"
    assert box.task(task["id"])["locked_by"] is None
    assert box.pmtool("lock", "show", "--agent-id", "dev_nope")[0] == 3


@pytest.mark.parametrize("how", ["SIGTERM to the script", "Ctrl-C to the process group"])
def test_pm_runner_stop_keeps_the_record_and_the_next_run_finishes_once(box: Box,
                                                                       how: str) -> None:
    task = box.seeder.create_task(title="Slow work", branch="feature/slow")
    args = runner_args("dev_sig", "--repo", str(box.repo))
    proc = box.start("pm-runner.sh", *args, env={"PMTOOL_FAKE_AGENT_SLEEP": "3"})
    wait_for_step(box, "dev_sig", "agent_running")
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)  # the agent's step runs to its end, then the stop
    else:
        os.killpg(proc.pid, signal.SIGINT)  # exec-claude stops the agent too
    stdout, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 0, stderr
    stopped = json_lines(stdout)[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "signal"
    assert stopped["record_kept"] is True and stopped["task_id"] == task["id"]
    assert "stopping after this step" in stderr
    code, shown = box.pmtool("lock", "show", "--agent-id", "dev_sig")
    assert code == 0 and shown["record"]["task"]["id"] == task["id"]
    assert box.task(task["id"])["status"] == "under_work"  # the lock was not given up

    again = box.run("pm-runner.sh", *args, "--single-task")

    assert again.returncode == 0, again.stderr
    assert box.task(task["id"])["status"] == "dev_done"
    assert box.transitions(task["id"], "dev_done") == 1
    assert [h["outcome"] for h in box.history() if h["task"]["id"] == task["id"]] == ["done"]
    notes = git(box.repo, "show", f"feature/slow:notes/task-{task['id']}.md")
    if how.startswith("SIGTERM"):
        # The agent had given its verdict: the next run finishes with it, no second run.
        assert notes.count("worked on task") == 1 and "resumed" not in notes
        assert not any("verdict_source" in o for o in json_lines(again.stdout))
    else:
        # The agent was stopped midway: the next run resumes its session.
        assert "resumed task" in notes


def test_pm_runner_refuses_an_agent_whose_runner_lives(box: Box) -> None:
    box.seeder.create_task(title="Taken by a live shell")
    # `pmtool claim` from this test: its runner is this (live) python process.
    code, _ = box.pmtool("claim", "--agent-id", "dev_busy", "--role", ROLE,
                         "--runner-pid", str(os.getpid()))
    assert code == 0
    proc = box.run("pm-runner.sh", *runner_args("dev_busy", "--single-task"))
    assert proc.returncode == 5
    assert "live runner" in proc.stderr


# ---- pm-runner.sh and `pmtool run`: one loop, two implementations --------------------------


def script_steps(calls: list[list[str]], stdout: str) -> list[str]:
    """What pm-runner.sh did, from the pmtool commands it ran, in the loop's event words
    (`finish --full` reports its own steps as the loop's events)."""
    steps = []
    finished = [o["events"] for o in json_lines(stdout) if "events" in o]
    for args in calls:
        if args[0] == "claim":
            steps.append("claimed")
        elif args[:2] == ["hook", "run"]:
            steps.append(f"hook {args[2]}")
        elif args[:2] == ["worktree", "create"]:
            steps.append("worktree create")
        elif args[:2] == ["worktree", "remove"]:
            steps.append("worktree remove")
        elif args[0] == "exec-claude":
            steps.append("agent resumed" if "--resume" in args else "agent")
        elif args[0] == "finish" and "--full" in args:
            steps += loop_steps(finished.pop(0))
        elif args[0] == "finish":
            steps.append(f"finished {args[args.index('--outcome') + 1]}")
        elif args[:2] == ["lock", "release"]:
            steps.append("finished given_back")
        # recover, lock show, lock update: bookkeeping the loop does in-process
    stopped = json_lines(stdout)[-1]
    steps.append(f"stopped done={stopped['tasks_done']} kept={stopped['record_kept']}")
    return steps


def loop_steps(events: list[dict[str, Any]]) -> list[str]:
    """What `pmtool run` did, from its events (health has no step in the script)."""
    steps = []
    for e in events:
        kind = e["event"]
        if kind in ("claimed", "finished"):
            steps.append(kind + (f" {e['outcome']}" if kind == "finished" else ""))
        elif kind == "hook" and not e.get("skipped"):  # the script runs no absent hook
            steps.append(f"hook {e['hook']}")
        elif kind == "worktree":
            steps.append("worktree remove" if "removed" in e else "worktree create")
        elif kind == "agent":
            steps.append("agent resumed" if e.get("resumed") else "agent")
        elif kind == "stopped":
            steps.append(f"stopped done={e['tasks_done']} kept={e['record_kept']}")
    return steps


def run_scenario(box: Box, how: str, scenario: str) -> dict[str, Any]:
    """One task, one --single-task runner (the script or `pmtool run`): what happened."""
    task = box.seeder.create_task(title="Same scenario", complexity="major",
                                  branch="feature/same")
    env = {"PMTOOL_FAKE_AGENT_OUTCOME": "none"} if scenario == "no verdict" else {}
    if scenario == "pre_task fails":
        box.hook("pre_task", "echo 'no database' >&2\nexit 1\n")
    box.hook("post_task", "cat >/dev/null\n")
    args = runner_args("dev_same", "--repo", str(box.repo), "--single-task")
    if how == "script":
        # A pmtool that notes each command the script runs, then runs it.
        calls = box.state.parent / "calls.jsonl"
        wrapper = box.state.parent / "pmtool-noting"
        wrapper.write_text(
            "#!/usr/bin/env bash\n"
            f"jq -nc '$ARGS.positional' --args -- \"$@\" >>{shlex.quote(str(calls))}\n"
            f"exec {shlex.quote(str(BIN / 'pmtool'))} \"$@\"\n")
        wrapper.chmod(0o755)
        proc = box.run("pm-runner.sh", *args, env={"PMTOOL": str(wrapper), **env})
        steps = script_steps([json.loads(line) for line in calls.read_text().splitlines()],
                             proc.stdout)
    else:
        proc = subprocess.run([str(BIN / "pmtool"), "run", *args], env={**box.env, **env},
                              cwd=box.repo, capture_output=True, text=True, timeout=60,
                              check=False)
        steps = loop_steps(json_lines(proc.stdout))
    after = box.task(task["id"])
    return {
        "code": proc.returncode,
        "steps": steps,
        "statuses": [(c["old_status"], c["new_status"])
                     for c in box.seeder.changelog(limit=-1) if c["task_id"] == task["id"]],
        "task": (after["status"], after["locked_by"]),
        "history": [h["outcome"] for h in box.history() if h["task"]["id"] == task["id"]],
        "record_left": box.pmtool("lock", "show", "--agent-id", "dev_same")[0] != 3,
        "worktrees": git(box.repo, "worktree", "list", "--porcelain").count("worktree "),
        "stderr": proc.stderr,
    }


@pytest.mark.parametrize("scenario", ["done", "no verdict", "pre_task fails"])
def test_pm_runner_and_pmtool_run_take_the_same_steps(
        make_standin: Callable[..., StandInServer], tmp_path: Path, scenario: str) -> None:
    results = {}
    for how in ("script", "loop"):
        made = new_box(make_standin, tmp_path / how)
        with made.seeder:
            results[how] = run_scenario(made, how, scenario)
    script, loop = results["script"], results["loop"]
    stderr = f"script:\n{script.pop('stderr')}\nloop:\n{loop.pop('stderr')}"
    assert script == loop, stderr
    expected = {
        # No pre_task hook in these two: nothing to run (the loop reports it skipped).
        "done": ["claimed", "worktree create", "agent", "finished done",
                 "hook post_task", "worktree remove", "stopped done=1 kept=False"],
        "no verdict": ["claimed", "worktree create", "agent",
                       "agent resumed", "finished given_back", "worktree remove",
                       "stopped done=0 kept=False"],
        "pre_task fails": ["claimed", "hook pre_task", "finished given_back",
                           "stopped done=0 kept=False"],
    }[scenario]
    assert loop["steps"] == expected  # and so are the script's: a change shows up here
    assert loop["code"] == (0 if scenario == "done" else 1)


# ---- cron-health.sh ----------------------------------------------------------------------


def test_cron_health_healthy_appends_to_the_log_and_says_nothing(box: Box) -> None:
    for _ in range(2):
        proc = box.run("cron-health.sh", "--check", "git", "--check", "disk")
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    lines = Path(box.env["PMTOOL_HEALTH_LOG"]).read_text().splitlines()
    assert len(lines) == 2
    stamp, _, answer = lines[-1].partition(" ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert json.loads(answer)["ok"] is True


def test_cron_health_server_unreachable_exits_4_with_one_line(box: Box, free_port: int) -> None:
    proc = box.run("cron-health.sh", "--check", "api",
                   env={"HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port}"})
    assert proc.returncode == 4
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("pmtool health: exit 4: api: ")
    assert json.loads(Path(box.env["PMTOOL_HEALTH_LOG"]).read_text().split(" ", 1)[1])[
        "ok"] is False


# ---- cron-recover.sh ---------------------------------------------------------------------


def test_cron_recover_without_records(box: Box) -> None:
    proc = box.run("cron-recover.sh")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("pmtool recover: no task records\n")


def test_cron_recover_orphans_puts_back_what_no_runner_has(box: Box) -> None:
    orphan = box.seeder.create_task(title="Its runner's machine is gone")
    box.seeder.set_status(orphan["id"], "under_work")  # under work, nobody's lock
    queued = box.seeder.create_task(title="In the queue")
    proc = box.run("cron-recover.sh", "--orphans")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    assert f"requeued=1: ?/{orphan['id']}=requeued" in proc.stdout
    assert box.task(orphan["id"])["status"] == "created"
    assert box.task(queued["id"])["status"] == "created" and not box.task(queued["id"])["notes"]


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_cron_recover_reconciles_the_records_of_killed_runners(box: Box) -> None:
    ours = box.seeder.create_task(title="Still ours")
    moved = box.seeder.create_task(title="Moved on meanwhile")
    env = {**box.env, "PMTOOL_RUNNER_PID": str(dead_pid())}
    for agent in ("dev_dead1", "dev_dead2"):
        assert subprocess.run([str(BIN / "pmtool"), "claim", "--agent-id", agent, "--role", ROLE],
                              env=env, capture_output=True, check=False).returncode == 0
    # The pm took the second task back while its runner was dead.
    box.seeder.set_status(moved["id"], "created")
    owner = {t: a for a, t in (("dev_dead1", ours["id"]), ("dev_dead2", moved["id"]))}
    assert box.task(ours["id"])["locked_by"] == owner[ours["id"]]

    # The dead runner of `ours` left uncommitted work in its worktree.
    code, made = box.pmtool("worktree", "create", "--agent-id", "dev_dead1", "--repo",
                            str(box.repo))
    assert code == 0, made
    (Path(made["worktree"]) / "half-done.txt").write_text("half\n")

    proc = box.run("cron-recover.sh")

    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    assert re.search(r"pmtool recover: (released=1 waiting=1|waiting=1 released=1): ",
                     proc.stdout)
    assert f"dev_dead1/{ours['id']}=waiting" in proc.stdout
    assert f"dev_dead2/{moved['id']}=released" in proc.stdout
    # still ours, runner dead only just now: kept for it, and *not* re-registered (a
    # runner that never comes back must not keep the task locked); moved on: closed
    code, shown = box.pmtool("lock", "show", "--agent-id", "dev_dead1")
    assert code == 0 and shown["record"]["steps"][-1]["step"] != "recovered"
    assert box.pmtool("lock", "show", "--agent-id", "dev_dead2")[0] == 3
    assert [h["task"]["id"] for h in box.history()] == [moved["id"]]

    # Past the grace the task is given back, its work rescued to a ref named in the notes.
    proc = box.run("cron-recover.sh", "--grace", "0")
    assert proc.returncode == 0, proc.stderr
    assert f"dev_dead1/{ours['id']}=released" in proc.stdout
    on_server = box.task(ours["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None
    ref = re.search(r"uncommitted work saved at (refs/pmtool/rescue/\S+)", on_server["notes"])
    assert ref, on_server["notes"]
    assert subprocess.run(["git", "-C", str(box.repo), "show", f"{ref.group(1)}:half-done.txt"],
                          capture_output=True, text=True, check=True).stdout == "half\n"
    assert box.pmtool("lock", "show", "--agent-id", "dev_dead1")[0] == 3


# ---- debug-task.sh -----------------------------------------------------------------------


@pytest.mark.parametrize("pick", ["claim", "--task-id"])
def test_debug_task_walks_one_task_to_dev_done_on_enter(box: Box, pick: str) -> None:
    first = box.seeder.create_task(title="First", branch="feature/first")
    second = box.seeder.create_task(title="Second", branch="feature/second")
    task = first if pick == "claim" else second
    extra = ["--task-id", str(second["id"])] if pick == "--task-id" else []

    proc = box.run("debug-task.sh", "--role", ROLE, "--agent-id", "dev_dbg", "--repo",
                   str(box.repo), "--agent-cmd", fake_agent.command(), *extra,
                   input="\n" * 12)

    assert proc.returncode == 0, proc.stderr
    assert box.task(task["id"])["status"] == "dev_done"
    assert box.task((second if pick == "claim" else first)["id"])["status"] == "created"
    commands = [line[2:] for line in proc.stderr.splitlines() if line.startswith("$ pmtool ")]
    steps = [" ".join(shlex.split(c)[1:3]) for c in commands]
    assert steps == [("claim --agent-id" if pick == "claim" else "lock acquire"),
                     "model-for --task-json", "hook run", "worktree create",
                     "exec-claude --agent-id", "exec-claude --agent-id", "finish --agent-id",
                     "hook run", "worktree remove"]
    assert len(proc.stderr.split("press Enter for the next step")) == len(commands) + 1
    assert len(json_lines(proc.stdout)) == len(commands)
    assert not list((box.repo / ".worktrees").glob(f"task-{task['id']}*"))


# ---- crontab.example and the systemd unit ------------------------------------------------


def pmtool_help(*command: str) -> str:
    return subprocess.run([str(BIN / "pmtool"), *command, "--help"], capture_output=True,
                          text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout


def test_crontab_example_runs_scripts_that_exist_with_valid_arguments() -> None:
    jobs = [line for line in (SCRIPTS / "crontab.example").read_text().splitlines()
            if line.strip() and not line.startswith("#") and not re.match(r"^\w+=", line)]
    assert len(jobs) == 3
    checks = re.search(r"--check <str>\s+Run only this check \(repeatable\):([^.]+)\.",
                       pmtool_help("health"))
    assert checks
    valid_checks = {c.strip() for c in checks.group(1).replace("\n", " ").split(",")}
    for job in jobs:
        fields = job.split()
        command = shlex.split(" ".join(fields[5:]))
        assert "%" not in job  # cron would cut the line there
        script = SCRIPTS / Path(command[0]).name
        assert script.is_file() and os.access(script, os.X_OK), command[0]
        args = [a for a in command[1:] if not a.startswith(">")]
        if script.name == "cron-health.sh":
            values = args[1::2]
            assert args[0::2] == ["--check"] * len(values)
            assert set(values) <= valid_checks, values
        if script.name == "cron-recover.sh":
            assert all(a in pmtool_help("recover") for a in args), args


def systemd_expand(line: str, env: dict[str, str], instance: str, home: str) -> list[str]:
    """ExecStart as systemd turns it into argv: specifiers, then ${VAR} words."""
    line = line.replace("%%", "\0").replace("%i", instance).replace("%h", home)
    assert "%" not in line.replace("\0", ""), "an unknown specifier"
    argv = []
    for word in shlex.split(line.replace("\0", "%")):
        # No shell runs this line: a $ is either a whole ${VAR} word or a mistake.
        match = re.fullmatch(r"\$\{(\w+)\}", word)
        assert match or "$" not in word, word
        argv.append(env.get(match.group(1), "") if match else word)
    return argv


def test_systemd_unit_runs_pmtool_run_with_flags_it_has() -> None:
    unit = (SCRIPTS / "pmtool-agent@.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))
    assert settings["KillMode"] == "mixed"  # SIGTERM to pmtool only: the step may finish
    assert settings["KillSignal"] == "SIGTERM"
    specifiers = {"%H": "box1", "%i": "backend_dev", "%h": "/home/me",
                  "%S": "/home/me/.local/state"}
    env = {name: re.sub(r"%\w", lambda m: specifiers[m.group(0)], value)
           for name, value in re.findall(r"^Environment=(\w+)=(.*)$", unit, re.MULTILINE)}
    env.update(PMTOOL_REPO="/srv/app")  # agent.env
    argv = systemd_expand(settings["ExecStart"], env, "backend_dev", "/home/me")

    assert argv[0] == "/home/me/.local/bin/pmtool" and argv[1] == "run"
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    # One process per role, its agents named after the host: ids differ between machines.
    assert options == {"--role": "backend_dev", "--level": "senior", "--agents": "1",
                       "--agent-id": "box1-backend_dev", "--repo": "/srv/app"}
    assert env["PMTOOL_STATE_DIR"] == "/home/me/.local/state/pmtool/backend_dev"
    assert env["PATH"].startswith("/home/me/.local/bin:")
    run_help = pmtool_help("run")
    for flag in options:
        assert re.search(rf"^\s+{flag} ", run_help, re.MULTILINE), flag
    # every variable the command line uses comes from the unit or the documented env files
    for name in re.findall(r"\$\{(\w+)\}", settings["ExecStart"]):
        assert name in env or re.search(rf"^# .*\b{name}=", unit, re.MULTILINE), name


def test_debug_task_lands_a_minor_task_and_says_so(box: Box) -> None:
    task = box.seeder.create_task(title="Typo", complexity="minor")
    proc = box.run("debug-task.sh", "--role", ROLE, "--agent-id", "dev_dbg_minor", "--repo",
                   str(box.repo), "--agent-cmd", fake_agent.command(), input="\n" * 14)
    assert proc.returncode == 0, proc.stderr
    assert "$ pmtool worktree land" in proc.stderr
    assert git(box.repo, "log", "-1", "--format=%s", "main") == \
        f"task {task['id']}: backend_dev notes (fake agent)"
    assert "landed on main by fast-forward" in box.task(task["id"])["notes"]


# ---- benchmarks/runner_script.py -----------------------------------------------------------


def test_runner_benchmark_smallest_counts_the_processes_of_a_task(tmp_path: Path) -> None:
    # The benchmark runs (it measures the script against `pmtool run`), and a task costs
    # the script 4 pmtool processes and 1 jq: a step added to the hot path shows up here.
    bench = SCRIPTS.parent / "benchmarks" / "runner_script.py"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PMTOOL_TEST_PM_URL", "PMTOOL_TEST_PM_KEY")}
    proc = subprocess.run([sys.executable, str(bench), "--rounds", "1", "--tasks", "2",
                           "--files", "20"], capture_output=True, text=True,
                          env={**env, "TMPDIR": str(tmp_path)}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\s+pm-runner\.sh\s+\d+\.\d\d s ", proc.stdout, re.MULTILINE), \
        proc.stdout
    assert "processes per task, pm-runner.sh: 4 pmtool, 1 jq " in proc.stdout, proc.stdout

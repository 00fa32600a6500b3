"""Crash windows and poison tasks: `pmtool run` killed at every step of the loop, then
started again (or `pmtool recover` run from another process), ends with every task
finished once or back in the queue, no worktree and no process left, a history that
tells the truth and post_task started at most once; a task git cannot work with is
parked and its agent goes on to the next one. Real subprocesses, real git, the stand-in
server, the fake agent (the real claude where its processes matter: tests/e2e/)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import (
    PMTOOL,
    Run,
    World,
    _closed,
    _left_processes,
    _no_worktree_left,
    dev_done_count,
    events,
    wait_for,
)
from pmtool.faults import POINTS
from pmtool.state import StateDir

# Points at which the agent had given its verdict: from there the task is finished, by
# the next start or by recover, never given back. At agent-end the verdict is only in the
# transcript (pmtool was killed before noting it): that counts too.
FINISH_POINTS = ("agent-end", "leftover", "push", "status", "post-task", "worktree-remove",
                 "close")

# Points only `pmtool recover` reaches (its own give-back of a dead runner's task).
RECOVER_POINTS = ("give-back",)


def _hooks(world: World) -> None:
    """post_task and worktree_setup hooks that count their starts in files."""
    for name in ("post_task", "worktree_setup"):
        hook = world.hooks / name
        hook.write_text(f"#!/bin/sh\necho started >> {world.tmp / (name + '.count')}\n")
        hook.chmod(0o755)


def _starts(world: World, hook: str) -> int:
    path = world.tmp / f"{hook}.count"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _remote(world: World) -> Path:
    bare = world.tmp / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    world.git("remote", "add", "origin", str(bare))
    return bare


def _kill_at(world: World, point: str, task: dict[str, Any]) -> None:
    env = {"PMTOOL_FAULT": point, "PMTOOL_FAKE_AGENT_NO_COMMIT": "1"}
    if point == "agent-tool":
        env["PMTOOL_FAKE_AGENT_SLEEP"] = "4"  # the agent outlives its runner meanwhile
    run = world.run("--single-task", "--push", env=env)
    assert run.code == -9, (point, run.code, run.stderr[-2000:])


@pytest.mark.parametrize("how", ["restart", "recover"])
@pytest.mark.parametrize("point", [p for p in POINTS if p not in RECOVER_POINTS])
def test_killed_at_any_step_every_task_and_process_is_accounted_for(
        world: World, point: str, how: str) -> None:
    _hooks(world)
    bare = _remote(world)
    task = world.task()
    _kill_at(world, point, task)

    if how == "restart":
        again = world.run("--single-task", "--push")
        assert again.code == 0, again.stderr[-3000:]
    else:
        proc = subprocess.run([PMTOOL, "recover", "--all", "--give-back"],
                              env={**world.env, "PMTOOL_PUSH": "1"}, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr

    server = world.status(task["id"])
    finished = dev_done_count(world, task["id"])
    closed = _closed(world, task["id"])
    assert finished <= 1, point
    if how == "restart" or point in FINISH_POINTS:
        # Finished exactly once, its work on the pushed task branch, post_task once.
        assert finished == 1 and server["status"] == "dev_done", (point, server)
        assert closed.count("done") == 1 and closed[-1] == "done", closed
        pushed = subprocess.run(["git", "-C", str(bare), "show",
                                 f"{task['branch']}:notes/task-{task['id']}.md"],
                                capture_output=True, text=True).stdout
        assert f"task {task['id']}: " in pushed, point  # the agent's file
        assert _starts(world, "post_task") == 1, point
    else:
        # Given back: in the queue again, unlocked; post_task never ran.
        assert server["status"] == "created" and server["locked_by"] is None, server
        assert finished == 0 and "done" not in closed, closed
        assert _starts(world, "post_task") == 0
    if point in FINISH_POINTS:
        assert "released" not in closed and "moved_on" not in closed, closed
    assert world.store.load("dev_1") is None
    _no_worktree_left(world, task["id"])
    assert _left_processes(world) == []


@pytest.mark.parametrize("point", ["push", "status", "post-task", "worktree-remove", "close"])
def test_recover_killed_while_it_completes_a_finish_is_completed_by_the_next_recover(
        world: World, point: str) -> None:
    _hooks(world)
    _remote(world)
    task = world.task()
    _kill_at(world, "leftover", task)
    recover = [PMTOOL, "recover", "--all"]
    env = {**world.env, "PMTOOL_PUSH": "1"}
    killed = subprocess.run(recover, env={**env, "PMTOOL_FAULT": point}, capture_output=True,
                            text=True, timeout=60, check=False)
    assert killed.returncode == -9, killed.stderr
    again = subprocess.run(recover, env=env, capture_output=True, text=True, timeout=60,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert dev_done_count(world, task["id"]) == 1
    assert _closed(world, task["id"]) == ["done"]
    assert _starts(world, "post_task") == 1
    assert world.store.load("dev_1") is None
    _no_worktree_left(world, task["id"])


def test_recover_killed_while_it_gives_a_task_back_is_completed_by_the_next_recover(
        world: World) -> None:
    from pmtool.failure_policy import attempts_of
    from pmtool.ledger import Ledger

    task = world.task()
    _kill_at(world, "agent-tool", task)  # the agent's file is left uncommitted
    killed = subprocess.run([PMTOOL, "recover", "--all", "--give-back"],
                            env={**world.env, "PMTOOL_FAULT": "give-back"},
                            capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == -9, killed.stderr
    begun = [s for s in world.store.load("dev_1").steps if s["step"] == "recover-give-back"]
    assert len(begun) == 1 and world.status(task["id"])["status"] == "under_work"
    rescued = begun[0]["rescued"]
    # Plain cron recover, no --give-back and well within the grace: a give-back that was
    # begun (the worktree is gone) is completed, not kept waiting for its runner.
    again = subprocess.run([PMTOOL, "recover", "--all"], env=world.env, capture_output=True,
                           text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["entries"][0]["action"] == "released"
    server = world.status(task["id"])
    assert server["status"] == "created" and server["locked_by"] is None, server
    assert "given back by pmtool recover" in server["notes"]
    if rescued:
        assert rescued in server["notes"]
    assert world.store.load("dev_1") is None
    assert _closed(world, task["id"]) == ["released"]
    attempts = attempts_of(Ledger(world.state).lines(), task)
    assert len(attempts) == 1 and attempts[0]["stop"] == "killed"  # counted once
    _no_worktree_left(world, task["id"])


def test_a_setup_cut_short_runs_again_on_resume(world: World) -> None:
    _hooks(world)
    task = world.task()
    run = world.run("--single-task", env={"PMTOOL_FAULT": "setup"})
    assert run.code == -9
    assert _starts(world, "worktree_setup") == 0  # killed before it started
    again = world.run("--single-task")
    assert again.code == 0, again.stderr
    assert _starts(world, "worktree_setup") == 1
    assert world.status(task["id"])["status"] == "dev_done"


def test_a_crashed_run_is_counted_in_the_notes_from_its_transcript(world: World) -> None:
    task = world.task()
    proc = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "60"})
    wait_for(lambda: any("tool_use" in log.read_text()
                         for log in (world.state / "logs").glob("task-*.jsonl")),
             what="the agent's first tool call")
    proc.kill()
    proc.communicate()
    again = world.run("--single-task")
    assert again.code == 0, again.stderr
    notes = world.status(task["id"])["notes"]
    session = again.of("agent")[0]["session_id"]
    assert f"agent: session {session}, model sonnet, " in notes
    # Both runs: the crashed one from its transcript (its cost estimated from tokens).
    assert "4 turns" in notes and "over 2 runs, 1 without a result" in notes
    assert "(some estimated)" in notes
    closed = StateDir(world.state).history(task_id=task["id"], kind="closed")[-1]
    assert closed["runs"]["attempts"] == 2 and closed["session_id"] == session
    assert closed["cost_usd"] > again.of("agent")[0]["total_cost_usd"]  # the crashed run
    assert _left_processes(world) == []


# ---- poison tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["--upload-pack=x", "../../etc", "with space", "a..b", "-b",
                                    "x" * 300])
def test_a_branch_git_rejects_parks_the_task_and_the_agent_goes_on(
        world: World, branch: str) -> None:
    bad = world.task(title="Poison", branch=branch)
    good = world.task(title="Good")
    run = world.run("--max-tasks", "1")
    assert run.code == 0, run.stderr
    parked = run.of("parked")[0]
    assert parked["task_id"] == bad["id"] and parked["cause"] == "poison"
    assert parked["error"]["type"] == "task_fault"
    assert world.status(bad["id"])["status"] == "pending"
    assert world.status(bad["id"])["locked_by"] is None
    assert "parked by pmtool (poison)" in world.status(bad["id"])["notes"]
    assert world.status(good["id"])["status"] == "dev_done"  # the next task was worked
    assert _closed(world, bad["id"]) == ["parked"]
    assert not (world.tmp / "etc").exists() and not list(world.repo.glob("--upload-pack*"))
    # Found before any hook saw it: the first hook event is the good task's.
    assert run.of("hook")[0]["task_id"] == good["id"]
    _no_worktree_left(world, bad["id"])


def test_a_give_back_says_what_the_attempt_cost(world: World) -> None:
    task = world.task()
    run = world.run("--single-task", "--on-agent-failure", "release",
                    env={"PMTOOL_FAKE_AGENT_OUTCOME": "none"})
    assert run.code == 1
    notes = world.status(task["id"])["notes"]
    assert "released: attempt 1/3" in notes and "agent failed" in notes
    assert "model sonnet, 3 turns, $0.0003 over 1 runs" in notes


def test_a_worktree_setup_that_fails_for_good_parks_the_task(world: World) -> None:
    hook = world.hooks / "worktree_setup"
    hook.write_text(f"#!/bin/sh\necho run >> {world.tmp / 'setup.count'}\n"
                    "echo 'npm: no such package' >&2\nexit 7\n")
    hook.chmod(0o755)
    task = world.task()
    run = world.run("--single-task")
    assert run.code == 1
    assert len((world.tmp / "setup.count").read_text().splitlines()) == 2  # once more
    parked = run.of("parked")[0]
    assert "worktree_setup failed twice (exit 7): npm: no such package" in parked["reason"]
    assert world.status(task["id"])["status"] == "pending"
    _no_worktree_left(world, task["id"])


# ---- orphans of dead runners -----------------------------------------------------------------


def test_recover_ends_a_hook_its_dead_runner_left_running(world: World) -> None:
    hook = world.hooks / "worktree_setup"
    pidfile = world.tmp / "hook.pid"
    hook.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    hook.chmod(0o755)
    task = world.task()
    runner = world.start()
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
                       what="the hook"))
    runner.kill()
    runner.communicate()
    proc = subprocess.run([PMTOOL, "recover", "--all", "--give-back"], env=world.env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert world.status(task["id"])["status"] == "created"
    _no_worktree_left(world, task["id"])


def test_a_repo_that_is_gone_is_found_before_any_claim(world: World) -> None:
    """A fault of the machine, not of the task: nothing is claimed, nothing parked."""
    task = world.task()
    args = [a if a != str(world.repo) else str(world.tmp / "gone")
            for a in world.args("--single-task")]  # the repo folder is not there
    proc = subprocess.run([PMTOOL, "run", *args], capture_output=True, text=True,
                          env=world.env, cwd=world.tmp, timeout=60, check=False)
    run = Run(proc.returncode, events(proc.stdout), proc.stderr)
    assert run.code not in (0, 3) and not run.of("claimed"), run.stderr
    server = world.status(task["id"])
    assert server["status"] == "created" and server["locked_by"] is None
    assert world.store.load("dev_1") is None

def test_finish_alone_writes_the_runners_summary(world: World) -> None:
    """The bash pipeline (claim, exec-claude, finish) gets the notes a runner writes."""
    from helpers import pmtool
    from pmtool.testing import fake_agent

    task = world.task()
    assert pmtool("claim", "--agent-id", "dev_9", "--role", "backend_dev", env=world.env,
                  cwd=world.repo).code == 0
    ran = pmtool("exec-claude", "--agent-id", "dev_9", "--agent-cmd", fake_agent.command(),
                 env=world.env, cwd=world.repo)
    assert ran.code == 0, ran.stderr
    done = pmtool("finish", "--agent-id", "dev_9", "--outcome", "done", "--notes",
                  "tests green", env=world.env, cwd=world.repo)
    assert done.code == 0, done.stderr
    notes = world.status(task["id"])["notes"]
    head = world.git("rev-parse", "HEAD")
    assert "dev_9: done: tests green\npmtool: done; branch main at " + head[:12] in notes
    assert f"agent: session {ran.out['session_id']}, model " in notes
    assert "turns, $0.0003 over 1 runs" in notes


def test_a_push_the_remote_refuses_is_said_in_the_notes_and_the_task_still_finishes(
        world: World) -> None:
    bare = _remote(world)
    task = world.task()
    # The remote takes fetches but refuses every push (a protected branch, a hook's
    # policy). A remote that merely moved on is fetched before the work, so its push
    # is a fast-forward: refusal has to come from the remote itself.
    hook = bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are closed today' >&2\nexit 1\n")
    hook.chmod(0o755)
    run = world.run("--single-task", "--push")
    assert run.code == 0, run.stderr
    assert run.of("finished")[0]["pushed"] is False
    notes = world.status(task["id"])["notes"]
    assert "not pushed (git push failed: " in notes and world.status(task["id"])["status"] \
        == "dev_done"


def test_recover_dry_run_names_a_finish_to_complete_and_changes_nothing(world: World) -> None:
    _hooks(world)
    task = world.task()
    _kill_at(world, "status", task)
    dry = subprocess.run([PMTOOL, "recover", "--all", "--dry-run"], env=world.env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    entry = json.loads(dry.stdout)["entries"][0]
    assert entry["action"] == "finish" and entry["outcome"] == "done" and "ended" not in entry
    assert world.store.load("dev_1") is not None and _starts(world, "post_task") == 0
    done = subprocess.run([PMTOOL, "recover", "--all"], env=world.env, capture_output=True,
                          text=True, timeout=60, check=False)
    entry = json.loads(done.stdout)["entries"][0]
    assert entry["action"] == "finished" and entry["result"]["status"] == "dev_done"
    assert _closed(world, task["id"]) == ["done"] and _starts(world, "post_task") == 1


def test_a_watcher_setup_left_dies_with_its_runner_and_setup_runs_again(
        world: World) -> None:
    pids = world.tmp / "watchers"
    hook = world.hooks / "worktree_setup"
    hook.write_text("#!/bin/sh\nsetsid sleep 300 > /dev/null 2>&1 < /dev/null &\n"
                    f"echo $! >> {pids}\n")
    hook.chmod(0o755)
    task = world.task()
    _kill_at(world, "agent-tool", task)
    first = int(pids.read_text().split()[0])
    assert psutil.pid_exists(first)  # the watcher outlived its runner
    again = world.run("--single-task")
    assert again.code == 0, again.stderr
    watchers = [int(p) for p in pids.read_text().split()]
    try:
        assert len(watchers) == 2  # setup ran again on the resume, in the same worktree
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        assert world.status(task["id"])["status"] == "dev_done"
    finally:
        for pid in watchers[1:]:  # left on purpose by the second setup: not this test's case
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def test_a_record_corrupted_during_the_finish_does_not_stop_it_closing(world: World) -> None:
    import signal

    from helpers import wait_stopped

    _hooks(world)
    task = world.task()
    _kill_at(world, "leftover", task)  # the verdict is given: recover completes the finish
    recover = subprocess.Popen([PMTOOL, "recover", "--all"],
                               env={**world.env, "PMTOOL_FAULT": "pause-status"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped([recover.pid])
        record = world.store.path("dev_1")
        record.write_bytes(os.urandom(512) + b"\xff\xfe")  # the status is set; its note is not
        os.kill(recover.pid, signal.SIGCONT)
        out, err = recover.communicate(timeout=60)
    finally:
        if recover.poll() is None:
            recover.kill()
    assert recover.returncode == 0, err[-3000:]
    (entry,) = json.loads(out)["entries"]
    assert entry["action"] == "finished", entry
    assert world.status(task["id"])["status"] == "dev_done"
    assert _closed(world, task["id"]) == ["done"]
    assert _starts(world, "post_task") == 1
    _no_worktree_left(world, task["id"])
    assert not record.exists()
    (kept,) = record.parent.glob("dev_1.json.corrupt-*")
    assert kept.read_bytes().endswith(b"\xff\xfe")  # kept aside, never deleted


def test_an_unreadable_record_of_another_agent_does_not_stop_a_runner(world: World) -> None:
    task = world.task()
    other = world.state / "records" / "dev_other.json"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"\x87\xff\xfe not a record")
    run = world.run("--single-task")
    assert run.code == 0, run.stderr[-3000:]
    assert world.status(task["id"])["status"] == "dev_done"
    assert other.read_bytes() == b"\x87\xff\xfe not a record"  # another agent's: for recover



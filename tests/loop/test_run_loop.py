"""`pmtool run` and `pmtool demo`: the loop as a user runs it, in real subprocesses, against a
stand-in server, in real git repositories, with the built-in fake agent (end to end with
the real claude binary against the scripted model server: tests/e2e/test_claude_loop.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import (
    PMTOOL,
    Run,
    World,
    dev_done_count,
    events,
    interrupt_at_terminal,
    read_pty,
    wait_for,
)
from pmtool.state import StateDir

# ---- one task, start to end ---------------------------------------------------------------


def test_single_task_major_goes_to_dev_done_on_its_branch(world: World) -> None:
    task = world.task()
    run = world.run("--single-task")
    assert run.code == 0, run.stderr
    assert run.kinds() == ["preflight", "health", "claimed", "hook", "worktree", "agent",
                           "finished", "hook", "worktree", "stopped"]
    finished = run.of("finished")[0]
    assert finished["outcome"] == "done" and finished["status"] == "dev_done"
    server_task = world.status(task["id"])
    assert server_task["status"] == "dev_done" and server_task["locked_by"] is None
    notes = server_task["notes"]
    assert "pmtool: done; branch " in notes and "model sonnet, 3 turns" in notes
    head = world.git("rev-parse", task["branch"])
    assert f"branch {task['branch']} at {head[:12]}" in notes  # where the work is
    assert "not pushed (push is off)" in notes and "over 1 runs" in notes
    # The agent's commit is on the task branch, not on main; the worktree is gone.
    assert "backend_dev notes" in world.git("log", "-1", "--format=%s", task["branch"])
    assert "fake agent" not in world.git("log", "-1", "--format=%s", "main")
    worktree = run.of("worktree")[0]["path"]
    assert not Path(worktree).exists()
    assert world.store.load("dev_1") is None
    history = (world.state / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["outcome"] == "done"
    assert "task" in run.stderr and "finished" in run.stderr  # the human view


# A machine booted a second ago: monotonic time (which counts from boot) starts near 0.
_JUST_BOOTED = ("import sys, time; real = time.monotonic; t0 = real(); "
                "time.monotonic = lambda: real() - t0 + 1.0; "
                "from pmtool.cli import main; sys.argv[0] = 'pmtool'; main()")


def test_a_machine_up_for_seconds_registers_before_its_first_claim(world: World) -> None:
    task = world.task()
    proc = subprocess.run([sys.executable, "-c", _JUST_BOOTED, "run",
                           *world.args("--single-task")], capture_output=True, text=True,
                          env=world.env, cwd=world.repo, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [e["task_id"] for e in events(proc.stdout) if e["event"] == "claimed"] == [task["id"]]
    assert world.status(task["id"])["status"] == "dev_done"


def test_every_event_is_kept_in_the_runners_event_log(world: World) -> None:
    first, second = world.task(), world.task()
    runs = [world.run("--single-task"), world.run("--single-task", "--agent-id", "dev_2")]
    assert all(run.code == 0 for run in runs), runs[0].stderr + runs[1].stderr
    state = StateDir(world.state)
    assert state.events(agent_id="dev_1") == runs[0].events  # as printed, in order
    assert state.events(agent_id="dev_2") == runs[1].events
    assert state.events() == sorted(runs[0].events + runs[1].events, key=lambda e: e["time"])
    task_id = runs[1].of("claimed")[0]["task_id"]
    assert {e["agent"] for e in state.events(task_id=task_id)} == {"dev_2"}
    closed = state.history(task_id=task_id, kind="closed")
    assert [(h["agent_id"], h["outcome"]) for h in closed] == [("dev_2", "done")]
    assert {first["id"], second["id"]} == {h["task_id"] for h in state.history()}
    assert oct(state.events_path("dev_1").stat().st_mode & 0o777) == "0o600"
    assert oct(state.logs_dir.stat().st_mode & 0o777) == "0o700"  # transcripts kept private


def test_uncommitted_work_is_committed_by_pmtool_on_the_task_branch(world: World) -> None:
    task = world.task()
    run = world.run("--single-task", env={"PMTOOL_FAKE_AGENT_NO_COMMIT": "1"})
    assert run.code == 0, run.stderr
    removed = run.of("worktree")[-1]
    assert removed["removed"] is True and removed["rescued"] is None
    assert not Path(removed["path"]).exists()
    # The agent's file is on the task branch, in a commit of its own that says who made it.
    subject = world.git("log", "-1", "--format=%s", task["branch"])
    assert subject == f"pmtool: uncommitted work the agent left on task {task['id']}"
    assert f"worked on task {task['id']}" in world.git(
        "show", f"{task['branch']}:notes/task-{task['id']}.md")
    head = world.git("rev-parse", task["branch"])
    server_task = world.status(task["id"])
    assert server_task["status"] == "dev_done"
    assert f"uncommitted work committed by pmtool as {head[:12]}" in server_task["notes"]


def test_leftover_rescue_keeps_the_work_on_a_ref_and_gives_the_task_back(
        world: World) -> None:
    task = world.task()
    run = world.run("--single-task", "--leftover", "rescue",
                    env={"PMTOOL_FAKE_AGENT_NO_COMMIT": "1"})
    assert run.code == 1, run.stderr  # not finished: given back
    finished = run.of("finished")[0]
    ref = finished["rescued"]
    assert finished["action"] == "given_back" and ref.startswith(
        f"refs/pmtool/rescue/task-{task['id']}/")
    # Every byte of the uncommitted file is in the rescue ref; the task branch is untouched.
    rescued = world.git("show", f"{ref}:notes/task-{task['id']}.md")
    assert f"backend_dev worked on task {task['id']}" in rescued
    assert "fake agent" not in world.git("log", "-1", "--format=%s", task["branch"])
    assert run.of("worktree")[-1]["rescued"] == ref  # one ref, not a second copy
    assert world.git("for-each-ref", f"refs/pmtool/rescue/task-{task['id']}").count("\n") == 0
    server_task = world.status(task["id"])
    assert server_task["status"] == "created" and f"saved at {ref}" in server_task["notes"]
    closed = StateDir(world.state).history(task_id=task["id"], kind="closed")
    assert [h["outcome"] for h in closed] == ["released"]


def test_single_task_with_nothing_to_do_exits_3(world: World) -> None:
    run = world.run("--single-task")
    assert run.code == 3
    assert run.kinds()[-1] == "stopped"


def test_minor_task_commits_on_main_without_worktree(world: World) -> None:
    task = world.task(complexity="minor", branch="main")
    run = world.run("--single-task", env={"PMTOOL_MINOR_IN_CHECKOUT": "1"})
    assert run.code == 0, run.stderr
    assert run.of("worktree")[0]["path"] is None
    assert "backend_dev notes" in world.git("log", "-1", "--format=%s", "main")
    assert world.status(task["id"])["status"] == "dev_done"


def test_qa_fail_sends_task_back_and_developer_takes_it_again(world: World) -> None:
    task = world.task()
    assert world.run("--single-task").code == 0
    qa = world.run("--single-task", "--role", "qa", "--agent-id", "qa_1",
                   env={"PMTOOL_FAKE_AGENT_OUTCOME": "fail"})
    assert qa.code == 0, qa.stderr
    assert qa.of("finished")[0]["status"] == "created"
    back = world.status(task["id"])
    assert back["status"] == "created" and "pmtool: fail" in back["notes"]
    again = world.run("--single-task")
    assert again.code == 0, again.stderr
    assert again.of("claimed")[0]["task_id"] == task["id"]
    assert world.status(task["id"])["status"] == "dev_done"
    qa = world.run("--single-task", "--role", "qa", "--agent-id", "qa_1")
    assert world.status(task["id"])["status"] == "qa_done"


# ---- failures and policies ----------------------------------------------------------------


def test_failing_agent_is_retried_with_resume_then_given_back(world: World) -> None:
    task = world.task()
    run = world.run("--single-task", env={"PMTOOL_FAKE_AGENT_EXIT": "1"})
    assert run.code == 1
    agents = run.of("agent")
    assert len(agents) == 2 and agents[1]["resumed"] is True
    assert agents[0]["session_id"] == agents[1]["session_id"]
    given = run.of("finished")[0]
    assert given["outcome"] == "given_back" and "agent failed" in given["reason"]
    back = world.status(task["id"])
    assert back["status"] == "created" and back["locked_by"] is None
    assert "agent failed" in back["notes"]


def test_a_restarted_runner_knows_the_claim_was_already_resumed(world: World) -> None:
    """What the claim tried is read from its record: killed during the resumed run, the
    runner started again gives the task back after one more failed run (not two)."""
    task = world.task()
    failing = {"PMTOOL_FAKE_AGENT_EXIT": "1", "PMTOOL_FAKE_AGENT_SLEEP": "2"}
    proc = world.start(env=failing)

    def resumed_run() -> bool:
        record = world.store.load("dev_1")
        steps = record.steps if record else []
        said = [s for s in steps if s["step"] == "agent_finished"]
        return bool(said) and said[-1].get("next") == {"step": "resume"} \
            and steps[-1]["step"] == "agent_running"

    wait_for(resumed_run, what="the resumed run to start")
    proc.kill()
    proc.communicate()
    again = world.run("--single-task", env={"PMTOOL_FAKE_AGENT_EXIT": "1"})
    assert again.code == 1, again.stderr
    assert len(again.of("agent")) == 1 and again.of("agent")[0]["resumed"] is True
    assert again.of("finished")[0]["outcome"] == "given_back"
    assert world.status(task["id"])["status"] == "created"


def test_escalate_retries_on_the_stronger_model(world: World) -> None:
    world.task()
    run = world.run("--single-task", "--on-agent-failure", "release", "--escalate",
                    env={"PMTOOL_FAKE_AGENT_OUTCOME": "none"})
    assert [a["model"] for a in run.of("agent")] == ["sonnet", "opus"]
    assert run.of("finished")[0]["outcome"] == "given_back"


def test_task_budget_gives_the_task_back(world: World) -> None:
    world.task()
    run = world.run("--single-task", "--task-budget-usd", "0.0001",
                    env={"PMTOOL_FAKE_AGENT_OUTCOME": "none"})
    assert len(run.of("agent")) == 1
    assert "task budget" in run.of("finished")[0]["reason"]


def test_failing_pre_task_hook_gives_the_task_back(world: World) -> None:
    task = world.task()
    hook = world.hooks / "pre_task.sh"
    hook.write_text("#!/bin/sh\necho 'disk is full' >&2\nexit 1\n")
    hook.chmod(0o755)
    run = world.run("--single-task")
    assert run.code == 1
    assert run.of("hook")[0]["ok"] is False
    assert run.of("finished"), (run.events[-3:], run.stderr)
    assert "disk is full" in run.of("finished")[0]["reason"]
    assert world.status(task["id"])["status"] == "created"
    assert not run.of("agent")

    run = world.run("--single-task", "--on-hook-failure", "continue")
    assert run.code == 0 and world.status(task["id"])["status"] == "dev_done"


def test_unknown_policy_and_level_are_usage_errors(world: World) -> None:
    for args in (["--on-agent-failure", "maybe"], ["--level", "staff"]):
        proc = subprocess.run([PMTOOL, "run", *world.args(*args)], capture_output=True,
                              text=True, env=world.env, check=False)
        assert proc.returncode == 2
        assert json.loads(proc.stdout)["error"]["type"] == "usage"


def test_a_python_caller_gets_the_policy_checks_the_cli_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pmtool.config import SPECS, load_settings
    from pmtool.errors import UsageError
    from pmtool.run.loop import RunOptions
    from pmtool.settings import AgentFailure, Leftover

    for bad in ({"on_agent_failure": "maybe"}, {"on_hook_failure": "retry"},
                {"leftover": "drop"}, {"max_attempts": 0}, {"max_turns": 2.5},
                {"retry_cooldown": -1.0}, {"daily_budget_usd": "lots"},
                {"poll_interval": 10.0, "poll_max": 5.0}, {"level": "staff"}):
        with pytest.raises(UsageError):
            RunOptions(agent_id="a", role="qa", **bad)
    opts = RunOptions(agent_id="a", role="qa", on_agent_failure="stop", max_turns=4.0)
    assert opts.on_agent_failure is AgentFailure.STOP and opts.on_agent_failure == "stop"
    assert opts.max_turns == 4 and isinstance(opts.max_turns, int)
    with pytest.raises(AttributeError):
        opts.max_attempts = 9  # type: ignore[misc]  (frozen)
    # One set of defaults: the settings' and the options' agree.
    default = RunOptions(agent_id="a", role="qa")
    for name in ("on_agent_failure", "on_hook_failure", "max_attempts", "retry_cooldown",
                 "max_bounces", "max_consecutive_failures", "daily_budget_usd", "max_turns",
                 "poll_interval", "poll_max", "keep_logs", "leftover", "push", "grace"):
        assert getattr(default, name) == SPECS[name].default, name

    config = tmp_path / "config.toml"
    config.write_text('leftover = "rescue"\nmax_attempts = 5\npush = true\n')
    monkeypatch.setenv("PMTOOL_RETRY_COOLDOWN", "7.5")
    monkeypatch.setenv("PMTOOL_MAX_BOUNCES", "nine")
    with pytest.raises(UsageError, match="PMTOOL_MAX_BOUNCES"):
        load_settings(config_path=config)
    monkeypatch.setenv("PMTOOL_MAX_BOUNCES", "0")
    with pytest.raises(UsageError, match="from env:PMTOOL_MAX_BOUNCES"):
        RunOptions.from_settings(load_settings(config_path=config), agent_id="a", role="qa")
    monkeypatch.delenv("PMTOOL_MAX_BOUNCES")
    settings = load_settings({"grace": 60}, config_path=config)
    opts = RunOptions.from_settings(settings, agent_id="a", role="qa", max_attempts=2)
    assert opts.leftover is Leftover.RESCUE and opts.push is True  # config file
    assert opts.retry_cooldown == 7.5  # environment
    assert opts.grace == 60.0  # flag, through the settings
    assert opts.max_attempts == 2  # given beats the settings


def test_run_flags_reach_the_settings_and_bad_env_values_are_usage_errors(
        world: World) -> None:
    proc = subprocess.run([PMTOOL, "run", "--help"], capture_output=True, text=True,
                          env={**world.env, "COLUMNS": "200"}, check=True)
    for flag in ("--max-attempts", "--retry-cooldown", "--max-bounces",
                 "--max-consecutive-failures", "--daily-budget-usd", "--max-turns",
                 "--poll-interval", "--poll-max", "--keep-logs", "--leftover", "--push",
                 "--grace"):
        assert f" {flag} " in proc.stdout, flag
    proc = subprocess.run([PMTOOL, "config"], capture_output=True, text=True,
                          env={**world.env, "PMTOOL_GRACE": "30"}, check=True)
    shown = json.loads(proc.stdout)["settings"]
    assert shown["grace"] == {"value": 30.0, "source": "env:PMTOOL_GRACE"}
    assert shown["max_attempts"] == {"value": 3, "source": "default"}
    world.task()
    proc = subprocess.run([PMTOOL, "run", *world.args("--single-task")], capture_output=True,
                          text=True, env={**world.env, "PMTOOL_ON_HOOK_FAILURE": "shrug"},
                          check=False)
    assert proc.returncode == 2
    assert "PMTOOL_ON_HOOK_FAILURE" in json.loads(proc.stdout)["error"]["message"]
    assert world.store.load("dev_1") is None  # checked before anything was claimed


def test_second_runner_for_the_same_agent_is_refused(world: World) -> None:
    first = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "30"})
    try:
        world.task()
        wait_for(lambda: (world.store.load("dev_1") or None) and
                 world.store.load("dev_1").session_id, what="the agent to start")
        second = world.run("--single-task")
        assert second.code == 5
        assert "already has a runner" in second.stderr
    finally:
        first.kill()
        first.communicate()


# ---- signals, crashes, heartbeat ----------------------------------------------------------


def test_sigterm_stops_after_the_step_and_restart_finishes_once(world: World) -> None:
    task = world.task()
    proc = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "2"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id,
             what="the agent to start")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    first = Run(proc.returncode, events(out), err)
    assert first.of("agent")[0]["outcome"] == "done"  # the step ran to its end
    assert not first.of("finished")
    assert first.of("stopped")[0]["record_kept"] is True
    assert world.status(task["id"])["status"] == "under_work"

    again = world.run("--single-task")
    assert again.code == 0, again.stderr
    assert again.kinds()[:3] == ["preflight", "health", "resumed"]
    assert not again.of("agent")  # the verdict was kept: the agent does not run twice
    assert again.of("finished")[0]["status"] == "dev_done"
    assert dev_done_count(world, task["id"]) == 1


def test_second_signal_ends_the_agent_now_and_keeps_the_record(world: World) -> None:
    world.task()
    proc = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "60"})
    record = wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id and r,
                      what="the agent to start")
    agent_pid = wait_for(lambda: next((s["pid"] for s in world.store.load("dev_1").steps
                                       if s["step"] == "agent_running"), None),
                         what="the agent's pid")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=20)
    assert not psutil.pid_exists(agent_pid) or \
        psutil.Process(agent_pid).status() == psutil.STATUS_ZOMBIE
    kept = world.store.load("dev_1")
    assert kept is not None and kept.session_id == record.session_id
    assert events(out)[-1]["event"] == "stopped"


def test_kill_9_during_the_agent_then_restart_resumes_the_same_task(world: World) -> None:
    task = world.task()
    proc = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "60"})
    record = wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id and r,
                      what="the agent to start")
    wait_for(lambda: any(s["step"] == "agent_running" for s in world.store.load("dev_1").steps),
             what="the agent's pid")
    proc.kill()
    proc.communicate()
    again = world.run("--single-task")
    assert again.code == 0, again.stderr
    resumed = again.of("resumed")[0]
    assert resumed["task_id"] == task["id"] and resumed["session_id"] == record.session_id
    agent = again.of("agent")[0]
    assert agent["session_id"] == record.session_id and agent["resumed"] is True
    assert world.status(task["id"])["status"] == "dev_done"
    assert dev_done_count(world, task["id"]) == 1


def test_heartbeat_notices_the_task_was_given_away(world: World) -> None:
    task = world.task()
    proc = world.start("--heartbeat", "0.2", "--single-task",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "30"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    # Someone else takes the task: the lock moves to another agent.
    world.seeder.release(task["id"], status="created")
    world.seeder.register("thief", "backend_dev", "senior")
    world.seeder.lock(task["id"], "thief")
    out, err = proc.communicate(timeout=30)
    run = Run(proc.returncode, events(out), err)
    assert run.code == 5, err
    error = run.of("error")[0]["error"]
    assert error["type"] == "conflict" and "no longer ours" in error["message"]
    assert world.status(task["id"])["locked_by"] == "thief"
    assert world.store.load("dev_1") is None


def test_a_lock_that_lands_after_the_claim_settled_does_not_take_the_task(
        world: World) -> None:
    # Quirk 2: another agent's lock request passed its check while the task was free and
    # its write lands only now, after our claim settled, read back and set under_work. That
    # agent read the task back, found it under work and walked away; the lock is its.
    task = world.task()
    world.seeder.register("dev_late", "backend_dev", "senior")
    proc = world.start("--heartbeat", "0.2", "--single-task",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "3"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    world.server.land_late_lock(task["id"], "dev_late")
    assert world.status(task["id"])["locked_by"] == "dev_late"
    out, err = proc.communicate(timeout=60)
    run = Run(proc.returncode, events(out), err)
    assert run.code == 0, err
    (retaken,) = run.of("lock_retaken")
    assert retaken["from_agent"] == "dev_late" and not run.of("lost")
    assert run.of("agent")[0]["ok"] and len(run.of("agent")) == 1  # the agent ran once
    final = world.status(task["id"])
    assert final["status"] == "dev_done" and final["locked_by"] is None
    assert "takes back its lock on this task from dev_late" in final["notes"]
    assert dev_done_count(world, task["id"]) == 1


@pytest.mark.parametrize("how", ["restart", "recover"])
def test_a_late_lock_on_a_dead_runners_task_is_taken_back_or_dropped(
        world: World, how: str) -> None:
    # The runner died mid-agent, and a racing lock landed meanwhile: its next start takes
    # the lock back and resumes; cron's give-back puts the task back in the queue unlocked
    # (before, the record was closed as "not ours" and the task stayed under work, locked
    # by an agent that never worked it).
    task = world.task()
    world.seeder.register("dev_late", "backend_dev", "senior")
    proc = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "30"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    proc.kill()
    proc.communicate()
    world.server.land_late_lock(task["id"], "dev_late")
    if how == "restart":
        again = world.run("--single-task")
        assert again.code == 0, again.stderr
        assert again.of("resumed")[0]["task_id"] == task["id"]
        assert world.status(task["id"])["status"] == "dev_done"
        assert "takes back its lock on this task from dev_late" in \
            world.status(task["id"])["notes"]
    else:
        done = subprocess.run([PMTOOL, "recover", "--all", "--give-back"], env=world.env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["entries"][0]["action"] == "released"
        back = world.status(task["id"])
        assert back["status"] == "created" and back["locked_by"] is None, back
    assert world.store.load("dev_1") is None


def test_heartbeat_keeps_the_lock_past_the_30_minute_rule(world: World) -> None:
    task = world.task()
    proc = world.start("--heartbeat", "0.2", "--single-task",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "3"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    world.outlast_the_stale_rule(task["id"], "dev_1", beat=0.5)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert world.status(task["id"])["status"] == "dev_done"


def test_three_runners_five_tasks_each_finished_once(world: World) -> None:
    tasks = [world.task(title=f"task {i}") for i in range(5)]
    procs = [world.start("--agent-id", f"dev_{i}") for i in range(3)]
    try:
        wait_for(lambda: all(world.status(t["id"])["status"] == "dev_done" for t in tasks),
                 timeout=60, what="every task to be done")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outs = [proc.communicate(timeout=30) for proc in procs]
    finished = [e for out, _ in outs for e in events(out) if e["event"] == "finished"]
    assert sorted(e["task_id"] for e in finished) == sorted(t["id"] for t in tasks)
    for task in tasks:
        assert dev_done_count(world, task["id"]) == 1
    assert all(proc.returncode == 0 for proc in procs)


def test_server_going_away_keeps_the_record_and_backs_off(world: World) -> None:
    world.task()
    proc = world.start(env={"PMTOOL_FAKE_AGENT_SLEEP": "1"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    world.server.stop()
    world.server_error_seen()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    run = Run(proc.returncode, events(out), err)
    assert any(e["error"]["type"] == "server" for e in run.of("error")), err
    assert world.store.load("dev_1") is not None  # the claim is kept for a later resume


# ---- the demo ----------------------------------------------------------------------------


def test_demo_runs_everything_on_a_fresh_setup(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADLESS_PM", "PMTOOL"))}
    proc = subprocess.run([PMTOOL, "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True
    assert [t["status"] for t in out["tasks"]] == ["qa_done", "qa_done"]
    assert {t["complexity"] for t in out["tasks"]} == {"minor", "major"}
    assert all(len(t["commits"]) == 2 for t in out["tasks"])
    layout = StateDir(out["where"]["state_dir"])  # the paths it shows are the state folder's
    assert (out["where"]["history"], out["where"]["logs"]) == (str(layout.history_path),
                                                               str(layout.logs_dir))
    assert Path(out["where"]["history"]).exists() and any(layout.logs_dir.iterdir())
    assert "look in:" in proc.stderr


def run_at_a_terminal_with_a_failing_pre_task(world: World
                                              ) -> tuple[dict, subprocess.Popen, int]:
    """`pmtool run --single-task` on a pty (stdin and stderr), with a pre_task hook that
    fails: the task, the process, and the terminal's leader end to read and type on."""
    import pty

    task = world.task()
    hook = world.hooks / "pre_task.sh"
    hook.write_text("#!/bin/sh\necho 'no GPU here' >&2\nexit 1\n")
    hook.chmod(0o755)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([PMTOOL, "run", *world.args("--single-task")], env=world.env,
                            cwd=world.repo, stdin=follower, stderr=follower,
                            stdout=subprocess.PIPE, text=True)
    os.close(follower)
    return task, proc, leader


def test_operator_is_asked_at_a_terminal_when_pre_task_fails(world: World) -> None:
    task, proc, leader = run_at_a_terminal_with_a_failing_pre_task(world)
    try:
        screen = read_pty(leader, lambda s: b"[c]ontinue" in s, timeout=60)
        assert b"[c]ontinue" in screen, f"no question on the terminal: {screen!r}"
        assert b"no GPU here" in screen
        os.write(leader, b"c\n")  # continue without the checks
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert proc.returncode == 0
    assert Run(0, events(out), "").of("finished")[0]["status"] == "dev_done"
    assert world.status(task["id"])["status"] == "dev_done"


def test_the_operator_prompt_shows_its_default_and_takes_it_when_nobody_answers(
        world: World) -> None:
    """Distinct keys (retry and release do not share r), the default shown, and after
    --ask-timeout the --on-hook-failure policy, as if nobody were at the terminal."""
    import pty

    task = world.task()
    hook = world.hooks / "pre_task.sh"
    hook.write_text("#!/bin/sh\necho 'no GPU here' >&2\nexit 1\n")
    hook.chmod(0o755)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([PMTOOL, "run", *world.args("--single-task", "--ask-timeout", "1",
                                                        "--on-hook-failure", "stop")],
                            env=world.env, cwd=world.repo, stdin=follower, stderr=follower,
                            stdout=subprocess.PIPE, text=True)
    os.close(follower)
    try:
        screen = read_pty(leader, lambda s: b"no answer" in s, timeout=60)
        assert b"no answer" in screen, f"the prompt did not time out: {screen!r}"
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = screen.decode()
    assert "[r]etry, [c]ontinue, r[e]lease, [s]top (Enter: stop; stop by itself in 1 s)?" \
        in text
    assert "no answer in 1 s: stop (--on-hook-failure)" in text
    assert proc.returncode == 1  # stop: a fatal error, the record kept for a person
    assert Run(1, events(out), "").of("finished") == []
    assert world.store.load("dev_1").task_id == task["id"]


def test_operator_prompt_keys_are_distinct() -> None:
    from pmtool.cli.loop import choice_keys

    assert choice_keys(["retry", "continue", "release"]) == {
        "r": "retry", "c": "continue", "e": "release"}
    keys = choice_keys(["retry", "continue", "release", "stop"])
    assert len(set(keys)) == 4 and set(keys.values()) == {"retry", "continue", "release", "stop"}


def test_progress_view_follows_no_color_and_force_color_and_says_no_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` and `demo` colour through pmtool.cli.colour: FORCE_COLOR colours into a pipe,
    NO_COLOR never; and their lines read as text ("1 task", no "session None")."""
    from pmtool.cli.loop import _progress_view

    stopped = {"event": "stopped", "agent": "dev_1", "task_id": None, "tasks_done": 1}
    resumed = {"event": "resumed", "agent": "dev_1", "task_id": 4, "session_id": None}
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert "\033[" in _progress_view(stopped)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\033[" not in _progress_view(stopped)
    assert _progress_view(stopped).endswith("dev_1 stopped: 1 task done")
    assert "None" not in _progress_view(resumed)
    agent = {"event": "agent", "agent": "dev_1", "task_id": 4, "outcome": "done",
             "num_turns": 1, "total_cost_usd": 0.01}
    assert _progress_view(agent).endswith("agent: done in 1 turn, $0.0100")


def test_ctrl_c_at_the_operator_prompt_stops_and_keeps_the_task(world: World) -> None:
    task, proc, leader = run_at_a_terminal_with_a_failing_pre_task(world)
    question = b"(Enter: release; release by itself in 300 s)?"
    screen, out = interrupt_at_terminal(proc, leader, lambda s: question in s, timeout=60)
    assert question in screen, f"no question on the terminal: {screen!r}"
    run = Run(proc.returncode, events(out), "")
    assert run.of("stopped")[0]["record_kept"] is True, run.events
    assert run.of("finished") == []  # not given back: a stop keeps the task for the restart
    assert world.store.load("dev_1").task_id == task["id"]
    assert proc.returncode == 0  # a graceful stop, as a signal between any two steps


def test_an_idle_loop_that_does_not_poll_pauses_and_says_so_once(world: World) -> None:
    """`--idle-poll 0` (the demo's setting) looks once per turn: with nothing to take it
    pauses between looks (claim's pace: 0.25 s, doubling to 2 s) and says `idle` once per
    idle period, where it was one event per look in a busy loop."""
    import signal

    from pmtool.testing.countproxy import CountingProxy

    proxy = CountingProxy(world.server.url).start()  # counts the runner's looks
    try:
        start = time.monotonic()
        proc = world.start("--idle-poll", "0", env={"HEADLESS_PM_API_URL": proxy.url})
        wait_for(lambda: proxy.counts().get("GET /api/v1/tasks/next", 0) >= 4, timeout=60,
                 what="four looks")
        took = time.monotonic() - start
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.stop()
    assert took >= 0.25 + 0.5 + 1.0, took  # three pauses between four looks
    idle = [e for e in events(out) if e["event"] == "idle"]
    assert len(idle) == 1, err

"""Crash windows where the REAL claude's processes matter: killed mid-tool, a verdict left in
the transcript, a session file cut short."""

from __future__ import annotations

import json
import subprocess

import psutil
import pytest

from helpers import (
    PMTOOL,
    World,
    _closed,
    _left_processes,
    _no_worktree_left,
    dev_done_count,
    half_then_done,
    kill_the_runner_mid_agent,
    needs_claude,
    wait_for,
)
from pmtool.testing.model_server import Bash, Hang, ScriptedModelServer, Structured, Write


@needs_claude
def test_real_claude_killed_mid_tool_recover_ends_every_child(world: World) -> None:
    """claude's Bash tool starts a child that leaves the marks behind (`env -i setsid`);
    the runner is killed while the next model request hangs; recover from another process
    ends whatever is left and gives the task back with the work kept."""
    task = world.task()
    with ScriptedModelServer() as model:
        env = world.real_claude_env(model)
        model.set_script([Write("half.txt", "half\n"),
                          Bash("env -i setsid sleep 300 > /dev/null 2>&1 < /dev/null &"),
                          Hang(),
                          Structured({"outcome": "done", "summary": "never reached"})])
        kill_the_runner_mid_agent(world, env, model, requests=3, timeout=60)
        # The runner's keeper may be ending the agent's tree by now (Linux), or not (no
        # parent-death signal): either way recover must leave nothing behind.
        done = subprocess.run([PMTOOL, "recover", "--all", "--give-back"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    assert _left_processes(world) == []
    server = world.status(task["id"])
    assert server["status"] == "created" and "uncommitted work saved at" in server["notes"]
    _no_worktree_left(world, task["id"])


@needs_claude
@pytest.mark.timeout(180)
def test_a_verdict_in_the_transcript_is_used_after_a_kill_not_asked_again(
        world: World) -> None:
    """Killed after claude wrote its result line (the verdict is in pmtool's transcript)
    but before pmtool noted it: the next start finishes with that verdict. The model is
    asked nothing more and the branch holds the agent's one commit, not two."""
    task = world.task()
    base = world.git("rev-parse", "HEAD")
    with ScriptedModelServer() as model:
        env = world.real_claude_env(model)
        model.set_script([Write("ping.py", "def ping():\n    return 'pong'\n"),
                          Bash("git add -A && git commit -q -m 'Add ping'"),
                          Structured({"outcome": "done", "summary": "Ping added."})])
        killed = world.run("--single-task", "--real-claude",
                           env={**env, "PMTOOL_FAULT": "agent-end"})
        assert killed.code == -9, killed.stderr[-2000:]
        logs = list((world.state / "logs").glob(f"task-{task['id']}-*.jsonl"))
        assert any('"type": "result"' in p.read_text() or '"type":"result"' in p.read_text()
                   for p in logs)
        asked = len(model.requests)
        again = world.run("--single-task", "--real-claude", env=env)
        assert again.code == 0, again.stderr[-3000:]
        assert len(model.requests) == asked  # nothing more asked of the model
    assert not again.of("agent")  # no agent run on the restart
    finished = again.of("finished")[0]
    assert finished["outcome"] == "done" and finished["summary"] == "Ping added."
    assert world.git("rev-list", "--count", f"{base}..{task['branch']}") == "1"
    assert dev_done_count(world, task["id"]) == 1
    assert _closed(world, task["id"]) == ["done"]
    _no_worktree_left(world, task["id"])


@needs_claude
@pytest.mark.timeout(180)
def test_a_session_file_cut_short_by_a_kill_still_gives_the_agent_its_task(
        world: World) -> None:
    """The kill cut claude's own session file short, before the prompt: claude finds no
    conversation to resume, and refuses to start afresh under that id (its file exists).
    The task starts afresh under a new session id, with the whole prompt, and is done;
    before, the run failed twice ("Session ID ... is already in use") and was given back."""
    task = world.task(title="Add a ping endpoint")
    with ScriptedModelServer() as model:
        env = world.real_claude_env(model)
        model.set_script(half_then_done("Done."))
        kill_the_runner_mid_agent(world, env, model, requests=2)
        record = world.store.load("dev_1")
        session = record.session_id
        agent = next(s for s in reversed(record.steps) if s["step"] == "agent_running")
        # claude writes its session file on its way out (SIGTERM from the keeper): cut it
        # only once claude is gone.
        wait_for(lambda: not psutil.pid_exists(agent["pid"])
                 or psutil.Process(agent["pid"]).status() == psutil.STATUS_ZOMBIE,
                 what="the agent to end")
        (kept,) = (world.tmp / "home").rglob(f"{session}.jsonl")
        lines = kept.read_text().splitlines(keepends=True)
        first_user = next(n for n, line in enumerate(lines)
                          if json.loads(line).get("type") == "user")
        kept.write_text("".join(lines[:first_user]))  # cut before the prompt
        model.set_script([Write("half.txt", "half\n"),
                          Bash("git add -A && git commit -q -m 'Start afresh'"),
                          Structured({"outcome": "done", "summary": "Done."})])
        asked = len(model.main_requests())
        again = world.run("--single-task", "--real-claude", env=env)
        assert again.code == 0, again.stderr[-3000:]
        fresh = model.main_requests()[asked]
    said = json.dumps(fresh["messages"])
    assert "Do it well." in said and task["title"] in said  # the description, the title
    (ran,) = again.of("agent")
    assert ran["ok"] and ran["session_id"] != session, again.stderr
    assert world.status(task["id"])["status"] == "dev_done"
    assert _closed(world, task["id"]) == ["done"]

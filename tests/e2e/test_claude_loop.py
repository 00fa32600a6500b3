"""`pmtool run` with the REAL claude binary: a task done end to end, resumed after a kill,
bounded by the usage limit, overload, a refused login, budget and turns; secrets kept from
it; a task bounced between machines."""

from __future__ import annotations

import json
import re
import time

import pytest

from helpers import (
    CLAUDE,
    World,
    attempt_lines,
    dev_done_count,
    dumping_hooks,
    everything_written,
    git,
    half_then_done,
    kill_the_runner_mid_agent,
    needs_claude,
    run_on,
    run_watched,
    unpushed_commit,
)
from pmtool.testing.claude_env import claude_env
from pmtool.testing.model_server import Bash, Error, ScriptedModelServer, Structured, Write


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_developer_then_qa_on_a_major_task(world: World) -> None:
    task = world.task(title="Add a login page")
    with ScriptedModelServer() as model:
        env = world.real_claude_env(model)
        model.set_script([Write("login.py", "def login():\n    return True\n"),
                          Bash("git add login.py && git commit -q -m 'Add the login page'"),
                          Structured({"outcome": "done", "summary": "Login page added."})])
        dev = world.run("--single-task", "--real-claude", env=env)
        assert dev.code == 0, dev.stderr
        agent = dev.of("agent")[0]
        assert agent["outcome"] == "done" and agent["num_turns"] >= 3
        assert agent["total_cost_usd"] > 0
        assert world.git("log", "-1", "--format=%s", task["branch"]) == "Add the login page"
        assert world.status(task["id"])["status"] == "dev_done"

        model.set_script([Bash("git log --oneline -3"),
                          Structured({"outcome": "pass", "summary": "Looks right."})])
        qa = world.run("--single-task", "--real-claude", "--role", "qa", "--agent-id", "qa_1",
                       env=env)
        assert qa.code == 0, qa.stderr
        assert qa.of("finished")[0]["status"] == "qa_done"
        assert len(model.sessions()) == 2
    final = world.status(task["id"])
    assert final["status"] == "qa_done"
    assert "Login page added." in final["notes"] and "Looks right." in final["notes"]


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_kill_9_then_restart_resumes_the_same_session(world: World) -> None:
    task = world.task()
    with ScriptedModelServer() as model:
        env = world.real_claude_env(model)
        model.set_script(half_then_done("Resumed and done."))
        kill_the_runner_mid_agent(world, env, model, requests=2)
        session = world.store.load("dev_1").session_id
        again = world.run("--single-task", "--real-claude", env=env)
        assert again.code == 0, again.stderr
        assert again.of("resumed")[0]["session_id"] == session
        assert again.of("agent")[0]["session_id"] == session
        assert model.sessions() == [session]
        assert "half.txt" in json.dumps(model.main_requests(session)[2]["messages"])
    assert world.git("log", "-1", "--format=%s", task["branch"]) == "Finish after resume"
    assert dev_done_count(world, task["id"]) == 1


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_usage_limit_pauses_until_reset_with_the_task_kept(world: World) -> None:
    task = world.task()
    reset = int(time.time()) + 3
    limit = Error(429, "rate_limit_error", "limit", headers={
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(reset),
        "anthropic-ratelimit-unified-representative-claim": "five_hour"})
    with ScriptedModelServer([limit, Write("a.txt", "a\n"),
                              Structured({"outcome": "done", "summary": "ok"})]) as model:
        env = world.real_claude_env(model)
        env.pop("ANTHROPIC_API_KEY")
        env["CLAUDE_CODE_OAUTH_TOKEN"] = "scripted-oauth"  # usage limits come with a login
        run = world.run("--single-task", "--real-claude", env=env)
    assert run.code == 0, run.stderr
    (paused,) = run.of("paused")
    assert paused["reason"] == "rate_limit" and paused["task_kept"] is True
    assert paused["until"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(reset)))
    assert "rate limit" in run.stderr and "resets at" in run.stderr
    assert not [e for e in run.of("finished") if e["outcome"] == "given_back"]
    assert world.status(task["id"])["status"] == "dev_done"
    attempts = [h for h in attempt_lines(world) if h["kind"] == "attempt"]
    assert [a["stop"] for a in attempts] == ["ok"]  # the pause was no attempt


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_overload_backs_off_and_goes_on(world: World) -> None:
    task = world.task()
    with ScriptedModelServer([Error(529, "overloaded_error", "Overloaded"),
                              Structured({"outcome": "done", "summary": "ok"})]) as model:
        run = world.run("--single-task", "--real-claude", "--retry-cooldown", "1",
                        env=world.real_claude_env(model))
    assert run.code == 0, run.stderr
    assert [e["reason"] for e in run.of("paused")] == ["overloaded"]
    assert run.of("agent")[0]["stop"]["kind"] == "overloaded"
    assert world.status(task["id"])["status"] == "dev_done"


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_refused_login_stops_the_runner_with_the_record_kept(world: World) -> None:
    task = world.task()
    with ScriptedModelServer([Error(401, "authentication_error", "invalid x-api-key")] * 3
                             ) as model:
        run = world.run("--real-claude", env=world.real_claude_env(model), timeout=60)
    assert run.code == 6, run.stderr
    assert run.of("agent")[0]["stop"]["kind"] == "auth"
    assert run.of("stopped")[0]["record_kept"] is True
    assert world.status(task["id"])["status"] == "under_work"  # kept for the resume
    assert "fatal: claude's login or key was refused" in run.stderr


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_budget_stop_is_not_retried(world: World) -> None:
    task = world.task()
    with ScriptedModelServer([Write("a.txt", "a\n"), Write("b.txt", "b\n"),
                              Structured({"outcome": "done", "summary": "ok"})]) as model:
        run = world.run("--single-task", "--real-claude", "--max-budget-usd", "0.0000001",
                        env=world.real_claude_env(model))
    assert run.code == 1, run.stderr
    (agent,) = run.of("agent")  # no retry, no resume
    assert agent["stop"]["kind"] == "budget"
    assert run.of("finished")[0]["parked"].startswith("budget:")
    assert world.status(task["id"])["status"] == "pending"


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_max_turns_is_passed_and_classified(world: World) -> None:
    task = world.task()
    with ScriptedModelServer([Write("a.txt", "a\n"), Write("b.txt", "b\n"),
                              Structured({"outcome": "done", "summary": "ok"})]) as model:
        run = world.run("--single-task", "--real-claude", "--max-turns", "1",
                        "--on-agent-failure", "release", env=world.real_claude_env(model))
    assert run.code == 1, run.stderr
    assert run.of("agent")[0]["stop"]["kind"] == "max_turns"
    assert run.of("finished")[0]["stop"] == "max_turns"
    assert world.status(task["id"])["status"] == "created"
    assert "max_turns" in world.status(task["id"])["notes"]


@needs_claude
@pytest.mark.timeout(120)
def test_the_key_never_reaches_the_real_claude_or_its_tools(world: World) -> None:
    """The real claude binary, against the scripted model server: its Bash tool dumps its
    environment; neither that, nor what claude sent to the model, nor anything pmtool
    wrote, holds the key."""
    key = world.env["HEADLESS_PM_API_KEY"]
    dumps = dumping_hooks(world)
    task = world.task()
    with ScriptedModelServer() as model:
        env = {**claude_env(model.url, world.tmp / "home", max_retries=0),
               "PMTOOL_CLAUDE_BIN": CLAUDE}
        model.set_script([Bash(f"env > {dumps}/claude-tool.env; echo key=$HEADLESS_PM_API_KEY"),
                          Write("done.txt", "done\n"),
                          Structured({"outcome": "done", "summary": "Done."})])
        run, argv = run_watched(world, env, agent=("--real-claude",))
        assert run.code == 0, run.stderr
        sent = json.dumps([vars(r) for r in model.log], default=str)  # headers too
    assert world.status(task["id"])["status"] == "dev_done"
    # The tool's output reached the model: `key=` with nothing after it.
    assert re.search(r"key=(?!\$HEADLESS_PM_API_KEY)", sent)
    places = everything_written(world, run, argv, dumps)
    places["sent to the model"] = sent
    assert (dumps / "claude-tool.env").exists()
    assert any("--session-id" in line for line in argv)  # claude was seen running
    assert [where for where, text in places.items() if key in text] == []


@needs_claude
@pytest.mark.timeout(300)
def test_real_claude_dev_on_a_qa_on_b_bounce_to_c(world: World, fleet) -> None:
    origin, a, b, c = fleet
    task = world.task(title="Add a login page")
    # C holds an old, unpushed commit on the branch: it must survive on a rescue ref.
    stale = unpushed_commit(c.repo, task["branch"], "old.py", "OLD = 1\n", "old")
    with ScriptedModelServer() as model:
        env = {**claude_env(model.url, world.tmp / "home", max_retries=0),
               "PMTOOL_CLAUDE_BIN": str(CLAUDE)}
        model.set_script([Write("login.py", "def login():\n    return True\n"),
                          Bash("git add login.py && git commit -q -m 'Add the login page'"),
                          Structured({"outcome": "done", "summary": "Login page added."})])
        dev = run_on(world, a, "backend_dev", "dev_1", "--single-task", "--push",
                     "--real-claude", env=env)
        assert dev.code == 0, dev.stderr
        dev_head = git(origin, "rev-parse", task["branch"])
        assert git(origin, "log", "-1", "--format=%s", dev_head) == "Add the login page"

        model.set_script([Bash("git log --format=%H -1 > reviewed.txt && "
                               "git add reviewed.txt && git commit -q -m 'QA: reviewed'"),
                          Structured({"outcome": "fail", "summary": "No logout."})])
        qa = run_on(world, b, "qa", "qa_1", "--single-task", "--push", "--real-claude",
                    env=env)
        assert qa.code == 0, qa.stderr
        qa_head = git(origin, "rev-parse", task["branch"])
        # What QA reviewed on B was the developer's commit from A.
        assert git(origin, "show", f"{qa_head}:reviewed.txt") == dev_head
        assert git(origin, "rev-parse", f"{qa_head}^") == dev_head
        assert world.status(task["id"])["status"] == "created"

        model.set_script([Write("logout.py", "def logout():\n    return True\n"),
                          Bash("git add logout.py && git commit -q -m 'Add logout'"),
                          Structured({"outcome": "done", "summary": "Logout added."})])
        again = run_on(world, c, "backend_dev", "dev_3", "--single-task", "--push",
                       "--real-claude", env=env)
        assert again.code == 0, again.stderr
        assert len(model.sessions()) == 3
    (made,) = [e for e in again.of("worktree") if e.get("created")]
    assert made["local"] == "diverged"
    assert git(c.repo, "rev-parse", made["rescued"]) == stale  # C's old commit kept
    final = git(origin, "rev-parse", task["branch"])
    assert git(origin, "log", "-1", "--format=%s", final) == "Add logout"
    assert git(origin, "rev-parse", f"{final}^") == qa_head  # the same branch, continued
    assert git(origin, "show", f"{final}:login.py").startswith("def login")
    status = world.status(task["id"])
    assert status["status"] == "dev_done" and "pushed to origin" in status["notes"]

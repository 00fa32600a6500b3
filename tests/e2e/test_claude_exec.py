"""`pmtool exec-claude` with the REAL claude binary against the scripted model server, in
real git repositories, through the installed console script (the scene: tests/helpers.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import (
    API_KEY,
    CLAUDE,
    PMTOOL,
    Scene,
    make_scene,
    needs_claude,
    processes_of_task,
    wait_for,
)
from helpers import scene_pmtool as pmtool
from pmtool.testing.model_server import (
    Bash,
    Error,
    Hang,
    ScriptedModelServer,
    Structured,
    Text,
    Write,
    commit_file_script,
)


def e2e(test: Callable[..., None]) -> Callable[..., None]:
    """Runs the real CLI: skipped without it, a 60 s limit (the folder marks it `e2e`)."""
    return needs_claude(pytest.mark.timeout(60)(test))


def transcript(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@e2e
def test_run_commits_on_the_task_branch_and_records_the_session(
        scene: Scene, server: ScriptedModelServer) -> None:
    env_dump = scene.tmp / "agent-env.txt"
    server.set_script([
        Bash(f"env > {env_dump}"),
        *commit_file_script("src/login.py", "def login(): ...\n", "Add login form",
                            verdict={"outcome": "done", "summary": "Added the login form."}),
    ])
    scene.record()
    started = time.monotonic()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--idle-timeout", "20")
    took = time.monotonic() - started
    assert run.code == 0, run.stderr
    out = run.out
    assert out["outcome"] == "done" and out["summary"] == "Added the login form."
    assert out["verdict_source"] == "structured_output"
    assert out["exit_code"] == 0 and out["is_error"] is False and out["timed_out"] is False
    assert out["num_turns"] >= 4 and out["total_cost_usd"] > 0
    assert out["model"] == "sonnet" and out["resumed"] is False and out["stopped"] is False
    assert out["cwd"] == str(scene.worktree) and out["branch"] == "feature/login"
    uuid.UUID(out["session_id"])
    assert server.sessions() == [out["session_id"]]  # the id chosen before the start

    # The commit is on the task branch, in the worktree; main is untouched.
    assert scene.git("log", "-1", "--format=%s", "feature/login").strip() == "Add login form"
    assert scene.git("log", "-1", "--format=%s", "main").strip() == "initial"
    assert (scene.worktree / "src" / "login.py").exists()
    assert not (scene.repo / "src").exists()

    # The record knows the session, the model, the attempt and the cost.
    record = scene.store.load("dev_001")
    assert record is not None
    assert record.session_id == out["session_id"] and record.model == "sonnet"
    assert record.attempts == 1 and record.cost_usd == pytest.approx(out["total_cost_usd"])
    assert out["task_cost_usd"] == pytest.approx(out["total_cost_usd"])
    steps = [s["step"] for s in record.steps]
    assert steps[-3:] == ["agent_starting", "agent_running", "agent_finished"]

    # The prompt held the task; claude was asked for the verdict schema of the role.
    first = server.main_requests()[0]
    sent = json.dumps(first["messages"])
    assert "Add a login page" in sent and "feature/login" in sent and "posts to /login" in sent
    schema = next(t for t in first["tools"] if t["name"] == "StructuredOutput")["input_schema"]
    assert schema["properties"]["outcome"]["enum"] == ["done", "blocked"]

    # The agent's environment: marked, with the task id, without the Headless PM key.
    agent_env = env_dump.read_text()
    assert f"PMTOOL_TASK_ID={scene.task['id']}\n" in agent_env
    assert "PMTOOL_RUN_MARK=" in agent_env and f"PMTOOL_SESSION_ID={out['session_id']}" in agent_env
    assert API_KEY not in agent_env and "HEADLESS_PM_API_KEY" not in agent_env

    # The transcript: every stream-json line, the result last before pmtool's end line.
    lines = transcript(out["log"])
    assert Path(out["log"]).name == f"task-{scene.task['id']}-{out['session_id']}.jsonl"
    assert [x["type"] for x in lines][:2] == ["pmtool", "system"]
    assert lines[-2]["type"] == "result" and lines[-1]["event"] == "end"
    # Progress on stderr; the key nowhere.
    assert "exec-claude: turn" in run.stderr and "Bash" in run.stderr
    for text in (json.dumps(out), run.stderr, Path(out["log"]).read_text()):
        assert API_KEY not in text
    assert took < 20


@e2e
def test_verdict_line_is_the_fallback(scene: Scene, server: ScriptedModelServer) -> None:
    # The model writes the verdict as a line and never calls StructuredOutput: the CLI asks
    # once more ("Done." from the exhausted script), and the line is found in the earlier text.
    server.set_script([Write("review.txt", "looked\n"),
                       Text("Checked the form.\nPMTOOL_VERDICT: fail the button posts nothing")])
    task_file = scene.tmp / "task.json"
    task_file.write_text(json.dumps({"task": scene.task}))
    run = pmtool(scene, "exec-claude", "--task-json", str(task_file), "--role", "qa",
                 "--cwd", str(scene.worktree))
    assert run.code == 0, run.stderr
    assert run.out["outcome"] == "fail" and run.out["summary"] == "the button posts nothing"
    assert run.out["verdict_source"] == "verdict_line"
    nudge = json.dumps(server.main_requests()[-1]["messages"][-1])
    assert "StructuredOutput" in nudge
    enum = next(t for t in server.main_requests()[0]["tools"]
                if t["name"] == "StructuredOutput")["input_schema"]["properties"]["outcome"]
    assert enum["enum"] == ["pass", "fail", "blocked"]


@e2e
def test_no_verdict_is_a_failure(scene: Scene, server: ScriptedModelServer) -> None:
    server.set_script([Text("I changed some things."), Text("All good, I think.")])
    scene.record()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001")
    assert run.code == 1
    out = run.out
    assert out["exit_code"] == 0 and out["is_error"] is False  # claude itself succeeded
    assert out["outcome"] is None and out["error"]["type"] == "failed"
    assert "no verdict" in out["error"]["message"]
    record = scene.store.load("dev_001")
    assert record is not None and record.steps[-1]["ok"] is False


@e2e
def test_api_error_is_a_failure(scene: Scene, server: ScriptedModelServer) -> None:
    server.set_script([Error(400, "invalid_request_error", "scripted bad request")])
    scene.record()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001")
    assert run.code == 1
    assert run.out["is_error"] is True and run.out["api_error_status"] == 400
    assert run.out["exit_code"] == 1 and run.out["outcome"] is None
    assert "API Error: 400 scripted bad request" in run.out["error"]["message"]


@e2e
def test_timeout_ends_the_whole_tree(scene: Scene, server: ScriptedModelServer) -> None:
    # The agent's Bash tool starts a sleep in a new session (out of claude's process group),
    # then the model hangs. Past --timeout, nothing of the run may be left.
    sleeper = f"sleep {1000 + scene.task['id'] % 97}.5"
    pidfile = scene.tmp / "sleeper.pid"
    server.set_script([Bash(f"setsid {sleeper} > /dev/null 2>&1 & echo $! > {pidfile}"),
                       Hang()])
    scene.record()
    started = time.monotonic()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--timeout", "4")
    took = time.monotonic() - started
    assert run.code == 124, run.stderr
    assert run.out["timed_out"] is True and run.out["timed_out_by"] == "timeout"
    assert run.out["error"]["type"] == "timeout"
    assert len(server.main_requests()) == 2  # the Bash tool ran before the hang
    assert 4 <= took < 12
    sleeper_pid = int(pidfile.read_text())
    assert sleeper_pid in run.out["swept"]  # found by its mark, not by the process tree
    assert processes_of_task(scene.task["id"]) == []
    assert not [p for p in psutil.process_iter(["cmdline"])
                if " ".join(p.info["cmdline"] or []) == sleeper
                and p.status() != psutil.STATUS_ZOMBIE]


@e2e
def test_idle_timeout_ends_a_silent_run(scene: Scene, server: ScriptedModelServer) -> None:
    server.set_script([Write("a.txt", "a\n"), Hang()])
    scene.record()
    started = time.monotonic()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--idle-timeout", "2",
                 "--timeout", "60")
    assert run.code == 124
    assert run.out["timed_out_by"] == "idle_timeout" and "silent" in run.out["error"]["message"]
    assert time.monotonic() - started < 12
    assert processes_of_task(scene.task["id"]) == []


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@e2e
def test_resume_after_pmtool_was_killed(scene: Scene, server: ScriptedModelServer) -> None:
    # Each session walks its own copy of this script: the first run hangs on its second
    # request; the resumed run (same session) gets the commit and the verdict.
    server.set_script([
        Write("progress.txt", "half done\n"),
        Hang(),
        Bash("git add -A && git commit -q -m 'Finish the login page'"),
        Structured({"outcome": "done", "summary": "Finished after a resume."}),
    ])
    scene.record()
    proc = subprocess.Popen([PMTOOL, "exec-claude", "--agent-id", "dev_001"], cwd=scene.repo,
                            env=scene.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(server.main_requests()) >= 2, timeout=90,
                 what="the first run to reach the hang")
        assert len(server.main_requests()) == 2
        proc.kill()  # SIGKILL: no cleanup; the parent-death signal ends the agent
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = scene.store.load("dev_001")
    assert record is not None and record.session_id
    session = record.session_id
    agent_pid = next(s for s in reversed(record.steps) if s["step"] == "agent_running")["pid"]
    # The agent died with its pmtool (PR_SET_PDEATHSIG); claude's session stayed on disk.
    wait_for(lambda: _gone(agent_pid), timeout=60, what="the agent to die with its pmtool")

    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--resume")
    assert run.code == 0, run.stderr
    out = run.out
    assert out["session_id"] == session and out["resumed"] is True
    assert out["outcome"] == "done" and "ended_orphan" not in out
    assert server.sessions() == [session]
    # The resumed run sent the earlier conversation: the Write call and its result.
    opening = json.dumps(server.main_requests(session)[2]["messages"])
    assert "progress.txt" in opening and "tool_result" in opening
    # The continuation prompt says the task again: when a kill cut claude's session file
    # short, it is all the resumed agent sees of the task.
    last = server.main_requests(session)[2]["messages"][-1]
    continuation = json.dumps(last["content"])
    assert last["role"] == "user" and "interrupted" in continuation
    assert scene.task["description"] in continuation and scene.task["title"] in continuation
    assert scene.git("log", "-1", "--format=%s", "feature/login").strip() == \
        "Finish the login page"
    record = scene.store.load("dev_001")
    assert record is not None and record.attempts == 2 and record.session_id == session
    assert record.cost_usd == pytest.approx(out["task_cost_usd"])
    assert processes_of_task(scene.task["id"]) == []
    # Both runs wrote to the one transcript of the session.
    starts = [x for x in transcript(out["log"]) if x.get("event") == "start"]
    assert [x["resume"] for x in starts] == [False, True]


@e2e
def test_resume_of_a_session_claude_never_saved_starts_afresh(
        scene: Scene, server: ScriptedModelServer) -> None:
    # pmtool died after writing the session id to the record, before claude saved anything.
    session = str(uuid.uuid4())
    scene.record(session_id=session, attempts=1)
    server.set_script([Structured({"outcome": "done", "summary": "From the start."})],
                      session=session)
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--resume")
    assert run.code == 0, run.stderr
    assert run.out["session_id"] == session and run.out["resumed"] is False
    assert "started afresh" in run.out["note"]
    assert "Add a login page" in json.dumps(server.main_requests(session)[0]["messages"])
    record = scene.store.load("dev_001")
    assert record is not None and record.attempts == 2


REAL_API = os.environ.get("PMTOOL_TEST_REAL_API") == "1"


@pytest.mark.skipif(not REAL_API, reason="talks to the real model API: set PMTOOL_TEST_REAL_API=1 "
                    "(with ANTHROPIC_API_KEY or a logged-in claude) to run it")
@pytest.mark.timeout(400)
def test_real_model_api_smoke(tmp_path: Path) -> None:
    """One small task against the real API, with a spend cap: does the prompt lead a real
    model to commit and give a verdict? Model: PMTOOL_TEST_REAL_MODEL (default haiku)."""
    from pmtool.agent.binary import find_claude

    claude = os.environ.get("PMTOOL_CLAUDE_BIN") or CLAUDE or find_claude()
    if not claude:
        pytest.skip("no claude binary")
    scene = make_scene(tmp_path, "http://unused")
    # The caller's own environment (key or login under the real HOME), not the offline one.
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_BASE_URL"}
    env.update({k: scene.env[k] for k in ("PMTOOL_STATE_DIR", "PMTOOL_CONFIG",
                                          "HEADLESS_PM_API_URL")})
    env.update({"PMTOOL_CLAUDE_BIN": claude, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "DISABLE_AUTOUPDATER": "1"})
    scene.env = env
    scene.task.update(title="Add HELLO.txt",
                      description="Create a file HELLO.txt containing the line `hello` and "
                                  "commit it. Nothing else.")
    scene.record()
    model = os.environ.get("PMTOOL_TEST_REAL_MODEL", "haiku")
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--model", model,
                 "--max-budget-usd", "0.25", "--timeout", "300", timeout=360)
    assert run.code == 0, (run.out, run.stderr[-2000:])
    assert run.out["outcome"] == "done" and run.out["total_cost_usd"] > 0
    assert (scene.worktree / "HELLO.txt").read_text().strip() == "hello"
    assert "HELLO.txt" in scene.git("show", "--name-only", "--format=", "feature/login")


@e2e
def test_kill_9_during_a_slow_tool_step_ends_every_process_then_resume_continues(
        scene: Scene, server: ScriptedModelServer) -> None:
    # issue 13: claude's keeper ends the whole tree when its pmtool dies -- claude (SIGTERM,
    # so its session is saved), the tool step it waits for, and one the step hid with
    # `env -i setsid` -- without waiting for a resume; the resume then finds nothing to end.
    sleeper = f"sleep {2000 + scene.task['id'] % 97}.25"
    hidden = f"sleep {3000 + scene.task['id'] % 97}.25"
    server.set_script([Bash(f"(env -i setsid {hidden} &); {sleeper}"),
                       Structured({"outcome": "done", "summary": "x"})])
    scene.record()
    proc = subprocess.Popen([PMTOOL, "exec-claude", "--agent-id", "dev_001"], cwd=scene.repo,
                            env=scene.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (_by_cmdline(sleeper) and _by_cmdline(hidden)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert _by_cmdline(sleeper) and _by_cmdline(hidden), "the tool step never started"
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = scene.store.load("dev_001")
    assert record is not None
    agent_pid = next(s for s in reversed(record.steps) if s["step"] == "agent_running")["pid"]

    def left() -> list[psutil.Process]:
        return processes_of_task(scene.task["id"]) + _by_cmdline(sleeper) + \
            _by_cmdline(hidden)

    try:
        # claude may take its 1-3 s to save the session; the keeper's SIGKILL comes at 3 s,
        # and a loaded machine (CI runs every test at once) schedules all of it late.
        deadline = time.monotonic() + 20
        while (left() or not _gone(agent_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(agent_pid) and left() == [], "processes outlived their killed pmtool"
        run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--resume")
        assert run.code == 0, run.stderr
        assert run.out["outcome"] == "done" and run.out["resumed"] is True
        assert "ended_orphan" not in run.out  # nothing was left for the resume to end
        assert left() == []
    finally:
        for p in left():
            with contextlib.suppress(psutil.Error):
                p.kill()


def _by_cmdline(cmdline: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if " ".join(p.info["cmdline"] or []) == cmdline and \
                p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found

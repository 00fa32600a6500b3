"""`pmtool exec-claude` without the real claude: the prompt, bad input, the built-in fake
agent (--agent-cmd), signals, and the pieces (verdicts, the stream parser, the command line)
on their own. With the REAL claude binary: tests/e2e/test_claude_exec.py.
"""

from __future__ import annotations

import json
import os
import signal
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
    PMTOOL,
    Scene,
    processes_of_task,
    wait_for,
)
from helpers import scene_pmtool as pmtool
from pmtool.testing import fake_agent


def test_print_prompt_shows_task_branch_and_instructions(scene: Scene) -> None:
    folder = scene.tmp / "instructions"
    folder.mkdir()
    (folder / "backend_dev.md").write_text("# House rules\nTabs, never spaces.\n")
    scene.record()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--print-prompt",
                 "--instructions-dir", str(folder))
    assert run.code == 0
    prompt = run.out["prompt"]
    for text in ("Add a login page", "posts to /login", "feature/login", "Tabs, never spaces.",
                 str(scene.worktree), "pm: keep it small", "StructuredOutput",
                 "PMTOOL_VERDICT:"):
        assert text in prompt, text
    assert run.out["instructions"] == str(folder / "backend_dev.md")
    assert run.out["cwd"] == str(scene.worktree) and run.out["model"] == "sonnet"
    assert API_KEY not in prompt
    assert not (scene.state / "logs").exists()
    record = scene.store.load("dev_001")
    assert record is not None and record.session_id is None  # nothing ran, nothing recorded

    # --task-json with the built-in qa instructions; a template of one's own.
    template = scene.tmp / "template.txt"
    template.write_text("{title} on {branch} for {role}; {unknown} stays; {{literal}}\n")
    run = pmtool(scene, "exec-claude", "--task-json", "-", "--role", "qa", "--print-prompt",
                 "--prompt-template", str(template), input=json.dumps(scene.task),
                 cwd=scene.worktree)
    assert run.out["prompt"] == \
        "Add a login page on feature/login for qa; {unknown} stays; {literal}\n"
    run = pmtool(scene, "exec-claude", "--task-json", "-", "--role", "qa", "--print-prompt",
                 input=json.dumps(scene.task), cwd=scene.worktree)
    assert run.out["instructions"] == "builtin:qa" and "QA engineer" in run.out["prompt"]


def test_server_instructions_path_is_used_when_it_exists_here(
        scene: Scene, make_standin: Callable[..., Any]) -> None:
    # The stand-in answers /api/v1/context with instructions_path "./agent_instructions", a
    # path on the server's machine: here it resolves from where pmtool runs.
    server = make_standin(api_key="k-" + uuid.uuid4().hex)
    folder = scene.tmp / "agent_instructions"
    folder.mkdir()
    (folder / "backend_dev.md").write_text("Server-side rules for backend developers.\n")
    scene.record()
    env = {"HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": server.api_key}
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--print-prompt", env=env,
                 cwd=scene.tmp)
    assert run.out["instructions"] == "agent_instructions/backend_dev.md"
    assert "Server-side rules for backend developers." in run.out["prompt"]
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--print-prompt", env=env,
                 cwd=scene.repo)  # not here: the built-in file, no failure
    assert run.out["instructions"] == "builtin:backend_dev"


def test_bad_input_and_missing_record(scene: Scene) -> None:
    assert pmtool(scene, "exec-claude").code == 2
    assert pmtool(scene, "exec-claude", "--agent-id", "a", "--task-json", "-", input="{}").code == 2
    assert pmtool(scene, "exec-claude", "--task-json", "-", input="[1]").code == 2
    bad = scene.tmp / "bad.txt"
    bad.write_text("{title} {")
    run = pmtool(scene, "exec-claude", "--task-json", "-", "--role", "qa", "--print-prompt",
                 "--prompt-template", str(bad), input=json.dumps(scene.task))
    assert run.code == 2 and "template" in run.out["error"]["message"]
    run = pmtool(scene, "exec-claude", "--agent-id", "nobody")
    assert run.code == 3 and run.out["error"]["type"] == "nothing"


def test_agent_cmd_runs_the_fake_agent(scene: Scene) -> None:
    scene.record(agent_id="qa_001", role="qa")
    run = pmtool(scene, "exec-claude", "--agent-id", "qa_001", "--agent-cmd",
                 fake_agent.command())
    assert run.code == 0, run.stderr
    out = run.out
    assert out["outcome"] == "pass" and out["verdict_source"] == "structured_output"
    assert out["num_turns"] == 3 and out["total_cost_usd"] == pytest.approx(0.0003)
    note = scene.worktree / "notes" / f"task-{scene.task['id']}-qa.md"
    assert out["session_id"] in note.read_text()
    assert scene.git("log", "-1", "--format=%s", "feature/login").startswith(
        f"task {scene.task['id']}: qa notes")
    record = scene.store.load("qa_001")
    assert record is not None and record.session_id == out["session_id"]
    assert record.attempts == 1 and record.cost_usd == pytest.approx(0.0003)

    # --resume hands the same session id over (PMTOOL_RESUME) and adds the cost up.
    run = pmtool(scene, "exec-claude", "--agent-id", "qa_001", "--resume", "--agent-cmd",
                 fake_agent.command(), env={"PMTOOL_FAKE_AGENT_OUTCOME": "fail"})
    assert run.code == 0 and run.out["outcome"] == "fail" and run.out["resumed"] is True
    assert run.out["session_id"] == out["session_id"]
    assert "resumed task" in note.read_text()
    assert run.out["task_cost_usd"] == pytest.approx(0.0006)


def test_agent_cmd_failures(scene: Scene) -> None:
    scene.record()
    cmd = fake_agent.command()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 env={"PMTOOL_FAKE_AGENT_VERDICT": "none"})
    assert run.code == 1 and run.out["outcome"] is None
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 env={"PMTOOL_FAKE_AGENT_EXIT": "3"})
    assert run.code == 1 and run.out["exit_code"] == 3 and run.out["is_error"] is True
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 env={"PMTOOL_FAKE_AGENT_VERDICT": "line", "PMTOOL_FAKE_AGENT_OUTCOME": "blocked"})
    assert run.code == 0 and run.out["outcome"] == "blocked"
    assert run.out["verdict_source"] == "verdict_line"
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd",
                 "/nonexistent/agent")
    assert run.code == 2 and "cannot start" in run.out["error"]["message"]
    started = time.monotonic()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 "--timeout", "1", env={"PMTOOL_FAKE_AGENT_SLEEP": "30"})
    assert run.code == 124 and run.out["timed_out"] is True
    assert time.monotonic() - started < 8
    assert processes_of_task(scene.task["id"]) == []
    record = scene.store.load("dev_001")
    assert record is not None and record.attempts == 5


def test_a_run_without_a_verdict_says_what_follows(scene: Scene) -> None:
    """`next` is the failure policy's step (the runner's): resume the first time, give the
    task back once this claim was resumed; a run with a verdict has none."""
    scene.record()
    cmd, none = fake_agent.command(), {"PMTOOL_FAKE_AGENT_VERDICT": "none"}
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd, env=none)
    assert run.code == 1 and run.out["next"] == {"step": "resume"}
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--resume", "--agent-cmd", cmd,
                 env=none)
    assert run.code == 1 and run.out["resumed"] is True
    assert run.out["next"] == {"step": "give_back", "kind": "failed",
                               "reason": "agent failed: " + run.out["error"]["message"]}
    record = scene.store.load("dev_001")
    assert record is not None
    said = [s.get("next") for s in record.steps if s["step"] == "agent_finished"]
    assert said == [{"step": "resume"}, run.out["next"]]
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--resume", "--agent-cmd", cmd)
    assert run.code == 0 and "next" not in run.out


def test_the_agent_failure_setting_names_the_step(scene: Scene) -> None:
    scene.record()
    cmd, none = fake_agent.command(), {"PMTOOL_FAKE_AGENT_VERDICT": "none"}
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 env={**none, "PMTOOL_ON_AGENT_FAILURE": "release"})
    assert run.out["next"]["step"] == "give_back"
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 env={**none, "PMTOOL_ON_AGENT_FAILURE": "stop"})
    assert run.out["next"] == {"step": "fatal", "kind": "failed",
                               "reason": run.out["error"]["message"]}


def test_the_last_give_back_says_park(scene: Scene) -> None:
    """A give-back that is the task's last (its attempts on this machine and this one make
    max_attempts) says `park`, with the park's cause and reason and the give-back it comes
    from: `lock release` with that give-back parks the task with the same reason."""
    from pmtool import failure_policy as fl
    from pmtool.ledger import Ledger

    cmd = fake_agent.command()
    env = {"PMTOOL_FAKE_AGENT_VERDICT": "none", "PMTOOL_ON_AGENT_FAILURE": "release"}
    scene.record()
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd,
                 env={**env, "PMTOOL_MAX_ATTEMPTS": "1"})
    given = {"kind": "failed", "reason": "agent failed: " + run.out["error"]["message"]}
    assert run.code == 1 and run.out["next"]["step"] == "park"
    assert run.out["next"]["cause"] == "max_attempts" and run.out["next"]["give_back"] == given
    assert run.out["next"]["reason"].startswith(
        "1 attempts failed (max_attempts 1): failed: agent failed: the agent gave no verdict")
    # Two attempts before this claim in the ledger, the default max_attempts (3).
    ledger = Ledger(scene.state)
    for n in (1, 2):
        ledger.add(fl.attempt_line(scene.task, "dev_002", outcome="given_back", kind="timeout",
                                   reason=f"slow {n}", claimed_at=f"2026-01-0{n}T00:00:00Z"))
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", cmd, env=env)
    assert run.out["next"]["step"] == "park" and run.out["next"]["give_back"] == given
    assert run.out["next"]["reason"].startswith(
        "3 attempts failed (max_attempts 3): timeout: slow 1; timeout: slow 2; failed: agent")
    assert [s["next"] for s in scene.store.need("dev_001").steps
            if s["step"] == "agent_finished"][-1] == run.out["next"]


def test_a_rate_limit_says_pause_until_it_resets(scene: Scene) -> None:
    """claude's usage limit is no failure of the task: pause until it resets, then go on
    with the session, and the pause does not use up the claim's one resume."""
    resets = int(time.time()) + 3600
    agent = scene.tmp / "limited-agent"
    limit = {"type": "rate_limit_event", "rate_limit_info": {
        "status": "rejected", "resetsAt": resets, "rateLimitType": "five_hour"}}
    result = {"type": "result", "subtype": "success", "is_error": True, "num_turns": 1,
              "result": "Claude AI usage limit reached", "total_cost_usd": 0}
    agent.write_text("#!/bin/sh\ncat >/dev/null\n"
                     f"echo '{json.dumps(limit)}'\necho '{json.dumps(result)}'\n")
    agent.chmod(0o755)
    scene.record()
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets))
    for _ in range(2):
        run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--agent-cmd", str(agent))
        assert run.code != 0 and run.out["stop"]["kind"] == "rate_limit"
        assert run.out["next"] == {"step": "pause", "kind": "rate_limit", "until": until}
    run = pmtool(scene, "exec-claude", "--agent-id", "dev_001", "--resume", "--agent-cmd",
                 fake_agent.command(), env={"PMTOOL_FAKE_AGENT_VERDICT": "none"})
    assert run.out["next"] == {"step": "resume"}


def test_sigterm_stops_the_agent(scene: Scene) -> None:
    scene.record()
    proc = subprocess.Popen([PMTOOL, "exec-claude", "--agent-id", "dev_001", "--agent-cmd",
                             fake_agent.command()], cwd=scene.repo,
                            env={**scene.env, "PMTOOL_FAKE_AGENT_SLEEP": "30"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: processes_of_task(scene.task["id"]), timeout=60, what="the agent")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 143, stderr
    out = json.loads(stdout)
    assert out["ok"] is False and out["stopped"] is True
    assert out["error"]["type"] == "interrupted"
    assert processes_of_task(scene.task["id"]) == []
    # Go on with --resume; the stop was no retry of the claim, so it is not noted as one.
    assert out["next"] == {"step": "resume"}
    record = scene.store.load("dev_001")
    assert record is not None and "next" not in record.steps[-1]


# ---- the library, in process ---------------------------------------------------------------


def test_verdicts() -> None:
    from pmtool.agent.prompt import extract_verdict, verdict_line, verdict_schema

    assert verdict_line("work\nPMTOOL_VERDICT: done Added it.") == ("done", "Added it.")
    assert verdict_line("**PMTOOL_VERDICT: blocked** no access\n") == ("blocked", "no access")
    assert verdict_line("PMTOOL_VERDICT: pass fine", role="qa") == ("pass", "fine")
    assert verdict_line("PMTOOL_VERDICT: pass fine") is None  # not a developer outcome
    assert verdict_line("no verdict here") is None
    # structured output wins; a bad one falls back to the line; neither is no outcome
    both = {"structured_output": {"outcome": "done", "summary": "s"},
            "result": "PMTOOL_VERDICT: blocked b"}
    assert extract_verdict(both)["verdict_source"] == "structured_output"
    bad = {"structured_output": {"outcome": "done", "summary": "s"}, "result": "x"}
    found = extract_verdict(bad, role="qa", texts=["PMTOOL_VERDICT: fail broken", "later"])
    assert (found["outcome"], found["summary"]) == ("fail", "broken")
    found = extract_verdict({"result": "ok"}, texts=["hello"])
    assert found["outcome"] is None and "no verdict" in found["verdict_error"]
    assert verdict_schema("qa")["properties"]["outcome"]["enum"] == ["pass", "fail", "blocked"]
    assert verdict_schema("architect")["required"] == ["outcome", "summary"]


def test_parse_stream_counts_turns_tools_and_reads_the_result() -> None:
    from pmtool.agent.stream import describe_event, parse_stream

    def assistant(mid: str, *blocks: dict[str, Any]) -> str:
        return json.dumps({"type": "assistant", "message": {
            "id": mid, "content": list(blocks), "usage": {"input_tokens": 10,
                                                          "output_tokens": 2}}})

    lines = [
        json.dumps({"type": "system", "subtype": "init", "session_id": "s1", "model": "m"}),
        assistant("a", {"type": "text", "text": "Let me look."}),
        assistant("a", {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}}),
        json.dumps({"type": "user", "message": {"content": []}}),
        "not json at all",
        assistant("b", {"type": "text", "text": "PMTOOL_VERDICT: done listed"}),
        json.dumps({"type": "result", "is_error": False, "num_turns": 2, "session_id": "s1",
                    "total_cost_usd": 0.01, "result": "PMTOOL_VERDICT: done listed"}),
    ]
    events: list[dict[str, Any]] = []
    summary = parse_stream(lines, progress=events.append)
    assert summary["session_id"] == "s1" and summary["model_used"] == "m"
    assert summary["num_turns"] == 2 and summary["tool_calls"] == 1
    assert summary["outcome"] == "done" and summary["is_error"] is False
    assert [e["event"] for e in events] == ["init", "turn", "text", "tool", "turn", "text",
                                            "result"]
    assert events[3] == {"event": "tool", "tool": "Bash", "turn": 1, "detail": "ls",
                         "tokens": 12}
    assert describe_event(events[3]) == "turn 1: Bash: ls [12 tokens so far]"
    assert describe_event(events[-1]) == "finished after 2 turns, cost $0.01"
    cut = parse_stream(lines[:3])  # the agent died before its result
    assert cut["is_error"] is True and cut["outcome"] is None and cut["num_turns"] == 1


def test_claude_command_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pmtool.agent.claude import agent_env, claude_command

    cmd = claude_command("claude", "opus", "sid", role="qa", max_budget_usd=2.5)
    assert cmd[:8] == ["claude", "-p", "--model", "opus", "--output-format", "stream-json",
                       "--verbose", "--session-id"]
    assert "--dangerously-skip-permissions" in cmd and cmd[-2:] == ["--max-budget-usd", "2.5"]
    schema = json.loads(cmd[cmd.index("--json-schema") + 1])
    assert schema["properties"]["outcome"]["enum"] == ["pass", "fail", "blocked"]
    cmd = claude_command("claude", "sonnet", "sid", resume=True, permission_mode="acceptEdits",
                         allowed_tools="Read, Edit,Bash(git commit:*)")
    assert cmd[cmd.index("--resume") + 1] == "sid" and "--session-id" not in cmd
    assert "--dangerously-skip-permissions" not in cmd
    at = cmd.index("--allowedTools")
    assert cmd[at - 2:at] == ["--permission-mode", "acceptEdits"]
    assert cmd[at + 1:at + 5] == ["Read", "Edit", "Bash(git commit:*)", "--json-schema"]

    base = {"PATH": "/bin", "HEADLESS_PM_API_KEY": "k", "CLAUDECODE": "1",
            "PMTOOL_RESUME": "stale"}
    env = agent_env(base, mark="m1", task_id=7, session_id="sid", model="opus", role="qa",
                    branch="b", resume=False, max_budget_usd=None)
    assert "HEADLESS_PM_API_KEY" not in env and "CLAUDECODE" not in env
    assert "PMTOOL_RESUME" not in env
    assert env["PMTOOL_RUN_MARK"] == "m1" and env["PMTOOL_TASK_ID"] == "7"
    assert json.loads(env["PMTOOL_VERDICT_SCHEMA"])["properties"]["outcome"]["enum"][0] == "pass"
    assert (env.get("IS_SANDBOX") == "1") is (os.geteuid() == 0)
    for given, wanted in (("0", "0"), ("no", "no"), ("yes", "1"), ("true", "1")):
        env = agent_env({"IS_SANDBOX": given}, mark="m", task_id=1, session_id="s", model="m",
                        role=None, branch=None, resume=True, max_budget_usd=1)
        assert env["IS_SANDBOX"] == (wanted if os.geteuid() == 0 else given)


def test_role_instructions_are_found_in_order(tmp_path: Path) -> None:
    from pmtool.agent.prompt import build_prompt, role_instructions

    mine, servers = tmp_path / "mine", tmp_path / "server"
    mine.mkdir()
    servers.mkdir()
    (servers / "qa.md").write_text("server qa rules")
    (mine / "qa.md").write_text("my qa rules")
    assert role_instructions("qa", mine, servers) == ("my qa rules", str(mine / "qa.md"))
    assert role_instructions("qa", tmp_path / "none", servers)[0] == "server qa rules"
    # the server's path is on the server's machine: used only if it exists here
    assert role_instructions("qa", None, "/nonexistent/agent_instructions")[1] == "builtin:qa"
    assert role_instructions("pm")[1] == "builtin:pm"
    task = {"id": 3, "title": "T", "description": "D", "complexity": "minor", "branch": "x"}
    prompt = build_prompt(task, "architect", tmp_path, "main")
    assert "You are the architect" in prompt and "minor task" in prompt and "`main`" in prompt
    assert "{" not in prompt.replace("{{", "")  # no placeholder left unfilled


def test_stop_event_ends_the_run(tmp_path: Path) -> None:
    import threading

    from pmtool.agent.claude import AgentRun, run_agent

    stop = threading.Event()
    started: list[dict[str, Any]] = []
    timer = threading.Timer(0.8, stop.set)
    timer.start()
    try:
        run = AgentRun("Task 5: nothing\nRole: backend_dev\n", cwd=tmp_path, model="m",
                       task_id=5, agent_cmd=fake_agent.command(), log_dir=tmp_path / "logs",
                       env={**os.environ, "PMTOOL_FAKE_AGENT_SLEEP": "30",
                            "PMTOOL_FAKE_AGENT_NO_COMMIT": "1"}, grace=1)
        answer = run_agent(run, stop_event=stop, on_start=started.append)
    finally:
        timer.cancel()
    assert answer.stopped is True and answer.ok is False and answer.timed_out is False
    assert (answer.error or {})["type"] == "interrupted"
    assert (answer.duration_s or 0) < 5 and started[0]["pid"] in answer.swept
    assert not psutil.pid_exists(started[0]["pid"]) or \
        psutil.Process(started[0]["pid"]).status() == psutil.STATUS_ZOMBIE

"""`pmtool exec-claude`: the REAL claude binary against the scripted model server, in real
git repositories, through the installed console script.

A user's session: write a task record (as `claim` would), run `pmtool exec-claude`, read
its JSON, then look at the commits, the record, the transcript, the model server's view of
the conversation, and the process table. The end-to-end cases need the pinned CLI
(`npm ci --prefix tests --no-audit --no-fund`, or PMTOOL_TEST_CLAUDE_BIN) and are skipped
without it; the --agent-cmd cases use the built-in fake agent and always run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import CLAUDE, PMTOOL, needs_claude, wait_for
from pmtool.records import RecordStore, TaskRecord
from pmtool.testing import fake_agent
from pmtool.testing.claude_env import claude_env
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

API_KEY = "pm-secret-key-for-tests-0123456789"


def e2e(test: Callable[..., None]) -> Callable[..., None]:
    """Runs the real CLI: `e2e` marker, skipped without it, a 60 s limit."""
    return pytest.mark.e2e(needs_claude(pytest.mark.timeout(60)(test)))


# ---- the scene: a repo with a task worktree, a record, an environment --------------------


@dataclass
class Scene:
    tmp: Path
    repo: Path
    worktree: Path
    state: Path
    env: dict[str, str]
    task: dict[str, Any]

    @property
    def store(self) -> RecordStore:
        return RecordStore(self.state)

    def record(self, agent_id: str = "dev_001", role: str = "backend_dev",
               **fields: Any) -> TaskRecord:
        """The task record `claim` + `worktree create` would leave."""
        record = TaskRecord(agent_id=agent_id, role=role, level="senior",
                            server_url="http://127.0.0.1:9", task=dict(self.task),
                            previous_status="created", worktree=str(self.worktree),
                            branch=self.task["branch"], **fields)
        record.step("claimed")
        self.store.save(record)
        return record

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.repo, env=self.env, check=True,
                              capture_output=True, text=True).stdout


@dataclass
class Run:
    code: int
    out: dict[str, Any]
    stderr: str


def pmtool(scene: Scene, *args: str, env: dict[str, str] | None = None,
           input: str | None = None, cwd: Path | None = None, timeout: float = 45) -> Run:
    """`pmtool ARGS` with exactly the scene's environment; stdout is one JSON object."""
    proc = subprocess.run([PMTOOL, *args], capture_output=True, text=True, input=input,
                          env={**scene.env, **(env or {})}, cwd=cwd or scene.repo,
                          timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line: {proc.stdout!r} / {proc.stderr!r}"
    out = json.loads(lines[0])
    assert out["ok"] is (proc.returncode == 0), (proc.returncode, out, proc.stderr)
    return Run(proc.returncode, out, proc.stderr)


def make_scene(tmp: Path, model_url: str) -> Scene:
    home, state = tmp / "home", tmp / "state"
    env = claude_env(model_url, home, max_retries=0)
    env.update({
        "PMTOOL_CLAUDE_BIN": CLAUDE or "claude-not-installed",
        "PMTOOL_STATE_DIR": str(state),
        "PMTOOL_CONFIG": os.devnull,
        # The server's /api/v1/context is asked for instruction files; nothing listens here.
        "HEADLESS_PM_API_URL": "http://127.0.0.1:9",
        "HEADLESS_PM_API_KEY": API_KEY,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(tmp / "gitconfig"),
    })
    repo = tmp / "repo"
    repo.mkdir()
    task_id = 4000 + uuid.uuid4().int % 5000  # unique per test: process sweeps look for it
    task = {"id": task_id, "title": "Add a login page",
            "description": "A form with user and password that posts to /login.",
            "target_role": "backend_dev", "difficulty": "senior", "complexity": "major",
            "branch": "feature/login", "status": "under_work", "notes": "pm: keep it small"}
    scene = Scene(tmp, repo, tmp / "wt", state, env, task)
    scene.git("init", "-q", "-b", "main")
    (repo / "README.md").write_text("# app\n")
    scene.git("add", "-A")
    scene.git("commit", "-q", "-m", "initial")
    scene.git("worktree", "add", "-q", "-b", "feature/login", str(scene.worktree))
    return scene


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as srv:
        yield srv


@pytest.fixture
def scene(tmp_path: Path, server: ScriptedModelServer) -> Scene:
    return make_scene(tmp_path, server.url)


def processes_of_task(task_id: int) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment says they work on `task_id`."""
    needle = f"PMTOOL_TASK_ID={task_id}\0".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                if needle in fh.read():
                    found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def transcript(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- the real binary ---------------------------------------------------------------------


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


# ---- no real binary needed ---------------------------------------------------------------


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


# ---- opt-in: the real model API (costs money; never in CI) ------------------------------

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


# ---- the library, in process ---------------------------------------------------------------


def test_verdicts() -> None:
    from pmtool.agent.claude import extract_verdict, verdict_line, verdict_schema

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
    from pmtool.agent.claude import describe_event, parse_stream

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
    from pmtool.agent.claude import build_prompt, role_instructions

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

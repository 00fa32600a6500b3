"""The scripted model server driving the REAL `claude` binary: what the kit promises the
CLI sees (files written, commits, stream lines, structured output, resume, retries, hangs)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import CLAUDE, needs_claude
from pmtool.testing.claude_env import claude_env
from pmtool.testing.model_server import (
    Bash,
    Error,
    Hang,
    ScriptedModelServer,
    Slow,
    Text,
    Write,
    commit_file_script,
    write_file_script,
)


def e2e(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that runs the real CLI: skip without it, 60 s limit (`e2e`: the folder)."""
    return needs_claude(pytest.mark.timeout(60)(test))


SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string"}, "tests_passed": {"type": "boolean"}},
    "required": ["verdict"],
}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def repo(tmp_path: Path, home: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    env = claude_env("http://127.0.0.1:9", home)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=env)
    (path / "README.md").write_text("# scratch\n")
    git(path, env, "add", "-A")
    git(path, env, "commit", "-q", "-m", "initial")
    return path


def git(repo: Path, env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def run_claude(
    srv: ScriptedModelServer,
    repo: Path,
    home: Path,
    *args: str,
    prompt: str = "do the task",
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    assert CLAUDE is not None
    return subprocess.run(
        [CLAUDE, "-p", prompt, "--dangerously-skip-permissions", *args],
        cwd=repo,
        env=env or claude_env(srv.url, home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The result object (json: the only line; stream-json: the last line)."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"no output; stderr: {proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    assert result["type"] == "result", result
    return result


@e2e
def test_write_step_leaves_file_and_result(
    server: ScriptedModelServer, repo: Path, home: Path
) -> None:
    server.set_script(write_file_script("HELLO.txt", "hello\n", "wrote it"))
    started = time.monotonic()
    proc = run_claude(server, repo, home, "--output-format", "json", prompt="write hello")
    assert time.monotonic() - started < 15
    assert proc.returncode == 0, proc.stderr
    result = result_of(proc)
    assert (repo / "HELLO.txt").read_text() == "hello\n"
    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["result"] == "wrote it"
    assert result["num_turns"] == 2
    assert result["total_cost_usd"] > 0
    uuid.UUID(result["session_id"])
    # the CLI sent the tool result back in its second request
    first, second = server.main_requests()
    assert first["stream"] is True and any(t["name"] == "Write" for t in first["tools"])
    tool_result = second["messages"][-1]["content"][0]
    assert tool_result["type"] == "tool_result"
    assert all(r.session_id == result["session_id"] for r in server.log if r.main)


@e2e
def test_bash_step_commits(server: ScriptedModelServer, repo: Path, home: Path) -> None:
    server.set_script(commit_file_script("src/feature.txt", "feature\n", "Add feature file"))
    proc = run_claude(server, repo, home, "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    assert result_of(proc)["num_turns"] == 3
    env = claude_env(server.url, home)
    assert git(repo, env, "log", "--format=%s", "-1").strip() == "Add feature file"
    assert git(repo, env, "status", "--porcelain") == ""
    assert "src/feature.txt" in git(repo, env, "show", "--name-only", "--format=", "HEAD")


@e2e
def test_stream_json_lines(server: ScriptedModelServer, repo: Path, home: Path) -> None:
    server.set_script([Bash("echo hi > out.txt"), Text("streamed")])
    proc = run_claude(server, repo, home, "--output-format", "stream-json", "--verbose")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    kinds = [(o["type"], o.get("subtype")) for o in lines]
    assert kinds[0] == ("system", "init")
    assert ("assistant", None) in kinds and ("user", None) in kinds
    assert kinds[-1] == ("result", "success")
    assert lines[-1]["result"] == "streamed"
    assert len({o["session_id"] for o in lines}) == 1
    tool_use = next(o for o in lines if o["type"] == "assistant")["message"]["content"][0]
    assert tool_use["name"] == "Bash" and tool_use["input"]["command"] == "echo hi > out.txt"


@e2e
def test_json_schema_structured_output(server: ScriptedModelServer, repo: Path, home: Path) -> None:
    verdict = {"verdict": "approved", "tests_passed": True}
    server.set_script(commit_file_script("done.txt", "ok\n", "Do the task", verdict=verdict))
    proc = run_claude(server, repo, home, "--output-format", "json", "--json-schema",
                      json.dumps(SCHEMA))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = result_of(proc)
    # The object lands in `structured_output`; `result` is its JSON text, and the session
    # ends right after the StructuredOutput call (stop_reason "tool_use").
    assert result["structured_output"] == verdict
    assert json.loads(result["result"]) == verdict
    assert len(server.main_requests()) == 3
    tool = next(t for t in server.main_requests()[0]["tools"] if t["name"] == "StructuredOutput")
    assert tool["input_schema"] == SCHEMA


@e2e
def test_json_schema_without_structured_answer(
    server: ScriptedModelServer, repo: Path, home: Path
) -> None:
    server.set_script([Text("no verdict"), Text("still none")])
    proc = run_claude(server, repo, home, "--output-format", "json", "--json-schema",
                      json.dumps(SCHEMA))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = result_of(proc)
    assert result["is_error"] is False and "structured_output" not in result
    nudge = server.main_requests()[1]["messages"][-1]["content"][0]["text"]
    assert "StructuredOutput" in nudge  # the CLI asked once more, then gave up


@e2e
def test_resume_sends_earlier_conversation(
    server: ScriptedModelServer, repo: Path, home: Path
) -> None:
    sid = str(uuid.uuid4())
    server.set_script(write_file_script("ONE.txt", "1\n", "first run done"), session=sid)
    first = run_claude(server, repo, home, "--output-format", "json", "--session-id", sid)
    assert first.returncode == 0, first.stderr
    assert result_of(first)["session_id"] == sid
    first_requests = len(server.main_requests(sid))

    server.set_script([Text("second run done")], session=sid)
    second = run_claude(
        server, repo, home, "--output-format", "json", "--resume", sid, prompt="and now more"
    )
    assert second.returncode == 0, second.stderr
    assert result_of(second)["session_id"] == sid
    assert result_of(second)["result"] == "second run done"
    opening = server.main_requests(sid)[first_requests]
    text = json.dumps(opening["messages"])
    assert "first run done" in text and "ONE.txt" in text and "tool_result" in text
    assert opening["messages"][-1]["role"] == "user"
    assert "and now more" in json.dumps(opening["messages"][-1])


@e2e
def test_two_processes_two_scripts(server: ScriptedModelServer, tmp_path: Path) -> None:
    runs = {}
    for name in ("a", "b"):
        sid = str(uuid.uuid4())
        server.set_script(write_file_script(f"{name}.txt", name, f"finished {name}"), sid)
        work, home = tmp_path / name, tmp_path / f"home-{name}"
        work.mkdir()
        runs[name] = (sid, work, home)
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    threads = [
        threading.Thread(
            target=lambda n=n, s=s, w=w, h=h: out.__setitem__(
                n, run_claude(server, w, h, "--output-format", "json", "--session-id", s)
            )
        )
        for n, (s, w, h) in runs.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (_, work, _) in runs.items():
        assert result_of(out[name])["result"] == f"finished {name}"
        assert sorted(p.name for p in work.iterdir()) == [f"{name}.txt"]


@e2e
def test_side_requests_do_not_take_steps(
    server: ScriptedModelServer, repo: Path, home: Path
) -> None:
    # Without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC the CLI asks for a session title
    # (a request with "tools": []) next to the first main request.
    env = claude_env(server.url, home)
    del env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]
    server.set_script([Slow(Write("T.txt", "t"), 0.1), Text("titled")])
    proc = run_claude(server, repo, home, "--output-format", "json", env=env,
                      prompt="please write the file T.txt with the letter t in it")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert result_of(proc)["result"] == "titled"
    assert (repo / "T.txt").read_text() == "t"
    side = [r for r in server.log if r.method == "POST" and not r.main]
    assert all(not r.body.get("tools") for r in side)


@e2e
def test_bad_request_fails_fast(server: ScriptedModelServer, repo: Path, home: Path) -> None:
    server.set_script([Error(400, "invalid_request_error", "scripted bad request")])
    started = time.monotonic()
    proc = run_claude(server, repo, home, "--output-format", "json")
    assert time.monotonic() - started < 10
    assert proc.returncode == 1
    result = result_of(proc)
    assert result["is_error"] is True and result["api_error_status"] == 400
    assert result["result"] == "API Error: 400 scripted bad request"
    assert len(server.main_requests()) == 1


@e2e
def test_overloaded_is_retried(server: ScriptedModelServer, repo: Path, home: Path) -> None:
    # 5xx/529 are retried with backoff (0.5 s, 1 s, 2 s, ... ten times: ~3 minutes in all).
    server.set_script([Error(529, "overloaded_error", "Overloaded"), Text("recovered")])
    proc = run_claude(server, repo, home, "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    assert result_of(proc)["result"] == "recovered"
    first, retry = (r.time for r in server.log if r.main)
    assert 0.3 < retry - first < 3


@e2e
def test_server_error_without_retries(server: ScriptedModelServer, repo: Path, home: Path) -> None:
    server.set_script([Error(500), Error(500)])
    env = claude_env(server.url, home, max_retries=0)
    proc = run_claude(server, repo, home, "--output-format", "json", env=env)
    assert proc.returncode == 1
    result = result_of(proc)
    assert result["is_error"] is True and result["api_error_status"] == 500
    assert len(server.main_requests()) == 1


@e2e
def test_hang_keeps_cli_waiting_until_killed(
    server: ScriptedModelServer, repo: Path, home: Path
) -> None:
    assert CLAUDE is not None
    server.set_script([Hang()])
    marker = f"hang-{uuid.uuid4()}"
    proc = subprocess.Popen(
        [CLAUDE, "-p", marker, "--output-format", "json", "--dangerously-skip-permissions"],
        cwd=repo,
        env=claude_env(server.url, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=4)
        assert len(server.main_requests()) == 1
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    finally:
        with_group_signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with_group_signal(proc, signal.SIGKILL)
            proc.wait(timeout=5)
        proc.communicate()
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


def with_group_signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@needs_claude
def test_the_command_line_serves_a_script_file_to_the_real_claude(tmp_path: Path) -> None:
    """`python -m pmtool.testing.model_server --script FILE`: what a person starts to try
    claude (or `pmtool run`) offline; the env it prints is all the CLI needs."""
    import sys

    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"kind": "write", "file_path": "HELLO.txt",
                                   "content": "hi from the script\n"},
                                  {"kind": "text", "text": "wrote HELLO.txt"}]))
    proc = subprocess.Popen([sys.executable, "-m", "pmtool.testing.model_server", "--script",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["steps"] == 2 and ready["env"]["ANTHROPIC_BASE_URL"] == ready["url"]
        work = tmp_path / "work"
        work.mkdir()
        env = claude_env(ready["url"], tmp_path / "home", extra=ready["env"])
        done = subprocess.run([CLAUDE, "-p", "write the file", "--output-format", "json",
                               "--dangerously-skip-permissions"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert json.loads(done.stdout)["result"] == "wrote HELLO.txt", done.stderr
        assert (work / "HELLO.txt").read_text() == "hi from the script\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"export ANTHROPIC_BASE_URL={ready['url']}" in err

"""The scripted model server, alone and driving the REAL `claude` binary end to end.

The end-to-end tests need the pinned CLI (`npm ci --prefix tests --no-audit --no-fund`, or
`PMTOOL_TEST_CLAUDE_BIN`); they are skipped without it. Everything runs on loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    Structured,
    Text,
    ToolUse,
    Write,
    as_step,
    commit_file_script,
    write_file_script,
)


def e2e(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that runs the real CLI: `e2e` marker, skip without it, 60 s limit."""
    return pytest.mark.e2e(needs_claude(pytest.mark.timeout(60)(test)))


SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string"}, "tests_passed": {"type": "boolean"}},
    "required": ["verdict"],
}


# ---- fixtures / helpers ------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as srv:
        yield srv


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


def post(url: str, body: Any, path: str = "/v1/messages?beta=true", **headers: str) -> Any:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **headers})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def sse(data: str) -> list[dict[str, Any]]:
    events = []
    for chunk in data.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        payload = json.loads(fields["data"])
        assert payload["type"] == fields["event"]
        events.append(payload)
    return events


MAIN = {"model": "m", "stream": True, "tools": [{"name": "Write"}], "messages": []}


# ---- the server on its own (no CLI needed) ----------------------------------------------


def test_stream_follows_the_messages_event_order(server: ScriptedModelServer) -> None:
    server.set_script([ToolUse("Write", {"file_path": "a", "content": "b"}, text="ok")])
    status, headers, data = post(server.url, MAIN)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    types = [e["type"] for e in sse(data)]
    assert types == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    events = sse(data)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert json.loads(events[6]["delta"]["partial_json"]) == {"file_path": "a", "content": "b"}
    # the script ran out: a final text with end_turn
    _, _, data = post(server.url, MAIN)
    events = sse(data)
    assert events[3]["delta"] == {"type": "text_delta", "text": "Done."}
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


def test_non_streaming_side_requests_and_count_tokens(server: ScriptedModelServer) -> None:
    server.set_script([Text("main answer")])
    # a side request (no tools) answers JSON for its output format and takes no step
    side = {
        "model": "m",
        "stream": False,
        "tools": [],
        "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
        }}},
    }  # fmt: skip
    status, _, data = post(server.url, side)
    message = json.loads(data)
    assert status == 200 and message["type"] == "message"
    assert json.loads(message["content"][0]["text"]) == {"title": "Scripted session"}
    assert server.remaining() == 1
    status, _, data = post(server.url, {**MAIN, "max_tokens": 1})  # quota-style probe
    assert server.remaining() == 1
    status, _, data = post(server.url, {**MAIN, "stream": False})
    assert json.loads(data)["content"] == [{"type": "text", "text": "main answer"}]
    status, _, data = post(server.url, MAIN, path="/v1/messages/count_tokens?beta=true")
    assert status == 200 and "input_tokens" in json.loads(data)
    assert len(server.main_requests()) == 1
    assert len(server.requests) == 3  # count_tokens is not a Messages request


def test_error_steps_and_dict_steps(server: ScriptedModelServer) -> None:
    server.set_script(
        [
            {"kind": "error", "status": 529, "error_type": "overloaded_error", "message": "busy"},
            Error(500, should_retry=False),
            {"kind": "structured", "value": {"verdict": "done"}},
        ]
    )
    status, _, data = post(server.url, MAIN)
    assert status == 529
    assert json.loads(data) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "busy"},
    }
    status, headers, _ = post(server.url, MAIN)
    assert status == 500 and headers["x-should-retry"] == "false"
    with_schema = {**MAIN, "tools": [{"name": "Write"}, {"name": "StructuredOutput"}]}
    events = sse(post(server.url, with_schema)[2])
    assert events[2]["content_block"]["name"] == "StructuredOutput"
    assert as_step({"kind": "slow", "delay": 0.1, "step": {"kind": "hang"}}) == Slow(Hang(), 0.1)
    assert as_step({"kind": "structured", "value": {"a": 1}}) == Structured({"a": 1})


def test_scripts_per_session(server: ScriptedModelServer) -> None:
    server.set_script([Text("default 1"), Text("default 2")])
    server.set_script([Text("for s1")], session="s1")

    def answer(session: str) -> str:
        events = sse(post(server.url, MAIN, **{"x-claude-code-session-id": session})[2])
        return events[3]["delta"]["text"]

    assert answer("s1") == "for s1"
    assert answer("s2") == "default 1"
    assert answer("s3") == "default 1"  # each session has its own place in the default
    assert answer("s2") == "default 2"
    assert answer("s1") == "Done."
    # the session may also come only from metadata.user_id (a JSON string)
    meta = {"user_id": json.dumps({"device_id": "d", "session_id": "s1"})}
    server.set_script([Text("again")], session="s1")
    events = sse(post(server.url, {**MAIN, "metadata": meta})[2])
    assert events[3]["delta"]["text"] == "again"
    assert server.sessions() == ["s1", "s2", "s3"]


def test_hang_and_slow_do_not_block_stop() -> None:
    srv = ScriptedModelServer([Hang()]).start()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            post(srv.url, MAIN)
        except BaseException as exc:  # the connection is dropped when the server stops
            errors.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not srv.main_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert thread.is_alive()
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 2
    thread.join(5)
    assert not thread.is_alive()

    with ScriptedModelServer([Slow(Text("slowly"), delay=0.2)]) as slow:
        started = time.monotonic()
        events = sse(post(slow.url, MAIN)[2])
        assert events[3]["delta"]["text"] == "slowly"
        assert time.monotonic() - started >= 0.2 * len(events)


# ---- the real claude CLI -----------------------------------------------------------------


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


@pytest.mark.e2e
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


def test_the_command_line_refuses_a_bad_script(tmp_path: Path) -> None:
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "text"}')
    done = subprocess.run([sys.executable, "-m", "pmtool.testing.model_server", "--script",
                           str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "JSON list of steps" in done.stderr

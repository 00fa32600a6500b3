"""The scripted model server on its own, over plain HTTP on loopback (driving the REAL
`claude` binary: tests/e2e/test_claude_kit.py).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pmtool.testing.model_server import (
    Error,
    Hang,
    ScriptedModelServer,
    Slow,
    Structured,
    Text,
    ToolUse,
    as_step,
)

# ---- fixtures / helpers ------------------------------------------------------------------


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


def test_the_command_line_refuses_a_bad_script(tmp_path: Path) -> None:
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "text"}')
    done = subprocess.run([sys.executable, "-m", "pmtool.testing.model_server", "--script",
                           str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "JSON list of steps" in done.stderr

# Facts measured with the real Claude Code 2.1.197 (npm @anthropic-ai/claude-code, native Bun
# binary), `claude -p ... --dangerously-skip-permissions`, env from pmtool.testing.claude_env:
#
# * Requests: first `HEAD /` or `GET /` (a connection warm-up; any 200 does), then
#   `POST /v1/messages?beta=true`, "stream": true, the model's full name (default here
#   "claude-opus-4-8"), max_tokens 64000, ~25 built-in `tools`, `system` as a list of text
#   blocks, metadata, thinking, context_management, output_config. `messages` may hold
#   {"role": "system"} entries (beta mid-conversation-system). No count_tokens call was seen
#   in -p mode (answered anyway, as is any other path).
# * Session id: header `X-Claude-Code-Session-Id`, and `metadata.user_id`, a JSON *string*
#   {"device_id", "account_uuid": "", "session_id"}. `--session-id UUID` is used as given;
#   `--resume UUID` keeps sending that id.
# * Side requests: only without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, and only for
#   prompts longer than a few words: a title request, concurrent with the first main request,
#   same model, `"tools": []`, thinking disabled, system "Generate a concise, sentence-case
#   title ...", output_config.format = json_schema {"title": string}. With the variable set
#   (claude_env does) none was seen. Rule here (is_main_request): main conversation iff the
#   request has a non-empty `tools` list (and max_tokens > 1); the main loop always sends its
#   tools, also with --json-schema. Side requests get a harmless answer (JSON matching
#   output_config.format if asked, else text) and take no step.
# * Result (`--output-format json`; last line of stream-json): type "result", subtype
#   "success" (also for API errors!), is_error, api_error_status, duration_ms,
#   duration_api_ms, num_turns, result (final text), stop_reason, session_id, total_cost_usd
#   (> 0, computed by the CLI from our token counts), usage, modelUsage, permission_denials,
#   terminal_reason "completed", uuid; with --json-schema also structured_output.
# * stream-json (needs --verbose): system/init (session_id, tools, model, cwd, ...), then
#   assistant and user (tool_result) lines, then result.
# * Structured output: --json-schema adds the tool "StructuredOutput" (input_schema = the
#   schema). Its tool_use input lands in result["structured_output"]; result["result"] is
#   that object's JSON text, stop_reason "tool_use", and the session ends right there (no
#   further request; num_turns counts one more than the requests). If the model never calls
#   it, the CLI sends one nudge ("[structured-output-enforce] You MUST call the
#   StructuredOutput tool ...") and then ends with success and no structured_output key.
# * Resume: `--resume ID -p NEW` sends, in its first request, the whole earlier conversation
#   (prompt, assistant tool_use, user tool_result, assistant final text) plus NEW as the last
#   user message; same session id; transcript in $HOME/.claude/projects/<cwd-slug>/ID.jsonl.
# * Errors: 400 -> no retry, exit 1, is_error true, api_error_status 400, result
#   "API Error: 400 <message>" (~0.6 s; a message "prompt is too long" is special-cased).
#   500 and 529 -> retried by the CLI's own loop (x-stainless-retry-count stays 0) with
#   backoff 0.5, 1, 2, 4, 8, 16, then ~32-40 s, 10 retries (11 requests), ~181 s in all,
#   then exit 1, is_error true, api_error_status 500/529. CLAUDE_CODE_MAX_RETRIES=N (clamped
#   to 15; 0 = fail at once) or the answer header `x-should-retry: false` cut that short.
# * Hang: the CLI waits (X-Stainless-Timeout 600 s); SIGTERM to its process group ended it
#   within ~0.05 s here (exit 143, no output). It spawns no child processes when idle.
# * Timing: a 2-3 turn session takes ~0.2-0.3 s of the CLI's own time (duration_ms) and
#   ~0.6-0.9 s wall clock including start-up.

"""A scripted Anthropic Messages API server for running the real ``claude`` CLI offline.

Point the CLI at it with ``ANTHROPIC_BASE_URL=server.url`` (see
:func:`pmtool.testing.claude_env.claude_env`) and it runs whole sessions on loopback:
the "model" answers come from a script, while the CLI really executes the tools
(writes files, runs ``git commit``) in its working directory.

Usage::

    with ScriptedModelServer([Write("HELLO.txt", "hello\\n"), Text("done")]) as srv:
        subprocess.run([claude, "-p", "write hello", ...], env=claude_env(srv.url, home))
        assert srv.main_requests()[1]["messages"][-1]["content"][0]["type"] == "tool_result"

Scripts
-------
A script is a list of steps. Each request of the *main conversation* (see "side requests"
below) takes the next step of the script of its session; when the script has run out, the
server answers ``Text(final_text)`` (``"Done."`` by default) with ``end_turn``. Steps are
dataclasses from this module, or plain dicts with a ``"kind"`` key (converted by
:func:`as_step`):

``ToolUse(name, input, text=None, id=None)`` / ``{"kind": "tool_use", "name": ..., "input": ...}``
    One ``tool_use`` block (optionally after a text block), ``stop_reason: "tool_use"``.
    Shorthands: ``Write(file_path, content)`` / ``{"kind": "write", "file_path", "content"}``
    and ``Bash(command)`` / ``{"kind": "bash", "command": ...}``.
``Text(text)`` / ``{"kind": "text", "text": ...}``
    A final text answer, ``stop_reason: "end_turn"``.
``Structured(value, text=None)`` / ``{"kind": "structured", "value": {...}}``
    A ``tool_use`` of the structured-output tool that ``--json-schema`` adds to the request's
    ``tools`` (named ``StructuredOutput``; the name is taken from the request when a tool of
    that name, or one whose description mentions structured output, is offered). The CLI
    ends the session right after this call, so it is the last step that gets used.
``Error(status=500, error_type="api_error", message=..., should_retry=None, retry_after=None)``
    ``{"kind": "error", "status": 529, "error_type": "overloaded_error"}``: an HTTP error
    with the Anthropic error body ``{"type": "error", "error": {"type", "message"}}``.
    ``should_retry`` sets the ``x-should-retry`` header, which the CLI's SDK obeys
    (``False`` makes a 5xx fail at once instead of being retried).
``Hang()`` / ``{"kind": "hang"}``
    Accept the request and never answer (until :meth:`ScriptedModelServer.stop`).
``Slow(step, delay=0.5)`` / ``{"kind": "slow", "delay": 0.5, "step": {...}}``
    Answer *step* with *delay* seconds before the response and between SSE events.

:func:`write_file_script` and :func:`commit_file_script` build common scripts.

Sessions
--------
``set_script(script, session=None)`` installs the default script (``session=None``) or the
script for one session id. Each session (the CLI's ``X-Claude-Code-Session-Id`` header, or
``session_id`` inside ``metadata.user_id``) keeps its own position: two CLI processes against
one server each step through their own copy of the default script, or through their own
script when one was set for their id (pass ``--session-id UUID`` to the CLI to know it in
advance). A ``--resume`` run sends the same session id, so it continues where the earlier run
stopped unless the script of that session is set again (which restarts it).

Records
-------
``log`` holds every request as a :class:`RecordedRequest` (method, path, lower-cased
headers, JSON body, session id, whether it was a main-conversation request, the step it got,
arrival time); ``requests`` gives the bodies of all Messages requests, ``main_requests(session)``
those of the main conversation, ``sessions()`` the session ids seen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeAlias

__all__ = [
    "Bash",
    "Error",
    "Hang",
    "RecordedRequest",
    "ScriptedModelServer",
    "Slow",
    "Step",
    "Structured",
    "Text",
    "ToolUse",
    "Write",
    "as_step",
    "commit_file_script",
    "is_main_request",
    "write_file_script",
]

STRUCTURED_OUTPUT_TOOL = "StructuredOutput"
DEFAULT_FINAL_TEXT = "Done."


# --------------------------------------------------------------------------- steps


@dataclass
class ToolUse:
    """A ``tool_use`` block (after an optional text block); stop reason ``tool_use``."""

    name: str
    input: dict[str, Any]
    text: str | None = None
    id: str | None = None


@dataclass
class Text:
    """A final text answer; stop reason ``end_turn``."""

    text: str


@dataclass
class Structured:
    """A ``tool_use`` of the ``--json-schema`` tool (``StructuredOutput``) with *value*."""

    value: Any
    text: str | None = None


@dataclass
class Error:
    """An HTTP error with an Anthropic error body."""

    status: int = 500
    error_type: str = "api_error"
    message: str = "Internal server error (scripted)"
    should_retry: bool | None = None
    retry_after: float | None = None
    # Extra answer headers, e.g. the `anthropic-ratelimit-unified-*` headers with which the
    # API tells a subscription about its usage limit and when it resets.
    headers: dict[str, str] | None = None


@dataclass
class Hang:
    """Accept the request and never answer (until the server stops)."""


@dataclass
class Slow:
    """Answer *step* slowly: *delay* seconds before the response and between SSE events."""

    step: Any
    delay: float = 0.5


Step: TypeAlias = ToolUse | Text | Structured | Error | Hang | Slow


def Write(file_path: str, content: str, text: str | None = None) -> ToolUse:
    """A ``Write`` tool call."""
    return ToolUse("Write", {"file_path": file_path, "content": content}, text=text)


def Bash(command: str, description: str | None = None, text: str | None = None) -> ToolUse:
    """A ``Bash`` tool call."""
    args: dict[str, Any] = {"command": command}
    if description:
        args["description"] = description
    return ToolUse("Bash", args, text=text)


def as_step(step: Step | Mapping[str, Any]) -> Step:
    """Turn a step dict (``{"kind": ..., ...}``) into a step object; pass objects through."""
    if isinstance(step, ToolUse | Text | Structured | Error | Hang):
        return step
    if isinstance(step, Slow):
        return Slow(as_step(step.step), step.delay)
    if not isinstance(step, Mapping):
        raise TypeError(f"not a script step: {step!r}")
    d = dict(step)
    kind = d.pop("kind", None) or d.pop("type", None)
    if kind == "tool_use":
        return ToolUse(d["name"], dict(d.get("input") or {}), d.get("text"), d.get("id"))
    if kind == "write":
        return Write(d["file_path"], d["content"], d.get("text"))
    if kind == "bash":
        return Bash(d["command"], d.get("description"), d.get("text"))
    if kind == "text":
        return Text(d["text"])
    if kind == "structured":
        return Structured(d["value"], d.get("text"))
    if kind == "error":
        return Error(**d)
    if kind == "hang":
        return Hang()
    if kind == "slow":
        return Slow(as_step(d["step"]), float(d.get("delay", 0.5)))
    raise ValueError(f"unknown step kind {kind!r} in {step!r}")


def write_file_script(path: str, content: str, final_text: str = DEFAULT_FINAL_TEXT) -> list[Step]:
    """Write *path*, then answer *final_text*."""
    return [Write(path, content), Text(final_text)]


def commit_file_script(
    path: str,
    content: str,
    message: str,
    verdict: Any = None,
    final_text: str = DEFAULT_FINAL_TEXT,
) -> list[Step]:
    """Write *path*, ``git add -A && git commit -m MESSAGE`` via Bash, then finish.

    With *verdict* (for runs with ``--json-schema``) the session ends with a
    ``StructuredOutput`` call carrying it; without, with the text *final_text*.
    """
    import shlex

    steps: list[Step] = [
        Write(path, content),
        Bash(f"git add -A && git commit -q -m {shlex.quote(message)}", "Commit the change"),
    ]
    # The CLI ends the session as soon as StructuredOutput has been called (the final text
    # of the result is then the JSON of the verdict), so no text step follows it.
    steps.append(Structured(verdict) if verdict is not None else Text(final_text))
    return steps


# --------------------------------------------------------------------------- requests


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    session_id: str | None
    main: bool
    step: Step | None = None
    time: float = field(default_factory=time.time)


def is_main_request(body: Any) -> bool:
    """Default rule: a Messages request belongs to the main conversation iff it offers tools.

    Side requests seen from Claude Code 2.1.197 (session-title generation) carry
    ``"tools": []``; the main agent loop always sends its tool list. Requests with
    ``max_tokens <= 1`` (quota/ping probes) are treated as side requests too.
    """
    if not isinstance(body, Mapping) or not body.get("tools"):
        return False
    max_tokens = body.get("max_tokens")
    return not (isinstance(max_tokens, int) and max_tokens <= 1)


def _session_of(headers: Mapping[str, str], body: Any) -> str | None:
    sid = headers.get("x-claude-code-session-id")
    if sid:
        return sid
    if isinstance(body, Mapping):
        user_id = (body.get("metadata") or {}).get("user_id")
        if isinstance(user_id, str):
            try:
                meta = json.loads(user_id)
            except ValueError:
                return None
            if isinstance(meta, Mapping) and isinstance(meta.get("session_id"), str):
                return meta["session_id"]
    return None


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _structured_tool_name(body: Any) -> str:
    tools = body.get("tools") if isinstance(body, Mapping) else None
    for tool in tools or []:
        if isinstance(tool, Mapping) and tool.get("name") == STRUCTURED_OUTPUT_TOOL:
            return STRUCTURED_OUTPUT_TOOL
    for tool in tools or []:
        description = str(tool.get("description", "")) if isinstance(tool, Mapping) else ""
        if "structured output" in description.lower():
            return str(tool.get("name"))
    return STRUCTURED_OUTPUT_TOOL


def _blocks_for(step: Step, body: Any) -> tuple[list[dict[str, Any]], str]:
    """Content blocks (final form) and stop reason for a ToolUse/Text/Structured step."""
    if isinstance(step, Text):
        return [{"type": "text", "text": step.text}], "end_turn"
    if isinstance(step, ToolUse):
        name, args, text, tid = step.name, step.input, step.text, step.id
    elif isinstance(step, Structured):
        name, args, text, tid = _structured_tool_name(body), step.value, step.text, None
    else:  # pragma: no cover - guarded by callers
        raise TypeError(step)
    blocks: list[dict[str, Any]] = []
    if text:
        blocks.append({"type": "text", "text": text})
    blocks.append({"type": "tool_use", "id": tid or _new_id("toolu_"), "name": name, "input": args})
    return blocks, "tool_use"


def _usage(body: Any, output_tokens: int) -> dict[str, int]:
    size = len(json.dumps(body.get("messages", []))) if isinstance(body, Mapping) else 0
    return {
        "input_tokens": max(1, size // 4),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _model_of(body: Any) -> str:
    model = body.get("model") if isinstance(body, Mapping) else None
    return model if isinstance(model, str) else "claude-scripted"


def _sse_events(
    blocks: list[dict[str, Any]], stop_reason: str, body: Any
) -> list[tuple[str, dict[str, Any]]]:
    model = _model_of(body)
    out_tokens = max(1, len(json.dumps(blocks)) // 4)
    usage = _usage(body, 1)
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": _new_id("msg_"),
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage,
                },
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    for i, block in enumerate(blocks):
        start: dict[str, Any]
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events += [
            (
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": start},
            ),
            ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": i}),
        ]
    events += [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {
                    "input_tokens": usage["input_tokens"],
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": out_tokens,
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


# --------------------------------------------------------------------------- server


def _schema_instance(schema: Any, text: str) -> Any:
    """A minimal value matching a (simple) JSON schema, strings filled with *text*."""
    if not isinstance(schema, Mapping):
        return text
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: _schema_instance(props.get(k), text) for k in schema.get("required") or []}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    owner: ScriptedModelServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self.sockets_lock:
            self.open_sockets.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Shut down every open client connection (idle keep-alive, hanging, slow)."""
        with self.sockets_lock:
            socks = list(self.open_sockets)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---- plumbing

    def _read_body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _send_json(self, status: int, obj: Any, extra: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", _new_id("req_"))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _record(self, body: Any, main: bool) -> RecordedRequest:
        headers = {k.lower(): v for k, v in self.headers.items()}
        rec = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=headers,
            body=body,
            session_id=_session_of(headers, body),
            main=main,
        )
        self.server.owner._append(rec)
        return rec

    # ---- verbs

    def do_GET(self) -> None:
        self._record(None, False)
        self._send_json(200, {"ok": True})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        owner = self.server.owner
        body = self._read_body()
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/v1/messages/count_tokens"):
            self._record(body, False)
            self._send_json(200, {"input_tokens": _usage(body, 0)["input_tokens"]})
            return
        if not path.endswith("/v1/messages"):
            self._record(body, False)
            self._send_json(200, {})
            return
        main = owner._is_main(body)
        rec = self._record(body, main)
        step = owner._next_step(rec.session_id) if main else Text(owner._side_answer(body))
        rec.step = step
        self._answer(step, body)

    def do_PUT(self) -> None:
        self._record(self._read_body(), False)
        self._send_json(200, {})

    do_PATCH = do_PUT
    do_DELETE = do_PUT

    # ---- answers

    def _wait(self, seconds: float) -> bool:
        """Sleep; False if the server is stopping."""
        return not self.server.owner._stopping.wait(seconds) if seconds > 0 else True

    def _answer(self, step: Step, body: Any, delay: float = 0.0) -> None:
        if isinstance(step, Slow):
            self._answer(step.step, body, step.delay)
            return
        if delay and not self._wait(delay):
            return
        if isinstance(step, Hang):
            self.server.owner._stopping.wait()
            self.close_connection = True
            return
        if isinstance(step, Error):
            extra = {"Connection": "close"}
            if step.should_retry is not None:
                extra["x-should-retry"] = "true" if step.should_retry else "false"
            if step.retry_after is not None:
                extra["retry-after"] = str(step.retry_after)
            extra.update(step.headers or {})
            self.close_connection = True
            err = {"type": step.error_type, "message": step.message}
            self._send_json(step.status, {"type": "error", "error": err}, extra)
            return
        blocks, stop_reason = _blocks_for(step, body)
        if not (isinstance(body, Mapping) and body.get("stream")):
            self._send_json(
                200,
                {
                    "id": _new_id("msg_"),
                    "type": "message",
                    "role": "assistant",
                    "model": _model_of(body),
                    "content": blocks,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": _usage(body, max(1, len(json.dumps(blocks)) // 4)),
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", _new_id("req_"))
        self.end_headers()
        self.close_connection = True
        try:
            for n, (event, data) in enumerate(_sse_events(blocks, stop_reason, body)):
                if n and delay and not self._wait(delay):
                    return
                self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class ScriptedModelServer:
    """Anthropic Messages API on loopback, answering from scripts (see module docstring)."""

    def __init__(
        self,
        script: Iterable[Step | Mapping[str, Any]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        final_text: str = DEFAULT_FINAL_TEXT,
        side_text: str = "Scripted session",
        is_main: Callable[[Any], bool] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.final_text = final_text
        self.side_text = side_text
        self._is_main_rule = is_main or is_main_request
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._default: list[Step] = []
        self._scripts: dict[str, list[Step]] = {}
        self._cursors: dict[str | None, int] = {}
        self.log: list[RecordedRequest] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.set_script(script or [])

    # ---- scripts

    def set_script(
        self, script: Iterable[Step | Mapping[str, Any]], session: str | None = None
    ) -> None:
        """Install the default script (*session* None) or the script of one session id.

        Restarts the position of that session (for the default: of every session that has
        no script of its own).
        """
        steps = [as_step(s) for s in script]
        with self._lock:
            if session is None:
                self._default = steps
                for key in list(self._cursors):
                    if key not in self._scripts:
                        del self._cursors[key]
            else:
                self._scripts[session] = steps
                self._cursors.pop(session, None)

    def _next_step(self, session: str | None) -> Step:
        with self._lock:
            script = self._scripts.get(session, self._default) if session else self._default
            pos = self._cursors.get(session, 0)
            self._cursors[session] = pos + 1
            if pos < len(script):
                return copy.deepcopy(script[pos])
            return Text(self.final_text)

    def remaining(self, session: str | None = None) -> int:
        """Steps not yet taken by *session* (None: sessions on the default script)."""
        with self._lock:
            script = self._scripts.get(session, self._default) if session else self._default
            return max(0, len(script) - self._cursors.get(session, 0))

    # ---- records

    def _side_answer(self, body: Any) -> str:
        """Text for a side request; JSON matching ``output_config.format`` when one is asked."""
        fmt = (body.get("output_config") or {}).get("format") if isinstance(body, Mapping) else None
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            return json.dumps(_schema_instance(fmt.get("schema"), self.side_text))
        return self.side_text

    def _is_main(self, body: Any) -> bool:
        try:
            return bool(self._is_main_rule(body))
        except Exception:
            return False

    def _append(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.log.append(rec)

    @property
    def requests(self) -> list[Any]:
        """Bodies of all ``POST .../v1/messages`` requests (main and side), in arrival order."""
        with self._lock:
            return [r.body for r in self.log if r.method == "POST" and _is_messages(r.path)]

    def main_requests(self, session: str | None = None) -> list[Any]:
        """Bodies of the main-conversation requests, optionally of one session only."""
        with self._lock:
            return [
                r.body for r in self.log if r.main and (session is None or r.session_id == session)
            ]

    def sessions(self) -> list[str]:
        """Session ids seen in main-conversation requests, in order of first appearance."""
        with self._lock:
            seen: dict[str, None] = {}
            for r in self.log:
                if r.main and r.session_id:
                    seen.setdefault(r.session_id, None)
            return list(seen)

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # ---- life cycle

    @property
    def url(self) -> str:
        """Base URL for ``ANTHROPIC_BASE_URL`` (``http://127.0.0.1:PORT``)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ScriptedModelServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _Server((self.host, self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name="ScriptedModelServer",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging and slow answers are abandoned (their sockets closed)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.drop_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_messages(path: str) -> bool:
    return path.split("?", 1)[0].rstrip("/").endswith("/v1/messages")


# --------------------------------------------------------------------------- command line

# What a shell needs besides the URL for the real CLI to talk to this server only (the
# rest of pmtool.testing.claude_env is for tests: a private HOME, a git identity).
OFFLINE_ENV = {"ANTHROPIC_API_KEY": "dummy", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
               "DISABLE_ERROR_REPORTING": "1"}


def main(argv: list[str] | None = None) -> int:
    """`python -m pmtool.testing.model_server [--port N] [--script FILE]`: serve until
    Ctrl-C or SIGTERM. Prints one JSON line (url, pid, steps, env) on stdout when ready, and
    on stderr the `export` line that points the real `claude` (and `pmtool run`) at it."""
    import argparse
    import os
    import signal
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="python -m pmtool.testing.model_server",
        description="A scripted Anthropic Messages API on loopback: the real claude CLI runs "
                    "whole sessions offline, its tools for real, its answers from a script.")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--script", metavar="FILE", help='a JSON list of steps, e.g. '
                        '[{"kind": "write", "file_path": "HELLO.txt", "content": "hi\\n"}, '
                        '{"kind": "text", "text": "done"}]; each session runs it from the '
                        'start (default: answer "Done." at once)')
    parser.add_argument("--final-text", default=DEFAULT_FINAL_TEXT,
                        help="the answer once a session's script has run out")
    args = parser.parse_args(argv)
    try:
        steps = json.loads(Path(args.script).read_text(encoding="utf-8")) if args.script else []
        if not isinstance(steps, list):
            raise ValueError("the script must be a JSON list of steps")
        script = [as_step(step) for step in steps]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        parser.exit(2, f"{parser.prog}: --script {args.script}: {exc}\n")
    server = ScriptedModelServer(script, host=args.host, port=args.port,
                                 final_text=args.final_text).start()
    env = {"ANTHROPIC_BASE_URL": server.url, **OFFLINE_ENV}
    print(json.dumps({"url": server.url, "pid": os.getpid(), "steps": len(script), "env": env}),
          flush=True)
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"model server at {server.url}; in another shell:\n  export {exports}\n"
          "then `claude -p ...` or `pmtool run ...` talk to it only (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reading Claude Code's stream-json output, one line at a time, into what the runner needs.

`StreamParser.feed(line)` keeps the session id, the model, the turns, tool calls and
tokens, the assistant's texts, the result line and claude's own retries of the model API
(what `pmtool.failure_policy.classify` reads), and answers progress events (dicts with an
`event` key); `summary()` is what the stream said, verdict included
(`pmtool.agent.prompt.extract_verdict`). `parse_stream` reads a whole transcript;
`describe_event` makes one human line of a progress event. Lines in, dicts out: no I/O,
and a line that is not a JSON object is passed over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pmtool.agent.prompt import extract_verdict

Progress = Callable[[dict[str, Any]], None]


# -- reading stream-json ---------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tool_detail(name: str, args: Any) -> str:
    """One short, human hint of what a tool call does (the progress line shows it)."""
    if not isinstance(args, Mapping):
        return ""
    for key in ("command", "file_path", "path", "pattern", "url", "description", "prompt"):
        if args.get(key):
            return _short(args[key])
    return ""


class StreamParser:
    """Reads stream-json lines one at a time and keeps what the runner needs to know.

    `feed(line)` returns progress events (dicts with an `event` key): `init`, `turn`,
    `tool`, `text`, `result`. Lines that are not JSON objects are ignored (kept in the log).
    """

    def __init__(self, role: str | None = None) -> None:
        self.role = role
        self.session_id: str | None = None
        self.model_used: str | None = None
        self.result: dict[str, Any] | None = None
        self.turns = 0
        self.tool_calls: list[str] = []
        self.texts: list[str] = []
        self.tokens = 0
        self.lines = 0
        self._messages: set[str] = set()
        # claude's own retries of the model API and usage-limit notices: what
        # pmtool.failure_policy.classify reads to tell a rate limit or overload from a failure.
        self.stops: list[dict[str, Any]] = []

    def feed(self, line: str) -> list[dict[str, Any]]:
        line = line.strip()
        if not line:
            return []
        self.lines += 1
        try:
            obj = json.loads(line)
        except ValueError:
            return []
        if not isinstance(obj, dict):
            return []
        kind = obj.get("type")
        if isinstance(obj.get("session_id"), str) and kind != "result":
            self.session_id = self.session_id or obj["session_id"]
        if kind == "system" and obj.get("subtype") == "init":
            self.session_id = obj.get("session_id") or self.session_id
            self.model_used = obj.get("model")
            return [{"event": "init", "session_id": self.session_id, "model": self.model_used}]
        if kind == "assistant":
            return self._assistant(obj)
        if kind == "rate_limit_event" or (kind == "system" and obj.get("subtype") == "api_retry"):
            self.stops.append(obj)
            return [{"event": "api_retry" if kind == "system" else "rate_limit", "raw": obj}]
        if kind == "result":
            self.result = obj
            if isinstance(obj.get("session_id"), str):
                self.session_id = obj["session_id"]
            return [{"event": "result", "num_turns": obj.get("num_turns"),
                     "total_cost_usd": obj.get("total_cost_usd"),
                     "is_error": obj.get("is_error")}]
        return []

    def _assistant(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        message: dict[str, Any] = obj["message"] if isinstance(obj.get("message"), dict) else {}
        events: list[dict[str, Any]] = []
        # The CLI prints one line per content block; blocks of one model answer share the
        # message id, and one answer is one turn.
        mid = message.get("id") or obj.get("uuid") or str(self.lines)
        if mid not in self._messages:
            self._messages.add(mid)
            self.turns += 1
            usage: dict[str, Any] = message["usage"] \
                if isinstance(message.get("usage"), dict) else {}
            self.tokens += sum(int(usage.get(k) or 0) for k in (
                "input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens"))
            events.append({"event": "turn", "turn": self.turns, "tokens": self.tokens})
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                name = str(block.get("name"))
                self.tool_calls.append(name)
                events.append({"event": "tool", "tool": name, "turn": self.turns,
                               "detail": _tool_detail(name, block.get("input")),
                               "tokens": self.tokens})
            elif block.get("type") == "text" and block.get("text"):
                self.texts.append(block["text"])
                events.append({"event": "text", "turn": self.turns,
                               "text": _short(block["text"], 120), "tokens": self.tokens})
        return events

    def summary(self) -> dict[str, Any]:
        """What the stream said: result fields, counts and the verdict."""
        result = self.result or {}
        out = {
            "session_id": self.session_id,
            "model_used": self.model_used,
            "num_turns": result.get("num_turns", self.turns if self.lines else None),
            "total_cost_usd": result.get("total_cost_usd"),
            "is_error": bool(result.get("is_error", True)) if self.result else True,
            "api_error_status": result.get("api_error_status"),
            "result_text": result.get("result"),
            "has_result": self.result is not None,
            "tool_calls": len(self.tool_calls),
        }
        out.update(extract_verdict(self.result, self.role, self.texts))
        return out


def describe_event(event: Mapping[str, Any]) -> str | None:
    """One human line for a progress event (what `exec-claude` prints on stderr), or None.

    For callers whose progress view takes text: `progress=lambda e: show(describe_event(e))`.
    """
    kind = event.get("event")
    # The stream carries token counts per answer; the cost in dollars comes only with the
    # result line, so the running figure is tokens.
    tokens = f" [{event['tokens']:,} tokens so far]" if event.get("tokens") else ""
    if kind == "init":
        return f"session {event.get('session_id')} started (model {event.get('model') or '?'})"
    if kind == "tool":
        detail = f": {event['detail']}" if event.get("detail") else ""
        return f"turn {event.get('turn')}: {event.get('tool')}{detail}{tokens}"
    if kind == "text":
        return f"turn {event.get('turn')}: {event.get('text')}{tokens}"
    if kind == "result":
        cost = event.get("total_cost_usd")
        turns = event.get("num_turns") or 0
        return (f"finished after {turns} turn{'' if turns == 1 else 's'}, cost "
                f"${cost if cost is not None else '?'}"
                + (" (error)" if event.get("is_error") else ""))
    if kind == "restart":
        return str(event.get("reason"))
    if kind in ("api_retry", "rate_limit"):
        from pmtool.failure_policy import describe_retry

        return describe_retry(event.get("raw") or {})
    return None


def parse_stream(lines: Iterable[str], role: str | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Read a whole stream-json transcript (e.g. a log file); answer `StreamParser.summary`."""
    parser = StreamParser(role)
    for line in lines:
        for event in parser.feed(line):
            if progress:
                progress(event)
    return parser.summary()


__all__ = [
    "Progress",
    "StreamParser",
    "describe_event",
    "parse_stream",
]

"""A stand-in agent that follows pmtool's --agent-cmd contract (see pmtool.agent.claude).

    pmtool exec-claude --agent-id dev_001 --agent-cmd "python -m pmtool.testing.fake_agent"

It reads the prompt on stdin, writes ``notes/task-<id>.md`` (QA: ``notes/task-<id>-qa.md``)
in its working directory, commits that file with git on the branch that is checked out,
and prints Claude Code-shaped stream-json lines: ``system``/``init``, an ``assistant``
tool call and its ``user`` tool result per step, and a ``result`` line whose
``structured_output`` is the verdict (``done``; ``pass`` for QA), with ``session_id`` =
``$PMTOOL_SESSION_ID`` and a tiny ``total_cost_usd``. The role is ``$PMTOOL_ROLE``, else
the ``Role:`` line of the prompt; the task id ``$PMTOOL_TASK_ID``, else ``Task N:``.

Knobs for tests and the demo (environment):

- ``PMTOOL_FAKE_AGENT_OUTCOME``: force the outcome (any word; ``none`` gives no verdict).
- ``PMTOOL_FAKE_AGENT_VERDICT``: ``structured`` (default), ``line`` (a ``PMTOOL_VERDICT:``
  line in the final text instead) or ``none``.
- ``PMTOOL_FAKE_AGENT_SLEEP``: seconds to sleep after the first step (after its lines are
  printed), so that a caller can time out, stop or kill a run in the middle.
- ``PMTOOL_FAKE_AGENT_EXIT``: the exit code (default 0; non-zero also sets ``is_error``).
- ``PMTOOL_FAKE_AGENT_NO_COMMIT=1``: write the file but do not commit it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

COST_PER_TURN = 0.0001
IDENTITY = ["-c", "user.name=pmtool fake agent", "-c", "user.email=fake-agent@pmtool.invalid"]


def command() -> str:
    """The --agent-cmd value that runs this agent with the current interpreter."""
    return shlex.join([sys.executable, "-m", "pmtool.testing.fake_agent"])


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _role(prompt: str) -> str:
    role = os.environ.get("PMTOOL_ROLE")
    if role:
        return role
    match = re.search(r"^\W*Role:\s*([a-z_]+)", prompt, re.MULTILINE)
    return match.group(1) if match else "backend_dev"


def _task_id(prompt: str) -> str:
    task_id = os.environ.get("PMTOOL_TASK_ID")
    if task_id:
        return task_id
    match = re.search(r"^Task (\S+?):", prompt, re.MULTILINE)
    return match.group(1) if match else "adhoc"


def _title(prompt: str) -> str:
    match = re.search(r"^Task \S+?: (.+)$", prompt, re.MULTILINE)
    return match.group(1).strip() if match else "(untitled)"


class _Session:
    """Prints the stream-json lines of one fake session."""

    def __init__(self, session_id: str, model: str) -> None:
        self.session_id, self.model = session_id, model
        self.turns = 0

    def tool(self, name: str, args: dict[str, Any], run: Any) -> str:
        """One turn: the assistant's tool call, then the tool's result."""
        self.turns += 1
        tool_id = f"toolu_fake{self.turns:02d}{uuid.uuid4().hex[:8]}"
        _emit({"type": "assistant", "session_id": self.session_id, "message": {
            "id": f"msg_fake{self.turns:02d}", "type": "message", "role": "assistant",
            "model": self.model, "content": [
                {"type": "tool_use", "id": tool_id, "name": name, "input": args}],
            "usage": {"input_tokens": 100 * self.turns, "output_tokens": 20}}})
        output, failed = run()
        _emit({"type": "user", "session_id": self.session_id, "message": {
            "role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                         "content": output, "is_error": failed}]}})
        return output

    def text(self, text: str) -> None:
        self.turns += 1
        _emit({"type": "assistant", "session_id": self.session_id, "message": {
            "id": f"msg_fake{self.turns:02d}", "type": "message", "role": "assistant",
            "model": self.model, "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": 100 * self.turns, "output_tokens": 20}}})


def _git(cwd: Path, *args: str) -> tuple[str, bool]:
    try:
        out = subprocess.run(["git", *IDENTITY, *args], cwd=cwd, capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc), True
    return (out.stdout + out.stderr).strip() or "(no output)", out.returncode != 0


def main() -> int:
    started = time.monotonic()
    prompt = sys.stdin.read()
    cwd = Path.cwd()
    role = _role(prompt)
    task_id = _task_id(prompt)
    session_id = os.environ.get("PMTOOL_SESSION_ID") or str(uuid.uuid4())
    model = os.environ.get("PMTOOL_MODEL") or "fake-model"
    resumed = bool(os.environ.get("PMTOOL_RESUME"))
    exit_code = int(os.environ.get("PMTOOL_FAKE_AGENT_EXIT") or 0)
    outcome = os.environ.get("PMTOOL_FAKE_AGENT_OUTCOME") or ("pass" if role == "qa" else "done")
    how = os.environ.get("PMTOOL_FAKE_AGENT_VERDICT") or "structured"
    if outcome == "none":
        how = "none"

    session = _Session(session_id, model)
    _emit({"type": "system", "subtype": "init", "session_id": session_id, "cwd": str(cwd),
           "model": model, "tools": ["Write", "Bash"], "agent": "pmtool-fake-agent"})

    rel = Path("notes") / (f"task-{task_id}-qa.md" if role == "qa" else f"task-{task_id}.md")
    path = cwd / rel
    line = (f"- {time.strftime('%Y-%m-%dT%H:%M:%S')} {role} "
            f"{'resumed' if resumed else 'worked on'} task {task_id}: {_title(prompt)} "
            f"(session {session_id})\n")

    def write() -> tuple[str, bool]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            if fh.tell() == 0:
                fh.write(f"# Task {task_id}\n\n")
            fh.write(line)
        return f"Wrote {rel}", False

    session.tool("Write", {"file_path": str(rel), "content": line}, write)

    sleep = float(os.environ.get("PMTOOL_FAKE_AGENT_SLEEP") or 0)
    if sleep > 0:
        time.sleep(sleep)

    committed = False
    if not os.environ.get("PMTOOL_FAKE_AGENT_NO_COMMIT"):
        message = f"task {task_id}: {role} notes (fake agent)"
        out = session.tool(
            "Bash", {"command": f"git add {shlex.quote(str(rel))} && git commit -q -m "
                                f"{shlex.quote(message)}", "description": "Commit the notes"},
            lambda: _commit(cwd, rel, message))
        committed = not out.startswith("error:")

    summary = (f"{'Reviewed' if role == 'qa' else 'Worked on'} task {task_id} and "
               f"{'committed' if committed else 'wrote'} {rel}.")
    verdict = {"outcome": outcome, "summary": summary}
    if how == "line":
        final = f"Finished.\nPMTOOL_VERDICT: {outcome} {summary}"
    elif how == "structured":
        final = json.dumps(verdict)
    else:
        final = "Finished, without a verdict."
    session.text(final)
    result: dict[str, Any] = {
        "type": "result", "subtype": "success", "is_error": exit_code != 0,
        "api_error_status": None, "duration_ms": int((time.monotonic() - started) * 1000),
        "num_turns": session.turns, "result": final, "stop_reason": "end_turn",
        "session_id": session_id, "total_cost_usd": round(COST_PER_TURN * session.turns, 6),
        "usage": {"input_tokens": 100 * session.turns, "output_tokens": 20 * session.turns},
        "modelUsage": {model: {"costUSD": round(COST_PER_TURN * session.turns, 6)}},
    }
    if how == "structured":
        result["structured_output"] = verdict
    _emit(result)
    return exit_code


def _commit(cwd: Path, rel: Path, message: str) -> tuple[str, bool]:
    out, failed = _git(cwd, "add", "--", str(rel))
    if failed:
        return f"error: git add: {out}", True
    out, failed = _git(cwd, "commit", "-q", "-m", message, "--", str(rel))
    if failed:
        return f"error: git commit: {out}", True
    return out, False


if __name__ == "__main__":
    sys.exit(main())

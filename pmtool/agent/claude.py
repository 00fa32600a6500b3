"""The agent runner: run Claude Code (or another agent) on one task, resume it, and answer
what happened.

This module owns the process: the command line, the environment, the transcript and the
run with resume, and from the settings what a bare task (no record) runs with. What the
agent is asked and how its verdict is read are `pmtool.agent.prompt`'s; what its output
says is `pmtool.agent.stream`'s. The library never prints: progress goes to a callback,
the outcome comes back as an `AgentResult`.

The run
-------
`run_agent` starts ``claude -p --model M --output-format stream-json --verbose --session-id
UUID <permission flags> --json-schema VERDICT [--max-budget-usd N]`` with the prompt on
stdin, started and owned by `pmtool.procs` (its own session, a mark in its environment,
SIGTERM when pmtool dies), so a time limit ends the whole process tree, even what the
agent's Bash tool started with ``setsid``. Every stdout line goes to the transcript
``<state>/logs/task-<id>-<session>.jsonl`` (the child's stderr to ``...stderr.log`` next to
it); ``--resume`` runs append to the same files. The session id is chosen before the start,
so a caller can record it first and a crash can be resumed (`run_for_record` does exactly
that for an agent's task record).

The --agent-cmd contract (any agent CLI in place of claude)
-----------------------------------------------------------
``agent_cmd`` is a command line (split like a shell would, no shell involved); nothing is
appended to it. The command:

- runs in the task's working directory, in its own session, and gets the full task prompt
  on stdin (also when resuming: an agent that cannot resume simply starts over);
- finds in its environment ``PMTOOL_TASK_ID``, ``PMTOOL_SESSION_ID`` (the id to report),
  ``PMTOOL_MODEL``, ``PMTOOL_ROLE``, ``PMTOOL_BRANCH``, ``PMTOOL_RESUME`` (the session id
  when this run continues an earlier one, else unset), ``PMTOOL_VERDICT_SCHEMA`` (the JSON
  schema of the verdict) and ``PMTOOL_MAX_BUDGET_USD`` (when a cap was given);
- prints JSON lines in Claude Code's stream-json shape: optionally ``{"type": "system",
  "subtype": "init", "session_id": ...}``, ``assistant``/``user`` messages (tool calls are
  ``tool_use`` blocks in ``message.content``), and at the end one ``{"type": "result",
  "is_error": false, "session_id": ..., "num_turns": N, "total_cost_usd": X,
  "result": "<final text>", "structured_output": {"outcome": ..., "summary": ...}}``
  (or a ``PMTOOL_VERDICT:`` line in ``result``);
- exits 0 when it ran to the end. Lines that are not JSON are kept in the log and ignored.

`pmtool.testing.fake_agent` is a small agent that follows this contract.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pmtool.agent.options import AgentOptions
from pmtool.agent.prompt import VERDICT_PREFIX, build_prompt, role_file, verdict_schema
from pmtool.agent.result import AgentResult
from pmtool.agent.stream import Progress, StreamParser, _short
from pmtool.config import ROLES
from pmtool.errors import ClaudeMissing, UsageError, disk_fault
from pmtool.failure_policy import (
    AUTH,
    BUDGET,
    KILLED,
    MAX_TURNS,
    OK,
    OVERLOADED,
    RATE_LIMIT,
    classify,
)
from pmtool.models import task_level

if TYPE_CHECKING:
    from pmtool.config import Settings

# Variables the agent never gets: it does not talk to the Headless PM server (pmtool
# reports for it), so it has no use for the key, and an agent that runs `env` would put it
# into the transcript. CLAUDECODE=1 (set inside a Claude Code session) makes a nested
# `claude` refuse to start.
DROPPED_ENV = ("HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM", "CLAUDECODE")
# Values scrubbed from the transcript and stderr logs when the environment has them.
SECRET_ENV = ("HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM", "ANTHROPIC_API_KEY",
              "ANTHROPIC_AUTH_TOKEN")
STDERR_TAIL = 20  # lines of the agent's stderr kept for the error message
READER_GRACE = 3.0  # seconds to wait for the last output after the agent exited


# -- the command -----------------------------------------------------------------------------


def permission_flags(permission_mode: str | None, allowed_tools: str | None) -> list[str]:
    """`--dangerously-skip-permissions`, or `--permission-mode M --allowedTools T...`."""
    mode = permission_mode or "bypassPermissions"
    if mode == "bypassPermissions":
        return ["--dangerously-skip-permissions"]
    flags = ["--permission-mode", mode]
    tools = [t.strip() for t in (allowed_tools or "").split(",") if t.strip()]
    if tools:
        flags += ["--allowedTools", *tools]
    return flags


def claude_command(claude: str, model: str, session_id: str, *, resume: bool = False,
                   role: str | None = None, permission_mode: str | None = None,
                   allowed_tools: str | None = None,
                   max_budget_usd: float | None = None,
                   max_turns: int | None = None) -> list[str]:
    """The argv of one claude run; the prompt goes on stdin."""
    cmd = [claude, "-p", "--model", model, "--output-format", "stream-json", "--verbose"]
    cmd += ["--resume", session_id] if resume else ["--session-id", session_id]
    # --allowedTools takes several values: the next flag (--json-schema) ends the list.
    cmd += permission_flags(permission_mode, allowed_tools)
    cmd += ["--json-schema", json.dumps(verdict_schema(role), separators=(",", ":"))]
    if max_budget_usd is not None:
        cmd += ["--max-budget-usd", f"{max_budget_usd:g}"]
    if max_turns is not None:
        cmd += ["--max-turns", str(max_turns)]
    return cmd


def agent_env(base: Mapping[str, str] | None, *, mark: str, task_id: Any, session_id: str,
              model: str, role: str | None, branch: str | None, resume: bool,
              max_budget_usd: float | None) -> dict[str, str]:
    """The agent's environment: ours minus the Headless PM key, plus the run's PMTOOL_*."""
    from pmtool import procs

    # The contract's variables are set from this run only: none may leak in from a pmtool
    # (or hook) that runs us inside another task's environment.
    contract = ("PMTOOL_RESUME", "PMTOOL_ROLE", "PMTOOL_BRANCH", "PMTOOL_MAX_BUDGET_USD")
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in DROPPED_ENV and k not in contract}
    env.update({procs.MARK_ENV: mark, "PMTOOL_TASK_ID": str(task_id),
                "PMTOOL_SESSION_ID": session_id, "PMTOOL_MODEL": model,
                "PMTOOL_VERDICT_SCHEMA": json.dumps(verdict_schema(role))})
    if role:
        env["PMTOOL_ROLE"] = role
    if branch:
        env["PMTOOL_BRANCH"] = branch
    if resume:
        env["PMTOOL_RESUME"] = session_id
    if max_budget_usd is not None:
        env["PMTOOL_MAX_BUDGET_USD"] = f"{max_budget_usd:g}"
    # claude refuses --dangerously-skip-permissions as root unless IS_SANDBOX=1; a root
    # runner (containers, CI) is exactly that case. Only "1" counts for claude (measured:
    # "true"/"yes"/"on" are refused), so a truthy spelling is normalised; an explicit "0",
    # "false" or "no" is the operator's choice and stays.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        current = env.get("IS_SANDBOX", "").strip().lower()
        if current not in ("0", "false", "no", "off"):
            env["IS_SANDBOX"] = "1"
    return env


def log_paths(log_dir: str | Path, task_id: Any, session_id: str) -> tuple[Path, Path]:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(task_id))
    folder = Path(log_dir)
    return (folder / f"task-{safe}-{session_id}.jsonl",
            folder / f"task-{safe}-{session_id}.stderr.log")


def _redactor(secrets: Iterable[str | None]) -> Callable[[str], str]:
    values = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def redact(text: str) -> str:
        for value in values:
            text = text.replace(value, "<redacted>")
        return text

    return redact


class _Run:
    """One child process: its output pumped into logs and the parser, its end awaited."""

    def __init__(self, parser: StreamParser, log: IO[str], err_log: IO[str],
                 redact: Callable[[str], str], progress: Progress | None) -> None:
        self.parser, self.log, self.err_log = parser, log, err_log
        self.redact, self.progress = redact, progress
        self.last_output = time.monotonic()
        self.stderr_tail: list[str] = []
        self._lock = threading.Lock()
        self.log_error: OSError | None = None  # the first write that failed (a full disk)

    def write(self, fh: IO[str], text: str) -> None:
        """Into a log, unless a write failed: the pumps go on draining the agent's output
        (or it would block on a full pipe) and feeding the parser, whatever the disk does."""
        if self.log_error is not None:
            return
        try:
            fh.write(text)
            fh.flush()
        except OSError as exc:
            self.log_error = exc

    def pump_stdout(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.last_output = time.monotonic()
            line = self.redact(raw.decode("utf-8", errors="replace"))
            with self._lock:
                self.write(self.log, line if line.endswith("\n") else line + "\n")
            for event in self.parser.feed(line):
                if self.progress:
                    with contextlib.suppress(Exception):  # a broken callback must not stop us
                        self.progress(event)

    def pump_stderr(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = self.redact(raw.decode("utf-8", errors="replace"))
            with self._lock:
                self.write(self.err_log, line)
            self.stderr_tail = [*self.stderr_tail[-(STDERR_TAIL - 1):], line.rstrip()]


@contextlib.contextmanager
def _closing_logs(log_path: Path, err_path: Path) -> Iterator[tuple[IO[str], IO[str]]]:
    """The run's transcript and stderr log, closed at the end even when their last bytes
    cannot be written (a full disk: the pump has noted it, `_run_once` reports it)."""
    from pmtool.state import open_private

    log = open_private(log_path)
    try:
        err_log = open_private(err_path)
    except BaseException:
        with contextlib.suppress(OSError):
            log.close()
        raise
    try:
        yield log, err_log
    finally:
        for fh in (log, err_log):
            with contextlib.suppress(OSError):
                fh.close()


def _session_taken(answer: Mapping[str, Any]) -> bool:
    """claude refused `--session-id` because a session file of that id exists."""
    return "is already in use" in json.dumps(answer.get("error"), default=str)


def _no_conversation(parser: StreamParser) -> bool:
    """claude --resume of a session it has no transcript of (it crashed before saving any)."""
    result = parser.result or {}
    text = json.dumps([result.get("errors"), result.get("result")], default=str)
    return bool(result.get("is_error")) and "No conversation found" in text


@dataclass(frozen=True)
class AgentRun:
    """One run of the agent: everything `run_agent` needs to know, in one value.

    `prompt` is sent on stdin; with `resume`, `session_id` continues with `resume_prompt`
    (claude: --resume). `claude_bin` runs claude, `agent_cmd` (a command line) any agent
    that follows the --agent-cmd contract instead. `timeout` / `idle_timeout` (seconds
    without a line of output) end the whole process tree; `grace` is the SIGTERM-to-SIGKILL
    wait. `env` replaces os.environ as the base environment; `secrets` are scrubbed from
    the logs. Build one with `dataclasses.replace` to vary a field.
    """

    prompt: str
    cwd: str | Path
    model: str
    log_dir: str | Path
    role: str | None = None
    task_id: Any = None
    session_id: str | None = None
    resume: bool = False
    resume_prompt: str | None = None
    claude_bin: str | None = None
    agent_cmd: str | None = None
    permission_mode: str | None = "bypassPermissions"
    allowed_tools: str | None = None
    max_budget_usd: float | None = None
    max_turns: int | None = None
    timeout: float | None = None
    idle_timeout: float | None = None
    branch: str | None = None
    env: Mapping[str, str] | None = None
    secrets: tuple[str | None, ...] = ()
    grace: float = 3.0


def run_agent(run: AgentRun, *, progress: Progress | None = None,
              stop_event: threading.Event | None = None,
              on_start: Callable[[dict[str, Any]], None] | None = None) -> AgentResult:
    """Do `run` once; answer what happened (never raises for the agent's sake).

    If claude has no transcript of a resumed session (it died before writing one), the full
    prompt starts it afresh under the same id. Setting `stop_event` ends the whole process
    tree, as a time limit does. `on_start` is called with `{"pid", "mark", "session_id",
    "log"}` once the child runs. Leftover processes of the agent (marked or adopted ones
    still running after it exited) are ended; `swept` lists every pid pmtool had to signal
    (on a time limit, a stop, or for such leftovers).

    Answers an AgentResult (`ok`, `exit_code`, `signal`, `timed_out`, `timed_out_by`,
    `stopped`, `session_id`, `model`, `model_used`, `num_turns`, `total_cost_usd`,
    `duration_s`, `outcome`, `summary`, `verdict_source`, `is_error`, `api_error_status`,
    `resumed`, `log`, `stderr_log`, `tool_calls`, `swept`, `stop`) and, when not ok, `error`
    (`{"type", "message", "stop"}`). `exit_code` is 124 when a time limit ended the agent,
    128+N when signal N did (`signal` names it). Raises UsageError when the agent cannot
    be started at all.
    """
    if run.session_id is None:
        run = replace(run, session_id=str(uuid.uuid4()))
    session_id = run.session_id
    assert session_id is not None
    base_cmd: list[str] = []
    if run.agent_cmd is not None:
        try:
            base_cmd = shlex.split(run.agent_cmd)
        except ValueError as exc:
            raise UsageError(f"--agent-cmd cannot be split: {exc}") from None
        if not base_cmd:
            raise UsageError("--agent-cmd is empty")
    elif not run.claude_bin:
        raise UsageError("no claude binary to run",
                         hint="install Claude Code or set PMTOOL_CLAUDE_BIN")
    if not Path(run.cwd).is_dir():
        raise UsageError(f"working directory {run.cwd} does not exist")

    log_path, err_path = log_paths(run.log_dir,
                                   run.task_id if run.task_id is not None else "adhoc",
                                   session_id)
    from pmtool.state import make_dir

    make_dir(log_path.parent)  # 0700 also when exec-claude runs before any `pmtool run`
    redact = _redactor([*run.secrets,
                        *((run.env or os.environ).get(k) for k in SECRET_ENV)])
    started = time.monotonic()
    deadline = started + run.timeout if run.timeout and run.timeout > 0 else None
    answer: dict[str, Any] = {}
    attempts = [run.resume, False] if run.resume and run.agent_cmd is None else [run.resume]
    restarted = renamed = False
    for resuming in attempts:  # grows by one fresh start under a new id, at most
        if run.agent_cmd is not None:
            cmd, stdin_text = base_cmd, run.prompt
        else:
            assert run.claude_bin is not None
            cmd = claude_command(run.claude_bin, run.model, session_id, resume=resuming,
                                 role=run.role, permission_mode=run.permission_mode,
                                 allowed_tools=run.allowed_tools,
                                 max_budget_usd=run.max_budget_usd,
                                 max_turns=run.max_turns)
            stdin_text = (run.resume_prompt or run.prompt) if resuming else run.prompt
        answer, parser = _run_once(
            run, cmd, stdin_text, resume=resuming, deadline=deadline, log_path=log_path,
            err_path=err_path, progress=progress, stop_event=stop_event, on_start=on_start,
            redact=redact)
        if restarted and not renamed and _session_taken(answer):
            # claude keeps a session file with no conversation in it (a kill cut it short
            # before the prompt): that id cannot start afresh, a new one can.
            renamed = True
            run = replace(run, session_id=str(uuid.uuid4()))
            session_id = str(run.session_id)
            attempts.append(False)
            continue
        if not (resuming and run.agent_cmd is None and _no_conversation(parser)):
            break
        restarted = True
        if progress:
            with contextlib.suppress(Exception):
                progress({"event": "restart", "reason": "claude has no transcript of session "
                                                        f"{session_id}; starting it afresh"})
    answer["duration_s"] = round(time.monotonic() - started, 3)
    if restarted:
        # The earlier process died before claude saved anything of the session (e.g. killed
        # right after the record got the id): nothing to continue, so the task starts over.
        answer["note"] = (f"claude had no transcript of session {session_id}; the task "
                          "started afresh under the same session id") if not renamed else (
            "claude had no conversation in the recorded session; the task started afresh "
            f"under a new session id, {session_id}")
    return AgentResult.from_json(answer)


def _run_once(run: AgentRun, cmd: list[str], stdin_text: str, *, resume: bool,
              deadline: float | None, log_path: Path, err_path: Path,
              progress: Progress | None, stop_event: threading.Event | None,
              on_start: Callable[[dict[str, Any]], None] | None,
              redact: Callable[[str], str]) -> tuple[dict[str, Any], StreamParser]:
    from pmtool import procs
    from pmtool.records import now_iso

    session_id = str(run.session_id)
    mark = procs.new_mark(f"agent-{run.task_id}")
    child_env = agent_env(run.env, mark=mark,
                          task_id=run.task_id if run.task_id is not None else "",
                          session_id=session_id, model=run.model, role=run.role,
                          branch=run.branch, resume=resume, max_budget_usd=run.max_budget_usd)
    parser = StreamParser(run.role)
    # Transcripts hold the task's text and the agent's work: 0600 in a 0700 folder.
    with _closing_logs(log_path, err_path) as (log, err_log):
        log.write(json.dumps({"type": "pmtool", "event": "start", "at": now_iso(),
                              "session_id": session_id, "resume": resume, "model": run.model,
                              "cwd": str(run.cwd), "argv0": cmd[0]}) + "\n")
        log.flush()
        pump = _Run(parser, log, err_log, redact, progress)
        try:
            # The prompt goes through a file (procs.start): a pipe could fill up while the
            # agent is not yet reading it, and a file needs no writer thread. SIGTERM, not
            # SIGKILL, when pmtool dies: claude writes the last of its session transcript on
            # the way out (measured: after a SIGKILL the resume found no conversation).
            child = procs.start(cmd, stdin=stdin_text, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=run.cwd, env=child_env, mark=mark,
                                parent_death=signal.SIGTERM)
        except OSError as exc:
            error = UsageError if run.agent_cmd is not None else ClaudeMissing
            raise error(f"cannot start the agent {cmd[0]}: {exc.strerror or exc}",
                        hint="check PMTOOL_CLAUDE_BIN or --agent-cmd") from None
        with child:
            readers = [threading.Thread(target=pump.pump_stdout, args=(child.popen.stdout,),
                                        daemon=True),
                       threading.Thread(target=pump.pump_stderr, args=(child.popen.stderr,),
                                        daemon=True)]
            for reader in readers:
                reader.start()
            if on_start:
                on_start({"pid": child.pid, "mark": mark, "session_id": session_id,
                          "log": str(log_path)})
            ending = child.wait(deadline=deadline, idle_timeout=run.idle_timeout,
                                last_activity=lambda: pump.last_output, stop=stop_event,
                                grace=run.grace)
            for reader in readers:
                reader.join(READER_GRACE)
            # Whatever the agent left running (a dev server its Bash tool started, a
            # detached watcher) belongs to a run that is over: end it, so tasks do not pile
            # them up.
            if child.leftovers():
                child.end(grace=run.grace)
                for reader in readers:
                    reader.join(READER_GRACE)  # a leftover may have held our pipes open
        swept = sorted(child.swept)
        pump.write(log, json.dumps({"type": "pmtool", "event": "end", "at": now_iso(),
                                    "exit_code": ending.exit_code, "signal": ending.signal,
                                    "timed_out_by": ending.timed_out_by,
                                    "stopped": ending.stopped, "swept": swept}) + "\n")
    if pump.log_error is not None:
        # The transcript is cut short (the verdict may be in it no more): a machine fault,
        # never a result (the runner gives the task back uncounted, or stops resumable).
        raise disk_fault(pump.log_error, log_path.parent) or pump.log_error

    info = parser.summary()
    answer: dict[str, Any] = {
        "ok": False,
        "exit_code": ending.exit_code,
        "signal": ending.signal,
        "timed_out": ending.timed_out,
        "timed_out_by": ending.timed_out_by,
        "stopped": ending.stopped,
        "session_id": info["session_id"] or session_id,
        "model": run.model,
        "model_used": info["model_used"],
        "num_turns": info["num_turns"],
        "total_cost_usd": info["total_cost_usd"],
        "duration_s": None,
        "outcome": info["outcome"],
        "summary": info["summary"],
        "verdict_source": info["verdict_source"],
        "is_error": info["is_error"],
        "api_error_status": info["api_error_status"],
        "resumed": resume,
        "log": str(log_path),
        "stderr_log": str(err_path),
        "tool_calls": info["tool_calls"],
        "swept": swept,
    }
    answer["ok"] = (ending.exit_code == 0 and not info["is_error"]
                    and info["outcome"] is not None and not ending.timed_out
                    and not ending.stopped)
    stop = classify(parser.result, parser.stops, exit_code=ending.exit_code,
                    timed_out_by=ending.timed_out_by, stopped=ending.stopped,
                    stderr="\n".join(pump.stderr_tail),
                    has_verdict=info["outcome"] is not None, timeout_s=run.timeout,
                    idle_s=run.idle_timeout)
    if answer["ok"]:
        stop = replace(stop, kind=OK, message="finished")
    answer["stop"] = stop.to_json()
    if not answer["ok"]:
        answer["error"] = _failure(answer, info, pump.stderr_tail, run.idle_timeout)
        if stop.kind in (BUDGET, AUTH, RATE_LIMIT, OVERLOADED, MAX_TURNS, KILLED):
            answer["error"] = {"type": stop.kind, "message": stop.message}
        answer["error"]["stop"] = stop.kind
    return answer, parser


def _failure(answer: dict[str, Any], info: dict[str, Any], stderr_tail: list[str],
             idle_timeout: float | None) -> dict[str, Any]:
    """The error object of a run that was not ok: the first reason that applies."""
    if answer["timed_out_by"] == "idle_timeout":
        return {"type": "timeout", "message": f"the agent was silent for {idle_timeout:g}s "
                                              "(--idle-timeout); its process tree was ended"}
    if answer["timed_out"]:
        return {"type": "timeout", "message": "the agent ran past its time limit; its process "
                                              "tree was ended",
                "hint": "raise --timeout / HEADLESS_PM_CLAUDE_TIMEOUT, or resume with --resume"}
    if answer["stopped"]:
        return {"type": "interrupted", "message": "the agent was stopped; its process tree was "
                                                  "ended", "hint": "continue with --resume"}
    stderr = " | ".join(line for line in stderr_tail[-3:] if line)
    if not info["has_result"]:
        message = f"the agent exited {answer['exit_code']} without a result line"
        return {"type": "failed", "message": message + (f": {_short(stderr, 300)}" if stderr
                                                        else "")}
    if info["is_error"] or answer["exit_code"] != 0:
        text = info["result_text"] or stderr or "no details"
        return {"type": "failed", "message": f"the agent failed (exit {answer['exit_code']}): "
                                             f"{_short(text, 300)}"}
    return {"type": "failed", "message": info["verdict_error"] or "the agent gave no verdict",
            "hint": "the agent must end with the StructuredOutput tool or a "
                    f"{VERDICT_PREFIX} line"}


# -- runs of a task -------------------------------------------------------------------------------


def current_branch(cwd: str | Path) -> str | None:
    """The branch checked out in `cwd`, None if detached or not a git checkout."""
    from pmtool import git

    return git.current_branch(cwd)


def repo_or_cwd(path: str | Path | None = None) -> Path:
    """The top of the git checkout that `path` (default: the current directory) is in, else
    `path` itself."""
    from pmtool import git

    here = Path(path or os.getcwd()).expanduser().resolve()
    return git.toplevel(here) or here


def fetch_instructions_path(settings: Settings, timeout: float = 3.0) -> str | None:
    """The server's `instructions_path` (/api/v1/context), None when it cannot be had.

    Only a hint for finding role files: an unreachable server must not stop a run.
    """
    from pmtool.client import PMClient
    from pmtool.errors import PmtoolError

    client = PMClient(settings.api_url, settings.api_key,
                      timeout=min(timeout, settings.http_timeout), retries=0)
    try:
        path = (client.context() or {}).get("instructions_path")
    except (PmtoolError, AttributeError):
        return None
    finally:
        client.close()
    return path if isinstance(path, str) and path else None


def task_role(task: Mapping[str, Any], role: str | None = None) -> str:
    """The role a task runs as: `role`, else the task's target_role; UsageError if neither
    is a known role."""
    chosen = role or task.get("target_role")
    if chosen not in ROLES:
        raise UsageError(f'unknown role "{chosen}"' if chosen else "give --role",
                         hint="valid roles: " + ", ".join(ROLES), valid=list(ROLES))
    return str(chosen)


def plan_for_task(task: Mapping[str, Any], settings: Settings,
                  options: AgentOptions = AgentOptions(), *,
                  role: str | None = None) -> dict[str, Any]:
    """Where, how and with which prompt a bare task object (no record) would run.

    `{"prompt", "role", "cwd", "branch", "model", "notes", "instructions_dir",
    "context_instructions_path"}`; no side effects beyond asking the server where its
    instruction files are, and only when the answer could matter.
    """
    run_role = task_role(task, role)
    run_cwd = Path(options.cwd).expanduser() if options.cwd else repo_or_cwd()
    if not run_cwd.is_dir():
        raise UsageError(f"working directory {run_cwd} does not exist")
    branch, note = branch_for(run_cwd, task.get("branch"), task.get("complexity"))
    instructions_dir = options.instructions_dir or settings.instructions_dir
    ctx_path = context_path(settings, options, run_role)
    text = options.prompt or build_prompt(task, run_role, run_cwd, branch, instructions_dir,
                                          ctx_path, options.template)
    return {"prompt": text, "role": run_role, "cwd": run_cwd, "branch": branch,
            "model": options.model or settings.model_for(task_level(task)),
            "notes": [note] if note else [], "instructions_dir": instructions_dir,
            "context_instructions_path": ctx_path}


def context_path(settings: Settings, options: AgentOptions,
                 role: str) -> str | Path | None:
    """Where the server keeps its instruction files (`options.context_instructions_path`,
    else asked from /api/v1/context), only when the answer could matter: no --prompt-file,
    no <role>.md in the instructions folder."""
    given = options.context_instructions_path
    if given is not None or options.prompt is not None \
            or role_file(role, options.instructions_dir or settings.instructions_dir):
        return given
    return fetch_instructions_path(settings)


def need_claude(settings: Settings, options: AgentOptions) -> str | None:
    """The claude binary to run, None when `options.agent_cmd` runs instead; ClaudeMissing
    when claude is to run and cannot be found."""
    from pmtool.agent.binary import find_claude

    if options.agent_cmd is not None:
        return None
    claude = find_claude(settings.claude_bin)
    if not claude:
        raise ClaudeMissing("claude not found",
                            hint="install it (npm install -g @anthropic-ai/claude-code) or "
                                 "set PMTOOL_CLAUDE_BIN")
    return claude


def agent_run(prompt: str, settings: Settings, options: AgentOptions, **run: Any) -> AgentRun:
    """The AgentRun of `prompt` with `options`' caps and the settings' permissions; `run`
    names the rest (cwd, model, role, task_id, branch, log_dir, session, claude_bin...)."""
    if "claude_bin" not in run:
        run["claude_bin"] = need_claude(settings, options)
    return AgentRun(
        prompt, agent_cmd=options.agent_cmd,
        permission_mode=settings.permission_mode, allowed_tools=settings.allowed_tools,
        max_budget_usd=options.max_budget_usd,
        max_turns=options.max_turns if options.max_turns is not None else settings.max_turns,
        timeout=settings.claude_timeout if options.timeout is None else options.timeout,
        idle_timeout=options.idle_timeout, env=options.env, secrets=(settings.api_key,),
        **run)


def run_for_task(task: Mapping[str, Any], settings: Settings,
                 options: AgentOptions = AgentOptions(), *, role: str | None = None,
                 progress: Progress | None = None,
                 stop_event: threading.Event | None = None) -> AgentResult:
    """Run the agent on a bare task object (`exec-claude --task-json`): no record, no
    resume. Answers `run_agent`'s result plus `task_id`, `role`, `cwd`, `branch` and
    `note`. Raises UsageError for a bad role, a missing working directory or no claude."""
    plan = plan_for_task(task, settings, options, role=role)
    run = agent_run(plan["prompt"], settings, options, cwd=plan["cwd"], model=plan["model"],
                    role=plan["role"], task_id=task.get("id"),
                    log_dir=settings.state_path / "logs", branch=plan["branch"])
    answer = run_agent(run, progress=progress, stop_event=stop_event)
    answer.task_id, answer.role, answer.cwd = task.get("id"), plan["role"], str(plan["cwd"])
    answer.branch = plan["branch"]
    answer.add_note(*plan["notes"])
    return answer


def branch_for(cwd: str | Path, expected: str | None,
               complexity: str | None) -> tuple[str | None, str | None]:
    """The branch the agent commits on: the one checked out in `cwd` (that is where commits
    land), else `expected`; and a note when a major task's checkout is on another branch."""
    checked_out = current_branch(cwd)
    note = None
    if checked_out and expected and checked_out != expected and complexity != "minor":
        note = (f"{cwd} is on {checked_out}, not the task's branch {expected}; the agent "
                f"commits on {checked_out}")
    return checked_out or expected, note


__all__ = [
    "AgentOptions",
    "AgentResult",
    "AgentRun",
    "agent_env",
    "branch_for",
    "claude_command",
    "context_path",
    "current_branch",
    "fetch_instructions_path",
    "log_paths",
    "plan_for_task",
    "repo_or_cwd",
    "run_agent",
    "run_for_task",
    "task_role",
]

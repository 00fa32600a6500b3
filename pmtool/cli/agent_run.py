"""Running the agent: `exec-claude`.

The command reads its flags into `pmtool.agent.options.AgentOptions` (through
`pmtool.work.options.agent_options`, as the runner does), calls the one library entry point
`pmtool.work.exec.exec_agent` (or `prompt_preview`), turns signals into a stop request, shows
progress on stderr and emits the answer. The agent's modules are imported inside the command
so that other commands do not pay for them.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pmtool.cli import app, emit, options, read_json_arg, say
from pmtool.cli.options import AGENT_ID_HELP, agent_id_option
from pmtool.errors import EXIT_OK, EXIT_SIGNALS, UsageError, exit_code

if TYPE_CHECKING:
    from collections.abc import Callable

    from pmtool.agent.result import AgentResult


def _read_text(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _progress(event: dict[str, Any]) -> None:
    """The human view of a run, one line per event, on stderr."""
    from pmtool.agent.stream import describe_event

    line = describe_event(event)
    if line:
        say(f"exec-claude: {line}")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[tuple[threading.Event, list[int]]]:
    """Turn SIGINT/SIGTERM/SIGHUP into a stop request for the agent.

    The agent runs in its own session, so a Ctrl-C at the terminal reaches only pmtool:
    pmtool must end the agent's tree itself, and answer what happened.
    """
    stop, seen = threading.Event(), []

    def handler(signum: int, _frame: Any) -> None:
        seen.append(signum)
        stop.set()

    old = {}
    for sig in EXIT_SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            old[sig] = signal.signal(sig, handler)
    try:
        yield stop, seen
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _task_from_json(task_json: str) -> dict[str, Any]:
    data = read_json_arg(task_json, "--task-json")
    task = data.get("task", data) if isinstance(data, dict) else data
    if not isinstance(task, dict) or not task.get("title"):
        raise UsageError("--task-json must be a Headless PM task object (with a title)",
                         hint="e.g. the `task` of `pmtool claim`'s answer")
    return task


@app.command("exec-claude")
def exec_claude_cmd(
    agent_id: Annotated[str | None, typer.Option(
        "--agent-id", callback=agent_id_option,
        help=f"Run the task of this agent's record (its worktree, branch, model and "
             f"session); {AGENT_ID_HELP}.")] = None,
    task_json: Annotated[str | None, typer.Option(
        "--task-json", help="Run this task object instead (file or - for stdin).")] = None,
    cwd: Annotated[str | None, typer.Option(
        "--cwd", help="Working directory [default: the record's worktree, else the git "
                      "checkout of the current directory].")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Model [default: the record's, else `model-for` the task's "
                        "difficulty].")] = None,
    prompt_file: Annotated[str | None, typer.Option(
        "--prompt-file", help="Send this file as the prompt, as it is.")] = None,
    prompt_template: Annotated[str | None, typer.Option(
        "--prompt-template", help="Build the prompt from this template; placeholders such "
                                  "as {title}, {description}, {branch}, {instructions}, "
                                  "{rules}, {verdict}.")] = None,
    instructions_dir: Annotated[str | None, typer.Option(
        "--instructions-dir", help="Folder of <role>.md instruction files [env "
                                   "PMTOOL_INSTRUCTIONS_DIR; then the server's "
                                   "instructions_path; then built-in].")] = None,
    print_prompt: Annotated[bool, typer.Option(
        "--print-prompt", help="Print the prompt (and where it would run) without running "
                               "anything.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the session recorded for --agent-id.")] = False,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=0, help="Seconds before the agent's process tree is ended, exit 124 "
                                 "[env HEADLESS_PM_CLAUDE_TIMEOUT; 0 = none].")] = None,
    idle_timeout: Annotated[float | None, typer.Option(
        "--idle-timeout", min=0, help="End the run when the agent printed nothing for this "
                                      "many seconds (a hung agent), exit 124.")] = None,
    max_budget_usd: Annotated[float | None, typer.Option(
        "--max-budget-usd", min=0, help="Spend cap of this run (claude's own flag).")] = None,
    max_turns: Annotated[int | None, typer.Option(
        "--max-turns", min=1, help="Turn cap of this run (claude's own flag) [env "
                                   "PMTOOL_MAX_TURNS; default: the max_turns setting].")
    ] = None,
    agent_cmd: Annotated[str | None, typer.Option(
        "--agent-cmd", help="Run this agent command instead of claude (the --agent-cmd "
                            "contract: prompt on stdin, PMTOOL_* env, stream-json out).")
    ] = None,
    role: Annotated[str | None, typer.Option(
        "--role", help="Role for --task-json [default: the task's target_role]; with "
                       "--agent-id the record's role.")] = None,
) -> int:
    """Run Claude Code (or --agent-cmd) on a task and report its verdict.

    The prompt is the role's instructions plus the task and the rules of the run; the agent
    ends with a verdict (done/blocked, qa: pass/fail/blocked) as structured output or a
    last line `PMTOOL_VERDICT: <outcome> <summary>`. Progress goes to stderr, the whole
    transcript to <state-dir>/logs/. With --agent-id the session id is written to the
    record before the agent starts, so `--resume` can continue it after a crash.

    Without a verdict, the answer's `next` says what follows (with --agent-id), as `pmtool
    run` decides it: {"step": "resume"} (once per claim), "pause" (a rate limit; `until`),
    "retry" (`model`), "give_back" (`kind`, `reason`: `lock release --kind`) or "fatal";
    the on_agent_failure setting bounds it.

    Exit 0 ok (a verdict was given), 1 the agent failed or gave no verdict, 124 a time
    limit ran out (the whole process tree was ended), 2 bad input, 3 no record for the
    agent, 5 an agent for the record is already running, 130/143 stopped by a signal.

    Example: pmtool exec-claude --agent-id dev_001 --timeout 1800

    Example: pmtool exec-claude --agent-id dev_001 --resume

    Example: pmtool claim ... | jq .task | pmtool exec-claude --task-json - --role qa
    """
    from pmtool.work import exec as agent_exec
    from pmtool.work.options import agent_options, step_limits

    if (agent_id is None) == (task_json is None):
        raise UsageError("give --agent-id or --task-json (one of them)",
                         hint="pmtool exec-claude --agent-id dev_001")
    if resume and agent_id is None:
        raise UsageError("--resume needs --agent-id: the record keeps the session id")
    if prompt_file and prompt_template:
        raise UsageError("give --prompt-file or --prompt-template, not both")
    settings = options().settings(instructions_dir=instructions_dir)
    run = agent_options(settings, cwd=cwd, model=model,
                        prompt=_read_text(prompt_file, "--prompt-file"),
                        template=_read_text(prompt_template, "--prompt-template"),
                        timeout=timeout, idle_timeout=idle_timeout,
                        max_budget_usd=max_budget_usd, max_turns=max_turns,
                        agent_cmd=agent_cmd)
    task = _task_from_json(task_json) if task_json is not None else None
    if print_prompt:
        emit(agent_exec.prompt_preview(settings, run, agent_id=agent_id, task=task, role=role,
                                       resume=resume))
        return EXIT_OK
    with _stop_on_signals() as (stop, seen):
        answer = agent_exec.exec_agent(settings, run, agent_id=agent_id, task=task, role=role,
                                       resume=resume, limits=step_limits(settings),
                                       progress=_progress, stop_event=stop,
                                       on_beat_error=_beat_failed(agent_id or (task or {})
                                                                  .get("locked_by")))
    return _finish(answer, seen)


def _beat_failed(agent_id: str | None) -> "Callable[[Exception], None]":
    """Say a failed heartbeat once on stderr; the agent goes on."""
    said: list[bool] = []

    def failed(exc: Exception) -> None:
        if not said:
            said.append(True)
            say(f"exec-claude: heartbeat for {agent_id} failed: "
                f"{getattr(exc, 'message', exc)} (the agent goes on)")

    return failed


def _finish(answer: "AgentResult", signals: list[int]) -> int:
    """Emit the answer; the exit code says how the run ended."""
    if answer.ok:
        say(f"exec-claude: verdict {answer.outcome}: {answer.summary or ''}".rstrip())
    else:
        error = answer.error or {}
        say(f"pmtool: {error.get('type', 'failed')}: {error.get('message', 'the agent failed')}"
            + (f" (log: {answer.log})" if answer.log else ""))
    emit(answer, ok=answer.ok)
    # The signal that stopped the run is known here, not to the library: it joins the answer
    # only for the exit code (errors.exit_code: 128 + its number), as the run's JSON is out.
    stopped_by = {"signal": signals[0]} if answer.stopped and signals else {}
    return exit_code({**answer.to_json(), **stopped_by})

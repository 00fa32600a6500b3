"""`pmtool run` (the continuous runner) and `pmtool demo`."""

import os
import select
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from pmtool.cli import app, emit, emit_line, options, paint, plural, say, scrub
from pmtool.cli.options import AGENT_ID_HELP, Level, Role, Settle, agent_id_option
from pmtool.errors import UsageError

COLOURS = {"claimed": "36", "resumed": "36", "finished": "32", "error": "31", "idle": "2",
           "stopped": "33", "parked": "33", "agent": "35", "hook": "34", "worktree": "34",
           "health": "2"}


def _progress_view(event: dict[str, Any]) -> str:
    """One readable stderr line per event; coloured on a terminal."""
    kind = event["event"]
    task = f" task {event['task_id']}" if event.get("task_id") else ""
    detail = {
        "claimed": lambda e: e.get("title"),
        "resumed": lambda e: ("same task, session " + e["session_id"] if e.get("session_id")
                              else "same task (no agent session yet)"),
        "hook": lambda e: f"{e.get('hook')} " + ("skipped" if e.get("skipped") else
                                                "ok" if e.get("ok") else
                                                f"FAILED (exit {e.get('exit_code')})"),
        "worktree": lambda e: (f"removed {e.get('path')}" if "removed" in e else
                               f"{e.get('path') or 'repo (minor task)'} on {e.get('branch')}")
        + (f", rescued to {e['rescued']}" if e.get("rescued") else ""),
        "agent": lambda e: f"{e.get('outcome') or 'no verdict'} in "
                           f"{plural(e.get('num_turns') or 0, 'turn')}, "
                           f"${e.get('total_cost_usd') or 0:.4f}"
                           + (" (timed out)" if e.get("timed_out") else ""),
        "finished": lambda e: f"{e.get('outcome')} -> {e.get('status') or e.get('reason')}",
        "parked": lambda e: f"{e.get('cause')}: {e.get('reason')} (status {e.get('status')})",
        "error": lambda e: e["error"]["message"],
        "idle": lambda e: "no task; still looking",
        "stopped": lambda e: f"{plural(e.get('tasks_done') or 0, 'task')} done"
                             + (", record kept for resume" if e.get("record_kept") else ""),
    }.get(kind, lambda e: "")(event)
    stamp = datetime.now().strftime("%H:%M:%S")
    line = f"{stamp} {event.get('agent')}{task} {kind}: {detail or ''}".rstrip(": ")
    return paint(line, COLOURS.get(kind, "0"))


def choice_keys(choices: list[str]) -> dict[str, str]:
    """One key per choice, no two alike: its first letter, else its first letter not yet
    taken (retry, continue, release: r, c, e), so a key never stands for two answers."""
    keys: dict[str, str] = {}
    for choice in choices:
        free = [c for c in choice.lower() if c.isalpha() and c not in keys]
        if not free:
            raise ValueError(f"no free key for {choice}")
        keys[free[0]] = choice
    return keys


def _labelled(choice: str, key: str) -> str:
    at = choice.lower().index(key)
    return f"{choice[:at]}[{choice[at]}]{choice[at + 1:]}"


def _ask_at_terminal(default: str, timeout: float,
                     stopping: Callable[[], bool]) -> Callable[[str, list[str]], str]:
    """The operator prompt: distinct keys, the default shown (Enter takes it), and after
    `timeout` seconds without an answer (0: no limit) the default, which is the policy
    applied when nobody is at a terminal, so an unattended terminal never stalls a runner.
    Ctrl-C while it waits is a stop like any other (task record kept)."""
    from pmtool.run.loop import Stop

    def ask(question: str, choices: list[str]) -> str:
        if default not in choices:
            choices = [*choices, default]
        keys = choice_keys(choices)
        labels = ", ".join(_labelled(choice, key) for key, choice in keys.items())
        wait = f"; {default} by itself in {timeout:g} s" if timeout else ""
        prompt = f"{question}\n  {labels} (Enter: {default}{wait})? "
        deadline = time.monotonic() + timeout if timeout else None
        fd = sys.stdin.fileno()
        while True:
            sys.stderr.write(scrub(prompt))  # the hook's words may hold anything
            sys.stderr.flush()
            while True:  # in slices, to see a stop asked for by a signal
                if stopping():
                    say("")
                    raise Stop
                left = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                if left <= 0:
                    say(f"\nno answer in {timeout:g} s: {default} (--on-hook-failure)")
                    return default
                if select.select([fd], [], [], left)[0]:
                    break
            data = os.read(fd, 1024)
            if not data:  # end of input: nobody is there after all
                return default
            answer = data.decode(errors="replace").strip().lower()
            if not answer:
                return default
            if answer in keys:
                return keys[answer]
            if answer in choices:
                return answer
            say(f"answer {', '.join(keys)} or Enter")

    return ask


@app.command("run")
def run_cmd(
    agent_id: Annotated[list[str], typer.Option(
        "--agent-id", callback=agent_id_option,
        help=f"The agent's id on the server ({AGENT_ID_HELP}); repeat it to run several "
             f"agents in this process.")],
    role: Role,
    level: Level = "senior",
    repo: Annotated[str | None, typer.Option(help="Git repository to work in "
                                                  "[default: the one around the current dir].")
                    ] = None,
    base: Annotated[str | None, typer.Option(help="Base branch for new task branches.")] = None,
    hooks_dir: Annotated[str | None, typer.Option(
        "--hooks-dir", help="Hooks folder [env HEADLESS_PM_HOOKS_DIR].")] = None,
    single_task: Annotated[bool, typer.Option(
        "--single-task", help="Do one task and exit (0), or exit 3 if there is none now.")
    ] = False,
    max_tasks: Annotated[int | None, typer.Option(help="Exit after this many tasks.")] = None,
    heartbeat: Annotated[float | None, typer.Option(
        help="Seconds between re-registrations while the agent works [env PMTOOL_HEARTBEAT, "
             "default 300].")] = None,
    on_agent_failure: Annotated[str | None, typer.Option(
        help="retry (once with --resume, then give back), release, or stop "
             "[env PMTOOL_ON_AGENT_FAILURE, default retry].")] = None,
    on_hook_failure: Annotated[str | None, typer.Option(
        help="When pre_task fails and nobody is at a terminal: release (give the task back "
             "and wait), continue, or stop [env PMTOOL_ON_HOOK_FAILURE, default release].")
    ] = None,
    ask_timeout: Annotated[float | None, typer.Option(
        min=0, help="Seconds the pre_task question at a terminal waits for an answer before "
                    "--on-hook-failure decides [env PMTOOL_ASK_TIMEOUT, default 300; "
                    "0 = no limit].")] = None,
    task_budget_usd: Annotated[float | None, typer.Option(
        help="Park a task once its agent runs have cost this much, over every attempt and "
             "claim on this machine.")] = None,
    escalate: Annotated[bool, typer.Option(
        "--escalate", help="Retry a failed task once on the next stronger model.")] = False,
    agent_cmd: Annotated[str | None, typer.Option(
        help="Run this agent command instead of claude (same contract as exec-claude).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds per agent run [env HEADLESS_PM_CLAUDE_TIMEOUT].")] = None,
    idle_timeout: Annotated[float | None, typer.Option(
        help="End an agent run silent for this many seconds.")] = None,
    max_budget_usd: Annotated[float | None, typer.Option(
        help="Spend cap per agent run (claude's --max-budget-usd).")] = None,
    idle_poll: Annotated[float, typer.Option(
        help="Seconds of looking for work between `idle` events; 0: one look per turn, "
             "pausing between empty looks, `idle` once per idle period.")] = 30.0,
    settle: Settle = 0.3,
    agents: Annotated[int | None, typer.Option(
        "--agents", min=1, help="Run N agents of the role in this process, ids "
                                "<agent-id>-1..N, sharing one poller and connection pool.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(
        help="Claims of one task, at most [env PMTOOL_MAX_ATTEMPTS, default 3].")
    ] = None,
    retry_cooldown: Annotated[float | None, typer.Option(
        help="Seconds before a given-back task is claimed again "
             "[env PMTOOL_RETRY_COOLDOWN, default 60].")] = None,
    max_bounces: Annotated[int | None, typer.Option(
        help="QA fails of one task, at most [env PMTOOL_MAX_BOUNCES, default 3].")
    ] = None,
    max_consecutive_failures: Annotated[int | None, typer.Option(
        help="Failed tasks in a row before the runner backs off "
             "[env PMTOOL_MAX_CONSECUTIVE_FAILURES, default 3].")] = None,
    daily_budget_usd: Annotated[float | None, typer.Option(
        help="This machine's spend per day, at most [env PMTOOL_DAILY_BUDGET_USD].")
    ] = None,
    max_turns: Annotated[int | None, typer.Option(
        help="Claude turns per agent run [env PMTOOL_MAX_TURNS].")] = None,
    poll_interval: Annotated[float | None, typer.Option(
        help="Seconds between this machine's looks for work for the role and level, at "
             "first and again after a task is found [env PMTOOL_POLL_INTERVAL, default 2].")
    ] = None,
    poll_max: Annotated[float | None, typer.Option(
        help="Seconds between looks for work, at most: the poll doubles while idle up to "
             "this [env PMTOOL_POLL_MAX, default 10].")] = None,
    keep_logs: Annotated[float | None, typer.Option(
        help="Reserved: days to keep transcripts and event logs "
             "[env PMTOOL_KEEP_LOGS, default 30].")] = None,
    leftover: Annotated[str | None, typer.Option(
        help="Uncommitted work an agent leaves: commit (on the task branch, a commit of "
             "pmtool's own) or rescue (to a ref, and the task is given back) "
             "[env PMTOOL_LEFTOVER, default commit].")] = None,
    push: Annotated[bool | None, typer.Option(
        "--push/--no-push", help="Push the task branch to the repository's remote before "
                                 "the status is set [env PMTOOL_PUSH, default no].")
    ] = None,
    grace: Annotated[float | None, typer.Option(
        help="Seconds a dead runner's task waits before it is given back "
             "[env PMTOOL_GRACE, default 900].")] = None,
    metrics_addr: Annotated[str | None, typer.Option(
        "--metrics-addr", help="Serve /metrics (Prometheus) and /status (the `pmtool "
                               "status` JSON) of this process's agents on HOST:PORT; a bare "
                               "port is 127.0.0.1:PORT [env PMTOOL_METRICS_ADDR, default: "
                               "off].")] = None,
) -> int:
    """Work tasks for a role continuously: claim, hooks, worktree, claude, finish, repeat.

    Prints one JSON object per line per event (claimed, hook, worktree, agent, finished,
    idle, error, stopped, ...); a readable view goes to stderr. The first Ctrl-C or SIGTERM
    stops after the current step and keeps the task record, so the next start resumes the
    same task and agent session; a second one ends the agent now (record kept).

    Example: pmtool run --role backend_dev --agent-id dev_001 --repo ~/src/app

    Example: pmtool run --role qa --agent-id qa_001 --single-task | jq 'select(.event=="finished")'

    Example: pmtool run --role backend_dev --agent-id dev --agents 4 --repo ~/src/app

    Example: pmtool run --role backend_dev --agent-id dev --agents 10 --metrics-addr 9464
    """
    from pmtool.run.fleet import Fleet, agent_ids
    from pmtool.run.loop import Runner, RunOptions

    ids = agent_ids(agent_id, agents)

    settings = options().settings(
        hooks_dir=hooks_dir, on_agent_failure=on_agent_failure,
        on_hook_failure=on_hook_failure, ask_timeout=ask_timeout, max_attempts=max_attempts,
        retry_cooldown=retry_cooldown, max_bounces=max_bounces,
        max_consecutive_failures=max_consecutive_failures, daily_budget_usd=daily_budget_usd,
        max_turns=max_turns, poll_interval=poll_interval, poll_max=poll_max,
        keep_logs=keep_logs, leftover=leftover, push=push, grace=grace,
        metrics_addr=metrics_addr)
    # Policies and limits are checked by RunOptions itself (UsageError, exit 2).
    opts = [RunOptions.from_settings(
        settings, agent_id=one, role=role, level=level, repo=repo, base=base,
        single_task=single_task, max_tasks=max_tasks, heartbeat=heartbeat,
        task_budget_usd=task_budget_usd, escalate=escalate, agent_cmd=agent_cmd,
        timeout=timeout, idle_timeout=idle_timeout, max_budget_usd=max_budget_usd,
        idle_poll=idle_poll, settle=settle) for one in ids]
    # Prompts only for one agent: several would ask over each other.
    interactive = len(ids) == 1 and sys.stdin.isatty() and sys.stderr.isatty()

    def on_event(event: dict[str, Any]) -> None:
        emit_line(event)
        say(_progress_view(event))

    if settings.ask_timeout < 0:
        raise UsageError(f"ask_timeout must be at least 0, got {settings.ask_timeout:g}")
    addr = settings.values.get("metrics_addr")
    endpoint = _endpoint(addr, settings, ids) if addr else None
    try:
        worker: Runner | Fleet
        if len(ids) == 1:
            ask = _ask_at_terminal(str(opts[0].on_hook_failure), settings.ask_timeout,
                                   stopping=lambda: cast(Runner, worker).stopping.is_set()) \
                if interactive else None
            worker = Runner(settings, opts[0], on_event, progress=lambda m: say(f"  {m}"),
                            ask=ask)
        else:
            worker = Fleet(settings, opts, on_event, progress=lambda m: say(f"  {m}"))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: worker.request_stop())
        if endpoint is not None:
            from pmtool.client import PMClient

            assert endpoint.fold.requests is not None
            if isinstance(worker.client, PMClient):  # the server requests, counted live
                worker.client.observe = endpoint.fold.requests.observe
            endpoint.start()
            say(f"  serving http://{endpoint.addr}/metrics and /status")
        return worker.run()
    finally:
        if endpoint is not None:
            endpoint.close()


def _endpoint(addr: str, settings: Any, ids: list[str]) -> Any:
    """The /metrics and /status server, bound now: a port in use is a usage error (exit 2)
    before anything is claimed. Its failures later are an `error` line and said."""
    from pmtool.records import now_iso
    from pmtool.views.metrics import Endpoint

    def on_error(message: str) -> None:
        emit_line({"ok": False, "event": "error", "time": now_iso(), "agent": None,
                   "task_id": None, "error": {"type": "failed", "message": message}})
        say(paint(f"  {message}", "31"))

    return Endpoint(addr, settings.state_path, ids,
                    daily_budget_usd=settings.values.get("daily_budget_usd"),
                    on_error=on_error)


@app.command("demo")
def demo_cmd(
    agent: Annotated[str, typer.Option(
        help="stand-in (built in, no claude needed) or claude (the real CLI, real model API).")
    ] = "stand-in",
    workdir: Annotated[Path | None, typer.Option(
        help="Folder for the demo's repository and state [default: a new temp folder].")
    ] = None,
) -> int:
    """Run the whole job against the bundled stand-in server, then say where to look.

    Creates a git repository and three tasks' worth of work (a minor and a major developer
    task, then a QA pass over both), runs a developer runner and a QA runner over them, and
    prints the tasks' final status, their commits, and the folders to look in.

    Example: pmtool demo
    """
    from pmtool.run.demo import run_demo

    if agent not in ("stand-in", "claude"):
        raise UsageError(f'--agent "{agent}": use stand-in or claude')
    if workdir and workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"--workdir {workdir} is not empty", hint="give a new folder")
    result = run_demo(workdir, agent, on_event=lambda e: say(_progress_view(e)),
                      progress=lambda m: say(f"  {m}"))
    for task in result["tasks"]:
        say(f"task {task['id']} ({task['complexity']}): {task['status']} on {task['branch']}")
    where = result["where"]
    say(f"look in: {where['repo']} (git log --all), {where['history']}, {where['logs']}")
    ok = result.pop("ok")
    emit(result, ok=ok)
    return 0 if ok else 1

"""Hooks: the user's own scripts, run at fixed points of a task (pre_task, post_task,
worktree_setup, health_check, or any name), with the task context and a time limit.

The contract a hook sees:
- it is found as `NAME`, `NAME.py` or `NAME.sh` in the hooks folder, and must be executable
  (pmtool never changes file modes: a hook someone forgot to chmod is reported, not run);
- the task context arrives as one JSON object on stdin, and its main fields as `PMTOOL_*`
  environment variables (see `ENV_FIELDS`); pmtool never puts the API key in either, and
  takes HEADLESS_PM_API_KEY out of the environment it inherits (unless the setting
  `pass_key_to_hooks` asks for it);
- it is started and owned by pmtool.procs, as the agent is: its own session, a mark in its
  environment, a parent-death signal (Linux), so that on timeout, on Ctrl-C and when the
  runner is killed the whole tree ends, even grandchildren that detached with `setsid`;
- exit 0 is success, anything else a failure; stdout and stderr are kept (the last 64 KiB).
  A hook killed by signal N reports exit_code 128+N and `signal` (its name); a hook that
  ran out of time reports `timed_out: true` and exit_code 124, as timeout(1) does.

The library never prints and never exits: `run_hook` answers a `HookResult`, and the CLI
decides the exit code (0 ok, 1 failed, 124 timed out). `notify` runs the `notify` hook, the
one that tells a person (a task parked or given up, a runner stopped, a budget reached).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pmtool.errors import UsageError
from pmtool.results import Result

# Tried in this order; the first file that exists is the hook.
SUFFIXES = ("", ".py", ".sh")
OUTPUT_CAP = 64 * 1024  # bytes of stdout/stderr kept, from the end (errors are at the end)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NOTIFY_EVENTS = ("parked", "given_up", "fatal", "budget", "finished")

# Environment variable -> where its value comes from in the context (first found wins).
ENV_FIELDS: dict[str, tuple[str, ...]] = {
    "PMTOOL_TASK_ID": ("task_id", "task.id"),
    "PMTOOL_TASK_TITLE": ("title", "task.title"),
    "PMTOOL_AGENT_ID": ("agent_id",),
    "PMTOOL_ROLE": ("role",),
    "PMTOOL_LEVEL": ("level", "task.difficulty"),
    "PMTOOL_WORKTREE": ("worktree",),
    "PMTOOL_BRANCH": ("branch", "task.branch"),
    "PMTOOL_REPO": ("repo",),
    "PMTOOL_BASE": ("base",),
    "PMTOOL_STATE_DIR": ("state_dir",),
    "PMTOOL_API_URL": ("api_url",),
}
MACHINE_FIELDS = ("PMTOOL_STATE_DIR", "PMTOOL_API_URL")
# Never handed to a hook by pmtool, whatever the caller put in the context.
SECRET_KEYS = ("api_key", "key", "x_api_key")
# The Headless PM key's environment names: removed from a hook's environment unless the
# caller passes the key on purpose (setting pass_key_to_hooks). A hook is the user's
# script, but what it starts (a linter, an npm install) is not theirs to trust with it.
KEY_ENV = ("HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM")


def check_name(name: str) -> str:
    """A hook name is a plain file name: no paths, so `hook run ../x` cannot escape."""
    if not NAME_RE.match(name):
        raise UsageError(f'bad hook name "{name}"',
                         hint="a plain name such as pre_task, post_task, worktree_setup")
    return name


def find_hook(name: str, hooks_dir: str | Path | None) -> Path | None:
    """The hook's file (`NAME`, `NAME.py`, `NAME.sh`, first found), or None."""
    check_name(name)
    if not hooks_dir:
        return None
    folder = Path(hooks_dir).expanduser()
    for suffix in SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def task_context(record: Any = None, *, state_dir: str | Path | None = None,
                 api_url: str | None = None, **extra: Any) -> dict[str, Any]:
    """The context a hook gets, from a task record (pmtool.records.TaskRecord) and extras.

    Flat fields for the common questions (task_id, title, branch, worktree, ...) plus the
    whole server task under `task`. Extras (e.g. `outcome`, `cost_usd` for post_task, or
    `repo`/`base` for worktree_setup) are added last and win.
    """
    ctx: dict[str, Any] = {}
    if record is not None:
        task = dict(record.task)
        ctx.update({
            "task_id": record.task_id, "title": task.get("title"),
            "agent_id": record.agent_id, "role": record.role, "level": record.level,
            "complexity": task.get("complexity"), "status": task.get("status"),
            "branch": record.branch or task.get("branch"), "worktree": record.worktree,
            "model": record.model, "session_id": record.session_id,
            "attempts": record.attempts, "cost_usd": record.cost_usd,
            "claimed_at": record.claimed_at, "server_url": record.server_url, "task": task,
        })
    if state_dir is not None:
        ctx["state_dir"] = str(state_dir)
    if api_url is not None:
        ctx["api_url"] = api_url
    ctx.update(extra)
    return ctx


def _lookup(ctx: dict[str, Any], dotted: str) -> Any:
    value: Any = ctx
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def hook_env(name: str, context: dict[str, Any], base: dict[str, str] | None = None,
             api_key: str | None = None) -> dict[str, str]:
    """The hook's environment: ours (or `base`) without the API key, with the PMTOOL_*
    fields from the context; `api_key` given: it as HEADLESS_PM_API_KEY.

    The task's PMTOOL_* names are first removed, so a hook run from inside another task's
    hook never sees that task's values (PMTOOL_STATE_DIR and PMTOOL_API_URL are settings,
    not task facts: inherited values stay unless the context has its own).
    """
    env = dict(os.environ if base is None else base)
    for var in (*KEY_ENV, *(v for v in ENV_FIELDS if v not in MACHINE_FIELDS)):
        env.pop(var, None)
    if api_key:
        env["HEADLESS_PM_API_KEY"] = api_key
    env["PMTOOL_HOOK"] = name
    for var, sources in ENV_FIELDS.items():
        for source in sources:
            value = _lookup(context, source)
            if value is not None and value != "":
                env[var] = str(value)
                break
    return env


def _tail(fh: IO[bytes]) -> tuple[str, bool]:
    """The last OUTPUT_CAP bytes of a capture file, decoded; and whether it was cut."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - OUTPUT_CAP))
    return fh.read().decode("utf-8", errors="replace"), size > OUTPUT_CAP


@dataclass
class HookResult(Result):
    """What a hook run did (`run_hook`, `pmtool hook run`, the notify hook). The last six
    fields are in its JSON only when set: `reason` (skipped: why), `error` (it could not
    be started), `signal` (its name, when a signal ended it), `stdout_truncated` /
    `stderr_truncated`, `left_running` (pids it left behind after a normal exit)."""

    ok: bool
    hook: str
    path: str | None = None
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    skipped: bool = False
    timed_out: bool = False
    reason: str | None = None
    error: str | None = None
    signal: str | None = None
    stdout_truncated: bool | None = None
    stderr_truncated: bool | None = None
    left_running: list[int] | None = None

    OPTIONAL = ("reason", "error", "signal", "stdout_truncated", "stderr_truncated",
                "left_running")


def run_hook(name: str, hooks_dir: str | Path | None, context: dict[str, Any],
             timeout: float | None = 30.0, cwd: str | Path | None = None,
             env: dict[str, str] | None = None, api_key: str | None = None
             ) -> HookResult:
    """Run hook NAME with `context`; answer what happened, never raise for the hook's sake.

    Answers a `HookResult` (`ok`, `hook`, `path`, `exit_code`, `stdout`, `stderr`,
    `duration_s`, `skipped`, `timed_out`), plus `error` (a message) when the hook could
    not be started, `signal` (e.g. "SIGKILL") when a signal ended it, `left_running` (pids
    of processes the hook left behind after a normal exit) and
    `stdout_truncated` / `stderr_truncated`. A missing hook is skipped and ok. `timeout`
    None or <= 0 means no limit. `env` replaces os.environ as the base environment; the
    API key is never in it unless `api_key` is given (pass_key_to_hooks).
    Raises UsageError only for a bad name or a `cwd` that does not exist.
    """
    from pmtool import procs

    result = HookResult(ok=True, hook=name)
    path = find_hook(name, hooks_dir)
    if path is None:
        result.skipped, result.reason = True, f"no hook {name} in {hooks_dir}"
        return result
    result.path = str(path)
    if cwd is not None and not Path(cwd).is_dir():
        raise UsageError(f"hook working directory {cwd} does not exist")
    if not os.access(path, os.X_OK):
        result.ok = False
        result.error = (f"hook {path} is not executable; pmtool does not change "
                        f"file modes: run `chmod +x {path}` if it should run")
        return result

    ctx = {k: v for k, v in context.items() if k not in SECRET_KEYS}
    ctx["hook"] = name
    # Files, not pipes: a grandchild that keeps stdout open after the hook exits would make
    # a pipe reader wait for it; a file is simply read when the hook itself is done.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            child = procs.start([str(path.resolve())], label=f"hook-{name}",
                                stdin=json.dumps(ctx, default=str).encode() + b"\n",
                                stdout=out, stderr=err, cwd=cwd,
                                env=hook_env(name, ctx, env, api_key))
        except OSError as exc:
            result.ok, result.error = False, _start_error(path, exc)
            return result
        with child:
            ending = child.wait(timeout if timeout and timeout > 0 else None)
            # Left alone on purpose (a setup hook may start a watcher), but said, so a hook
            # that leaks processes on every task is noticed.
            left = ([] if ending.timed_out else
                    [p.pid for p in child.leftovers(leave_running=True)])
        result.duration_s = ending.duration_s
        result.exit_code = ending.exit_code
        result.timed_out = ending.timed_out
        result.signal = ending.signal or None
        result.stdout, cut_out = _tail(out)
        result.stderr, cut_err = _tail(err)
    result.stdout_truncated = True if cut_out else None
    result.stderr_truncated = True if cut_err else None
    result.ok = ending.exit_code == 0 and not ending.timed_out
    result.left_running = left or None
    return result


def _start_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOEXEC:
        return f"hook {path} cannot be executed: it needs a #! line (e.g. #!/bin/sh)"
    if exc.errno == errno.ENOENT:
        return f"hook {path} cannot be executed: the interpreter on its #! line is missing"
    if exc.errno == errno.EACCES:
        return f"hook {path} is not executable (permission denied): chmod +x {path}"
    return f"hook {path} cannot be executed: {exc.strerror or exc}"


# -- notify ------------------------------------------------------------------------------


def notify_message(event: str, ctx: dict[str, Any]) -> str:
    task = f"task {ctx['task_id']}" if ctx.get("task_id") is not None else "no task"
    title = f" ({ctx['title']})" if ctx.get("title") else ""
    why = ctx.get("reason") or (ctx.get("error") or {}).get("message") or ""
    agent = ctx.get("agent_id") or "?"
    return {
        "parked": f"{task}{title} is parked for a person: {why}",
        "given_up": f"{task}{title} was given up: {why}",
        "fatal": f"runner {agent} stopped on a fatal error: {why}",
        "budget": f"runner {agent} reached its budget: {why}",
        "finished": f"{task}{title} finished: {ctx.get('outcome')}",
    }.get(event, f"{event}: {task}{title} {why}").rstrip(": ")


def notify(event: str, hooks_dir: str | Path | None, *, record: Any = None,
           timeout: float | None = 30.0, **extra: Any) -> HookResult:
    """Run the `notify` hook for `event` (parked, given_up, fatal, budget, finished).

    The hook gets the task context (pmtool.hooks.task_context) plus `event`, `message` and
    `time` on stdin; it is skipped (ok) when there is none. Never raises for the hook.
    """
    from pmtool.records import now_iso

    if event not in NOTIFY_EVENTS:
        raise UsageError(f'unknown notify event "{event}"', valid=list(NOTIFY_EVENTS))
    ctx = task_context(record, event=event, time=now_iso(), **extra)
    ctx["message"] = extra.get("message") or notify_message(event, ctx)
    return run_hook("notify", hooks_dir, ctx, timeout=timeout)

"""The options many commands share, declared once, and the builders they all use.

A command module imports its options from here, never from another command module:
importing `pmtool.cli.work` registers every work command on the app, which a run of
`pmtool run` must not pay for (see `COMMAND_MODULES` in `pmtool.cli`). This module
registers nothing and imports only typer.
"""

import os
from typing import TYPE_CHECKING, Annotated

import typer

from pmtool.errors import UsageError

if TYPE_CHECKING:
    from pmtool.client import PMClient
    from pmtool.config import Settings
    from pmtool.records import RecordStore

AGENT_ID_HELP = "1-64 characters of A-Z a-z 0-9 . _ - (not . or ..)"


def agent_id_option(value: str | list[str] | None) -> str | list[str] | None:
    """Typer callback of every agent id option: a bad id is a usage error (exit 2) while
    the arguments are parsed, before the command sends anything to the server."""
    from pmtool.state import check_agent_id

    for one in [value] if isinstance(value, str) else value or []:
        check_agent_id(one)
    return value


# Hooks get PMTOOL_AGENT_ID and PMTOOL_ROLE (pmtool.hooks.ENV_FIELDS): a `pmtool lock show`
# inside a hook needs no flag. Read where the flag is required only: an optional
# --agent-id changes what a command does (one record or all), and must be said.
_AGENT_ID = typer.Option(
    "--agent-id", envvar="PMTOOL_AGENT_ID", callback=agent_id_option,
    help=f"The agent's id on the server; its task record on this machine is named after "
         f"it: {AGENT_ID_HELP}.")
AgentId = Annotated[str, _AGENT_ID]
# The same option where a command can also be pointed at a task another way.
AgentIdOrNone = Annotated[str | None, typer.Option(
    "--agent-id", callback=agent_id_option,
    help=f"The agent's id on the server; its task record on this machine is named after "
         f"it: {AGENT_ID_HELP}.")]


def _complete_roles(incomplete: str) -> list[str]:
    from pmtool.config import ROLES

    return [role for role in ROLES if role.startswith(incomplete)]


def _complete_levels(incomplete: str) -> list[str]:
    from pmtool.config import LEVELS

    return [level for level in LEVELS if level.startswith(incomplete)]


Role = Annotated[str, typer.Option(
    "--role", envvar="PMTOOL_ROLE", autocompletion=_complete_roles,
    help="frontend_dev, backend_dev, qa, architect or pm.")]
Level = Annotated[str, typer.Option("--level", autocompletion=_complete_levels,
                                    help="junior, senior or principal.")]
Settle = Annotated[float, typer.Option(
    "--settle", envvar="PMTOOL_CLAIM_SETTLE", min=0.0,
    help="Seconds to let in-flight lock requests land before reading the lock back; must "
         "exceed the server's lock window [env PMTOOL_CLAIM_SETTLE].")]
RunnerPid = Annotated[int | None, typer.Option(
    "--runner-pid", envvar="PMTOOL_RUNNER_PID",
    help="The process that works the task; a record whose runner is gone is stale "
         "[env PMTOOL_RUNNER_PID; default: the parent of pmtool, e.g. your script].")]

# A task is addressed the same way everywhere: a positional TASK, with --task-id kept as
# an alias for scripts written before (`resolve_task` merges the two).
TaskArg = Annotated[int | None, typer.Argument(
    metavar="TASK", help="The task's id.", show_default=False)]
TaskIdAlias = Annotated[int | None, typer.Option(
    "--task-id", help="Same as TASK (kept for older scripts).", show_default=False)]

Repo = Annotated[str | None, typer.Option(
    "--repo", help="The git repository [default: the one the current directory is in].")]
HooksDir = Annotated[str | None, typer.Option(
    "--hooks-dir", help="Hooks folder [env HEADLESS_PM_HOOKS_DIR; default ./hooks].")]
WorktreeBase = Annotated[str | None, typer.Option(
    "--worktree-base", help="Where task worktrees go [env HEADLESS_PM_WORKTREE_BASE; "
                            "default <repo>/.worktrees; relative = from the repo root].")]
Base = Annotated[str | None, typer.Option(
    "--base", help="Branch or commit tasks start from [default: origin's HEAD, else the "
                   "main checkout's branch].")]


def resolve_task(task: int | None, task_id: int | None) -> int | None:
    """TASK or its alias --task-id; both given must agree."""
    if task is not None and task_id is not None and task != task_id:
        raise UsageError(f"TASK {task} and --task-id {task_id} name different tasks",
                         hint="give one of them")
    return task if task is not None else task_id


def server(settings: "Settings") -> "PMClient":
    """The Headless PM client the settings call for."""
    from pmtool.client import PMClient

    return PMClient(settings.api_url, settings.api_key, timeout=settings.http_timeout)


def record_store(settings: "Settings") -> "RecordStore":
    """This machine's task records, in the settings' state folder."""
    from pmtool.records import RecordStore

    return RecordStore(settings.state_path)


def runner_pid(pid: int | None) -> int:
    """The process that works a claimed task: the given one, else pmtool's parent."""
    # `pmtool claim` exits at once; the process that goes on working the task is the
    # shell or script that ran it.
    return pid or os.getppid()

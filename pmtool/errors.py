"""The error hierarchy, and with it the one exit-code table every command shares.

The library raises these; only the CLI edge turns them into JSON and an exit code.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pmtool.results import Result

# The table the README documents. Changing a number here changes the contract.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3
EXIT_SERVER = 4
EXIT_CONFLICT = 5
# Fatal for a runner: every task would fail the same way, so `run` stops before a claim.
EXIT_AUTH = 6  # the server's key is missing or rejected, or claude's login is refused
EXIT_CLAUDE = 7  # claude is not found or does not run
EXIT_TIMEOUT = 124  # as timeout(1)
# Stopped by a signal: 128 + the signal's number, as a shell reports a process it killed.
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGNALS = {1: EXIT_SIGHUP, 2: EXIT_SIGINT, 15: EXIT_SIGTERM}
SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 15: "SIGTERM"}


class PmtoolError(Exception):
    """Base of every error pmtool reports; `kind` and `exit_code` fix how it is shown."""

    kind = "failed"
    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.hint:
            err["hint"] = self.hint
        err.update(self.details)
        return err


class OperationFailed(PmtoolError):
    """The operation ran and did not succeed (unhealthy, hook failed, agent failed)."""


class RecordCorrupt(OperationFailed):
    """The agent's record did not parse; it has been moved aside, never deleted."""

    kind = "corrupt"


class TaskFault(OperationFailed):
    """A fault of one task, not of the machine: a branch git rejects, a worktree git
    refuses, a worktree_setup that fails for good. The runner parks that task and goes on
    to the next one; the same task would fail the same way on every machine."""

    kind = "task_fault"


class MachineFault(OperationFailed):
    """A fault of this machine, not of a task: the repository or git missing. Every task
    would fail the same way here: found before a claim, and never a reason to park."""

    kind = "machine_fault"


# A folder pmtool writes (the state folder, the worktree base, the logs) on a filesystem
# that is full, read-only, over its quota or not ours: every task would fail the same way.
DISK_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS",
               errno.EACCES: "EACCES"}


def disk_fault(exc: BaseException | str, where: str | Path | None = None
               ) -> MachineFault | None:
    """A MachineFault (with the fix) when `exc` is such a filesystem error, or names one
    in its text (git's stderr); None for anything else. `where`: the folder, when the
    error does not name it."""
    if isinstance(exc, OSError):
        code: int | None = exc.errno if exc.errno in DISK_ERRNOS else None
        where = exc.filename or where
        text = exc.strerror or str(exc)
    elif isinstance(exc, str):
        code = next((c for c in DISK_ERRNOS if os.strerror(c) in exc), None)
        text = exc.strip().splitlines()[-1] if exc.strip() else exc
    else:
        return None
    if code is None:
        return None
    place = str(where) if where else "pmtool's folders"
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = (f"free space on the filesystem of {place} (df -h; `pmtool recover` prunes "
                "old logs), then start the runner again: it resumes")
    elif code == errno.EROFS:
        hint = (f"{place} is on a read-only filesystem: remount it read-write, or point "
                "PMTOOL_STATE_DIR / HEADLESS_PM_WORKTREE_BASE elsewhere, then start the runner "
                "again")
    else:
        hint = (f"give the user running pmtool write access to {place} (or point "
                "PMTOOL_STATE_DIR / HEADLESS_PM_WORKTREE_BASE elsewhere), then start the runner "
                "again")
    return MachineFault(f"cannot write {place}: {text}", hint=hint, errno=DISK_ERRNOS[code],
                        path=str(where) if where else None, fatal=True)


class UsageError(PmtoolError):
    kind = "usage"
    exit_code = EXIT_USAGE


class NothingToDo(PmtoolError):
    kind = "nothing"
    exit_code = EXIT_NOTHING


class ServerError(PmtoolError):
    """Server unreachable, timed out, rejected the key, or answered 5xx."""

    kind = "server"
    exit_code = EXIT_SERVER


class AuthError(ServerError):
    """The key is missing or rejected (or claude's login is refused): nothing will work
    until a person fixes it, so it has its own exit code, not the server's 4."""

    kind = "auth"
    exit_code = EXIT_AUTH


class ClaudeMissing(PmtoolError):
    """The claude CLI is not found or does not run."""

    kind = "claude"
    exit_code = EXIT_CLAUDE


class Conflict(PmtoolError):
    kind = "conflict"
    exit_code = EXIT_CONFLICT


class TimeLimit(PmtoolError):
    kind = "timeout"
    exit_code = EXIT_TIMEOUT


class Stopped(PmtoolError):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) stopped the command; exit 128 + its number."""

    kind = "stopped"

    def __init__(self, signum: int, message: str | None = None, **details: Any) -> None:
        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        super().__init__(message or f"stopped by {name}", signal=name, **details)
        self.signum = signum
        self.exit_code = exit_for_signal(signum)


def exit_for_signal(signum: int) -> int:
    return EXIT_SIGNALS.get(signum, 128 + signum)


class ApiError(PmtoolError):
    """The server answered with an error status that is not about reachability.

    Carries the HTTP status and the server's `detail`; the exit code follows the status:
    404/422/400 are bad input, 409 a conflict.
    """

    kind = "api"

    def __init__(self, status: int, detail: Any, message: str | None = None,
                 hint: str | None = None) -> None:
        text = message or f"server answered {status}: {detail_text(detail)}"
        super().__init__(text, hint=hint, status=status)
        self.status = status
        self.detail = detail
        if status == 409:
            self.kind, self.exit_code = "conflict", EXIT_CONFLICT
        elif status in (400, 404, 405, 422):
            self.kind, self.exit_code = "usage", EXIT_USAGE


def detail_text(detail: Any) -> str:
    """Flatten FastAPI's `detail` (a string, or pydantic's list of error objects) to one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


# The exit code of each `error.type`, for answers that carry an error instead of raising it.
KIND_EXIT = {cls.kind: cls.exit_code for cls in (
    OperationFailed, RecordCorrupt, TaskFault, MachineFault, UsageError, NothingToDo,
    ServerError, AuthError, Conflict,
    TimeLimit, ApiError, ClaudeMissing)}


def exit_code(outcome: BaseException | Mapping[str, Any] | Result | None = None) -> int:
    """The one path from a command's result or error to its exit code.

    An error gives its own code (a KeyboardInterrupt is a Ctrl-C: 130). An answer (a
    dict) gives 0 when `ok` is not false; otherwise 128 + `signal` when a signal stopped
    it, 124 when `timed_out`, the code of its `error.type`, else 1.
    """
    if outcome is None:
        return EXIT_OK
    if isinstance(outcome, PmtoolError):
        return outcome.exit_code
    if isinstance(outcome, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(outcome, BaseException):
        return EXIT_FAILED
    if not isinstance(outcome, Mapping):  # a result dataclass (pmtool.results.Result)
        outcome = outcome.to_json()
    if outcome.get("ok", True):
        return EXIT_OK
    if isinstance(outcome.get("signal"), int):
        return exit_for_signal(outcome["signal"])
    if outcome.get("timed_out"):
        return EXIT_TIMEOUT
    error = outcome.get("error")
    if isinstance(error, Mapping):
        return KIND_EXIT.get(str(error.get("type")), EXIT_FAILED)
    return EXIT_FAILED

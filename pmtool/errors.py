"""The error hierarchy, and with it the one exit-code table every command shares.

The library raises these; only the CLI edge turns them into JSON and an exit code.
"""

from __future__ import annotations

from typing import Any

# The table the README documents. Changing a number here changes the contract.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3
EXIT_SERVER = 4
EXIT_CONFLICT = 5
EXIT_TIMEOUT = 124  # as timeout(1)


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
    kind = "auth"


class Conflict(PmtoolError):
    kind = "conflict"
    exit_code = EXIT_CONFLICT


class TimeLimit(PmtoolError):
    kind = "timeout"
    exit_code = EXIT_TIMEOUT


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

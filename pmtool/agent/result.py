"""What one agent run answers: `AgentResult`, the typed form of `exec-claude`'s JSON.

`run_agent` fills the run's own fields; `run_for_task` and `pmtool.work.exec.run_for_record`
add where it ran and, for a record, the task's totals; `exec-claude` adds `next`, what the
failure policy says follows a run without a verdict. `to_json()` gives the keys scripts read
(tests/contract/test_json_keys.py pins them): the keys of a task record's run appear only
when a record was run, and `error`, `note`, `ended_orphan` and `next` only when they say
something.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pmtool.results import Result


@dataclass
class AgentResult(Result):
    """One agent run: how it ended, its verdict, what it cost, where its transcript is.

    `exit_code` is 124 when a time limit ended the agent, 128+N when signal N did
    (`signal` names it); `stop` is the classified stop (pmtool.failure_policy.Stop's JSON),
    `error` (`{"type", "message", "stop"}`) is there when the run is not ok.
    """

    ok: bool = False
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    timed_out_by: str | None = None
    stopped: bool = False
    session_id: str | None = None
    model: str | None = None
    model_used: str | None = None
    num_turns: int | None = None
    total_cost_usd: float | None = None
    duration_s: float | None = None
    outcome: str | None = None
    summary: str | None = None
    verdict_source: str | None = None
    is_error: bool = True
    api_error_status: int | None = None
    resumed: bool = False
    log: str | None = None
    stderr_log: str | None = None
    tool_calls: int = 0
    swept: list[int] = field(default_factory=list)
    stop: dict[str, Any] | None = None
    # Where it ran (run_for_task, run_for_record).
    task_id: Any = None
    role: str | None = None
    cwd: str | None = None
    branch: str | None = None
    # A task record's run (run_for_record).
    agent_id: str | None = None
    task_cost_usd: float | None = None
    attempts: int | None = None
    ended_orphan: int | None = None
    error: dict[str, Any] | None = None
    note: str | None = None
    # What follows a run without a verdict (pmtool.failure_policy.next_step, as JSON).
    next: dict[str, Any] | None = None

    # Keys a run has only when they say something (a record, a failure, a note).
    OPTIONAL = ("agent_id", "task_cost_usd", "attempts", "error", "note", "ended_orphan",
                "next")

    @classmethod
    def failed(cls, error: dict[str, Any]) -> AgentResult:
        """A run that could not happen (the agent did not start): only its error."""
        return cls(ok=False, error=error)

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> AgentResult:
        """From a run's dict (the keys `to_json` gives); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in answer.items() if k in names})

    @property
    def stop_kind(self) -> str | None:
        return (self.stop or {}).get("kind")

    def add_note(self, *notes: str | None) -> None:
        """Join `notes` (the ones that say something) to the run's own note."""
        said = [n for n in (*notes, self.note) if n]
        self.note = "; ".join(said) if said else None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.task_id is None and self.cwd is None:  # a bare run_agent: no task around it
            for name in ("task_id", "role", "cwd", "branch"):
                del out[name]
        return out

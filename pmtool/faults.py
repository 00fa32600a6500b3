"""Test-only fault injection: `PMTOOL_FAULT=POINT` makes the process that reaches POINT
SIGKILL itself there, so tests can check that the next start (or `pmtool recover`)
completes or rolls back whatever a kill at that point left half done.
`PMTOOL_FAULT=pause-POINT` SIGSTOPs it once instead (a test SIGCONTs many at once).

`POINTS` lists them in the order a task meets them (README, "Killed at step X"); the
finish's points fire in `pmtool recover` too when it completes a finish.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "PMTOOL_FAULT"
POINTS = (
    # claim (pmtool.work.claim)
    "before-lock", "after-lock", "after-status", "after-record",
    # the loop (pmtool.run.loop, pmtool.worktree)
    "worktree", "setup", "agent-start", "agent-tool", "agent-end",
    # the finish (pmtool.work.finish), also when recover completes one
    "leftover", "push", "status", "post-task", "worktree-remove", "close",
    # recover giving a dead runner's task back, its worktree rescued (pmtool.work.claim)
    "give-back",
)
_paused: list[bool] = []


def fault(point: str) -> None:
    """Kill (or stop) this process at `point` when PMTOOL_FAULT names it; else nothing."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"pause-{point}" and not _paused:
        _paused.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)

"""Processes a dead runner left behind: its agent, its hooks, and whatever still works
in its task's worktree. `pmtool recover` (and so cron) ends them before the task is
resumed, finished or given back, so no leftover keeps spending, committing or holding
the worktree with nobody reading it.

Where the runner had a parent-death signal and a subreaper (Linux), its children died
with it and this finds nothing; it is the net for everything else: a child that was
re-parented to init after the runner's kill (`env -i setsid ...` escapes the marks
too, but not its working directory).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pmtool.records import TaskRecord

MARK_ENV = "PMTOOL_RUN_MARK"


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _ours(env: dict[str, str], record: TaskRecord, state_dir: str | None) -> bool:
    """Started by pmtool for this task: the run mark, and the task's id with its session
    (the agent and its children) or with this agent's id and state folder (hooks; task
    ids repeat across servers, state folders do not)."""
    if MARK_ENV not in env or env.get("PMTOOL_TASK_ID") != str(record.task_id):
        return False
    if record.session_id and env.get("PMTOOL_SESSION_ID") == record.session_id:
        return True
    return env.get("PMTOOL_AGENT_ID") == record.agent_id and bool(state_dir) \
        and env.get("PMTOOL_STATE_DIR") == state_dir


def _inside(cwd: str | None, folder: str | None) -> bool:
    if not cwd or not folder:
        return False
    return cwd == folder or cwd.startswith(folder + os.sep)


def find(record: TaskRecord, worktree: str | Path | None = None,
         state_dir: str | Path | None = None) -> list[Any]:
    """Processes of this task's dead runner: marked for the task, or working inside the
    task's own worktree (`worktree`: never the main checkout) without a terminal (a
    person's shell there has one, and is left alone). Never this process or its parents."""
    import psutil

    folder = os.path.realpath(worktree) if worktree and Path(worktree).is_dir() else None
    mine = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        mine |= {p.pid for p in psutil.Process().parents()}
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "terminal", "uids"]):
        info = proc.info
        if info["pid"] in mine or (info["uids"] and info["uids"].real != os.getuid()):
            continue
        if _ours(_environ(info["pid"]), record, str(state_dir) if state_dir else None) or (
                _inside(info.get("cwd"), folder) and not info.get("terminal")):
            found.append(proc)
    return found


def end(record: TaskRecord, worktree: str | Path | None = None,
        state_dir: str | Path | None = None, grace: float = 3.0) -> list[int]:
    """End the dead runner's agent (pmtool.work.exec.end_leftover_agent: by its recorded
    pid and mark), then every other process `find` names, each with its tree. Answers the
    pids signalled. Only for a record whose runner is dead: a live runner's agent is not a
    leftover."""
    from pmtool import procs
    from pmtool.errors import Conflict
    from pmtool.work.exec import end_leftover_agent

    signalled: set[int] = set()
    with contextlib.suppress(Conflict):  # its runner came back meanwhile: not ours to end
        ended = end_leftover_agent(record, grace=grace)
        signalled |= set((ended or {}).get("signalled") or [])
    for proc in find(record, worktree, state_dir):
        signalled |= set(procs.terminate_tree(proc.pid, grace=grace))
    return sorted(signalled)

"""A task record in, an agent run out, the result recorded: the agent's run as a step of
the task's life on this machine.

`run_for_record` runs the agent (pmtool.agent.claude.run_agent) on the task of an agent's
record and keeps the record up to date around it: the session id before the agent starts
(so a crash can be resumed), the agent's pid and mark while it runs, its cost and outcome
after. `end_leftover_agent` ends the agent of an earlier run whose runner died.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool.agent.claude import (
    AgentRun,
    Progress,
    branch_for,
    build_prompt,
    continuation_prompt,
    fetch_instructions_path,
    repo_or_cwd,
    role_file,
    run_agent,
)
from pmtool.errors import ClaudeMissing, Conflict, NothingToDo, UsageError
from pmtool.models import task_level

if TYPE_CHECKING:
    from pmtool.config import Settings
    from pmtool.records import RecordStore, TaskRecord


def _update_record(store: RecordStore, agent_id: str,
                   change: Callable[[TaskRecord], None]) -> TaskRecord | None:
    """Re-read the record, apply `change`, save. Re-reading keeps what others (a heartbeat,
    `lock update`) wrote meanwhile; a record closed meanwhile is not brought back."""
    from pmtool.records import CorruptRecord

    try:
        record = store.load(agent_id)
    except CorruptRecord:
        return None
    if record is None:
        return None
    change(record)
    store.save(record)
    return record


def _last_agent(record: TaskRecord) -> dict[str, Any] | None:
    return next((s for s in reversed(record.steps) if s.get("step") == "agent_running"), None)


def _running(pid: int, started: float | None) -> bool:
    """Alive and the same process; a zombie (dead, waiting for a parent that reaps it
    late, e.g. a container's pid 1) is not running."""
    import psutil

    from pmtool.records import pid_alive

    if not pid_alive(pid, started):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_leftover_agent(record: TaskRecord, grace: float = 3.0) -> dict[str, Any] | None:
    """End the agent of an earlier run of this record whose runner died (kill -9, OOM).

    Such an agent keeps working, and spending, with nobody reading it; a resume next to it
    would run two agents on one session. If its runner still lives it is not a leftover:
    Conflict (exit 5). Answers `{"pid", "signalled"}` when one was ended, else None.
    """
    from pmtool import procs

    step = _last_agent(record)
    if not step or not step.get("pid") or not step.get("mark"):
        return None
    pid, mark = int(step["pid"]), str(step["mark"])
    if not _running(pid, step.get("pid_started")) and not procs.marked(mark):
        return None
    runner = step.get("runner_pid")
    if runner and runner != os.getpid() and _running(int(runner), step.get("runner_started")):
        raise Conflict(f"an agent for task {record.task_id} is already running (pid {pid}, "
                       f"started by pmtool pid {runner})",
                       hint="wait for it, or stop that pmtool first", pid=pid)
    signalled = procs.terminate_tree(pid, mark, grace=grace)
    return {"pid": pid, "signalled": signalled}


def run_for_record(store: RecordStore, agent_id: str, settings: Settings, *,
                   resume: bool = False, cwd: str | Path | None = None,
                   model: str | None = None, prompt: str | None = None,
                   template: str | None = None, instructions_dir: str | Path | None = None,
                   context_instructions_path: str | Path | None = None,
                   timeout: float | None = None, idle_timeout: float | None = None,
                   max_budget_usd: float | None = None, agent_cmd: str | None = None,
                   progress: Progress | None = None,
                   stop_event: threading.Event | None = None,
                   env: Mapping[str, str] | None = None,
                   max_turns: int | None = None) -> dict[str, Any]:
    """Run the agent on the task of `agent_id`'s record, and keep the record up to date.

    Working directory: the record's worktree, else `cwd`, else the git checkout of the
    current directory. Model: `model`, else the record's, else `settings.model_for` the
    task's difficulty. With `resume`, the recorded session continues (a new one starts,
    with `note`, when none was recorded). Before the agent starts, the record gets the
    session id, model and attempts + 1; afterwards the run's cost is added to `cost_usd`
    and a step notes the outcome. An agent of an earlier run whose runner died is ended
    first (`ended_orphan`). `prompt` replaces the built prompt (--prompt-file).

    Answers `run_agent`'s dict plus `agent_id`, `task_id`, `role`, `cwd`, `branch`,
    `task_cost_usd` (the record's total over all runs), `attempts`, and `note` when
    something is worth saying. Role instructions: `instructions_dir` (default
    settings.instructions_dir), then `context_instructions_path`, asked from the server's
    /api/v1/context when not given, then the built-in file. Raises NothingToDo when the
    agent has no record, Conflict when its agent already runs under a live pmtool.
    """
    from pmtool.agent.binary import find_claude
    from pmtool.records import process_started

    record = store.need(agent_id)
    notes: list[str] = []
    leftover = end_leftover_agent(record)

    plan = plan_for_record(record, settings, cwd=cwd, model=model)
    notes += plan.pop("notes")
    claude = None if agent_cmd else find_claude(settings.claude_bin)
    if agent_cmd is None and not claude:
        raise ClaudeMissing("claude not found",
                         hint="install it (npm install -g @anthropic-ai/claude-code) or set "
                              "PMTOOL_CLAUDE_BIN")
    session = record.session_id if resume and record.session_id else str(uuid.uuid4())
    if resume and not record.session_id:
        notes.append("the record has no session to resume; started a new one")
        resume = False
    task, role, run_cwd, branch = record.task, record.role, plan["cwd"], plan["branch"]
    instructions_dir = instructions_dir or settings.instructions_dir
    if context_instructions_path is None and prompt is None \
            and not role_file(role, instructions_dir):
        context_instructions_path = fetch_instructions_path(settings)
    full_prompt = prompt or build_prompt(task, role, run_cwd, branch, instructions_dir,
                                         context_instructions_path, template)

    def before(rec: TaskRecord) -> None:
        rec.session_id, rec.model = session, plan["model"]
        rec.attempts += 1
        rec.step("agent_starting", session_id=session, model=plan["model"], resume=resume,
                 cwd=str(run_cwd))

    # The session id is in the record before the agent exists: whatever happens next, a
    # later `--resume` knows which session to continue.
    if _update_record(store, agent_id, before) is None:
        raise NothingToDo(f"agent {agent_id}'s record was closed meanwhile")

    def started(info: dict[str, Any]) -> None:
        me = os.getpid()

        def running(rec: TaskRecord) -> None:
            # A fresh start may run under a new session id (run_agent): the next resume
            # continues that one.
            rec.session_id = info["session_id"]
            rec.step("agent_running", pid=info["pid"], pid_started=process_started(info["pid"]),
                     mark=info["mark"], session_id=info["session_id"], runner_pid=me,
                     runner_started=process_started(me), log=info["log"])

        _update_record(store, agent_id, running)

    run = AgentRun(
        full_prompt, cwd=run_cwd, model=plan["model"], role=role, task_id=record.task_id,
        session_id=session, resume=resume,
        resume_prompt=None if prompt else continuation_prompt(task, role, run_cwd, branch),
        claude_bin=claude, agent_cmd=agent_cmd, permission_mode=settings.permission_mode,
        allowed_tools=settings.allowed_tools, max_budget_usd=max_budget_usd,
        max_turns=max_turns if max_turns is not None else settings.max_turns,
        timeout=settings.claude_timeout if timeout is None else timeout,
        idle_timeout=idle_timeout, log_dir=store.state_dir / "logs", branch=branch, env=env,
        secrets=(settings.api_key,))
    answer = run_agent(run, progress=progress, stop_event=stop_event, on_start=started)

    cost = float(answer.get("total_cost_usd") or 0.0)

    def after(rec: TaskRecord) -> None:
        rec.cost_usd = round((rec.cost_usd or 0.0) + cost, 6)
        rec.step("agent_finished", session_id=answer["session_id"], ok=answer["ok"],
                 outcome=answer["outcome"], exit_code=answer["exit_code"],
                 timed_out=answer["timed_out"], stopped=answer["stopped"],
                 num_turns=answer["num_turns"], cost_usd=cost)

    final = _update_record(store, agent_id, after)
    answer.update(agent_id=agent_id, task_id=record.task_id, role=role, cwd=str(run_cwd),
                  branch=branch,
                  task_cost_usd=final.cost_usd if final else round(record.cost_usd + cost, 6),
                  attempts=final.attempts if final else record.attempts + 1)
    if leftover:
        answer["ended_orphan"] = leftover["pid"]
        notes.append(f"ended the agent of an earlier run (pid {leftover['pid']}) whose pmtool "
                     "had died")
    if final is None:
        notes.append("the task record was closed while the agent ran; nothing was recorded")
    if answer.get("note"):
        notes.append(answer["note"])
    if notes:
        answer["note"] = "; ".join(notes)
    return answer


def plan_for_record(record: TaskRecord, settings: Settings, cwd: str | Path | None = None,
                    model: str | None = None) -> dict[str, Any]:
    """Where, on which branch and with which model a record's task runs (no side effects).

    `{"cwd", "branch", "model", "notes"}`. The branch is the one checked out in the working
    directory (that is where commits land); a note says so when it is not the task's.
    """
    notes: list[str] = []
    if record.worktree and Path(record.worktree).is_dir():
        run_cwd = Path(record.worktree)
        if cwd is not None and Path(cwd).resolve() != run_cwd.resolve():
            notes.append(f"--cwd {cwd} ignored: the task's worktree is {run_cwd}")
    elif cwd is not None:
        run_cwd = Path(cwd).expanduser()
    else:
        run_cwd = repo_or_cwd()
    if not run_cwd.is_dir():
        raise UsageError(f"working directory {run_cwd} does not exist")
    branch, note = branch_for(run_cwd, record.branch or record.task.get("branch"),
                              record.task.get("complexity"))
    if note:
        notes.append(note)
    level = task_level(record.task, record.level)
    chosen = model or record.model or settings.model_for(level)
    return {"cwd": run_cwd, "branch": branch, "model": chosen, "notes": notes}

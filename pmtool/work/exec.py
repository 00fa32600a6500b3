"""A task record in, an agent run out, the result recorded: the agent's run as a step of
the task's life on this machine.

`run_for_record` runs the agent (pmtool.agent.claude.run_agent) on the task of an agent's
record and keeps the record up to date around it: the session id before the agent starts
(so a crash can be resumed), the agent's pid and mark while it runs, its cost and outcome
after. `end_leftover_agent` ends the agent of an earlier run whose runner died.

`exec_agent` is `exec-claude` as one call (the CLI adds only signals and printing): the
heartbeat around the run, and after a run without a verdict `next`, the step the failure
policy calls for (`next_after`, which the runner uses too), noted in the record so the
claim's next run knows it was resumed (`tried_from_record`, which the runner and recover
read too). `prompt_preview` is
--print-prompt.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as fl
from pmtool.agent.claude import (
    agent_run,
    branch_for,
    context_path,
    need_claude,
    repo_or_cwd,
    run_agent,
)
from pmtool.agent.options import AgentOptions
from pmtool.agent.prompt import build_prompt, continuation_prompt
from pmtool.agent.result import AgentResult
from pmtool.agent.stream import Progress
from pmtool.errors import Conflict, NothingToDo, UsageError
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


def run_for_record(store: RecordStore, agent_id: str, settings: Settings,
                   options: AgentOptions = AgentOptions(), *, resume: bool = False,
                   progress: Progress | None = None,
                   stop_event: threading.Event | None = None) -> AgentResult:
    """Run the agent on the task of `agent_id`'s record, and keep the record up to date.

    Working directory: the record's worktree, else `options.cwd`, else the git checkout of
    the current directory. Model: `options.model`, else the record's, else
    `settings.model_for` the task's difficulty. With `resume`, the recorded session
    continues (a new one starts, with `note`, when none was recorded). Before the agent
    starts, the record gets the session id, model and attempts + 1; afterwards the run's
    cost is added to `cost_usd` and a step notes the outcome. An agent of an earlier run
    whose runner died is ended first (`ended_orphan`). `options.prompt` replaces the built
    prompt (--prompt-file).

    Answers `run_agent`'s result plus `agent_id`, `task_id`, `role`, `cwd`, `branch`,
    `task_cost_usd` (the record's total over all runs), `attempts`, and `note` when
    something is worth saying. Role instructions: `options.instructions_dir` (default
    settings.instructions_dir), then `options.context_instructions_path`, asked from the
    server's /api/v1/context when not given, then the built-in file. Raises NothingToDo
    when the agent has no record, Conflict when its agent already runs under a live pmtool.
    """
    from pmtool.records import process_started

    record = store.need(agent_id)
    notes: list[str] = []
    leftover = end_leftover_agent(record)

    plan = plan_for_record(record, settings, cwd=options.cwd, model=options.model)
    notes += plan.pop("notes")
    claude = need_claude(settings, options)  # said before the record is touched
    session = record.session_id if resume and record.session_id else str(uuid.uuid4())
    if resume and not record.session_id:
        notes.append("the record has no session to resume; started a new one")
        resume = False
    task, role, run_cwd, branch = record.task, record.role, plan["cwd"], plan["branch"]
    full_prompt = options.prompt or prompt_for_record(
        record, settings, options, plan, context_path(settings, options, role))

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

    run = agent_run(
        full_prompt, settings, options, cwd=run_cwd, model=plan["model"], role=role,
        task_id=record.task_id, session_id=session, resume=resume,
        resume_prompt=None if options.prompt else continuation_prompt(task, role, run_cwd,
                                                                      branch),
        log_dir=store.state_dir / "logs", branch=branch, claude_bin=claude)
    answer = run_agent(run, progress=progress, stop_event=stop_event, on_start=started)

    cost = float(answer.total_cost_usd or 0.0)

    def after(rec: TaskRecord) -> None:
        rec.cost_usd = round((rec.cost_usd or 0.0) + cost, 6)
        rec.step("agent_finished", session_id=answer.session_id, ok=answer.ok,
                 outcome=answer.outcome, exit_code=answer.exit_code,
                 timed_out=answer.timed_out, stopped=answer.stopped,
                 num_turns=answer.num_turns, cost_usd=cost)

    final = _update_record(store, agent_id, after)
    answer.agent_id, answer.task_id, answer.role = agent_id, record.task_id, role
    answer.cwd, answer.branch = str(run_cwd), branch
    answer.task_cost_usd = final.cost_usd if final else round(record.cost_usd + cost, 6)
    answer.attempts = final.attempts if final else record.attempts + 1
    if leftover:
        answer.ended_orphan = leftover["pid"]
        notes.append(f"ended the agent of an earlier run (pid {leftover['pid']}) whose pmtool "
                     "had died")
    if final is None:
        notes.append("the task record was closed while the agent ran; nothing was recorded")
    answer.add_note(*notes)
    return answer


def prompt_for_record(record: TaskRecord, settings: Settings, options: AgentOptions,
                      plan: dict[str, Any], ctx_path: str | Path | None) -> str:
    """The full prompt of the record's task, built where `plan` (plan_for_record) runs it;
    `ctx_path`: where the server keeps its instruction files (`context_path`, which asks
    the server only if the answer could matter)."""
    return build_prompt(record.task, record.role, plan["cwd"], plan["branch"],
                        options.instructions_dir or settings.instructions_dir, ctx_path,
                        options.template)


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


def exec_agent(settings: Settings, options: AgentOptions = AgentOptions(), *,
               agent_id: str | None = None, task: Mapping[str, Any] | None = None,
               role: str | None = None, resume: bool = False,
               limits: fl.StepLimits | None = None, progress: Progress | None = None,
               stop_event: threading.Event | None = None,
               on_beat_error: Callable[[Exception], None] | None = None) -> AgentResult:
    """`exec-claude` as one library call: run the agent on `agent_id`'s record (or on the
    bare `task`, as `role`), keeping the task's lock alive meanwhile, and say what follows.

    The heartbeat re-registers every `settings.heartbeat` seconds (the server drops the
    locks of agents unseen for 30 minutes, quirk 3): the record's agent, or the agent a
    claimed task object names (`locked_by`); a failed beat goes to `on_beat_error`, the
    agent goes on. For a record's run that ends without a verdict, `next` is the step the
    failure policy calls for (`next_after`, with what this claim tried from the record and
    the task's spend from the ledger), noted in the record too.
    """
    from pmtool.agent.claude import run_for_task
    from pmtool.records import RecordStore

    if agent_id is None:
        assert task is not None
        beat_role = role or task.get("target_role") or "backend_dev"
        with _heartbeat(settings, task.get("locked_by"), beat_role,
                        task.get("difficulty") or "senior", on_beat_error):
            return run_for_task(task, settings, options, role=role, progress=progress,
                                stop_event=stop_event)
    store = RecordStore(settings.state_path)
    record = store.need(agent_id)
    with _heartbeat(settings, agent_id, record.role, record.level, on_beat_error):
        answer = run_for_record(store, agent_id, settings, options, resume=resume,
                                progress=progress, stop_event=stop_event)
    if not (answer.ok and answer.outcome):
        record = store.load(agent_id) or record
        tried = tried_from_record(record, store)
        limits = limits or fl.StepLimits()
        stronger = None
        if limits.escalate and not tried.escalated:
            from pmtool.models import stronger_model

            stronger = stronger_model(answer.model or "", settings)
        step = next_after(answer, tried, limits, stronger)
        answer.next = step.to_json()
        if not answer.stopped:  # a stop by signal is the caller's, not a retry of the claim
            note_next(store, agent_id, answer, step)
    return answer


@contextlib.contextmanager
def _heartbeat(settings: Settings, agent_id: str | None, role: str, level: str,
               on_error: Callable[[Exception], None] | None) -> Iterator[None]:
    """Keep `agent_id`'s lock alive while the block runs (nothing without an agent)."""
    if not agent_id:
        yield
        return
    from pmtool.client import PMClient
    from pmtool.work.claim import heartbeat

    client = PMClient(settings.api_url, settings.api_key, timeout=settings.http_timeout)
    try:
        with heartbeat(client, agent_id, role, level, settings.heartbeat, on_error=on_error):
            yield
    finally:
        client.close()


def next_after(answer: AgentResult, tried: fl.Tried, limits: fl.StepLimits,
               stronger: str | None = None) -> fl.Step:
    """What follows a run without a verdict (pmtool.failure_policy.next_step), the run's
    own words for why it failed going with it."""
    return fl.next_step(answer.stop, tried, limits, why=why_failed(answer),
                        stronger=stronger)


def why_failed(answer: AgentResult) -> str:
    """A run without a verdict in its own words: timed out, its error, or no verdict."""
    return ("timed out" if answer.timed_out else
            (answer.error or {}).get("message") or "no verdict")


def tried_from_record(record: TaskRecord, store: RecordStore, *, runs: str = "",
                      taken: tuple[str, ...] = ()) -> fl.Tried:
    """What this claim has tried, from its record, for `next_step`: a resume or an
    escalation is a step the policy said after an earlier run (`note_next`), so a runner
    started again knows it too; `taken` adds steps carried out after runs the record could
    not note them for (a run that never started). The task's attempt rows on this machine
    before this claim come from the ledger, and this claim's own line when it is written
    already (recover's give-back counts it before it decides); the claim's spend from the
    record; `runs`: what the give-back's notes add after its reason (the runner's)."""
    from pmtool.ledger import Ledger

    said = {str((s.get("next") or {}).get("step")) for s in record.steps
            if s.get("step") == "agent_finished"} | set(taken)
    rows = fl.attempts_of(Ledger(store.state).lines(), record.task)
    mine = [row for row in rows if row.get("claimed_at") == record.claimed_at
            and row.get("agent_id") == record.agent_id]
    return fl.Tried(retried="resume" in said, escalated="retry" in said,
                    cost_usd=record.cost_usd or 0.0,
                    attempts=tuple(row for row in rows if row not in mine), runs=runs,
                    written=mine[-1] if mine else None)


def note_next(store: RecordStore, agent_id: str, answer: AgentResult,
              step: fl.Step) -> None:
    """Note in the `agent_finished` step of `answer`'s run what the policy said follows
    it: a later run's `tried_from_record` reads it. A run that never started (no session)
    has no such step: nothing is noted."""

    def change(rec: TaskRecord) -> None:
        last = next((s for s in reversed(rec.steps) if s.get("step") == "agent_finished"),
                    None)
        if last is not None and last.get("session_id") == answer.session_id:
            last["next"] = step.to_json()

    if answer.session_id is None:
        return

    _update_record(store, agent_id, change)


def prompt_preview(settings: Settings, options: AgentOptions = AgentOptions(), *,
                   agent_id: str | None = None, task: Mapping[str, Any] | None = None,
                   role: str | None = None, resume: bool = False) -> dict[str, Any]:
    """What `exec-claude` would send, and where it would run, without running anything
    (--print-prompt): `{"prompt", "task_id", "role", "cwd", "branch", "model",
    "instructions", "verdict_schema", "notes"}`. A --resume of a recorded session sends
    the short continuation (the session already holds the task)."""
    from pmtool.agent.claude import plan_for_task
    from pmtool.agent.prompt import role_instructions, verdict_schema
    from pmtool.records import RecordStore

    instructions_dir = options.instructions_dir or settings.instructions_dir
    if agent_id is not None:
        record = RecordStore(settings.state_path).need(agent_id)
        task, role = record.task, record.role
        plan = plan_for_record(record, settings, cwd=options.cwd, model=options.model)
        ctx_path = context_path(settings, options, role)
        if resume and record.session_id and not options.prompt:
            text = continuation_prompt(task, role, plan["cwd"], plan["branch"])
        else:
            text = options.prompt or prompt_for_record(record, settings, options, plan,
                                                       ctx_path)
    else:
        assert task is not None
        plan = plan_for_task(task, settings, options, role=role)
        text, role, ctx_path = plan["prompt"], plan["role"], plan["context_instructions_path"]
    source = "--prompt-file" if options.prompt else role_instructions(
        role, instructions_dir, ctx_path)[1]
    return {"prompt": text, "task_id": task.get("id"), "role": role, "cwd": str(plan["cwd"]),
            "branch": plan["branch"], "model": plan["model"], "instructions": source,
            "verdict_schema": verdict_schema(role), "notes": plan.get("notes") or []}

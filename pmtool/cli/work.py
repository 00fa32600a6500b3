"""Taking work: register, claim, lock show/acquire/update/release, finish, recover.

Each command resolves settings, builds the client and the record store, calls one
function of `pmtool.work.claim` and emits its result. The library is imported inside the
commands so that `pmtool lock show` does not pay for `requests`.
"""

from typing import Annotated, Any

import typer

from pmtool.cli import app, emit, options, say, waiting_line

# Re-exported for callers that took them from here before `options` existed.
from pmtool.cli.options import (
    AGENT_ID_HELP,
    AgentId,
    AgentIdOrNone,
    Level,
    Role,
    RunnerPid,
    Settle,
    TaskArg,
    TaskIdAlias,
    agent_id_option,
    record_store,
    resolve_task,
    server,
)
from pmtool.cli.options import runner_pid as working_pid


@app.command("register")
def register_cmd(agent_id: AgentId, role: Role, level: Level = "senior") -> None:
    """Register the agent, or refresh its last_seen (the heartbeat).

    The server drops the locks of agents unseen for 30 minutes, so a long job re-registers
    now and then. Exit 5 if the server kept another role or level for this agent id.

    Example: pmtool register --agent-id dev_001 --role backend_dev --level senior
    """
    from pmtool.work.claim import register

    settings = options().settings()
    answer = register(server(settings), agent_id, role, level)
    emit({"agent": answer.get("agent")})


@app.command("claim")
def claim_cmd(agent_id: AgentId, role: Role, level: Level = "senior",
              wait: Annotated[float, typer.Option(
                  "--wait", min=0.0,
                  help="Seconds to keep looking for a task (0 = look once).")] = 0.0,
              settle: Settle = 0.3, runner_pid: RunnerPid = None) -> None:
    """Take the next task for the role and level and make it this agent's.

    Locks it, checks after in-flight locks settled that the lock is still ours (the server
    double-locks under contention), sets under_work and writes the task record. Prints
    {"ok": true, "task": {...}, "record": PATH, "claim": {polls, conflicts, losses, ...}}.
    A task this machine gave back waits out its cooldown (PMTOOL_RETRY_COOLDOWN); one that
    used up PMTOOL_MAX_ATTEMPTS or PMTOOL_MAX_BOUNCES is parked (status pending) instead.
    Exit 3 when no task came within --wait (error.why says why), 5 if the agent already
    has a task or a running `pmtool run`.

    Example: pmtool claim --agent-id dev_001 --role backend_dev --wait 300 | jq .task.id
    """
    from pmtool.work.claim import ClaimStats, claim
    from pmtool.work.options import claim_options

    settings = options().settings()
    stats = ClaimStats()
    shown = waiting_line(f"waiting for a {role}/{level} task", wait)
    try:
        claimed = claim(server(settings), record_store(settings), agent_id, role, level,
                        claim_options(settings, wait=wait, settle=settle, on_wait=shown),
                        runner_pid=working_pid(runner_pid), stats=stats)
    finally:
        if shown:
            shown.clear()
    for parked in stats.parked:
        say(f"pmtool: parked task {parked['task_id']}: {parked['reason']}")
    title = f": {claimed.task['title']}" if claimed.task.get("title") else ""
    say(f"pmtool: {agent_id} claimed task {claimed.task['id']}{title}")
    emit(claimed)


lock_app = typer.Typer(help="The task record by hand: show, acquire, update, release.",
                       no_args_is_help=True)
app.add_typer(lock_app, name="lock")


@lock_app.command("show")
def lock_show(agent_id: AgentId) -> None:
    """Print the agent's task record, its path and whether its runner is live.

    Exit 3 when the agent has no record on this machine.

    Example: pmtool lock show --agent-id dev_001 | jq .record.worktree
    """
    from pmtool.work.claim import show

    emit(show(record_store(options().settings()), agent_id))


@lock_app.command("acquire")
def lock_acquire(agent_id: AgentId, role: Role, task: TaskArg = None,
                 task_id: TaskIdAlias = None, level: Level = "senior",
                 settle: Settle = 0.3, runner_pid: RunnerPid = None) -> None:
    """Lock a named task with the same checks as claim, set under_work, write the record.

    Exit 5 if another agent holds it or wins it, 2 if there is no such task.

    Example: pmtool lock acquire 42 --agent-id dev_001 --role backend_dev
    """
    from pmtool.errors import UsageError
    from pmtool.work.claim import acquire

    number = resolve_task(task, task_id)
    if number is None:
        raise UsageError("give the TASK to lock", hint="pmtool lock acquire 42 --agent-id ...")
    settings = options().settings()
    claimed = acquire(server(settings), record_store(settings), number, agent_id, role,
                      level, runner_pid=working_pid(runner_pid), settle=settle)
    emit(claimed)


@lock_app.command("update")
def lock_update(
    agent_id: AgentId,
    worktree: Annotated[str | None, typer.Option(help="The task's worktree path.")] = None,
    branch: Annotated[str | None, typer.Option(help="The git branch of the work.")] = None,
    session_id: Annotated[str | None, typer.Option(
        "--session-id", help="The agent's session id (to resume it).")] = None,
    model: Annotated[str | None, typer.Option(help="The model working the task.")] = None,
    runner_pid: Annotated[int | None, typer.Option(
        "--runner-pid", help="The process now working the task.")] = None,
    attempts: Annotated[int | None, typer.Option(help="Agent runs so far.")] = None,
    cost_usd: Annotated[float | None, typer.Option(
        "--cost-usd", help="Spent so far, in USD.")] = None,
    step: Annotated[str | None, typer.Option(help="Name of the step to note.")] = None,
) -> None:
    """Set fields of the agent's task record; the others stay as they are.

    Exit 3 when the agent has no record.

    Example: pmtool lock update --agent-id dev_001 --worktree .worktrees/42 --branch feat/login
    """
    from pmtool.work.claim import update_record

    record, path = update_record(record_store(options().settings()), agent_id,
                                 worktree=worktree, branch=branch, session_id=session_id,
                                 model=model, runner_pid=runner_pid, attempts=attempts,
                                 cost_usd=cost_usd, step=step)
    emit({"record": record.to_json(), "path": str(path)})


@lock_app.command("release")
def lock_release(agent_id: AgentId, notes: Annotated[str | None, typer.Option(
        help="Why; appended to the task's notes.")] = None,
        kind: Annotated[str, typer.Option(
            help="Why, as a kind: failed, timeout, idle, killed, max_turns, hook, budget "
                 "(counted as attempts), or rate_limit, overloaded, auth, stopped (not "
                 "counted); exec-claude's stop.kind fits here. Without it the release is "
                 "by hand (by_hand): not counted, no cooldown.")] = "by_hand",
        task_budget_usd: Annotated[float | None, typer.Option(
            help="Park the task once its claims have cost this much in all.")] = None,
) -> None:
    """Give the agent's task back: status as before the claim, lock released, record closed.

    With a --kind that counts, the give-back is an attempt of the task on this machine
    (kept with its kind, cost and reason, and written to the task's notes): this machine
    waits out a cooldown before it takes the task again, and after PMTOOL_MAX_ATTEMPTS (or
    a budget stop) the task is parked for a person instead ("action": "parked", status
    pending). A task that someone else moved on is left alone ("action": "moved_on"). Exit
    3 when the agent has no record.

    Example: pmtool lock release --agent-id dev_001 --notes "needs a decision on the schema"
    """
    from pmtool.errors import UsageError
    from pmtool.failure_policy import KINDS
    from pmtool.work.claim import release
    from pmtool.work.options import limits as limits_from

    if kind not in KINDS:
        raise UsageError(f'--kind "{kind}" is not one of ' + ", ".join(KINDS), valid=list(KINDS))
    settings = options().settings()
    result = release(server(settings), record_store(settings), agent_id, notes=notes,
                     kind=kind, limits=limits_from(settings, task_budget_usd=task_budget_usd))
    if result.parked:
        say(f"pmtool: task {result.task_id} parked for a person: {result.parked}")
    emit(result)


@app.command("finish")
def finish_cmd(agent_id: AgentId, outcome: Annotated[str, typer.Option(
        "--outcome", help="done (developers, architect, pm); pass or fail (qa); blocked.")],
        notes: Annotated[str | None, typer.Option(
            help="Appended to the task's notes (the reason, for fail and blocked).")] = None,
        full: Annotated[bool, typer.Option(
            "--full", help="The whole finish of `pmtool run`: also commit leftovers, push, "
                           "land a minor task, run post_task, remove the worktree.")] = False,
) -> None:
    """Report the outcome of the agent's task and close its record.

    done -> dev_done; qa pass -> qa_done, fail -> created (parked once QA has failed it
    PMTOOL_MAX_BOUNCES times); blocked -> parked for a person: status pending, the reason
    in the notes and as a comment ("parked" says why). If the task has already moved on,
    it is not overwritten ("action": "moved_on"). Exit 3 when the agent has no record.

    With --full (pm-runner.sh), the finish `pmtool run` does, in one process: what the
    agent left uncommitted is committed on the task branch (PMTOOL_LEFTOVER), the branch
    pushed (PMTOOL_PUSH), a minor task landed on the base, the status set, the post_task
    hook run, the task's worktree removed (dirty work rescued to a ref first), the record
    closed. Each step is noted in the record: after a kill, the same command (or `pmtool
    recover`) completes it. "events" lists what happened, as `pmtool run`'s events; exit 5
    while a `pmtool run` of the agent lives.

    Example: pmtool finish --agent-id qa_001 --outcome fail --notes "login 500s on empty password"

    Example: pmtool finish --agent-id dev_001 --outcome done --notes "$summary" --full
    """
    from pmtool.work.claim import finish, outcome_status
    from pmtool.work.finish import notes_for
    from pmtool.work.options import limits as limits_from

    settings = options().settings()
    store = record_store(settings)
    record = store.need(agent_id)
    outcome_status(record.role, outcome, record.previous_status)  # a bad outcome: exit 2 first
    if full:
        _finish_full(settings, store, agent_id, outcome, notes)
        return
    result = finish(server(settings), store, agent_id, outcome,
                    notes=notes_for(store, agent_id, outcome, notes),
                    limits=limits_from(settings))
    if result.parked:
        say(f"pmtool: task {result.task_id} parked for a person: {result.parked}")
    if result.action == "moved_on":
        why = f" ({result.reason})" if result.reason else ""
        say(f"pmtool: task {result.task_id} had moved on{why}; left as it is")
    emit(result)


def _finish_full(settings: Any, store: Any, agent_id: str, outcome: str,
                 notes: str | None) -> None:
    from pmtool.work.finish import finish_given
    from pmtool.work.options import finish_plan

    events: list[dict[str, Any]] = []

    def noted(kind: str, task_id: int | None = None, **data: Any) -> None:
        events.append({"event": kind, "task_id": task_id, **data})

    plan = finish_plan(settings)
    result = finish_given(server(settings), store, agent_id, plan, outcome, notes, noted)
    for event in events:
        if event["event"] == "parked":
            say(f"pmtool: task {event['task_id']} parked for a person: {event['reason']}")
    if result.action == "moved_on":
        say(f"pmtool: task {result.task_id} had moved on; left as it is")
    emit({**result.to_json(), "events": events})


@app.command("recover")
def recover_cmd(
    agent_id: AgentIdOrNone = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every record on this machine (the default).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report.")] = False,
    give_back: Annotated[bool, typer.Option(
        "--give-back", help="Give tasks whose runner died back to the queue instead of "
                            "keeping them for a runner to resume.")] = False,
    settle: Settle = 0.3,
    keep_logs: Annotated[float | None, typer.Option(
        help="Days of logs and transcripts to keep; older ones are deleted "
             "[env PMTOOL_KEEP_LOGS, default 30].")] = None,
    grace: Annotated[float | None, typer.Option(
        help="Seconds a dead runner's task is kept for it to come back; then it is given "
             "back, its uncommitted work rescued [env PMTOOL_GRACE, default 900].")] = None,
    orphans: Annotated[bool, typer.Option(
        "--orphans", help="Instead: put back to created every task on the server that is "
                          "under_work with no lock, or locked by an agent unseen for 30 "
                          "minutes (for the PM's cron; touches no other task).")] = False,
    as_agent: Annotated[str, typer.Option(
        "--as-agent", callback=agent_id_option,
        help=f"With --orphans: the agent id that makes the change (registered as pm if "
             f"new; {AGENT_ID_HELP}).")] = "pmtool_orphans",
    task: Annotated[list[int] | None, typer.Option(
        "--task", help="With --orphans: only these task ids (repeat the option).")] = None,
) -> None:
    """Reconcile every task record on this machine with the server.

    One entry per record: running (the runner lives: left alone), waiting (its runner died
    less than --grace ago: kept for it, not re-registered), released (given back after
    --grace with its uncommitted work rescued to the ref in `rescued` and in the task's
    notes; or lock lost, task moved on), parked (given back, but that was its last attempt
    under PMTOOL_MAX_ATTEMPTS or the task budget: parked for a person, `cause` says why),
    resume (--agent-id only: the agent's own runner continues, with the worktree and
    session id), corrupt (kept aside). stale_runner is
    true when the runner pid was dead. `parked` lists this server's tasks parked for a
    person. Unfinished temp files a killed write left (records/.*.tmp, their writer gone)
    are cleaned: `stray_temps`. Exit 3 when there were no records. Made for cron.

    With --orphans it looks at the server instead of this machine's records: every task
    under_work with no lock, or locked by an agent the server has not seen for 30 minutes
    (GET /agents last_seen), goes back to created with a note; {"orphans": [...]}; exit 0
    also when there were none.

    Example: */10 * * * * pmtool recover --all >> ~/.local/state/pmtool/recover.log 2>&1

    Example: */30 * * * * pmtool recover --orphans   # the PM's machine
    """
    from pmtool.work.options import recover_options
    from pmtool.work.recover import recover_machine, requeue_abandoned

    settings = options().settings(keep_logs=keep_logs, grace=grace)
    if orphans:
        found = requeue_abandoned(server(settings), as_agent, dry_run=dry_run,
                                task_ids=set(task) if task else None)
        for orphan in found.orphans:
            say(f"pmtool: recover --orphans: task {orphan.task_id}: {orphan.action} "
                f"({orphan.reason})")
        emit(found)
        return
    report = recover_machine(server(settings), record_store(settings), recover_options(
        settings, agent_id=agent_id, all_=all_, dry_run=dry_run, give_back=give_back,
        settle=settle))
    for held in report.parked or []:
        say(f"pmtool: recover: task {held['id']} is parked for a person: {held['reason']}")
    for entry in report.entries:
        why = f" ({entry.reason})" if entry.reason else ""
        say(f"pmtool: recover: {entry.agent_id or entry.record}: {entry.action}{why}")
    emit(report)

"""Reconcile this machine's task records with the server; give back the tasks of dead agents.

`recover` walks every record (or one agent's): a live runner's claim is left alone, a dead
one's is resumed, finished (by the `finisher` it is given, pmtool.work.finish.finisher),
released, or parked for a person when its attempts are spent (the failure policy's
`next_step` for a stop `killed`, as for the runner and exec-claude), and corrupt records
are moved aside.
`recover_machine` is `pmtool recover` as one call (cron, a pipeline and the runner share
it): the logs pruned, a killed write's temp files cleaned, the server's parked tasks
listed, then `recover`. `recover_abandoned` (`recover --orphans`, `requeue_abandoned` as one
call) gives back the tasks the server still shows locked by agents unseen for the server's
lock age. All sit above pmtool.work.claim (whose release and read they use) and
pmtool.work.finish.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as fl
from pmtool import ledger as bounds
from pmtool.errors import ApiError, NothingToDo, ServerError, UsageError, detail_text
from pmtool.faults import fault as _fault
from pmtool.models import same_task
from pmtool.records import RecordStore, TaskRecord
from pmtool.results import Result, as_json
from pmtool.work.claim import (
    DEFAULT_SETTLE,
    DEV_PICK,
    QA,
    QA_PICK,
    UNDER_WORK,
    _append_notes,
    _drop_stray_lock,
    _late_lock,
    _ours,
    _release_on_server,
    _why_not_ours,
    claim_abandoned,
    park,
    read_task,
    retake_lock,
)

if TYPE_CHECKING:
    from pmtool.client import PMApi
    from pmtool.work.finish import FinishAnswer, FinishPlan


# -- the results ---------------------------------------------------------------------------


@dataclass
class RecoverEntry(Result):
    """What recover did about one record (or one corrupt file), `action` first of all.

    Its JSON has the keys that were noted, in the order they were (a running runner's
    record says less than one given back): `note` sets fields and marks them shown.
    """

    agent_id: str | None = None
    task_id: int | None = None
    title: str | None = None
    record: str | None = None  # the record's file
    pid: int | None = None
    host: str | None = None
    step: str | None = None  # the record's last step
    worktree: str | None = None
    branch: str | None = None
    session_id: str | None = None
    model: str | None = None
    action: str | None = None  # running|resume|waiting|released|parked|finish|finished|corrupt
    stale_runner: bool | None = None
    claim_abandoned: bool | None = None
    id_reused: bool | None = None
    ended: list[int] | None = None  # pids of what the dead runner left, ended
    dead_for_s: int | None = None
    outcome: str | None = None  # the verdict of a record whose finish is completed
    reason: str | None = None
    cause: str | None = None  # why it was parked (max_attempts, task_budget...)
    result: FinishAnswer | None = None  # the completed finish's answer
    server: dict[str, Any] | None = None  # the task's status and lock on the server
    rescued: str | None = None  # the ref uncommitted work was saved to
    task: dict[str, Any] | None = None
    lock_retaken: str | None = None
    dry_run: bool | None = None
    kept_as: str | None = None  # a corrupt record: where it was kept aside
    task_error: str | None = None
    task_action: str | None = None
    _shown: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def note(self, **values: Any) -> RecoverEntry:
        names = {f.name for f in fields(self)}
        for name, value in values.items():
            if name not in names or name.startswith("_"):
                raise TypeError(f"a recover entry has no field {name}")
            setattr(self, name, value)
            if name not in self._shown:
                self._shown.append(name)
        return self

    def to_json(self) -> dict[str, Any]:
        return {name: as_json(getattr(self, name)) for name in self._shown}


@dataclass
class RecoverReport(Result):
    """`pmtool recover`'s answer: the entries, how many of each action, the chores' yield."""

    entries: list[RecoverEntry]
    counts: dict[str, int]
    dry_run: bool
    pruned: dict[str, int] | None = None  # what old logs went (None: none pruned)
    parked: list[dict[str, Any]] | None = None  # the server's parked tasks (None: unread)
    stray_temps: list[dict[str, Any]] | None = None


@dataclass
class AbandonedEntry(Result):
    """One task abandoned under work: its agent is gone (`recover --orphans`)."""

    task_id: int
    title: str | None
    locked_by: str | None
    last_seen: str | None
    reason: str
    action: str  # requeued | would_requeue | skipped


@dataclass
class AbandonedReport(Result):
    """`pmtool recover --orphans`'s answer."""

    orphans: list[AbandonedEntry]
    counts: dict[str, int]
    dry_run: bool


def _scan_readonly(store: RecordStore) -> tuple[list[tuple[Path, TaskRecord]],
                                                list[tuple[Path, str]]]:
    """Every record and every unreadable one, without moving anything (recover moves the
    corrupt ones itself, unless it is a dry run)."""
    good, corrupt = store.scan_files(quarantine=False)
    return good, [(c.path, c.reason) for c in corrupt]


DEFAULT_GRACE = 900.0  # seconds a dead runner's task is kept for it to come back


def recover(client: PMApi, store: RecordStore, agent_id: str | None = None,
            all_: bool = False, dry_run: bool = False, give_back: bool = False,
            settle: float = DEFAULT_SETTLE,
            sleep: Callable[[float], None] = time.sleep,
            grace: float = DEFAULT_GRACE, limits: fl.Limits | None = None,
            now: float | None = None,
            finisher: Callable[[TaskRecord], FinishAnswer] | None = None
            ) -> list[RecoverEntry]:
    """Reconcile the records on this machine with the server; one entry per record.

    `action` is `running` (the runner lives: left alone), `resume` (still ours and under
    work: re-registered, record kept for the runner to take over, with its worktree and
    session id), `waiting` (the runner died less than `grace` seconds ago: left for it to
    come back and resume, and *not* re-registered, so a runner that never comes back does
    not keep the task locked), `released` (given back: the server gave the lock away or
    the task moved on, or its runner has been dead longer than `grace`; its worktree's
    uncommitted work is rescued first and the rescue ref named in the task's notes as
    `rescued`), `parked` (given back as that, but it was the task's last attempt under
    `limits`: parked for a person, status pending, `cause` says why), or `corrupt`
    (quarantined). Only `agent_id` (the agent's own runner
    starting again) resumes; every record (`--all`, cron) waits or is given back. A
    record of this very process is its own and is reconciled, never `running`.
    A record whose agent had given its verdict is never released or kept waiting: its
    finish is completed (`finished`, by `finisher`, e.g. pmtool.work.finish.finish_task) or
    left to the agent's runner (`finish`, without a finisher). Before anything is done for
    a record whose runner died, the processes that runner left (its agent, hooks, anything
    working in its worktree) are ended (`ended`: their pids; pmtool.work.leftovers).
    `stale_runner` is true when the record's runner pid was dead. With `give_back`, tasks
    are given back at once, grace or not. `dry_run` changes nothing. Raises NothingToDo
    when there were no records, ServerError (records untouched) when the server cannot
    be read.
    """
    if agent_id and all_:
        raise UsageError("give --agent-id or --all, not both")
    good, bad = _scan_readonly(store)
    if agent_id:
        good = [(p, r) for p, r in good if r.agent_id == agent_id]
        bad = [(p, why) for p, why in bad if p == store.path(agent_id)]
    if not good and not bad:
        who = f"agent {agent_id}" if agent_id else "this machine"
        raise NothingToDo(f"no task records for {who} in {store.dir}")

    me = os.getpid()
    stale = {p for p, r in good if not store.is_live(r) or claim_abandoned(r) or r.pid == me}
    # Read the server before changing anything, so that an unreachable server leaves
    # every record as it was.
    tasks = {t["id"]: t for t in client.list_tasks()} if stale else {}

    entries = [recover_corrupt(client, store, path, why, dry_run) for path, why in bad]
    for path, record in good:
        entry = _entry(record, path)
        if path not in stale:
            entry.note(action="running", stale_runner=False,
                       reason=f"runner pid {record.pid} on {record.host} is live")
        else:
            entry.note(stale_runner=not store.is_live(record),
                       claim_abandoned=claim_abandoned(record))
            task = tasks.get(record.task_id)
            if task is not None and not same_task(record.task, task):
                # The id now names another task (quirk 9: ids are reused): ours is gone.
                entry.note(id_reused=True)
                task = None
            if not dry_run:
                entry.note(ended=_end_leftovers(store, record))
            if give_back_begun(record):
                give_back_now = True  # a recover killed while it gave the task back
            elif not agent_id and not give_back and record.pid != me:
                dead = _dead_for(store, record, now)
                entry.note(dead_for_s=round(dead))
                give_back_now = dead >= grace
            else:
                give_back_now = give_back
            if not _finish_phase(store, record, entry, dry_run, finisher):
                _reconcile(client, store, record, task, entry, dry_run, give_back_now,
                           settle, sleep, wait=not agent_id and not give_back_now,
                           limits=limits)
        if dry_run:
            entry.note(dry_run=True)
        entries.append(entry)
    return entries


def recover_corrupt(client: PMApi, store: RecordStore, path: Path, reason: str,
                    dry_run: bool = False) -> RecoverEntry:
    """A record that cannot be read as one: kept aside (unless `dry_run`), and its task
    given back (`action` "corrupt"; `task_error` when the server could not be asked)."""
    moved = path if dry_run else store.quarantine(path)
    entry = RecoverEntry().note(agent_id=None, record=str(path), action="corrupt",
                                kept_as=str(moved), reason=reason)
    try:
        _corrupt_task(client, moved, entry, dry_run)
    except (ApiError, ServerError) as exc:  # kept aside all the same; told in the entry
        entry.note(task_error=exc.message)
    return entry


def _corrupt_task(client: PMApi, path: Path, entry: RecoverEntry, dry_run: bool) -> None:
    """The task of a corrupt record: found from what is left of the file (its agent id and
    task id, else the agent id in its name) and the server, then given back, so it is
    never left locked or under work with nobody on it. Nothing of the file is deleted."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    agent = re.search(r'"agent_id"\s*:\s*"([^"]+)"', text)
    agent_id = agent.group(1) if agent else path.name.split(".json")[0]
    found = re.search(r'"task"\s*:\s*\{[^{}]*?"id"\s*:\s*(\d+)', text)
    entry.note(agent_id=agent_id)
    try:
        tasks = [t for t in client.list_tasks(status=UNDER_WORK)
                 if t.get("locked_by") == agent_id
                 and (found is None or t["id"] == int(found.group(1)))]
    except (ApiError, ServerError) as exc:
        entry.note(task_error=str(exc))
        return
    if not tasks:
        if found:
            entry.note(task_id=int(found.group(1)))
        entry.note(task_action="none (the server shows no task under work for this agent)")
        return
    task = tasks[0]
    entry.note(task_id=task["id"])
    # The role decides the queue it goes back to; a corrupt record cannot say, the
    # server's agent list can.
    roles = {a.get("agent_id"): a.get("role") for a in client.agents()}
    back = QA_PICK[0] if roles.get(agent_id) == QA else DEV_PICK[0]
    entry.note(task_action=f"given back to {back}")
    if not dry_run:
        _release_on_server(client, agent_id, task, back,
                           f"{agent_id}: given back by pmtool recover: the task record on "
                           f"this machine was corrupt (kept as {path})")


def _end_leftovers(store: RecordStore, record: TaskRecord) -> list[int]:
    """End what the record's dead runner left running, before its task moves on. A record
    of this very process (a runner recovering its own record) has no orphans: its children
    are its own, watchers a setup hook left on purpose included."""
    from pmtool.work import leftovers
    from pmtool.work.finish import task_tree
    from pmtool.worktree import forget_setup

    if record.pid == os.getpid():
        return []
    tree = task_tree(record)
    ended = leftovers.end(record, tree, store.state_dir)
    if ended and tree is not None:
        forget_setup(tree)  # what setup started may be among them: the resume sets up again
    return ended


def _finish_phase(store: RecordStore, record: TaskRecord, entry: RecoverEntry,
                  dry_run: bool, finisher: Callable[[TaskRecord], FinishAnswer] | None
                  ) -> bool:
    """A record whose agent gave its verdict is finished, never released (the server
    may already show the new status: that is our own doing, not someone else's). A
    verdict its runner died before noting, still in the transcript, counts too."""
    from pmtool.work.finish import kept_or_transcript_verdict, kept_verdict, transcript_verdict

    if dry_run:
        verdict = kept_verdict(record) or transcript_verdict(store, record)
    else:
        verdict = kept_or_transcript_verdict(store, record)
    if verdict is None:
        return False
    entry.note(action="finish", outcome=verdict.get("outcome"),
               reason="the agent gave its verdict; its finish is to be completed")
    if dry_run or finisher is None:
        return True
    result = finisher(record)
    entry.note(action="finished", reason=f"finish completed: {result.action} "
               f"({result.status})", result=result)
    return True


def _entry(record: TaskRecord, path: Path) -> RecoverEntry:
    return RecoverEntry().note(
        agent_id=record.agent_id, task_id=record.task_id, title=record.task.get("title"),
        record=str(path), pid=record.pid, host=record.host,
        step=(record.steps or [{}])[-1].get("step"), worktree=record.worktree,
        branch=record.branch, session_id=record.session_id, model=record.model)


def _dead_for(store: RecordStore, record: TaskRecord, now: float | None = None) -> float:
    """Seconds since the record's runner last showed life: the record's last write, its
    runner's event log, its agent's transcript (whichever is newest)."""
    from pmtool.failure_policy import parse_time

    stamps = []
    when = parse_time(record.updated_at)
    if when:
        stamps.append(when.timestamp())
    paths = [store.path(record.agent_id),
             store.state_dir / "events" / f"{store.path(record.agent_id).stem}.jsonl"]
    paths += [Path(s["log"]) for s in record.steps if s.get("log")][-1:]
    for path in paths:
        with contextlib.suppress(OSError):
            stamps.append(path.stat().st_mtime)
    last = max(stamps) if stamps else 0.0
    return max(0.0, (now if now is not None else time.time()) - last)


def _rescue_worktree(record: TaskRecord) -> str | None:
    """Save the uncommitted work of a dead runner's worktree to a rescue ref, remove the
    worktree; the ref, or None when there was nothing to save (or no worktree)."""
    from pmtool.errors import PmtoolError
    from pmtool.worktree import remove_worktree, repo_root

    if not record.worktree or not Path(record.worktree).is_dir() \
            or record.task.get("complexity") == "minor":
        return None
    try:
        answer = remove_worktree(repo_root(record.worktree), record.worktree, rescue=True)
    except PmtoolError:
        return None
    return answer.rescued.ref if answer.rescued else None


GIVE_BACK_STEP = "recover-give-back"


def give_back_begun(record: TaskRecord) -> dict[str, Any] | None:
    """The step of a give-back by recover that a kill cut short: the worktree is gone (its
    work on the rescue ref it names), so the next recover completes it, grace or not."""
    return next((s for s in reversed(record.steps) if s.get("step") == GIVE_BACK_STEP), None)


def _begin_give_back(store: RecordStore, record: TaskRecord, why: str
                     ) -> tuple[str | None, str, list[Mapping[str, Any]]]:
    """Rescue the worktree and count the attempt, once per claim, noted in the record
    before the server is told: a recover killed in between is completed by the next one
    with the same rescue ref in the notes, and the attempt counted once. Answers the
    rescue ref, the note, and the task's attempt rows (this one's included)."""
    begun = give_back_begun(record)
    if begun is None:
        rescued = _rescue_worktree(record)
        note = _give_back_note(why, rescued)
        record.step(GIVE_BACK_STEP, rescued=rescued, note=note)
        store.save(record)
    else:
        rescued, note = begun.get("rescued"), str(begun.get("note") or why)
    return rescued, note, _with_killed_attempt(store, record, note, write=True)


def _give_back_note(why: str, rescued: str | None = None) -> str:
    """The give-back's words, in the task's notes and its attempt line."""
    return f"given back by pmtool recover ({why})" + (
        f"; uncommitted work saved at {rescued}" if rescued else "")


def _with_killed_attempt(store: RecordStore, record: TaskRecord, note: str, write: bool
                         ) -> list[Mapping[str, Any]]:
    """The task's attempt rows on this machine with this claim's `killed` attempt last:
    written once per claim, or (`write` False: a dry run) only looked at."""
    ledger = bounds.Ledger(store.state)
    rows = fl.attempts_of(ledger.lines(), record.task)
    if any(line.get("claimed_at") == record.claimed_at
           and line.get("agent_id") == record.agent_id for line in rows):
        return rows
    if write:
        line = bounds.account(ledger, record.task, record.agent_id, outcome="given_back",
                              kind=fl.KILLED, cost_usd=record.cost_usd, reason=note,
                              claimed_at=record.claimed_at)
    else:
        line = fl.attempt_line(record.task, record.agent_id, outcome="given_back",
                               kind=fl.KILLED, cost_usd=record.cost_usd, reason=note,
                               claimed_at=record.claimed_at)
    return [*rows, line]


def _next_step(store: RecordStore, record: TaskRecord, note: str,
               limits: fl.Limits | None) -> fl.GiveBack | fl.Park:
    """The failure policy's step for a dead runner's task (as for a run without a verdict:
    pmtool.failure_policy.next_step, stop kind `killed`, what the claim tried from its
    record): the claim cannot go on, so a give-back, or a park when it is the last."""
    from pmtool.work.exec import tried_from_record

    tried = replace(tried_from_record(record, store), runner_gone=True)
    step = fl.next_step({"kind": fl.KILLED}, tried, fl.StepLimits(limits=limits or fl.Limits()),
                        why=note)
    assert isinstance(step, fl.GiveBack | fl.Park)
    return step


def _park_given_back(client: PMApi, store: RecordStore, record: TaskRecord,
                     entry: RecoverEntry, step: fl.Park, note: str,
                     rows: list[Mapping[str, Any]], dry_run: bool) -> None:
    """The give-back was the task's last attempt: park it for a person (status pending,
    the attempts in its notes, the park comment and line), as release does."""
    if not dry_run:
        answer = park(client, store, record.agent_id, step.reason, cause=step.cause,
                      notes=f"{record.agent_id}: {note}\n" + bounds.attempts_note(rows))
        if answer.action != "parked":  # moved on meanwhile: left as it is
            entry.note(action="released", reason=answer.reason)
            return
    entry.note(action="parked", cause=step.cause,
               reason=f"parked for a person: {step.reason}")


def _reconcile(client: PMApi, store: RecordStore, record: TaskRecord,
               task: dict[str, Any] | None, entry: RecoverEntry, dry_run: bool,
               give_back: bool, settle: float, sleep: Callable[[float], None],
               wait: bool = False, limits: fl.Limits | None = None) -> None:
    """Decide and (unless dry_run) do what a record whose runner died calls for."""
    agent_id = record.agent_id
    entry.note(server={"status": task.get("status"), "locked_by": task.get("locked_by")}
               if task else None)

    def released(reason: str) -> None:
        entry.note(action="released", reason=reason)
        if not dry_run:
            store.close(record, "released", reason=reason, status=(task or {}).get("status"))

    late = not _ours(task, record) and _late_lock(client, record, task)
    if not _ours(task, record) and not late:
        if task and task.get("locked_by") == agent_id:
            # The claim died between the lock and under_work: no work was done, so the
            # task goes back to the queue rather than stay locked with no runner on it.
            if not dry_run:
                _drop_stray_lock(client, record, task)
            released(f"the claim stopped before under_work; lock released "
                     f"(status {task.get('status')})")
        else:
            released(_why_not_ours(task, agent_id))
        return
    assert task is not None
    if give_back:
        dead = entry.dead_for_s
        why = "runner gone" + (f" for {dead}s" if dead is not None else "")
        if dry_run:
            note = _give_back_note(why)
            rows = _with_killed_attempt(store, record, note, write=False)
        else:
            rescued, note, rows = _begin_give_back(store, record, why)
            entry.note(rescued=rescued)
            _fault("give-back")
        step = _next_step(store, record, note, limits)
        if isinstance(step, fl.Park):
            _park_given_back(client, store, record, entry, step, note, rows, dry_run)
            return
        if not dry_run:
            _release_on_server(client, agent_id, task, record.previous_status,
                               f"{agent_id}: {note}")
        released(f"given back to the queue ({record.previous_status}; {why})")
        return
    if wait:
        entry.note(action="waiting",
                   reason=f"runner gone {entry.dead_for_s}s ago; kept for it to resume "
                          "until the grace has passed, then given back (not re-registered)")
        return

    entry.note(action="resume", reason="still ours and under work")
    if dry_run:
        entry.note(task=task)
        return
    # Re-register first: a dead runner sent no heartbeat, and its lock goes to the next
    # agent that asks for work once last_seen is 30 minutes old (quirk 3).
    client.register(agent_id, record.role, record.level)
    if late:
        taken_from = retake_lock(client, record, settle, sleep)
        if taken_from is None:
            released(f"the lock went to {task.get('locked_by')} and could not be taken back")
            return
        entry.note(reason=f"still ours; took back the lock from {taken_from}, whose lock "
                          "had landed after the claim settled", lock_retaken=taken_from)
        task = read_task(client, record.task_id, status=UNDER_WORK) or task
    if task.get("locked_by") is None:
        # The lock ran out, but nobody can have been handed an under_work task since:
        # lock it again, with the claim's settle-and-verify, and resume.
        entry.note(reason="the lock had expired; locked again")
        with contextlib.suppress(ApiError):
            client.lock(task["id"], agent_id)
        sleep(settle)
        task = read_task(client, task["id"], status=UNDER_WORK)
        if not task or task.get("locked_by") != agent_id:
            released("the lock had expired and went to "
                     f"{(task or {}).get('locked_by') or 'nobody'}")
            return
    record.task = task
    record.step("recovered", action="resume", stale_pid=record.pid)
    store.save(record)
    entry.note(task=task)


# The server drops the locks of agents unseen for this long (contract, "How the server
# picks the next task").
SERVER_LOCK_AGE = 30 * 60


def _agents_seen(client: PMApi) -> dict[str | None, str | None]:
    return {a.get("agent_id"): a.get("last_seen") for a in client.agents()}


def _still_abandoned(client: PMApi, task: dict[str, Any], max_age: float, now: Any) -> bool:
    """Read again just before the change: its agent may have re-registered (a heartbeat
    after a network gap), or someone may have moved the task, since the list was read."""
    from pmtool.state import parse_time

    fresh = read_task(client, task["id"], status=UNDER_WORK)
    if not fresh or fresh.get("status") != UNDER_WORK \
            or fresh.get("locked_by") != task.get("locked_by") \
            or fresh.get("created_at") != task.get("created_at"):
        return False
    holder = fresh.get("locked_by")
    if not holder:
        return True
    when = parse_time(_agents_seen(client).get(holder))
    return when is None or (now - when).total_seconds() > max_age


def recover_abandoned(client: PMApi, agent_id: str, dry_run: bool = False,
                    max_age: float = SERVER_LOCK_AGE, task_ids: set[int] | None = None,
                    now: Any = None) -> list[AbandonedEntry]:
    """Put back to `created`, with a note, every task that is `under_work` with no lock, or
    locked by an agent unseen for more than `max_age` seconds (GET /agents last_seen).

    For the PM's cron: such a task is never offered again by the server, and the runner
    that had it is gone. A guest on the server: only tasks in that state are touched (and
    only `task_ids`, when given). `agent_id` is who makes the change (registered as
    needed by the caller). Returns one entry per abandoned task: `{"task_id", "title",
    "locked_by", "last_seen", "reason", "action": "requeued"|"would_requeue"|"skipped"}`.
    """
    from datetime import UTC, datetime

    from pmtool.state import parse_time

    tasks = client.list_tasks(status=UNDER_WORK)
    if task_ids is not None:
        tasks = [t for t in tasks if t["id"] in task_ids]
    seen = _agents_seen(client) if any(t.get("locked_by") for t in tasks) else {}
    if now is None and seen:
        # The server's clock, not ours: last_seen is its time, and machines drift.
        with contextlib.suppress(ApiError, ServerError):
            now = parse_time(client.health().get("timestamp"))
    now = now or datetime.now(UTC)
    entries: list[AbandonedEntry] = []
    for task in tasks:
        holder = task.get("locked_by")
        last_seen = seen.get(holder) if holder else None
        if holder:
            when = parse_time(last_seen)
            age = (now - when).total_seconds() if when else None
            if age is not None and age <= max_age:
                continue  # its agent is alive (it re-registers while it works)
            reason = (f"locked by {holder}, unseen for {age / 60:.0f} minutes" if age is not None
                      else f"locked by {holder}, an agent the server does not list")
        else:
            reason = "under work with no lock"
        entry = AbandonedEntry(task["id"], task.get("title"), holder, last_seen, reason,
                            "would_requeue" if dry_run else "requeued")
        if not dry_run and not _still_abandoned(client, task, max_age, now):
            entry.action, entry.reason = "skipped", f"{reason}; but it changed meanwhile"
        elif not dry_run:
            note = (f"pmtool recover --orphans ({agent_id}): put back to created: {reason}; "
                    "the work of the agent that had it may be on its branch or a "
                    "refs/pmtool/rescue ref on its machine")
            try:
                # Moving it out of under_work drops the stale lock (no unlock endpoint).
                client.set_status(task["id"], agent_id, "created",
                                  notes=_append_notes(task, note))
            except ApiError as exc:
                entry.action = "skipped"
                entry.reason = f"{reason}; {detail_text(exc.detail)}"
        entries.append(entry)
    return entries


def requeue_abandoned(client: PMApi, agent_id: str, dry_run: bool = False,
                    task_ids: set[int] | None = None) -> AbandonedReport:
    """`pmtool recover --orphans` as one call: `agent_id` registered (as pm, unless a dry
    run changes nothing), then `recover_abandoned`, with how many of each action."""
    if not dry_run:
        client.register(agent_id, "pm", "principal")
    found = recover_abandoned(client, agent_id, dry_run=dry_run, task_ids=task_ids)
    return AbandonedReport(found, dict(Counter(e.action for e in found)), dry_run)


# -- `pmtool recover` as one call ------------------------------------------------------------


@dataclass(frozen=True)
class RecoverOptions:
    """What one recover does (pmtool.work.options.recover_options builds it from settings).

    `plan` completes the finish of a record whose agent gave its verdict (None: left to
    its runner, `action` "finish"); `keep_logs` days of logs are kept, older ones pruned
    (None: none); `chores` also cleans a killed write's temp files and lists the server's
    parked tasks (the machine's, not one runner's: a runner recovering its own record
    leaves them to cron)."""

    agent_id: str | None = None  # only this agent's record (its runner resumes it)
    all_: bool = False
    dry_run: bool = False
    give_back: bool = False  # give dead runners' tasks back now, grace or not
    settle: float = DEFAULT_SETTLE
    grace: float = DEFAULT_GRACE
    limits: fl.Limits = field(default_factory=fl.Limits)
    plan: FinishPlan | None = None
    keep_logs: float | None = None
    chores: bool = True


def recover_machine(client: PMApi, store: RecordStore, options: RecoverOptions
                    ) -> RecoverReport:
    """`pmtool recover`: old logs pruned, a killed write's temp files cleaned, the
    server's parked tasks listed, then every record reconciled (`recover`). Cron, a
    pipeline and the runner (for its own record) share it. Raises what `recover` raises;
    its NothingToDo carries `parked` and `stray_temps` too."""
    from pmtool.errors import PmtoolError
    from pmtool.ledger import parked_tasks
    from pmtool.state import prune_logs
    from pmtool.work.finish import finisher

    o = options
    pruned = (prune_logs(store.state_dir, o.keep_logs)
              if o.keep_logs is not None and not o.dry_run else None)
    strays = store.state.stray_temps(quarantine=not o.dry_run) if o.chores else None
    parked = None
    if o.chores:
        with contextlib.suppress(PmtoolError):  # recover itself says if the server is away
            parked = parked_tasks(client)
    try:
        entries = recover(client, store, agent_id=o.agent_id, all_=o.all_,
                          dry_run=o.dry_run, give_back=o.give_back, settle=o.settle,
                          grace=o.grace, limits=o.limits,
                          finisher=finisher(client, store, o.plan) if o.plan else None)
    except NothingToDo as exc:
        exc.details.update(parked=parked, stray_temps=strays)
        raise
    return RecoverReport(entries, dict(Counter(str(e.action) for e in entries)), o.dry_run,
                         pruned=pruned, parked=parked, stray_temps=strays)

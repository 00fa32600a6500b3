"""Taking work safely: register, claim, lock a named task, finish, release, recover.

A task is worked by exactly one agent, and a crash at any moment loses nothing. The claim
protocol (see ../shared/headless-pm-api.md for the quirks it survives):

1. take the agent's own claim lock (two processes never claim for one agent at once; no
   machine-wide lock: claims of different agents proceed in parallel, and a race between
   them is what the read-back of step 4 settles);
2. find a candidate with `GET /tasks/next?simulate=true` (one immediate check: a long poll
   would hold a server thread, quirk 5), or take the one the machine's poller saw
   (`first`, pmtool.run.poller); waiting polls with capped backoff and jitter;
3. write a `claiming` record, then `POST /tasks/{id}/lock`; a 409 or a lost race means
   "try another": the other free tasks are listed, and one of the oldest few is drawn;
4. sleep `settle` seconds so every lock request still in flight has landed, read the task
   back (filtered by status and role, so the read costs the same however many finished
   tasks the server keeps) and go on only if `locked_by` is still us: the server
   double-locks (quirk 2);
5. set `under_work` (notes say agent, host and runner pid) and write the record again.

A record is written before each server call that changes something, so `recover` can always
tell what a killed process left behind. The library never prints and never exits: it returns
plain data and raises `pmtool.errors` types.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as fl
from pmtool import ledger as bounds
from pmtool.config import LEVELS, check_level
from pmtool.errors import (
    ApiError,
    Conflict,
    NothingToDo,
    ServerError,
    UsageError,
    detail_text,
)
from pmtool.faults import FAULT_ENV  # noqa: F401 (re-exported)
from pmtool.faults import fault as _fault
from pmtool.records import RecordStore, TaskRecord, now_iso, process_started
from pmtool.results import Result
from pmtool.state import make_dir, open_private, safe_name

if TYPE_CHECKING:
    from pmtool.client import PMApi
    from pmtool.worktree import Workspace, WorktreeOptions

# Longer than the server's in-flight lock window: a lock request that passed the server's
# check before ours was written lands within that window (quirk 2). The stand-in's race
# switch widens the window, so tests set both.
DEFAULT_SETTLE = 0.3
# Polling while waiting: start quick so a fresh task is picked up fast, back off to a cap
# that keeps 100 idle claimers at ~50 cheap requests a second in all.
POLL_FIRST = 0.25
POLL_CAP = 2.0
# After a lost race, the next candidate is drawn from this many of the oldest free tasks.
SPREAD = 8

QA = "qa"
UNDER_WORK = "under_work"
# Statuses the server's pick takes tasks from, per role family (contract: "How the server
# picks the next task"); `approved` is legacy but still picked.
DEV_PICK = ("created", "approved")
QA_PICK = ("dev_done",)

# Test-only fault injection (pmtool.faults): PMTOOL_FAULT=after-lock kills the claiming
# process at that point, so tests can check that `recover` copes with a crash anywhere.
FAULT_POINTS = ("before-lock", "after-lock", "after-status", "after-record")

RECOVER_HINT = "the record keeps the claim; run `pmtool recover` when the server is back"


@dataclass(frozen=True)
class ClaimOptions:
    """How a claim looks and takes: the knobs that travel together from the settings
    (pmtool.work.options.claim_options) to `claim`.

    `wait`: seconds to keep looking (0 = look once); `settle`: the pause before the
    read-back (step 4); `limits` bound the work (pmtool.failure_policy); `explain`: say
    why nothing came (NothingToDo's `why`); `register_first`: register once a task is
    offered (a caller that registers itself passes False); `on_wait(waited, left)` is told
    of each pause between two looks; `sleep` is how the claim pauses (tests pass a fake).
    """

    wait: float = 0.0
    settle: float = DEFAULT_SETTLE
    limits: fl.Limits = field(default_factory=fl.Limits)
    explain: bool = True
    register_first: bool = True
    on_wait: Callable[[float, float], None] | None = None
    sleep: Callable[[float], None] = time.sleep


@dataclass
class ClaimStats(Result):
    """What a claim went through: how often it looked, and how it lost."""

    polls: int = 0
    tried: int = 0
    conflicts: int = 0  # the lock call answered 409: someone had it already
    losses: int = 0  # the lock call answered 200, but the read-back showed another agent
    elapsed: float = 0.0
    cooling: dict[int, str] = field(default_factory=dict)  # task id -> may be claimed at
    parked: list[dict[str, Any]] = field(default_factory=list)  # parked by this claim

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["elapsed"] = round(self.elapsed, 3)
        return out


@dataclass
class Claimed(Result):
    """A claim's answer: the task as the server has it (wire data), the record and where
    it lives, and (for `claim`) what the claim went through."""

    task: dict[str, Any]
    record: TaskRecord
    path: Path
    stats: ClaimStats | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "record": str(self.path)}
        if self.stats is not None:
            out["claim"] = self.stats.to_json()
        return out


def _only(result: Result, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named fields of `result` as JSON: the keys its case has always answered."""
    return {key: getattr(result, key) for key in keys}


@dataclass
class Parked(Result):
    """`park`'s answer: `action` is `parked`, or `moved_on` (someone else moved the task
    meanwhile; `reason` then says how). `task` is the server's row (wire data)."""

    task_id: int
    action: str
    cause: str
    status: str | None
    reason: str
    task: dict[str, Any] | None


@dataclass
class Released(Result):
    """`release`'s answer: `action` is `released`, `parked` (with `parked` the reason,
    `cause` and `status` from the park) or `moved_on` (with `reason`). `attempt` is the
    attempt line kept on this machine (None for a stray lock dropped, or moved on)."""

    task_id: int
    action: str
    task: dict[str, Any] | None
    attempt: dict[str, Any] | None = None
    cooling_until: str | None = None
    reason: str | None = None
    parked: str | None = None
    cause: str | None = None
    status: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.parked is not None:
            keys: tuple[str, ...] = ("task_id", "action", "cause", "status", "reason",
                                     "task", "parked", "attempt")
        elif self.action == "moved_on":
            keys = ("task_id", "action", "task", "reason")
        elif self.attempt is not None:
            keys = ("task_id", "action", "task", "attempt", "cooling_until")
        else:  # a stray lock dropped: no attempt to speak of
            keys = ("task_id", "action", "task")
        return _only(self, keys)


@dataclass
class Finished(Result):
    """`finish`'s answer: `action` is `finished` (parked too: `parked` says why, with
    `cause` and `reason`) or `moved_on` (with `reason`). `task` is the server's row."""

    task_id: int
    action: str
    outcome: str
    status: str | None
    task: dict[str, Any] | None
    lock_expired: bool | None = None
    reason: str | None = None
    parked: str | None = None
    cause: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.parked is not None:
            keys: tuple[str, ...] = ("task_id", "action", "cause", "status", "reason",
                                     "task", "outcome", "parked", "lock_expired")
        elif self.action == "moved_on":
            keys = ("task_id", "action", "outcome", "status", "task", "reason")
        else:
            keys = ("task_id", "action", "outcome", "status", "task", "lock_expired")
        return _only(self, keys)


@dataclass
class ShownRecord(Result):
    """`show`'s answer: the agent's record, where it lives, whether its runner is live."""

    record: TaskRecord
    path: Path
    live: bool

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record.to_json(), "path": str(self.path), "live": self.live}


# -- small helpers ------------------------------------------------------------------------


def _level_rank(level: str | None) -> int:
    return LEVELS.index(level) if level in LEVELS else 0


def _append_notes(task: dict[str, Any] | None, extra: str | None) -> str | None:
    """The notes to send with a status change: the task's own notes, plus `extra`.

    `notes` in a status update replaces the task's notes (contract, "Status flow"), so
    every status change pmtool makes carries the old notes forward instead of wiping them.
    """
    old = (task or {}).get("notes") or ""
    if not extra:
        return old or None
    # Blank-line separated, as the server joins comments.
    return f"{old.rstrip()}\n\n{extra}" if old.strip() else extra


def _discard(store: RecordStore, record: TaskRecord) -> None:
    """Drop a record that never held anything (the lock was lost or refused)."""
    store.path(record.agent_id).unlink(missing_ok=True)


def read_task(client: PMApi, task_id: int, status: str | None = None,
              role: str | None = None) -> dict[str, Any] | None:
    """One task as the server has it now, or None if it is gone.

    There is no single-task read (quirk 1): list, filtered by the expected status and the
    task's target role when known because that list is short, then by the role alone if
    the task has moved on (a task never changes its role; unfiltered without one).
    """
    if status:
        task = _pick_task(client.list_tasks(status=status, role=role), task_id)
        if task is not None:
            return task
    return _pick_task(client.list_tasks(role=role), task_id)


def _pick_task(tasks: list[dict[str, Any]] | None, task_id: int) -> dict[str, Any] | None:
    return next((t for t in tasks or [] if t.get("id") == task_id), None)


# -- register -----------------------------------------------------------------------------


def register(client: PMApi, agent_id: str, role: str, level: str) -> dict[str, Any]:
    """Register the agent, or refresh its `last_seen` (this is also the heartbeat).

    Returns the server's answer (`agent`, `next_task`, `mentions`). Raises Conflict when the
    server kept another role or level for this id (quirk 4), UsageError when the server
    refuses the role (with the roles it accepts in `valid`).
    """
    check_level(level)
    try:
        answer = client.register(agent_id, role, level)
    except ApiError as exc:
        if exc.status != 422:
            raise
        raise _refused(exc, f"the server refused to register {agent_id} as {role}/{level}"
                       ) from None
    agent = (answer or {}).get("agent") or {}
    kept = (agent.get("role"), agent.get("level"))
    if kept != (role, level):
        raise Conflict(
            f"agent {agent_id} is registered on the server as {kept[0]}/{kept[1]}, "
            f"not {role}/{level}; the server keeps the first role and level of an id",
            hint="use another --agent-id, or the role and level it has",
            registered={"role": kept[0], "level": kept[1]})
    return answer


def _refused(exc: ApiError, what: str) -> UsageError:
    """The server's 422 about a role (or level) as a usage error naming the valid ones."""
    valid = _valid_values(exc.detail, "role")
    hint = ("valid roles: " + ", ".join(valid)) if valid else "see the server's roles"
    return UsageError(f"{what}: {detail_text(exc.detail)}", hint=hint, valid=valid)


def _valid_values(detail: Any, field: str) -> list[str]:
    """The allowed values from a pydantic enum error about `field` (`ctx.expected`)."""
    if not isinstance(detail, list):
        return []
    for item in detail:
        if isinstance(item, dict) and field in (item.get("loc") or []):
            expected = (item.get("ctx") or {}).get("expected") or item.get("msg") or ""
            return re.findall(r"'([^']+)'", str(expected))
    return []


# -- claim --------------------------------------------------------------------------------


def claim(client: PMApi, store: RecordStore, agent_id: str, role: str, level: str,
          options: ClaimOptions | None = None, *, runner_pid: int | None = None,
          stats: ClaimStats | None = None, first: dict[str, Any] | None = None) -> Claimed:
    """Take the next task for the role and level and make it this agent's.

    `options` (ClaimOptions; pmtool.work.options.claim_options builds them from the
    settings) say how: it looks once when `options.wait` is 0, else polls until a task is
    claimed or `wait` seconds have passed. Returns `Claimed(task, record, path, stats)`:
    the task as the server has it after `under_work` was set, the record and where it
    lives. `stats` (filled in place, also when nothing was claimed) counts polls, 409s and
    lost races, and lists the tasks that were cooling down and those parked. `limits`
    bound the work (pmtool.failure_policy): a task given back is not taken again by this
    machine before its cooldown, one that has had its attempts (or QA fails, or budget)
    is parked for a person instead. Raises NothingToDo when no task came (with `why`,
    unless `explain` is False), Conflict when the agent already has a record or a running
    `pmtool run` of its own. `first` is a task the caller saw offered (the machine's
    poller): the first round tries it instead of asking the server's pick again.
    `on_wait(waited, left)` is told of each pause between two looks (seconds so far and
    to go), e.g. to show a person it is waiting.

    With `register_first`, the agent is registered once a task is offered, right before
    it is locked (or parked), not before the look: a look needs no agent on the server,
    a lock does, and a fresh `last_seen` then is what keeps the lock (quirk 3). So a
    claim that finds nothing costs the server no registration; a role or level the
    server keeps otherwise for this id (quirk 4) shows when there is a task to take. A
    caller that registers itself (`pmtool run`, on its heartbeat) passes False.
    """
    opts = options or ClaimOptions()
    wait, settle, sleep, limits = opts.wait, opts.settle, opts.sleep, opts.limits
    stats = stats if stats is not None else ClaimStats()
    start = time.monotonic()
    runner_pid = runner_pid or os.getpid()
    check_level(level)
    _refuse_if_busy(store, agent_id)
    _refuse_if_runner(store, agent_id, runner_pid)
    registered = not opts.register_first

    def on_offer() -> None:
        nonlocal registered
        if not registered:  # once per claim, however many candidates it tries
            register(client, agent_id, role, level)
            registered = True

    deadline = start + max(wait, 0.0)
    delay = POLL_FIRST
    try:
        while True:
            with agent_claim_lock(store, agent_id, timeout=max(60.0, wait)):
                # Again under the lock: another process may have claimed for this agent.
                _refuse_if_busy(store, agent_id)
                claimed = _claim_round(client, store, agent_id, role, level, runner_pid,
                                       settle, stats, sleep, limits, first, on_offer)
                first = None
            if claimed:
                claimed.stats = stats
                return claimed
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if opts.on_wait:
                opts.on_wait(time.monotonic() - start, left)
            # Full jitter keeps many idle claimers from polling in step.
            sleep(min(left, delay * random.uniform(0.5, 1.0)))
            delay = min(POLL_CAP, delay * 2)
    finally:
        stats.elapsed = time.monotonic() - start
    why = why_nothing(client, role, level, stats.cooling) if opts.explain else []
    raise NothingToDo(f"no task for {role}/{level} "
                      + (f"within {wait:g}s" if wait else "right now")
                      + (f": {why[0]}" if why else ""),
                      hint="--wait SECONDS keeps looking", why=why, **stats.to_json())


def why_nothing(client: PMApi, role: str, level: str,
                cooling: dict[int, str] | None = None) -> list[str]:
    """Why no task was found for the role and level (see preflight.explain_nothing).

    Asks only for the tasks that can explain it, filtered by status and role: those the
    role picks from, then (only when none of them is free) the pending ones. So its cost
    does not grow with the finished tasks the server keeps (it listed them all before).
    """
    from pmtool.errors import PmtoolError
    from pmtool.preflight import explain_nothing

    family = None if role == QA else role  # QA picks dev_done tasks of every role
    try:
        ready = client.list_tasks(status=QA_PICK[0] if role == QA else DEV_PICK[0],
                                  role=family)
        if not explain_nothing(ready, role, level, cooling, pending=[]):
            return []  # a free task is there (it came after the look)
        pending = client.list_tasks(status="pending", role=family)
    except PmtoolError:
        return []
    return explain_nothing(ready, role, level, cooling, pending=pending)


def _refuse_if_runner(store: RecordStore, agent_id: str, runner_pid: int) -> None:
    """A running `pmtool run` of this agent owns its claims: a manual claim next to it
    would hand the runner a record it did not make."""
    import fcntl

    path = store.runner_lock(agent_id).path
    if not path.exists():
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            pid = int(holder) if holder.isdigit() else None
            if pid in (os.getpid(), runner_pid):
                return  # the runner itself claiming
            raise Conflict(f"agent {agent_id} has a running `pmtool run` on this machine "
                           f"(pid {holder or '?'}); it claims its own tasks",
                           hint="stop that runner, or claim with another --agent-id",
                           pid=pid) from None
        fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def agent_claim_lock(store: RecordStore, agent_id: str,
                     timeout: float = 60.0) -> Iterator[None]:
    """One claim at a time for one agent id on this machine (a manual `pmtool claim` next
    to a runner of the same id). Claims of different agents never wait for each other:
    a machine-wide lock held through the settle serialised a machine's runners (10 runners
    drained 50 tasks in 18 s instead of 6 s)."""
    path = store.state.runners_dir / f"{safe_name(agent_id)}.claim"
    make_dir(path.parent)
    with open_private(path) as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Conflict(f"another pmtool on this machine has been claiming for "
                                   f"agent {agent_id} for more than {timeout:g}s") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


INCOMPLETE_STEPS = ("claiming", "locked", UNDER_WORK)


def claim_abandoned(record: TaskRecord) -> bool:
    """True when the record's claim stopped midway and the process making it is gone.

    The runner (the shell driving a pipeline) may well live on after `pmtool claim` was
    killed, so its pid alone cannot tell that such a record needs recovering.
    """
    from pmtool.records import pid_alive

    last = record.steps[-1] if record.steps else {}
    if last.get("step") not in INCOMPLETE_STEPS:
        return False
    first: dict[str, Any] = next(
        (s for s in reversed(record.steps) if s.get("step") == "claiming"), {})
    pid = first.get("claim_pid")
    return isinstance(pid, int) and pid != os.getpid() \
        and not pid_alive(pid, first.get("claim_started"))


def _refuse_if_busy(store: RecordStore, agent_id: str) -> None:
    record = store.get(agent_id)
    if record is None:
        return
    live = store.is_live(record)
    runner = f"runner pid {record.pid} is {'live' if live else 'gone'}"
    if claim_abandoned(record):
        runner += "; its claim stopped midway"
    raise Conflict(f"agent {agent_id} already has task {record.task_id} ({runner})",
                   hint="finish or release it, or run `pmtool recover`",
                   task_id=record.task_id, pid=record.pid, live=live,
                   record=str(store.path(agent_id)))


def _claim_round(client: PMApi, store: RecordStore, agent_id: str, role: str, level: str,
                 runner_pid: int, settle: float, stats: ClaimStats,
                 sleep: Callable[[float], None], limits: fl.Limits,
                 offered: dict[str, Any] | None = None,
                 on_offer: Callable[[], None] | None = None) -> Claimed | None:
    """One look for work: the server's pick (or the task `offered` by the machine's
    poller), then (after a loss, or when the pick is cooling down or was parked) the
    other candidates. `on_offer` runs once there is a task, before anything is done as
    the agent (a lock, or parking an exhausted task): the registration."""
    if offered is None:
        stats.polls += 1
    try:
        first = offered or client.next_task(role, level, simulate=True)
    except ApiError as exc:
        if exc.status != 422:
            raise
        raise _refused(exc, f"the server refused to look for {role}/{level} tasks") from None
    if not first:
        return None
    if on_offer:
        on_offer()
    ledger = bounds.Ledger(store.state)
    screen = bounds.new_screen(ledger, limits, role, agent_id)
    tried: set[int] = set()
    candidates: list[dict[str, Any]] | None = None
    task: dict[str, Any] | None = first
    try:
        while task is not None:
            tried.add(task["id"])
            action = bounds.screen_task(client, ledger, screen, task)
            if action == "claim":
                claimed = _take(client, store, task, agent_id, role, level, runner_pid,
                                settle, stats, sleep)
                if claimed:
                    return claimed
            # /tasks/next only ever names the oldest task, which someone else now has (or
            # we may not take): find the other unlocked candidates ourselves, oldest
            # first, as the server would.
            if candidates is None:
                candidates = _candidates(client, role, level)
            left = [c for c in candidates if c["id"] not in tried]
            if action != "claim":
                task = left[0] if left else None  # no race to scatter from
            else:
                # Losers of one race would all stampede to the same next-oldest task and
                # race again; a random pick among the oldest few scatters them.
                task = random.choice(left[:SPREAD]) if left else None
        return None
    finally:
        stats.cooling.update(screen.cooling)
        stats.parked.extend(screen.parked)


def _candidates(client: PMApi, role: str, level: str) -> list[dict[str, Any]]:
    """Unlocked tasks the server could hand this role and level, oldest first."""
    if role == QA:
        tasks = client.list_tasks(status=QA_PICK[0])
    else:
        # `approved` is legacy: /tasks/next still names such a task, but we do not list them.
        tasks = client.list_tasks(status=DEV_PICK[0], role=role)
    rank = _level_rank(level)
    fit = [t for t in tasks
           if not t.get("locked_by")
           and (role == QA or (t.get("target_role") == role
                               and _level_rank(t.get("difficulty")) <= rank))]
    return sorted(fit, key=lambda t: (t.get("created_at") or "", t["id"]))


def _take(client: PMApi, store: RecordStore, task: dict[str, Any], agent_id: str, role: str,
          level: str, runner_pid: int, settle: float, stats: ClaimStats,
          sleep: Callable[[float], None]) -> Claimed | None:
    """Lock one task, verify the lock after it settled, set under_work; None if lost."""
    try:
        return _take_steps(client, store, task, agent_id, role, level, runner_pid, settle,
                           stats, sleep)
    except ServerError as exc:
        if store.path(agent_id).exists():
            # The lock may or may not have landed; the record lets recover ask the server.
            exc.hint = RECOVER_HINT
        raise


def _take_steps(client: PMApi, store: RecordStore, task: dict[str, Any], agent_id: str,
                role: str, level: str, runner_pid: int, settle: float, stats: ClaimStats,
                sleep: Callable[[float], None]) -> Claimed | None:
    stats.tried += 1
    task_id = task["id"]
    record = TaskRecord(agent_id=agent_id, role=role, level=level, server_url=client.url,
                        task=task, previous_status=task["status"], pid=runner_pid,
                        pid_started=process_started(runner_pid), branch=task.get("branch"))
    # Written before the lock call: if we die between the call and its answer, recover
    # finds the record and asks the server whose lock it is.
    record.step("claiming", claim_pid=os.getpid(), claim_started=process_started(os.getpid()))
    store.save(record)
    _fault("before-lock")
    try:
        locked = client.lock(task_id, agent_id)
    except ApiError as exc:
        if exc.status in (404, 409):  # taken meanwhile, or deleted: not our problem
            _discard(store, record)
            stats.conflicts += 1
            return None
        raise
    record.task = locked or task
    record.step("locked")
    store.save(record)
    _fault("after-lock")

    sleep(settle)
    now = read_task(client, task_id, status=task["status"], role=task.get("target_role"))
    if not now or now.get("locked_by") != agent_id:
        # Another agent's lock landed after ours (quirk 2): the task is theirs. Our lock
        # was overwritten on the server, so there is nothing to give back.
        stats.losses += 1
        _discard(store, record)
        return None
    if now.get("status") != task["status"]:
        # The task moved on before our lock landed (the lock endpoint looks at no status):
        # finished by then (a candidate seen a moment too early), or under work by the
        # agent that took it first. Never work it again; a lock of ours on a task nobody
        # works would keep it from the next role, so it is put down, status as it is.
        if now.get("status") != UNDER_WORK:
            _release_on_server(client, agent_id, now, now["status"])
        stats.losses += 1
        _discard(store, record)
        return None

    note = f"claimed by {agent_id} on {record.host} (pid {runner_pid}) at {now_iso()}"
    answer = client.set_status(task_id, agent_id, UNDER_WORK, notes=_append_notes(now, note))
    record.task = (answer or {}).get("task") or {**now, "status": UNDER_WORK}
    record.step(UNDER_WORK)
    store.save(record)
    _fault("after-status")

    record.step("claimed")
    path = store.save(record)
    _fault("after-record")
    return Claimed(record.task, record, path)


# -- lock a named task --------------------------------------------------------------------


def acquire(client: PMApi, store: RecordStore, task_id: int, agent_id: str, role: str,
            level: str, runner_pid: int | None = None, settle: float = DEFAULT_SETTLE,
            sleep: Callable[[float], None] = time.sleep) -> Claimed:
    """Lock the named task for the agent, with the same verification as `claim`.

    Returns `Claimed(task, record, path)`. Raises UsageError if the task does not exist,
    Conflict if it is locked by another agent, already under work, or the lock was lost.
    """
    runner_pid = runner_pid or os.getpid()
    _refuse_if_busy(store, agent_id)
    register(client, agent_id, role, level)
    with agent_claim_lock(store, agent_id):
        _refuse_if_busy(store, agent_id)
        task = read_task(client, task_id)
        if task is None:
            raise UsageError(f"there is no task {task_id} on the server",
                             hint="GET /tasks lists them")
        holder = task.get("locked_by")
        if holder and holder != agent_id:
            raise Conflict(f"task {task_id} is locked by {holder}",
                           hint="pmtool claim takes the next free task", locked_by=holder)
        _refuse_unpickable(task, role, level)
        if task.get("status") == UNDER_WORK:
            raise Conflict(f"task {task_id} is already under work"
                           + (" (locked by this agent, without a record here)"
                              if holder else ""),
                           hint="pmtool recover, or pick another task")
        if holder == agent_id:
            # Our own stale lock (the lock call would answer 409 even to us): release it,
            # then lock afresh so the record's story starts clean.
            _release_on_server(client, agent_id, task, task["status"])
            task = read_task(client, task_id) or task
        stats = ClaimStats()
        claimed = _take(client, store, task, agent_id, role, level, runner_pid, settle,
                        stats, sleep)
    if claimed is None:
        now = read_task(client, task_id) or {}
        raise Conflict(f"task {task_id} went to {now.get('locked_by') or 'another agent'}",
                       hint="pmtool claim takes the next free task", **stats.to_json())
    return claimed


def _refuse_unpickable(task: dict[str, Any], role: str, level: str) -> None:
    """A named task must be one the server could hand this role and level: not finished,
    not parked, not another role's, not above the level."""
    status = task.get("status")
    want = QA_PICK if role == QA else DEV_PICK
    if status != UNDER_WORK and status not in want:
        why = ("it is pending (parked, or not released yet: a person sets it to created)"
               if status == "pending" else f"it is {status}")
        raise Conflict(f"task {task['id']} is not for {role} to take: {why}",
                       hint=f"{role} takes tasks that are {' or '.join(want)}",
                       status=status)
    if role != QA and task.get("target_role") != role:
        raise Conflict(f"task {task['id']} is for {task.get('target_role')}, not {role}",
                       hint=f"lock it as a {task.get('target_role')} agent",
                       target_role=task.get("target_role"))
    if role != QA and _level_rank(task.get("difficulty")) > _level_rank(level):
        raise Conflict(f"task {task['id']} is {task.get('difficulty')}, above level {level}",
                       hint="lock it with an agent of that level", level=level)


# -- the record by hand -------------------------------------------------------------------


def show(store: RecordStore, agent_id: str) -> ShownRecord:
    """The agent's record, where it is and whether its runner lives; NothingToDo if none."""
    record = store.need(agent_id)
    return ShownRecord(record, store.path(agent_id), store.is_live(record))


def update_record(store: RecordStore, agent_id: str, *, worktree: str | None = None,
                  branch: str | None = None, session_id: str | None = None,
                  model: str | None = None, runner_pid: int | None = None,
                  attempts: int | None = None, cost_usd: float | None = None,
                  step: str | None = None) -> tuple[TaskRecord, Path]:
    """Set the given fields of the agent's record (None leaves a field as it is).

    Returns the record and its path; NothingToDo if the agent has none.
    """
    record = store.need(agent_id)
    changed = {k: v for k, v in {"worktree": worktree, "branch": branch,
                                 "session_id": session_id, "model": model,
                                 "attempts": attempts, "cost_usd": cost_usd}.items()
               if v is not None}
    for name, value in changed.items():
        setattr(record, name, value)
    if runner_pid is not None:
        record.pid, record.pid_started = runner_pid, process_started(runner_pid)
        changed["pid"] = runner_pid
    record.step(step or "updated", **{k: v for k, v in changed.items() if k != "cost_usd"})
    return record, store.save(record)


def task_workspace(store: RecordStore, agent_id: str, repo: str | Path, settings: Any,
                   options: WorktreeOptions, *, branch: str | None = None,
                   complexity: str | None = None, owner_pid: int | None = None,
                   client: PMApi | None = None) -> tuple[Workspace, TaskRecord]:
    """Give the agent's task its own workspace and write where into its record.

    The one way both `pmtool worktree create --agent-id` and the run loop do it: the
    record's branch first (what an earlier call chose), then the task's; the task's
    complexity; the worktrees this machine's records name as live (a pmtool worktree none
    of them names is a leftover); the task context for worktree_setup. `options` say where
    and how (pmtool.work.options.worktree_options builds them from the settings);
    `settings` (a pmtool.config.Settings) gives the hooks' context. A follow-up
    (`follow_up`) must find its branch. A diverged local branch kept on a rescue ref is
    said in the task's notes (a comment, with `client`) and in the record. Answers
    `(create_worktree's Workspace, the saved record)`;
    raises what `create_worktree` raises (the record is then unchanged).
    """
    from pmtool.hooks import task_context
    from pmtool.worktree import create_worktree, repo_root

    record = store.need(agent_id)
    task = record.task
    records, _corrupt = store.scan(quarantine=False)
    live = [r.worktree for r in [*records, record] if r.worktree]
    result = create_worktree(
        repo_root(repo), record.task_id, branch or record.branch or task.get("branch"),
        complexity or task.get("complexity") or "major", options,
        context=task_context(record, state_dir=str(settings.state_path),
                             api_url=settings.api_url),
        created_at=task.get("created_at"), owner_pid=owner_pid or record.pid,
        live_paths=live, follow_up=follow_up(record))
    # Re-read: a heartbeat may have written the record while worktree_setup ran.
    record = store.need(agent_id)
    # The directory the agent works in: the worktree, or the repo for a minor task.
    record.worktree, record.branch = result.path, result.branch
    sync = result.sync
    record.step("worktree", path=result.path, created=result.created,
                setup_ok=result.ok, **({"sync": sync.local, "rescued": sync.rescued}
                                       if sync and sync.rescued else {}))
    store.save(record)
    if sync and sync.rescued and client is not None:
        # Said now, not at the finish: a give-back or a crash must not lose where the
        # other side of the branch went.
        with contextlib.suppress(ApiError, ServerError):
            client.comment(record.task_id, agent_id, f"pmtool: {sync.note}")
    return result, record


def follow_up(record: TaskRecord) -> bool:
    """Work that must already be on the task's branch: QA's review (the task came from
    dev_done), or a task QA sent back to the developers (a `fail` line in its notes)."""
    return (record.role == QA or record.previous_status in QA_PICK
            or fl.qa_bounces(task=record.task) > 0)


# -- giving work back and finishing -------------------------------------------------------


def _release_on_server(client: PMApi, agent_id: str, task: dict[str, Any], to_status: str,
                       notes: str | None = None) -> dict[str, Any]:
    """Put the task in `to_status` and drop our lock (there is no unlock endpoint).

    Moving a task out of `under_work` releases its lock; a lock on a task that is not
    under work is released by setting `under_work` and then the old status (contract).
    """
    keep = _append_notes(task, notes)
    if task.get("status") != UNDER_WORK:
        client.set_status(task["id"], agent_id, UNDER_WORK, notes=keep)
    answer = client.set_status(task["id"], agent_id, to_status, notes=keep)
    return (answer or {}).get("task") or {**task, "status": to_status, "locked_by": None}


def claim_done(record: TaskRecord) -> bool:
    """True once the claim set `under_work`: every later step is past "claiming"/"locked"."""
    return any(s.get("step") not in ("claiming", "locked") for s in record.steps)


def _ours(task: dict[str, Any] | None, record: TaskRecord) -> bool:
    """Still ours to change: under work and locked by us, or under work with no lock at all.

    An unlocked `under_work` task lost its lock to the 30-minute rule (quirk 3); nobody
    else can have it, because the server's pick never hands out tasks under work. That
    holds only if we set it under work ourselves: a claim that stopped before that step
    never owned the task.
    """
    if not task or task.get("status") != UNDER_WORK:
        return False
    holder = task.get("locked_by")
    return holder == record.agent_id or (holder is None and claim_done(record))


def _drop_stray_lock(client: PMApi, record: TaskRecord, task: dict[str, Any] | None) -> bool:
    """Release a lock of ours on a task that is not under work (a claim cut short).

    Left alone, such a lock keeps the task from every agent for as long as we heartbeat.
    The status is put back as it is; returns True if there was a lock to drop.
    """
    if not task or task.get("locked_by") != record.agent_id or task.get("status") == UNDER_WORK:
        return False
    _release_on_server(client, record.agent_id, task, task["status"])
    return True


def release(client: PMApi, store: RecordStore, agent_id: str, notes: str | None = None,
            kind: str = fl.FAILED, limits: fl.Limits | None = None) -> Released:
    """Give the agent's task back: status as before the claim, lock dropped, record closed.

    `kind` says why (a pmtool.failure_policy kind; default `failed`): the claim's end is kept as
    an attempt line on this machine (outcome, kind, cost, reason) and in the task's notes.
    A task that has had its attempts (`limits.max_attempts`), or whose kind is not to be
    retried (budget), or whose task budget is spent over all claims, is parked for a
    person instead (status `pending`, action `parked`, with `parked` the reason).

    Returns a `Released` (`task_id`, `action`: released, parked or moved_on, `task`,
    `attempt`).
    A task that someone else has moved on is left as it is (`moved_on`); the record is
    closed either way.
    """
    limits = limits or fl.Limits()
    record = store.need(agent_id)
    task = read_task(client, record.task_id)
    if _ours(task, record):
        assert task is not None
        ledger = bounds.Ledger(store.state)
        line = bounds.account(ledger, record.task, agent_id, outcome="given_back", kind=kind,
                              cost_usd=record.cost_usd, reason=notes,
                              claimed_at=record.claimed_at)
        rows = fl.attempts_of(ledger.lines(), record.task)
        summary = bounds.attempt_summary(line, rows, limits)
        # The policy says whether this give-back is the task's last; we carry it out.
        step = fl.give_back_or_park(kind, notes or "", rows, limits)
        if isinstance(step, fl.Park):
            answer = park(client, store, agent_id, step.reason, cause=step.cause,
                          notes=f"{agent_id}: released: {summary}"
                                + (f": {notes}" if notes else "")
                                + "\n" + bounds.attempts_note(rows))
            return Released(answer.task_id, answer.action, answer.task, attempt=line,
                            reason=answer.reason, parked=step.reason, cause=answer.cause,
                            status=answer.status)
        extra = f"{agent_id}: released: {summary}" + (f": {notes}" if notes else "")
        new = _release_on_server(client, agent_id, task, record.previous_status, extra)
        store.close(record, "released", status=record.previous_status)
        until = fl.cooling_until(rows, limits.retry_cooldown, limits.cooldown_cap)
        if until is not None:  # for `pmtool status`: what cools down, until when
            ledger.add({"kind": fl.COOLDOWN, "task_id": record.task_id, "agent_id": agent_id,
                        "until": fl.iso(until), "reason": notes, "stop": kind})
        return Released(record.task_id, "released", new, attempt=line,
                        cooling_until=fl.iso(until) if until else None)
    if _drop_stray_lock(client, record, task):
        assert task is not None
        store.close(record, "released", status=task["status"])
        return Released(record.task_id, "released", read_task(client, record.task_id))
    store.close(record, "moved_on", status=(task or {}).get("status"))
    return Released(record.task_id, "moved_on", task, reason=_why_not_ours(task, agent_id))


def _why_not_ours(task: dict[str, Any] | None, agent_id: str) -> str:
    if task is None:
        return "the task is gone from the server"
    holder = task.get("locked_by")
    if holder and holder != agent_id:
        return f"the task is locked by {holder}"
    return f"the task is {task.get('status')}"


OUTCOMES = {
    # outcome -> status; "blocked" parks the task for a person: `pending` is never picked.
    "dev": {"done": "dev_done", "blocked": bounds.PENDING},
    QA: {"pass": "qa_done", "fail": "created", "blocked": bounds.PENDING},
}


def outcome_status(role: str, outcome: str, previous_status: str | None = None) -> str:
    """The status the role's flow calls for; UsageError for an outcome the role lacks."""
    table = OUTCOMES[QA if role == QA else "dev"]
    if outcome not in table:
        raise UsageError(f'outcome "{outcome}" is not one for role {role}',
                         hint="valid outcomes: " + ", ".join(table), valid=list(table))
    return table[outcome]


def finish(client: PMApi, store: RecordStore, agent_id: str, outcome: str,
           notes: str | None = None, limits: fl.Limits | None = None) -> Finished:
    """Report the outcome of the agent's task with the status its role's flow calls for.

    `done` (developers, architect, pm) -> dev_done; qa `pass` -> qa_done, `fail` ->
    created, or parked once QA has failed it `limits.max_bounces` times (counted from the
    server's changelog and the notes); `blocked` parks the task for a person: status
    `pending` (never picked), the reason in the notes and as a comment. Notes are
    appended to the task's notes, never replace them; the claim's end is kept as an
    attempt line on this machine. If the server shows the task moved on (maybe by the
    agent itself), nothing is overwritten: `action` is `moved_on`. Returns a `Finished`
    (`task_id`, `action`, `outcome`, `status`, `task`; `parked`, the reason, when parked);
    the record is closed either way.
    """
    limits = limits or fl.Limits()
    record = store.need(agent_id)
    status = outcome_status(record.role, outcome)
    task = read_task(client, record.task_id, status=UNDER_WORK)
    ledger = bounds.Ledger(store.state)
    if not _ours(task, record):
        _drop_stray_lock(client, record, task)
        bounds.account(ledger, record.task, agent_id, outcome="moved_on", kind=fl.OK,
                       cost_usd=record.cost_usd, reason=_why_not_ours(task, agent_id),
                       claimed_at=record.claimed_at)
        store.close(record, "moved_on", requested=outcome,
                    status=(task or {}).get("status"))
        return Finished(record.task_id, "moved_on", outcome, (task or {}).get("status"),
                        task, reason=_why_not_ours(task, agent_id))
    assert task is not None
    record.step("finishing", outcome=outcome)
    store.save(record)  # a crash from here on is found by recover as "moved on"
    kind = fl.BLOCKED if outcome == "blocked" else fl.OK
    bounds.account(ledger, record.task, agent_id, outcome=outcome, kind=kind,
                   cost_usd=record.cost_usd, reason=notes, claimed_at=record.claimed_at)
    text = notes or ("qa failed (no notes given)" if outcome == "fail" else None)
    extra = f"{agent_id}: {outcome}: {text}" if text else None
    parked: str | None = None
    cause = "parked"  # each branch that parks says why
    if outcome == "blocked":
        parked, cause = notes or "no reason given", "blocked"
    elif outcome == "fail" and limits.max_bounces:
        changelog = bounds.changelog(client)
        # This fail is not in the changelog yet: count it on top of the earlier ones.
        bounces = fl.qa_bounces(changelog, task) + 1
        if bounces >= limits.max_bounces:
            parked, cause = (f"QA failed it {bounces} times (max_bounces "
                             f"{limits.max_bounces}); last: {text}"), "max_bounces"
    lock_expired = task.get("locked_by") is None
    if parked:
        # The verdict goes into the notes before the park comment: QA fails before the
        # park are settled once a person sets the task back.
        done = park(client, store, agent_id, parked, cause=cause,
                    notes=extra if outcome != "blocked" else None)
        return Finished(done.task_id, "finished", outcome, done.status, done.task,
                        lock_expired=lock_expired, reason=done.reason,
                        parked=f"{cause}: {parked}", cause=done.cause)
    answer = client.set_status(record.task_id, agent_id, status,
                               notes=_append_notes(task, extra))
    new = (answer or {}).get("task") or {**task, "status": status}
    store.close(record, outcome, status=status)
    return Finished(record.task_id, "finished", outcome, status, new,
                    lock_expired=lock_expired)


PARKED = "pending"  # the server never offers a pending task: it waits for a person


def park(client: PMApi, store: RecordStore, agent_id: str, reason: str,
         cause: str = "parked", notes: str | None = None, **info: Any) -> Parked:
    """Park the agent's task for a person: status `pending`, the reason as a comment.

    For tasks no runner should take again by itself (the agent said `blocked`, too many
    attempts or QA bounces, a branch git rejects). The server never offers a pending task;
    a person sets it back to `created` when it can be worked. `cause` says why in the
    history (`blocked`, `max_attempts`, `max_bounces`, `poison`...). The record is closed
    with outcome `parked`; a task someone else moved on meanwhile is left as it is
    (`moved_on`). `notes` (the verdict, the attempts) go into the task's notes before the
    comment. A park line in the history settles the task's attempts on this machine: once
    a person sets it back, it starts afresh. Returns a `Parked` (`task_id`, `action`,
    `status`, `reason`, `cause`, `task`).
    """
    record = store.need(agent_id)
    task = read_task(client, record.task_id, status=UNDER_WORK)
    if not _ours(task, record):
        _drop_stray_lock(client, record, task)
        store.close(record, "moved_on", requested="parked", reason=reason,
                    status=(task or {}).get("status"))
        return Parked(record.task_id, "moved_on", cause, (task or {}).get("status"),
                      _why_not_ours(task, agent_id), task)
    assert task is not None
    record.step("parking", cause=cause, reason=reason)
    store.save(record)
    new = _release_on_server(client, agent_id, task, PARKED, notes)
    # After the status change: a status update's notes would overwrite the comment.
    text = bounds.park_comment(cause, reason)
    client.comment(record.task_id, agent_id, text)
    new["notes"] = _append_notes(new, f"{agent_id}: {text}")
    bounds.Ledger(store.state).add(fl.park_line(record.task, agent_id, reason, cause=cause))
    store.close(record, "parked", status=PARKED, cause=cause, reason=reason, **info)
    return Parked(record.task_id, "parked", cause, PARKED, reason, new)


# -- lost tasks ----------------------------------------------------------------------------



def moved_by(client: PMApi, task_id: int, limit: int = 100) -> dict[str, Any] | None:
    """The newest status change of the task in the changelog (who moved it, when), if any."""
    try:
        entries = client.changelog(limit)
    except (ApiError, ServerError):
        return None
    return next((e for e in entries if e.get("task_id") == task_id), None)


def check_ours(client: PMApi, record: TaskRecord) -> dict[str, Any] | None:
    """None while the task is still the record's (under work, locked by its agent); else
    what happened to it: `{"reason", "loss", "status", "locked_by", "moved_by"}`.

    `loss` is `deleted`, `moved` (a person or an agent changed its status: parked,
    finished, given back), `taken` (locked by another agent) or `aged_out` (under work
    with no lock: the 30-minute rule, quirk 3). One filtered list call while all is well
    (quirk 1: there is no single-task read).
    """
    task = read_task(client, record.task_id, status=UNDER_WORK,
                     role=record.task.get("target_role"))
    if task and task.get("status") == UNDER_WORK and task.get("locked_by") == record.agent_id:
        return None
    info: dict[str, Any] = {"status": (task or {}).get("status"),
                            "locked_by": (task or {}).get("locked_by"), "moved_by": None}
    if task is None:
        info.update(loss="deleted", reason=f"task {record.task_id} was deleted")
    elif task.get("status") != UNDER_WORK:
        info.update(loss="moved", reason=f"task {record.task_id} was moved to "
                                         f"{task.get('status')}")
    elif task.get("locked_by"):
        info.update(loss="taken", reason=f"task {record.task_id} was locked by "
                                         f"{task.get('locked_by')}")
    else:
        info.update(loss="aged_out", reason=f"the lock on task {record.task_id} ran out "
                                            "(agent unseen for 30 minutes)")
    if task is not None and info["loss"] in ("moved", "taken"):
        # The changelog has status changes only (a bare lock leaves no entry): who moved it
        # last, unless that was us (our own under_work).
        change = moved_by(client, record.task_id)
        if change and change.get("changed_by") != record.agent_id:
            info["moved_by"] = change.get("changed_by")
            if info["loss"] == "moved":
                info["reason"] += f" by {change.get('changed_by')}"
        elif info["loss"] == "taken" and _late_lock(client, record, task, change):
            info["late_lock"] = True
    return info


def _late_lock(client: PMApi, record: TaskRecord, task: dict[str, Any] | None,
               change: dict[str, Any] | None = None) -> bool:
    """Whether another agent's lock on our task under work landed late (quirk 2: its
    check passed while the task was free, its write after our claim had settled and read
    back). Nobody changed the task since our own under_work (`change`, the changelog's
    newest entry for it, read when not given): only the lock moved, which only a racing
    lock request does, and that agent found the task under work and walked away.
    `retake_lock` mends it."""
    if not (task and task.get("status") == UNDER_WORK and claim_done(record)
            and task.get("locked_by") not in (None, record.agent_id)):
        return False
    change = change or moved_by(client, record.task_id)
    return bool(change and change.get("changed_by") == record.agent_id
                and change.get("new_status") == UNDER_WORK)


def retake_lock(client: PMApi, record: TaskRecord, settle: float = DEFAULT_SETTLE,
                sleep: Callable[[float], None] = time.sleep) -> str | None:
    """Take back the lock of our task under work from an agent whose lock landed late
    (`check_ours` says `late_lock`); answers that agent's id once the lock is ours again,
    None when it could not be done (the task is then lost as before).

    There is no unlock and a lock call on a locked task is a 409, even for its holder, so:
    `pending` (moving out of under_work drops the lock; the server never offers a pending
    task, so nobody can take it meanwhile), lock, settle and read back as a claim does,
    then `under_work` again, with a note saying why. Nothing is re-done on our side.
    """
    me = record.agent_id
    task = read_task(client, record.task_id, status=UNDER_WORK)
    late = (task or {}).get("locked_by")
    if not task or not late or late == me:
        return None
    note = (f"pmtool: {me} takes back its lock on this task from {late}, whose lock "
            f"landed after {me}'s claim had settled (the server answered 200 to both)")
    client.set_status(record.task_id, me, bounds.PENDING, notes=_append_notes(task, note))
    with contextlib.suppress(ApiError):  # read back below: whoever holds it now
        client.lock(record.task_id, me)
    sleep(settle)
    now = read_task(client, record.task_id, status=bounds.PENDING)
    if not now or now.get("locked_by") != me:
        return None
    client.set_status(record.task_id, me, UNDER_WORK, notes=now.get("notes"))
    return late


def record_loss(client: PMApi, store: RecordStore, record: TaskRecord, info: dict[str, Any],
                work_note: str | None = None) -> dict[str, Any]:
    """Record that the agent lost its task mid-work, and leave the task where someone acts.

    The record is closed into the history (outcome `lost`, with `info`). When the task is
    still under work and nobody holds it now (the lock ran out), it goes back to `created`
    with a note, so any agent can take it; a task a person or another agent moved or took
    is left as they set it, with a comment saying where our work is. Returns
    `{"task_id", "action": "requeued"|"noted"|"gone", "note"}`.
    """
    agent_id = record.agent_id
    note = (f"pmtool: {agent_id} lost this task mid-work: {info.get('reason')}"
            + (f"; {work_note}" if work_note else ""))
    action = "gone"
    task = read_task(client, record.task_id) if info.get("loss") != "deleted" else None
    if task is not None:
        if task.get("status") == UNDER_WORK and not task.get("locked_by"):
            # Nobody has it: leave it unlocked under work and nobody ever will (the server
            # never offers an under_work task). Back to the queue, with the note.
            client.set_status(record.task_id, agent_id, "created",
                              notes=_append_notes(task, note))
            action = "requeued"
        else:
            client.comment(record.task_id, agent_id, note)
            action = "noted"
    store.close(record, "lost", **{k: v for k, v in info.items() if k != "reason"},
                reason=info.get("reason"), action=action, work=work_note)
    return {"task_id": record.task_id, "action": action, "note": note}


@contextlib.contextmanager
def heartbeat(client: PMApi, agent_id: str, role: str, level: str, every: float,
              on_error: Callable[[Exception], None] | None = None) -> Iterator[None]:
    """Re-register the agent every `every` seconds while the block runs, so its lock
    outlives the server's 30-minute rule (quirk 3) however long the agent works. Failures
    go to `on_error` and the beat goes on; `every` <= 0 does nothing.

    Re-registering keeps the agent's first role and level (quirk 4): any role answers.
    """
    import threading

    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                client.register(agent_id, role, level)
            except Exception as exc:  # a beat must never end the run
                if on_error:
                    on_error(exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{agent_id}", daemon=True)
    if every and every > 0:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join(timeout=5)

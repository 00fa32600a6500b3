"""pmtool.work.claim as a library: the claim protocol's decisions, against a scripted client.

The fake client below stands for the server where a test needs an answer no real server
gives on demand (a double lock at an exact moment, a lost lock between two calls). The
same functions are exercised against the real HTTP server in test_work_cli.py.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import ago, park
from pmtool import failure_policy as fl
from pmtool.client import PMClient
from pmtool.errors import ApiError, Conflict, NothingToDo, ServerError, UsageError
from pmtool.records import RecordStore, TaskRecord
from pmtool.testing.seed import unique_id
from pmtool.work import claim as work
from pmtool.work import recover as work_recover

DAY = ago(days=1)[:10]  # tasks made yesterday, whatever the date


def task(task_id: int, status: str = "created", role: str = "backend_dev",
         difficulty: str = "junior", locked_by: str | None = None,
         created_at: str | None = None, notes: str | None = None) -> dict[str, Any]:
    return {"id": task_id, "title": f"t{task_id}", "status": status, "target_role": role,
            "difficulty": difficulty, "locked_by": locked_by, "notes": notes,
            "branch": "main", "created_at": created_at or f"{DAY}T00:00:{task_id:02d}"}


class FakeServer:
    """An in-memory server with the real one's semantics, and hooks to misbehave."""

    url = "http://fake"

    def __init__(self, *tasks: dict[str, Any]) -> None:
        self.tasks = {t["id"]: dict(t) for t in tasks}
        self.agents: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple] = []
        self.after_lock: Any = None  # called after a lock: simulates a racing agent
        self.down = False

    def _call(self, *what: Any) -> None:
        self.calls.append(what)
        if self.down:
            raise ServerError("cannot reach the Headless PM server at http://fake")

    def register(self, agent_id: str, role: str, level: str) -> dict[str, Any]:
        self._call("register", agent_id)
        agent = self.agents.setdefault(agent_id, {"agent_id": agent_id, "role": role,
                                                  "level": level})
        return {"agent": dict(agent), "next_task": None, "mentions": []}

    def list_tasks(self, status: str | None = None, role: str | None = None) -> list[dict]:
        self._call("list", status, role)
        found = [dict(t) for t in self.tasks.values()
                 if (status is None or t["status"] == status)
                 and (role is None or t["target_role"] == role)]
        return sorted(found, key=lambda t: (t["created_at"], t["id"]), reverse=True)

    def get_task(self, task_id: int, status: str | None = None) -> dict | None:
        return next((t for t in self.list_tasks(status) if t["id"] == task_id), None)

    def next_task(self, role: str, level: str, simulate: bool = True) -> dict | None:
        self._call("next", role, level)
        assert simulate, "claims never long-poll (quirk 5)"
        rank = work._level_rank(level)
        fit = [t for t in self.tasks.values() if t["locked_by"] is None
               and (t["status"] == "dev_done" if role == "qa" else
                    t["status"] == "created" and t["target_role"] == role
                    and work._level_rank(t["difficulty"]) <= rank)]
        return dict(min(fit, key=lambda t: (t["created_at"], t["id"]))) if fit else None

    def lock(self, task_id: int, agent_id: str) -> dict[str, Any]:
        self._call("lock", task_id, agent_id)
        t = self.tasks[task_id]
        if t["locked_by"]:
            raise ApiError(409, f"Task {task_id} is already locked by another agent")
        t["locked_by"] = agent_id
        if self.after_lock:
            self.after_lock(t)
        return dict(t)

    def set_status(self, task_id: int, agent_id: str, status: str,
                   notes: str | None = None) -> dict[str, Any]:
        self._call("status", task_id, status)
        t = self.tasks[task_id]
        if t["status"] == "under_work" and status != "under_work":
            t["locked_by"] = None
        t["status"] = status
        if notes:
            t["notes"] = notes
        return {"task": dict(t), "next_task": None}

    def changelog(self, limit: int = 50) -> list[dict[str, Any]]:
        self._call("changelog", limit)
        return []

    def comment(self, task_id: int, agent_id: str, comment: str) -> dict[str, Any]:
        self._call("comment", task_id)
        t = self.tasks[task_id]
        line = f"{agent_id}: {comment}"
        t["notes"] = f"{t['notes']}\n\n{line}" if t["notes"] else line
        return {"message": "Comment added successfully"}


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    return RecordStore(tmp_path / "state")


def no_sleep(seconds: float) -> None:
    pass


# -- claim ----------------------------------------------------------------------------------


def test_claim_locks_verifies_and_records(store):
    server = FakeServer(task(1, notes="from the pm"), task(2))
    naps: list[float] = []
    claimed = work.claim(server, store, "dev_1", "backend_dev", "senior",
                         options=work.ClaimOptions(settle=0.25, sleep=naps.append),
                         runner_pid=os.getpid())
    assert claimed.task["id"] == 1 and claimed.task["status"] == "under_work"
    assert naps == [0.25]  # settled once, before the read-back
    kinds = [c[0] for c in server.calls]
    # The agent is registered once a task is offered (a fresh last_seen keeps the lock,
    # quirk 3); the changelog counts QA fails of the candidate (max_bounces) before it is
    # locked.
    assert kinds[:4] == ["next", "register", "changelog", "lock"]
    assert kinds.index("status") > kinds.index("lock")
    assert server.tasks[1]["notes"].startswith("from the pm\n\nclaimed by dev_1 on ")
    record = store.load("dev_1")
    assert record and record.previous_status == "created" and record.pid == os.getpid()
    assert record.pid_started is not None and claimed.path == store.path("dev_1")


def test_lost_double_lock_moves_on_to_the_next_candidate(store):
    server = FakeServer(task(1), task(2), task(3, difficulty="principal"))

    def rival_wins(t: dict[str, Any]) -> None:
        if t["id"] == 1:
            t["locked_by"] = "rival"  # the last writer of a double lock (quirk 2)

    server.after_lock = rival_wins
    stats = work.ClaimStats()
    claimed = work.claim(server, store, "dev_1", "backend_dev", "senior",
                         options=work.ClaimOptions(sleep=no_sleep), stats=stats)
    assert claimed.task["id"] == 2  # not 3: above the agent's level
    assert (stats.losses, stats.conflicts, stats.tried) == (1, 0, 2)
    assert server.tasks[1]["locked_by"] == "rival" and server.tasks[1]["status"] == "created"


def test_conflict_409_tries_the_next_and_nothing_left_is_exit_3(store):
    server = FakeServer(task(1))
    server.next_task = lambda role, level, simulate=True: dict(task(1))  # stale answer
    server.tasks[1]["locked_by"] = "other"
    stats = work.ClaimStats()
    with pytest.raises(NothingToDo) as err:
        work.claim(server, store, "dev_1", "backend_dev", "senior",
                   options=work.ClaimOptions(sleep=no_sleep), stats=stats)
    assert err.value.exit_code == 3 and stats.conflicts == 1
    assert store.load("dev_1") is None  # a lock never held leaves no record


def test_wait_polls_with_capped_backoff(store, monkeypatch):
    server = FakeServer()
    clock = [0.0]
    monkeypatch.setattr(work.time, "monotonic", lambda: clock[0])
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        clock[0] += seconds

    stats = work.ClaimStats()
    with pytest.raises(NothingToDo):
        work.claim(server, store, "dev_1", "backend_dev", "senior",
                   options=work.ClaimOptions(wait=20, sleep=nap), stats=stats)
    assert naps[0] <= work.POLL_FIRST and max(naps) <= work.POLL_CAP
    assert sum(naps) == pytest.approx(20)
    assert 10 < stats.polls < 30  # not a busy loop, not one long poll


def test_claim_registers_once_and_only_when_there_is_a_task_to_lock(store):
    server = FakeServer()
    with pytest.raises(NothingToDo) as err:
        work.claim(server, store, "dev_1", "backend_dev", "senior",
                   options=work.ClaimOptions(sleep=no_sleep))
    assert "register" not in [c[0] for c in server.calls] and not server.agents
    assert err.value.details["why"] == ["nothing is created or pending for backend_dev"]
    server = FakeServer(task(1), task(2))
    server.tasks[1]["locked_by"] = "other"
    server.next_task = lambda role, level, simulate=True: dict(task(1))  # stale: a 409
    work.claim(server, store, "dev_1", "backend_dev", "senior",
               options=work.ClaimOptions(sleep=no_sleep))
    kinds = [c[0] for c in server.calls]
    assert kinds.count("register") == 1 and kinds.index("register") < kinds.index("lock")


def test_why_nothing_asks_only_for_what_can_explain_it(store):
    finished = [task(i, status="committed") for i in range(10, 60)]
    server = FakeServer(*finished, task(1, difficulty="principal"), task(2, status="pending"))
    assert work.why_nothing(server, "backend_dev", "senior") == [
        "1 created task(s) for backend_dev are above level senior (ids 1)",
        "1 task(s) for backend_dev are pending: a person must set them to created (parked "
        "tasks are pending too)"]
    assert server.calls == [("list", "created", "backend_dev"),
                            ("list", "pending", "backend_dev")]
    server = FakeServer(*finished, task(3, status="dev_done", role="frontend_dev"))
    server.tasks[3]["locked_by"] = "qa_9"
    assert work.why_nothing(server, "qa", "junior") == ["1 dev_done task(s) are locked by qa_9"]
    assert server.calls == [("list", "dev_done", None), ("list", "pending", None)]
    server = FakeServer(*finished, task(4))  # a free task: nothing to explain, one ask
    assert work.why_nothing(server, "backend_dev", "senior") == []
    assert server.calls == [("list", "created", "backend_dev")]


def test_claim_refuses_an_agent_with_a_record(store):
    server = FakeServer(task(1), task(2))
    work.claim(server, store, "dev_1", "backend_dev", "senior",
               options=work.ClaimOptions(sleep=no_sleep))
    with pytest.raises(Conflict) as err:
        work.claim(server, store, "dev_1", "backend_dev", "senior",
                   options=work.ClaimOptions(sleep=no_sleep))
    assert err.value.details["pid"] == os.getpid() and err.value.details["live"] is True


def test_register_role_mismatch_is_conflict():
    server = FakeServer()
    server.agents["a"] = {"agent_id": "a", "role": "qa", "level": "junior"}
    with pytest.raises(Conflict):
        work.register(server, "a", "backend_dev", "junior")
    with pytest.raises(UsageError):
        work.register(server, "a", "qa", "staff")


def test_candidates_oldest_first_unlocked_at_or_below_level():
    server = FakeServer(task(5, created_at=ago(days=1, zone="")),
                        task(4, created_at=ago(days=2, zone="")),
                        task(3, locked_by="x"), task(2, difficulty="principal"),
                        task(1, role="frontend_dev"), task(6, status="dev_done"))
    assert [t["id"] for t in work._candidates(server, "backend_dev", "senior")] == [4, 5]
    assert [t["id"] for t in work._candidates(server, "qa", "junior")] == [6]


# -- finish, release -------------------------------------------------------------------------


def claimed(store: RecordStore, *tasks: dict[str, Any], role: str = "backend_dev",
            agent: str = "dev_1") -> FakeServer:
    server = FakeServer(*tasks)
    work.claim(server, store, agent, role, "senior", options=work.ClaimOptions(sleep=no_sleep))
    return server


@pytest.mark.parametrize(("role", "outcome", "status"), [
    ("backend_dev", "done", "dev_done"), ("architect", "done", "dev_done"),
    ("pm", "done", "dev_done"), ("qa", "pass", "qa_done"), ("qa", "fail", "created"),
    ("backend_dev", "blocked", "pending"), ("qa", "blocked", "pending")])
def test_outcome_status(role, outcome, status):
    previous = "dev_done" if role == "qa" else "created"
    assert work.outcome_status(role, outcome, previous) == status


def test_outcome_wrong_for_role():
    with pytest.raises(UsageError):
        work.outcome_status("qa", "done", "dev_done")
    with pytest.raises(UsageError):
        work.outcome_status("backend_dev", "pass", "created")


def test_finish_appends_notes_and_closes(store):
    server = claimed(store, task(1, notes="spec"))
    result = work.finish(server, store, "dev_1", "done", notes="all green")
    assert result.status == "dev_done" and server.tasks[1]["locked_by"] is None
    assert server.tasks[1]["notes"].startswith("spec\n\n")
    assert server.tasks[1]["notes"].endswith("dev_1: done: all green")
    assert store.load("dev_1") is None
    with pytest.raises(NothingToDo):
        work.finish(server, store, "dev_1", "done")


def test_finish_blocked_parks_and_comments_after_the_status(store):
    server = claimed(store, task(1))
    result = work.finish(server, store, "dev_1", "blocked", notes="no schema")
    kinds = [c[0] for c in server.calls]
    assert kinds[-2:] == ["status", "comment"]  # a status update would wipe the comment
    assert server.tasks[1]["status"] == "pending" and server.tasks[1]["locked_by"] is None
    assert result.parked == "blocked: no schema" and result.status == "pending"
    assert "dev_1: parked by pmtool (blocked): no schema -- set the task back to created" \
        in server.tasks[1]["notes"]


def test_finish_moved_on_does_not_write(store):
    server = claimed(store, task(1))
    server.tasks[1].update(status="dev_done", locked_by=None)
    writes = len(server.calls)
    result = work.finish(server, store, "dev_1", "done")
    assert result.action == "moved_on"
    assert not [c for c in server.calls[writes:] if c[0] in ("status", "comment")]
    assert store.load("dev_1") is None


def test_finish_after_lock_expired_still_lands(store):
    server = claimed(store, task(1))
    server.tasks[1]["locked_by"] = None  # the 30-minute rule; status stays under_work
    result = work.finish(server, store, "dev_1", "done")
    assert result.action == "finished" and result.lock_expired is True


def test_release_moved_on_when_someone_else_holds_it(store):
    server = claimed(store, task(1))
    server.tasks[1]["locked_by"] = "dev_2"
    result = work.release(server, store, "dev_1")
    assert result.action == "moved_on" and "dev_2" in result.reason
    assert server.tasks[1]["locked_by"] == "dev_2"


def test_update_record_only_given_fields(store):
    claimed(store, task(1))
    record, _ = work.update_record(store, "dev_1", worktree="/w", session_id="s")
    record, _ = work.update_record(store, "dev_1", model="opus", attempts=2)
    assert (record.worktree, record.session_id, record.model, record.attempts) == (
        "/w", "s", "opus", 2)
    assert record.steps[-1]["step"] == "updated"


# -- recover ---------------------------------------------------------------------------------


def dead_pid() -> int:
    """A pid that certainly is not running: a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def stale_record(store: RecordStore, server: FakeServer, task_id: int, step: str,
                 agent: str = "dev_1") -> TaskRecord:
    """A record whose runner is dead, for a task as the server has it (or a gone one)."""
    record = TaskRecord(agent_id=agent, role="backend_dev", level="senior",
                        server_url=server.url,
                        task=dict(server.tasks.get(task_id) or task(task_id)),
                        previous_status="created", pid=dead_pid(), worktree="/wt/1",
                        session_id="sess-1")
    record.step(step)
    store.save(record)
    return record


def test_recover_decides_per_server_state(store):
    server = FakeServer(task(1, status="under_work", locked_by="a1"),
                        task(2, status="created", locked_by="a2"),
                        task(3, status="under_work", locked_by="someone"),
                        task(4, status="dev_done"), task(5, status="under_work"))
    for n in range(1, 6):
        stale_record(store, server, n, "claimed", agent=f"a{n}")
    stale_record(store, server, 6, "claimed", agent="a6")  # task 6 is gone
    entries = {e.agent_id: e for e in work_recover.recover(server, store, sleep=no_sleep)}
    # Every record (cron): a runner that died just now is waited for, not re-registered,
    # so one that never comes back does not keep its task locked.
    assert entries["a1"].action == entries["a5"].action == "waiting"
    assert entries["a2"].action == "released"  # lock released: claim never finished
    assert server.tasks[2]["locked_by"] is None and server.tasks[2]["status"] == "created"
    assert entries["a3"].action == "released" and server.tasks[3]["locked_by"] == "someone"
    assert entries["a4"].action == "released"
    assert entries["a6"].action == "released" and "gone" in entries["a6"].reason
    assert all(e.stale_runner for e in entries.values())
    assert sorted(p.stem for p in store.dir.glob("*.json")) == ["a1", "a5"]
    assert not [c for c in server.calls if c[0] == "register"]

    # The agent's own runner starting again resumes its record.
    (a1,) = work_recover.recover(server, store, agent_id="a1", sleep=no_sleep)
    assert a1.action == "resume"
    assert (a1.worktree, a1.session_id) == ("/wt/1", "sess-1")
    # a1 was re-registered before anything else could take its lock (quirk 3).
    assert ("register", "a1") in server.calls
    record = store.load("a1")
    assert record and record.steps[-1]["step"] == "recovered"
    (a5,) = work_recover.recover(server, store, agent_id="a5", sleep=no_sleep)
    assert a5.action == "resume"  # lock expired: taken back
    assert server.tasks[5]["locked_by"] == "a5"

    # Past the grace, cron gives the task back, with an attempt line.
    late = {e.agent_id: e for e in work_recover.recover(server, store, sleep=no_sleep,
                                                     now=time.time() + 901)}
    a5 = late["a5"]
    assert a5.action == late["a1"].action == "released" and a5.dead_for_s >= 900
    assert server.tasks[5]["status"] == "created" and server.tasks[5]["locked_by"] is None
    assert "given back by pmtool recover (runner gone for" in server.tasks[5]["notes"]


def test_recover_dry_run_and_unreachable_change_nothing(store):
    server = FakeServer(task(1, status="created", locked_by="dev_1"))
    stale_record(store, server, 1, "locked")
    before = store.path("dev_1").read_bytes()
    (entry,) = work_recover.recover(server, store, dry_run=True)
    assert entry.action == "released" and entry.dry_run is True
    assert store.path("dev_1").read_bytes() == before
    assert server.tasks[1]["locked_by"] == "dev_1"
    server.down = True
    with pytest.raises(ServerError):
        work_recover.recover(server, store)
    assert store.path("dev_1").read_bytes() == before


def test_recover_moves_a_corrupt_record_aside_except_in_a_dry_run(store):
    server = FakeServer(task(1, status="under_work", locked_by="dev_1"))
    stale_record(store, server, 1, "claimed")
    bad = store.path("dev_2")
    bad.write_text('{"agent_id": "dev_2", "task": ')  # torn by a crash

    entries = work_recover.recover(server, store, dry_run=True, sleep=no_sleep)
    corrupt = [e for e in entries if e.action == "corrupt"]
    assert [(e.record, e.kept_as) for e in corrupt] == [(str(bad), str(bad))]
    assert bad.exists()  # a dry run moves nothing

    entries = work_recover.recover(server, store, sleep=no_sleep)
    (entry,) = [e for e in entries if e.action == "corrupt"]
    assert not bad.exists() and Path(entry.kept_as).exists()
    assert Path(entry.kept_as).name.startswith("dev_2.json.corrupt-")
    assert store.load("dev_1") is not None  # the good record is resumed, not touched
    with pytest.raises(NothingToDo):  # moved aside once: nothing left for that agent
        work_recover.recover(server, store, agent_id="dev_2", sleep=no_sleep)


def test_recover_nothing_and_usage(store):
    with pytest.raises(NothingToDo):
        work_recover.recover(FakeServer(), store)
    with pytest.raises(UsageError):
        work_recover.recover(FakeServer(), store, agent_id="a", all_=True)


def test_recover_live_runner_left_alone(store):
    server = FakeServer(task(1))
    work.claim(server, store, "dev_1", "backend_dev", "senior",
               options=work.ClaimOptions(sleep=no_sleep), runner_pid=os.getppid())
    server.calls.clear()
    (entry,) = work_recover.recover(server, store)
    assert entry.action == "running" and server.calls == []  # not even a read


def test_other_hosts_records_are_never_stale(store):
    server = FakeServer(task(1, status="under_work", locked_by="dev_1"))
    record = stale_record(store, server, 1, "claimed")
    record.host = socket.gethostname() + "-elsewhere"
    store.save(record)
    assert work_recover.recover(server, store)[0].action == "running"


# -- against the server under test, in-process --------------------------------------------


def test_library_claim_and_finish_over_http(pm_server, seeder, store):
    park(seeder)
    made = seeder.create_task(title="library claim")
    client = PMClient(pm_server.url, pm_server.api_key)
    agent = unique_id("lib")
    claimed = work.claim(client, store, agent, "backend_dev", "junior",
                         options=work.ClaimOptions(settle=0.05))
    assert claimed.task["id"] == made["id"] and claimed.record.pid == os.getpid()
    assert seeder.get_task(made["id"])["locked_by"] == agent
    result = work.finish(client, store, agent, "done")
    assert result.status == "dev_done"
    park(seeder)


def test_unfinished_claim_never_adopts_an_unlocked_task(store):
    """A claim that died before under_work did not make the task ours, even if the
    task's (other) owner has since lost its lock to the 30-minute rule."""
    server = FakeServer(task(1, status="under_work"))
    stale_record(store, server, 1, "claiming")
    (entry,) = work_recover.recover(server, store, sleep=no_sleep)
    assert entry.action == "released"
    assert server.tasks[1]["locked_by"] is None
    assert not [c for c in server.calls if c[0] in ("lock", "status")]


def test_give_back_with_an_expired_lock(store):
    server = FakeServer(task(1, status="under_work"))
    stale_record(store, server, 1, "claimed")
    (entry,) = work_recover.recover(server, store, give_back=True, sleep=no_sleep)
    assert entry.action == "released"
    assert server.tasks[1]["status"] == "created" and server.tasks[1]["locked_by"] is None


@pytest.mark.parametrize(("earlier", "action", "status"),
                         [(1, "released", "created"), (2, "parked", "pending")])
def test_recover_parks_a_task_whose_last_attempt_its_give_back_was(store, earlier, action,
                                                                  status):
    """The give-back of a dead runner's task is an attempt (killed), judged by the same
    policy as any give-back: with max_attempts 3, two killed claims before it make it the
    last, and the task goes to a person instead of back to the queue."""
    from pmtool import ledger as bounds
    from pmtool.work.recover import RecoverOptions, recover_machine

    server = FakeServer(task(1, status="under_work", locked_by="dev_1"))
    record = stale_record(store, server, 1, "claimed")
    ledger = bounds.Ledger(store.state)
    for n in range(earlier):
        bounds.account(ledger, record.task, "dev_1", outcome="given_back", kind=fl.KILLED,
                       cost_usd=0.0, reason=f"runner gone {n}", claimed_at=f"earlier-{n}")
    options = RecoverOptions(give_back=True, limits=fl.Limits(max_attempts=3), chores=False)

    (dry,) = recover_machine(server, store, RecoverOptions(
        give_back=True, dry_run=True, limits=options.limits, chores=False)).entries
    assert dry.action == action and server.tasks[1]["status"] == "under_work"
    assert len(fl.attempts_of(ledger.lines(), record.task)) == earlier  # nothing written

    report = recover_machine(server, store, options)
    (entry,) = report.entries
    assert (entry.action, report.counts) == (action, {action: 1})
    assert server.tasks[1]["status"] == status and server.tasks[1]["locked_by"] is None
    assert store.load("dev_1") is None  # the record is closed either way
    lines = ledger.lines()
    assert [a["stop"] for a in fl.attempts_of(lines, record.task)] == (
        ["killed"] * (earlier + 1) if action == "released" else [])  # a park settles them
    if action == "parked":
        assert entry.cause == "max_attempts" and "3 attempts failed" in entry.reason
        assert entry.to_json()["cause"] == "max_attempts"
        notes = server.tasks[1]["notes"]
        assert "given back by pmtool recover (runner gone" in notes
        assert f"{fl.PARKED_MARK} (max_attempts)" in notes
        assert [h["cause"] for h in lines if h.get("kind") == fl.PARK] == ["max_attempts"]
    else:
        assert "cause" not in entry.to_json()


@pytest.mark.parametrize("how", ["finish", "release"])
def test_finish_or_release_of_a_cut_short_claim_drops_our_lock(store, how):
    server = FakeServer(task(1, locked_by="dev_1"))
    stale_record(store, server, 1, "locked")
    if how == "finish":
        assert work.finish(server, store, "dev_1", "done").action == "moved_on"
    else:
        assert work.release(server, store, "dev_1").action == "released"
    assert server.tasks[1]["locked_by"] is None and server.tasks[1]["status"] == "created"
    assert store.load("dev_1") is None


# -- park ------------------------------------------------------------------------------------


def test_park_sets_pending_comments_and_closes_as_parked(store):
    server = claimed(store, task(1, notes="spec"))
    result = work.park(server, store, "dev_1", "the agent said: no schema", cause="blocked")
    assert result.action == "parked" and result.status == "pending"
    assert server.tasks[1]["status"] == "pending" and server.tasks[1]["locked_by"] is None
    kinds = [c[0] for c in server.calls]
    assert kinds[-2:] == ["status", "comment"]  # a status update would wipe the comment
    assert "parked by pmtool (blocked): the agent said: no schema" in server.tasks[1]["notes"]
    assert server.tasks[1]["notes"].startswith("spec")
    assert store.load("dev_1") is None
    closed = store.state.history(task_id=1)
    assert closed[-1]["outcome"] == "parked" and closed[-1]["steps"][-1]["cause"] == "blocked"


def test_park_leaves_a_task_that_moved_on(store):
    server = claimed(store, task(1))
    server.tasks[1].update(status="dev_done", locked_by=None)
    writes = len(server.calls)
    result = work.park(server, store, "dev_1", "too many attempts", cause="max_attempts")
    assert result.action == "moved_on" and server.tasks[1]["status"] == "dev_done"
    assert not [c for c in server.calls[writes:] if c[0] in ("status", "comment")]
    assert store.load("dev_1") is None


# -- a lock that landed late; a verdict left in the transcript ------------------------------


def _under_work_by_me(store: RecordStore, server: FakeServer) -> TaskRecord:
    claimed = work.claim(server, store, "dev_1", "backend_dev", "senior",
                         options=work.ClaimOptions(settle=0, sleep=no_sleep),
                         runner_pid=os.getpid())
    return claimed.record


def test_a_late_lock_is_taken_back_only_when_nobody_moved_the_task(store):
    server = FakeServer(task(1))
    record = _under_work_by_me(store, server)
    server.changelog = lambda limit=50: [{"task_id": 1, "new_status": "under_work",
                                          "changed_by": "dev_1"}]
    server.tasks[1]["locked_by"] = "dev_late"  # its write lands now (quirk 2)
    info = work.check_ours(server, record)
    assert info and info["loss"] == "taken" and info["late_lock"] is True
    assert work.retake_lock(server, record, settle=0, sleep=no_sleep) == "dev_late"
    assert server.tasks[1]["status"] == "under_work" and server.tasks[1]["locked_by"] == "dev_1"
    assert [c[2] for c in server.calls[-6:] if c[0] == "status"] == ["pending", "under_work"]
    assert work.check_ours(server, record) is None
    # Someone who moved the task (the changelog's newest change is theirs) has taken it.
    server.changelog = lambda limit=50: [{"task_id": 1, "new_status": "under_work",
                                          "changed_by": "pm"}]
    server.tasks[1]["locked_by"] = "dev_2"
    info = work.check_ours(server, record)
    assert info["loss"] == "taken" and info["moved_by"] == "pm" and "late_lock" not in info


def test_a_late_lock_that_cannot_be_taken_back_is_left_for_a_person(store):
    server = FakeServer(task(1))
    record = _under_work_by_me(store, server)
    server.tasks[1]["locked_by"] = "dev_late"

    def rival(t: dict) -> None:  # another lock lands on top of ours while we settle
        t["locked_by"] = "dev_other"

    server.after_lock = rival
    assert work.retake_lock(server, record, settle=0, sleep=no_sleep) is None
    # Pending (never offered by the server), with the note saying what was tried.
    assert server.tasks[1]["status"] == "pending"
    assert "takes back its lock on this task from dev_late" in server.tasks[1]["notes"]


def test_only_the_verdict_of_the_last_run_in_the_transcript_counts(store):
    from pmtool.agent.claude import log_paths
    from pmtool.state import now_iso
    from pmtool.work.finish import kept_or_transcript_verdict, kept_verdict, transcript_verdict

    server = FakeServer(task(1))
    record = _under_work_by_me(store, server)
    log, _err = log_paths(store.state_dir / "logs", 1, "s-1")
    log.parent.mkdir(parents=True)
    verdict = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 3,
               "structured_output": {"outcome": "done", "summary": "An earlier run."},
               "result": "{}", "total_cost_usd": 0.01}

    def start() -> str:
        return json.dumps({"type": "pmtool", "event": "start", "at": now_iso(),
                           "session_id": "s-1"}) + "\n"

    log.write_text(start() + json.dumps(verdict) + "\n")  # an earlier run's verdict
    record.session_id = "s-1"
    record.step("agent_starting", session_id="s-1", model="sonnet")
    store.save(record)
    assert transcript_verdict(store, record) is None  # this run has not started yet
    with log.open("a") as fh:  # this run started, was killed mid-work: no result
        fh.write(start() + json.dumps({"type": "assistant", "message": {"id": "m"}}) + "\n")
    assert transcript_verdict(store, record) is None
    with log.open("a") as fh:  # ... or after its result line reached the transcript
        fh.write(json.dumps({**verdict, "structured_output": {"outcome": "blocked",
                                                               "summary": "No access."}}))
    said = transcript_verdict(store, record)
    assert said is not None and (said["outcome"], said["summary"], said["source"]) == \
        ("blocked", "No access.", "transcript")
    assert kept_verdict(store.load("dev_1")) is None
    assert kept_or_transcript_verdict(store, store.load("dev_1"))["outcome"] == "blocked"
    assert kept_verdict(store.load("dev_1"))["outcome"] == "blocked"  # noted now


# Each case of the protocol's answers, and the keys its JSON has always had: a script
# reading `pmtool finish` or `pmtool lock release` relies on them (keys may be added,
# never dropped or renamed; tests/contract/test_json_keys.py pins the commands' main case).
ANSWER_KEYS = {
    "claim": {"task", "record", "claim"},
    "acquire": {"task", "record"},
    "show": {"record", "path", "live"},
    "finish": {"task_id", "action", "outcome", "status", "task", "lock_expired"},
    "finish parked": {"task_id", "action", "cause", "status", "reason", "task", "outcome",
                      "parked", "lock_expired"},
    "finish moved_on": {"task_id", "action", "outcome", "status", "task", "reason"},
    "release": {"task_id", "action", "task", "attempt", "cooling_until"},
    "release parked": {"task_id", "action", "cause", "status", "reason", "task", "parked",
                       "attempt"},
    "release stray lock": {"task_id", "action", "task"},
    "release moved_on": {"task_id", "action", "task", "reason"},
    "park": {"task_id", "action", "cause", "status", "reason", "task"},
    "park moved_on": {"task_id", "action", "cause", "status", "reason", "task"},
}


def protocol_answers(tmp_path: Path) -> dict[str, Any]:
    """One answer of each case, from the library against the fake server."""
    found: dict[str, Any] = {}
    store = RecordStore(tmp_path / "state")
    server = FakeServer(task(1), task(2), task(3), task(4), task(5), task(6), task(7))
    found["claim"] = work.claim(server, store, "dev_1", "backend_dev", "senior",
                                options=work.ClaimOptions(sleep=no_sleep))
    found["show"] = work.show(store, "dev_1")
    found["finish"] = work.finish(server, store, "dev_1", "done")
    found["acquire"] = work.acquire(server, store, 2, "dev_1", "backend_dev", "senior",
                                    sleep=no_sleep)
    found["finish parked"] = work.finish(server, store, "dev_1", "blocked", notes="why")
    work.acquire(server, store, 3, "dev_1", "backend_dev", "senior", sleep=no_sleep)
    server.tasks[3].update(status="dev_done", locked_by=None)
    found["finish moved_on"] = work.finish(server, store, "dev_1", "done")
    work.acquire(server, store, 4, "dev_1", "backend_dev", "senior", sleep=no_sleep)
    found["release"] = work.release(server, store, "dev_1")
    work.acquire(server, store, 5, "dev_1", "backend_dev", "senior", sleep=no_sleep)
    found["release parked"] = work.release(server, store, "dev_1", kind="budget")
    work.acquire(server, store, 6, "dev_1", "backend_dev", "senior", sleep=no_sleep)
    server.tasks[6]["locked_by"] = "dev_2"
    found["release moved_on"] = work.release(server, store, "dev_1")
    work.acquire(server, store, 7, "dev_1", "backend_dev", "senior", sleep=no_sleep)
    found["park"] = work.park(server, store, "dev_1", "a person decides", cause="blocked")
    server = claimed(store, task(8))
    server.tasks[8].update(status="dev_done", locked_by=None)
    found["park moved_on"] = work.park(server, store, "dev_1", "too late")
    server = claimed(store, task(9))
    # A claim cut short after its lock: the task is ours, not under work yet.
    record = store.need("dev_1")
    record.steps = [s for s in record.steps if s["step"] in ("claiming", "locked")]
    store.save(record)
    server.tasks[9].update(status="created", locked_by="dev_1")
    found["release stray lock"] = work.release(server, store, "dev_1")
    return found


def test_the_protocol_answers_keep_their_keys(tmp_path):
    answers = protocol_answers(tmp_path)
    assert {case: set(answer.to_json()) for case, answer in answers.items()} == ANSWER_KEYS
    assert answers["release parked"].action == "parked"
    assert answers["release stray lock"].action == "released"
    assert answers["finish parked"].parked == "blocked: why"

"""Bounded work in the library's claim, release and finish, against the server under test.

What `pmtool run` and a bash pipeline of `pmtool claim` / `release` / `finish` share:
attempts are kept per task on the machine; a task given back cools down before this
machine takes it again; after max_attempts, a `blocked` verdict, or max_bounces QA fails
it is parked (status `pending`, reason in notes and as a comment) until a person sets it
back to `created`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pmtool import failure_policy as fl
from pmtool.client import PMClient
from pmtool.errors import Conflict, NothingToDo
from pmtool.records import RecordStore
from pmtool.testing.seed import Seeder, unique_id
from pmtool.work import claim as work

FAST = fl.Limits(max_attempts=3, retry_cooldown=0.3, max_bounces=3, cooldown_cap=1.0)


@pytest.fixture
def client(pm_server: Any) -> Iterator[PMClient]:
    c = PMClient(pm_server.url, pm_server.api_key)
    yield c
    c.close()


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    return RecordStore(tmp_path / "state")


def attempt_lines(store: RecordStore) -> list[dict[str, Any]]:
    path = store.state_dir / "history.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [x for x in lines if x.get("kind") in ("attempt", "parked")]


def take(client: PMClient, store: RecordStore, agent: str, role: str = "backend_dev",
         limits: fl.Limits = FAST, wait: float = 0) -> dict[str, Any]:
    return work.claim(client, store, agent, role, "senior",
                      options=work.ClaimOptions(settle=0.05, limits=limits, wait=wait)).task


def test_always_failing_task_is_parked_after_max_attempts(queue, client, store) -> None:
    made = queue.create_task(title="always fails")
    agent = unique_id("dev")
    runs = 0
    for attempt in range(1, 10):
        try:
            task = take(client, store, agent, wait=3)
        except NothingToDo as exc:
            assert "pending" in exc.message or exc.details["parked"] == []
            break
        assert task["id"] == made["id"]
        runs += 1
        result = work.release(client, store, agent, notes=f"tests red ({attempt})",
                              kind=fl.FAILED, limits=FAST)
        if attempt < FAST.max_attempts:
            assert result.action == "released" and result.cooling_until
            # Cooling: this machine does not take it straight back.
            with pytest.raises(NothingToDo) as exc:
                take(client, store, agent)
            assert made["id"] in exc.value.details["cooling"]
            assert "cooling down" in exc.value.message
        else:
            assert result.action == "parked"
            assert result.parked.startswith("3 attempts failed (max_attempts 3)")
    assert runs == FAST.max_attempts
    on_server = queue.get_task(made["id"])
    assert on_server["status"] == "pending" and on_server["locked_by"] is None
    assert "released: attempt 1/3 (failed, $0.0000" in on_server["notes"]
    assert "tests red (3)" in on_server["notes"] and "attempts on " in on_server["notes"]
    assert f"{agent}: parked by pmtool (max_attempts): 3 attempts failed" in on_server["notes"]
    kinds = [(x["kind"], x.get("stop")) for x in attempt_lines(store)]
    assert kinds == [("attempt", "failed")] * 3 + [("parked", None)]

    # A person sets it back to created: it gets fresh attempts.
    queue.set_status(made["id"], "created")
    assert take(client, store, agent)["id"] == made["id"]
    work.finish(client, store, agent, "done", limits=FAST)
    assert queue.get_task(made["id"])["status"] == "dev_done"


def test_budget_stop_is_parked_at_once(queue, client, store) -> None:
    made = queue.create_task(title="too dear")
    agent = unique_id("dev")
    take(client, store, agent)
    result = work.release(client, store, agent, notes="claude stopped at --max-budget-usd",
                          kind=fl.BUDGET, limits=FAST)
    assert result.action == "parked" and result.parked.startswith("budget:")
    assert queue.get_task(made["id"])["status"] == "pending"


def test_task_budget_counts_every_claim(queue, client, store) -> None:
    made = queue.create_task(title="spends")
    limits = fl.Limits(max_attempts=10, retry_cooldown=0, task_budget_usd=1.0)
    agent = unique_id("dev")
    for cost, action in ((0.6, "released"), (0.5, "parked")):
        take(client, store, agent, limits=limits)
        work.update_record(store, agent, cost_usd=cost)
        assert work.release(client, store, agent, limits=limits).action == action
    assert "task budget $1 spent ($1.1000 over 2 claims)" in queue.get_task(made["id"])["notes"]


def test_blocked_runs_once_and_waits_for_a_person(queue, client, store) -> None:
    made = queue.create_task(title="needs a decision")
    agent = unique_id("dev")
    take(client, store, agent)
    result = work.finish(client, store, agent, "blocked", notes="which database?",
                         limits=FAST)
    assert (result.status, result.parked) == ("pending", "blocked: which database?")
    assert result.action == "finished"
    on_server = queue.get_task(made["id"])
    assert on_server["status"] == "pending" and on_server["locked_by"] is None
    assert f"{agent}: parked by pmtool (blocked): which database?" in on_server["notes"]
    with pytest.raises(NothingToDo) as exc:
        take(client, store, unique_id("dev"))
    assert any("pending" in why for why in exc.value.details["why"])
    queue.set_status(made["id"], "created")
    assert take(client, store, agent)["id"] == made["id"]


def qa_round(queue: Seeder, client: PMClient, store: RecordStore, task_id: int,
             dev: str, qa: str) -> work.Finished:
    assert take(client, store, dev)["id"] == task_id
    work.finish(client, store, dev, "done", limits=FAST)
    assert take(client, store, qa, role="qa")["id"] == task_id
    return work.finish(client, store, qa, "fail", notes="login still 500s", limits=FAST)


def test_ping_pong_is_parked_after_max_bounces(queue, client, store) -> None:
    made = queue.create_task(title="ping pong")
    dev, qa = unique_id("dev"), unique_id("qa")
    assert qa_round(queue, client, store, made["id"], dev, qa).status == "created"
    assert qa_round(queue, client, store, made["id"], dev, qa).status == "created"
    third = qa_round(queue, client, store, made["id"], dev, qa)
    assert third.status == "pending" and third.parked is not None
    assert third.parked.startswith("max_bounces: QA failed it 3 times (max_bounces 3)")
    assert third.action == "finished" and third.outcome == "fail"
    with pytest.raises(NothingToDo):
        take(client, store, dev)
    assert queue.get_task(made["id"])["status"] == "pending"


def test_bounces_by_other_machines_park_at_claim(queue, client, store) -> None:
    """QA fails made elsewhere (here: by hand, through the server) count too."""
    made = queue.create_task(title="failed elsewhere")
    for _ in range(3):
        queue.set_status(made["id"], "dev_done")
        queue.set_status(made["id"], "under_work")
        queue.set_status(made["id"], "created", notes="qa elsewhere: no")
    with pytest.raises(NothingToDo) as exc:
        take(client, store, unique_id("dev"))
    (parked,) = exc.value.details["parked"]
    assert parked["task_id"] == made["id"] and "QA failed it 3 times" in parked["reason"]
    assert queue.get_task(made["id"])["status"] == "pending"


def test_manual_claim_next_to_a_running_runner_is_refused(queue, client, store) -> None:
    queue.create_task(title="the runner's")
    agent = unique_id("dev")
    lock_path = store.runner_lock(agent).path
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pmtool.records import RunnerLock; "
         f"held = RunnerLock(__import__('pathlib').Path({str(lock_path)!r}), 'x').acquire(); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Conflict) as exc:
            take(client, store, agent)
        assert "running `pmtool run`" in exc.value.message
        assert exc.value.details["pid"] == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert take(client, store, agent)["title"] == "the runner's"

"""The suite is a guest on the server it runs against: it touches only tasks it created.

The session-wide check lives in conftest (`_as_guest`); these tests show that its parts
can fail: a change to someone else's task is reported, and draining a queue that holds
someone else's task skips rather than parks it.
"""

from __future__ import annotations

from typing import Any

import pytest

import helpers
from pmtool.testing.seed import Seeder


class Skipped(Exception):
    pass


def _skip(message: str) -> None:
    raise Skipped(message)


@pytest.fixture
def shared(make_standin: Any) -> tuple[Seeder, Seeder]:
    """A private stand-in with someone else's task on it, and us as a guest."""
    server = make_standin(api_key="guest-key-0123")
    theirs = Seeder(server.url, "guest-key-0123", pm_agent_id="their_pm")
    theirs.create_task(title="theirs, created")
    theirs.create_task(title="theirs, done")
    theirs.set_status(theirs.created[1], "dev_done")
    ours = Seeder(server.url, "guest-key-0123")
    ours.foreign = set(helpers.task_snapshot(ours))
    ours.on_foreign = _skip
    return theirs, ours


def test_a_change_to_someone_elses_task_is_reported(shared):
    theirs, ours = shared
    before = helpers.task_snapshot(ours)
    mine = ours.create_task(title="ours")
    ours.set_status(mine["id"], "committed")
    assert helpers.guest_changes(before, helpers.task_snapshot(ours)) == []
    ours.set_status(theirs.created[1], "pending")  # what the old `park` did
    (change,) = helpers.guest_changes(before, helpers.task_snapshot(ours))
    assert f"task {theirs.created[1]} changed: status 'dev_done' -> 'pending'" in change


@pytest.mark.parametrize("role", ["backend_dev", "qa"])
def test_drain_skips_rather_than_park_someone_elses_task(shared, role):
    theirs, ours = shared
    before = helpers.task_snapshot(ours)
    with pytest.raises(Skipped, match="did not create"):
        ours.drain(role)
    assert helpers.guest_changes(before, helpers.task_snapshot(ours)) == []
    assert ours.next_task(role, "principal")["id"] in theirs.created


def test_drain_retires_only_our_own_tasks(shared):
    _theirs, ours = shared
    mine = ours.create_task(title="ours, frontend", target_role="frontend_dev")
    before = {k: v for k, v in helpers.task_snapshot(ours).items() if k[0] != mine["id"]}
    ours.drain("frontend_dev")
    assert ours.get_task(mine["id"])["status"] == "committed"
    assert helpers.guest_changes(before, helpers.task_snapshot(ours)) == []


def test_epics_and_features_carry_the_run_id(pm_server, seeder):
    assert pm_server.run_id and pm_server.feature["name"].endswith(pm_server.run_id)
    assert seeder.create_task()["feature_id"] == pm_server.feature["id"]


def test_a_lock_the_server_expires_is_not_the_guests_doing(shared):
    theirs, ours = shared
    theirs.register("their_dev", "backend_dev", "principal")
    expiring, taken = theirs.created
    theirs.set_status(taken, "created")
    theirs.lock(expiring, "their_dev")
    theirs.set_status(expiring, "under_work", agent_id="their_dev")
    before = helpers.task_snapshot(ours)
    ours.call("POST", "/_sandbox/age",
              params={"agent_id": "their_dev", "seconds": 31 * 60})
    ours.next_task("frontend_dev", "junior")  # any pick drops stale locks (quirk 3)
    assert ours.get_task(expiring)["locked_by"] is None
    assert helpers.guest_changes(before, helpers.task_snapshot(ours)) == []
    # A lock we take, or a lock dropped along with a status change, is still ours to answer for.
    ours.register("our_dev", "backend_dev", "principal")
    ours.lock(taken, "our_dev")
    (change,) = helpers.guest_changes(before, helpers.task_snapshot(ours))
    assert f"task {taken} changed: locked_by None -> 'our_dev'" in change
    ours.set_status(expiring, "created")
    assert len(helpers.guest_changes(before, helpers.task_snapshot(ours))) == 2


@pytest.mark.standin_only
def test_the_shared_stand_in_holds_someone_elses_stale_locks(pm_server, seeder):
    theirs = {key: task for key, task in pm_server.foreign.items()
              if task["title"].startswith("not pmtool's")}
    assert {t["status"] for t in theirs.values()} >= {
        "pending", "under_work", "qa_done", "documentation_done", "committed", "evaluation"}
    seeder.next_task("backend_dev", "junior")  # as every claim of the session does
    now = helpers.task_snapshot(seeder)
    expired = [key for key, task in theirs.items()
               if task["locked_by"] == "someone_else_gone" and now[key]["locked_by"] is None]
    assert len(expired) == 2
    assert helpers.guest_changes(pm_server.foreign, now) == []

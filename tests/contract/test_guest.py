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

"""The stand-in Headless PM server against the contract (shared/headless-pm-api.md).

Tests that take `pm_server`/`seeder` are generic: they also pass against a real server
(PMTOOL_TEST_PM_URL/KEY), so they use fresh agent ids and only look at their own tasks.
The others exercise the stand-in's own switches on a private instance.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import requests

from pmtool.client import PMClient
from pmtool.errors import ApiError, ServerError
from pmtool.models import same_task
from pmtool.records import RecordStore
from pmtool.testing.seed import Seeder, unique_id
from pmtool.testing.server import DEFAULT_RACE_WINDOW
from pmtool.work import claim as work
from pmtool.work import recover as work_recover

TASK_KEYS = {"id", "feature_id", "epic_id", "title", "description", "created_by", "target_role",
             "difficulty", "complexity", "branch", "status", "locked_by", "locked_at", "notes",
             "created_at", "updated_at", "task_type", "poll_interval"}




def agent(seeder: Seeder, role: str = "backend_dev", level: str = "senior") -> str:
    agent_id = unique_id(role)
    seeder.register(agent_id, role, level)
    return agent_id


def wait_for(predicate: Any, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- basics ------------------------------------------------------------------------------


def test_unauthenticated_endpoints(pm_server):
    health = requests.get(f"{pm_server.url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["service"] == "headless-pm-api"
    assert {"status", "version", "database", "dashboard", "timestamp"} <= set(health.json())
    status = requests.get(f"{pm_server.url}/status", timeout=10).json()
    assert {"total_agents", "active_agents", "total_tasks"} <= set(status["metrics"])
    context = requests.get(f"{pm_server.url}/api/v1/context", timeout=10).json()
    assert set(context) == {"project_name", "shared_path", "instructions_path",
                            "project_docs_path", "database_type"}


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key"}])
def test_bad_key_is_401(pm_server, headers):
    for method, path in [("GET", "agents"), ("GET", "tasks"), ("POST", "register")]:
        resp = requests.request(method, f"{pm_server.url}/api/v1/{path}", headers=headers,
                                json={"agent_id": "x", "role": "qa", "level": "junior"},
                                timeout=10)
        assert resp.status_code == 401
        assert resp.json() == {"detail": "Invalid API key"}


def test_unknown_path_404_and_single_task_read_405(seeder):
    task = seeder.create_task()
    resp = seeder.request("GET", f"tasks/{task['id']}")
    assert (resp.status_code, resp.json()) == (405, {"detail": "Method Not Allowed"})
    resp = seeder.request("GET", "no/such/thing")
    assert (resp.status_code, resp.json()) == (404, {"detail": "Not Found"})


# ---- agents ------------------------------------------------------------------------------


def test_register_shape_and_agent_list(seeder):
    agent_id = unique_id("dev")
    answer = seeder.register(agent_id, "frontend_dev", "junior")
    assert set(answer) == {"agent", "next_task", "mentions"}
    assert set(answer["agent"]) == {"id", "agent_id", "role", "level", "connection_type",
                                    "last_seen"}
    assert answer["agent"]["agent_id"] == agent_id
    assert (answer["agent"]["role"], answer["agent"]["level"]) == ("frontend_dev", "junior")
    assert answer["mentions"] == []
    last_seen = answer["agent"]["last_seen"]  # naive UTC, no zone suffix
    assert "+" not in last_seen and not last_seen.endswith("Z")
    assert agent_id in [a["agent_id"] for a in seeder.call("GET", "agents")]


def test_reregister_keeps_role_and_level(seeder):
    agent_id = agent(seeder, "backend_dev", "junior")
    again = seeder.register(agent_id, "qa", "principal")["agent"]
    assert (again["role"], again["level"]) == ("backend_dev", "junior")


def test_bad_role_and_missing_fields_are_422(seeder):
    resp = seeder.request("POST", "register", json={"agent_id": unique_id("x"),
                                                    "role": "fullstack_dev", "level": "senior"})
    assert resp.status_code == 422
    [err] = resp.json()["detail"]
    assert err["type"] == "enum" and err["loc"] == ["body", "role"]
    assert err["input"] == "fullstack_dev"
    assert err["msg"] == "Input should be 'frontend_dev', 'backend_dev', 'qa', 'architect' or 'pm'"
    resp = seeder.request("POST", "register", json={})
    assert resp.status_code == 422
    assert {(e["type"], tuple(e["loc"])) for e in resp.json()["detail"]} == {
        ("missing", ("body", "agent_id")), ("missing", ("body", "role")),
        ("missing", ("body", "level"))}


def test_delete_agent_is_pm_only(seeder):
    victim, bystander = agent(seeder), agent(seeder)
    resp = seeder.request("DELETE", f"agents/{victim}", params={"requester_agent_id": bystander})
    assert resp.status_code == 403
    seeder.call("DELETE", f"agents/{victim}", params={"requester_agent_id": seeder.ensure_pm()})
    assert victim not in [a["agent_id"] for a in seeder.call("GET", "agents")]


# ---- tasks -------------------------------------------------------------------------------


def test_epic_feature_task_shapes(seeder):
    epic = seeder.create_epic("Shapes", "epic")
    assert {"id", "name", "description", "created_at"} <= set(epic)
    feature = seeder.create_feature(epic["id"], "Shapes", "feature")
    assert {"id", "epic_id", "name", "description"} <= set(feature)
    task = seeder.call("POST", "tasks/create", params={"agent_id": seeder.ensure_pm()},
                       json={"feature_id": feature["id"], "title": "t", "description": "d",
                             "target_role": "backend_dev", "difficulty": "junior",
                             "branch": "feature/shapes"})
    seeder.created.append(task["id"])
    assert set(task) == TASK_KEYS
    assert task["status"] == "pending" and task["complexity"] == "major"
    assert (task["created_by"], task["epic_id"]) == (seeder.pm_agent_id, epic["id"])
    assert (task["locked_by"], task["locked_at"], task["notes"]) == (None, None, None)


def test_list_tasks_newest_first_and_filters(seeder):
    ids = [seeder.create_task(title=f"t{i}", target_role="architect")["id"] for i in range(3)]
    pending = seeder.create_task(promote=False, target_role="architect")["id"]
    listed = [t["id"] for t in seeder.list_tasks() if t["id"] in {*ids, pending}]
    assert listed == [pending, *reversed(ids)]
    created = [t["id"] for t in seeder.list_tasks(status="created", role="architect")]
    assert set(ids) <= set(created) and pending not in created
    assert seeder.get_task(pending)["status"] == "pending"
    assert seeder.request("GET", "tasks", params={"status": "bogus"}).status_code == 422


def test_pending_is_never_picked_until_promoted(seeder):
    seeder.drain("frontend_dev")
    task = seeder.create_task(target_role="frontend_dev", promote=False)
    assert seeder.next_task("frontend_dev", "principal") is None
    dev = unique_id("fe")
    assert seeder.register(dev, "frontend_dev", "principal")["next_task"] is None
    seeder.set_status(task["id"], "created")
    assert seeder.next_task("frontend_dev", "principal")["id"] == task["id"]
    # quirk 6: register offers the task but does not lock it
    offered = seeder.register(dev, "frontend_dev", "principal")["next_task"]
    assert offered["id"] == task["id"] and offered["locked_by"] is None
    assert seeder.get_task(task["id"])["locked_by"] is None


def test_dev_pick_respects_role_level_and_age(seeder):
    seeder.drain("backend_dev")
    senior = seeder.create_task(target_role="backend_dev", difficulty="senior")
    junior = seeder.create_task(target_role="backend_dev", difficulty="junior")
    seeder.create_task(target_role="frontend_dev", difficulty="junior")
    assert seeder.next_task("backend_dev", "junior")["id"] == junior["id"]
    assert seeder.next_task("backend_dev", "senior")["id"] == senior["id"]  # oldest first
    assert seeder.next_task("backend_dev", "principal")["id"] == senior["id"]
    seeder.lock(senior["id"], agent(seeder))
    assert seeder.next_task("backend_dev", "principal")["id"] == junior["id"]
    seeder.set_status(junior["id"], "dev_done")
    assert seeder.next_task("backend_dev", "principal") is None


def test_qa_picks_oldest_dev_done_of_any_role_and_level(seeder):
    seeder.drain("qa")
    first = seeder.create_task(target_role="frontend_dev", difficulty="principal")
    second = seeder.create_task(target_role="backend_dev", difficulty="junior")
    seeder.create_task(target_role="qa", difficulty="junior")  # created, not dev_done
    assert seeder.next_task("qa", "junior") is None
    seeder.set_status(second["id"], "dev_done")
    seeder.set_status(first["id"], "dev_done")
    assert seeder.next_task("qa", "junior")["id"] == first["id"]
    seeder.lock(first["id"], agent(seeder, "qa", "junior"))
    assert seeder.next_task("qa", "junior")["id"] == second["id"]


def test_next_without_role_or_level_is_400(seeder):
    for params in ({"level": "senior"}, {"role": "qa"}, {}):
        resp = seeder.request("GET", "tasks/next", params={**params, "simulate": "true"})
        assert resp.status_code == 400
        assert "Missing required parameter" in resp.json()["detail"]


def test_simulate_answers_at_once(seeder):
    seeder.drain("architect")
    # Without simulate this would hold the request for the default 180 s.
    resp = seeder.request("GET", "tasks/next", timeout=30,
                          params={"role": "architect", "level": "junior", "simulate": "true"})
    assert (resp.status_code, resp.json()) == (200, None)


def test_lock_conflicts_even_for_own_lock(seeder):
    task = seeder.create_task()
    me, other = agent(seeder), agent(seeder)
    locked = seeder.lock(task["id"], me)
    assert set(locked) == TASK_KEYS
    assert (locked["locked_by"], locked["status"]) == (me, "created")
    assert locked["locked_at"]
    for who in (me, other):
        resp = seeder.request("POST", f"tasks/{task['id']}/lock", params={"agent_id": who})
        assert resp.status_code == 409
        assert resp.json()["detail"].startswith(f"Task {task['id']} is already locked by another")
    assert seeder.get_task(task["id"])["locked_by"] == me


def test_lock_and_status_404s(seeder):
    task = seeder.create_task()
    missing_id = max(t["id"] for t in seeder.list_tasks()) + 1000
    ghost = unique_id("ghost")
    for method, suffix, body in (("POST", "lock", None), ("PUT", "status", {"status": "created"})):
        resp = seeder.request(method, f"tasks/{missing_id}/{suffix}", json=body,
                              params={"agent_id": agent(seeder)})
        assert resp.status_code == 404
        assert resp.json()["detail"].startswith(f"Task with ID {missing_id} not found")
        resp = seeder.request(method, f"tasks/{task['id']}/{suffix}", json=body,
                              params={"agent_id": ghost})
        assert resp.status_code == 404
        assert resp.json()["detail"].startswith(f"Agent '{ghost}' not found")


def test_status_update_shape_and_lock_release(seeder):
    task = seeder.create_task()
    me, stranger = agent(seeder), agent(seeder, "qa", "junior")
    seeder.lock(task["id"], me)
    answer = seeder.set_status(task["id"], "under_work", agent_id=me)
    assert set(answer) == {"task", "next_task", "workflow_status", "task_completed",
                           "auto_continue", "continuation_prompt", "session_momentum"}
    assert answer["workflow_status"] in ("continue", "no_tasks")
    assert answer["task"]["locked_by"] == me and answer["task"]["status"] == "under_work"
    # no ownership check: anybody registered may move the task, and that releases the lock
    done = seeder.set_status(task["id"], "dev_done", agent_id=stranger)["task"]
    assert (done["status"], done["locked_by"], done["locked_at"]) == ("dev_done", None, None)
    # setting under_work does not take a lock
    assert seeder.set_status(task["id"], "under_work", agent_id=me)["task"]["locked_by"] is None
    bad = seeder.request("PUT", f"tasks/{task['id']}/status", params={"agent_id": me},
                         json={"status": "finished"})
    assert bad.status_code == 422


def test_lock_on_idle_task_released_via_under_work(seeder):
    task = seeder.create_task()
    seeder.lock(task["id"], agent(seeder))
    assert seeder.release(task["id"])["locked_by"] is None
    assert seeder.get_task(task["id"])["status"] == "created"


def test_notes_replace_and_comment_append(seeder):
    task = seeder.create_task()
    commenter = unique_id("reviewer")
    assert seeder.comment(task["id"], "first", agent_id=commenter) == {
        "message": "Comment added successfully"}
    assert seeder.get_task(task["id"])["notes"] == f"{commenter}: first"
    seeder.set_status(task["id"], "created", notes="replaced")
    seeder.comment(task["id"], "second", agent_id=commenter)
    assert seeder.get_task(task["id"])["notes"] == f"replaced\n\n{commenter}: second"
    seeder.set_status(task["id"], "created", notes="again")
    assert seeder.get_task(task["id"])["notes"] == "again"


def test_changelog_newest_first(seeder):
    task = seeder.create_task()
    seeder.set_status(task["id"], "under_work", notes="go")
    entries = [c for c in seeder.changelog(limit=20) if c["task_id"] == task["id"]]
    assert set(entries[0]) == {"id", "task_id", "old_status", "new_status", "changed_by",
                               "notes", "changed_at"}
    assert [(c["old_status"], c["new_status"]) for c in entries[:2]] == [
        ("created", "under_work"), ("pending", "created")]
    assert entries[0]["notes"] == "go" and entries[0]["changed_by"] == seeder.pm_agent_id
    assert len(seeder.changelog(limit=1)) == 1


def test_delete_task_is_pm_only(seeder):
    task = seeder.create_task()
    resp = seeder.request("DELETE", f"tasks/{task['id']}", params={"agent_id": agent(seeder)})
    assert resp.status_code == 403
    assert seeder.delete_task(task["id"]) == {"message": f"Task {task['id']} deleted successfully"}
    assert seeder.get_task(task["id"]) is None


# ---- the stand-in's own switches ---------------------------------------------------------


def _private(make_standin, **kwargs: Any) -> tuple[Any, Seeder]:
    server = make_standin(api_key="k", **kwargs)
    return server, Seeder(server.url, "k")


def test_long_poll_returns_when_a_task_appears(make_standin):
    server, seed = _private(make_standin, poll_check_interval=0.05)
    assert seed.next_task("qa", "junior", timeout=0, simulate=False) is None
    got: list[Any] = []
    poll = threading.Thread(target=lambda: got.append(
        seed.next_task("backend_dev", "junior", timeout=20, simulate=False)))
    poll.start()
    wait_for(lambda: server.stats()["busy_workers"] == 1, "the poll to hold a worker")
    task = Seeder(server.url, "k").create_task()
    poll.join(30)
    assert got and got[0]["id"] == task["id"]


@pytest.mark.standin_only
def test_stale_locks_drop_after_30_minutes(make_standin):
    server, seed = _private(make_standin)
    first, second = seed.create_task(), seed.create_task()
    worker = agent(seed)
    seed.lock(first["id"], worker)
    seed.call("POST", "/_sandbox/clock", json={"advance_seconds": 20 * 60})
    seed.lock(second["id"], worker)  # locking does not refresh last_seen (quirk 3)
    seed.call("POST", "/_sandbox/clock", json={"advance_seconds": 11 * 60})
    assert seed.get_task(first["id"])["locked_by"] == worker  # only a pick cleans up
    assert seed.next_task("backend_dev", "junior")["id"] == first["id"]
    after = {t["id"]: t for t in seed.list_tasks()}
    assert after[first["id"]]["locked_by"] is None and after[second["id"]]["locked_by"] is None
    assert after[first["id"]]["status"] == "created"
    # a heartbeat (re-register) keeps locks alive
    seed.register(worker, "backend_dev", "senior")
    seed.lock(first["id"], worker)
    server.advance_clock(29 * 60)
    seed.register(worker, "backend_dev", "senior")
    server.advance_clock(29 * 60)
    seed.next_task("backend_dev", "junior")
    assert seed.get_task(first["id"])["locked_by"] == worker


def _lock_storm(server: Any, task_id: int, agents: list[str]) -> list[requests.Response]:
    sessions = [requests.Session() for _ in agents]
    for s in sessions:  # open the connections first so the lock requests land together
        s.get(f"{server.url}/health", timeout=10)
    barrier, answers = threading.Barrier(len(agents)), [None] * len(agents)

    def lock(i: int) -> None:
        barrier.wait()
        answers[i] = sessions[i].post(f"{server.url}/api/v1/tasks/{task_id}/lock",
                                      params={"agent_id": agents[i]},
                                      headers={"X-API-Key": "k"}, timeout=30)

    threads = [threading.Thread(target=lock, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers  # type: ignore[return-value]


@pytest.mark.standin_only
def test_race_switch_reproduces_double_locks(make_standin):
    server, seed = _private(make_standin)
    agents = [agent(seed) for _ in range(20)]
    seed.call("POST", "/_sandbox/race", json={"window": 0.2})
    task = seed.create_task()
    answers = _lock_storm(server, task["id"], agents)
    winners = [a for a, r in zip(agents, answers, strict=True) if r.status_code == 200]
    assert len(winners) > 1
    assert all(r.json()["locked_by"] == a for a, r in zip(agents, answers, strict=True)
               if r.status_code == 200)
    assert seed.get_task(task["id"])["locked_by"] in winners  # the last writer
    server.set_race_window(0)
    task = seed.create_task()
    codes = sorted(r.status_code for r in _lock_storm(server, task["id"], agents))
    assert codes == [200] + [409] * 19


@pytest.mark.standin_only
def test_long_polls_starve_the_worker_pool(make_standin):
    server = make_standin(api_key="k", workers=4, poll_check_interval=0.05)
    polls = [threading.Thread(target=Seeder(server.url, "k").next_task, args=("qa", "junior"),
                              kwargs={"timeout": 2, "simulate": False}) for _ in range(4)]
    for t in polls:
        t.start()
    wait_for(lambda: server.stats()["busy_workers"] == 4, "four polls in flight")
    health: list[int] = []
    probe = threading.Thread(target=lambda: health.append(
        requests.get(f"{server.url}/health", timeout=30).status_code))
    probe.start()
    wait_for(lambda: server.stats()["queued"] >= 1, "/health to queue")
    assert server.stats()["busy_workers"] == 4 and not health  # waiting behind the polls
    for t in [*polls, probe]:
        t.join(30)
    assert health == [200]
    assert server.stats()["requests"]["GET /api/v1/tasks/next"] == 4


# ---- failing the way the real server fails (contract quirks 7-11) --------------------------


def test_task_ids_are_reused_after_deleting_the_newest(seeder):
    first = seeder.create_task(title="kept")
    newest = seeder.create_task(title="deleted")
    seeder.delete_task(newest["id"])
    again = seeder.create_task(title="same id, other task")
    assert again["id"] == newest["id"] != first["id"]  # SQLite rowid (quirk 9)
    assert same_task(newest, newest) and not same_task(newest, again)
    assert not same_task({"id": again["id"], "title": "deleted"}, again)  # no created_at


def test_deleting_an_agent_frees_its_locks(seeder):
    task = seeder.create_task()
    victim, other = agent(seeder), agent(seeder)
    seeder.lock(task["id"], victim)
    seeder.call("DELETE", f"agents/{victim}", params={"requester_agent_id": seeder.ensure_pm()})
    assert seeder.get_task(task["id"])["locked_by"] is None
    assert seeder.lock(task["id"], other)["locked_by"] == other  # quirk 10


def test_deleting_an_agent_that_created_a_task_is_a_plain_500(seeder):
    seeder.create_task()
    other_pm = agent(seeder, "pm", "principal")
    # A fresh connection: the one after a 500 may be reset (quirk 8).
    resp = requests.delete(f"{seeder.url}/api/v1/agents/{seeder.pm_agent_id}",
                           params={"requester_agent_id": other_pm},
                           headers={"X-API-Key": seeder.api_key, "Connection": "close"},
                           timeout=30)
    assert (resp.status_code, resp.text) == (500, "Internal Server Error")
    assert resp.headers["content-type"].startswith("text/plain")
    assert seeder.pm_agent_id in [a["agent_id"] for a in seeder.call("GET", "agents")]


def test_mentions_reach_the_agents_next_register(seeder):
    task = seeder.create_task(title="mention me")
    dev, ghost = agent(seeder), unique_id("ghost")
    seeder.comment(task["id"], f"@{dev} please look, and @{ghost} too")
    [mention] = seeder.register(dev, "backend_dev", "senior")["mentions"]
    assert {"id", "task_id", "task_title", "mentioned_agent_id", "created_by", "is_read",
            "created_at", "document_id", "document_title"} <= set(mention)
    assert (mention["task_id"], mention["task_title"], mention["mentioned_agent_id"],
            mention["created_by"], mention["is_read"]) == (
        task["id"], "mention me", dev, seeder.pm_agent_id, False)
    assert [m["id"] for m in seeder.call("GET", "mentions", params={"agent_id": dev})] == [
        mention["id"]]
    read = seeder.call("PUT", f"mentions/{mention['id']}/read", params={"agent_id": dev})
    assert read["is_read"] is True
    assert seeder.register(dev, "backend_dev", "senior")["mentions"] == []


def test_null_connection_type_registers_as_client(seeder):
    answer = seeder.register(unique_id("dev"), "qa", "junior", connection_type=None)
    assert answer["agent"]["connection_type"] == "client"


def test_development_keys_only_in_development_mode(make_standin):
    strict, lax = make_standin(api_key="k"), make_standin(api_key="k", production=False)
    for key in ("development-key", "XXXXXX"):
        headers = {"X-API-Key": key}
        assert requests.get(f"{strict.url}/api/v1/agents", headers=headers,
                            timeout=10).status_code == 401
        assert requests.get(f"{lax.url}/api/v1/agents", headers=headers,
                            timeout=10).status_code == 200


def test_ageing_one_agent_drops_only_its_locks(make_standin):
    _, seed = _private(make_standin)
    old_task, kept_task = seed.create_task(), seed.create_task()
    stale, fresh = agent(seed), agent(seed)
    seed.lock(old_task["id"], stale)
    seed.lock(kept_task["id"], fresh)
    aged = seed.call("POST", "/_sandbox/age", params={"agent_id": stale, "seconds": 31 * 60})
    assert aged["agent_id"] == stale
    assert seed.next_task("backend_dev", "junior")["id"] == old_task["id"]
    locks = {t["id"]: t["locked_by"] for t in seed.list_tasks()}
    assert locks == {old_task["id"]: None, kept_task["id"]: fresh}
    assert seed.request("POST", "/_sandbox/age", params={"agent_id": "nobody",
                                                          "seconds": 1}).status_code == 404


def test_race_window_is_on_by_default_and_zero_is_atomic(make_standin):
    assert make_standin().race_window == DEFAULT_RACE_WINDOW > 0
    server, seed = _private(make_standin, race_window=0)
    agents = [agent(seed) for _ in range(10)]
    codes = sorted(r.status_code for r in _lock_storm(server, seed.create_task()["id"], agents))
    assert codes == [200] + [409] * 9


def test_injected_500_is_plain_text_and_resets_the_next_request(make_standin):
    server, seed = _private(make_standin, reset_after_500=1.0)
    rule = seed.call("POST", "/_sandbox/fail", json={"route": "GET /api/v1/agents"})
    assert rule == {"route": "GET /api/v1/agents", "times": 1, "after": False}
    session = requests.Session()
    resp = session.get(f"{server.url}/api/v1/agents", headers={"X-API-Key": "k"}, timeout=10)
    assert (resp.status_code, resp.text) == (500, "Internal Server Error")
    assert resp.headers["content-type"].startswith("text/plain")
    with pytest.raises(requests.ConnectionError):  # the same keep-alive connection
        session.get(f"{server.url}/api/v1/agents", headers={"X-API-Key": "k"}, timeout=10)
    assert server.stats()["resets"] == 1
    assert session.get(f"{server.url}/api/v1/agents", headers={"X-API-Key": "k"},
                       timeout=10).status_code == 200  # a new connection is fine


def test_fail_after_lands_the_change_and_loses_the_answer(make_standin):
    server, seed = _private(make_standin, reset_after_500=0.0)
    task, dev = seed.create_task(), agent(seed)
    server.inject_failure("POST /api/v1/tasks/{task_id}/lock", after=True)
    resp = seed.request("POST", f"tasks/{task['id']}/lock", params={"agent_id": dev})
    assert resp.status_code == 500
    assert seed.get_task(task["id"])["locked_by"] == dev


def test_database_pool_exhaustion_answers_500_and_health_degrades(make_standin):
    server, seed = _private(make_standin, db_pool=2, db_pool_timeout=0.2, db_latency=3.0)
    barrier, codes = threading.Barrier(6), []

    def register(i: int) -> None:
        barrier.wait()
        codes.append(seed.request("POST", "register", json={
            "agent_id": f"burst_{i}", "role": "qa", "level": "junior"}).status_code)

    burst = [threading.Thread(target=register, args=(i,)) for i in range(6)]
    for t in burst:
        t.start()
    wait_for(lambda: len(codes) >= 4, "the pool to turn the late ones away")
    health = requests.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "degraded" and "QueuePool limit" in health["database"]
    for t in burst:
        t.join(30)
    assert sorted(codes) == [200, 200, 500, 500, 500, 500]


# ---- pmtool survives them ------------------------------------------------------------------


def _client(server: Any, **kwargs: Any) -> PMClient:
    return PMClient(server.url, "k", backoff=0.01, **kwargs)


def _calls(server: Any, route: str) -> int:
    return server.stats()["requests"].get(route, 0)


LOCK = "POST /api/v1/tasks/{task_id}/lock"
STATUS = "PUT /api/v1/tasks/{task_id}/status"


def test_client_retries_reads_and_register_through_500_and_reset(make_standin):
    server, seed = _private(make_standin, reset_after_500=1.0)
    client = _client(server)
    seed.create_task()
    server.inject_failure("GET /api/v1/tasks", times=2)
    assert len(client.list_tasks()) == 1
    server.inject_failure("POST /api/v1/register", times=2)
    assert client.register("dev_1", "backend_dev", "senior")["agent"]["agent_id"] == "dev_1"
    server.inject_failure("POST /api/v1/register", times=9)
    with pytest.raises(ServerError) as err:
        client.register("dev_1", "backend_dev", "senior")
    assert err.value.details["status"] == 500 and "Internal Server Error" in err.value.message


@pytest.mark.parametrize("after", [False, True], ids=["lost-before", "landed-after"])
def test_lock_after_a_500_is_read_back_then_sent_at_most_once_more(make_standin, after):
    server, seed = _private(make_standin, reset_after_500=1.0)
    client, task, dev = _client(server), seed.create_task(), agent(seed)
    server.inject_failure(LOCK, after=after)
    assert client.lock(task["id"], dev)["locked_by"] == dev
    assert _calls(server, LOCK) == (1 if after else 2)  # never resent once it landed
    # Taken by someone else meanwhile: answered as the server would, a 409.
    other, second = agent(seed), seed.create_task()
    server.inject_failure(LOCK, after=True)
    seed.lock(second["id"], other)  # the seeder's own read-back finds it landed
    server.inject_failure(LOCK)
    with pytest.raises(ApiError) as err:
        client.lock(second["id"], dev)
    assert err.value.status == 409
    # Two 500s in a row: one resend, then the error.
    third = seed.create_task()
    server.inject_failure(LOCK, times=2)
    before = _calls(server, LOCK)
    with pytest.raises(ServerError):
        client.lock(third["id"], dev)
    assert _calls(server, LOCK) - before == 2
    assert seed.get_task(third["id"])["locked_by"] is None


def test_lock_after_a_reset_connection_is_read_back_and_sent_again(make_standin):
    server, seed = _private(make_standin, reset_after_500=1.0)
    task, dev = seed.create_task(), agent(seed)
    server.inject_failure("GET /api/v1/agents")
    # A raw call leaves the 500's connection in the pool, so the lock goes out on it.
    assert seed.request("GET", "agents").status_code == 500
    assert seed.client.lock(task["id"], dev)["locked_by"] == dev
    assert server.stats()["resets"] == 1  # the first lock request was reset, unanswered
    assert _calls(server, LOCK) == 1  # and never reached the endpoint


@pytest.mark.parametrize("after", [False, True], ids=["lost-before", "landed-after"])
def test_status_after_a_500_is_read_back(make_standin, after):
    server, seed = _private(make_standin, reset_after_500=1.0)
    client, task, dev = _client(server), seed.create_task(), agent(seed)
    client.lock(task["id"], dev)
    server.inject_failure(STATUS, after=after)
    answer = client.set_status(task["id"], dev, "under_work", notes="claimed")
    assert (answer["task"]["status"], answer["task"]["notes"]) == ("under_work", "claimed")
    assert _calls(server, STATUS) == (1 if after else 2) + 1  # +1: the seeder's promote
    history = [c for c in seed.changelog() if c["task_id"] == task["id"]]
    assert [c["new_status"] for c in history].count("under_work") == 1


def test_burst_registration_against_a_small_pool_backs_off_and_gets_through(make_standin):
    server = make_standin(api_key="k", db_pool=2, db_pool_timeout=0.05, db_latency=0.05)
    answers: list[Any] = []

    def register(i: int) -> None:
        client = PMClient(server.url, "k", backoff=0.2, retries=8)
        answers.append(client.register(f"burst_{i}", "qa", "junior"))

    burst = [threading.Thread(target=register, args=(i,)) for i in range(12)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(60)
    assert len(answers) == 12
    assert server.stats()["requests"]["POST /api/v1/register"] >= 12


def test_recover_does_not_resume_a_task_whose_id_was_reused(make_standin, tmp_path):
    server, seed = _private(make_standin)
    client, store = _client(server), RecordStore(tmp_path / "state")
    seed.create_task(title="ours")
    claimed = work.claim(client, store, "dev_1", "backend_dev", "senior",
                         options=work.ClaimOptions(settle=0.05))
    record = claimed.record
    record.pid, record.pid_started = _dead_pid(), None  # the runner is gone
    store.save(record)
    seed.delete_task(claimed.task["id"])
    impostor = seed.create_task(title="someone else's, same id")
    assert impostor["id"] == claimed.task["id"]
    client.lock(impostor["id"], "dev_1")  # looks ours by id, status and lock
    seed.set_status(impostor["id"], "under_work")
    [entry] = work_recover.recover(client, store)
    assert (entry.action, entry.id_reused) == ("released", True)
    assert "gone" in entry.reason
    assert seed.get_task(impostor["id"])["locked_by"] == "dev_1"  # not ours to touch


def _dead_pid() -> int:
    import os

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _switches(help_text: str) -> set[str]:
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", help_text)) - {"--help"}


def test_sandbox_serve_offers_every_switch_of_the_stand_in_with_its_defaults(free_port):
    """`pmtool sandbox serve` is the stand-in the benchmarks and README point at: the same
    switches as `python -m pmtool.testing.server`, and the same realistic defaults (a race
    window, not the atomic locking a bare 0.0 would give)."""
    import json
    import subprocess
    import sys

    from helpers import PMTOOL
    from pmtool.testing.server import DEFAULT_DB_POOL

    module_help = subprocess.run([sys.executable, "-m", "pmtool.testing.server", "--help"],
                                 capture_output=True, text=True, check=True).stdout
    serve_help = subprocess.run([PMTOOL, "sandbox", "serve", "--help"], capture_output=True,
                                text=True, check=True).stdout
    assert _switches(module_help) - _switches(serve_help) == set()

    def started(*args: str) -> dict[str, Any]:
        proc = subprocess.Popen([PMTOOL, "sandbox", "serve", "--port", str(free_port), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            ready["race"] = requests.post(f"{ready['url']}/_sandbox/race",
                                          json={"window": 0.0}, timeout=10).json()["was"]
            ready["health"] = requests.get(f"{ready['url']}/health", timeout=10).status_code
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        return ready

    default = started()
    assert default["race"] == DEFAULT_RACE_WINDOW and default["db_pool"] == DEFAULT_DB_POOL
    assert default["health"] == 200
    tuned = started("--race-window", "0", "--db-pool", "3+1", "--fail-rate", "0.5")
    assert (tuned["race"], tuned["db_pool"], tuned["fail_rate"]) == (0.0, 4, 0.5)

"""`pmtool fleet`: the whole fleet as the server sees it, from any machine with the key.
Real `pmtool claim` and `finish` against a private stand-in server whose clock and agents'
last_seen the test moves; the request log shows what the view costs."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import PMTOOL, interrupt_at_terminal, pmtool
from pmtool.testing.seed import Seeder


@pytest.fixture
def fleet_world(tmp_path: Path, make_standin: Callable[..., Any]) -> dict[str, Any]:
    key = f"k-{secrets.token_hex(8)}"
    server = make_standin(api_key=key, production=True)
    env = {**os.environ, "PMTOOL_STATE_DIR": str(tmp_path / "state"),
           "PMTOOL_CONFIG": os.devnull, "HEADLESS_PM_API_URL": server.url,
           "HEADLESS_PM_API_KEY": key}
    env.pop("PMTOOL_RUNNER_PID", None)
    return {"server": server, "env": env, "seeder": Seeder(server.url, key), "tmp": tmp_path}


def claim(world: dict[str, Any], agent: str, role: str = "backend_dev") -> dict[str, Any]:
    answer = pmtool("claim", "--role", role, "--agent-id", agent, "--settle", "0.05",
                    env=world["env"])
    assert answer.code == 0, answer.stderr
    return answer.out["task"]


def test_fleet_shows_agents_tasks_stale_locks_parked_tasks_and_the_queue(
        fleet_world: dict[str, Any]) -> None:
    world, seeder, server = fleet_world, fleet_world["seeder"], fleet_world["server"]
    first = seeder.create_task(title="Ping", target_role="backend_dev", difficulty="senior")
    second = seeder.create_task(title="Pong", target_role="backend_dev", difficulty="junior")
    seeder.create_task(title="Later", target_role="backend_dev", difficulty="principal")
    seeder.create_task(title="Screen", target_role="frontend_dev", difficulty="junior")
    mine = claim(world, "dev_a")
    assert mine["id"] == first["id"]
    parked = claim(world, "dev_b")
    assert parked["id"] == second["id"]
    done = pmtool("finish", "--agent-id", "dev_b", "--outcome", "blocked", "--notes",
                  "needs the production key", env=world["env"])
    assert done.code == 0, done.stderr
    # Someone else's agent, working by hand: not pmtool's (no claim note).
    other = seeder.create_task(title="By hand", target_role="qa", difficulty="junior")
    seeder.set_status(other["id"], "dev_done")
    seeder.register("qa_person", "qa")
    seeder.lock(other["id"], "qa_person")
    seeder.set_status(other["id"], "under_work", agent_id="qa_person")
    server.age_agent("dev_a", 31 * 60)  # the server will drop its lock at the next pick
    before = len(server.requests())

    answer = pmtool("fleet", env=world["env"])
    assert answer.code == 0, answer.stderr
    view = answer.out
    agents = {a["agent_id"]: a for a in view["agents"]}
    assert agents["dev_a"]["pmtool"] and agents["dev_a"]["task_id"] == first["id"]
    assert agents["dev_a"]["role"] == "backend_dev" and agents["dev_a"]["level"] == "senior"
    assert agents["dev_a"]["host"] == os.uname().nodename
    assert agents["dev_a"]["stale"] and agents["dev_a"]["lock_expires_in_s"] < 0
    assert agents["dev_a"]["unseen_s"] >= 31 * 60
    assert agents["dev_b"]["pmtool"] and agents["dev_b"]["task_id"] is None
    assert not agents["qa_person"]["pmtool"] and agents["qa_person"]["task_id"] == other["id"]
    assert not agents["qa_person"]["stale"] and agents["qa_person"]["lock_expires_in_s"] > 0
    assert view["stale"] == [{"agent_id": "dev_a", "task_id": first["id"],
                              "unseen_s": agents["dev_a"]["unseen_s"],
                              "host": os.uname().nodename}]
    assert {t["task_id"] for t in view["in_flight"]} == {first["id"], other["id"]}
    assert [(p["task_id"], p["cause"]) for p in view["parked"]] == [(second["id"], "blocked")]
    assert "needs the production key" in view["parked"][0]["reason"]
    assert view["queue"]["backend_dev"]["waiting"] == 1
    assert view["queue"]["backend_dev"]["by_difficulty"]["principal"] == 1
    assert view["queue"]["frontend_dev"]["waiting"] == 1
    assert view["queue"]["qa"]["waiting"] == 0
    assert view["counts"] == {"agents": len(agents), "pmtool_agents": 2, "working": 2,
                              "stale": 1, "parked": 1, "waiting": 2}

    # Filtered requests only, and as many however long the history.
    asked = server.requests()[before:]
    lists = [r for r in asked if r["route"] == "/api/v1/tasks"]
    assert all(r["query"].get("status") for r in lists), lists
    assert len(asked) == 6
    for i in range(15):  # history: tasks done and gone through the whole flow
        task = seeder.create_task(title=f"Old {i}")
        seeder.set_status(task["id"], "committed")
    before = len(server.requests())
    again = pmtool("fleet", env=world["env"])
    assert len(server.requests()) - before == 6
    # Those status changes were picks too (each answers a next_task): as foretold, the
    # server dropped dev_a's lock, and its task is now under work with nobody on it.
    assert again.out["counts"] == {**view["counts"], "stale": 0}
    assert [t["task_id"] for t in again.out["unlocked"]] == [first["id"]]
    assert {a["agent_id"]: a["task_id"] for a in again.out["agents"]}["dev_a"] is None


def test_fleet_without_a_server_exits_4(tmp_path: Path, free_port: int) -> None:
    answer = pmtool("fleet", env={**os.environ, "HEADLESS_PM_API_URL":
                                  f"http://127.0.0.1:{free_port}",
                                  "HEADLESS_PM_API_KEY": "k",
                                  "PMTOOL_CONFIG": os.devnull})
    assert answer.code == 4 and answer.out["error"]["type"] == "server"


def test_fleet_watch_draws_the_tables_on_a_terminal(fleet_world: dict[str, Any]) -> None:
    import pty

    seeder = fleet_world["seeder"]
    seeder.create_task(title="Ping", target_role="backend_dev", difficulty="senior")
    claim(fleet_world, "dev_a")
    leader, follower = pty.openpty()
    env = {**fleet_world["env"], "NO_COLOR": "1"}
    proc = subprocess.Popen([PMTOOL, "fleet", "--watch", "--interval", "0.2"], env=env,
                            stdout=subprocess.PIPE, stderr=follower, stdin=follower)
    os.close(follower)
    screen, out = interrupt_at_terminal(proc, leader, lambda s: s.count(b"pmtool fleet") >= 2)
    assert b"dev_a" in screen and b"backend_dev" in screen and b"yes" in screen
    assert b"AGENT" in screen and b"(Ctrl-C to stop)" in screen
    assert proc.returncode == 0
    assert b'"ok": true' in out and b'"agents"' in out

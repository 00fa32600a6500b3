"""Taking work through the real console script: claim, lock, finish, recover.

Every test runs `pmtool` in subprocesses against the server under test (the stand-in, or
a real Headless PM when PMTOOL_TEST_PM_URL/KEY are set) and checks the server's state
through the seeder and the records on disk. The contention, kill -9 and lost-server tests
are here too: they are what makes a claim trustworthy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import PMTOOL, Result, free_port, pmtool, wait_stopped
from pmtool.records import RecordStore
from pmtool.testing.seed import Seeder, unique_id

# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def env(pm_server: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a pipeline on this machine: server, key, own state dir."""
    return {"HEADLESS_PM_API_URL": pm_server.url, "HEADLESS_PM_API_KEY": pm_server.api_key,
            "PMTOOL_STATE_DIR": str(tmp_path / "state"),
            "PMTOOL_CONFIG": os.devnull}


def record_path(env: dict[str, str], agent: str) -> Path:
    return Path(env["PMTOOL_STATE_DIR"]) / "records" / f"{agent}.json"


def history(env: dict[str, str]) -> list[dict[str, Any]]:
    path = Path(env["PMTOOL_STATE_DIR"]) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def claim(env: dict[str, str], agent: str, *args: str, role: str = "backend_dev") -> Result:
    return pmtool("claim", "--agent-id", agent, "--role", role, *args, env=env)


def spawn(env: dict[str, str], *args: str, shell_runner: bool = False) -> subprocess.Popen:
    """Start `pmtool ARGS` in the background; with shell_runner, under a throwaway `sh`
    that is the record's runner and is gone once pmtool ends (as a pipeline script)."""
    cmd = [PMTOOL, *args]
    if shell_runner:
        cmd = ["sh", "-c", '"$@"; exit 0', "sh", *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def answer(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert len(lines) == 1, (out, err)
    return proc.returncode, json.loads(lines[0]), err


def assert_consistent(seeder: Seeder, env: dict[str, str], agents: list[str]) -> None:
    """No task is locked by one of our agents unless that agent has a record for it."""
    for task in seeder.list_tasks():
        if task["locked_by"] in agents:
            path = record_path(env, task["locked_by"])
            assert path.exists(), f"task {task['id']} locked by {task['locked_by']}, no record"
            assert json.loads(path.read_text())["task"]["id"] == task["id"]


# -- register -----------------------------------------------------------------------------


def test_register_and_role_kept_by_server(env, seeder):
    agent = unique_id("dev")
    r = pmtool("register", "--agent-id", agent, "--role", "backend_dev", env=env)
    assert r.code == 0 and r.out["agent"]["agent_id"] == agent
    r = pmtool("register", "--agent-id", agent, "--role", "frontend_dev", env=env)
    assert r.code == 5
    assert "backend_dev" in r.out["error"]["message"]
    assert r.out["error"]["registered"] == {"role": "backend_dev", "level": "senior"}


def test_unknown_role_is_usage_error_with_valid_roles(env):
    r = claim(env, unique_id("dev"), role="fullstack_dev")
    assert r.code == 2
    assert r.out["error"]["type"] == "usage"
    assert "fullstack_dev" in r.out["error"]["message"]
    assert r.out["error"]["valid"] == ["frontend_dev", "backend_dev", "qa", "architect", "pm"]
    assert "Traceback" not in r.stderr


def test_wrong_key_exit_6_and_key_never_shown(env):
    secret = "wrong-key-" + "9" * 20
    r = claim({**env, "HEADLESS_PM_API_KEY": secret}, unique_id("dev"))
    assert r.code == 6 and r.out["error"]["type"] == "auth"
    assert secret not in r.stdout + r.stderr


def test_unreachable_server_exit_4(env):
    r = claim({**env, "HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port()}"},
              unique_id("dev"))
    assert r.code == 4 and "cannot reach" in r.out["error"]["message"]


# -- claim --------------------------------------------------------------------------------


def test_claim_makes_the_task_ours_and_finish_reports_done(env, queue, pm_server):
    task = queue.create_task(title="claim me")
    queue.comment(task["id"], "context from the pm")
    agent = unique_id("dev")
    r = claim(env, agent)
    assert r.code == 0, r.out
    assert r.out["task"]["id"] == task["id"]
    assert r.out["record"] == str(record_path(env, agent))
    assert r.out["claim"]["losses"] == 0

    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "under_work" and on_server["locked_by"] == agent
    notes = on_server["notes"]
    assert "context from the pm" in notes  # claiming appends, never wipes
    assert agent in notes and socket.gethostname() in notes and f"pid {os.getpid()}" in notes
    assert pm_server.api_key not in notes

    record = json.loads(record_path(env, agent).read_text())
    assert record["previous_status"] == "created"
    assert record["pid"] == os.getpid()  # the runner: whatever ran pmtool (here, pytest)
    assert [s["step"] for s in record["steps"]] == ["claiming", "locked", "under_work",
                                                    "claimed"]

    shown = pmtool("lock", "show", "--agent-id", agent, env=env)
    assert shown.out["live"] is True and shown.out["record"]["task"]["id"] == task["id"]

    r = pmtool("finish", "--agent-id", agent, "--outcome", "done", "--notes", "tests pass",
               env=env)
    assert r.code == 0 and r.out["status"] == "dev_done" and r.out["action"] == "finished"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "dev_done" and on_server["locked_by"] is None
    assert "context from the pm" in on_server["notes"] and "tests pass" in on_server["notes"]
    assert not record_path(env, agent).exists()
    assert history(env)[-1]["outcome"] == "done"
    assert pmtool("lock", "show", "--agent-id", agent, env=env).code == 3


def test_claim_respects_role_and_level(env, queue):
    queue.create_task(title="too hard", difficulty="principal")
    queue.create_task(title="other role", target_role="frontend_dev", difficulty="junior")
    r = claim(env, unique_id("dev"), "--level", "senior")
    assert r.code == 3 and r.out["error"]["type"] == "nothing"


def test_claim_nothing_to_do_and_wait(env, queue):
    r = claim(env, unique_id("dev"))
    assert r.code == 3 and r.out["error"]["polls"] == 1
    start = time.monotonic()
    r = claim(env, unique_id("dev"), "--wait", "1.2")
    assert r.code == 3 and r.out["error"]["polls"] >= 3
    assert 1.2 <= time.monotonic() - start < 5


def test_claim_with_no_task_registers_nobody_and_lists_no_history(env, queue, pm_server):
    # A claim that finds nothing asks the server only what it needs: no registration
    # (nothing to lock), and why nothing came from the role's created and pending tasks,
    # never the whole history.
    for i in range(5):
        done = queue.create_task(title=f"finished {i}")
        queue.set_status(done["id"], "committed")
    queue.create_task(title="waits for a person", promote=False)
    standin = pm_server.standin
    before = len(standin.requests()) if standin else 0
    agent = unique_id("dev")
    r = claim(env, agent)
    assert r.code == 3 and r.out["error"]["type"] == "nothing"
    assert any("pending" in why for why in r.out["error"]["why"]), r.out
    assert agent not in {a["agent_id"] for a in queue.client.agents()}
    if standin:
        asked = standin.requests()[before:]
        assert not [q for q in asked if q["route"] == "/api/v1/register"]
        lists = [q["query"] for q in asked if q["route"] == "/api/v1/tasks"]
        assert lists == [{"status": "created", "role": "backend_dev"},
                         {"status": "pending", "role": "backend_dev"}]


@pytest.mark.parametrize("bad", ["", " ", "../x", "..", "dev 1", "a/b", "x" * 65])
def test_a_bad_agent_id_is_a_usage_error_and_nothing_is_sent(bad, make_standin, tmp_path):
    # An empty id once registered an agent named "" and locked a task with no owner; "../x"
    # named the record `records/_.json`. Every command that takes an agent id refuses it
    # while parsing its arguments: exit 2, no request, no state written.
    server = make_standin()
    env = {"HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": server.api_key,
           "PMTOOL_STATE_DIR": str(tmp_path / "state"),
           "PMTOOL_CONFIG": str(tmp_path / "no-config.toml")}
    for args in (["claim", "--agent-id", bad, "--role", "backend_dev"],
                 ["register", "--agent-id", bad, "--role", "backend_dev"],
                 ["lock", "acquire", "1", "--agent-id", bad, "--role", "backend_dev"],
                 ["lock", "release", "--agent-id", bad],
                 ["recover", "--agent-id", bad],
                 ["recover", "--orphans", "--as-agent", bad],
                 ["exec-claude", "--agent-id", bad],
                 ["run", "--agent-id", "dev_1", "--agent-id", bad, "--role", "backend_dev",
                  "--single-task"]):
        r = pmtool(*args, env=env)
        assert r.code == 2 and r.out["error"]["type"] == "usage", (args, r.out)
        assert "A-Z a-z 0-9 . _ -" in r.out["error"]["message"]
    assert server.requests() == []
    assert not (tmp_path / "state" / "records").exists() or \
        not list((tmp_path / "state" / "records").iterdir())


@pytest.mark.parametrize("command", [["claim"], ["run"], ["exec-claude"], ["lock", "show"],
                                     ["recover"]])
def test_the_agent_id_character_set_is_in_the_help(command):
    shown = subprocess.run([PMTOOL, *command, "--help"], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert "A-Z a-z 0-9 . _ -" in " ".join(shown.split()), shown


def test_run_agents_ids_are_checked_after_numbering(make_standin, tmp_path):
    # `--agents 2 --agent-id X` makes: a 63-character X is fine alone, too long
    # numbered.
    server = make_standin()
    env = {"HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": server.api_key,
           "PMTOOL_STATE_DIR": str(tmp_path / "state")}
    r = pmtool("run", "--agent-id", "d" * 63, "--agents", "2", "--role", "backend_dev",
               env=env)
    assert r.code == 2 and "d" * 63 + "-1" in r.out["error"]["message"]
    assert server.requests() == []


def test_claim_registers_right_before_its_lock(env, queue, pm_server):
    task = queue.create_task(title="for a backend developer")
    # An id the server keeps as another role (quirk 4) is refused before anything is
    # locked or written.
    taken = unique_id("dev")
    assert pmtool("register", "--agent-id", taken, "--role", "frontend_dev", env=env).code == 0
    r = claim(env, taken)
    assert r.code == 5 and r.out["error"]["registered"]["role"] == "frontend_dev"
    assert not record_path(env, taken).exists()
    assert queue.get_task(task["id"])["locked_by"] is None
    # A never-seen id claims at once: registered by the claim, before its lock.
    standin = pm_server.standin
    before = len(standin.requests()) if standin else 0
    agent = unique_id("dev")
    r = claim(env, agent)
    assert r.code == 0 and r.out["task"]["id"] == task["id"]
    assert agent in {a["agent_id"] for a in queue.client.agents()}
    if standin:
        routes = [q["route"] for q in standin.requests()[before:]]
        assert routes.count("/api/v1/register") == 1
        assert routes.index("/api/v1/tasks/next") < routes.index("/api/v1/register") \
            < routes.index("/api/v1/tasks/{task_id}/lock"), routes
    pmtool("lock", "release", "--agent-id", agent, env=env)


def test_waiting_claim_picks_up_a_new_task(env, queue):
    proc = spawn(env, "claim", "--agent-id", unique_id("dev"), "--role", "backend_dev",
                 "--wait", "20")
    time.sleep(1.5)
    created = time.monotonic()
    task = queue.create_task(title="arrives later")
    code, out, _ = answer(proc)
    assert code == 0 and out["task"]["id"] == task["id"]
    # Backoff is capped at 2 s, so the poll after the task appeared comes within ~2 s.
    assert time.monotonic() - created < 4


def test_second_claim_refused_while_record_exists(env, queue):
    queue.create_task(title="one")
    queue.create_task(title="two")
    agent = unique_id("dev")
    assert claim(env, agent).code == 0
    r = claim(env, agent)
    assert r.code == 5
    assert r.out["error"]["pid"] == os.getpid() and r.out["error"]["live"] is True
    assert "recover" in r.out["error"]["hint"]


# -- lock by hand, release ----------------------------------------------------------------


def test_lock_acquire_update_release(env, queue):
    first = queue.create_task(title="older")
    named = queue.create_task(title="named")
    agent = unique_id("dev")
    r = pmtool("lock", "acquire", str(named["id"]), "--agent-id", agent, "--role",
               "backend_dev", env=env)
    assert r.code == 0 and r.out["task"]["id"] == named["id"]
    assert queue.get_task(first["id"])["locked_by"] is None

    r = pmtool("lock", "update", "--agent-id", agent, "--worktree", "/tmp/wt-x", "--branch",
               "feature/x", "--session-id", "sess-1", "--model", "sonnet", env=env)
    assert r.code == 0
    assert (r.out["record"]["worktree"], r.out["record"]["session_id"]) == ("/tmp/wt-x",
                                                                             "sess-1")

    other = unique_id("dev")
    r = pmtool("lock", "acquire", str(named["id"]), "--agent-id", other, "--role",
               "backend_dev", env=env)
    assert r.code == 5  # under work, locked by `agent`

    r = pmtool("lock", "release", "--agent-id", agent, "--notes", "needs a decision", env=env)
    assert r.code == 0 and r.out["action"] == "released"
    on_server = queue.get_task(named["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None
    assert "needs a decision" in on_server["notes"]
    assert not record_path(env, agent).exists()
    assert pmtool("lock", "release", "--agent-id", agent, env=env).code == 3

    r = pmtool("lock", "acquire", "999999", "--agent-id", other, "--role", "backend_dev",
               env=env)
    assert r.code == 2


@pytest.mark.parametrize(("status", "role", "target", "difficulty", "why"), [
    ("qa_done", "backend_dev", "backend_dev", "junior", "it is qa_done"),
    ("pending", "backend_dev", "backend_dev", "junior", "it is pending (parked"),
    ("created", "frontend_dev", "backend_dev", "junior", "is for backend_dev, not frontend"),
    ("created", "qa", "backend_dev", "junior", "it is created"),
    ("created", "backend_dev", "backend_dev", "principal", "is principal, above level"),
])
def test_lock_acquire_refuses_what_the_role_would_never_be_given(
        env, queue, status, role, target, difficulty, why):
    made = queue.create_task(title="not yours", target_role=target, difficulty=difficulty)
    queue.set_status(made["id"], status)
    r = pmtool("lock", "acquire", str(made["id"]), "--agent-id", unique_id("a"), "--role",
               role, "--level", "senior", env=env)
    assert r.code == 5 and why in r.out["error"]["message"]
    assert queue.get_task(made["id"])["locked_by"] is None


def test_release_of_a_task_still_only_locked(env, queue):
    """A lock on a task that is not under work is released via under_work (contract)."""
    task = queue.create_task(title="locked only")
    agent = unique_id("dev")
    claim(env, agent)
    queue.set_status(task["id"], "created", agent_id=agent)  # drops the lock
    queue.lock(task["id"], agent)  # ... and a bare lock again, status created
    r = pmtool("lock", "release", "--agent-id", agent, env=env)
    assert r.out["action"] == "released"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None


def test_a_release_by_hand_is_not_an_attempt_unless_it_says_what_failed(env, queue):
    """A person trying steps by hand releases without --kind: the task is not charged an
    attempt nor cooled down; `--kind failed` (as scripts pass) is."""
    task = queue.create_task(title="tried by hand")
    agent = unique_id("dev")
    assert claim(env, agent).out["task"]["id"] == task["id"]
    r = pmtool("lock", "release", "--agent-id", agent, env=env)
    assert r.code == 0 and r.out["action"] == "released"
    assert r.out["attempt"]["stop"] == "by_hand" and r.out["attempt"]["counts"] is False
    assert r.out["cooling_until"] is None
    again = claim(env, agent)  # the same machine takes it again at once
    assert again.code == 0 and again.out["task"]["id"] == task["id"]
    r = pmtool("lock", "release", "--agent-id", agent, "--kind", "failed", env=env)
    assert r.out["attempt"]["counts"] is True and r.out["cooling_until"]
    r = claim(env, agent)
    assert r.code == 3 and task["id"] in map(int, r.out["error"]["cooling"])


def test_a_hook_names_no_agent_id_nor_role(env, queue, tmp_path):
    """Hooks get PMTOOL_AGENT_ID and PMTOOL_ROLE; pmtool reads them where --agent-id or
    --role is required and absent, so a hook's `pmtool lock show` needs no flag."""
    task = queue.create_task(title="hook asks")
    agent = unique_id("dev")
    assert claim(env, agent).out["task"]["id"] == task["id"]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    seen = tmp_path / "seen.json"
    (hooks / "pre_task.sh").write_text(f'#!/bin/sh\nexec "{PMTOOL}" lock show > "{seen}"\n')
    (hooks / "pre_task.sh").chmod(0o755)
    r = pmtool("hook", "run", "pre_task", "--agent-id", agent, "--hooks-dir", str(hooks),
               "--cwd", str(tmp_path), env=env)
    assert r.code == 0, r.out
    shown = json.loads(seen.read_text())["record"]
    assert (shown["agent_id"], shown["task"]["id"]) == (agent, task["id"]), shown
    # The role too; a flag beats the variable.
    other = {**env, "PMTOOL_AGENT_ID": unique_id("dev"), "PMTOOL_ROLE": "no_such_role"}
    assert claim(other, agent).code == 5  # --agent-id given: `agent`, who holds a task
    r = pmtool("register", env=other)
    assert r.code == 2 and r.out["error"]["valid"], r.out  # the role came from PMTOOL_ROLE


# -- finish ---------------------------------------------------------------------------------


def test_qa_fail_pass_and_blocked(env, queue):
    task = queue.create_task(title="to review")
    queue.set_status(task["id"], "dev_done")
    qa = unique_id("qa")
    r = claim(env, qa, role="qa")
    assert r.code == 0 and r.out["task"]["id"] == task["id"]
    assert pmtool("finish", "--agent-id", qa, "--outcome", "done", env=env).code == 2
    r = pmtool("finish", "--agent-id", qa, "--outcome", "fail", "--notes", "500 on login",
               env=env)
    assert r.out["status"] == "created"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "created" and "500 on login" in on_server["notes"]

    queue.set_status(task["id"], "dev_done")
    assert claim(env, qa, role="qa").code == 0
    r = pmtool("finish", "--agent-id", qa, "--outcome", "blocked", "--notes",
               "staging is down", env=env)
    # Blocked parks the task for a person: pending is never offered to anyone.
    # The reason first; then the summary every finish writes (branch, head, agent runs).
    assert r.out["status"] == "pending"
    assert r.out["parked"].split("\n")[0] == "blocked: staging is down"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "pending" and on_server["locked_by"] is None
    assert f"{qa}: parked by pmtool (blocked): staging is down" in on_server["notes"]
    assert "500 on login" in on_server["notes"]
    assert claim(env, qa, role="qa").code == 3

    queue.set_status(task["id"], "dev_done")  # a person un-parks it
    assert claim(env, qa, role="qa").code == 0
    r = pmtool("finish", "--agent-id", qa, "--outcome", "pass", env=env)
    assert queue.get_task(task["id"])["status"] == "qa_done"


def test_finish_does_not_overwrite_a_task_that_moved_on(env, queue):
    task = queue.create_task(title="agent finishes it itself")
    agent = unique_id("dev")
    claim(env, agent)
    queue.set_status(task["id"], "dev_done", agent_id=agent, notes="done by the agent")
    r = pmtool("finish", "--agent-id", agent, "--outcome", "blocked", "--notes", "x", env=env)
    assert r.code == 0 and r.out["action"] == "moved_on"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "dev_done" and on_server["notes"] == "done by the agent"
    assert not record_path(env, agent).exists()
    assert history(env)[-1]["outcome"] == "moved_on"


def test_finish_full_killed_midway_is_completed_once_with_its_verdict(env, queue, tmp_path):
    # `finish --full` (pm-runner.sh's finish) notes each step: killed after the post_task
    # hook, the same command completes the finish without a second status or hook run.
    task = queue.create_task(title="finish in one process")
    agent = unique_id("dev")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "post_task").write_text(f"#!/bin/sh\ncat >/dev/null\necho ran >>{tmp_path}/ran\n")
    (hooks / "post_task").chmod(0o755)
    env = {**env, "HEADLESS_PM_HOOKS_DIR": str(hooks)}
    assert claim(env, agent).code == 0
    args = ("finish", "--agent-id", agent, "--outcome", "done", "--notes", "all good", "--full")

    killed = subprocess.run([PMTOOL, *args], capture_output=True, text=True, check=False,
                            env={**os.environ, **env, "PMTOOL_FAULT": "post-task"})
    assert killed.returncode == -signal.SIGKILL and killed.stdout == ""
    assert queue.get_task(task["id"])["status"] == "dev_done"
    # Begun with `done`: another outcome is refused, the record kept.
    assert pmtool(*args[:4], "--outcome", "blocked", "--full", env=env).code == 2
    with RecordStore(env["PMTOOL_STATE_DIR"]).runner_lock(agent):
        assert pmtool(*args, env=env).code == 5  # a live `pmtool run` of the agent owns it

    r = pmtool(*args, env=env)

    assert r.code == 0, r.out
    assert (r.out["action"], r.out["status"], r.out["post_task"]) == \
        ("finished", "dev_done", "interrupted")
    assert [e["event"] for e in r.out["events"]] == ["hook"]  # `finished` was told before
    assert (tmp_path / "ran").read_text() == "ran\n"
    changes = [c for c in queue.changelog(limit=-1) if c["task_id"] == task["id"]]
    assert sum(1 for c in changes if c["new_status"] == "dev_done") == 1
    assert "all good" in queue.get_task(task["id"])["notes"]
    assert not record_path(env, agent).exists()
    assert [h["outcome"] for h in history(env) if h.get("kind", "closed") == "closed"] == \
        ["done"]


# -- records on disk ------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", '{"agent_id": "x", "role": "qa"', "",
                                     '{"agent_id": "x"}'])
def test_corrupt_and_truncated_records_are_kept_aside(env, content):
    agent = unique_id("dev")
    path = record_path(env, agent)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    r = pmtool("recover", "--dry-run", env=env)
    assert r.code == 0 and r.out["entries"][0]["action"] == "corrupt"
    assert path.read_text() == content  # dry run: nothing moved
    r = pmtool("lock", "show", "--agent-id", agent, env=env)
    assert r.code == 1 and r.out["error"]["type"] == "corrupt"
    assert not path.exists()
    kept = list(path.parent.glob(f"{agent}.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text() == content
    assert pmtool("lock", "show", "--agent-id", agent, env=env).code == 3


def test_recover_with_no_records_exits_3(env):
    r = pmtool("recover", "--all", env=env)
    assert r.code == 3 and r.out["error"]["type"] == "nothing"


# -- kill -9 at every step of a claim, then recover -----------------------------------------

# What recover must make of a claim killed at each step, and where the task ends up.
KILLS = {
    "before-lock": ("released", "created", None),
    "after-lock": ("released", "created", None),
    "after-status": ("resume", "under_work", "agent"),
    "after-record": ("resume", "under_work", "agent"),
}


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_9_at_each_step_then_recover(env, queue, point):
    task = queue.create_task(title=f"killed {point}")
    agent = unique_id("dev")
    proc = spawn({**env, "PMTOOL_FAULT": point}, "claim", "--agent-id", agent, "--role",
                 "backend_dev", shell_runner=True)
    out, _ = proc.communicate(timeout=30)
    assert out == ""  # killed before printing anything
    assert record_path(env, agent).exists()  # the record always tells what was going on

    blocked = claim(env, agent)
    assert blocked.code == 5 and "recover" in blocked.out["error"]["hint"]

    before = record_path(env, agent).read_text()
    dry = pmtool("recover", "--agent-id", agent, "--dry-run", env=env)
    assert record_path(env, agent).read_text() == before

    r = pmtool("recover", "--agent-id", agent, env=env)
    action, status, holder = KILLS[point]
    (entry,) = r.out["entries"]
    assert entry["action"] == action == dry.out["entries"][0]["action"]
    assert entry["stale_runner"] is True and entry["task_id"] == task["id"]
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == status
    assert on_server["locked_by"] == (agent if holder else None)
    assert record_path(env, agent).exists() is (action == "resume")
    assert_consistent(queue, env, [agent])

    if action == "resume":
        # Recovering again is harmless; the task can then be given back or finished.
        assert pmtool("recover", "--agent-id", agent, env=env).out["entries"][0][
            "action"] == "resume"
        # Cron's recover of every record waits for a runner that died just now.
        assert pmtool("recover", env=env).out["entries"][0]["action"] == "waiting"
        assert pmtool("lock", "release", "--agent-id", agent, "--kind", "killed",
                      env=env).code == 0
        # A give-back that says what failed is an attempt: the task cools down first.
        r = claim(env, unique_id("dev"))
        assert r.code == 3 and task["id"] in map(int, r.out["error"]["cooling"])
    # Nothing lost: the task is claimable again (by another machine at once).
    other = {**env, "PMTOOL_STATE_DIR": env["PMTOOL_STATE_DIR"] + "-other"}
    r = claim(other, unique_id("dev"))
    assert r.code == 0 and r.out["task"]["id"] == task["id"]


def test_killed_claim_under_a_live_runner_is_recovered(env, queue):
    """The script that ran `pmtool claim` lives on; the claim itself died after the lock."""
    task = queue.create_task(title="claim died, script lives")
    agent = unique_id("dev")
    proc = spawn({**env, "PMTOOL_FAULT": "after-lock"}, "claim", "--agent-id", agent,
                 "--role", "backend_dev")  # runner: this pytest process, alive
    proc.communicate(timeout=30)
    r = pmtool("recover", env=env)
    (entry,) = r.out["entries"]
    assert entry["action"] == "released" and entry["claim_abandoned"] is True
    assert entry["stale_runner"] is False
    assert queue.get_task(task["id"])["locked_by"] is None


def test_recover_leaves_live_runners_alone(env, queue):
    queue.create_task(title="being worked")
    agent = unique_id("dev")
    claim(env, agent)
    r = pmtool("recover", "--all", env=env)
    assert r.out["entries"][0]["action"] == "running"
    assert record_path(env, agent).exists()


def test_recover_gives_back_with_give_back(env, queue):
    task = queue.create_task(title="give back")
    agent = unique_id("dev")
    proc = spawn(env, "claim", "--agent-id", agent, "--role", "backend_dev", shell_runner=True)
    assert answer(proc)[0] == 0
    r = pmtool("recover", "--give-back", env=env)
    assert r.out["entries"][0]["action"] == "released"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None


def test_recover_parks_a_task_whose_give_back_is_its_last_attempt(env, queue):
    """The dead runner's give-back is an attempt (killed); with one attempt allowed it is
    the last, so the task goes to a person instead of back to the queue."""
    task = queue.create_task(title="last attempt")
    agent = unique_id("dev")
    proc = spawn(env, "claim", "--agent-id", agent, "--role", "backend_dev", shell_runner=True)
    assert answer(proc)[0] == 0
    r = pmtool("recover", "--give-back", env={**env, "PMTOOL_MAX_ATTEMPTS": "1"})
    (entry,) = r.out["entries"]
    assert (entry["action"], entry["cause"]) == ("parked", "max_attempts")
    assert r.out["counts"] == {"parked": 1}
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "pending" and on_server["locked_by"] is None
    assert "parked by pmtool (max_attempts)" in on_server["notes"]
    assert not record_path(env, agent).exists()


def test_recover_with_server_unreachable_touches_nothing(env, queue):
    queue.create_task(title="server away")
    agent = unique_id("dev")
    proc = spawn(env, "claim", "--agent-id", agent, "--role", "backend_dev", shell_runner=True)
    assert answer(proc)[0] == 0
    before = record_path(env, agent).read_text()
    r = pmtool("recover", env={**env, "HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.code == 4
    assert record_path(env, agent).read_text() == before
    assert pmtool("lock", "release", "--agent-id", agent, env=env).code == 0


# -- the server going away in the middle of a claim ------------------------------------------


class Cuttable:
    """A TCP proxy in front of the server that can be cut and restored on the same port."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        assert self.listener is not None
        # shutdown first: a bare close leaves a thread blocked in accept() still accepting.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                down, _ = listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_server_goes_away_mid_claim(env, queue, pm_server):
    task = queue.create_task(title="server vanishes")
    proxy = Cuttable(pm_server.url)
    via_proxy = {**env, "HEADLESS_PM_API_URL": proxy.url, "PMTOOL_HTTP_TIMEOUT": "2"}
    agent = unique_id("dev")
    proc = spawn({**via_proxy, "PMTOOL_FAULT": "pause-after-lock"}, "claim", "--agent-id",
                 agent, "--role", "backend_dev", shell_runner=True)
    pmtool_pid = next(c for c in _children(proc.pid))
    wait_stopped([pmtool_pid])
    proxy.cut()
    os.kill(pmtool_pid, signal.SIGCONT)
    _, out, err = answer(proc)
    assert "cannot reach" in out["error"]["message"]
    assert "recover" in out["error"]["hint"]
    assert pm_server.api_key not in json.dumps(out) + err
    # The lock landed before the server went away: the record says so.
    assert queue.get_task(task["id"])["locked_by"] == agent
    assert record_path(env, agent).exists()

    r = pmtool("recover", env=via_proxy)
    assert r.code == 4 and record_path(env, agent).exists()
    proxy.restore()
    r = pmtool("recover", env=via_proxy)
    assert r.out["entries"][0]["action"] == "released"
    on_server = queue.get_task(task["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None
    proxy.cut()


def _children(pid: int) -> Iterator[int]:
    import psutil

    deadline = time.monotonic() + 60  # a loaded machine starts processes slowly
    while time.monotonic() < deadline:
        kids = psutil.Process(pid).children()
        if kids:
            yield from (k.pid for k in kids)
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} started no child")


# -- contention ------------------------------------------------------------------------------


@pytest.fixture
def race(pm_server: Any) -> Iterator[Any]:
    """Set the stand-in's race window for one test (a real server races by itself); the
    stand-in's own default (a small window, as the real server has) comes back after."""
    standin = pm_server.standin
    before = standin.race_window if standin is not None else 0.0

    def set_window(seconds: float) -> None:
        if standin is not None:
            standin.set_race_window(seconds)

    yield set_window
    set_window(before)


@pytest.mark.parametrize("window", [pytest.param(None, id="default-window"),
                                    pytest.param(0.2, id="race-switch",
                                                 marks=pytest.mark.standin_only)])
def test_twenty_agents_twenty_tasks_same_instant(env, queue, race, pm_server, tmp_path,
                                                 window):
    """20 processes, each its own agent and state dir, lock at the same instant.

    Raced as the server is by default (the stand-in's small random window, or a real
    server's natural one); the wide race switch makes double locks certain.
    """
    if window:
        race(window)
    tasks = {queue.create_task(title=f"race {i}")["id"] for i in range(20)}
    agents = [unique_id("racer") for _ in range(20)]
    procs = [spawn({**env, "PMTOOL_STATE_DIR": str(tmp_path / agent),
                    "PMTOOL_FAULT": "pause-before-lock", "PMTOOL_CLAIM_SETTLE": "0.3"},
                   "claim", "--agent-id", agent, "--role", "backend_dev", "--wait", "40")
             for agent in agents]
    wait_stopped([p.pid for p in procs])
    for p in procs:  # all 20 lock calls leave at once
        os.kill(p.pid, signal.SIGCONT)
    results = [answer(p) for p in procs]
    assert [code for code, _, _ in results] == [0] * 20, [out for _, out, _ in results]
    claimed = {out["task"]["id"]: agent for (_, out, _), agent in zip(results, agents,
                                                                       strict=True)}
    assert set(claimed) == tasks  # every task claimed, none twice (20 answers, 20 ids)
    for task_id, agent in claimed.items():
        on_server = queue.get_task(task_id)
        assert (on_server["status"], on_server["locked_by"]) == ("under_work", agent)
    if window:
        # Double locks did happen, and verification turned them into losses.
        assert sum(out["claim"]["losses"] for _, out, _ in results) > 0


@pytest.mark.standin_only
def test_twenty_agents_sharing_a_state_dir_each_get_one_task(env, queue, race):
    race(0.03)
    tasks = {queue.create_task(title=f"shared {i}")["id"] for i in range(20)}
    agents = [unique_id("shared") for _ in range(20)]
    procs = [spawn({**env, "PMTOOL_CLAIM_SETTLE": "0.06"}, "claim", "--agent-id", agent,
                   "--role", "backend_dev", "--wait", "40") for agent in agents]
    results = [answer(p) for p in procs]
    assert [code for code, _, _ in results] == [0] * 20
    # No machine-wide lock serialises them (claims overlap, tests/loop/test_fleet.py): the
    # read-back settles each race, so every task went to exactly one agent.
    assert sorted(out["task"]["id"] for _, out, _ in results) == sorted(tasks)
    owners = {t["id"]: t["locked_by"] for t in queue.list_tasks(status="under_work")}
    for agent, (_, out, _) in zip(agents, results, strict=True):
        assert owners[out["task"]["id"]] == agent


# -- the 30-minute rule, on a stand-in with its own clock ----------------------------------


def test_stale_lock_rule_and_heartbeat(make_standin, tmp_path):
    server = make_standin(api_key="clock-key-0123", production=True)
    env = {"HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": "clock-key-0123",
           "PMTOOL_STATE_DIR": str(tmp_path / "state"),
           "PMTOOL_CONFIG": os.devnull}
    with Seeder(server.url, "clock-key-0123") as seed:
        first = seed.create_task(title="kept by heartbeat")
        second = seed.create_task(title="lock expires")
        seed.create_task(title="for the newcomer")
        keeper, sleeper = unique_id("keeper"), unique_id("sleeper")
        assert claim(env, keeper).out["task"]["id"] == first["id"]
        assert claim(env, sleeper).out["task"]["id"] == second["id"]

        server.advance_clock(20 * 60)
        assert pmtool("register", "--agent-id", keeper, "--role", "backend_dev",
                      env=env).code == 0  # the heartbeat
        server.advance_clock(20 * 60)
        newcomer = unique_id("newcomer")
        r = claim({**env, "PMTOOL_STATE_DIR": str(tmp_path / "other")}, newcomer)
        assert r.code == 0 and r.out["task"]["id"] not in (first["id"], second["id"])
        assert seed.get_task(first["id"])["locked_by"] == keeper
        # The silent agent lost its lock: the task stays under_work, held by nobody.
        lost = seed.get_task(second["id"])
        assert (lost["status"], lost["locked_by"]) == ("under_work", None)

        # Its finish still lands: nobody else can have been handed an under_work task.
        r = pmtool("finish", "--agent-id", sleeper, "--outcome", "done", env=env)
        assert r.out["action"] == "finished" and r.out["lock_expired"] is True
        assert seed.get_task(second["id"])["status"] == "dev_done"


@pytest.mark.parametrize(("extra", "line", "coloured"), [
    ({"TERM": "xterm"}, True, True),
    ({"TERM": "xterm", "FORCE_COLOR": "0"}, True, False),
    ({"TERM": "xterm", "NO_COLOR": "1"}, True, False),
    ({"TERM": "dumb"}, False, False),
])
def test_claim_wait_says_it_waits_on_a_terminal_only(make_standin, tmp_path, extra, line,
                                                     coloured):
    """`claim --wait` at a terminal keeps one line saying it is waiting (cleared at the
    end); into a pipe, or on TERM=dumb, it says nothing. Colour follows TERM, FORCE_COLOR
    and NO_COLOR."""
    import pty

    from helpers import read_pty

    server = make_standin(api_key="k-wait", production=True)  # no task for anyone
    env = {**os.environ, "HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": "k-wait",
           "PMTOOL_STATE_DIR": str(tmp_path / "state"), "PMTOOL_CONFIG": os.devnull, **extra}
    for name in ("NO_COLOR", "FORCE_COLOR"):
        if name not in extra:
            env.pop(name, None)
    args = [PMTOOL, "claim", "--agent-id", unique_id("w"), "--role", "backend_dev",
            "--wait", "1.5"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    screen = read_pty(leader, lambda s: b"no task for" in s, timeout=60)
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    assert proc.returncode == 3 and json.loads(out)["ok"] is False
    assert (b"waiting for a backend_dev/senior task" in screen) is line, screen
    assert (b"\x1b[2m" in screen) is coloured, screen
    if line:
        waiting_at = screen.rindex(b"waiting for")
        assert b"\r\x1b[K" in screen[waiting_at:]  # taken away before the last words
    piped = subprocess.run(args, capture_output=True, env=env, timeout=60, check=False)
    assert piped.returncode == 3 and b"waiting" not in piped.stderr

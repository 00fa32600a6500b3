"""Many machines, one repository: a task's branch travels through the remote.

Each "machine" is a clone of one local bare origin (no network) with its own state folder;
real runners (`pmtool run`, scripts/pm-runner.sh) in subprocesses against a private
stand-in server, the fake agent for speed (the real claude against the scripted model
server end to end: tests/e2e/test_claude_loop.py). What is checked is in git itself
(origin's branch, its parents, rescue refs) and on the server (status, notes, locks).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import helpers
from helpers import (
    PMTOOL,
    Machine,
    Run,
    World,
    events,
    git,
    make_world,
    pmtool,
    run_on,
    unpushed_commit,
    wait_for,
)
from pmtool.testing import fake_agent

SCRIPTS = helpers.ROOT / "scripts"


@pytest.fixture
def world(tmp_path: Path, make_standin: Any) -> World:
    return make_world(tmp_path, make_standin)


def test_qa_on_another_machine_reviews_the_developers_pushed_commit(world: World,
                                                                     fleet) -> None:
    origin, a, b, _c = fleet
    task = world.task()
    dev = run_on(world, a, "backend_dev", "dev_1", "--single-task", "--push")
    assert dev.code == 0, dev.stderr
    dev_head = git(origin, "rev-parse", task["branch"])
    assert world.status(task["id"])["status"] == "dev_done"

    qa = run_on(world, b, "qa", "qa_1", "--single-task", "--push")
    assert qa.code == 0, qa.stderr
    (made,) = [e for e in qa.of("worktree") if e.get("created")]
    assert made["source"] == f"origin/{task['branch']}" and made["local"] == "missing"
    # QA worked on top of the developer's commit, and its own commit reached origin.
    assert git(origin, "rev-parse", f"{task['branch']}^") == dev_head
    assert git(origin, "show", f"{task['branch']}:notes/task-{task['id']}.md")
    assert git(origin, "show", f"{task['branch']}:notes/task-{task['id']}-qa.md")
    assert world.status(task["id"])["status"] == "qa_done"
    assert "push_off" not in qa.kinds() + dev.kinds()


def test_nothing_to_review_is_given_back_not_passed(world: World, fleet) -> None:
    origin, a, b, _c = fleet
    task = world.task()
    dev = run_on(world, a, "backend_dev", "dev_1", "--single-task")  # push off
    assert dev.code == 0, dev.stderr
    (said,) = dev.of("push_off")
    assert said["remote"] == "origin" and "other machines do not see it" in said["reason"]
    assert "warning: push is off" in dev.stderr
    assert "other machines do not see it" in world.status(task["id"])["notes"]

    qa = run_on(world, b, "qa", "qa_1", "--single-task", env={"PMTOOL_RETRY_COOLDOWN": "600"})
    assert qa.code == 1, qa.stderr
    (event,) = qa.of("no_branch")
    assert "nothing to review" in event["reason"] and event["branch"] == task["branch"]
    (given,) = qa.of("finished")
    assert given["outcome"] == "given_back" and given["stop"] == "no_branch"
    assert given["cooling_until"] and not given["parked"]
    after = world.status(task["id"])
    assert after["status"] == "dev_done" and after["locked_by"] is None
    assert "nothing to review" in after["notes"]
    (line,) = b.attempts(task["id"])
    assert line["counts"] is False and line["failure"] is False
    # No branch made from the base on B, none pushed anywhere.
    assert git(b.repo, "branch", "--list", task["branch"]) == ""
    assert git(origin, "branch", "--list", task["branch"]) == ""
    assert not list((b.repo / ".worktrees").glob(f"task-{task['id']}*"))


def test_a_remote_unreachable_during_the_fetch_gives_the_task_back_uncounted(
        world: World, fleet) -> None:
    _origin, a, b, _c = fleet
    task = world.task()
    assert run_on(world, a, "backend_dev", "dev_1", "--single-task", "--push").code == 0
    git(b.repo, "remote", "set-url", "origin", str(world.tmp / "gone.git"))

    qa = run_on(world, b, "qa", "qa_1", "--single-task", "--push")
    assert qa.code == 1, qa.stderr
    (given,) = qa.of("finished")
    assert given["stop"] == "remote" and given["outcome"] == "given_back"
    error = qa.of("error")[-1]["error"]
    assert error["type"] == "machine_fault" and error["remote_unreachable"] is True
    assert "git remote -v" in error["hint"] and "fix: check `git remote -v`" in qa.stderr
    after = world.status(task["id"])
    assert after["status"] == "dev_done" and after["locked_by"] is None
    (line,) = b.attempts(task["id"])
    assert line["counts"] is False and line["failure"] is False


def test_the_runner_backs_off_and_carries_on_once_the_remote_is_back(world: World,
                                                                      fleet) -> None:
    origin, a, b, _c = fleet
    task = world.task()
    assert run_on(world, a, "backend_dev", "dev_1", "--single-task", "--push").code == 0
    git(b.repo, "remote", "set-url", "origin", str(world.tmp / "gone.git"))
    args = [*b.args("qa", "qa_1", "--settle", "0.05", "--idle-poll", "0.5", "--max-tasks",
                    "1"), "--agent-cmd", fake_agent.command()]
    proc = subprocess.Popen([PMTOOL, "run", *args], env=b.env(world), cwd=b.repo, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: b.attempts(task["id"]), timeout=60, what="the give-back")
        git(b.repo, "remote", "set-url", "origin", str(origin))
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    run = Run(proc.returncode, events(out), err)
    assert [e for e in run.of("error") if e.get("retry_in_s") is not None
            and e["error"].get("remote_unreachable")]
    assert world.status(task["id"])["status"] == "qa_done"
    first, *_later = b.attempts(task["id"])
    assert first["stop"] == "remote" and first["counts"] is False


def test_a_bounced_task_on_a_third_machine_continues_the_branch(world: World, fleet) -> None:
    origin, a, b, c = fleet
    task = world.task()
    assert run_on(world, a, "backend_dev", "dev_1", "--single-task", "--push").code == 0
    # C once worked the branch and kept a commit it never pushed: diverged from origin.
    stale = unpushed_commit(c.repo, task["branch"], "stale.txt", "C's unpushed work\n", "stale")

    qa = run_on(world, b, "qa", "qa_1", "--single-task", "--push",
                env={"PMTOOL_FAKE_AGENT_OUTCOME": "fail"})
    assert qa.code == 0, qa.stderr
    assert world.status(task["id"])["status"] == "created"
    qa_head = git(origin, "rev-parse", task["branch"])

    dev = run_on(world, c, "backend_dev", "dev_3", "--single-task", "--push")
    assert dev.code == 0, dev.stderr
    (made,) = [e for e in dev.of("worktree") if e.get("created")]
    assert made["local"] == "diverged" and made["rescued"].startswith("refs/pmtool/rescue/")
    # Nothing lost: C's commit on the rescue ref; the branch continued from origin's copy,
    # and the push landed without force.
    assert git(c.repo, "rev-parse", made["rescued"]) == stale
    assert git(origin, "rev-parse", f"{task['branch']}^") == qa_head
    notes = world.status(task["id"])["notes"]
    assert made["rescued"] in notes and "diverged" in notes and "pushed to origin" in notes
    assert world.status(task["id"])["status"] == "dev_done"


# ---- pm-runner.sh: the same rules ------------------------------------------------------------


def script_on(world: World, machine: Machine, role: str, agent: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    bin_dir = str(Path(PMTOOL).parent)
    full = {**machine.env(world), "PMTOOL_CLAIM_SETTLE": "0.05", **(env or {}),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return subprocess.run([str(SCRIPTS / "pm-runner.sh"), "--role", role, "--agent-id", agent,
                           "--repo", str(machine.repo), "--single-task", "--agent-cmd",
                           fake_agent.command()], env=full, capture_output=True, text=True,
                          cwd=machine.repo, timeout=120, check=False)


def test_pm_runner_fetches_gives_back_nothing_to_review_and_a_dead_remote(world: World,
                                                                          fleet) -> None:
    origin, a, b, c = fleet
    pushed, kept = world.task(title="pushed"), world.task(title="kept")
    # Task `pushed` through the script with push on; `kept` with push off (a warning).
    first = script_on(world, a, "backend_dev", "dev_1", env={"PMTOOL_PUSH": "1"})
    assert first.returncode == 0, first.stderr
    assert "warning: push is off" not in first.stderr
    second = script_on(world, a, "backend_dev", "dev_1")
    assert second.returncode == 0, second.stderr
    assert "warning: push is off: the work stays on this machine" in second.stderr
    # `finish --full` says where the work stayed, as `pmtool run`'s finish does.
    assert "not pushed (push is off: the work stays on this machine" in \
        world.status(kept["id"])["notes"]

    qa = script_on(world, b, "qa", "qa_1", env={"PMTOOL_PUSH": "1"})
    assert qa.returncode == 0, qa.stderr
    assert git(origin, "rev-parse", f"{pushed['branch']}^") == \
        git(a.repo, "rev-parse", pushed["branch"])
    assert world.status(pushed["id"])["status"] == "qa_done"

    nothing = script_on(world, b, "qa", "qa_1")
    assert nothing.returncode == 1, nothing.stderr
    assert world.status(kept["id"])["status"] == "dev_done"
    assert "nothing to review" in world.status(kept["id"])["notes"]
    assert [x["stop"] for x in b.attempts(kept["id"])] == ["no_branch"]
    assert not b.attempts(kept["id"])[0]["counts"]

    git(c.repo, "remote", "set-url", "origin", str(world.tmp / "gone.git"))
    dead = script_on(world, c, "qa", "qa_2")
    assert dead.returncode == 1, dead.stderr
    assert "fix: check `git remote -v`" in dead.stderr
    assert world.status(kept["id"])["status"] == "dev_done"
    assert [(x["stop"], x["counts"]) for x in c.attempts(kept["id"])] == [("remote", False)]


# ---- health: where work goes -----------------------------------------------------------------


def test_health_reports_a_remote_that_cannot_be_reached_or_refuses_pushes(world: World,
                                                                         fleet) -> None:
    origin, _a, b, _c = fleet
    env = b.env(world)
    good = pmtool("health", "--check", "remote", "--repo", str(b.repo), env=env)
    assert good.code == 0, good.out
    (check,) = good.out["checks"]
    assert check["ok"] and check["remote"] == "origin" and check["push"] is True

    assert "push is off: this machine's work stays here" in check["detail"]

    # Fetching works, pushing does not (a push URL nobody can write): with push on that is
    # a failure; the dry run changed nothing on origin.
    before = git(origin, "for-each-ref")
    git(b.repo, "remote", "set-url", "--push", "origin", str(world.tmp / "no-push.git"))
    refused = pmtool("health", "--check", "remote", "--repo", str(b.repo),
                     env={**env, "PMTOOL_PUSH": "1"})
    assert refused.code == 1
    (check,) = refused.out["checks"]
    assert not check["ok"] and check["push"] is False and "refuses pushes" in check["detail"]
    assert check["fetch"] is True
    assert "pmtool: health: remote failed" in refused.stderr
    assert git(origin, "for-each-ref") == before
    quiet = pmtool("health", "--check", "remote", "--repo", str(b.repo), env=env)
    assert quiet.code == 0 and "also refuses pushes" in quiet.out["checks"][0]["detail"]

    git(b.repo, "remote", "set-url", "origin", str(world.tmp / "gone.git"))
    gone = pmtool("health", "--check", "remote", "--repo", str(b.repo), env=env)
    assert gone.code == 1
    (check,) = gone.out["checks"]
    assert not check["ok"] and "cannot be reached" in check["detail"] and check["hint"]

    alone = pmtool("health", "--check", "remote", "--repo", str(world.tmp / "none"), env=env)
    assert alone.code == 0  # not a checkout: nothing to say about remotes


def test_a_fleet_says_push_is_off_once_per_process(world: World, fleet) -> None:
    _origin, a, _b, _c = fleet
    run = run_on(world, a, "backend_dev", "dev", "--agents", "3", "--single-task")
    assert run.code == 3, run.stderr  # nothing to do
    assert sorted(e["agent"] for e in run.of("push_off")) == ["dev-1", "dev-2", "dev-3"]
    assert run.stderr.count("warning: push is off") == 1
    pushing = run_on(world, a, "backend_dev", "dev", "--agents", "2", "--single-task",
                     "--push")
    assert not pushing.of("push_off") and "push is off" not in pushing.stderr

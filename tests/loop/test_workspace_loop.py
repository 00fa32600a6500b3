"""Where work ends up under `pmtool run`: one workspace per task, minor tasks that land or
wait for review, and a task lost mid-work (given away, aged out, moved by a person).

Real runners in subprocesses against a private stand-in, the fake agent, real git; each
test asserts where each file of the agent's work ended up and what the server shows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from helpers import PMTOOL, Run, World, events, wait_for

RECONCILE = {"PMTOOL_RECONCILE_INTERVAL": "0.2"}


def finish(proc: subprocess.Popen, timeout: float = 60) -> Run:
    out, err = proc.communicate(timeout=timeout)
    return Run(proc.returncode, events(out), err)


def history(world: World) -> list[dict]:
    path = world.state / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def show(world: World, ref: str, name: str) -> str:
    return world.git("show", f"{ref}:{name}")


def test_two_tasks_on_one_branch_never_share_a_worktree(world: World) -> None:
    first = world.task(title="first", branch="feature/shared")
    runner = world.start("--agent-id", "dev_1", "--single-task",
                         env={"PMTOOL_FAKE_AGENT_SLEEP": "3"})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    second = world.task(title="second", branch="feature/shared")
    deferred = world.run("--agent-id", "dev_2", "--single-task",
                         env={"PMTOOL_RETRY_COOLDOWN": "600"})
    assert deferred.code == 1, deferred.stderr
    (event,) = deferred.of("deferred")
    assert event["task_id"] == second["id"] and event["held_by_task"] == first["id"]
    assert "never shares" in event["reason"]
    # Not the task's fault: no attempt counted, but one cooldown so it is not claimed and
    # given back every few seconds while the first task works.
    (given,) = deferred.of("finished")
    assert given["stop"] == "deferred" and given["cooling_until"] and not given["parked"]
    (line,) = [h for h in history(world) if h.get("kind") == "attempt"
               and h.get("task_id") == second["id"]]
    assert line["counts"] is False
    on_server = world.status(second["id"])
    assert on_server["status"] == "created" and on_server["locked_by"] is None
    assert "deferred" in on_server["notes"]
    assert finish(runner).code == 0
    # The first task's work is whole on the branch; now the second takes its turn there.
    done = world.run("--agent-id", "dev_2", "--single-task")
    assert done.code == 0, done.stderr
    assert world.status(second["id"])["status"] == "dev_done"
    for task in (first, second):
        assert f"task {task['id']}" in show(world, "feature/shared",
                                            f"notes/task-{task['id']}.md")
    paths = {e["path"] for e in done.of("worktree") if e.get("path")}
    assert all(f"task-{second['id']}-" in Path(p).name for p in paths)


def test_minor_task_in_a_dirty_checkout_stays_for_review(world: World) -> None:
    (world.repo / "owner.txt").write_text("the owner's unsaved work\n")
    task = world.task(title="small fix", complexity="minor", branch="main")
    run = world.run("--single-task")
    assert run.code == 0, run.stderr
    (not_landed,) = run.of("not_landed")
    branch = not_landed["branch"]
    assert branch.startswith(f"pmtool/task-{task['id']}-") and "dirty" in not_landed["reason"]
    # The work is on its branch, main and the owner's file untouched, nothing of the
    # owner's in the task's commits.
    assert f"task {task['id']}" in show(world, branch, f"notes/task-{task['id']}.md")
    assert world.git("log", "--format=%s", "main") == "start"
    assert (world.repo / "owner.txt").read_text() == "the owner's unsaved work\n"
    assert "owner.txt" not in world.git("log", "--name-only", "--format=", branch)
    assert not (world.repo / "notes").exists()
    notes = world.status(task["id"])["notes"]
    assert world.status(task["id"])["status"] == "dev_done"
    assert f"left on branch {branch} for review" in notes


def test_minor_task_in_a_clean_checkout_lands_by_fast_forward(world: World) -> None:
    task = world.task(title="small fix", complexity="minor", branch="main")
    run = world.run("--single-task")
    assert run.code == 0, run.stderr
    (landed,) = run.of("landed")
    assert world.git("rev-parse", "main") == landed["head"]
    assert (world.repo / f"notes/task-{task['id']}.md").exists()  # the checkout followed
    assert world.git("status", "--porcelain") == ""
    assert landed["branch"] not in world.git("branch", "--format=%(refname:short)")
    assert "landed on main by fast-forward" in world.status(task["id"])["notes"]


def test_minor_in_checkout_refuses_a_dirty_checkout(world: World) -> None:
    (world.repo / "owner.txt").write_text("the owner's unsaved work\n")
    task = world.task(title="small fix", complexity="minor", branch="main")
    run = world.run("--single-task", env={"PMTOOL_MINOR_IN_CHECKOUT": "1"})
    assert run.code == 1, run.stderr
    assert "dirty checkout" in run.of("deferred")[0]["reason"]
    assert world.status(task["id"])["status"] == "created"
    assert world.git("status", "--porcelain") == "?? owner.txt"
    (world.repo / "owner.txt").unlink()
    run = world.run("--single-task", env={"PMTOOL_MINOR_IN_CHECKOUT": "1"})
    assert run.code == 0, run.stderr
    assert "notes" in world.git("log", "-1", "--name-only", "--format=", "main")


def test_task_given_to_another_agent_mid_work(world: World) -> None:
    task = world.task()
    proc = world.start("--heartbeat", "0.2", "--single-task",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "30", **RECONCILE})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    world.seeder.register("thief", "backend_dev", "senior")
    world.seeder.set_status(task["id"], "created")  # the lock goes with under_work
    world.seeder.lock(task["id"], "thief")
    world.seeder.set_status(task["id"], "under_work", agent_id="thief")
    run = finish(proc)
    assert run.code == 5, run.stderr
    (lost,) = run.of("lost")
    assert lost["loss"] == "taken" and lost["locked_by"] == "thief" and lost["action"] == "noted"
    assert lost["moved_by"] == "thief"  # its under_work is the task's last status change
    assert lost["rescued"].startswith("refs/pmtool/rescue/")
    assert f"task {task['id']}" in show(world, lost["rescued"], f"notes/task-{task['id']}.md")
    now = world.status(task["id"])
    assert now["locked_by"] == "thief" and now["status"] == "under_work"
    assert "dev_1 lost this task mid-work" in now["notes"] and lost["rescued"] in now["notes"]
    assert history(world)[-1]["outcome"] == "lost"
    assert world.store.load("dev_1") is None


def test_lock_aged_out_mid_work_goes_back_to_the_queue(world: World) -> None:
    task = world.task()
    proc = world.start("--heartbeat", "3600", "--single-task",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "30", **RECONCILE})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    world.server.advance_clock(31 * 60)
    world.seeder.register("other", "backend_dev", "senior")  # its pick drops stale locks
    run = finish(proc)
    assert run.code == 5, run.stderr
    (lost,) = run.of("lost")
    assert lost["loss"] == "aged_out" and lost["action"] == "requeued"
    now = world.status(task["id"])
    assert now["status"] == "created" and now["locked_by"] is None
    assert "ran out" in now["notes"] and lost["rescued"] in now["notes"]
    assert f"task {task['id']}" in show(world, lost["rescued"], f"notes/task-{task['id']}.md")
    entry = history(world)[-1]
    assert entry["outcome"] == "lost" and entry["steps"][-1]["loss"] == "aged_out"


def test_task_parked_by_a_person_stops_the_agent_and_says_who(world: World) -> None:
    task = world.task()
    proc = world.start("--heartbeat", "3600", "--single-task",
                       env={"PMTOOL_FAKE_AGENT_SLEEP": "30", **RECONCILE})
    wait_for(lambda: (r := world.store.load("dev_1")) and r.session_id, what="agent start")
    world.seeder.set_status(task["id"], "pending", notes="on hold: waiting for the schema")
    run = finish(proc)
    assert run.code == 5, run.stderr
    (lost,) = run.of("lost")
    assert lost["loss"] == "moved" and lost["status"] == "pending"
    assert lost["moved_by"] == world.seeder.pm_agent_id
    now = world.status(task["id"])
    assert now["status"] == "pending"  # a person's decision is left as it is
    assert now["notes"].startswith("on hold: waiting for the schema")
    assert f"task {task['id']}" in show(world, lost["rescued"], f"notes/task-{task['id']}.md")


def test_a_leftover_worktree_on_the_branch_is_rescued_not_waited_for(world: World) -> None:
    """A worktree no task record names (its task was given back, its runner gone) must not
    keep the branch forever: its work is rescued and the task goes on."""
    left = subprocess.run([PMTOOL, "worktree", "create", "99", "--branch", "feature/old",
                           "--repo", str(world.repo)], env=world.env, capture_output=True,
                          text=True, check=True)
    old = Path(json.loads(left.stdout)["path"])
    (old / "half-done.txt").write_text("someone's unfinished work\n")
    task = world.task(branch="feature/old")
    run = world.run("--single-task")
    assert run.code == 0, run.stderr
    assert not run.of("deferred") and world.status(task["id"])["status"] == "dev_done"
    assert not old.exists()
    refs = world.git("for-each-ref", "--format=%(refname)", "refs/pmtool/rescue/task-99")
    assert show(world, refs.splitlines()[0], "half-done.txt") == "someone's unfinished work"


def test_qa_reviews_a_minor_task_left_on_its_branch_and_its_pass_lands_it(world: World) -> None:
    (world.repo / "owner.txt").write_text("the owner's unsaved work\n")
    task = world.task(title="small fix", complexity="minor", branch="main")
    dev = world.run("--single-task")
    branch = dev.of("not_landed")[0]["branch"]
    (world.repo / "owner.txt").unlink()  # the owner is done; the checkout is clean
    qa = world.run("--single-task", "--role", "qa", "--agent-id", "qa_1")
    assert qa.code == 0, qa.stderr
    # QA worked on the developer's branch: the developer's notes were there to review.
    wt = qa.of("worktree")[0]  # created (the second is its removal)
    assert wt["branch"] == branch
    (landed,) = qa.of("landed")
    assert world.git("rev-parse", "main") == landed["head"]
    for name in (f"notes/task-{task['id']}.md", f"notes/task-{task['id']}-qa.md"):
        assert (world.repo / name).exists(), name
    final = world.status(task["id"])
    assert final["status"] == "qa_done" and "landed on main by fast-forward" in final["notes"]
    assert branch not in world.git("branch", "--format=%(refname:short)")

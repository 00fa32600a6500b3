"""A full or read-only disk is the machine's fault, not the task's: on real filesystems
(a small tmpfs, filled or remounted read-only; root only, else skipped), the runner gives
the task back uncounted and stops with one fatal `error` event and its fix, never a
traceback, never a half-written record; `pmtool health` sees a folder it cannot write."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

import helpers
from helpers import SmallFs, World, pmtool, wait_for
from pmtool.state import StateDir


def _fatal(run: Any) -> dict[str, Any]:
    """The run's one fatal error event, after checking the contract held around it."""
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    fatal = [e for e in run.events if e["event"] == "error" and e["error"].get("fatal")]
    assert len(fatal) == 1, run.events
    error = fatal[0]["error"]
    assert error["type"] == "machine_fault" and error["hint"], error
    assert "fatal: " in run.stderr and "; fix: " in run.stderr
    assert run.events[-1]["event"] == "stopped"
    return error


def _attempts(world: World, task_id: int) -> list[dict[str, Any]]:
    return [h for h in StateDir(world.state).history(task_id=task_id, kind="attempt")]


def _paused_run(world: World, env: dict[str, str], point: str, then: Any,
                *args: str) -> helpers.Run:
    """`pmtool run` stopped at fault point `point`; `then()` breaks the disk; it goes on."""
    from helpers import wait_stopped

    proc = world.start(*args, env={**env, "PMTOOL_FAULT": f"pause-{point}"})
    try:
        wait_stopped([proc.pid], timeout=60)
        then()
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    return helpers.Run(proc.returncode, helpers.events(out), err)


# Health at the start sees the folders writable; a tmpfs is far below the default minimum.
ROOMY = {"PMTOOL_DISK_MIN_FREE_MB": "0"}


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_worktree_base_it_cannot_write_gives_the_task_back_uncounted_and_stops(
        world: World, small_fs: SmallFs, how: str) -> None:
    base = small_fs.mount("worktrees", size_kb=256)
    tasks = [world.task(f"task {i}") for i in range(3)]
    # The disk goes between the health check and the worktree: a claim has been made.
    run = _paused_run(world, {**ROOMY, "HEADLESS_PM_WORKTREE_BASE": str(base)},
                      "after-record", lambda: small_fs.fill(base) if how == "full"
                      else small_fs.read_only(base))
    assert run.code == 1, run.stderr[-3000:]
    error = _fatal(run)
    assert error["errno"] == ("ENOSPC" if how == "full" else "EROFS")
    assert ("free space" if how == "full" else "read-only") in error["hint"]
    # One task was claimed and given back, to `created`, with no attempt counted; the
    # others were never touched: the queue is not drained into `pending`.
    (claimed,) = run.of("claimed")
    for task in tasks:
        now = world.status(task["id"])
        assert (now["status"], now["locked_by"]) == ("created", None), now
    assert [a["counts"] for a in _attempts(world, claimed["task_id"])] == [False]
    assert not run.of("parked")


def test_a_worktree_base_it_cannot_write_at_the_start_holds_the_claims(
        world: World, small_fs: SmallFs) -> None:
    base = small_fs.mount("worktrees", size_kb=256)
    small_fs.read_only(base)
    task = world.task()
    proc = world.start(env={**ROOMY, "HEADLESS_PM_WORKTREE_BASE": str(base)})
    try:
        lines: list[str] = []
        wait_for(lambda: lines.append(proc.stdout.readline()) or '"health"' in lines[-1],
                 timeout=60, what="the health event")
        health = helpers.events(lines[-1])[0]
        assert health["failed"] == ["disk"] and "not writable" in health["details"]["disk"]
        assert world.status(task["id"])["status"] == "created"  # paused: nothing claimed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_read_only_state_folder_at_start_stops_with_one_json_error(
        world: World, small_fs: SmallFs) -> None:
    state = small_fs.mount("state")
    StateDir(state).ensure()  # a machine that ran before
    small_fs.read_only(state)
    task = world.task()
    run = world.run("--single-task", env={**ROOMY, "PMTOOL_STATE_DIR": str(state)})
    assert run.code == 1, run.stderr[-3000:]
    assert _fatal(run)["errno"] == "EROFS"
    assert not run.of("claimed")
    assert world.status(task["id"])["status"] == "created"


def test_a_state_folder_filling_up_mid_agent_stops_resumable_and_leaves_no_temp_file(
        world: World, small_fs: SmallFs) -> None:
    state = small_fs.mount("state", size_kb=1024)
    env = {**ROOMY, "PMTOOL_STATE_DIR": str(state)}
    task = world.task()
    fillers: list[Path] = []
    # Stopped while the agent is at work, its output on its way: then the disk is full.
    run = _paused_run(world, env, "agent-tool", lambda: fillers.append(small_fs.fill(state)),
                      "--single-task")
    assert run.code == 1, run.stderr[-3000:]
    assert _fatal(run)["errno"] == "ENOSPC"
    assert list((state / "records").glob(".*.tmp")) == []
    # Left resumable (its record as last written) or given back uncounted: never lost.
    now = world.status(task["id"])
    record = (state / "records" / "dev_1.json")
    if record.exists():
        assert (now["status"], now["locked_by"]) == ("under_work", "dev_1")
    else:
        assert (now["status"], now["locked_by"]) == ("created", None)
    fillers[0].unlink()
    again = world.run("--single-task", env=env)
    assert again.code == 0, again.stderr[-3000:]
    assert world.status(task["id"])["status"] == "dev_done"


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_health_fails_a_state_folder_it_cannot_write(tmp_path: Path, small_fs: SmallFs,
                                                     how: str) -> None:
    state = small_fs.mount("state", size_kb=256)
    StateDir(state).ensure()
    env = {"PMTOOL_STATE_DIR": str(state), "PMTOOL_CONFIG": os.devnull,
           "HEADLESS_PM_WORKTREE_BASE": str(tmp_path), "PMTOOL_DISK_MIN_FREE_MB": "0"}
    assert pmtool("health", "--check", "disk", env=env).code == 0
    if how == "full":
        small_fs.fill(state)
    else:
        small_fs.read_only(state)
    res = pmtool("health", "--check", "disk", env=env)
    (check,) = res.out["checks"]
    assert res.code == 1 and check["ok"] is False, check
    assert list(check["unwritable"]) == ["state_dir"] and "not writable" in check["detail"]


def test_a_command_on_a_read_only_state_folder_answers_one_json_error(
        world: World, small_fs: SmallFs) -> None:
    state = small_fs.mount("state")
    StateDir(state).ensure()
    small_fs.read_only(state)
    task = world.task()
    env = {**world.env, "PMTOOL_STATE_DIR": str(state)}
    res = pmtool("claim", "--agent-id", "dev_ro", "--role", "backend_dev", env=env)
    assert res.code == 1 and res.out["error"]["type"] == "machine_fault", res.out
    assert res.out["error"]["errno"] == "EROFS" and "Traceback" not in res.stderr
    now = world.status(task["id"])
    assert (now["status"], now["locked_by"]) == ("created", None)  # nothing claimed


def test_a_state_folder_filling_up_while_idle_holds_the_claims(
        world: World, small_fs: SmallFs) -> None:
    state = small_fs.mount("state", size_kb=1024)
    proc = world.start(env={**ROOMY, "PMTOOL_STATE_DIR": str(state),
                            "HEADLESS_PM_HEALTH_CHECK_INTERVAL": "0.5"})
    seen: list[dict[str, Any]] = []

    def next_event(kind: str, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            seen.extend(helpers.events(proc.stdout.readline()))
            event = seen[-1] if seen else {}
            ok = event.get("event") == kind and all(event.get(k) == v for k, v in match.items())
            return event if ok else None
        return wait_for(found, timeout=60, what=f"a {kind} event")

    try:
        next_event("idle")
        small_fs.fill(state)
        task = world.task()
        health = next_event("health", ok=False)
        assert "not writable" in health["details"]["disk"]
        assert world.status(task["id"])["status"] == "created"  # held: nothing claimed
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]


def test_a_worktree_base_without_access_gives_the_task_back_uncounted_and_stops(
        world: World, tmp_path: Path) -> None:
    # Where no tmpfs can be mounted (not root), a folder the user may not write is the
    # same machine fault, on a real filesystem (root writes anywhere: the tests above).
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the tmpfs tests cover the machine fault")
    base = tmp_path / "closed"
    base.mkdir()
    task = world.task()
    try:
        run = _paused_run(world, {**ROOMY, "HEADLESS_PM_WORKTREE_BASE": str(base / "trees")},
                          "after-record", lambda: base.chmod(0o500))
    finally:
        base.chmod(0o700)
    assert run.code == 1, run.stderr[-3000:]
    assert _fatal(run)["errno"] == "EACCES"
    assert world.status(task["id"])["status"] == "created"
    assert [a["counts"] for a in _attempts(world, task["id"])] == [False]


@pytest.mark.parametrize(("code", "fix"), [("ENOSPC", "free space"), ("EDQUOT", "free space"),
                                           ("EROFS", "read-only"), ("EACCES", "write access")])
def test_each_disk_error_is_a_machine_fault_with_its_fix(code: str, fix: str) -> None:
    import errno

    from pmtool.errors import MachineFault, disk_fault

    number = getattr(errno, code)
    raised = disk_fault(OSError(number, os.strerror(number), "/srv/state/records/x.json"))
    assert isinstance(raised, MachineFault) and raised.details["errno"] == code
    assert raised.details["path"] == "/srv/state/records/x.json" and fix in (raised.hint or "")
    said = disk_fault(f"fatal: could not create work tree dir '/srv/t/task-1': "
                      f"{os.strerror(number)}\n", "/srv/t")
    assert said is not None and said.details["errno"] == code
    assert disk_fault(OSError(errno.ECONNREFUSED, "refused")) is None
    assert disk_fault("fatal: invalid reference: feature/x") is None


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp(
        small_fs: SmallFs) -> None:
    import errno

    from pmtool.state import atomic_write_json

    folder = small_fs.mount("records", size_kb=64)
    record = folder / "dev_1.json"
    atomic_write_json(record, {"v": 1})
    small_fs.fill(folder)
    with pytest.raises(OSError) as raised:
        atomic_write_json(record, {"v": 2, "pad": "x" * 65536})
    assert raised.value.errno == errno.ENOSPC
    assert record.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["dev_1.json", "filler"]  # no .tmp

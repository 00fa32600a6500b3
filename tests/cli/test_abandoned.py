"""No orphans: `recover --orphans` (the PM's cron) and a corrupt record's task.

In the shared world (tests/helpers.py: a private stand-in, whose clock is moved to age
agents past the server's 30 minutes); every test checks what the server shows afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from helpers import World, ago, pmtool
from pmtool.testing.seed import Seeder


def under_work(seed: Seeder, title: str, agent: str | None) -> dict[str, Any]:
    task = seed.create_task(title=title)
    if agent:
        seed.lock(task["id"], agent)
    return seed.set_status(task["id"], "under_work", agent_id=agent)["task"]


def test_orphans_go_back_to_created_and_nothing_else_is_touched(world):
    server, seed, env = world.server, world.seeder, world.env
    seed.register("dev_gone", "backend_dev", "senior")
    server.advance_clock(31 * 60)
    # Locks do not refresh last_seen (quirk 3): dev_gone stays unseen for 31 minutes.
    seed.register("dev_alive", "backend_dev", "senior")
    # Status changes pick a next task too (and so drop stale locks): dev_gone's locks
    # come last, by lock calls only, which neither pick nor look at the status.
    stale = under_work(seed, "its agent went away", None)
    unlocked = under_work(seed, "under work, no lock", None)
    done = seed.create_task(title="dev_done, locked by the stale agent")
    seed.set_status(done["id"], "dev_done")
    alive = under_work(seed, "its agent works", "dev_alive")
    queued = seed.create_task(title="in the queue")
    seed.lock(stale["id"], "dev_gone")
    seed.lock(done["id"], "dev_gone")
    before = {t["id"]: t for t in seed.list_tasks()}

    dry = pmtool("recover", "--orphans", "--dry-run", env=env)
    assert dry.code == 0, dry.out
    assert {e["task_id"]: e["action"] for e in dry.out["orphans"]} == {
        stale["id"]: "would_requeue", unlocked["id"]: "would_requeue"}
    assert {t["id"]: t for t in seed.list_tasks()} == before
    by_id = {e["task_id"]: e for e in dry.out["orphans"]}
    assert "dev_gone, unseen for 31 minutes" in by_id[stale["id"]]["reason"]
    assert by_id[unlocked["id"]]["reason"] == "under work with no lock"

    res = pmtool("recover", "--orphans", env=env)
    assert res.code == 0 and res.out["counts"] == {"requeued": 2}
    after = {t["id"]: t for t in seed.list_tasks()}
    for task in (stale, unlocked):
        assert after[task["id"]]["status"] == "created"
        assert after[task["id"]]["locked_by"] is None
        assert "pmtool recover --orphans" in after[task["id"]]["notes"]
    for task in (alive, queued):
        assert after[task["id"]] == before[task["id"]]
    # Registering made the server drop dev_gone's stale lock itself (its 30-minute rule
    # runs before every pick, and register picks): the status is as it was.
    assert after[done["id"]]["status"] == "dev_done"
    assert pmtool("recover", "--orphans", env=env).out["orphans"] == []


def test_orphans_limited_to_named_tasks(world):
    seed, env = world.seeder, world.env
    first = under_work(seed, "one", None)
    second = under_work(seed, "two", None)
    res = pmtool("recover", "--orphans", "--task", str(second["id"]), env=env)
    assert [e["task_id"] for e in res.out["orphans"]] == [second["id"]]
    assert seed.get_task(first["id"])["status"] == "under_work"
    assert seed.get_task(second["id"])["status"] == "created"


def test_a_corrupt_records_task_is_found_and_given_back(world, tmp_path):
    seed, env = world.seeder, world.env
    seed.register("dev_torn", "backend_dev", "senior")
    task = under_work(seed, "its record broke", "dev_torn")
    records = tmp_path / "state" / "records"
    records.mkdir(parents=True)
    # A torn write: the start of a record, cut off mid-way.
    (records / "dev_torn.json").write_text(
        '{\n  "agent_id": "dev_torn",\n  "role": "backend_dev",\n  "task": {\n'
        f'    "id": {task["id"]},\n    "title": "its rec')
    res = pmtool("recover", env=env)
    assert res.code == 0, res.out
    (entry,) = res.out["entries"]
    assert entry["action"] == "corrupt" and entry["task_id"] == task["id"]
    assert entry["agent_id"] == "dev_torn" and entry["task_action"] == "given back to created"
    assert Path(entry["kept_as"]).read_text().startswith('{\n  "agent_id": "dev_torn"')
    assert not (records / "dev_torn.json").exists()
    now = seed.get_task(task["id"])
    assert now["status"] == "created" and now["locked_by"] is None
    assert "was corrupt" in now["notes"]


def test_a_corrupt_record_named_only_by_its_file(world, tmp_path):
    seed, env = world.seeder, world.env
    seed.register("dev_junk", "backend_dev", "senior")
    task = under_work(seed, "record is garbage", "dev_junk")
    records = tmp_path / "state" / "records"
    records.mkdir(parents=True)
    (records / "dev_junk.json").write_bytes(b"\x00\x01 not json")
    dry = pmtool("recover", "--dry-run", env=env)
    (entry,) = dry.out["entries"]
    assert entry["task_id"] == task["id"] and entry["task_action"] == "given back to created"
    assert seed.get_task(task["id"])["status"] == "under_work"  # a dry run changes nothing
    assert (records / "dev_junk.json").exists()
    pmtool("recover", env=env)
    assert seed.get_task(task["id"])["status"] == "created"


class RacingServer:
    """An orphan whose agent re-registers between the look and the change (a heartbeat
    after a network gap): the change must not happen."""

    def __init__(self) -> None:
        self.task = {"id": 7, "status": "under_work", "locked_by": "dev_slow",
                     "created_at": ago(hours=1, seconds=30, zone=""), "notes": None}
        self.seen = [ago(hours=1, seconds=30, zone=""), ago(seconds=30, zone="")]  # then it beats
        self.changes: list[tuple] = []

    def list_tasks(self, status: str | None = None, role: str | None = None) -> list[dict]:
        return [dict(self.task)]

    def get_task(self, task_id: int, status: str | None = None) -> dict | None:
        return dict(self.task)

    def agents(self) -> list[dict]:
        return [{"agent_id": "dev_slow", "last_seen": self.seen.pop(0)}]

    def health(self) -> dict:
        return {"timestamp": ago(zone="")}

    def set_status(self, *args: Any, **kwargs: Any) -> dict:
        self.changes.append(args)
        return {}


def test_an_orphan_whose_agent_comes_back_is_left_alone():
    from pmtool.work.recover import recover_abandoned

    server = RacingServer()
    (entry,) = recover_abandoned(server, "pm_cron")
    assert entry.action == "skipped" and "changed meanwhile" in entry.reason
    assert server.changes == []


# Any file that cannot be read as a record: bytes that are not UTF-8, JSON of another
# shape, a record whose fields have the wrong types.
UNREADABLE = {
    "random-bytes": b"\x87\xff\xfe\x00\x9c" + bytes(range(128, 256)),
    "json-list": b'["agent_id", "dev_x"]',
    "json-number": b"42",
    "wrong-types": b'{"agent_id": "dev_bytes", "role": "backend_dev", "level": "senior", '
                   b'"server_url": "u", "previous_status": "created", "task": {"id": "x"}, '
                   b'"steps": "none"}',
}


def _unreadable_record(world: World, tmp_path: Path, content: bytes) -> tuple[dict, Path]:
    seed = world.seeder
    seed.register("dev_bytes", "backend_dev", "senior")
    task = under_work(seed, "its record is bytes", "dev_bytes")
    records = tmp_path / "state" / "records"
    records.mkdir(parents=True, exist_ok=True)
    path = records / "dev_bytes.json"
    path.write_bytes(content)
    return task, path


def _given_back(seed: Seeder, task: dict, path: Path, content: bytes) -> None:
    now = seed.get_task(task["id"])
    assert (now["status"], now["locked_by"]) == ("created", None)
    assert not path.exists()
    (kept,) = path.parent.glob("dev_bytes.json.corrupt-*")
    assert kept.read_bytes() == content


@pytest.mark.parametrize("content", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_recover_all_keeps_an_unreadable_record_aside_and_gives_its_task_back(
        world, tmp_path, content):
    task, path = _unreadable_record(world, tmp_path, content)
    res = pmtool("recover", "--all", env=world.env)
    assert res.code == 0, res.out
    (entry,) = res.out["entries"]
    assert entry["action"] == "corrupt" and entry["task_id"] == task["id"]
    _given_back(world.seeder, task, path, content)


@pytest.mark.parametrize("content", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_health_keeps_an_unreadable_record_aside_and_gives_its_task_back(
        world, tmp_path, content):
    task, path = _unreadable_record(world, tmp_path, content)
    res = pmtool("health", "--check", "records", env=world.env)
    (check,) = res.out["checks"]
    assert check["ok"] is False and "crashed" not in check["detail"], check
    assert "corrupt records kept aside" in check["detail"]
    assert check["corrupt_tasks"][0]["task_id"] == task["id"]
    _given_back(world.seeder, task, path, content)
    again = pmtool("health", "--check", "records", env=world.env)
    assert again.code == 0, again.out  # reported once; the kept file is for a person


def test_status_lists_an_unreadable_record_and_moves_nothing(world, tmp_path):
    task, path = _unreadable_record(world, tmp_path, UNREADABLE["random-bytes"])
    res = pmtool("status", env=world.env)
    assert res.code == 0, res.out
    assert res.out["corrupt_records"] == [str(path)]
    assert path.exists() and world.seeder.get_task(task["id"])["status"] == "under_work"


def test_stray_temp_files_of_a_killed_write_are_cleaned(world, tmp_path):
    import subprocess
    import sys

    records = tmp_path / "state" / "records"
    records.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    empty, begun = records / f".dev_a.json.{dead}.tmp", records / f".dev_b.json.{dead}.tmp"
    writing = records / f".dev_c.json.{os.getpid()}.tmp"  # a live writer: not stray
    empty.write_bytes(b"")
    begun.write_text('{"agent_id": "dev_b"')
    writing.write_bytes(b"")
    dry = pmtool("recover", "--all", "--dry-run", env=world.env)
    assert sorted(t["path"] for t in dry.out["error"]["stray_temps"]) == [str(empty), str(begun)]
    assert empty.exists() and begun.exists()
    res = pmtool("recover", "--all", env=world.env)
    assert res.code == 3  # no records: nothing to reconcile, the temp files cleaned all the same
    assert {t["action"] for t in res.out["error"]["stray_temps"]} == {"removed", "kept_aside"}
    assert not empty.exists() and not begun.exists() and writing.exists()
    (kept,) = records.glob("dev_b.json.unfinished-*")
    assert kept.read_text() == '{"agent_id": "dev_b"'
    os.utime(writing, (0, 0))  # an hour old: its pid was reused, the writer is long gone
    check = pmtool("health", "--check", "records", env=world.env).out["checks"][0]
    assert [t["path"] for t in check["stray_temps"]] == [str(writing)] and check["ok"]
    assert not writing.exists()

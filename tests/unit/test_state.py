"""The state folder (pmtool.state): layout, modes, the history and event readers, retention."""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from helpers import ago
from pmtool.records import RecordStore, TaskRecord
from pmtool.state import StateDir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def record(agent: str = "dev_1", task_id: int = 7) -> TaskRecord:
    return TaskRecord(agent_id=agent, role="backend_dev", level="senior",
                      server_url="http://x", task={"id": task_id, "title": "secret plans"},
                      previous_status="created")


def test_ensure_makes_private_folders_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = StateDir(tmp_path / "a" / "state")
        state.ensure()
    finally:
        os.umask(old)
    for folder in (state.root, state.records_dir, state.runners_dir, state.logs_dir,
                   state.events_dir):
        assert folder.is_dir() and mode(folder) == 0o700, folder
    assert mode(tmp_path / "a") == 0o700  # made here, so ours


def test_records_history_and_events_are_written_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = RecordStore(tmp_path / "state")
        store.save(record())
        store.close(record(), "done", status="dev_done")
        store.state.append_event("dev_1", {"event": "claimed", "time": ago()})
    finally:
        os.umask(old)
    state = store.state
    assert store.state_dir == state.root and store.dir == state.records_dir
    for path in (state.history_path, state.events_path("dev_1")):
        assert mode(path) == 0o600, path
    assert mode(state.records_dir) == 0o700


def test_a_saved_record_is_0600(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    path = store.save(record())
    assert mode(path) == 0o600


def test_closed_records_keep_their_shape_and_read_with_old_lines(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    # A line written before history kinds existed.
    old = {"closed_at": ago(days=400), "outcome": "released",
           **record("dev_0", 3).to_json()}
    state.root.mkdir(exist_ok=True)
    state.history_path.write_text(json.dumps(old) + "\n{torn line\n[1, 2]\n")
    RecordStore(state).close(record("dev_1", 7), "done", status="dev_done")
    state.append_history({"kind": "parked", "task_id": 7, "agent_id": "dev_1",
                          "reason": "blocked"})

    everything = state.history()
    assert [(h["kind"], h["task_id"], h["agent_id"]) for h in everything] == [
        ("closed", 3, "dev_0"), ("closed", 7, "dev_1"), ("parked", 7, "dev_1")]
    closed = everything[1]
    assert closed["outcome"] == "done" and closed["task"]["title"] == "secret plans"
    assert closed["steps"][-1]["step"] == "closed" and "closed_at" in closed
    assert everything[0]["at"] == old["closed_at"]  # old lines are dated by closed_at

    assert [h["kind"] for h in state.history(task_id=7)] == ["closed", "parked"]
    assert [h["task_id"] for h in state.history(kind="closed")] == [3, 7]
    assert [h["task_id"] for h in state.history(agent_id="dev_0")] == [3]
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert [h["task_id"] for h in state.history(since=since, kind="closed")] == [7]
    naive_since = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=800)  # naive: UTC
    assert len(state.history(since=naive_since)) == 3


def test_history_of_a_new_state_folder_is_empty(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "none")
    assert state.history() == [] and state.events() == [] and state.transcripts(1) == []
    assert state.usage() == {"logs_bytes": 0, "events_bytes": 0, "history_bytes": 0}
    assert state.prune(0) == {"files": 0, "bytes": 0}


def test_events_of_all_runners_merge_by_time(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    at = [ago(seconds=3), ago(seconds=2), ago(seconds=1)]
    state.append_event("dev/1", {"event": "claimed", "agent": "dev/1", "task_id": 1,
                                 "time": at[0]})
    state.append_event("qa_1", {"event": "claimed", "agent": "qa_1", "task_id": 2,
                                "time": at[1]})
    state.append_event("dev/1", {"event": "finished", "agent": "dev/1", "task_id": 1,
                                 "time": at[2]})
    with open(state.events_path("qa_1"), "a") as fh:
        fh.write('{"event": "half')  # a torn line is skipped
    assert state.events_path("dev/1").name == "dev_1.jsonl"

    assert [(e["agent"], e["event"]) for e in state.events()] == [
        ("dev/1", "claimed"), ("qa_1", "claimed"), ("dev/1", "finished")]
    assert [e["event"] for e in state.events(agent_id="dev/1")] == ["claimed", "finished"]
    assert [e["agent"] for e in state.events(task_id=2)] == ["qa_1"]
    since = datetime.fromisoformat(at[1])
    assert [e["event"] for e in state.events(since=since)] == ["claimed", "finished"]


def test_transcripts_prune_and_usage(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    old = time.time() - 10 * 86400
    first = state.logs_dir / "task-5-aaa.jsonl"
    second = state.logs_dir / "task-5-bbb.jsonl"
    other = state.logs_dir / "task-51-ccc.jsonl"
    stderr_log = state.logs_dir / "task-5-aaa.stderr.log"
    for path in (first, second, other, stderr_log):
        path.write_text("x" * 10)
    os.utime(first, (old, old))
    os.utime(stderr_log, (old, old))
    state.append_event("dev_1", {"event": "idle", "time": ago(days=10)})
    os.utime(state.events_path("dev_1"), (old, old))
    state.append_history({"outcome": "done", "task": {"id": 5}})

    assert state.transcripts(5) == [first, second]  # oldest first, not task 51's
    before = state.usage()
    assert before["logs_bytes"] == 40 and before["events_bytes"] > 0
    assert before["history_bytes"] == state.history_path.stat().st_size

    gone = state.prune(keep_days=7)

    assert gone["files"] == 3  # two old logs and the old event log
    assert gone["bytes"] == 20 + before["events_bytes"]
    assert state.transcripts(5) == [second] and other.exists()
    assert state.history_path.exists()  # never pruned
    assert state.usage()["logs_bytes"] == 20


def test_scan_without_quarantine_moves_nothing(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.save(record("good"))
    bad = store.path("bad")
    bad.write_text("{not json")

    records, corrupt = store.scan(quarantine=False)
    assert [r.agent_id for r in records] == ["good"]
    assert [c.path for c in corrupt] == [bad] and corrupt[0].moved_to == bad
    assert bad.exists()

    records, corrupt = store.scan()
    assert [r.agent_id for r in records] == ["good"]
    assert not bad.exists() and corrupt[0].moved_to.exists()
    assert corrupt[0].moved_to.name.startswith("bad.json.corrupt-")

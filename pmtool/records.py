"""Task records: what this machine knows about the task an agent is working on.

One JSON file per agent under `<state_dir>/records/` (the layout is `pmtool.state`'s).
Writes are atomic (temp file, fsync, rename), so a crash leaves either the old record or
the new one. A record that does not parse is moved aside as `*.corrupt-<time>` and
reported, never deleted. Closed records are appended to the history
(`StateDir.append_history`), so nothing about a task is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pmtool.errors import Conflict, NothingToDo, RecordCorrupt
from pmtool.state import (  # noqa: F401 (safe_name, atomic_write_json: re-exported)
    StateDir,
    atomic_write_json,
    make_dir,
    now_iso,
    open_private,
    safe_name,
)

RECORD_VERSION = 1
MAX_STEPS = 30


@dataclass
class TaskRecord:
    agent_id: str
    role: str
    level: str
    server_url: str
    task: dict[str, Any]
    previous_status: str
    claimed_at: str = field(default_factory=now_iso)
    pid: int = field(default_factory=os.getpid)
    pid_started: float | None = None
    host: str = field(default_factory=socket.gethostname)
    worktree: str | None = None
    branch: str | None = None
    model: str | None = None
    session_id: str | None = None
    attempts: int = 0
    cost_usd: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    updated_at: str = field(default_factory=now_iso)
    version: int = RECORD_VERSION

    @property
    def task_id(self) -> int:
        return int(self.task["id"])

    def step(self, name: str, **info: Any) -> None:
        """Note a step in the short history (kept to the last MAX_STEPS)."""
        self.steps.append({"at": now_iso(), "step": name, **info})
        del self.steps[:-MAX_STEPS]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> TaskRecord:
        """A record from its JSON; ValueError for anything that is not one (a list, a
        number, a field of the wrong type): every reader then treats it as corrupt."""
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        known = {f for f in cls.__dataclass_fields__}
        missing = {"agent_id", "role", "level", "server_url", "task", "previous_status"} - set(data)
        if missing or not isinstance(data.get("task"), dict) or "id" not in data["task"]:
            raise ValueError(f"missing fields: {sorted(missing) or ['task.id']}")
        wrong = [k for k, kind in _FIELD_TYPES.items()
                 if k in data and data[k] is not None and not isinstance(data[k], kind)]
        if wrong or isinstance(data["task"]["id"], bool) or \
                not isinstance(data["task"]["id"], (int, str)) or \
                not str(data["task"]["id"]).isdigit():
            raise ValueError(f"fields of the wrong type: {wrong or ['task.id']}")
        return cls(**{k: v for k, v in data.items() if k in known})


# What a reader relies on in each field (None is allowed where the field is optional).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "agent_id": str, "role": str, "level": str, "server_url": str, "previous_status": str,
    "claimed_at": str, "updated_at": str, "worktree": str, "branch": str, "model": str,
    "session_id": str, "host": str, "pid": int, "pid_started": (int, float),
    "attempts": int, "cost_usd": (int, float), "steps": list, "version": int}


class CorruptRecord(Exception):
    def __init__(self, path: Path, moved_to: Path, reason: str) -> None:
        super().__init__(f"record {path} is corrupt ({reason}); kept as {moved_to}")
        self.path, self.moved_to, self.reason = path, moved_to, reason


def process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def pid_alive(pid: int, started: float | None = None) -> bool:
    """True if `pid` runs and, when its start time is known, is the same process (no reuse)."""
    actual = process_started(pid)
    if actual is None:
        return False
    if started is None:
        return True
    return abs(actual - started) < 1.0


class RecordStore:
    def __init__(self, state_dir: str | Path | StateDir) -> None:
        self.state = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        self.state_dir = self.state.root
        self.dir = self.state.records_dir

    def path(self, agent_id: str) -> Path:
        return self.state.record_path(agent_id)

    def load(self, agent_id: str) -> TaskRecord | None:
        """The agent's record, None if there is none; raises CorruptRecord after quarantine."""
        return self._read(self.path(agent_id))

    def get(self, agent_id: str) -> TaskRecord | None:
        """Like `load`, but a corrupt record is a RecordCorrupt error (exit 1) for callers."""
        try:
            return self.load(agent_id)
        except CorruptRecord as exc:
            raise RecordCorrupt(
                f"the record of agent {agent_id} was corrupt ({exc.reason}); "
                f"kept as {exc.moved_to}",
                hint=f"check the server for tasks locked by {agent_id}, then run the command "
                     "again", kept_as=str(exc.moved_to)) from None

    def need(self, agent_id: str) -> TaskRecord:
        """The agent's record; NothingToDo (exit 3) when there is none."""
        record = self.get(agent_id)
        if record is None:
            raise NothingToDo(f"agent {agent_id} has no task record on this machine",
                              hint="pmtool claim takes a task and writes the record")
        return record

    def _read(self, path: Path, quarantine: bool = True) -> TaskRecord | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:  # bytes that are not UTF-8 are as corrupt as JSON that does not parse
            return TaskRecord.from_json(json.loads(raw.decode("utf-8")))
        except (ValueError, TypeError, RecursionError) as exc:
            moved = self.quarantine(path) if quarantine else path
            raise CorruptRecord(path, moved, str(exc)[:200]) from None

    def quarantine(self, path: Path) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        moved = path.with_name(f"{path.name}.corrupt-{stamp}")
        os.replace(path, moved)
        return moved

    def save(self, record: TaskRecord) -> Path:
        record.updated_at = now_iso()
        path = self.path(record.agent_id)
        atomic_write_json(path, record.to_json())
        return path

    def close(self, record: TaskRecord, outcome: str, **info: Any) -> None:
        """Retire a record: append it to the history, then remove the live file."""
        record.step("closed", outcome=outcome, **info)
        self.state.append_history({"closed_at": now_iso(), "outcome": outcome,
                                   **record.to_json()})
        with contextlib.suppress(FileNotFoundError):
            self.path(record.agent_id).unlink()

    def scan(self, *, quarantine: bool = True
             ) -> tuple[list[TaskRecord], list[CorruptRecord]]:
        """Every record on this machine; corrupt ones are listed apart and, unless
        `quarantine` is false (a dry run), moved aside."""
        good, corrupt = self.scan_files(quarantine=quarantine)
        return [record for _, record in good], corrupt

    def scan_files(self, *, quarantine: bool = True
                   ) -> tuple[list[tuple[Path, TaskRecord]], list[CorruptRecord]]:
        """Like `scan`, with the file each record was read from. Without `quarantine`
        nothing is moved: a corrupt record's `moved_to` is its own path."""
        good: list[tuple[Path, TaskRecord]] = []
        corrupt: list[CorruptRecord] = []
        if not self.dir.is_dir():
            return good, corrupt
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = self._read(path, quarantine=quarantine)
            except CorruptRecord as exc:
                corrupt.append(exc)
                continue
            if record:  # None: closed while we looked
                good.append((path, record))
        return good, corrupt

    def is_live(self, record: TaskRecord) -> bool:
        """A record is live while its runner process runs on this host."""
        if record.host != socket.gethostname():
            return True  # cannot tell from here; never treat another host's work as stale
        return pid_alive(record.pid, record.pid_started)

    # -- locks between processes on this machine -----------------------------------------

    def runner_lock(self, agent_id: str) -> RunnerLock:
        return RunnerLock(self.state.runner_lock_path(agent_id), agent_id)


class RunnerLock:
    """At most one runner per agent id on a machine: an flock held while the runner lives.

    The kernel drops the lock when the process dies, so a crash never leaves it stale.
    """

    def __init__(self, path: Path, agent_id: str) -> None:
        self.path, self.agent_id = path, agent_id
        self._fh: IO[str] | None = None

    def acquire(self) -> RunnerLock:
        make_dir(self.path.parent)
        fh = open(self.path, "a+")  # noqa: SIM115 (held for the runner's lifetime)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise Conflict(f"agent {self.agent_id} already has a runner on this machine "
                           f"(pid {holder})", hint="stop it first, or use another --agent-id",
                           pid=int(holder) if holder.isdigit() else None) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunnerLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

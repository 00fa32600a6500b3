"""The state folder: the one place that knows where pmtool keeps what on this machine.

    <state>/records/<agent>.json    the live task record of each agent (records.py)
    <state>/runners/<agent>.lock    held by the runner of each agent while it lives
    <state>/runners/<agent>.claim   held while a claim for that agent runs (pmtool.work.claim)
    <state>/poll/<role>-<level>.*   the machine's poll lease and what it saw (pmtool.run.poller)
    <state>/claim.lock              unused: claims of different agents run in parallel
    <state>/history.jsonl           closed records and other task history, one JSON per line
    <state>/events/<agent>.jsonl    every event of each runner, one JSON per line
    <state>/logs/task-<id>-<session>.jsonl (and .stderr.log)   agent transcripts
    <state>/metrics-fold.json       what `pmtool metrics` counted so far, and up to where
                                    it read each log (pmtool.views.metrics; derived, rebuilt
                                    from the logs when missing)

Folders are made 0700 and files that hold task text, transcripts or context 0600: a
task's description and an agent's transcript are nobody else's business on a shared
machine. Appends are one write() of a whole line (O_APPEND), so writers on this machine
never interleave inside a line; readers skip a line that does not parse, never fail on
it. Retention (`prune`, and `prune_logs` for `recover --keep-logs`) removes old transcripts
and event logs only: the history and the records are what "nothing lost" is about, and
they are never pruned here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pmtool.errors import UsageError

DIR_MODE = 0o700
FILE_MODE = 0o600


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> datetime | None:
    """An ISO time as pmtool writes it (or any ISO 8601), aware; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# The agent ids pmtool accepts: they name files on this machine and agents on the server,
# so nothing that is empty, blank, a path (`../x`) or a shell surprise gets through.
AGENT_ID_CHARS = "A-Z a-z 0-9 . _ -"
AGENT_ID_MAX = 64
_AGENT_ID = re.compile(r"[A-Za-z0-9._-]+")


def check_agent_id(agent_id: str, what: str = "--agent-id") -> str:
    """`agent_id` if pmtool accepts it: 1 to AGENT_ID_MAX characters of AGENT_ID_CHARS,
    not `.` or `..`; else a UsageError, raised before anything is sent to the server."""
    if (not _AGENT_ID.fullmatch(agent_id) or agent_id in (".", "..")
            or len(agent_id) > AGENT_ID_MAX):
        raise UsageError(f"{what} {json.dumps(agent_id)} is not an agent id: use 1 to "
                         f"{AGENT_ID_MAX} characters of {AGENT_ID_CHARS}, not . or ..",
                         hint=f"e.g. {what} dev_001")
    return agent_id


def safe_name(agent_id: str) -> str:
    """An agent id as a file name: anything outside [A-Za-z0-9_.-] becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", agent_id) or "_"


def make_dir(path: Path) -> None:
    """mkdir -p, each folder made here 0700 whatever the umask."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    for folder in missing:
        with contextlib.suppress(OSError):
            os.chmod(folder, DIR_MODE)


def open_private(path: Path, mode: str = "a") -> IO[str]:
    """Open a file of the state folder for text writing, created 0600 (its folder 0700)."""
    make_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    return os.fdopen(fd, mode, encoding="utf-8")


def append_line(path: Path, obj: Any, *, sync: bool = False) -> None:
    """Append one JSON line in a single write(), so concurrent writers never interleave."""
    data = (json.dumps(obj, default=str) + "\n").encode()
    make_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write a whole JSON file so that a crash leaves the old file or the new one (0600)."""
    make_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_private(tmp, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or a signal: the old file stands, no temp stays
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a .jsonl file; missing file, bad lines and non-objects skipped."""
    try:
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
    except (FileNotFoundError, NotADirectoryError):
        return
    with fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash, or a hand edit
            if isinstance(obj, dict):
                yield obj


def _files_size(paths: Iterator[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


class StateDir:
    """The layout of one state folder, and its readers and writers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.records_dir = self.root / "records"
        self.runners_dir = self.root / "runners"
        self.logs_dir = self.root / "logs"
        self.events_dir = self.root / "events"
        self.history_path = self.root / "history.jsonl"
        self.claim_lock_path = self.root / "claim.lock"
        self.metrics_fold_path = self.root / "metrics-fold.json"

    def __repr__(self) -> str:
        return f"StateDir({str(self.root)!r})"

    def ensure(self) -> None:
        """Make the folder and its subfolders (0700) if they are not there."""
        for folder in (self.records_dir, self.runners_dir, self.logs_dir, self.events_dir):
            make_dir(folder)

    def record_path(self, agent_id: str) -> Path:
        return self.records_dir / f"{safe_name(agent_id)}.json"

    def runner_lock_path(self, agent_id: str) -> Path:
        return self.runners_dir / f"{safe_name(agent_id)}.lock"

    def events_path(self, agent_id: str) -> Path:
        return self.events_dir / f"{safe_name(agent_id)}.jsonl"

    # -- stray temp files ---------------------------------------------------------------------

    def stray_temps(self, *, quarantine: bool = True,
                    now: float | None = None) -> list[dict[str, Any]]:
        """The `records/.<name>.<pid>.tmp` files a kill during `atomic_write_json` left:
        those whose writer pid is gone, or older than STRAY_TEMP_AGE (the pid was reused),
        never one a live writer may still rename. An empty one is removed; one with
        content is kept aside as `<name>.unfinished-<time>` (the record it was to replace
        is still in place: the rename never happened). Without `quarantine`, only listed."""
        if not self.records_dir.is_dir():
            return []
        now = time.time() if now is None else now
        out = []
        for path in sorted(self.records_dir.glob(".*.tmp")):
            match = _TEMP_NAME.fullmatch(path.name)
            try:
                info = path.stat()
            except OSError:
                continue  # renamed by its writer meanwhile
            writer = int(match.group(2)) if match else None
            maybe_writing = writer is None or _pid_runs(writer)
            if maybe_writing and now - info.st_mtime < STRAY_TEMP_AGE:
                continue
            entry: dict[str, Any] = {"path": str(path), "bytes": info.st_size,
                                     "writer_pid": writer}
            if quarantine:
                with contextlib.suppress(OSError):
                    if info.st_size == 0:
                        path.unlink()
                        entry["action"] = "removed"
                    else:
                        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                        name = match.group(1) if match else path.name.strip(".")
                        kept = path.with_name(f"{name}.unfinished-{stamp}")
                        os.replace(path, kept)
                        entry.update(action="kept_aside", kept_as=str(kept))
            out.append(entry)
        return out

    # -- history ----------------------------------------------------------------------------

    def append_history(self, entry: dict[str, Any]) -> None:
        """One line of task history, on disk (fsync) before this returns.

        `kind` defaults to "closed" (a retired task record: `{"closed_at", "outcome",
        **record}`, the shape every history line had before kinds existed); `at` to now.
        """
        line = {"kind": "closed", "at": now_iso(), **entry}
        append_line(self.history_path, line, sync=True)

    def history(self, *, task_id: int | None = None, agent_id: str | None = None,
                since: datetime | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """History lines, oldest first, filtered; lines that do not parse are skipped.

        Each line comes back with `kind`, `at`, `task_id` and `agent_id` filled in when the
        line has them elsewhere (old lines: `closed_at`, `task.id`), so callers filter and
        show every kind alike.
        """
        since = _aware(since) if since else None
        out = []
        for entry in map(history_entry, read_lines(self.history_path)):
            if kind is not None and entry["kind"] != kind:
                continue
            if task_id is not None and not _same_id(entry.get("task_id"), task_id):
                continue
            if agent_id is not None and entry.get("agent_id") != agent_id:
                continue
            if since is not None:  # a closed record dates from its closing
                when = parse_time(entry.get("closed_at") or entry.get("at"))
                if when is None or when < since:
                    continue
            out.append(entry)
        return out

    # -- events -----------------------------------------------------------------------------

    def append_event(self, agent_id: str, event: dict[str, Any]) -> None:
        """Keep one runner event (the dict `pmtool run` prints) in that runner's log."""
        append_line(self.events_path(agent_id), event)

    def events(self, *, agent_id: str | None = None, task_id: int | None = None,
               since: datetime | None = None) -> list[dict[str, Any]]:
        """Events of every runner (or one), merged in order of their `time`."""
        if agent_id is not None:
            paths = [self.events_path(agent_id)]
        else:
            paths = sorted(self.events_dir.glob("*.jsonl")) if self.events_dir.is_dir() else []
        since = _aware(since) if since else None
        floor = datetime.min.replace(tzinfo=UTC)
        out = []
        for path in paths:
            for event in read_lines(path):
                if agent_id is not None and event.get("agent", agent_id) != agent_id:
                    continue  # two ids with the same safe name share a file
                if task_id is not None and not _same_id(event.get("task_id"), task_id):
                    continue
                when = parse_time(event.get("time"))
                if since is not None and (when is None or when < since):
                    continue
                out.append((when or floor, event))
        out.sort(key=lambda pair: pair[0])  # stable: one runner's order is kept on ties
        return [event for _, event in out]

    # -- transcripts and retention ----------------------------------------------------------

    def transcripts(self, task_id: int) -> list[Path]:
        """The agent transcripts of a task (one per session), oldest first."""
        if not self.logs_dir.is_dir():
            return []
        paths = [p for p in self.logs_dir.glob(f"task-{task_id}-*.jsonl") if p.is_file()]
        return sorted(paths, key=lambda p: (p.stat().st_mtime, p.name))

    def prune(self, keep_days: float) -> dict[str, int]:
        """Remove transcripts, agent stderr logs and event logs untouched for `keep_days`.

        The history and the records are never removed here. Returns what went.
        """
        cutoff = time.time() - keep_days * 86400
        files = size = 0
        for folder, pattern in ((self.logs_dir, "task-*"), (self.events_dir, "*.jsonl")):
            if not folder.is_dir():
                continue
            for path in folder.glob(pattern):
                try:
                    info = path.stat()
                    if not path.is_file() or info.st_mtime >= cutoff:
                        continue
                    path.unlink()
                except OSError:
                    continue  # gone meanwhile, or not ours to remove: never fatal
                files += 1
                size += info.st_size
        return {"files": files, "bytes": size}

    def usage(self) -> dict[str, int]:
        """Bytes on disk: transcripts and logs, event logs, the history."""
        logs = self.logs_dir.rglob("*") if self.logs_dir.is_dir() else iter(())
        events = self.events_dir.glob("*") if self.events_dir.is_dir() else iter(())
        return {"logs_bytes": _files_size(logs), "events_bytes": _files_size(events),
                "history_bytes": _files_size(iter([self.history_path]))}


def history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A history line with `kind`, `at`, `task_id` and `agent_id` filled in from where
    older lines keep them (`closed_at`, `task.id`, `agent`)."""
    entry.setdefault("kind", "closed")
    entry.setdefault("at", entry.get("closed_at"))
    if "task_id" not in entry and isinstance(entry.get("task"), dict):
        entry["task_id"] = entry["task"].get("id")
    entry.setdefault("agent_id", entry.get("agent"))
    return entry


# `.<record file name>.<writer pid>.tmp`, as atomic_write_json names its temp files.
_TEMP_NAME = re.compile(r"\.(.+)\.(\d+)\.tmp")
STRAY_TEMP_AGE = 3600.0  # seconds: a temp file this old is stray even if its pid runs


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it runs
    return True


def _same_id(value: Any, task_id: int) -> bool:
    try:
        return int(value) == int(task_id)
    except (TypeError, ValueError):
        return False


# -- pruning -----------------------------------------------------------------------------

DEFAULT_KEEP_LOGS_DAYS = 30.0


def prune_logs(state_root: str | Path, keep_days: float = DEFAULT_KEEP_LOGS_DAYS
               ) -> dict[str, int]:
    """Delete logs and transcripts older than `keep_days` (the history stays)."""
    if keep_days < 0:
        raise UsageError("--keep-logs must be 0 or more days")
    return StateDir(state_root).prune(keep_days)

"""The machine's one poller per role and level, shared by every runner on it.

What limits a fleet is the load its idle agents put on the server (one FastAPI process on
SQLite), so the machine looks for work once for all of them:

- `Poller`: at most one process per state folder, role and level polls the server at a
  time. It holds the poll lease (an flock on `<state>/poll/<role>-<level>.lease`) while
  it has runners waiting, polls `GET /tasks/next?simulate=true` every `poll_interval`
  seconds, doubling while nothing comes up to `poll_max`, back to `poll_interval` as soon
  as a task is seen, and writes what it saw to `<role>-<level>.json`. The other
  processes read that file (a local read, no request). A runner that claimed a task
  touches `<role>-<level>.found`, and the leaseholder looks again at once: a queue that
  had one task may well have more. The kernel drops the lease of a process that dies.
- `SharedHealth`: one health check for the runners of one process.

No lock is held across a claim's settle: runners that see the same offer race for it on
the server, and the claim's read-back settles who won (quirk 2); the losers try the other
free tasks, as `work.claim` always did.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool.errors import PmtoolError
from pmtool.state import StateDir, atomic_write_json, make_dir, open_private, safe_name

if TYPE_CHECKING:
    from pmtool.client import PMApi
    from pmtool.views.health import HealthReport

FOLLOW_TICK = 0.2  # seconds between a follower's looks at the leaseholder's file
# An offer older than this is not handed out: every runner waiting then has seen it, and
# its task may be finished by now (the lock endpoint looks at no status; the claim's
# read-back catches that too, but puts the stray lock down with two status changes).
FRESH = 0.5


@dataclass(frozen=True)
class Offer:
    """What one poll of the server saw: a task the server would hand out, or an error."""

    seq: int
    at: float  # wall-clock time of the poll (time.time), comparable across processes
    task: dict[str, Any] | None = None
    error: str | None = None
    interval: float = 0.0  # the poll interval after this poll
    pid: int = 0  # the process that polled
    due: float = 0.0  # when the next poll is due (time.time), the interval with jitter


class Poller:
    """The machine's look for work for one role and level, shared by its waiting runners.

    `wait(after_seq, timeout, stop)` gives the first offer newer than `after_seq` that
    names a task (to one runner of the process) or an error (to all), or None. Only offers
    younger than FRESH seconds are handed out.
    """

    def __init__(self, client: PMApi, state: StateDir | str | Path, role: str, level: str,
                 interval: float = 2.0, maximum: float = 60.0) -> None:
        self.client, self.role, self.level = client, role, level
        self.state = state if isinstance(state, StateDir) else StateDir(state)
        self.base = max(0.01, float(interval))
        self.maximum = max(self.base, float(maximum))
        stem = self.state.root / "poll" / safe_name(f"{role}-{level}")
        self.lease_path = stem.with_suffix(".lease")
        self.seen_path = stem.with_suffix(".json")
        self.found_path = stem.with_suffix(".found")
        self.taken_path = stem.with_suffix(".taken")
        self._cond = threading.Condition()
        self._waiters = 0
        self._offer = Offer(0, 0.0)
        self._found = 0.0  # this process's last find, for its own leaseholder thread
        self._taken = 0  # the newest offer a runner of this process took
        self._why: tuple[float, list[str]] | None = None
        self._lease: Any = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._seen_mtime = 0.0
        self.interval = self.base
        self.polls = 0  # requests this process made (tests, benchmarks)
        self.history: deque[Offer] = deque(maxlen=100)  # this process's own polls

    # -- for runners -----------------------------------------------------------------------

    def wait(self, after_seq: int, timeout: float,
             stop: threading.Event | None = None) -> Offer | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._waiters += 1
            self._start()
            self._cond.notify_all()
            try:
                while True:
                    offer = self._offer
                    fresh = offer.seq > after_seq and time.time() - offer.at <= FRESH
                    if fresh and offer.error:
                        return offer  # every runner hears of trouble
                    if fresh and offer.task and offer.seq > self._taken:
                        # One runner of this machine per offer: a herd of lockers on one
                        # task only makes double locks (quirk 2), and an offer taken once
                        # may name a task finished by the time another process reads it.
                        # The poll looks again at once for the others (it may see the
                        # same task, its lock not yet landed: the loser of that race
                        # tries the other free tasks).
                        self._taken = offer.seq
                        if not self._take_shared(offer.at):
                            continue  # another process of this machine took it
                        if self._waiters > 1:  # others wait here: look again for them
                            self._cond.release()
                            try:
                                self.found()
                            finally:
                                self._cond.acquire()
                        return offer
                    left = deadline - time.monotonic()
                    if left <= 0 or (stop is not None and stop.is_set()) or self._closed:
                        return None
                    self._cond.wait(min(left, 0.5))
            finally:
                self._waiters -= 1

    def _take_shared(self, at: float) -> bool:
        """Take the offer of the poll made at `at` for this machine: True for the first
        process to ask (polls are told apart by their time, which only grows)."""
        try:
            make_dir(self.taken_path.parent)
            fd = os.open(self.taken_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True  # no shared note: the claim's read-back still settles any race
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = os.read(fd, 64).decode(errors="replace").strip()
            with contextlib.suppress(ValueError):
                if float(text) >= at:
                    return False
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, repr(at).encode())
            return True
        finally:
            os.close(fd)  # drops the flock

    def found(self) -> None:
        """A task was taken (offered to a runner, or claimed): look again at once, here
        and in the leaseholder, since a queue that had one task may have more."""
        now = time.time()
        with self._cond:
            self._found = now
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            make_dir(self.found_path.parent)
            self.found_path.touch()
            os.utime(self.found_path, (now, now))

    def explain(self, why: Callable[[], list[str]], ttl: float = 300.0) -> list[str]:
        """Why nothing is picked up, asked at most once per `ttl` seconds for all runners
        of the process: the answer lists every task on the server."""
        with self._cond:
            if self._why is not None and time.monotonic() - self._why[0] < ttl:
                return self._why[1]
        answer = why()
        with self._cond:
            self._why = (time.monotonic(), answer)
        return answer

    def wake(self) -> None:
        """Let waiting runners look at their stop flag now."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(5)
        self._release()

    # -- the poll thread -------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pmtool-poller",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiters == 0 and not self._closed:
                    self._release()  # nobody here waits: another process may poll
                    self._cond.wait()
                if self._closed:
                    return
            try:
                if self._hold_lease():
                    wait = self._lead()
                else:
                    self._follow()
                    wait = FOLLOW_TICK
            except Exception as exc:  # e.g. an unwritable state folder: say so, keep going
                self._publish(Offer(self._offer.seq + 1, time.time(),
                                    error=f"the poller failed: {type(exc).__name__}: {exc}",
                                    interval=self.interval, pid=os.getpid()))
                wait = self.maximum
            with self._cond:
                if not self._closed and wait > 0:
                    self._cond.wait(wait)

    def _hold_lease(self) -> bool:
        if self._lease is not None:
            return True
        fh = open_private(self.lease_path)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._lease = fh
        return True

    def _release(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lease, fcntl.LOCK_UN)
            self._lease.close()
            self._lease = None

    def _lead(self) -> float:
        """As the leaseholder: poll when due; answer the seconds until the next look."""
        last = self._read() or self._offer
        if last.seq > self._offer.seq:
            self._publish(last)
        interval = last.interval or self.base
        found = max(self._found, _mtime(self.found_path))
        due = last.due or last.at + interval
        if found > last.at:
            due = min(due, found)  # a task was taken since: the queue may hold more
        now = time.time()
        if now < due:
            return min(due - now, FOLLOW_TICK)
        self._poll(last)
        return min(self.interval, FOLLOW_TICK)

    def _poll(self, last: Offer) -> None:
        task, error = None, None
        try:
            self.polls += 1
            task = self.client.next_task(self.role, self.level, simulate=True)
        except PmtoolError as exc:
            error = exc.message
        if task:
            self.interval = self.base  # snap back: work is coming in
        else:
            self.interval = min(self.maximum, max(self.base, (last.interval or self.base) * 2))
        now = time.time()
        # Jitter: machines started together would otherwise back off in step and poll at
        # the same moments, and a new task would wait for all of them at once.
        due = now + self.interval * random.uniform(0.75, 1.0)
        offer = Offer(max(last.seq, self._offer.seq) + 1, now, task or None, error,
                      self.interval, os.getpid(), due)
        self.history.append(offer)
        with contextlib.suppress(OSError):
            atomic_write_json(self.seen_path, offer.__dict__)
        self._publish(offer)

    def _follow(self) -> None:
        offer = self._read()
        if offer and offer.seq != self._offer.seq:
            self.interval = offer.interval or self.base
            self._publish(offer)

    def _read(self) -> Offer | None:
        try:
            mtime = self.seen_path.stat().st_mtime
            if mtime == self._seen_mtime and self._offer.seq:
                return None
            data = json.loads(self.seen_path.read_text())
            offer = Offer(**{k: data.get(k) for k in Offer.__dataclass_fields__
                             if k in data})
        except (OSError, ValueError, TypeError):
            return None
        self._seen_mtime = mtime
        return offer

    def _publish(self, offer: Offer) -> None:
        with self._cond:
            self._offer = offer
            self._cond.notify_all()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class SharedHealth:
    """One health check for all runners of a process (they share server, repo, hooks and
    agent command): a passing check is kept for `interval` seconds; a failing one is not
    kept, so each runner sees it fresh."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: tuple[float, tuple[HealthReport, int]] | None = None

    def __call__(self, check: Callable[[], tuple[HealthReport, int]]
                 ) -> tuple[HealthReport, int]:
        with self._lock:
            if self._last and time.monotonic() - self._last[0] < self.interval:
                return self._last[1]
            result = check()
            self._last = (time.monotonic(), result) if result[0].ok else None
            return result


def process_agent() -> str:
    """A User-Agent naming this process, so a server's log tells the runners apart."""
    return f"pmtool (pid {os.getpid()})"

"""The one door to child processes: start them so that they can be ended whole, own them
while they run, and end them whole.

`start` runs a child in its own session, with a mark in its environment, its stdin fed
from a file, and (Linux) a parent-death signal; `Child.wait` waits for it with a time
limit, an idle limit and a stop event, and ends the whole tree when one of them fires or
when anything goes wrong (`with start(...) as child:` ends it on any exception, Ctrl-C
included). Hooks and the agent both go through it, so they behave the same, down to the
exit code of a killed child: 128+N and the signal's name for a child killed by signal N,
124 for one ended by a time limit (as timeout(1) says), never 0.

Finding the tree, three nets:
- the child's descendants, by parent pid, and its process group;
- after `become_subreaper()` (Linux, the run loop calls it), descendants that double-fork
  or call `setsid` are re-parented to us instead of to init, so they are found as our
  adopted children whatever their environment (`env -i setsid ...`);
- every process carrying the mark: processes that left the session inherit the
  environment. This is the only net for orphans where there are no subreapers (macOS,
  the BSDs) and for processes of a runner that died (`end_leftover_agent`, `recover`).

When the runner dies (`kill -9` included), Linux: each child runs under a keeper
(`pmtool/keeper.py`, a few-millisecond Python process with stdio passed straight
through and the child's exit status passed back). The keeper gets a parent-death signal
(PR_SET_PDEATHSIG) and is a subreaper itself, so everything below it stays below it;
on that signal it ends the child's whole tree (the caller's `parent_death` signal, a
grace, SIGKILL). A watcher thread could not do this: it dies with the runner. The
kernel sends the parent-death signal when the *thread* that forked the keeper ends, not
the process: `start` and `wait` are one synchronous call in the same thread
(hooks.run_hook, agent.run_agent), which therefore outlives the child; a caller that
hands a Child to another thread must keep the starting thread alive until the child is
done. Nothing runs in the child between fork and exec (no `preexec_fn`: Python documents
it as unsafe where threads run, and `run --agents N` starts children from several), so the
keeper sets its parent-death signal itself. Without a keeper (`keeper=False`,
PMTOOL_KEEPER=0, or no Python executable to run it) there is no parent-death signal: the
mark sweep (`recover`, `end_leftover_agent`) is the net.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MARK_ENV = "PMTOOL_RUN_MARK"


def new_mark(label: str | int = "run") -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def marked(mark: str) -> list[Any]:
    """Every process whose environment carries `MARK_ENV=mark` (ours to end)."""
    import psutil

    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read():
                    found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return found


def tree(pid: int, mark: str | None = None, since: float | None = None) -> list[Any]:
    """The process, its descendants, the marked processes, and (with `since`, a psutil
    create_time) the orphans we adopted as a subreaper that were born since then."""
    import psutil

    procs: dict[int, Any] = {}
    try:
        root = psutil.Process(pid)
        procs[pid] = root
        for child in root.children(recursive=True):
            procs[child.pid] = child
    except psutil.Error:
        pass
    extra = marked(mark) if mark else []
    if since is not None:
        extra += adopted(since, mark)
    for proc in extra:
        procs[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                procs[child.pid] = child
    procs.pop(os.getpid(), None)
    return list(procs.values())


def _wait_ended(procs: list[Any], timeout: float) -> list[Any]:
    """psutil.wait_procs, except that a child started by `start` is never reaped here: a
    waitpid of ours would take its exit status from Popen, which then reports exit 0
    (ECHILD) for a child that was killed. Answers the processes still running."""
    import psutil

    started = time.monotonic()
    with _owned_lock:
        owned = set(_owned)
    mine = [p for p in procs if p.pid in owned]
    _gone, alive = psutil.wait_procs([p for p in procs if p.pid not in owned],
                                     timeout=timeout)
    while mine and time.monotonic() < started + timeout:
        mine = [p for p in mine if _alive(p)]
        if mine:
            time.sleep(0.05)
    return alive + [p for p in mine if _alive(p)]


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate_tree(pid: int, mark: str | None = None, grace: float = 3.0,
                   since: float | None = None) -> list[int]:
    """End a process tree: SIGTERM, wait up to `grace` seconds, then SIGKILL the rest.

    Returns the pids that were signalled. The claude CLI has been seen to take 1-3 s to
    honour SIGTERM while a model request hangs, hence the grace period before SIGKILL.
    """
    import psutil

    signalled: set[int] = set()
    if pid <= 1:  # killpg(0) would be our own group; a fake Popen (tests) has pid 0
        raise ValueError(f"refusing to end the tree of pid {pid}")
    procs = tree(pid, mark, since)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGTERM)  # the group we created with start_new_session
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
            signalled.add(proc.pid)
    alive = _wait_ended(procs, grace)
    # A second sweep catches processes forked while we were ending the first ones.
    for proc in alive + tree(pid, mark, since):
        with contextlib.suppress(psutil.Error):
            proc.kill()
            signalled.add(proc.pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while (mark or since is not None) and time.monotonic() < deadline:
        # One /proc scan a round: it reads every process's environment.
        left = (marked(mark) if mark else []) + (adopted(since, mark) if since is not None
                                                 else [])
        if not left:
            break
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                signalled.add(proc.pid)
        time.sleep(0.05)
    reap_adopted()
    return sorted(signalled)


# -- Linux process controls ----------------------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_subreaper = False
_owned: set[int] = set()  # pids of children started by `start` and not yet reaped
_owned_marks: dict[int, str] = {}  # their marks: an orphan carrying one is that child's
_owned_lock = threading.Lock()
# Adopted orphans a child left running on purpose (a watcher a setup hook started), said
# in its `left_running`: never counted among a later child's leftovers, whatever their
# create times say (psutil's clock ticks at 10 ms: a watcher and the next hook can share a
# tick). Forgotten when reaped, so a reused pid is not skipped.
_left_alone: set[int] = set()


def _find_libc() -> str | None:
    import ctypes.util

    return ctypes.util.find_library("c")


def _libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    # libc.so.6 first: ctypes.util.find_library runs ldconfig or a compiler, which is slow.
    for find in (lambda: "libc.so.6", _find_libc):
        try:
            name = find()
            if name:
                return ctypes.CDLL(name, use_errno=True).prctl
        except (OSError, AttributeError):
            continue
    return None


_prctl = _libc_prctl()


def has_parent_death_signal() -> bool:
    """Whether children can get a parent-death signal here (Linux)."""
    return _prctl is not None


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux 3.4+): orphans among our descendants are
    re-parented to us, not to init, so `tree` finds them whatever they did to hide. Answers
    whether it worked; where it does not, the mark is the only net for such orphans.
    Idempotent. Adopted orphans that die are reaped by `reap_adopted`."""
    global _subreaper
    if _prctl is None:
        return False
    if not _subreaper:
        _subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return _subreaper


def is_subreaper() -> bool:
    return _subreaper


def adopted(since: float, mark: str | None = None) -> list[Any]:
    """Orphans we adopted as a subreaper, born at or after `since` (a psutil create_time).

    Ours to end: a direct child we did not start through `start`, in another session than
    ours (a plain `subprocess.run` elsewhere in this process shares our session, so it is
    never taken for one), and not carrying the mark of another child we still own (not
    `mark`): with several agents in one process (`pmtool run --agents N`), one agent's
    orphans are not another's leftovers. Empty unless `become_subreaper()` was called.
    """
    import psutil

    if not _subreaper:
        return []
    mysid = os.getsid(0)
    found = []
    with _owned_lock, contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children():
            with contextlib.suppress(psutil.Error, OSError):
                if (proc.pid not in _owned and proc.pid not in _left_alone
                        and os.getsid(proc.pid) != mysid
                        and proc.create_time() >= since
                        and proc.status() != psutil.STATUS_ZOMBIE
                        and not _marked_by_another(proc.pid, mark)):
                    found.append(proc)
    return found


def _marked_by_another(pid: int, mark: str | None) -> bool:
    """Whether the process carries the mark of a child we own other than `mark`'s."""
    others = {m for m in _owned_marks.values() if m != mark}
    if not others:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return False
    return any(f"{MARK_ENV}={m}".encode() in env for m in others)


def reap_adopted() -> list[int]:
    """Collect the exit status of adopted orphans that have died, so they do not stay
    zombies in the process table. Never touches children started by `start` or by a
    `subprocess` call in our own session (their owners wait for them)."""
    import psutil

    if not _subreaper:
        return []
    mysid = os.getsid(0)
    reaped = []
    with _owned_lock, contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children():
            with contextlib.suppress(psutil.Error, OSError):
                if (proc.pid in _owned or proc.status() != psutil.STATUS_ZOMBIE
                        or os.getsid(proc.pid) == mysid):
                    continue
                if os.waitpid(proc.pid, os.WNOHANG)[0] == proc.pid:
                    reaped.append(proc.pid)
                    _left_alone.discard(proc.pid)
    return reaped


# -- start and own -------------------------------------------------------------------------

TIMEOUT_EXIT = 124  # as timeout(1)


def exit_status(returncode: int | None) -> tuple[int | None, str | None]:
    """Popen's returncode as a shell reports it: (128+N, "SIGNAME") for a signal N."""
    if returncode is None or returncode >= 0:
        return returncode, None
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"SIG{number}"
    return 128 + number, name


@dataclass(frozen=True)
class Ending:
    """How a child ended. `exit_code` is 124 when a time limit ended it, 128+N when signal
    N did (`signal` names it), else the child's own exit code."""

    exit_code: int | None
    signal: str | None = None
    timed_out_by: str | None = None  # "timeout" or "idle_timeout"
    stopped: bool = False
    swept: tuple[int, ...] = ()  # every pid we signalled
    duration_s: float = 0.0

    @property
    def timed_out(self) -> bool:
        return self.timed_out_by is not None


class Child:
    """A child started by `start`: ours until `wait` returned. As a context manager it ends
    the whole tree when the block raises (the child runs in its own session: a Ctrl-C at
    the terminal does not reach it, nothing but us would end it)."""

    def __init__(self, popen: subprocess.Popen, mark: str, since: float) -> None:
        self.popen, self.mark, self.since = popen, mark, since
        self.pid = popen.pid
        self.inner_pid = popen.pid  # the child itself, below its keeper if it has one
        self.started = time.monotonic()
        self.swept: set[int] = set()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and self.popen.returncode is None:
            self.end(grace=3.0)
            with contextlib.suppress(Exception):
                self.popen.wait(timeout=5)
        self._release()

    def end(self, grace: float = 3.0) -> list[int]:
        """End the whole tree now (SIGTERM, `grace`, SIGKILL)."""
        signalled = terminate_tree(self.pid, self.mark, grace=grace, since=self.since)
        self.swept.update(signalled)
        return signalled

    def leftovers(self, *, leave_running: bool = False) -> list[Any]:
        """Processes of this child still running after it exited (marked or adopted).

        With `leave_running` the caller lets them be (a hook's watcher): they are then
        never taken for a later child's leftovers."""
        left = {p.pid: p for p in marked(self.mark)}
        adopted_now = adopted(self.since, self.mark)
        left.update((p.pid, p) for p in adopted_now)
        left.pop(self.pid, None)
        if leave_running:
            with _owned_lock:
                _left_alone.update(p.pid for p in adopted_now if p.pid != self.pid)
        return list(left.values())

    def wait(self, timeout: float | None = None, *, deadline: float | None = None,
             idle_timeout: float | None = None,
             last_activity: Callable[[], float] | None = None,
             stop: threading.Event | None = None, grace: float = 3.0,
             poll: float = 0.1) -> Ending:
        """Wait for the child; end its whole tree when `timeout` seconds (or the monotonic
        `deadline`) pass, when `last_activity()` is older than `idle_timeout`, or when `stop`
        is set. Leftovers after a normal exit are not ended here (see `leftovers`)."""
        if timeout is not None and timeout > 0:
            limit = self.started + timeout
            deadline = limit if deadline is None else min(deadline, limit)
        timed_out_by, stopped = None, False
        while True:
            try:
                self.popen.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if stop is not None and stop.is_set():
                stopped = True
            elif deadline is not None and now >= deadline:
                timed_out_by = "timeout"
            elif idle_timeout and idle_timeout > 0 and last_activity is not None \
                    and now - last_activity() >= idle_timeout:
                timed_out_by = "idle_timeout"
            else:
                continue
            self.end(grace=grace)
            self.popen.wait()
            break
        code, name = exit_status(self.popen.returncode)
        if timed_out_by is not None:
            code = TIMEOUT_EXIT
        return Ending(exit_code=code, signal=name, timed_out_by=timed_out_by, stopped=stopped,
                      swept=tuple(sorted(self.swept)),
                      duration_s=round(time.monotonic() - self.started, 3))

    def _release(self) -> None:
        with _owned_lock:
            _owned.discard(self.pid)
            _owned_marks.pop(self.pid, None)
        reap_adopted()


def start(cmd: Sequence[str], *, label: str = "run", stdin: bytes | str | None = None,
          stdout: int | IO[Any] | None = subprocess.DEVNULL,
          stderr: int | IO[Any] | None = subprocess.DEVNULL, cwd: str | Path | None = None,
          env: Mapping[str, str] | None = None, mark: str | None = None,
          parent_death: int | None = signal.SIGKILL, grace: float = 3.0,
          keeper: bool | None = None) -> Child:
    """Start `cmd` as a child we own: its own session, `MARK_ENV` in its environment (from
    `env`, default os.environ), `stdin` fed from a file (a child that never reads it cannot
    block us; a pipe could), and `parent_death` sent to its tree if we die (Linux, through
    the keeper; None: none).

    With a parent-death signal on Linux the child runs under a keeper (`pmtool.keeper`,
    `keeper=False` to do without): if we die, the keeper sends `parent_death` to the
    child's whole tree, waits `grace` seconds, and SIGKILLs what is left. `Child.pid` is
    then the keeper's, which exits exactly as the child does.

    Raises OSError when it cannot be started (ENOENT, EACCES, ENOEXEC...). Use it as a
    context manager around `wait`, so any exception ends the tree.
    """
    import psutil

    mark = mark or new_mark(label)
    child_env = dict(os.environ if env is None else env)
    child_env[MARK_ENV] = mark
    if keeper is None:
        keeper = parent_death is not None and has_keeper()
    with tempfile.TemporaryFile() as feed:
        if stdin is not None:
            feed.write(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)
            feed.seek(0)
        kept = None
        if keeper and parent_death is not None:
            kept = _start_kept(list(cmd), int(parent_death), grace, stdin=feed,
                               stdout=stdout, stderr=stderr, cwd=cwd, env=child_env)
        if kept is not None:
            popen, inner = kept
        else:
            with _owned_lock:  # so a concurrent reap_adopted never takes it for an orphan
                popen = subprocess.Popen(list(cmd), stdin=feed, stdout=stdout,
                                         stderr=stderr,
                                         cwd=None if cwd is None else str(cwd),
                                         env=child_env, start_new_session=True)
                _owned.add(popen.pid)
            inner = popen.pid
        with _owned_lock:
            _owned_marks[popen.pid] = mark
    # Orphans adopted later count as this child's when born after it. psutil's clock, not
    # time.time(): its create times rest on a boot time rounded to the second.
    try:
        since = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        since = time.time() - 1.0
    child = Child(popen, mark, since)
    child.inner_pid = inner
    return child


KEEPER = Path(__file__).with_name("keeper.py")
keeper_trouble: str | None = None  # why the keeper is not used, once it failed to run


def has_keeper() -> bool:
    """Whether children run under a keeper here: Linux, with this Python, and not turned
    off by PMTOOL_KEEPER=0 (tests of the other nets; a platform where it misbehaves)."""
    return (_prctl is not None and bool(sys.executable) and KEEPER.is_file()
            and keeper_trouble is None and os.environ.get("PMTOOL_KEEPER", "1") != "0")


def _start_kept(cmd: list[str], parent_death: int, grace: float, *, stdin: Any,
                stdout: Any, stderr: Any, cwd: str | Path | None,
                env: dict[str, str]) -> tuple[subprocess.Popen, int] | None:
    """Start `cmd` under a keeper; answers (the keeper's Popen, the child's pid), or None
    when the keeper itself could not run (then `keeper_trouble` says why)."""
    # Python's start-up rewrites a C locale's LC_CTYPE in its own environment; the keeper
    # puts the child's back.
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-I", "-S", str(KEEPER), str(os.getpid()), str(parent_death),
            f"{max(grace, 0.0):g}", str(write_end), env.get("LC_CTYPE", "-"), "--", *cmd]
    try:
        with _owned_lock:
            popen = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                     cwd=None if cwd is None else str(cwd), env=env,
                                     start_new_session=True, pass_fds=(write_end,))
            _owned.add(popen.pid)
        os.close(write_end)
        write_end = -1
        report = b""
        while chunk := os.read(read_end, 64):  # EOF once the child runs (or cannot)
            report += chunk
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    word, _, value = report.decode("ascii", "replace").strip().partition(" ")
    if word == "ok" and value.isdigit():
        return popen, int(value)
    popen.wait()
    with _owned_lock:
        _owned.discard(popen.pid)
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()
    if word == "err" and value.isdigit() and int(value):
        number = int(value)
        raise OSError(number, os.strerror(number), cmd[0])
    # The keeper itself is broken here (no usable Python, an old libc): children start
    # without it from now on, as where there is none, rather than not at all.
    global keeper_trouble
    keeper_trouble = f"the keeper did not start (exit {popen.returncode}); children run " \
        "without it"
    return None


def run(cmd: Sequence[str], *, timeout: float, cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None, label: str = "run",
        stdin: bytes | str | None = None) -> tuple[Ending, str, str]:
    """Run a short command to the end or to `timeout`; answer (ending, stdout, stderr).

    Output goes to files, not pipes: a grandchild holding a pipe open (a hung `claude
    --version` that spawned a helper) cannot make us wait past the time limit.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with start(cmd, label=label, stdin=stdin, stdout=out, stderr=err, cwd=cwd,
                   env=env) as child:
            ending = child.wait(timeout)
        out.seek(0)
        err.seek(0)
        return (ending, out.read().decode("utf-8", errors="replace"),
                err.read().decode("utf-8", errors="replace"))

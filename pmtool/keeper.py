"""The keeper: a small process between pmtool and each child it starts (Linux), so that
a `kill -9` of pmtool ends the child's whole tree, not just the child.

pmtool.procs runs this file as a script (`python -I -S keeper.py ...`: no site, no
package import, only the standard library, so it starts in a few milliseconds). The
keeper asks for its own parent-death signal (SIGTERM) and becomes a subreaper first
thing, then checks that pmtool still lives: nothing runs between fork and exec in
pmtool (no `preexec_fn`, which can deadlock a program that forks from several threads,
as `pmtool run --agents N` does). The parent-death signal still follows the thread that
started the keeper. The keeper starts the real child in its own session with
stdin/stdout/stderr inherited as they are (no copying), then waits:

- the child exits: the keeper exits the same way (the same code, or the same signal
  raised on itself), so the caller sees exactly what it would have seen without it.
  Whatever the child left running is re-parented upwards, as without a keeper;
- SIGTERM/SIGINT/SIGHUP while pmtool lives (pmtool.procs ending the tree, which it also
  signals itself): passed on to the child's process group, then as above;
- the same signal after pmtool died (the parent-death signal; pmtool is no longer our
  parent): the keeper ends everything below it -- as a subreaper that includes every
  descendant that double-forked or called setsid, whatever its environment -- with the
  requested first signal, waits the grace (claude saves its session on SIGTERM), SIGKILLs
  the rest, and exits once nothing is left.

A thread that waits for the child does not survive a `kill -9` of pmtool; a process does.

argv: parent-pid first-signal grace report-fd lc-ctype -- cmd...
`report-fd` gets "ok PID" once the child runs, or "err ERRNO" when it cannot be started
(then the keeper exits 127). `lc-ctype` is the child's LC_CTYPE ("-" for none): Python's
start-up coerces a C locale by setting LC_CTYPE, which must not reach the child.
"""

import _signal as signal  # type: ignore[import-not-found]  # not `signal`: it imports enum, a third of our start-up
import os
import sys
import time

STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCHED = {signal.SIGCHLD, *STOPS}
KILL_WAIT = 5.0  # after SIGKILL: only a process stuck in the kernel takes longer


def descendants(root: int) -> list[int]:
    """Every process below `root`, by parent pid, from /proc (no psutil: start-up time)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields and fields[0] != b"Z":  # a zombie is dead already
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def signal_all(sig: int, pids: list[int]) -> None:
    for pid in pids:
        try:  # noqa: SIM105 -- contextlib would cost start-up time
            os.kill(pid, sig)
        except OSError:
            pass


def reap(child: int, status: list[int]) -> None:
    """Collect every dead child (adopted orphans too); note the real child's status."""
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child:
            status.append(code)


def exit_like(status: list[int]) -> None:
    """Exit as the child did: its exit code, or its signal raised on ourselves."""
    code = status[0] if status else 0
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        try:
            import resource  # no core file of ours for a child that dumped core

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, OSError, ValueError):
            pass
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(code) if status else 0)


def end_tree(child: int, first: int, grace: float, status: list[int]) -> None:
    """Our parent is gone: end everything below us (first signal, grace, SIGKILL)."""
    me = os.getpid()
    signalled: set[int] = set()
    signalled_group: set[int] = set()
    deadline = time.monotonic() + grace
    kill_deadline = deadline + KILL_WAIT
    sig = first
    empty = 0
    while True:
        pids = descendants(me)
        now = time.monotonic()
        # Done only when two scans a round apart find nothing: an orphan re-parented to us
        # while we looked, or forked by a dying process, shows up in the second.
        empty = empty + 1 if not pids else 0
        if empty >= 2 or now >= kill_deadline:
            return
        if not pids:
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)
            reap(child, status)
            continue
        if sig != signal.SIGKILL and now >= deadline:
            sig, signalled = signal.SIGKILL, set()
        if sig not in signalled_group and not status:
            signal_all(sig, [-child])  # the child's own process group, once a signal
            signalled_group.add(sig)
        fresh = [p for p in pids if p not in signalled]  # children forked meanwhile too
        signal_all(sig, fresh)
        if sig != signal.SIGKILL:
            signal_all(signal.SIGCONT, fresh)  # a stopped process acts on SIGTERM only then
        signalled.update(fresh)
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        reap(child, status)


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def watch_parent(parent: int) -> None:
    """SIGTERM when pmtool (the thread that started us) dies, and every orphan below us
    ours; exit at once, nothing started, if pmtool died before that took effect."""
    import ctypes  # ~5 ms; only here, where it cannot be done without

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # another libc: pmtool goes on without a keeper
        os._exit(127)
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(127)


def main(argv: list[str]) -> None:
    parent, first, grace = int(argv[1]), int(argv[2]), float(argv[3])
    report, lc_ctype, cmd = int(argv[4]), argv[5], argv[7:]
    watch_parent(parent)
    os.set_inheritable(report, False)  # the child must not hold the report open
    os.environ.pop("LC_CTYPE", None)
    if lc_ctype != "-":
        os.environ["LC_CTYPE"] = lc_ctype
    # Signals are taken synchronously (sigwaitinfo): no handler can interrupt a half-done
    # step, and one that arrives before the child runs waits for us.
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        child = os.posix_spawnp(cmd[0], cmd, os.environ, setsid=True, setsigmask=(),
                                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except OSError as exc:
        os.write(report, f"err {exc.errno or 0}\n".encode())
        os._exit(127)
    except NotImplementedError:  # no POSIX_SPAWN_SETSID in this libc: pmtool goes without us
        os._exit(127)
    try:
        os.write(report, f"ok {child}\n".encode())
        os.close(report)
    except OSError:
        pass
    status: list[int] = []
    orphaned = os.getppid() != parent  # pmtool died before we could hear of it
    while not orphaned:
        info = signal.sigwaitinfo(WATCHED)
        reap(child, status)
        if os.getppid() != parent:  # even if the child just exited: its tree is ours
            orphaned = True
        elif status:
            exit_like(status)
        elif info.si_signo in STOPS:
            signal_all(info.si_signo, [-child, child])
    end_tree(child, first, grace, status)
    exit_like(status)


if __name__ == "__main__":
    main(sys.argv)

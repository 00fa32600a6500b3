"""Starting child processes so that they can be ended whole, and ending them whole.

A child is started in its own session, with a mark in its environment. Ending it sweeps
its descendants, its process group, and every process carrying the mark: processes that
the agent's Bash tool started in a new session or group escape `killpg`, but they inherit
the environment, so the mark still finds them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from typing import Any

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


def tree(pid: int, mark: str | None = None) -> list[Any]:
    """The process, its descendants, its group, and the marked processes."""
    import psutil

    procs: dict[int, Any] = {}
    try:
        root = psutil.Process(pid)
        procs[pid] = root
        for child in root.children(recursive=True):
            procs[child.pid] = child
    except psutil.Error:
        pass
    if mark:
        for proc in marked(mark):
            procs[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    procs[child.pid] = child
    procs.pop(os.getpid(), None)
    return list(procs.values())


def terminate_tree(pid: int, mark: str | None = None, grace: float = 3.0) -> list[int]:
    """End a process tree: SIGTERM, wait up to `grace` seconds, then SIGKILL the rest.

    Returns the pids that were signalled. The claude CLI has been seen to take 1-3 s to
    honour SIGTERM while a model request hangs, hence the grace period before SIGKILL.
    """
    import psutil

    signalled: set[int] = set()
    procs = tree(pid, mark)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGTERM)  # the group we created with start_new_session
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
            signalled.add(proc.pid)
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    # A second sweep catches processes forked while we were ending the first ones.
    for proc in alive + tree(pid, mark):
        with contextlib.suppress(psutil.Error):
            proc.kill()
            signalled.add(proc.pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while mark and time.monotonic() < deadline:
        left = marked(mark)  # one /proc scan a round: it reads every process's environment
        if not left:
            break
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        time.sleep(0.05)
    return sorted(signalled)

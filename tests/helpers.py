"""Running the installed `pmtool` console script the way a user's shell does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pmtool.testing.claude_env import find_test_claude

PMTOOL = str(Path(sys.executable).with_name("pmtool"))

# The real claude CLI for the end-to-end tests (tests/run.sh installs it), or None.
CLAUDE = find_test_claude()
needs_claude = pytest.mark.skipif(
    CLAUDE is None,
    reason="real claude CLI not installed: run `npm ci --prefix tests --no-audit --no-fund` "
    "(or set PMTOOL_TEST_CLAUDE_BIN)",
)


@dataclass
class Result:
    code: int
    out: dict[str, Any]
    stdout: str
    stderr: str


def ago(days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0,
        zone: str = "Z") -> str:
    """A timestamp that long before now, as pmtool writes them (`zone=""`: as the server
    does, naive UTC). Tests date what they write relative to now, never on a calendar day:
    retention windows and "since" filters would otherwise age a test into failing."""
    from datetime import UTC, datetime, timedelta

    when = datetime.now(UTC) - timedelta(days=days, hours=hours, minutes=minutes,
                                         seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + zone


def free_port() -> int:
    """A loopback port nobody listens on (for 'server unreachable' cases)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pmtool(*args: str, env: dict[str, str] | None = None, input: str | None = None,
           cwd: str | Path | None = None, timeout: float = 120) -> Result:
    """Run `pmtool ARGS` in a subprocess; stdout must be exactly one JSON object."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([PMTOOL, *args], capture_output=True, text=True, env=full_env,
                          input=input, cwd=cwd, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {proc.stdout!r} / {proc.stderr!r}"
    out = json.loads(lines[0])
    assert out["ok"] is (proc.returncode == 0), (proc.returncode, out)
    return Result(proc.returncode, out, proc.stdout, proc.stderr)


# -- a guest on the server under test -----------------------------------------------------

FINAL = ("committed",)
# What a guest must not change in a task it did not create.
WATCHED = ("status", "locked_by", "notes", "title", "description", "target_role",
           "difficulty", "complexity", "branch", "feature_id")


def task_snapshot(client: Any) -> dict[tuple[int, str | None], dict[str, Any]]:
    """Every task on the server, keyed by (id, created_at): ids alone are reused (quirk 9)."""
    return {(t["id"], t.get("created_at")): {k: t.get(k) for k in WATCHED}
            for t in client.list_tasks()}


def guest_changes(before: dict[tuple[int, str | None], dict[str, Any]],
                  after: dict[tuple[int, str | None], dict[str, Any]]) -> list[str]:
    """What happened to the tasks of `before` (tasks we did not create), one line each."""
    out = []
    for key, old in before.items():
        new = after.get(key)
        if new is None:
            out.append(f"task {key[0]} (created {key[1]}) is gone")
            continue
        changed = {k: (old[k], new[k]) for k in WATCHED if old[k] != new[k]}
        if changed and not _server_expired_lock(changed):
            out.append(f"task {key[0]} changed: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return out


def _server_expired_lock(changed: dict[str, tuple[Any, Any]]) -> bool:
    """The server's doing, not ours: Headless PM drops the lock of an agent not seen for
    30 minutes (locked_by goes to None, the status stays), whoever's task it is."""
    return set(changed) == {"locked_by"} and changed["locked_by"][1] is None


def wait_for(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll `check` until it answers something true (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_pty(fd: int, until: Callable[[bytes], bool], timeout: float = 20) -> bytes:
    """What a terminal (pty leader `fd`) shows until `until(screen)`, it closes, or
    `timeout` seconds pass; the caller asserts on what came."""
    import select

    screen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(screen):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                screen += os.read(fd, 65536)
            except OSError:
                break
    return screen


def park(seeder: Any) -> None:
    """Retire (commit) every task of ours an agent could pick, so a test sees only its own.

    The server is shared by the whole session (and may be a real one), and claims take
    the oldest task: without this, another test's leftovers would be claimed first. A
    guest touches nothing it did not create: when the server holds pickable tasks of
    someone else, the test is skipped instead (seeder.on_foreign).
    """
    for role in ("backend_dev", "frontend_dev", "architect", "pm", "qa"):
        seeder.drain(role)


# -- real filesystems that fail ------------------------------------------------------------


class SmallFs:
    """Small tmpfs filesystems a test mounts (root only), fills, or turns read-only: the
    real ENOSPC and EROFS, not a simulation. `unmount_all` runs in the fixture's teardown."""

    def __init__(self, base: Path) -> None:
        self.base, self.mounted = base, []

    def mount(self, name: str, size_kb: int = 2048) -> Path:
        folder = self.base / name
        folder.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700",
                               "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): "
                        "the fault points cover this case")
        self.mounted.append(folder)
        return folder

    def fill(self, folder: Path) -> Path:
        """Write until the filesystem says ENOSPC; the filler file, for `free` to remove."""
        import errno

        filler = folder / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)  # unbuffered: nothing left over
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        return filler

    def read_only(self, folder: Path, on: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(folder)],
                       check=True)

    def unmount_all(self) -> None:
        for folder in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(folder)], check=False)
        self.mounted.clear()

"""Running the installed `pmtool` console script the way a user's shell does."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pmtool.records import RecordStore
from pmtool.state import StateDir
from pmtool.testing import fake_agent
from pmtool.testing.claude_env import claude_env, find_test_claude
from pmtool.testing.seed import Seeder

PMTOOL = str(Path(sys.executable).with_name("pmtool"))
# The repository (README, hooks/, scripts/, benchmarks/), wherever a test file sits below.
ROOT = Path(__file__).resolve().parent.parent

# The real claude CLI for the end-to-end tests (tests/run.sh installs it), or None.
CLAUDE = find_test_claude()
NEEDS_CLAUDE = ("real claude CLI not installed: run `npm ci --prefix tests --no-audit "
                "--no-fund` (or set PMTOOL_TEST_CLAUDE_BIN)")
# A test with this mark runs the real claude: conftest marks it e2e too.
needs_claude = pytest.mark.skipif(CLAUDE is None, reason=NEEDS_CLAUDE)


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


def plain_world(tmp_path: Path, make_standin: Callable[..., Any]) -> dict[str, Any]:
    """make_world's stand-in, repo, hooks and state folder as a dict (`tmp`, `repo`, `env`,
    `seeder`), with the default retry cooldown: what the operator-view tests run in."""
    world = make_world(tmp_path, make_standin)
    env = {k: v for k, v in world.env.items() if k != "PMTOOL_RETRY_COOLDOWN"}
    return {"tmp": world.tmp, "repo": world.repo, "env": env, "seeder": world.seeder}


def run_args(world: dict[str, Any], *extra: str) -> list[str]:
    """`pmtool run` for dev_1 (backend_dev) in a plain_world."""
    return [PMTOOL, "run", "--repo", str(world["repo"]), "--settle", "0.05", "--idle-poll",
            "0.5", "--role", "backend_dev", "--agent-id", "dev_1", *extra]


def new_task(world: dict[str, Any]) -> dict[str, Any]:
    """A major backend_dev task of senior difficulty on a branch of its own."""
    return world["seeder"].create_task(
        title="Add a ping endpoint", description="Do it well.", target_role="backend_dev",
        difficulty="senior", complexity="major", branch=f"feature/{secrets.token_hex(3)}")


def interrupt_at_terminal(proc: subprocess.Popen, leader: int, until: Callable[[bytes], bool],
                          timeout: float = 30) -> tuple[bytes, Any]:
    """What the terminal (pty `leader`) shows until `until(screen)`, then SIGINT to
    `proc`: the screen and its stdout. The process and the pty are closed however it ends."""
    import signal

    try:
        screen = read_pty(leader, until, timeout=timeout)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return screen, out


def documented_keys() -> dict[str, set[str]]:
    """The manual's table of what each command answers (docs/reference/output.md):
    `pmtool NAME` -> its keys besides `ok`."""
    import re

    page = (ROOT / "docs" / "reference" / "output.md").read_text()
    table = page.split("## What each command answers", 1)[1]
    return {m.group(1): set(re.findall(r"`([a-z_]+)`", m.group(2)))
            for m in re.finditer(r"^\| `pmtool ([^`]+)` \| (.+) \|$", table, re.M)}

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
# -- a world for `pmtool run`: a stand-in, a git repo, hooks, a state folder ------------


@dataclass
class World:
    tmp: Path
    repo: Path
    state: Path
    hooks: Path
    env: dict[str, str]
    seeder: Seeder
    server: Any

    @property
    def store(self) -> RecordStore:
        return RecordStore(self.state)

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.repo), *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    def task(self, title: str = "Add a ping endpoint", **kw: Any) -> dict[str, Any]:
        spec = {"target_role": "backend_dev", "difficulty": "senior", "complexity": "major",
                "branch": f"feature/{secrets.token_hex(3)}", **kw}
        return self.seeder.create_task(title=title, description="Do it well.", **spec)

    def status(self, task_id: int) -> dict[str, Any]:
        task = self.seeder.get_task(task_id)
        assert task is not None
        return task

    def outlast_the_stale_rule(self, task_id: int, agent_id: str, beat: float) -> None:
        """40 minutes pass on the server's clock while `agent_id` works, in two steps with
        `beat` seconds between for its heartbeat to re-register; then another agent asks
        for work (the server's stale-lock cleanup runs), and the lock must still be its."""
        time.sleep(beat)  # a heartbeat has re-registered
        self.server.advance_clock(20 * 60)
        time.sleep(beat)
        self.server.advance_clock(20 * 60)  # 40 minutes since the claim, < 30 since a beat
        self.seeder.register("other", "backend_dev", "senior")
        assert self.seeder.next_task("backend_dev", "senior") is None  # the stale cleanup
        assert self.status(task_id)["locked_by"] == agent_id

    def real_claude_env(self, model: Any, **extra: str) -> dict[str, str]:
        """The world's environment with the real claude talking to the scripted `model`."""
        return {**self.env, **claude_env(model.url, self.tmp / "home", max_retries=0),
                "PMTOOL_CLAUDE_BIN": str(CLAUDE), **extra}

    def server_error_seen(self, agent_id: str = "dev_1", timeout: float = 90) -> None:
        """Wait until the runner has logged a server error event: a loaded machine makes
        this slower, where a fixed sleep would make the test red."""
        wait_for(lambda: any(e.get("event") == "error"
                             and (e.get("error") or {}).get("type") == "server"
                             for e in StateDir(self.state).events(agent_id=agent_id)),
                 timeout=timeout, what="the runner to meet the server's trouble")

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 90) -> Run:
        proc = subprocess.run([PMTOOL, "run", *self.args(*args)], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, cwd=self.repo,
                              timeout=timeout, check=False)
        return Run(proc.returncode, events(proc.stdout), proc.stderr)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([PMTOOL, "run", *self.args(*args)], text=True,
                                env={**self.env, **(env or {})}, cwd=self.repo,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def args(self, *args: str) -> list[str]:
        defaults = ["--settle", "0.05"] + ([] if "--idle-poll" in args else
                                           ["--idle-poll", "0.5"])
        if "--repo" not in args:
            defaults += ["--repo", str(self.repo)]
        if "--role" not in args:
            defaults += ["--role", "backend_dev"]
        if "--agent-id" not in args:
            defaults += ["--agent-id", "dev_1"]
        if "--agent-cmd" not in args and "--real-claude" not in args:
            defaults += ["--agent-cmd", fake_agent.command()]
        return [a for a in args if a != "--real-claude"] + defaults


@dataclass
class Run:
    code: int
    events: list[dict[str, Any]]
    stderr: str

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def events(stdout: str) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for event in out:  # the event contract: every line has these
        assert {"ok", "event", "time", "agent", "task_id"} <= set(event), event
    return out


def make_world(tmp_path: Path, make_standin: Callable[..., Any]) -> World:
    """A private stand-in, a git repo, a hooks folder and the environment to run in."""
    key = f"k-{secrets.token_hex(8)}"
    server = make_standin(api_key=key, production=True, poll_check_interval=0.2)
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "start"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = {**os.environ, "HEADLESS_PM_API_URL": server.url, "HEADLESS_PM_API_KEY": key,
           "PMTOOL_STATE_DIR": str(tmp_path / "state"),
           "PMTOOL_CONFIG": os.devnull, "HEADLESS_PM_HOOKS_DIR": str(hooks),
           # A given-back task may be taken again at once (tests of the cooldown set it).
           "PMTOOL_RETRY_COOLDOWN": "0"}
    env.pop("PMTOOL_RUNNER_PID", None)
    seeder = Seeder(server.url, key)
    return World(tmp_path, repo, tmp_path / "state", hooks, env, seeder, server)


def dev_done_count(world: World, task_id: int) -> int:
    return sum(1 for c in world.seeder.changelog(500)
               if c["task_id"] == task_id and c["new_status"] == "dev_done")



def kill_the_runner_mid_agent(world: World, env: dict[str, str], model: Any,
                              requests: int, timeout: float = 30) -> None:
    """`pmtool run --real-claude`, killed (SIGKILL) once the scripted model has had
    `requests` main requests (its script hangs there): a runner dying mid-agent."""
    proc = subprocess.Popen([PMTOOL, "run", *world.args("--real-claude")], env=env,
                            cwd=world.repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(model.main_requests()) >= requests, timeout=timeout,
                 what="the hang")
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()

# -- processes and small HTTP servers shared by several test files -------------------------


def wait_stopped(pids: list[int], timeout: float = 30) -> None:
    """Wait until every process has SIGSTOPped itself (state T in /proc)."""
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "T":
                    pending.discard(pid)
        time.sleep(0.02)
    assert not pending, f"processes never paused: {pending}"


class Answers(BaseHTTPRequestHandler):
    """Answers every call with JSON naming what it got; `closing` closes the connection
    after each answer without saying so (as a server whose keep-alive ran out does)."""

    protocol_version = "HTTP/1.1"
    closing = False
    seen: ClassVar[list[tuple[str, str, Any, str | None]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).seen.append((self.command, self.path, body, self.headers.get("X-API-Key")))
        out = json.dumps({"method": self.command, "path": self.path, "body": body}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        if type(self).closing:
            self.close_connection = True

    do_GET = do_POST = do_PUT = _answer


def serve(handler: type[BaseHTTPRequestHandler], wrap: Any = None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if wrap:
        server.socket = wrap(server.socket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

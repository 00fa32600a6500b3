"""Running the installed `pmtool` console script the way a user's shell does."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pmtool.records import RecordStore
from pmtool.testing import fake_agent
from pmtool.testing.claude_env import find_test_claude
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
        if changed:
            out.append(f"task {key[0]} changed: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return out


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
        defaults = ["--settle", "0.05", "--idle-poll", "0.5"]
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
           "PMTOOL_CONFIG": str(tmp_path / "none.toml"), "HEADLESS_PM_HOOKS_DIR": str(hooks),
           # A given-back task may be taken again at once (tests of the cooldown set it).
           "PMTOOL_RETRY_COOLDOWN": "0"}
    env.pop("PMTOOL_RUNNER_PID", None)
    seeder = Seeder(server.url, key)
    return World(tmp_path, repo, tmp_path / "state", hooks, env, seeder, server)


def dev_done_count(world: World, task_id: int) -> int:
    return sum(1 for c in world.seeder.changelog(500)
               if c["task_id"] == task_id and c["new_status"] == "dev_done")

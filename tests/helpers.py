"""Running the installed `pmtool` console script the way a user's shell does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil
import pytest

from pmtool import preflight as pf
from pmtool.client import PMClient
from pmtool.config import Settings, load_settings
from pmtool.records import RecordStore, TaskRecord
from pmtool.state import StateDir
from pmtool.testing import fake_agent
from pmtool.testing.claude_env import claude_env, find_test_claude
from pmtool.testing.seed import Seeder

if TYPE_CHECKING:
    from conftest import PMServer

PMTOOL = str(Path(sys.executable).with_name("pmtool"))
# The repository (README, hooks/, scripts/, benchmarks/), wherever a test file sits below.
ROOT = Path(__file__).resolve().parent.parent

# The real claude CLI for the end-to-end tests (tests/run.sh installs it), or None.
CLAUDE = find_test_claude()
NEEDS_CLAUDE = ("real claude CLI not installed: run `npm ci --prefix tests --no-audit "
                "--no-fund` (or set PMTOOL_TEST_CLAUDE_BIN)")
# A test with this mark runs the real claude: it belongs in tests/e2e/ (marked e2e there).
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


def half_then_done(summary: str) -> list[Any]:
    """A scripted model's script for a run killed mid-work and resumed: half the work,
    a hang (the kill comes there), then commit and a verdict."""
    from pmtool.testing.model_server import Bash, Hang, Structured, Write

    return [Write("half.txt", "half\n"), Hang(),
            Bash("git add -A && git commit -q -m 'Finish after resume'"),
            Structured({"outcome": "done", "summary": summary})]


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


# -- a scene for `pmtool exec-claude`: a repo with a task worktree, a record, an environment


API_KEY = "pm-secret-key-for-tests-0123456789"


@dataclass
class Scene:
    tmp: Path
    repo: Path
    worktree: Path
    state: Path
    env: dict[str, str]
    task: dict[str, Any]

    @property
    def store(self) -> RecordStore:
        return RecordStore(self.state)

    def record(self, agent_id: str = "dev_001", role: str = "backend_dev",
               **fields: Any) -> TaskRecord:
        """The task record `claim` + `worktree create` would leave."""
        record = TaskRecord(agent_id=agent_id, role=role, level="senior",
                            server_url="http://127.0.0.1:9", task=dict(self.task),
                            previous_status="created", worktree=str(self.worktree),
                            branch=self.task["branch"], **fields)
        record.step("claimed")
        self.store.save(record)
        return record

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.repo, env=self.env, check=True,
                              capture_output=True, text=True).stdout


@dataclass
class SceneRun:
    code: int
    out: dict[str, Any]
    stderr: str


def scene_pmtool(scene: Scene, *args: str, env: dict[str, str] | None = None,
                 input: str | None = None, cwd: Path | None = None,
                 timeout: float = 45) -> SceneRun:
    """`pmtool ARGS` with exactly the scene's environment; stdout is one JSON object."""
    proc = subprocess.run([PMTOOL, *args], capture_output=True, text=True, input=input,
                          env={**scene.env, **(env or {})}, cwd=cwd or scene.repo,
                          timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line: {proc.stdout!r} / {proc.stderr!r}"
    out = json.loads(lines[0])
    assert out["ok"] is (proc.returncode == 0), (proc.returncode, out, proc.stderr)
    return SceneRun(proc.returncode, out, proc.stderr)


def make_scene(tmp: Path, model_url: str) -> Scene:
    home, state = tmp / "home", tmp / "state"
    env = claude_env(model_url, home, max_retries=0)
    env.update({
        "PMTOOL_CLAUDE_BIN": CLAUDE or "claude-not-installed",
        "PMTOOL_STATE_DIR": str(state),
        "PMTOOL_CONFIG": os.devnull,
        # The server's /api/v1/context is asked for instruction files; nothing listens here.
        "HEADLESS_PM_API_URL": "http://127.0.0.1:9",
        "HEADLESS_PM_API_KEY": API_KEY,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(tmp / "gitconfig"),
    })
    repo = tmp / "repo"
    repo.mkdir()
    task_id = 4000 + uuid.uuid4().int % 5000  # unique per test: process sweeps look for it
    task = {"id": task_id, "title": "Add a login page",
            "description": "A form with user and password that posts to /login.",
            "target_role": "backend_dev", "difficulty": "senior", "complexity": "major",
            "branch": "feature/login", "status": "under_work", "notes": "pm: keep it small"}
    scene = Scene(tmp, repo, tmp / "wt", state, env, task)
    scene.git("init", "-q", "-b", "main")
    (repo / "README.md").write_text("# app\n")
    scene.git("add", "-A")
    scene.git("commit", "-q", "-m", "initial")
    scene.git("worktree", "add", "-q", "-b", "feature/login", str(scene.worktree))
    return scene


def processes_of_task(task_id: int) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment says they work on `task_id`."""
    needle = f"PMTOOL_TASK_ID={task_id}\0".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                if needle in fh.read():
                    found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


# -- what a crash leaves (the crash tests) -------------------------------------------------


def _left_processes(world: World) -> list[psutil.Process]:
    """Processes working in the repo or its worktrees, or started by this test's pmtool."""
    inside = os.path.realpath(world.repo)
    left = []
    for proc in psutil.process_iter(["cwd", "environ"]):
        cwd, env = proc.info.get("cwd") or "", proc.info.get("environ") or {}
        if cwd == inside or cwd.startswith(inside + os.sep) \
                or env.get("PMTOOL_STATE_DIR") == str(world.state):
            left.append(proc)
    return left


def _no_worktree_left(world: World, task_id: int) -> None:
    listed = world.git("worktree", "list", "--porcelain")
    assert listed.count("worktree ") == 1, listed
    assert not (world.repo / ".worktrees" / f"task-{task_id}").exists()


def _closed(world: World, task_id: int) -> list[str]:
    return [h["outcome"] for h in StateDir(world.state).history(task_id=task_id,
                                                                 kind="closed")]


# -- the attempt ledger of a world ---------------------------------------------------------


def attempt_lines(world: World) -> list[dict[str, Any]]:
    return [h for h in world.store.state.history() if h.get("kind") in ("attempt", "parked")]


# -- watching where the secrets go ---------------------------------------------------------


def dumping_hooks(world: World) -> Path:
    dumps = world.tmp / "dumps"
    dumps.mkdir()
    for name in ("pre_task", "post_task", "worktree_setup"):
        hook = world.hooks / name
        hook.write_text(f'#!/bin/sh\nenv > "{dumps}/{name}.env"\ncat > "{dumps}/{name}.json"\n')
        hook.chmod(0o755)
    agent = world.tmp / "agent.sh"
    agent.write_text(f'#!/bin/sh\nenv > "{dumps}/agent.env"\nexec {fake_agent.command()}\n')
    agent.chmod(0o755)
    return dumps


def watch_argv(stop: threading.Event, seen: set[str]) -> None:
    while not stop.is_set():
        out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        seen.update(out.splitlines())
        time.sleep(0.02)


def run_watched(world: World, env: dict[str, str],
                agent: tuple[str, ...] = ()) -> tuple[Run, set[str]]:
    seen: set[str] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=watch_argv, args=(stop, seen))
    watcher.start()
    agent = agent or ("--agent-cmd", str(world.tmp / "agent.sh"))
    try:
        proc = subprocess.run(
            [PMTOOL, "run", *world.args("--single-task", *agent)],
            capture_output=True, text=True, env={**world.env, **env}, cwd=world.repo,
            timeout=90, check=False)
    finally:
        stop.set()
        watcher.join()
    return Run(proc.returncode, events(proc.stdout), proc.stderr), seen


def everything_written(world: World, run: Run, argv: set[str], dumps: Path) -> dict[str, str]:
    """Where pmtool's words and its children's environments went, by name."""
    places = {"stdout": json.dumps(run.events), "stderr": run.stderr,
              "argv": "\n".join(argv)}
    for path in [*world.state.rglob("*"), *dumps.rglob("*")]:
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("utf-8", "replace")
    places["server notes"] = "\n".join(t.get("notes") or "" for t in world.seeder.list_tasks())
    places["changelog"] = json.dumps(world.seeder.changelog(500))
    places["git"] = world.git("log", "--all", "-p", "--format=%H %B")
    return places


# -- several machines on one origin --------------------------------------------------------


@dataclass
class Machine:
    name: str
    repo: Path
    state: Path

    def args(self, role: str, agent: str, *extra: str) -> list[str]:
        return ["--repo", str(self.repo), "--role", role, "--agent-id", agent, *extra]

    def env(self, world: World, **extra: str) -> dict[str, str]:
        return {**world.env, "PMTOOL_STATE_DIR": str(self.state), **extra}

    def attempts(self, task_id: int) -> list[dict[str, Any]]:
        path = self.state / "history.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [h for h in lines if h.get("kind") == "attempt" and h.get("task_id") == task_id]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def unpushed_commit(repo: Path, branch: str, name: str, text: str, message: str) -> str:
    """A commit on a new `branch` of `repo` that was never pushed (a machine that once
    worked the branch); back on main after it. Its sha."""
    git(repo, "switch", "-q", "-c", branch)
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    sha = git(repo, "rev-parse", "HEAD")
    git(repo, "switch", "-q", "main")
    return sha


def run_on(world: World, machine: Machine, role: str, agent: str, *extra: str,
           env: dict[str, str] | None = None) -> Run:
    args = [*machine.args(role, agent, "--settle", "0.05", "--idle-poll", "0.5"), *extra]
    if "--real-claude" in args:
        args.remove("--real-claude")
    else:
        args += ["--agent-cmd", fake_agent.command()]
    proc = subprocess.run([PMTOOL, "run", *args], capture_output=True, text=True,
                          env={**machine.env(world), **(env or {})}, cwd=machine.repo,
                          timeout=120, check=False)
    return Run(proc.returncode, events(proc.stdout), proc.stderr)


# -- a plain HTTP GET (metrics) ------------------------------------------------------------


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type"), resp.read().decode()


# -- the docs run as a reader would (bash blocks, the tutorial) ----------------------------


TUTORIAL = ROOT / "docs" / "tutorial.md"


KEY = "your-server-key"  # the key the examples export


SKIP = re.compile(r"<!-- not run by the tests: .+ -->")


def bash_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, why it is skipped or None, code) of every ```bash block of a page."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, skip = i + 1, SKIP.search(lines[i - 1]) if i else None
            end = lines.index("```", start)
            blocks.append((start + 1, skip.group(0) if skip else None,
                           "\n".join(lines[start:end])))
            i = end
        i += 1
    return blocks


def run_block(reader: dict, code: str, extra: dict | None = None,
              **kwargs) -> subprocess.CompletedProcess:
    code = code.replace("http://localhost:6969", reader["url"])
    return subprocess.run(["bash", "-c", code], cwd=reader["home"], text=True,
                          capture_output=True, env={**reader["env"], **(extra or {})},
                          timeout=180, check=False, **kwargs)


def assert_nothing_left(reader: dict, repo: Path) -> None:
    worktrees = subprocess.run(["git", "-C", str(repo), "worktree", "list", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout
    assert worktrees.count("worktree ") == 1, worktrees
    records = reader["home"] / ".local/state/pmtool/records"
    assert not any(records.glob("*.json")) if records.is_dir() else True


def run_tutorial(reader: dict, env: dict | None = None) -> tuple[subprocess.CompletedProcess,
                                                                 dict]:
    """The tutorial's blocks in order, in one shell, as a reader types them; its task."""
    blocks = [(line, code) for line, skip, code in bash_blocks(TUTORIAL) if skip is None]
    assert len(blocks) >= 4
    script = "".join(f"{code}\nrc=$?; [ $rc = 0 ] || {{ echo 'block at line {line} exited '$rc >&2;"
                     f" exit 1; }}\n" for line, code in blocks)
    proc = run_block(reader, script, env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    tasks = reader["seeder"].client.list_tasks()
    assert [t["status"] for t in tasks] == ["dev_done"], tasks
    assert_nothing_left(reader, reader["home"] / "src" / "hello")
    return proc, tasks[0]


def main_log(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "log", "--format=%s", "main"],
                          capture_output=True, text=True, check=True).stdout


# -- preflight against the server under test -----------------------------------------------


def settings_for(server: PMServer, tmp_path: Path, **over: object) -> Settings:
    values = {"api_url": server.url, "api_key": server.api_key, "state_dir": str(tmp_path),
              "claude_bin": CLAUDE, **over}
    return load_settings({k: v for k, v in values.items() if v is not None},
                         config_path=tmp_path / "none.toml")


def checks(settings: Settings, repo: Path | None, **kw: object) -> dict[str, pf.Finding]:
    client = PMClient(settings.api_url, settings.api_key, retries=0)
    found = pf.preflight(settings, client, role=kw.pop("role", "backend_dev"),
                         level=kw.pop("level", "senior"), repo=repo, **kw)
    return {f.name: f for f in found}

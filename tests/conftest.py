"""Shared pytest fixtures. Sections are owned by different parts of the suite: extend, don't
rewrite, and keep each section's fixtures together under its heading.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import helpers
from helpers import KEY, PMTOOL, Machine, World, git
from pmtool.testing import seed as seed_mod
from pmtool.testing.model_server import ScriptedModelServer
from pmtool.testing.seed import Seeder
from pmtool.testing.server import StandInServer

# ---- environment -------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _git_identity() -> Iterator[None]:
    """Tests commit in scratch repos; they must not depend on the machine's git config."""
    with pytest.MonkeyPatch.context() as mp:
        for who in ("AUTHOR", "COMMITTER"):
            mp.setenv(f"GIT_{who}_NAME", "pmtool tests")
            mp.setenv(f"GIT_{who}_EMAIL", "pmtool-tests@example.invalid")
        yield


# ---- kinds of test ---------------------------------------------------------------------

E2E = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`e2e` (runs the real claude binary) is set by folder: every test under tests/e2e/,
    and only those (tests/unit/test_layering.py checks that no test elsewhere starts the
    real claude), so `-m "not e2e"` is claude-free."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)


# ---- Headless PM server ------------------------------------------------------------------


@dataclass
class PMServer:
    """The server under test: a real Headless PM (from the environment) or the stand-in."""

    url: str
    api_key: str
    is_standin: bool
    standin: StandInServer | None = None
    # The tasks that were on the server before the session: not ours to touch.
    foreign: dict[tuple[int, str | None], dict] = field(default_factory=dict)
    run_id: str = ""
    feature: dict | None = None  # the session's own feature, made on first need


RUN_ID = f"pmtool-tests-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def pm_server() -> Iterator[PMServer]:
    """PMTOOL_TEST_PM_URL + PMTOOL_TEST_PM_KEY select a real server; else a fresh stand-in.

    The suite is a guest: it lists the server's tasks first, and at the end puts its own
    tasks in a final state and fails if any task it did not create was changed. On the
    stand-in, tasks of "someone else" are seeded first, so the check means something there.
    """
    os.environ[seed_mod.RUN_ID_ENV] = RUN_ID
    url, key = os.environ.get("PMTOOL_TEST_PM_URL"), os.environ.get("PMTOOL_TEST_PM_KEY")
    if url and key:
        yield from _as_guest(PMServer(url.rstrip("/"), key, is_standin=False, run_id=RUN_ID))
        return
    # At the stand-in's defaults, which fail the way a real server does (a lock race
    # window, plain 500s and resets after them, the database pool); production mode:
    # only the random key works, as against a real deployment.
    with StandInServer(api_key=f"test-{secrets.token_hex(8)}", production=True) as server:
        _someone_elses_tasks(server)
        yield from _as_guest(PMServer(server.url, server.api_key, is_standin=True,
                                      standin=server, run_id=RUN_ID))


def _someone_elses_tasks(server: StandInServer) -> None:
    """Tasks of another team on the shared stand-in, in every state no test's agent is
    offered (a guest must leave them exactly as they are; `created`, `approved` and
    `dev_done` would make every test step aside, test_guest.py covers those). Two of them
    hold a stale lock: their agent was last seen 31 minutes ago, so the first pick of the
    session drops those locks, as a real server does with someone else's dead agents."""
    with Seeder(server.url, server.api_key, pm_agent_id="someone_else_pm") as other:
        other.register("someone_else_dev", "backend_dev", "principal")
        other.register("someone_else_gone", "backend_dev", "principal")
        for status, locker in (("pending", None), ("under_work", "someone_else_dev"),
                               ("under_work", "someone_else_gone"), ("qa_done", None),
                               ("documentation_done", "someone_else_gone"),
                               ("committed", None), ("evaluation", None)):
            task = other.create_task(title=f"not pmtool's: {status}", promote=False)
            if locker:
                other.lock(task["id"], locker)
            other.set_status(task["id"], status, agent_id=locker)
        server.age_agent("someone_else_gone", 31 * 60)
        seed_mod.MADE.clear()  # theirs, not the suite's


def _as_guest(server: PMServer) -> Iterator[PMServer]:
    with Seeder(server.url, server.api_key) as look:
        server.foreign = helpers.task_snapshot(look)
        yield server
        # Ours: every task a Seeder of this process made, into a final state.
        now = {(t["id"], t.get("created_at")): t for t in look.list_tasks()}
        for key in seed_mod.MADE:
            task = now.get(key)
            if task and (task["status"] not in helpers.FINAL or task.get("locked_by")):
                look.release(task["id"], "committed")
        changes = helpers.guest_changes(server.foreign, helpers.task_snapshot(look))
    if changes:
        pytest.fail("the suite changed tasks it did not create:\n" + "\n".join(changes))


@pytest.fixture
def seeder(pm_server: PMServer) -> Iterator[Seeder]:
    """A Seeder with its own pm agent, as a guest: the session's own feature (named with
    the run id), `drain` skips the test rather than touch tasks that were there before;
    its tasks are retired (committed) after the test."""
    with Seeder(pm_server.url, pm_server.api_key) as seed:
        seed.foreign = set(pm_server.foreign)
        seed.on_foreign = pytest.skip
        if pm_server.feature is None:
            pm_server.feature = seed.create_feature(
                seed.create_epic(f"pmtool tests {pm_server.run_id}")["id"],
                f"pmtool tests {pm_server.run_id}")
        seed._feature = pm_server.feature
        yield seed
        seed.retire_created()


@pytest.fixture
def queue(seeder: Seeder) -> Iterator[Seeder]:
    """The seeder, with nothing else pickable on the server before and after the test."""
    helpers.park(seeder)
    yield seeder
    helpers.park(seeder)


@pytest.fixture
def standin_only(pm_server: PMServer) -> StandInServer:
    """The shared stand-in; skips the test when the suite runs against a real server."""
    if pm_server.standin is None:
        pytest.skip("needs the stand-in server's sandbox endpoints")
    return pm_server.standin


@pytest.fixture(autouse=True)
def _standin_only_marker(request: pytest.FixtureRequest) -> None:
    # `@pytest.mark.standin_only` works like the fixture, without starting a server for
    # tests that are not marked.
    if request.node.get_closest_marker("standin_only"):
        request.getfixturevalue("standin_only")


@pytest.fixture
def free_port() -> int:
    """A loopback port nobody listens on (for 'server unreachable' cases)."""
    return helpers.free_port()


@pytest.fixture
def small_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helpers.SmallFs]:
    """Small real filesystems to fill or make read-only (skips where mount is refused)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the fault points cover this case")
    fs = helpers.SmallFs(tmp_path_factory.mktemp("fs"))
    try:
        yield fs
    finally:
        fs.unmount_all()


@pytest.fixture
def make_standin() -> Iterator[Callable[..., StandInServer]]:
    """Start private stand-ins (own clock, workers, switches; `race_window=0` for atomic
    locks where a test needs them); stopped after the test."""
    servers: list[StandInServer] = []

    def make(**kwargs: object) -> StandInServer:
        server = StandInServer(**kwargs).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# ---- a world for `pmtool run` ------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path, make_standin: Callable[..., Any]) -> helpers.World:
    """A private stand-in, a git repo, a hooks folder and the environment to run in
    (helpers.make_world; a test that needs another server calls make_world itself)."""
    return helpers.make_world(tmp_path, make_standin)


# ---- the scripted model server, and a scene for `pmtool exec-claude` ---------------------


@pytest.fixture
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as srv:
        yield srv


@pytest.fixture
def scene(tmp_path: Path, server: ScriptedModelServer) -> helpers.Scene:
    return helpers.make_scene(tmp_path, server.url)


# ---- several machines on one origin --------------------------------------------------------


@pytest.fixture
def fleet(world: World) -> tuple[Path, Machine, Machine, Machine]:
    """origin.git, and machines A (the world's repo), B and C: clones made before any work."""
    origin = world.tmp / "origin.git"
    git(world.tmp, "clone", "-q", "--bare", str(world.repo), str(origin))
    git(world.repo, "remote", "add", "origin", str(origin))
    git(world.repo, "fetch", "-q", "origin")
    machines = [Machine("a", world.repo, world.state)]
    for name in ("b", "c"):
        git(world.tmp, "clone", "-q", str(origin), str(world.tmp / name))
        machines.append(Machine(name, world.tmp / name, world.tmp / f"state-{name}"))
    return origin, *machines  # type: ignore[return-value]


# ---- a reader of the docs ------------------------------------------------------------------


@pytest.fixture
def reader(tmp_path: Path, make_standin) -> Iterator[dict]:
    """A fresh machine as the docs see it: a HOME of its own, a stand-in Headless PM that
    takes the key the examples export, and `claude` on PATH (pmtool's stand-in agent,
    which commits a file and gives a verdict as claude does)."""
    home = tmp_path / "home"
    (home / "src" / "app").mkdir(parents=True)
    git = ["git", "-C", str(home / "src" / "app")]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    claude = bindir / "claude"
    claude.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "2.1.197 (Claude Code)"; '
                      f'exit 0; }}\nexec {sys.executable} -m pmtool.testing.fake_agent\n')
    claude.chmod(0o755)
    server = make_standin(api_key=KEY, race_window=0)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMTOOL_", "HEADLESS_PM_", "XDG_", "API_KEY_"))}
    env.update(HOME=str(home), PATH=f"{bindir}:{Path(PMTOOL).parent}:{os.environ['PATH']}",
               HEADLESS_PM_API_URL=server.url, HEADLESS_PM_API_KEY=KEY)
    yield {"home": home, "env": env, "url": server.url, "repo": home / "src" / "app",
           "seeder": Seeder(server.url, KEY)}


# ---- a bare git repo (preflight) -----------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path

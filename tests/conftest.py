"""Shared pytest fixtures. Sections are owned by different parts of the suite: extend, don't
rewrite, and keep each section's fixtures together under its heading.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

import helpers
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


# ---- Headless PM server ------------------------------------------------------------------


@dataclass
class PMServer:
    """The server under test: a real Headless PM (from the environment) or the stand-in."""

    url: str
    api_key: str
    is_standin: bool
    standin: StandInServer | None = None


@pytest.fixture(scope="session")
def pm_server() -> Iterator[PMServer]:
    """PMTOOL_TEST_PM_URL + PMTOOL_TEST_PM_KEY select a real server; else a fresh stand-in."""
    url, key = os.environ.get("PMTOOL_TEST_PM_URL"), os.environ.get("PMTOOL_TEST_PM_KEY")
    if url and key:
        yield PMServer(url.rstrip("/"), key, is_standin=False)
        return
    # At the stand-in's defaults, which fail the way a real server does (a lock race
    # window, plain 500s and resets after them, the database pool); production mode:
    # only the random key works, as against a real deployment.
    with StandInServer(api_key=f"test-{secrets.token_hex(8)}", production=True) as server:
        yield PMServer(server.url, server.api_key, is_standin=True, standin=server)


@pytest.fixture
def seeder(pm_server: PMServer) -> Iterator[Seeder]:
    """A Seeder with its own pm agent; its tasks are retired (committed) after the test."""
    with Seeder(pm_server.url, pm_server.api_key) as seed:
        yield seed
        seed.retire_created()


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

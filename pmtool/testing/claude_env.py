"""Run the real ``claude`` CLI offline against a scripted model server.

See :class:`pmtool.testing.model_server.ScriptedModelServer`.

``find_test_claude()`` locates the project-local CLI pinned in ``tests/package.json``
(install it with ``npm ci --prefix tests --no-audit --no-fund``), and ``claude_env()`` builds
an environment in which that CLI talks only to the scripted server on loopback::

    claude = find_test_claude()
    with ScriptedModelServer(script) as srv:
        subprocess.run(
            [claude, "-p", "task", "--output-format", "json", "--dangerously-skip-permissions"],
            cwd=repo, env=claude_env(srv.url, tmp_path / "home"), timeout=30,
        )

Measured with Claude Code 2.1.197 under ``strace -e connect``: with this environment the
only connections are to the model server (no DNS look-ups at all); without
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` / ``DISABLE_AUTOUPDATER`` it resolves
``api.anthropic.com`` and sends a title-generation side request. In ``-p`` mode a fresh
``HOME`` needs no onboarding or trust prompt; the CLI writes ``HOME/.claude.json`` and keeps
sessions under ``HOME/.claude/projects/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "CLAUDE_BIN_ENV",
    "TEST_CLAUDE_VERSION",
    "claude_env",
    "find_test_claude",
    "project_test_claude_path",
]

#: Version pinned in ``tests/package.json``.
TEST_CLAUDE_VERSION = "2.1.197"

#: Environment variable naming another ``claude`` binary for the tests.
CLAUDE_BIN_ENV = "PMTOOL_TEST_CLAUDE_BIN"

# Variables taken over from the calling environment (everything else is dropped, so a
# developer's ANTHROPIC_*/CLAUDE_* settings, CLAUDECODE=1 of an enclosing Claude Code
# session, proxies, XDG directories and git settings cannot leak into a test run).
_INHERITED = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "SHELL",
    "SYSTEMROOT",
    "COMSPEC",
    "PATHEXT",
    "WINDIR",
)

_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "pmtool test",
    "GIT_AUTHOR_EMAIL": "pmtool-test@example.invalid",
    "GIT_COMMITTER_NAME": "pmtool test",
    "GIT_COMMITTER_EMAIL": "pmtool-test@example.invalid",
}


def project_test_claude_path() -> Path:
    """Where ``npm ci --prefix tests`` puts the CLI in a source checkout of pmtool."""
    return Path(__file__).resolve().parents[2] / "tests" / "node_modules" / ".bin" / "claude"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_test_claude() -> str | None:
    """The ``claude`` binary for end-to-end tests, or None when there is none.

    ``$PMTOOL_TEST_CLAUDE_BIN`` wins when set (it must name an executable file); otherwise
    the project-local ``tests/node_modules/.bin/claude`` of this checkout, then of the
    current directory. A ``claude`` on ``PATH`` is deliberately not used: tests should run
    the pinned version.
    """
    override = os.environ.get(CLAUDE_BIN_ENV)
    if override:
        path = Path(override).expanduser()
        return str(path) if _executable(path) else None
    for path in (
        project_test_claude_path(),
        Path.cwd() / "tests" / "node_modules" / ".bin" / "claude",
    ):
        if _executable(path):
            return str(path)
    return None


def claude_env(
    model_server_url: str,
    home: str | os.PathLike[str],
    *,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
    git_identity: bool = True,
    max_retries: int | None = None,
) -> dict[str, str]:
    """Environment for running the real CLI offline against a scripted model server.

    *home* becomes ``HOME`` (created if missing) so sessions, settings and the CLI's state
    file stay in a temporary directory. Only a few harmless variables (``PATH``, locale,
    ``TMPDIR``...) are taken from *base* (default ``os.environ``); *extra* is applied last.

    - ``ANTHROPIC_BASE_URL`` / ``ANTHROPIC_API_KEY=dummy``: talk to the scripted server.
    - ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC``, ``DISABLE_AUTOUPDATER``,
      ``DISABLE_TELEMETRY``, ``DISABLE_ERROR_REPORTING``: no background network calls
      (and no title-generation side request).
    - ``IS_SANDBOX=1``: allows ``--dangerously-skip-permissions`` when running as root.
    - ``NO_PROXY`` for loopback (proxy variables of *base* are not inherited).
    - *git_identity*: ``GIT_AUTHOR_*`` / ``GIT_COMMITTER_*``, since the temporary ``HOME``
      has no git config and the scripted model may run ``git commit``.
    - *max_retries*: ``CLAUDE_CODE_MAX_RETRIES`` (the CLI retries 5xx/529 answers with
      backoff, ten times by default; ``0`` makes them fail at once).
    """
    source = os.environ if base is None else base
    home_path = Path(home)
    home_path.mkdir(parents=True, exist_ok=True)
    env = {key: source[key] for key in _INHERITED if key in source}
    env.setdefault("PATH", os.defpath)
    env.update(
        {
            "HOME": str(home_path),
            "ANTHROPIC_BASE_URL": model_server_url.rstrip("/"),
            "ANTHROPIC_API_KEY": "dummy",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "IS_SANDBOX": "1",
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
        }
    )
    if git_identity:
        env.update(_GIT_IDENTITY)
    if max_retries is not None:
        env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    if extra:
        env.update(extra)
    return env

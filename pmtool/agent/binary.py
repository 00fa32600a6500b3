"""Finding the `claude` CLI, and asking it its version."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

# Where the original runner and Claude Code's own installers have put the binary.
FALLBACKS = ("~/.claude/local/claude", "~/.local/bin/claude", "~/.npm-global/bin/claude",
             "/usr/local/bin/claude")


def find_claude(configured: str | None = None) -> str | None:
    """The configured binary (PMTOOL_CLAUDE_BIN / config), else `claude` on PATH, else the
    usual install locations. None when there is none."""
    if configured:
        path = shutil.which(os.path.expanduser(configured))
        return path
    found = shutil.which("claude")
    if found:
        return found
    for candidate in FALLBACKS:
        fallback = Path(candidate).expanduser()
        if fallback.is_file() and os.access(fallback, os.X_OK):
            return str(fallback)
    return None


CLAUDE_VERSION_TIMEOUT = 20.0  # seconds; a first start of claude may update itself


def check_version(configured: str | None, timeout: float | None = None) -> dict[str, Any]:
    """`claude --version` answers: the health check `claude` and the preflight's."""
    from pmtool import procs

    timeout = CLAUDE_VERSION_TIMEOUT if timeout is None else timeout
    binary = find_claude(configured)
    if not binary:
        where = configured or "claude on PATH"
        return {"ok": False, "detail": f"claude CLI not found ({where})",
                "hint": "npm install -g @anthropic-ai/claude-code, or set PMTOOL_CLAUDE_BIN"}
    # Through procs, not subprocess.run: a hung `claude --version` whose helper holds its
    # output open would keep run() waiting after the timeout; procs ends the whole tree.
    try:
        ending, out, err = procs.run([binary, "--version"], timeout=timeout,
                                     env={**os.environ, "DISABLE_AUTOUPDATER": "1"},
                                     label="claude-version")
    except OSError as exc:
        return {"ok": False, "detail": f"{binary} does not run: {exc}", "path": binary}
    if ending.timed_out:
        return {"ok": False, "path": binary, "timed_out": True,
                "detail": f"{binary} --version did not answer in {timeout:g}s"}
    if ending.exit_code != 0:
        return {"ok": False, "path": binary, "detail": f"{binary} --version exited "
                                                       f"{ending.exit_code}: {err.strip()[:200]}"}
    version = out.strip()
    return {"ok": True, "detail": version, "path": binary, "version": version}

"""Finding the `claude` CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

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
        path = Path(candidate).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def claude_version(binary: str, timeout: float = 20.0) -> str:
    """`claude --version`, e.g. '2.1.197 (Claude Code)'. Raises OSError/TimeoutExpired."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=timeout, check=False,
                         env={**os.environ, "DISABLE_AUTOUPDATER": "1"})
    if out.returncode != 0:
        raise OSError(f"{binary} --version exited {out.returncode}: {out.stderr.strip()[:200]}")
    return out.stdout.strip()

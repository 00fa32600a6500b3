"""Finding the `claude` CLI."""

from __future__ import annotations

import os
import shutil
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
        fallback = Path(candidate).expanduser()
        if fallback.is_file() and os.access(fallback, os.X_OK):
            return str(fallback)
    return None

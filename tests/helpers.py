"""Running the installed `pmtool` console script the way a user's shell does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

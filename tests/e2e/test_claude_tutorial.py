"""The tutorial, run as written, gets a task done by the REAL claude."""

from __future__ import annotations

import pytest

from helpers import (
    CLAUDE,
    main_log,
    needs_claude,
    run_tutorial,
)
from pmtool.testing.claude_env import claude_env
from pmtool.testing.model_server import Bash, ScriptedModelServer, Structured, Write


@needs_claude
@pytest.mark.timeout(240)
def test_the_tutorial_gets_a_task_done_by_the_real_claude(reader):
    """The same, with the real claude binary on PATH (talking to a scripted model on
    loopback): it writes HELLO.md and commits it, and the task lands on main."""
    bindir = reader["home"].parent / "real-bin"
    bindir.mkdir()
    (bindir / "claude").symlink_to(CLAUDE)
    script = [Write("HELLO.md", "hello\n"),
              Bash("git add HELLO.md && git commit -qm 'Add HELLO.md'"),
              Structured({"outcome": "done", "summary": "HELLO.md says hello."})]
    with ScriptedModelServer(script) as model:
        env = {**claude_env(model.url, reader["home"], max_retries=0),
               "PATH": f"{bindir}:{reader['env']['PATH']}"}
        _proc, task = run_tutorial(reader, env)
    repo = reader["home"] / "src" / "hello"
    assert "Add HELLO.md" in main_log(repo)
    assert (repo / "HELLO.md").read_text() == "hello\n"
    assert "session" in (task["notes"] or "")

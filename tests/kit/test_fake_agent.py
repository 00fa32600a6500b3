"""The built-in fake agent honours the --agent-cmd contract on its own (no pmtool around it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from pmtool.agent.stream import parse_stream
from pmtool.testing import fake_agent


def run_fake(cwd: Path, prompt: str, **env: str) -> tuple[int, list[dict]]:
    proc = subprocess.run(fake_agent.command(), shell=True, cwd=cwd, input=prompt, text=True,
                          capture_output=True, timeout=30, check=False,
                          env={**os.environ, **env})
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def test_writes_commits_and_reports(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "work", str(tmp_path)], check=True)
    code, lines = run_fake(tmp_path, "Task 12: Add a widget\n- Role: backend_dev\n",
                           PMTOOL_SESSION_ID="sess-1", PMTOOL_TASK_ID="")
    assert code == 0
    assert lines[0]["type"] == "system" and lines[0]["session_id"] == "sess-1"
    result = lines[-1]
    assert result["type"] == "result" and result["is_error"] is False
    assert result["structured_output"]["outcome"] == "done"
    assert result["session_id"] == "sess-1" and 0 < result["total_cost_usd"] < 0.01
    note = tmp_path / "notes" / "task-12.md"
    assert "Add a widget" in note.read_text()
    log = subprocess.run(["git", "log", "--format=%s", "work"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout
    assert log.strip() == "task 12: backend_dev notes (fake agent)"
    summary = parse_stream(json.dumps(x) for x in lines)
    assert summary["num_turns"] == 3 and summary["tool_calls"] == 2


def test_knobs_and_qa_role(tmp_path: Path) -> None:
    code, lines = run_fake(tmp_path, "whatever", PMTOOL_ROLE="qa", PMTOOL_TASK_ID="9",
                           PMTOOL_FAKE_AGENT_EXIT="4", PMTOOL_FAKE_AGENT_VERDICT="line")
    assert code == 4 and lines[-1]["is_error"] is True
    assert "structured_output" not in lines[-1]
    assert lines[-1]["result"].splitlines()[-1].startswith("PMTOOL_VERDICT: pass ")
    assert (tmp_path / "notes" / "task-9-qa.md").exists()  # not a repo: written, not committed
    assert "error: git" in json.dumps(lines)
    code, lines = run_fake(tmp_path, "x", PMTOOL_TASK_ID="9", PMTOOL_FAKE_AGENT_OUTCOME="none")
    assert code == 0 and parse_stream(json.dumps(x) for x in lines)["outcome"] is None

"""The REAL claude binary where pmtool reads it directly: how its stops are named
(failure_policy) and the preflight that finds it working."""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import PMServer

from helpers import (
    CLAUDE,
    checks,
    needs_claude,
    settings_for,
)
from pmtool import failure_policy as f
from pmtool import preflight as pf
from pmtool.testing.claude_env import claude_env
from pmtool.testing.model_server import Bash, Error, Hang, ScriptedModelServer, Text


def run_claude(tmp_path: Path, script: list, *extra: str, max_retries: int | None = 1,
               oauth: bool = False, timeout: float | None = None) -> f.Stop:
    """Run the real CLI against the scripted server and classify its end as pmtool would."""
    assert CLAUDE
    with ScriptedModelServer(script) as srv:
        env = claude_env(srv.url, tmp_path / "home", max_retries=max_retries)
        if oauth:  # a subscription login: the API's usage-limit headers reach the stream
            del env["ANTHROPIC_API_KEY"]
            env["CLAUDE_CODE_OAUTH_TOKEN"] = "scripted-oauth-token"
        cmd = [CLAUDE, "-p", "work", "--output-format", "stream-json", "--verbose",
               "--dangerously-skip-permissions", "--session-id", str(uuid.uuid4()), *extra]
        timed_out = None
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout or 60)
        except subprocess.TimeoutExpired:
            if not timeout:
                raise
            timed_out = "timeout"
            proc.terminate()
            out, err = proc.communicate(timeout=30)
    result, events = f.read_stream(out.splitlines())
    return f.classify(result, events, exit_code=proc.returncode, stderr=err,
                      timed_out_by=timed_out, has_verdict=False)


@needs_claude
@pytest.mark.timeout(120)
def test_real_claude_stops_are_named(tmp_path: Path) -> None:
    steps = [Bash("echo 1"), Bash("echo 2"), Bash("echo 3"), Text("done")]

    budget = run_claude(tmp_path, steps, "--max-budget-usd", "0.0000001")
    assert budget.kind == "budget" and not budget.policy.retry and budget.policy.attempt

    turns = run_claude(tmp_path, steps, "--max-turns", "1")
    assert turns.kind == "max_turns" and turns.policy.retry and turns.policy.attempt

    limited = run_claude(tmp_path, [Error(429, "rate_limit_error", "slow down")] * 5)
    assert limited.kind == "rate_limit" and limited.api_error_status == 429
    assert limited.retries == 1 and limited.last_retry["error"] == "rate_limit"
    assert limited.policy.keep and not limited.policy.attempt

    reset = int(time.time()) + 3600
    usage = run_claude(tmp_path, [Error(429, "rate_limit_error", "limit", headers={
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(reset),
        "anthropic-ratelimit-unified-representative-claim": "five_hour"})] * 5, oauth=True)
    assert usage.kind == "rate_limit"
    assert usage.resets_at == datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    overloaded = run_claude(tmp_path, [Error(529, "overloaded_error", "Overloaded")] * 5)
    assert overloaded.kind == "overloaded" and overloaded.last_retry["error"] == "overloaded"

    refused = run_claude(tmp_path, [Error(401, "authentication_error", "bad key")] * 5)
    assert refused.kind == "auth" and refused.policy.stop and refused.policy.keep

    # pmtool's own time limit while claude waits on the API: a timeout, an attempt.
    hung = run_claude(tmp_path, [Hang()], timeout=3)
    assert hung.kind == "timeout" and hung.policy.attempt

    no_verdict = run_claude(tmp_path, [Text("all done")])
    assert no_verdict.kind == "failed" and "no verdict" in no_verdict.message


@needs_claude
def test_a_good_setup_passes(pm_server: PMServer, tmp_path: Path, repo: Path) -> None:
    found = checks(settings_for(pm_server, tmp_path), repo)
    assert all(f.ok for f in found.values()), [f.to_json() for f in found.values()]
    assert "Claude Code" in found["claude"].detail
    assert pf.first_fatal(found.values()) is None

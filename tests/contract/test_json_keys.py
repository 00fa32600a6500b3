"""The keys of every command's JSON answer, pinned: scripts read them (`jq .task.id`), so a
key may be added but never dropped or renamed without this table changing with it (and the
README saying so).

One session of the console script against a private stand-in, in the order a pipeline
uses the commands; each answer's top-level keys (and an error's `error` object, and the
events of `run`) must hold at least the keys pinned below. A new key shows up in the
failure message of `test_the_table_names_every_key` so it can be pinned too.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from helpers import PMTOOL, World, documented_keys
from pmtool.cli import COMMAND_MODULES
from pmtool.testing import fake_agent

# command (and the case) -> the keys its answer always has
PINNED: dict[str, list[str]] = {
    "model-for": ["level", "model", "ok"],
    "config": ["about", "config_file", "ok", "settings"],
    "health": ["checks", "error", "ok"],
    "register": ["agent", "ok"],
    "claim: nothing": ["error", "ok"],
    "claim": ["claim", "ok", "record", "task"],
    "lock show": ["live", "ok", "path", "record"],
    "worktree create": [
        "base", "branch", "branch_source", "complexity", "created", "hook", "ok", "path", "record",
        "task_id", "worktree"],
    "worktree list": ["corrupt_records", "ok", "repo", "worktrees"],
    "hook run": [
        "duration_s", "exit_code", "hook", "ok", "path", "reason", "skipped", "stderr", "stdout",
        "timed_out"],
    "exec-claude": [
        "agent_id", "api_error_status", "attempts", "branch", "cwd", "duration_s", "exit_code",
        "is_error", "log", "model", "model_used", "num_turns", "ok", "outcome", "resumed", "role",
        "session_id", "signal", "stderr_log", "stop", "stopped", "summary", "swept",
        "task_cost_usd", "task_id", "timed_out", "timed_out_by", "tool_calls", "total_cost_usd",
        "verdict_source"],
    # Without a verdict: the error, and `next`, the step the failure policy calls for.
    "exec-claude: no verdict": [
        "agent_id", "api_error_status", "attempts", "branch", "cwd", "duration_s", "error",
        "exit_code", "is_error", "log", "model", "model_used", "next", "num_turns", "ok",
        "outcome", "resumed", "role", "session_id", "signal", "stderr_log", "stop", "stopped",
        "summary", "swept", "task_cost_usd", "task_id", "timed_out", "timed_out_by",
        "tool_calls", "total_cost_usd", "verdict_source"],
    "finish": ["action", "lock_expired", "ok", "outcome", "status", "task", "task_id"],
    "status": [
        "cooling_down", "corrupt_records", "live", "ok", "parked", "runners", "state_dir", "time",
        "usage"],
    "logs": ["entries", "ok", "task_id"],
    "report": ["by", "groups", "most_expensive", "ok", "since", "totals"],
    "recover": ["counts", "dry_run", "entries", "ok", "parked", "pruned", "stray_temps"],
    "recover --orphans": ["counts", "dry_run", "ok", "orphans"],
    "init": ["config", "folder", "hooks_dir", "ok", "written"],
    "run: every event": ["agent", "event", "level", "ok", "role", "task_id", "time"],
    "run: stopped": [
        "agent", "event", "level", "ok", "reason", "record_kept", "role", "task_id",
        "tasks_done", "time"],
    "demo": ["events", "ok", "runners", "tasks", "where"],
    "fleet": ["agents", "counts", "in_flight", "ok", "parked", "queue", "stale", "time",
              "unlocked"],
    "metrics --output": ["bytes", "ok", "output", "series"],
}


def call(world: World, *args: str, stdin: str | None = None,
         env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every JSON line `pmtool ARGS` prints (one for a command; one per event for run)."""
    # health fails alike on every machine (no claude there): its failure answer is pinned.
    env = {**world.env, **(env or {})}
    if args[0] == "health":
        env["PMTOOL_CLAUDE_BIN"] = str(world.tmp / "no-claude")
    proc = subprocess.run([PMTOOL, *args], capture_output=True, text=True, env=env,
                          cwd=world.repo, input=stdin, timeout=120, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines, (args, proc.stdout, proc.stderr)
    return lines


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each case's keys, from one pipeline's worth of calls."""
    from helpers import make_world
    from pmtool.testing.server import StandInServer

    tmp = tmp_path_factory.mktemp("keys")
    servers: list[StandInServer] = []

    def make_standin(**kw: Any) -> StandInServer:
        server = StandInServer(**kw).start()
        servers.append(server)
        return server

    world = make_world(tmp, make_standin)
    agent = ["--agent-id", "dev_1"]
    found: dict[str, Any] = {}

    def one(case: str, *args: str, stdin: str | None = None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
        (out,) = call(world, *args, stdin=stdin, env=env)
        found[case] = out
        return out

    try:
        one("model-for", "model-for", "principal")
        one("config", "config")
        one("health", "health")
        one("register", "register", *agent, "--role", "backend_dev", "--level", "senior")
        one("claim: nothing", "claim", *agent, "--role", "backend_dev", "--level", "senior")
        task = world.task()
        one("claim", "claim", *agent, "--role", "backend_dev", "--level", "senior")
        one("recover", "recover", "--all", "--dry-run")
        one("lock show", "lock", "show", *agent)
        one("worktree create", "worktree", "create", *agent, "--repo", str(world.repo))
        one("worktree list", "worktree", "list", "--repo", str(world.repo))
        one("hook run", "hook", "run", "pre_task", *agent)
        one("exec-claude: no verdict", "exec-claude", *agent, "--agent-cmd",
            fake_agent.command(), env={"PMTOOL_FAKE_AGENT_VERDICT": "none"})
        one("exec-claude", "exec-claude", *agent, "--agent-cmd", fake_agent.command())
        one("finish", "finish", *agent, "--outcome", "done", "--notes", "keys")
        one("status", "status")
        found["logs"] = call(world, "logs", str(task["id"]))[0]
        one("report", "report")
        one("recover --orphans", "recover", "--orphans", "--dry-run")
        one("init", "init", str(tmp / "init"))
        one("fleet", "fleet")
        one("metrics --output", "metrics", "--output", str(tmp / "pmtool.prom"))
        world.task(title="for the runner")
        events = call(world, "run", *world.args("--single-task"))
        found["run: every event"] = {k: None for k in set.intersection(
            *(set(e) for e in events))}
        found["run: stopped"] = events[-1]
        one("demo", "demo", "--workdir", str(tmp / "demo"))
    finally:
        for server in servers:
            server.stop()
    return found


def test_the_answers_keep_their_keys(answers: dict[str, Any]) -> None:
    dropped = {case: sorted(set(keys) - set(answers[case]))
               for case, keys in PINNED.items()
               if case in answers and set(keys) - set(answers[case])}
    assert dropped == {}, "keys dropped or renamed: a script reading them breaks"
    errors = {case: answer["error"] for case, answer in answers.items()
              if answer.get("ok") is False}
    for case, error in errors.items():
        assert {"type", "message"} <= set(error), case


def test_the_table_names_every_key(answers: dict[str, Any]) -> None:
    """New keys are pinned as they come: the table is the contract a reader looks up."""
    missing = {case: sorted(set(answers[case]) - set(PINNED.get(case, [])))
               for case in answers if set(answers[case]) - set(PINNED.get(case, []))}
    assert missing == {}, json.dumps(missing)


def test_every_command_has_a_pinned_answer() -> None:
    """sandbox serves until stopped (its one line is pinned in test_cli_contract)."""
    cases = {case.split(":")[0].split()[0] for case in PINNED}
    assert set(COMMAND_MODULES) - {"sandbox"} <= cases


def test_a_dropped_key_fails(answers: dict[str, Any]) -> None:
    """The check itself: an answer without one of its pinned keys is reported."""
    case, keys = next(iter(PINNED.items()))
    answer = {k: v for k, v in answers[case].items() if k != keys[-1]}
    assert set(keys) - set(answer) == {keys[-1]}


def test_the_manual_lists_the_pinned_keys() -> None:
    """docs/reference/output.md tells a reader what each command answers: for every
    command both name, it lists exactly the keys pinned here, so the two cannot drift."""
    documented = documented_keys()
    names = {"init": "init DIR", "logs": "logs TASK"}
    differ = {case: {"pinned": sorted(set(keys) - {"ok"}),
                     "manual": sorted(documented[names.get(case, case)])}
              for case, keys in PINNED.items()
              if names.get(case, case) in documented and "error" not in keys  # a success
              and set(keys) - {"ok"} != documented[names.get(case, case)]}
    assert differ == {}, json.dumps(differ)

"""The API key stays with pmtool, and exec-claude keeps a task's lock alive.

One task end to end under `pmtool run` (real git, the stand-in, the fake agent behind a
wrapper that keeps its environment, hooks that keep theirs): the key must not appear in
anything pmtool wrote or started (stdout, stderr, the state folder, the server's notes
and changelog, the repository, hook and agent environments, any process's argv while it
ran), unless pass_key_to_hooks hands it to hooks. And `exec-claude` on its own (a bash
pipeline) re-registers while the agent works, so the lock outlives the 30-minute rule.
"""

from __future__ import annotations

import json
import stat
import subprocess
from typing import Any

import pytest

from helpers import (
    PMTOOL,
    World,
    dumping_hooks,
    everything_written,
    run_watched,
    wait_for,
)
from pmtool.testing import fake_agent


def test_the_key_appears_nowhere_pmtool_wrote(world: World) -> None:
    key = world.env["HEADLESS_PM_API_KEY"]
    dumps = dumping_hooks(world)
    task = world.task()
    run, argv = run_watched(world, {"PMTOOL_FAKE_AGENT_SLEEP": "1",
                                    "PMTOOL_FAKE_AGENT_NO_COMMIT": "1"})
    assert run.code == 0, run.stderr
    assert world.status(task["id"])["status"] == "dev_done"
    places = everything_written(world, run, argv, dumps)
    # The test can see what it looks for: the hooks and the agent ran, argv was watched.
    for name in ("pre_task", "post_task", "worktree_setup", "agent"):
        assert (dumps / f"{name}.env").exists(), name
    assert any("pmtool.testing.fake_agent" in line for line in argv)
    assert any(str(world.state / "logs") in p for p in places)
    leaked = [where for where, text in places.items() if key in text]
    assert leaked == []
    # Transcripts, records, events and history: 0600 files in 0700 folders.
    for path in [world.state, *world.state.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        elif path.suffix in (".json", ".jsonl", ".log"):
            assert mode == 0o600, (path, oct(mode))


def test_pass_key_to_hooks_hands_hooks_the_key_and_only_them(world: World) -> None:
    key = world.env["HEADLESS_PM_API_KEY"]
    dumps = dumping_hooks(world)
    world.task()
    run, _argv = run_watched(world, {"PMTOOL_PASS_KEY_TO_HOOKS": "1"})
    assert run.code == 0, run.stderr
    for hook in ("pre_task", "post_task"):
        assert f"HEADLESS_PM_API_KEY={key}" in (dumps / f"{hook}.env").read_text()
    assert key not in (dumps / "agent.env").read_text()
    assert key not in json.dumps(run.events) + run.stderr


def exec_claude(world: World, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([PMTOOL, "exec-claude", "--agent-cmd", fake_agent.command(), *args],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**world.env, **env}, cwd=world.repo)


def claim(world: World, agent: str) -> dict[str, Any]:
    proc = subprocess.run([PMTOOL, "claim", "--agent-id", agent, "--role", "backend_dev",
                           "--settle", "0.05"], capture_output=True, text=True,
                          env=world.env, cwd=world.repo, check=True)
    return json.loads(proc.stdout)["task"]


@pytest.mark.parametrize("how", ["agent-id", "task-json"])
def test_exec_claude_keeps_the_lock_past_the_30_minute_rule(world: World, how: str) -> None:
    world.task()
    task = claim(world, "dev_pipe")
    env = {"PMTOOL_HEARTBEAT": "0.2", "PMTOOL_FAKE_AGENT_SLEEP": "3"}
    if how == "agent-id":
        subprocess.run([PMTOOL, "worktree", "create", "--agent-id", "dev_pipe"],
                       env=world.env, cwd=world.repo, check=True, capture_output=True)
        proc = exec_claude(world, "--agent-id", "dev_pipe", env=env)
        wait_for(lambda: (r := world.store.load("dev_pipe")) and r.session_id,
                 what="agent start")
    else:  # claim ... | jq .task | exec-claude --task-json -
        proc = subprocess.Popen(
            [PMTOOL, "exec-claude", "--agent-cmd", fake_agent.command(), "--task-json", "-"],
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**world.env, **env}, cwd=world.repo)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(task))
        proc.stdin.close()
        proc.stdin = None  # written and closed: communicate() must not flush it again
    world.outlast_the_stale_rule(task["id"], "dev_pipe", beat=0.8)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["outcome"] == "done"


def test_exec_claude_without_heartbeat_loses_the_lock(world: World) -> None:
    """The same pipeline with the heartbeat off: the 30-minute rule takes the lock (so the
    test above shows the heartbeat, not the stand-in, keeping it)."""
    world.task()
    task = claim(world, "dev_nobeat")
    subprocess.run([PMTOOL, "worktree", "create", "--agent-id", "dev_nobeat"],
                   env=world.env, cwd=world.repo, check=True, capture_output=True)
    proc = exec_claude(world, "--agent-id", "dev_nobeat",
                       env={"PMTOOL_HEARTBEAT": "0", "PMTOOL_FAKE_AGENT_SLEEP": "2"})
    wait_for(lambda: (r := world.store.load("dev_nobeat")) and r.session_id, what="start")
    world.server.advance_clock(31 * 60)
    world.seeder.register("other", "backend_dev", "senior")
    world.seeder.next_task("backend_dev", "senior")
    assert world.status(task["id"])["locked_by"] is None
    proc.communicate(timeout=60)


def test_exec_claude_alone_keeps_its_transcripts_private(world: World) -> None:
    """A pipeline's first exec-claude, with no `pmtool run` before it to make the folders."""
    world.task()
    task = claim(world, "dev_private")
    proc = subprocess.Popen(
        [PMTOOL, "exec-claude", "--agent-cmd", fake_agent.command(), "--task-json", "-"],
        text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**world.env, "PMTOOL_STATE_DIR": str(world.tmp / "fresh-state")},
        cwd=world.repo)
    _out, err = proc.communicate(json.dumps(task), timeout=60)
    assert proc.returncode == 0, err
    logs = world.tmp / "fresh-state" / "logs"
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    files = list(logs.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

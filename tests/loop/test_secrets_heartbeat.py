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
import re
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import CLAUDE, PMTOOL, Run, World, events, needs_claude, wait_for
from pmtool.testing import fake_agent
from pmtool.testing.claude_env import claude_env
from pmtool.testing.model_server import Bash, ScriptedModelServer, Structured, Write


def dumping_hooks(world: World) -> Path:
    dumps = world.tmp / "dumps"
    dumps.mkdir()
    for name in ("pre_task", "post_task", "worktree_setup"):
        hook = world.hooks / name
        hook.write_text(f'#!/bin/sh\nenv > "{dumps}/{name}.env"\ncat > "{dumps}/{name}.json"\n')
        hook.chmod(0o755)
    agent = world.tmp / "agent.sh"
    agent.write_text(f'#!/bin/sh\nenv > "{dumps}/agent.env"\nexec {fake_agent.command()}\n')
    agent.chmod(0o755)
    return dumps


def watch_argv(stop: threading.Event, seen: set[str]) -> None:
    while not stop.is_set():
        out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        seen.update(out.splitlines())
        time.sleep(0.02)


def run_watched(world: World, env: dict[str, str],
                agent: tuple[str, ...] = ()) -> tuple[Run, set[str]]:
    seen: set[str] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=watch_argv, args=(stop, seen))
    watcher.start()
    agent = agent or ("--agent-cmd", str(world.tmp / "agent.sh"))
    try:
        proc = subprocess.run(
            [PMTOOL, "run", *world.args("--single-task", *agent)],
            capture_output=True, text=True, env={**world.env, **env}, cwd=world.repo,
            timeout=90, check=False)
    finally:
        stop.set()
        watcher.join()
    return Run(proc.returncode, events(proc.stdout), proc.stderr), seen


def everything_written(world: World, run: Run, argv: set[str], dumps: Path) -> dict[str, str]:
    """Where pmtool's words and its children's environments went, by name."""
    places = {"stdout": json.dumps(run.events), "stderr": run.stderr,
              "argv": "\n".join(argv)}
    for path in [*world.state.rglob("*"), *dumps.rglob("*")]:
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("utf-8", "replace")
    places["server notes"] = "\n".join(t.get("notes") or "" for t in world.seeder.list_tasks())
    places["changelog"] = json.dumps(world.seeder.changelog(500))
    places["git"] = world.git("log", "--all", "-p", "--format=%H %B")
    return places


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


@pytest.mark.e2e
@needs_claude
@pytest.mark.timeout(120)
def test_the_key_never_reaches_the_real_claude_or_its_tools(world: World) -> None:
    """The real claude binary, against the scripted model server: its Bash tool dumps its
    environment; neither that, nor what claude sent to the model, nor anything pmtool
    wrote, holds the key."""
    key = world.env["HEADLESS_PM_API_KEY"]
    dumps = dumping_hooks(world)
    task = world.task()
    with ScriptedModelServer() as model:
        env = {**claude_env(model.url, world.tmp / "home", max_retries=0),
               "PMTOOL_CLAUDE_BIN": CLAUDE}
        model.set_script([Bash(f"env > {dumps}/claude-tool.env; echo key=$HEADLESS_PM_API_KEY"),
                          Write("done.txt", "done\n"),
                          Structured({"outcome": "done", "summary": "Done."})])
        run, argv = run_watched(world, env, agent=("--real-claude",))
        assert run.code == 0, run.stderr
        sent = json.dumps([vars(r) for r in model.log], default=str)  # headers too
    assert world.status(task["id"])["status"] == "dev_done"
    # The tool's output reached the model: `key=` with nothing after it.
    assert re.search(r"key=(?!\$HEADLESS_PM_API_KEY)", sent)
    places = everything_written(world, run, argv, dumps)
    places["sent to the model"] = sent
    assert (dumps / "claude-tool.env").exists()
    assert any("--session-id" in line for line in argv)  # claude was seen running
    assert [where for where, text in places.items() if key in text] == []


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

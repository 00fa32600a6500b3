"""`pmtool demo`: the whole job on a fresh machine, with nothing to set up.

Starts the bundled stand-in server on a free loopback port, makes a git repository and a
few tasks (a minor and a major developer task, then a QA pass over both), and runs the
same loop as `pmtool run` over them: a developer runner, then a QA runner. The agent is
the built-in stand-in (`pmtool.testing.fake_agent`) unless `agent="claude"`.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pmtool.config import load_settings
from pmtool.run.loop import Runner, RunOptions
from pmtool.state import StateDir

TASKS = [
    {"title": "Add a CHANGELOG entry for the 0.1 release", "target_role": "backend_dev",
     "difficulty": "junior", "complexity": "minor", "branch": "main",
     "description": "Write a short CHANGELOG.md entry. Minor task: commit on main."},
    {"title": "Add a /ping endpoint", "target_role": "backend_dev", "difficulty": "senior",
     "complexity": "major", "branch": "feature/ping",
     "description": "Answer GET /ping with 'pong'. Major task: work on its own branch."},
]

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "pmtool demo", "GIT_AUTHOR_EMAIL": "demo@pmtool.invalid",
                "GIT_COMMITTER_NAME": "pmtool demo",
                "GIT_COMMITTER_EMAIL": "demo@pmtool.invalid"}


def _git(repo: Path, *args: str) -> str:
    from pmtool import git

    return git.out(repo, *args)


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# demo project\n\nMade by `pmtool demo`.\n")
    _git(path, "add", "README.md")
    _git(path, "commit", "-q", "-m", "Start the demo project")
    return path


def run_demo(workdir: Path | None = None, agent: str = "stand-in",
             on_event: Callable[[dict[str, Any]], None] = lambda _e: None,
             progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    from pmtool.testing import fake_agent
    from pmtool.testing.seed import Seeder
    from pmtool.testing.server import StandInServer

    for name, value in GIT_IDENTITY.items():
        os.environ.setdefault(name, value)  # the agent commits; a fresh machine has no identity
    root = Path(workdir or tempfile.mkdtemp(prefix="pmtool-demo-")).absolute()
    repo = make_repo(root / "repo")
    state = root / "state"
    (root / "hooks").mkdir(exist_ok=True)
    key = secrets.token_urlsafe(16)
    events: list[dict[str, Any]] = []

    def record(event: dict[str, Any]) -> None:
        events.append(event)
        on_event(event)

    with StandInServer(api_key=key, production=True, poll_check_interval=0.5) as server:
        progress(f"stand-in Headless PM at {server.url}; repository {repo}")
        seeder = Seeder(server.url, key)
        ids = [seeder.create_task(**spec)["id"] for spec in TASKS]
        settings = load_settings({"api_url": server.url, "api_key": key,
                                  "state_dir": str(state), "hooks_dir": str(root / "hooks")},
                                 config_path=root / "no-config.toml")
        agent_cmd = None if agent == "claude" else fake_agent.command()
        common = {"repo": str(repo), "level": "principal", "agent_cmd": agent_cmd,
                  "idle_poll": 0.0, "settle": 0.05, "health_interval": 3600.0,
                  "timeout": 600.0}
        codes = {}
        for agent_id, role in (("demo_dev", "backend_dev"), ("demo_qa", "qa")):
            progress(f"running {agent_id} ({role}) until its queue is empty")
            opts = RunOptions(agent_id=agent_id, role=role, max_tasks=len(TASKS), **common)
            codes[agent_id] = Runner(settings, opts, record, progress).run()
        tasks = [seeder.get_task(task_id) for task_id in ids]
    summary = []
    for task in tasks:
        branch = task["branch"] if task["complexity"] == "major" else "main"
        summary.append({"id": task["id"], "title": task["title"], "status": task["status"],
                        "complexity": task["complexity"], "branch": branch,
                        "commits": _git(repo, "log", "--format=%h %s", "-2", branch).splitlines(),
                        "notes": task.get("notes")})
    ok = all(t["status"] == "qa_done" for t in tasks)
    layout = StateDir(settings.state_path)  # the one owner of where things go in it
    return {"ok": ok, "tasks": summary, "events": len(events),
            "runners": codes, "where": {"workdir": str(root), "repo": str(repo),
                                        "state_dir": str(layout.root),
                                        "history": str(layout.history_path),
                                        "logs": str(layout.logs_dir)}}

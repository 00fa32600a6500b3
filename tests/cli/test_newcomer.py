"""The first hour of a newcomer, as one session: a fresh clone, the demo, a config from
`init`, a server to connect to (the stand-in, as `pmtool sandbox serve` runs it), and a
first task taken and given back by hand. Every step answers with its documented JSON and
exit code; nothing is installed over the network (the clone runs on this interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from pmtool.testing.seed import Seeder, unique_id

ROOT = helpers.ROOT


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout to clone")
def test_a_newcomers_first_hour(tmp_path: Path) -> None:
    clone = tmp_path / "pmtool"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMTOOL_", "HEADLESS_PM_", "API_KEY_HEADLESS_PM"))}
    env.update(PYTHONPATH=str(clone), HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_STATE_HOME=str(home / ".state"))

    def pmtool(*args: str, code: int = 0, **extra: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "pmtool", *args], capture_output=True,
                              text=True, env={**env, **extra}, cwd=tmp_path, timeout=300,
                              check=False)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        return json.loads(done.stdout)

    demo = pmtool("demo", "--workdir", str(tmp_path / "demo"))
    assert demo["ok"] and {t["status"] for t in demo["tasks"]} == {"qa_done"}

    # A config of one's own: private from the start; a typo in its name is said at once.
    made = pmtool("init", str(home / "pm"))
    config = Path(made["config"])
    assert config.stat().st_mode & 0o777 == 0o600
    pmtool("model-for", "senior", code=2, PMTOOL_CONFIG=str(home / "pm" / "confg.toml"))

    server = subprocess.Popen([sys.executable, "-m", "pmtool", "sandbox", "serve", "--port",
                               "0", "--api-key", "newcomer-key"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert server.stdout is not None
        url = json.loads(server.stdout.readline())["url"]
        config.write_text(config.read_text().replace(
            '# api_url = "http://localhost:6969"', f'api_url = "{url}"'))
        env["PMTOOL_CONFIG"] = str(config)
        # Connect: the wrong key, then the wrong path, each with its exit code and fix.
        pmtool("health", "--check", "auth", code=1, HEADLESS_PM_API_KEY="wrong")
        env["HEADLESS_PM_API_KEY"] = "newcomer-key"
        wrong = pmtool("--api-url", url + "/api/v1", "claim", "--agent-id", "x",
                       "--role", "backend_dev", code=2)
        assert "without /api/v1" in wrong["error"]["hint"]
        assert pmtool("health", "--check", "api", "--check", "auth")["ok"]

        task = Seeder(url, "newcomer-key").create_task(title="my first task")
        agent = unique_id("newcomer")
        claimed = pmtool("claim", "--agent-id", agent, "--role", "backend_dev")
        assert claimed["task"]["id"] == task["id"]
        # Steps by hand, the agent named once in the environment, as hooks have it.
        env["PMTOOL_AGENT_ID"] = agent
        assert pmtool("lock", "show")["record"]["task"]["id"] == task["id"]
        released = pmtool("lock", "release", "--notes", "just trying")
        assert released["action"] == "released" and released["cooling_until"] is None
        assert pmtool("claim", "--role", "backend_dev")["task"]["id"] == task["id"]
    finally:
        server.terminate()
        server.wait(timeout=60)

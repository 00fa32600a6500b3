"""Hooks: `pmtool hook run` and pmtool.hooks, with real hook scripts in subprocesses.

A user's session: write a hook, run it through the console script, read the JSON and the
files the hook left. The timeout case checks with psutil that nothing survives, not even
a grandchild that left the session with setsid.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, pmtool, wait_for
from pmtool.hooks import OUTPUT_CAP, find_hook, run_hook, task_context
from pmtool.records import RecordStore, TaskRecord

SHIPPED = ROOT / "hooks"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every setting comes from the test; nothing from the machine."""
    for name in ("HEADLESS_PM_HOOKS_DIR", "HEADLESS_PM_HOOK_TIMEOUT", "HEADLESS_PM_API_URL",
                 "HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM", "PMTOOL_CLAUDE_BIN",
                 "PMTOOL_TASK_ID", "PMTOOL_WORKTREE", "PMTOOL_BRANCH", "PMTOOL_PRE_TASK_SKIP"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.toml").touch()  # named, so it must exist
    monkeypatch.setenv("PMTOOL_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("PMTOOL_STATE_DIR", str(tmp_path / "state"))
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "pmtool tests")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "pmtool-tests@example.invalid")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    (tmp_path / "hooks").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def hook(folder: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = folder / name
    path.write_text(body)
    path.chmod(mode)
    return path


def save_record(state: Path, worktree: Path | None = None) -> TaskRecord:
    record = TaskRecord(
        agent_id="dev_001", role="backend_dev", level="senior",
        server_url="http://127.0.0.1:1",
        task={"id": 7, "title": "Add login", "branch": "feature/login", "complexity": "major",
              "difficulty": "senior", "status": "under_work"},
        previous_status="created", worktree=str(worktree) if worktree else None,
        branch="feature/login")
    RecordStore(state).save(record)
    return record


def survivors(token: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment carries `token`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if f"HOOK_TEST_TOKEN={token}".encode() in Path(
                    f"/proc/{proc.pid}/environ").read_bytes():
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def test_context_reaches_the_hook_on_stdin_and_in_the_environment(env: Path) -> None:
    worktree = env / "wt"
    worktree.mkdir()
    save_record(env / "state", worktree)
    hook(env / "hooks", "pre_task.sh", """#!/bin/sh
cat > "$OUT/ctx.json"
env | grep '^PMTOOL_' | sort > "$OUT/env.txt"
pwd > "$OUT/pwd"
echo checked
""")
    res = pmtool("hook", "run", "pre_task", "--hooks-dir", str(env / "hooks"),
                 "--agent-id", "dev_001",
                 env={"OUT": str(env / "out"), "HEADLESS_PM_API_KEY": "sekrit-key-123",
                      "HEADLESS_PM_API_URL": "http://pm.example:6969",
                      "PMTOOL_TASK_TITLE": "stale value from an outer hook"})
    assert res.code == 0
    assert res.out["stdout"] == "checked\n"
    assert res.out["path"].endswith("pre_task.sh") and res.out["skipped"] is False
    ctx = json.loads((env / "out" / "ctx.json").read_text())
    assert ctx["hook"] == "pre_task" and ctx["task_id"] == 7
    assert ctx["task"]["branch"] == "feature/login" and ctx["worktree"] == str(worktree)
    envs = dict(line.split("=", 1) for line in (env / "out" / "env.txt").read_text().split("\n")
                if line)
    assert envs["PMTOOL_HOOK"] == "pre_task"
    assert envs["PMTOOL_TASK_ID"] == "7"
    assert envs["PMTOOL_TASK_TITLE"] == "Add login"
    assert envs["PMTOOL_AGENT_ID"] == "dev_001"
    assert envs["PMTOOL_ROLE"] == "backend_dev" and envs["PMTOOL_LEVEL"] == "senior"
    assert envs["PMTOOL_WORKTREE"] == str(worktree)
    assert envs["PMTOOL_BRANCH"] == "feature/login"
    assert envs["PMTOOL_STATE_DIR"] == str(env / "state")
    assert envs["PMTOOL_API_URL"] == "http://pm.example:6969"
    # The key is in pmtool's environment, but pmtool hands it to the hook nowhere.
    assert "sekrit-key-123" not in json.dumps(ctx)
    assert "sekrit-key-123" not in "".join(envs.values())
    # With a record, the hook runs in the task's worktree.
    assert (env / "out" / "pwd").read_text().strip() == str(worktree)


def test_input_is_merged_over_the_record(env: Path) -> None:
    save_record(env / "state")
    hook(env / "hooks", "post_task", "#!/bin/sh\ncat > \"$OUT/ctx.json\"\n")
    (env / "extra.json").write_text(json.dumps({"outcome": "done", "total_cost_usd": 0.25}))
    res = pmtool("hook", "run", "post_task", "--hooks-dir", str(env / "hooks"),
                 "--agent-id", "dev_001", "--input", str(env / "extra.json"),
                 env={"OUT": str(env / "out")})
    assert res.code == 0
    ctx = json.loads((env / "out" / "ctx.json").read_text())
    assert ctx["outcome"] == "done" and ctx["task_id"] == 7 and ctx["total_cost_usd"] == 0.25

    res = pmtool("hook", "run", "post_task", "--hooks-dir", str(env / "hooks"), "--input", "-",
                 input="[1, 2]")
    assert res.code == 2 and res.out["error"]["type"] == "usage"


def test_failing_hook_exits_1_with_its_output(env: Path) -> None:
    hook(env / "hooks", "pre_task.py",
         "#!/usr/bin/env python3\nimport sys\nprint('disk full', file=sys.stderr)\nsys.exit(3)\n")
    res = pmtool("hook", "run", "pre_task", "--hooks-dir", str(env / "hooks"))
    assert res.code == 1
    assert res.out["ok"] is False and res.out["exit_code"] == 3
    assert res.out["stderr"] == "disk full\n" and res.out["timed_out"] is False
    assert "disk full" in res.stderr  # the human line names the reason


def test_timeout_ends_the_whole_tree_even_a_setsid_grandchild(env: Path) -> None:
    token = uuid.uuid4().hex
    # The subshell exits at once, so the setsid'd sleep is nobody's child by the time the
    # limit runs out: only the environment mark can find it.
    hook(env / "hooks", "slow.sh", """#!/bin/sh
(setsid sleep 1000 &)
sleep 1000 &
echo started
wait
""")
    start = time.monotonic()
    res = pmtool("hook", "run", "slow", "--hooks-dir", str(env / "hooks"),
                 env={"HEADLESS_PM_HOOK_TIMEOUT": "1", "HOOK_TEST_TOKEN": token})
    assert res.code == 124
    assert res.out["timed_out"] is True and res.out["ok"] is False
    assert res.out["exit_code"] == 124  # as timeout(1) says, never the 0 of a killed shell
    assert res.out["stdout"] == "started\n"
    assert time.monotonic() - start < 15
    wait_for(lambda: survivors(token) == [], timeout=60, what="the hook's children to end")


def test_missing_hook_is_skipped(env: Path) -> None:
    res = pmtool("hook", "run", "post_task", "--hooks-dir", str(env / "hooks"))
    assert res.code == 0 and res.out["skipped"] is True and res.out["path"] is None
    # So is a hooks folder that does not exist: hooks are optional.
    res = pmtool("hook", "run", "post_task", "--hooks-dir", str(env / "nowhere"))
    assert res.code == 0 and res.out["skipped"] is True


def test_not_executable_hook_is_an_error_that_says_so(env: Path) -> None:
    path = hook(env / "hooks", "pre_task.sh", "#!/bin/sh\nexit 0\n", mode=0o644)
    res = pmtool("hook", "run", "pre_task", "--hooks-dir", str(env / "hooks"))
    assert res.code == 1
    assert "not executable" in res.out["error"]["message"]
    assert "chmod +x" in res.out["error"]["message"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # pmtool never chmods


def test_hooks_dir_from_the_environment_and_bad_names(env: Path) -> None:
    hook(env / "hooks", "hello", "#!/bin/sh\necho hi\n")
    res = pmtool("hook", "run", "hello", env={"HEADLESS_PM_HOOKS_DIR": str(env / "hooks")})
    assert res.code == 0 and res.out["stdout"] == "hi\n"
    res = pmtool("hook", "run", "../hooks/hello")
    assert res.code == 2


def test_find_hook_order(tmp_path: Path) -> None:
    for name in ("a.sh", "a.py", "b.sh", "b.py", "c.sh"):
        hook(tmp_path, name, "#!/bin/sh\n")
    assert find_hook("a", tmp_path) == tmp_path / "a.py"
    assert find_hook("c", tmp_path) == tmp_path / "c.sh"
    hook(tmp_path, "a", "#!/bin/sh\n")
    assert find_hook("a", tmp_path) == tmp_path / "a"
    assert find_hook("zzz", tmp_path) is None
    (tmp_path / "d").mkdir()
    assert find_hook("d", tmp_path) is None


def test_output_is_capped_and_a_lingering_grandchild_does_not_hang(env: Path) -> None:
    token = uuid.uuid4().hex
    # 200 KiB on stdout, then exit while a background child keeps stdout open.
    hook(env / "hooks", "loud", """#!/bin/sh
head -c 204800 /dev/zero | tr '\\0' x
echo END
sleep 30 &
exit 0
""")
    start = time.monotonic()
    result = run_hook("loud", env / "hooks", {}, timeout=20,
                      env={**os.environ, "HOOK_TEST_TOKEN": token})
    try:
        assert time.monotonic() - start < 10
        assert result.ok is True
        assert len(result.stdout) == OUTPUT_CAP
        assert result.stdout.endswith("xEND\n") and result.stdout_truncated is True
        assert result.left_running  # said, not silently left
    finally:
        for proc in survivors(token):
            proc.kill()


def test_hook_without_shebang_says_why(tmp_path: Path) -> None:
    hook(tmp_path, "bare", "echo no shebang\n")
    result = run_hook("bare", tmp_path, {}, timeout=5)
    assert result.ok is False and "#!" in result.error


def test_a_hook_killed_by_a_signal_reports_128_plus_n(tmp_path: Path) -> None:
    hook(tmp_path, "oom", "#!/bin/sh\necho before\nkill -KILL $$\n")
    result = run_hook("oom", tmp_path, {}, timeout=10)
    assert result.ok is False and result.timed_out is False
    assert result.exit_code == 137 and result.signal == "SIGKILL"
    assert result.stdout == "before\n"


def test_task_context_never_carries_the_key(tmp_path: Path) -> None:
    hook(tmp_path, "ctx", "#!/bin/sh\ncat\n")
    result = run_hook("ctx", tmp_path, task_context(api_key="abcd-secret", task_id=3),
                      timeout=5)
    assert "abcd-secret" not in result.stdout
    assert json.loads(result.stdout)["task_id"] == 3


# -- the shipped example hooks ---------------------------------------------------------------

def test_shipped_hooks_are_executable_python_scripts() -> None:
    for name in ("pre_task.py", "post_task.py", "health_check.py"):
        path = SHIPPED / name
        assert os.access(path, os.X_OK), name
        assert path.read_text().startswith("#!/usr/bin/env python3\n")
    tracked = subprocess.run(["git", "ls-files", "-s", "hooks"], cwd=SHIPPED.parent,
                             capture_output=True, text=True, check=False).stdout
    for line in tracked.splitlines():
        assert line.startswith("100755"), line


def test_shipped_pre_task(env: Path) -> None:
    repo = env / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "init"],
                   check=True)
    fake_claude = hook(env, "claude", "#!/bin/sh\necho 2.0.0\n")
    common = {"PMTOOL_DISK_MIN_FREE_MB": "1"}
    res = pmtool("hook", "run", "pre_task", "--hooks-dir", str(SHIPPED), "--cwd", str(repo),
                 env={**common, "PMTOOL_CLAUDE_BIN": str(fake_claude)})
    assert res.code == 0, res.out
    report = json.loads(res.out["stdout"])
    assert {c["name"] for c in report["checks"]} == {"disk", "git", "claude"}

    res = pmtool("hook", "run", "pre_task", "--hooks-dir", str(SHIPPED), "--cwd", str(repo),
                 env={**common, "PMTOOL_CLAUDE_BIN": str(env / "no-such-claude")})
    assert res.code == 1 and "claude" in res.out["stderr"]

    res = pmtool("hook", "run", "pre_task", "--hooks-dir", str(SHIPPED), "--cwd", str(env),
                 env={**common, "PMTOOL_PRE_TASK_SKIP": "claude"})
    assert res.code == 1 and "not in a git repository" in res.out["stderr"]


def test_shipped_post_task_appends_metrics(env: Path) -> None:
    save_record(env / "state")
    for outcome in ("done", "blocked"):
        res = pmtool("hook", "run", "post_task", "--hooks-dir", str(SHIPPED),
                     "--agent-id", "dev_001", "--input", "-",
                     input=json.dumps({"outcome": outcome, "total_cost_usd": 0.5,
                                       "num_turns": 4}))
        assert res.code == 0, res.out
    lines = (env / "state" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["task_id"] == 7 and first["agent_id"] == "dev_001"
    assert first["outcome"] == "done" and first["num_turns"] == 4
    assert first["title"] == "Add login" and first["branch"] == "feature/login"
    assert json.loads(lines[1])["outcome"] == "blocked"


class _Health(BaseHTTPRequestHandler):
    status = "healthy"

    def do_GET(self) -> None:
        body = json.dumps({"status": self.status, "database": "healthy"}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_shipped_health_check(env: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    common = {"PMTOOL_DISK_MIN_FREE_MB": "1", "PMTOOL_MEMORY_MIN_AVAILABLE_MB": "1"}
    try:
        res = pmtool("hook", "run", "health_check", "--hooks-dir", str(SHIPPED),
                     env={**common, "HEADLESS_PM_API_URL": url})
        assert res.code == 0, res.out
        checks = {c["name"]: c for c in json.loads(res.out["stdout"])["checks"]}
        assert checks["server"]["ok"] is True and checks["disk"]["ok"] is True
    finally:
        server.shutdown()
        server.server_close()
    res = pmtool("hook", "run", "health_check", "--hooks-dir", str(SHIPPED),
                 env={**common, "HEADLESS_PM_API_URL": url})  # now nobody listens
    assert res.code == 1 and "server" in res.out["stderr"]


def test_library_has_no_cli_side_effects() -> None:
    # The library answers; only the CLI prints. Importing it must not pull in typer.
    code = "import sys, pmtool.hooks, pmtool.worktree; print('typer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"

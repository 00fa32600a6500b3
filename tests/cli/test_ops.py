"""The operator's views: `status` (and its `--watch` terminal view), `logs`, `report`, `init`,
the `notify` hook and its bundled examples, and log pruning. Real subprocesses, a stand-in
server, real git, the fake agent (the real claude binary: tests/e2e/test_claude_views.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from helpers import (
    PMTOOL,
    ROOT,
    ago,
    interrupt_at_terminal,
    new_task,
    plain_world,
    pmtool,
    run_args,
)
from pmtool.hooks import NOTIFY_EVENTS, notify, run_hook
from pmtool.records import RecordStore, TaskRecord
from pmtool.state import StateDir, prune_logs
from pmtool.views import status

HOOKS = ROOT / "hooks"


def state_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PMTOOL_STATE_DIR": str(tmp_path / "state"),
            "PMTOOL_CONFIG": os.devnull, **extra}


# ---- report -------------------------------------------------------------------------------


def closed(task_id: int, outcome: str, cost: float, attempts: int, claimed: str, done: str,
           agent: str = "dev_1", model: str = "sonnet", turns: int = 3) -> dict[str, Any]:
    return {"closed_at": done, "claimed_at": claimed, "outcome": outcome, "agent_id": agent,
            "role": "backend_dev", "level": "senior", "model": model, "attempts": attempts,
            "cost_usd": cost, "session_id": "s", "task": {"id": task_id, "title": f"t{task_id}"},
            "steps": [{"at": claimed, "step": "agent_starting"},
                      {"at": done, "step": "agent_finished", "num_turns": turns}]}


def test_report_sums_a_known_history(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    day1, day2 = ago(days=6)[:10], ago(days=5)[:10]
    state.append_history(closed(1, "done", 0.50, 1, f"{day1}T10:00:00Z",
                                f"{day1}T10:10:00Z"))
    state.append_history(closed(2, "done", 1.25, 2, f"{day1}T11:00:00Z",
                                f"{day1}T11:30:00Z", model="opus", turns=7))
    state.append_history(closed(3, "given_back", 0.25, 1, f"{day2}T09:00:00Z",
                                f"{day2}T09:05:00Z", agent="dev_2"))
    state.append_history({"kind": "parked", "task_id": 9, "reason": "needs a person"})
    env = state_env(tmp_path)

    res = pmtool("report", "--by", "outcome", env=env)
    totals = res.out["totals"]
    assert totals["tasks"] == 3 and totals["outcomes"] == {"done": 2, "given_back": 1}
    assert totals["attempts"] == 4 and totals["turns"] == 13
    assert totals["cost_usd"] == pytest.approx(2.0)
    assert totals["agent_s"] == 600 + 1800 + 300
    assert totals["mean_task_s"] == pytest.approx((600 + 1800 + 300) / 3, abs=0.1)
    assert totals["p95_task_s"] == 1800
    groups = {g["key"]: g for g in res.out["groups"]}
    assert groups["done"]["cost_usd"] == pytest.approx(1.75) and groups["done"]["tasks"] == 2
    assert [e["task_id"] for e in res.out["most_expensive"]] == [2, 1, 3]

    by_day = pmtool("report", "--by", "day", "--since", day2,
                    "--html", str(tmp_path / "r.html"), env=env).out
    assert [(g["key"], g["tasks"]) for g in by_day["groups"]] == [(day2, 1)]
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and day2 in page and "<script" not in page

    bad = subprocess.run([PMTOOL, "report", "--since", "yesterday-ish"], env={**os.environ, **env},
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["type"] == "usage"


def test_the_html_report_is_a_page_a_person_reads(tmp_path: Path) -> None:
    """Labels instead of field names, outcomes in words, small costs to two significant
    digits, a chart, and the most expensive tasks, as the terminal view has them."""
    state = StateDir(tmp_path / "state")
    state.append_history(closed(1, "done", 0.00021, 1, ago(hours=3), ago(hours=2, minutes=50)))
    state.append_history(closed(2, "given_back", 1.5, 2, ago(hours=2), ago(hours=1)))
    state.append_history(closed(3, "done", 0.04, 1, ago(minutes=30), ago(minutes=20)))
    page_path = tmp_path / "r.html"
    res = pmtool("report", "--by", "outcome", "--html", str(page_path), env=state_env(tmp_path))
    assert res.code == 0
    page = page_path.read_text()
    for field in ("agent_s", "p95_task_s", "mean_task_s", "cost_usd", "{&#x27;", "{'"):
        assert field not in page, field
    assert "Agent time" in page and "95th percentile" in page
    assert "2 done, 1 given back" in page
    assert "$0.00021" in page and "$1.50" in page and "$0.04" in page and "$0.00<" not in page
    assert "<svg" in page and "<rect" in page and "<script" not in page
    costly = page[page.index("most expensive"):]
    assert costly.index(">t2<") < costly.index(">t3<") < costly.index(">t1<")


# ---- notify -------------------------------------------------------------------------------


def recording_hook(folder: Path, log: Path) -> None:
    folder.mkdir(exist_ok=True)
    hook = folder / "notify.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {log}\n")
    hook.chmod(0o755)


def test_notify_runs_the_hook_once_per_event_with_the_documented_json(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    recording_hook(tmp_path / "hooks", log)
    record = TaskRecord(agent_id="dev_1", role="backend_dev", level="senior",
                        server_url="http://x", task={"id": 42, "title": "Add a ping endpoint"},
                        previous_status="created", cost_usd=1.5)
    for event in NOTIFY_EVENTS:
        result = notify(event, tmp_path / "hooks", record=record, reason="because",
                            outcome="done")
        assert result.ok and not result.skipped, result
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["event"] for c in calls] == list(NOTIFY_EVENTS)
    for call in calls:
        assert {"event", "message", "time", "task_id", "title", "agent_id", "cost_usd",
                "hook"} <= set(call)
        assert call["task_id"] == 42 and call["hook"] == "notify"
    assert calls[0]["message"] == "task 42 (Add a ping endpoint) is parked for a person: because"
    assert calls[2]["message"] == "runner dev_1 stopped on a fatal error: because"
    # No hook: skipped, ok.
    assert notify("fatal", tmp_path / "nohooks").skipped


class _Catcher(BaseHTTPRequestHandler):
    bodies: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).bodies.append((self.headers["Content-Type"],
                                  json.loads(self.rfile.read(length))))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_bundled_webhook_example_posts_slack_json(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Catcher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/T000/B000"
    try:
        ctx = {"event": "parked", "message": "task 7 is parked for a person", "task_id": 7}
        env = {**os.environ, "PMTOOL_NOTIFY_WEBHOOK": url}
        result = run_hook("notify", HOOKS, ctx, env=env)
        assert result.ok, result
        assert _Catcher.bodies == [("application/json",
                                    {"text": "pmtool parked: task 7 is parked for a person"})]
        # `finished` only when asked for; no URL is not a failure.
        assert run_hook("notify", HOOKS, {**ctx, "event": "finished"}, env=env).ok
        assert len(_Catcher.bodies) == 1
        env.pop("PMTOOL_NOTIFY_WEBHOOK")
        quiet = run_hook("notify", HOOKS, ctx, env=env)
        assert quiet.ok and "not set" in quiet.stderr
    finally:
        server.shutdown()
    dead = run_hook("notify", HOOKS, ctx, env={**os.environ, "PMTOOL_NOTIFY_WEBHOOK": url})
    assert not dead.ok and dead.exit_code == 1


def test_bundled_desktop_example_calls_notify_send(tmp_path: Path) -> None:
    hooks, bin_ = tmp_path / "hooks", tmp_path / "bin"
    hooks.mkdir()
    bin_.mkdir()
    (hooks / "notify.py").write_bytes((HOOKS / "notify_desktop.py").read_bytes())
    (hooks / "notify.py").chmod(0o755)
    argv = tmp_path / "argv.json"
    fake = bin_ / "notify-send"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(argv)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    result = run_hook("notify", hooks, {"event": "fatal", "message": "runner dev_1 stopped"},
                      env=env)
    assert result.ok, result
    assert json.loads(argv.read_text()) == ["--app-name=pmtool", "--urgency=critical",
                                            "pmtool: fatal", "runner dev_1 stopped"]
    fake.unlink()
    (bin_ / "python3").symlink_to(sys.executable)  # only python on PATH: no notify-send
    missing = run_hook("notify", hooks, {"event": "fatal"}, env={**env, "PATH": str(bin_)})
    assert not missing.ok and "notify-send" in missing.stderr


# ---- the runner, live ---------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path, make_standin: Callable[..., Any]) -> dict[str, Any]:
    return plain_world(tmp_path, make_standin)


def test_fatal_stop_fires_the_notify_hook_once(world: dict[str, Any]) -> None:
    task = new_task(world)
    hooks = world["tmp"] / "hooks"
    (hooks / "pre_task.sh").write_text("#!/bin/sh\necho 'no GPU here' >&2\nexit 1\n")
    (hooks / "pre_task.sh").chmod(0o755)
    log = world["tmp"] / "notify.jsonl"
    recording_hook(hooks, log)
    from pmtool.testing.fake_agent import command

    # claude is never reached (pre_task stops the run), but the preflight wants one.
    proc = subprocess.run(run_args(world, "--on-hook-failure", "stop", "--agent-cmd",
                                   command()), env=world["env"],
                          cwd=world["repo"], capture_output=True, text=True, timeout=90,
                          check=False)
    assert proc.returncode == 1, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 1
    assert calls[0]["event"] == "fatal" and calls[0]["task_id"] == task["id"]
    assert calls[0]["agent_id"] == "dev_1" and "no GPU here" in calls[0]["message"]


# ---- status --watch on a terminal ---------------------------------------------------------


def live_record(state: Path, agent_id: str = "dev_1", task_id: int = 42) -> None:
    store = RecordStore(state)
    record = TaskRecord(agent_id=agent_id, role="backend_dev", level="senior",
                        server_url="http://x", task={"id": task_id, "title": "Add a ping"},
                        previous_status="created", cost_usd=0.25)
    record.step("agent_running")
    store.save(record)


@pytest.mark.parametrize("no_color", [False, True])
def test_status_watch_redraws_in_place_on_a_terminal(tmp_path: Path, no_color: bool) -> None:
    import pty

    live_record(tmp_path / "state")
    env = {**os.environ, **state_env(tmp_path)}
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([PMTOOL, "status", "--watch", "--interval", "0.2"], env=env,
                            stderr=follower, stdout=subprocess.PIPE, text=True)
    os.close(follower)
    screen, out = interrupt_at_terminal(proc, leader, lambda s: s.count(b"\x1b[H") >= 3,
                                        timeout=20)
    assert screen.count(b"\x1b[H") >= 3, screen
    assert screen.count(b"\x1b[2J") == 1  # cleared once: later frames overwrite in place
    frame = screen.split(b"\x1b[H")[2].decode()
    assert "dev_1" in frame and "42" in frame and "agent" in frame and "$0.2500" in frame
    assert ("\x1b[35m" in frame) is not no_color
    assert proc.returncode == 0
    result = json.loads(out)
    assert result["ok"] and result["runners"][0]["task_id"] == 42


def test_status_lists_dead_runners_parked_tasks_and_sizes(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    live_record(state.root, agent_id="dev_9", task_id=5)
    data = json.loads((state.records_dir / "dev_9.json").read_text())
    data["pid"] = 999999999  # a runner that died
    (state.records_dir / "dev_9.json").write_text(json.dumps(data))
    state.append_event("dev_9", {"ok": True, "event": "claimed", "time": ago(hours=1),
                                 "agent": "dev_9", "task_id": 5})
    for task_id in (11, 12):  # the shape pmtool.work.claim.park leaves: a record closed as parked
        parked = closed(task_id, "parked", 0.1, 3, ago(hours=3), ago(hours=2, minutes=30))
        parked["steps"].append({"at": ago(hours=2, minutes=30), "step": "closed",
                                "outcome": "parked", "cause": "max_attempts",
                                "reason": "3 attempts failed"})
        state.append_history(parked)
    state.append_history(closed(12, "done", 0.2, 1, ago(hours=2),
                                ago(hours=1, minutes=50)))  # a person set 12 back; worked
    (state.logs_dir).mkdir(parents=True)
    (state.logs_dir / "task-5-s.jsonl").write_text("x" * 1000)
    out = pmtool("status", env=state_env(tmp_path)).out
    [row] = out["runners"]
    assert row["agent_id"] == "dev_9" and not row["live"] and row["step"] == "dead"
    assert row["last_event"]["event"] == "claimed"
    assert [(p["task_id"], p["cause"], p["reason"]) for p in out["parked"]] == [
        (11, "max_attempts", "3 attempts failed")]
    assert out["usage"]["logs_bytes"] == 1000


def test_status_drops_a_dead_runner_with_no_record_once_it_has_been_quiet(
        tmp_path: Path) -> None:
    # Runner lock files are never removed (see views.status): a runner that ran here once
    # and holds no task is listed while it has something recent to say, then no more.
    state = StateDir(tmp_path / "state")
    state.runners_dir.mkdir(parents=True)
    for agent in ("dev_old", "dev_recent"):
        (state.runners_dir / f"{agent}.lock").write_text("999999999")  # a dead pid
    state.append_event("dev_old", {"ok": True, "event": "stopped", "time": ago(days=3),
                                   "agent": "dev_old"})
    state.append_event("dev_recent", {"ok": True, "event": "stopped", "time": ago(hours=1),
                                      "agent": "dev_recent"})
    out = pmtool("status", env=state_env(tmp_path)).out
    assert [(r["agent_id"], r["step"]) for r in out["runners"]] == [("dev_recent", "stopped")]
    assert (state.runners_dir / "dev_old.lock").exists()
    # A dead runner with a record is listed however quiet: its task waits for someone.
    live_record(state.root, agent_id="dev_old", task_id=7)
    data = json.loads((state.records_dir / "dev_old.json").read_text())
    data["pid"] = 999999999
    (state.records_dir / "dev_old.json").write_text(json.dumps(data))
    out = pmtool("status", env=state_env(tmp_path)).out
    assert {r["agent_id"]: r["step"] for r in out["runners"]} == {"dev_old": "dead",
                                                                   "dev_recent": "stopped"}


def test_step_follows_the_last_event() -> None:
    cases = {("claimed", None): "claiming", ("idle", None): "polling",
             ("finished", None): "finishing", ("worktree", None): "agent"}
    for (kind, _), step in cases.items():
        assert status.step_of({"event": kind}) == step
    assert status.step_of({"event": "hook", "hook": "pre_task"}) == "pre_task"
    assert status.step_of({"event": "error", "retry_in_s": 3}) == "waiting for the server"
    assert status.step_of({"event": "idle", "cooling_down": True}) == "cooling down"


# ---- pruning and init ---------------------------------------------------------------------


def test_recover_prunes_old_logs_and_keeps_the_history(tmp_path: Path, pm_server: Any) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    old, new = state.logs_dir / "task-1-a.jsonl", state.logs_dir / "task-2-b.jsonl"
    old.write_text("old\n")
    new.write_text("new\n")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    state.append_history(closed(1, "done", 0.1, 1, ago(days=60), ago(days=60, minutes=-1)))
    env = state_env(tmp_path, HEADLESS_PM_API_URL=pm_server.url,
                    HEADLESS_PM_API_KEY=pm_server.api_key)
    res = pmtool("recover", "--dry-run", env=env)  # nothing is deleted on a dry run
    assert old.exists()
    subprocess.run([PMTOOL, "recover"], env={**os.environ, **env}, capture_output=True,
                   check=False, timeout=60)
    assert not old.exists() and new.exists()
    assert len(state.history()) == 1
    assert res.code in (0, 3)
    assert prune_logs(state.root, 0) == {"files": 1, "bytes": 4}


def test_init_into_an_empty_then_a_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "setup"
    res = pmtool("init", str(target), env=state_env(tmp_path))
    names = {str(Path(p).relative_to(target)) for p in res.out["written"]}
    assert {"config.toml", "hooks/notify.py", "hooks/pre_task.py", "scripts/pm-runner.sh",
            "scripts/crontab.example"} <= names
    assert os.access(target / "hooks" / "notify.py", os.X_OK)
    assert os.access(target / "scripts" / "pm-runner.sh", os.X_OK)
    # It has an api_key slot: the owner's alone, from the first byte.
    assert (target / "config.toml").stat().st_mode & 0o777 == 0o600
    config = pmtool("--config", str(target / "config.toml"), "config").out["settings"]
    assert config["hooks_dir"] == {"value": str(target.resolve() / "hooks"), "source": "file"}

    # A folder with other files is fine; one with a file init would write is refused whole.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert pmtool("init", str(other), env=state_env(tmp_path)).code == 0
    (target / "hooks" / "notify.py").write_text("my own\n")
    (target / "config.toml").unlink()
    again = subprocess.run([PMTOOL, "init", str(target)], capture_output=True, text=True,
                           env={**os.environ, **state_env(tmp_path)}, check=False)
    assert again.returncode == 5
    error = json.loads(again.stdout)["error"]
    assert str(target / "hooks" / "notify.py") in error["existing"]
    assert (target / "hooks" / "notify.py").read_text() == "my own\n"
    assert not (target / "config.toml").exists()  # nothing written, not even the free ones


def test_task_log_puts_each_transcript_before_its_agent_event(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    log = state.logs_dir / "task-7-s1.jsonl"
    log.write_text(json.dumps({"type": "system", "subtype": "init", "session_id": "s1"}) + "\n"
                   + '{"type": "result", "subty')  # the agent is still writing this line
    event = {"ok": True, "agent": "dev_1", "task_id": 7}
    state.append_event("dev_1", {**event, "event": "claimed", "time": ago(minutes=10)})
    state.append_event("dev_1", {**event, "event": "claimed", "time": ago(minutes=10, seconds=-1),
                                 "task_id": 8})
    story = status.TaskLog(state.root, 7)
    first = story.read()
    assert [(e["source"], e["line"].get("event") or e["line"].get("type")) for e in first] == [
        ("pmtool", "claimed"), ("claude", "system")]
    with open(log, "a") as fh:
        fh.write('pe": "success", "num_turns": 2, "total_cost_usd": 0.5}\n')
    state.append_event("dev_1", {**event, "event": "agent", "time": ago(minutes=5),
                                 "log": str(log)})
    state.append_event("dev_1", {**event, "event": "finished", "time": ago(minutes=5, seconds=-1)})
    second = story.read()
    assert [e["line"].get("event") or e["line"].get("type") for e in second] == [
        "result", "agent", "finished"]
    assert status.render(second[0]) == ["  result: success, 2 turns, $0.5000, 0.0s"]
    assert story.read() == [] and not story.running()

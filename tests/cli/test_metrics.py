"""Watching runners with Prometheus: `pmtool metrics` (once, from the state folder, or
atomically into a file) and `pmtool run --metrics-addr` (live /metrics and /status). Real
runs against the stand-in server (a real Prometheus scraping a runner of the real claude:
tests/e2e/test_claude_views.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import helpers
from helpers import (
    PMTOOL,
    ago,
    get,
    new_task,
    plain_world,
    pmtool,
    run_args,
    wait_for,
)
from pmtool.records import RecordStore
from pmtool.state import StateDir
from pmtool.testing import fake_agent
from pmtool.views import metrics

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (tests/run.sh installs Debian's "
                             "prometheus package where it runs as root with apt-get)")
ROOT = helpers.ROOT
MANUAL = ROOT / "docs" / "how-to" / "watch.md"  # the metrics table is documented there


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, from the text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    found = 0.0
    for series, value in samples(text).items():
        if series.split("{", 1)[0] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(have.get(k) == v for k, v in labels.items()):
            found += value
    return found


def promtool_check(text: str) -> None:
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def world(tmp_path: Path, make_standin: Callable[..., Any]) -> dict[str, Any]:
    return plain_world(tmp_path, make_standin)


def fake_run(world: dict[str, Any], *extra: str) -> list[str]:
    return run_args(world, "--agent-cmd", fake_agent.command(), *extra)


# ---- pmtool metrics, once ----------------------------------------------------------------


def test_metrics_count_a_real_run_and_write_a_file_atomically(world: dict[str, Any]
                                                              ) -> None:
    task = new_task(world)
    proc = subprocess.run(fake_run(world, "--single-task"), env=world["env"],
                          cwd=world["repo"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(x) for x in proc.stdout.splitlines()]
    cost = sum(e.get("total_cost_usd") or 0 for e in events if e["event"] == "agent")
    assert cost > 0

    out = subprocess.run([PMTOOL, "metrics"], env=world["env"], capture_output=True,
                         check=True).stdout.decode()
    who = {"agent": "dev_1", "role": "backend_dev", "level": "senior"}
    assert total(out, "pmtool_tasks_claimed_total", **who) == 1
    assert total(out, "pmtool_tasks_finished_total", outcome="done", **who) == 1
    assert total(out, "pmtool_claude_runs_total", kind="ok", **who) == 1
    assert total(out, "pmtool_claude_cost_usd_total", **who) == pytest.approx(cost)
    assert total(out, "pmtool_attempts_total", kind="ok", **who) == 1
    role = {"role": "backend_dev", "level": "senior"}  # histograms: per role, not agent
    assert total(out, "pmtool_task_duration_seconds_count", outcome="done", **role) == 1
    assert total(out, "pmtool_step_duration_seconds_count", step="agent", **role) == 1
    assert total(out, "pmtool_step_duration_seconds_count", step="finish", **role) == 1
    assert total(out, "pmtool_agent_state", state="stopped", **who) == 1
    assert total(out, "pmtool_agent_up", **who) == 0
    assert "pmtool_agent_task_id{" not in out  # no task in flight: no series
    finished = next(e for e in events if e["event"] == "finished")
    assert total(out, "pmtool_last_finish_timestamp_seconds", **who) == pytest.approx(
        metrics._ts(finished["time"]))
    assert total(out, "pmtool_daily_spent_usd") == pytest.approx(cost)
    assert f'"{task["id"]}"' not in out  # a task id is never a label

    target = world["tmp"] / "textfile" / "pmtool.prom"
    target.parent.mkdir()
    answer = pmtool("metrics", "--output", str(target), env=world["env"])
    assert answer.code == 0 and answer.out["ok"] and answer.out["output"] == str(target)
    assert target.read_text() == out and answer.out["series"] == len(samples(out))
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["pmtool.prom"]  # no temp left
    if PROMTOOL:
        promtool_check(out)


def test_output_file_is_never_seen_half_written(tmp_path: Path) -> None:
    target = tmp_path / "pmtool.prom"
    big = b"".join(b"pmtool_x{agent=\"a%d\"} 1\n" % i for i in range(20000)) + b"# end\n"
    metrics.write_atomic(target, big)
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(target.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(30):
            metrics.write_atomic(target, big)
    finally:
        stop.set()
        reader.join()
    assert seen and all(data == big for data in seen)


def test_output_into_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    answer = pmtool("metrics", "--output", str(tmp_path / "no" / "such.prom"),
                    env={"PMTOOL_STATE_DIR": str(tmp_path / "state"),
                         "PMTOOL_CONFIG": os.devnull, "PATH": "/usr/bin"})
    assert answer.code == 2 and answer.out["error"]["type"] == "usage"
    assert not (tmp_path / "state").exists()  # a look at no state folder makes none


def test_agent_states_from_the_runner_events(tmp_path: Path) -> None:
    """What each agent is doing, from its last event: paused until, breaker open, fatal."""
    state = StateDir(tmp_path)
    soon = ago(minutes=-30)

    def write(agent: str, kind: str, **data: Any) -> None:
        state.append_event(agent, {"ok": kind != "error", "event": kind, "time": ago(),
                                   "agent": agent, "role": "backend_dev", "level": "senior",
                                   "task_id": None, **data})

    write("a", "paused", reason="rate_limit", until=soon, task_kept=True)
    write("b", "breaker", state="open", until=soon, wait_s=1800)
    write("c", "error", error={"type": "auth", "message": "refused", "fatal": True})
    write("c", "stopped", reason="done", tasks_done=0)
    write("d", "paused", reason="daily_budget", until=ago(minutes=1))  # over already
    store = RecordStore(tmp_path)
    locks = [store.runner_lock(a).acquire() for a in "abd"]  # as a live process holds them
    try:
        text = metrics.Fold(tmp_path, daily_budget_usd=5).render().decode()
    finally:
        for lock in locks:
            lock.release()
    store.runner_lock("c").acquire().release()
    gone = metrics.Fold(tmp_path).render().decode()
    states = {a: s for a in "abcd" for s in metrics.STATES
              if total(gone, "pmtool_agent_state", agent=a, state=s) == 1}
    assert states == {"a": "dead", "b": "dead", "c": "fatal", "d": "dead"}
    assert total(text, "pmtool_daily_budget_usd") == 5
    assert "\npmtool_daily_budget_usd " not in gone  # none set: none shown
    assert total(text, "pmtool_agent_state", agent="a", state="paused") == 1
    assert total(text, "pmtool_agent_state", agent="b", state="breaker_open") == 1
    assert total(text, "pmtool_agent_state", agent="d", state="polling") == 1
    assert total(text, "pmtool_agent_paused_until_timestamp_seconds", agent="a") == \
        pytest.approx(metrics._ts(soon))


def test_a_fold_reads_only_what_was_appended(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    event = {"ok": True, "event": "claimed", "agent": "a", "role": "qa", "level": "senior",
             "task_id": 7, "time": ago()}
    state.append_event("a", event)
    fold = metrics.Fold(tmp_path)
    fold.refresh()
    fold.refresh()
    assert fold.counters["pmtool_tasks_claimed"] == {("a",): 1.0}
    with open(state.events_path("a"), "a") as fh:
        fh.write(json.dumps(event) + "\n" + '{"ok": true, "event": "cla')  # torn last line
    fold.refresh()
    assert fold.counters["pmtool_tasks_claimed"] == {("a",): 2.0}
    with open(state.events_path("a"), "a") as fh:
        fh.write('imed", "agent": "a", "task_id": 8}\n')
    fold.refresh()
    assert fold.counters["pmtool_tasks_claimed"] == {("a",): 3.0}


# ---- pmtool run --metrics-addr -----------------------------------------------------------


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_a_port_in_use_is_a_usage_error_before_any_claim(world: dict[str, Any],
                                                         given: str) -> None:
    task = new_task(world)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        flag = ["--metrics-addr", str(port)] if given == "flag" else []
        env = {**world["env"], "PMTOOL_METRICS_ADDR": str(port)} if not flag else world["env"]
        proc = subprocess.run(fake_run(world, "--single-task", *flag), env=env,
                              cwd=world["repo"], capture_output=True, text=True, timeout=60,
                              check=False)
    assert proc.returncode == 2, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False and f"127.0.0.1:{port}" in answer["error"]["message"]
    assert world["seeder"].get_task(task["id"])["status"] == "created"  # nothing claimed


def test_an_endpoint_that_dies_says_so_and_closes_its_port(tmp_path: Path) -> None:
    said: list[str] = []
    endpoint = metrics.Endpoint("127.0.0.1:0", tmp_path, ["a"], on_error=said.append)
    url = f"http://{endpoint.addr}/metrics"
    endpoint.start()
    assert get(url)[0] == 200

    def broken() -> None:  # what a bug in the serving loop would raise
        raise RuntimeError("the selector broke")

    endpoint.server.service_actions = broken  # type: ignore[method-assign]
    wait_for(lambda: said, timeout=10, what="the endpoint's failure said")
    assert "stopped: RuntimeError: the selector broke" in said[0]
    with pytest.raises(OSError):
        get(url)  # refused at once: Prometheus sees the target down


@pytest.mark.parametrize("addr", ["nonsense", "host:port", "1:99999"])
def test_a_bad_metrics_addr_is_a_usage_error(addr: str) -> None:
    with pytest.raises(metrics.UsageError):
        metrics.parse_addr(addr)


def test_metrics_addr_defaults_to_loopback() -> None:
    assert metrics.parse_addr("9464") == ("127.0.0.1", 9464)
    assert metrics.parse_addr("0.0.0.0:80") == ("0.0.0.0", 80)
    assert metrics.parse_addr("[::1]:9") == ("::1", 9)


def test_live_endpoint_serves_the_agents_of_a_fleet_and_agrees_with_the_command(
        world: dict[str, Any], free_port: int) -> None:
    for _ in range(2):
        new_task(world)
    env = {**world["env"], "PMTOOL_FAKE_AGENT_SLEEP": "1"}
    runner = subprocess.Popen(fake_run(world, "--agents", "2",
                                       "--metrics-addr", str(free_port)),
                              env=env, cwd=world["repo"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{free_port}"
    try:
        def scraped() -> str | None:
            try:
                code, kind, text = get(base + "/metrics")
            except OSError:
                return None
            assert code == 200 and kind.startswith("text/plain")
            done = total(text, "pmtool_tasks_finished_total")
            return text if done == 2 else None

        live = wait_for(scraped, timeout=90, what="both tasks finished in /metrics")
        code, kind, body = get(base + "/status")
        status = json.loads(body)
        assert code == 200 and kind == "application/json" and status["ok"]
        assert {r["agent_id"] for r in status["runners"]} == {"dev_1-1", "dev_1-2"}
        assert set(status) == set(pmtool("status", env=world["env"]).out)  # the same JSON
        with pytest.raises(urllib.error.HTTPError) as missing:
            get(base + "/nothing")
        assert missing.value.code == 404
        runner.terminate()  # stops after the current step, as systemd stops it
        assert runner.wait(timeout=60) == 0, runner.stderr.read()
    finally:
        if runner.poll() is None:
            runner.kill()
    for agent in ("dev_1-1", "dev_1-2"):
        assert total(live, "pmtool_tasks_claimed_total", agent=agent, role="backend_dev") == 1
    # The process's own requests to the server, counted live.
    assert total(live, "pmtool_server_requests_total", result="2xx") > 0
    assert total(live, "pmtool_server_request_duration_seconds_count") == \
        total(live, "pmtool_server_requests_total")
    once = subprocess.run([PMTOOL, "metrics"], env=world["env"], capture_output=True,
                          check=True).stdout.decode()
    for name in ("pmtool_tasks_claimed_total", "pmtool_tasks_finished_total",
                 "pmtool_claude_runs_total", "pmtool_claude_cost_usd_total",
                 "pmtool_task_duration_seconds_count", "pmtool_attempts_total"):
        assert total(live, name) == pytest.approx(total(once, name)), name
    if PROMTOOL:
        promtool_check(live)


# ---- the docs list what is served --------------------------------------------------------


def test_the_manual_lists_every_metric_with_its_labels() -> None:
    text = MANUAL.read_text(encoding="utf-8")
    start = text.index("\n## Metrics\n")
    end = text.find("\n#", start + 10)
    section = text[start:end if end >= 0 else None]
    documented = {}
    for name, labels in re.findall(r"^\| `(pmtool_\w+)` \| [a-z]+ \| ([^|]*) \|", section,
                                   re.M):
        documented[name] = tuple(x.strip(" `") for x in labels.split(",") if x.strip(" `-"))
    served = {}
    for name, (kind, labels, _help) in metrics.METRICS.items():
        served[name + ("_total" if kind == "counter" else "")] = labels
    assert documented == served


def test_starting_run_does_not_import_prometheus_client() -> None:
    proc = subprocess.run([str(Path(PMTOOL).with_name("python")), "-X", "importtime", "-m",
                           "pmtool", "model-for", "--help"], capture_output=True, text=True,
                          check=True)
    assert "prometheus" not in proc.stderr  # -X importtime lists every import on stderr


def test_metrics_go_on_from_what_the_last_run_kept(tmp_path: Path) -> None:
    """cron's `pmtool metrics` reads only what was appended since its last run; a kept
    fold that does not parse is moved aside and everything is read again."""
    from pmtool import failure_policy as fl

    state = StateDir(tmp_path / "state")
    env = {"PMTOOL_STATE_DIR": str(state.root), "PMTOOL_CONFIG": os.devnull,
           "PATH": "/usr/bin:/bin"}

    def claimed(task_id: int) -> None:
        state.append_event("a", {"ok": True, "event": "claimed", "time": ago(), "agent": "a",
                                 "role": "qa", "level": "senior", "task_id": task_id})
        state.append_history(fl.attempt_line({"id": task_id}, "a", outcome="given_back",
                                             kind=fl.TIMEOUT, cost_usd=0.5))

    def once() -> str:
        return subprocess.run([PMTOOL, "metrics"], env=env, capture_output=True,
                              check=True).stdout.decode()

    claimed(1)
    first = once()
    assert total(first, "pmtool_tasks_claimed_total", agent="a") == 1
    assert state.metrics_fold_path.is_file()
    assert once() == first  # nothing new: nothing counted twice
    claimed(2)
    second = once()
    assert total(second, "pmtool_tasks_claimed_total", agent="a") == 2
    assert total(second, "pmtool_give_backs_total", agent="a", kind="timeout") == 2
    assert total(second, "pmtool_daily_spent_usd") == 1.0
    state.events_path("a").unlink()  # logs pruned: a counter does not go back
    assert total(once(), "pmtool_tasks_claimed_total", agent="a") == 2

    state.metrics_fold_path.write_text("{not json")
    claimed(3)
    again = once()  # from the start: the pruned log's claims are gone, the new one counts
    assert total(again, "pmtool_tasks_claimed_total", agent="a") == 1
    assert total(again, "pmtool_attempts_total", agent="a") == 3
    assert [p.name.split(".corrupt-")[0] for p in state.root.glob("*.corrupt-*")] == \
        ["metrics-fold.json"]


def test_metrics_benchmark_smallest(tmp_path: Path) -> None:
    bench = ROOT / "benchmarks" / "metrics.py"
    proc = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True,
                          text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"scrape p95\s+[\d.]+ ms", proc.stdout), proc.stdout
    assert re.search(r"from cron, a minute later \(median\)\s+\d+ ms", proc.stdout)


def test_parked_tasks_agree_with_status_when_a_park_ends_in_the_same_read(
        tmp_path: Path) -> None:
    """A park and the record that shows the task worked again, read in one go: the fold
    must not skip the second line because nothing was parked when it began to read."""
    from pmtool import failure_policy as fl
    from pmtool.views.status import parked_tasks

    state = StateDir(tmp_path)
    state.append_history(fl.park_line({"id": 5}, "a", "3 attempts", cause="max_attempts"))
    state.append_history({"kind": "closed", "closed_at": ago(), "outcome": "done",
                          "agent_id": "a", "task": {"id": 5}})
    state.append_history(fl.park_line({"id": 6}, "a", "blocked on a key", cause="blocked"))
    text = metrics.Fold(tmp_path).render().decode()
    assert [p["task_id"] for p in parked_tasks(state)] == [6]
    assert total(text, "pmtool_tasks_parked") == 1
    assert total(text, "pmtool_tasks_parked", cause="blocked") == 1
    assert total(text, "pmtool_parks_total", agent="a") == 2

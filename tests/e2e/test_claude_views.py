"""The operator views while the REAL claude works: status and logs, Prometheus scraping."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    CLAUDE,
    PMTOOL,
    ROOT,
    get,
    needs_claude,
    new_task,
    plain_world,
    pmtool,
    run_args,
    wait_for,
)
from pmtool.testing.claude_env import claude_env
from pmtool.testing.model_server import Bash, ScriptedModelServer, Structured
from pmtool.views import status


@pytest.fixture
def world(tmp_path: Path, make_standin: Callable[..., Any]) -> dict[str, Any]:
    return plain_world(tmp_path, make_standin)


@needs_claude
@pytest.mark.timeout(150)
def test_status_and_logs_follow_while_claude_works(world: dict[str, Any]) -> None:
    task = new_task(world)
    go = world["tmp"] / "go"
    env = world["env"]
    with ScriptedModelServer() as model:
        env = {**env, **claude_env(model.url, world["tmp"] / "home", max_retries=0),
               "PMTOOL_CLAUDE_BIN": CLAUDE}
        model.set_script([Bash(f"while [ ! -f {go} ]; do sleep 0.1; done; echo waited"),
                          Structured({"outcome": "done", "summary": "Pinged."})])
        runner = subprocess.Popen(run_args(world, "--single-task"), env=env, cwd=world["repo"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        follower = None
        try:
            def working() -> dict[str, Any] | None:
                rows = pmtool("status", env=env).out["runners"]
                return next((r for r in rows if r["step"] == "agent"), None)

            row = wait_for(working, timeout=60, what="the runner in the agent step")
            assert row["agent_id"] == "dev_1" and row["live"] and row["pid"] == runner.pid
            assert row["task_id"] == task["id"] and row["title"] == "Add a ping endpoint"
            assert row["role"] == "backend_dev" and row["task_s"] is not None

            follower = subprocess.Popen([PMTOOL, "logs", str(task["id"]), "--follow", "--raw"],
                                        env=env, stdout=subprocess.PIPE, text=True)
            lines: list[dict[str, Any]] = []
            reader = threading.Thread(
                target=lambda: lines.extend(json.loads(x) for x in follower.stdout), daemon=True)
            reader.start()
            wait_for(lambda: any(x.get("type") == "system" for x in lines), timeout=30,
                     what="the init line")
            assert not any(x.get("type") == "result" for x in lines)  # still running
            go.touch()
            assert runner.wait(timeout=60) == 0, runner.stderr.read()
            assert follower.wait(timeout=30) == 0  # ends when the task ends
            reader.join(timeout=10)
        finally:
            for proc in (runner, follower):
                if proc and proc.poll() is None:
                    proc.kill()
    tools = [b for x in lines if x.get("type") == "assistant"
             for b in x["message"]["content"] if b.get("type") == "tool_use"]
    assert tools and tools[0]["name"] == "Bash"
    assert any(x.get("type") == "result" and x.get("total_cost_usd") for x in lines)
    after = pmtool("status", env=env).out
    assert after["runners"] == [] or all(not r["live"] for r in after["runners"])
    assert after["usage"]["logs_bytes"] > 0
    story = pmtool("logs", str(task["id"]), env=env).out["entries"]
    assert any(e["source"] == "claude" for e in story)
    rendered = [ln for e in story for ln in status.render(e)]
    assert any("-> Bash" in ln for ln in rendered) and any("result:" in ln for ln in rendered)


PROMETHEUS = shutil.which("prometheus")


needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (tests/run.sh installs Debian's "
                               "prometheus package where it runs as root with apt-get)")


@needs_claude
@needs_prometheus
@pytest.mark.timeout(240)
def test_prometheus_scrapes_a_runner_of_real_claude(world: dict[str, Any],
                                                    tmp_path: Path) -> None:
    from helpers import free_port as port_of

    new_task(world)
    target, web = port_of(), port_of()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      f"scrape_configs:\n  - job_name: pmtool\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{target}']\n")
    go = tmp_path / "go"
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runner = None
    try:
        with ScriptedModelServer() as model:
            env = {**world["env"], **claude_env(model.url, tmp_path / "home", max_retries=0),
                   "PMTOOL_CLAUDE_BIN": CLAUDE}
            model.set_script([Bash(f"while [ ! -f {go} ]; do sleep 0.1; done; echo waited"),
                              Structured({"outcome": "done", "summary": "Pinged."})])
            runner = subprocess.Popen(run_args(world, "--metrics-addr", str(target)), env=env,
                                      cwd=world["repo"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)

            def query(expr: str) -> float | None:
                url = (f"http://127.0.0.1:{web}/api/v1/query?query="
                       + urllib.parse.quote(expr))
                try:
                    answer = json.loads(get(url)[2])
                except OSError:
                    return None
                result = answer["data"]["result"]
                return float(result[0]["value"][1]) if result else None

            working = 'pmtool_agent_state{agent="dev_1",state="working"}'
            wait_for(lambda: query(working) == 1, timeout=90,
                     what="Prometheus sees the agent working")
            assert query('pmtool_agent_task_running_seconds{agent="dev_1"}') >= 0
            go.touch()
            done = 'sum(pmtool_tasks_finished_total{agent="dev_1",outcome="done"})'
            wait_for(lambda: query(done) == 1, timeout=90,
                     what="Prometheus sees the finished task")
            cost = wait_for(lambda: query("sum(pmtool_claude_cost_usd_total)"), timeout=30,
                            what="the cost in Prometheus")
            assert cost > 0
            assert query('up{job="pmtool"}') == 1
            # Every query of the Grafana dashboard runs on this Prometheus.
            board = json.loads((ROOT / "deploy" / "grafana" /
                                "pmtool-dashboard.json").read_text())
            for expr in (t["expr"] for p in board["panels"] for t in p["targets"]):
                expr = expr.replace("$instance", ".*").replace("$role", ".*")
                url = (f"http://127.0.0.1:{web}/api/v1/query?query="
                       + urllib.parse.quote(expr))
                assert json.loads(get(url)[2])["status"] == "success", expr
            runner.send_signal(2)
            out, _err = runner.communicate(timeout=60)
            events = [json.loads(x) for x in out.splitlines()]
            spent = sum(e.get("total_cost_usd") or 0 for e in events if e["event"] == "agent")
            assert cost == pytest.approx(spent)
    finally:
        for proc in (runner, prom):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

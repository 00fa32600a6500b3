"""deploy/: the Prometheus alert rules (checked and unit-tested with promtool), the example
Prometheus configuration, the Grafana dashboard and the systemd units stay true to the
metrics pmtool serves and the flags it has."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import PMTOOL
from pmtool.views.metrics import METRICS

DEPLOY = helpers.ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (tests/run.sh installs Debian's "
                             "prometheus package where it runs as root with apt-get)")
SUFFIXES = {"counter": ("_total",), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count")}
SERVED = {name + suffix for name, (kind, _labels, _help) in METRICS.items()
          for suffix in SUFFIXES[kind]}


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> None:
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_alert_rules_are_valid_and_fire_as_their_unit_tests_say() -> None:
    promtool("check", "rules", "pmtool-alerts.yml")
    promtool("test", "rules", "pmtool-alerts.test.yml")
    promtool("check", "config", "prometheus.example.yml")


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bpmtool_[a-z_]+", text))


def test_rules_and_dashboard_name_only_metrics_pmtool_serves() -> None:
    rules = (DEPLOY / "prometheus" / "pmtool-alerts.yml").read_text()
    assert used_metrics(rules) - SERVED == set()
    dashboard = json.loads((DEPLOY / "grafana" / "pmtool-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all(used_metrics(e) for e in exprs)
    assert set().union(*map(used_metrics, exprs)) - SERVED == set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Every alert of the issue has a rule.
    alerts = set(re.findall(r"- alert: (\w+)", rules))
    assert {"PmtoolRunnerDown", "PmtoolTasksParked", "PmtoolBreakerOpen",
            "PmtoolPausedTooLong", "PmtoolNoTaskFinished",
            "PmtoolDailyBudgetNearCap"} <= alerts


def test_dashboard_queries_use_only_labels_pmtool_serves() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "pmtool-dashboard.json").read_text())
    known = {label for _k, labels, _h in METRICS.values() for label in labels}
    known |= {"instance", "job", "le"}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            labels = set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", target["expr"]))
            labels |= {x.strip() for group in re.findall(r"by \(([^)]*)\)", target["expr"])
                       for x in group.split(",")}
            assert labels - known == set(), (panel["title"], target["expr"])


def test_systemd_metrics_unit_runs_a_command_pmtool_has() -> None:
    unit = (DEPLOY / "systemd" / "pmtool-metrics@.service").read_text()
    line = re.search(r"^ExecStart=(.*)$", unit, re.M)[1]
    argv = shlex.split(line)
    assert argv[0] == "%h/.local/bin/pmtool" and argv[1:3] == ["metrics", "--output"]
    help_text = subprocess.run([PMTOOL, "metrics", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--output" in help_text
    for name in re.findall(r"\$\{(\w+)\}", line):
        assert re.search(rf"^Environment={name}=", unit, re.M), name
    timer = (DEPLOY / "systemd" / "pmtool-metrics@.timer").read_text()
    assert "OnCalendar=" in timer and "WantedBy=timers.target" in timer
    agent = DEPLOY / "systemd" / "pmtool-agent@.service"
    assert agent.resolve() == (DEPLOY.parent / "scripts" / "pmtool-agent@.service").resolve()

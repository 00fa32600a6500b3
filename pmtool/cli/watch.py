"""Watching a fleet: `metrics` (Prometheus text from the state folder) and `fleet` (every
agent and task in flight, asked of the server)."""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pmtool.cli import app, emit, options, paint, plural


@app.command("metrics")
def metrics_cmd(
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the metrics to this file (atomically: a reader sees the "
                               "old file or the new one, never half) and print a JSON "
                               "answer, instead of the text on stdout.")] = None,
) -> None:
    """The runners' Prometheus metrics, once, from the state folder (every agent on it).

    Without --output the text format goes to stdout (it is what Prometheus and
    node_exporter read, so this command's stdout is not JSON); with --output the file is
    written and one JSON object is printed. The same metrics as `run --metrics-addr`
    serves, but the requests to the server, which only a live process can count.

    Example: pmtool metrics | grep pmtool_tasks_finished_total

    Example: */1 * * * * pmtool metrics -o /var/lib/prometheus/node-exporter/pmtool.prom
    """
    from pmtool.metrics import metrics_text, write_atomic

    settings = options().settings()
    text = metrics_text(settings.state_path, settings.values.get("daily_budget_usd"))
    if output is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return
    write_atomic(output, text)
    series = sum(1 for line in text.decode().splitlines() if line and line[0] != "#")
    emit({"output": str(output), "bytes": len(text), "series": series})


def fleet_view(result: dict[str, Any]) -> list[str]:
    """The fleet as tables: agents (stale ones marked), parked tasks, the queue."""
    from pmtool.cli.ops import _dur, _table

    c = result["counts"]
    lines = [f"pmtool fleet  {result['time']}  {plural(c['agents'], 'agent')} "
             f"({c['pmtool_agents']} pmtool's), {c['working']} working, "
             f"{c['stale']} stale, {c['parked']} parked, {c['waiting']} waiting", ""]
    rows = [[a["agent_id"], a.get("role") or "-", a.get("level") or "-",
             "yes" if a["pmtool"] else "?", a.get("host") or "-",
             str(a["task_id"]) if a.get("task_id") is not None else "-",
             (a.get("title") or "")[:28], _dur(a.get("task_s")), _dur(a.get("unseen_s")),
             ("STALE, lock drops" if a["stale"] and a.get("task_id") is not None
              else "stale" if a["stale"] else
              f"lock ok {_dur(a['lock_expires_in_s'])}" if a.get("lock_expires_in_s")
              is not None else "")]
            for a in result["agents"]]
    table = _table(["AGENT", "ROLE", "LEVEL", "PMTOOL", "HOST", "TASK", "TITLE", "ON TASK",
                    "UNSEEN", ""], rows)
    lines += table if rows else ["no agents registered"]
    for t in result["orphans"]:
        lines.append(paint(f"under work with no lock: task {t['task_id']} ({t['title']})",
                           "31"))
    for p in result["parked"]:
        lines.append(paint(f"parked: task {p['task_id']} ({p['title']}) "
                           f"[{p.get('cause') or '?'}]: {p['reason']}", "33"))
    queue = [f"{role} {q['waiting']}" for role, q in result["queue"].items() if q["waiting"]]
    lines += ["", "waiting: " + (", ".join(queue) if queue else "nothing")]
    return lines


@app.command("fleet")
def fleet_cmd(
    watch: Annotated[bool, typer.Option(
        "--watch", help="Redraw the tables on the terminal until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between redraws.")] = 5.0,
) -> None:
    """Every agent and task in flight, as the server sees them (any machine, the same key).

    Which agents are pmtool's (from the claim notes pmtool writes), their role, level,
    host, task and how long, their last heartbeat; stale agents whose locks the server
    will drop (unseen 30 minutes), tasks under work with no lock, tasks parked for a
    person with the cause, and the tasks waiting per role. Six filtered requests,
    however long the server's history.

    Example: pmtool fleet | jq '.agents[] | select(.stale)'

    Example: pmtool fleet --watch
    """
    from pmtool.cli.ops import watch_or_print
    from pmtool.cli.options import server
    from pmtool.fleetview import fleet

    client = server(options().settings())
    watch_or_print(lambda: fleet(client), fleet_view, watch, interval, "pmtool fleet")

"""Watching a fleet: `metrics` (Prometheus text from the state folder) and `fleet` (every
agent and task in flight, asked of the server)."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from pmtool.cli import app, emit, options


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

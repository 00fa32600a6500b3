"""The operator's commands: status, logs, report, init, metrics, fleet. JSON on stdout as
always (but `metrics`: Prometheus's text); tables and charts on stderr only when it is a
terminal."""

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from pmtool.cli import app, colour, emit, emit_line, options, paint, plural, say, scrub
from pmtool.cli.options import TaskArg, TaskIdAlias, resolve_task
from pmtool.errors import EXIT_OK, EXIT_SIGINT, UsageError
from pmtool.results import Result
from pmtool.views.status import duration as _dur  # status, logs, report, metrics use it
from pmtool.views.status import usd

if TYPE_CHECKING:
    from pmtool.views.fleet import FleetPicture
    from pmtool.views.status import CostReport, MachineStatus

R = TypeVar("R", bound=Result)  # what a view's fetch answers


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return [paint(line(headers).rstrip(), "1"), *(line(r).rstrip() for r in rows)]


STEP_COLOURS = {"agent": "35", "claiming": "36", "pre_task": "34", "finishing": "32",
                "waiting for the server": "33", "cooling down": "33", "dead": "31",
                "stopped": "2", "polling": "2"}


def status_view(result: "MachineStatus") -> list[str]:
    rows = []
    for r in result.runners:
        last = r.get("last_event") or {}
        title = (r.get("title") or "")[:28]
        rows.append([r["agent_id"], r.get("role") or "-", r.get("level") or "-",
                     str(r.get("pid") or "-"),
                     str(r["task_id"]) if r.get("task_id") is not None else "-", title,
                     r.get("step") or "-", _dur(r.get("task_s")), _dur(r.get("step_s")),
                     f"${r.get('cost_usd') or 0:.4f}",
                     f"{last.get('event', '-')} {str(last.get('time') or '')[11:19]}".strip()])
    lines = [f"pmtool status  {result.time}  {result.live} live of "
             f"{plural(len(result.runners), 'runner')}  ({result.state_dir})", ""]
    table = _table(["AGENT", "ROLE", "LEVEL", "PID", "TASK", "TITLE", "STEP", "ON TASK",
                    "IN STEP", "COST", "LAST EVENT"], rows)
    if colour():  # colour the step cell only, after padding (escapes have no width)
        for i, r in enumerate(result.runners, start=1):
            step = r.get("step") or "-"
            table[i] = table[i].replace(f"  {step}  ",
                                        f"  {paint(step, STEP_COLOURS.get(step, '0'))}  ", 1)
    lines += table if rows else ["no runners on this machine"]
    for kind, label in (("parked", "parked for a person"), ("cooling_down", "cooling down")):
        for e in getattr(result, kind):
            task = e.get("task_id") or (e.get("task") or {}).get("id")
            title = f" ({e['title']})" if e.get("title") else ""
            why = e.get("reason") or (f"until {e['until']}" if e.get("until") else "")
            cause = f" [{e['cause']}]" if e.get("cause") else ""
            lines.append(paint(f"{label}: task {task}{title}: {why}{cause}".rstrip(": "), "33"))
    u = result.usage
    lines += ["", f"logs {_size(u['logs_bytes'])}, events {_size(u['events_bytes'])}, "
                  f"history {_size(u['history_bytes'])}"]
    return lines


@app.command("status")
def status_cmd(
    watch: Annotated[bool, typer.Option(
        "--watch", help="Redraw the table on the terminal until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between redraws.")] = 2.0,
) -> None:
    """Every runner on this machine, live or dead: its task, step, time, cost, last event;
    and tasks parked for a person or cooling down, and the size of the logs.

    Example: pmtool status | jq '.runners[] | select(.live) | {agent_id, task_id, step}'

    Example: pmtool status --watch
    """
    from pmtool.views.status import status

    state = options().settings().state_path
    watch_or_print(lambda: status(state), status_view, watch, interval, "pmtool status")


def watch_or_print(fetch: Callable[[], R], view: Callable[[R], list[str]], watch: bool,
                   interval: float, what: str) -> None:
    """The JSON of `fetch()` (and its `view` on a terminal's stderr); with `watch`, the
    view redrawn in place every `interval` seconds until Ctrl-C, then the last JSON."""
    if not watch:
        result = fetch()
        if sys.stderr.isatty():
            say("\n".join(view(result)))
        emit(result)
        return
    if not sys.stderr.isatty():
        raise UsageError("--watch draws on a terminal, and stderr is not one",
                         hint=f"{what} (without --watch) prints the JSON")
    out = sys.stderr
    out.write("\033[?25l\033[2J")  # hide the cursor, clear once; then redraw in place
    result = fetch()
    try:
        while True:
            lines = [*view(result), "", "(Ctrl-C to stop)"]
            # Home, overwrite each line, clear what is left of it and below: no blank frame.
            out.write("\033[H" + "".join(scrub(ln) + "\033[K\n" for ln in lines) + "\033[J")
            out.flush()
            time.sleep(max(0.2, interval))
            result = fetch()
    except KeyboardInterrupt:
        pass
    finally:
        out.write("\033[?25h")
        out.flush()
    emit(result)


@app.command("logs")
def logs_cmd(
    task: TaskArg = None,
    task_id: TaskIdAlias = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing what is new until the task ends here.")] = False,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Print the JSON lines as written (events and transcripts).")] = False,
) -> int:
    """A task's whole story on this machine: pmtool's events and the agent's transcripts.

    Without --follow: one JSON object with every entry. With --follow or --raw: one JSON
    line per entry (--raw: the lines exactly as written). A readable view (assistant text,
    tool calls, results, cost) goes to stderr on a terminal. Exit 3 when nothing is known.

    Example: pmtool logs 42 --follow

    Example: pmtool logs 42 --raw | jq -c 'select(.type=="result")'
    """
    from pmtool.errors import NothingToDo
    from pmtool.views.status import TaskLog, render

    task = resolve_task(task, task_id)
    if task is None:
        raise UsageError("give a TASK", hint="pmtool logs 42")
    log = TaskLog(options().settings().state_path, task)
    readable = sys.stderr.isatty()
    entries: list[dict[str, Any]] = []
    items = log.follow() if follow else iter(log.read())
    try:
        for item in items:
            if readable:
                for line in render(item):
                    say(line)
            if raw:
                emit_line(item["line"])
            elif follow:
                emit_line({"ok": True, **item})
            else:
                entries.append(item)
    except KeyboardInterrupt:
        return EXIT_SIGINT
    if not follow and not raw:
        if not entries:
            raise NothingToDo(f"no events or transcripts of task {task} on this machine",
                              hint="pmtool status shows the tasks here")
        emit({"task_id": task, "entries": entries})
    return EXIT_OK


@app.command("report")
def report_cmd(
    since: Annotated[str | None, typer.Option(
        help="24h, 7d, or a date such as 2026-11-01 [default: everything].")] = None,
    by: Annotated[str, typer.Option(help="Group by task, agent, model, day or outcome.")
                  ] = "day",
    html: Annotated[Path | None, typer.Option(
        "--html", help="Also write a self-contained page with the chart to this file.")] = None,
) -> None:
    """What the tasks closed on this machine cost: tasks by outcome, attempts, cost, turns,
    agent time, mean and p95 time per task, the most expensive tasks; per group.

    Example: pmtool report --since 24h

    Example: pmtool report --since 7d --by model --html week.html
    """
    from pmtool.views.status import parse_since, report, report_html

    result = report(options().settings().state_path, parse_since(since), by)
    if html:
        try:
            html.write_text(report_html(result))
        except OSError as exc:
            raise UsageError(f"cannot write --html {html}: {exc.strerror}") from None
        result.html = str(html)
    if sys.stderr.isatty():
        say("\n".join(report_view(result)))
    emit(result)


def report_view(result: "CostReport") -> list[str]:
    t = result.totals
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(t["outcomes"].items())) or "none"
    lines = [f"{plural(t['tasks'], 'task')} since "
             f"{result.since or 'the start'}: {outcomes}",
             f"cost {usd(t['cost_usd'])}, {plural(t['attempts'], 'attempt')}, "
             f"{plural(t['turns'], 'turn')}, "
             f"agent time {_dur(t['agent_s'])}, per task mean {_dur(t['mean_task_s'])} "
             f"p95 {_dur(t['p95_task_s'])}", ""]
    groups = result.groups
    peak = max((g["cost_usd"] for g in groups), default=0) or 1
    rows = [[g["key"], str(g["tasks"]), str(g["attempts"]), usd(g["cost_usd"]),
             paint("█" * max(1, round(30 * g["cost_usd"] / peak)), "32")] for g in groups]
    lines += _table([result.by.upper(), "TASKS", "ATTEMPTS", "COST", ""], rows)
    if result.most_expensive:
        lines += ["", "most expensive:"] + [
            f"  task {e['task_id']} {usd(e['cost_usd'])} {e['outcome']} {e.get('title') or ''}"
            .rstrip() for e in result.most_expensive]
    return lines


@app.command("init")
def init_cmd(
    folder: Annotated[Path | None, typer.Argument(
        help="Where to write [default: pmtool's config folder].")] = None,
) -> None:
    """Write a commented config.toml, the example hooks and scripts into a folder.

    Never overwrites: if any of those files exists, nothing is written (exit 5).

    Example: pmtool init ~/pmtool && PMTOOL_CONFIG=~/pmtool/config.toml pmtool config
    """
    from pmtool.config import default_config_path, init

    result = init(folder or default_config_path().parent)
    say(f"wrote {plural(len(result.written), 'file')} into {result.folder}; edit "
        f"{result.config} (hooks_dir points at {result.hooks_dir})")
    emit(result)


# -- watching a fleet: metrics (Prometheus), fleet (the server's view) ------------------


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

    Example: pmtool metrics --output /var/lib/prometheus/node-exporter/pmtool.prom
    """
    from pmtool.views.metrics import metrics_text, write_metrics

    settings = options().settings()
    text = metrics_text(settings.state_path, settings.values.get("daily_budget_usd"))
    if output is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return
    emit(write_metrics(output, text))


def fleet_view(result: "FleetPicture") -> list[str]:
    """The fleet as tables: agents (stale ones marked), parked tasks, the queue."""
    c = result.counts
    lines = [f"pmtool fleet  {result.time}  {plural(c['agents'], 'agent')} "
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
            for a in result.agents]
    table = _table(["AGENT", "ROLE", "LEVEL", "PMTOOL", "HOST", "TASK", "TITLE", "ON TASK",
                    "UNSEEN", ""], rows)
    lines += table if rows else ["no agents registered"]
    for t in result.unlocked:
        lines.append(paint(f"under work with no lock: task {t['task_id']} ({t['title']})",
                           "31"))
    for p in result.parked:
        lines.append(paint(f"parked: task {p['task_id']} ({p['title']}) "
                           f"[{p.get('cause') or '?'}]: {p['reason']}", "33"))
    queue = [f"{role} {q['waiting']}" for role, q in result.queue.items() if q["waiting"]]
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
    from pmtool.cli.options import server
    from pmtool.views.fleet import fleet

    client = server(options().settings())
    watch_or_print(lambda: fleet(client), fleet_view, watch, interval, "pmtool fleet")

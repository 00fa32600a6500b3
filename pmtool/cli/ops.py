"""The operator's commands: status, logs, report, init. JSON on stdout as always; tables
and charts on stderr only when it is a terminal."""

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pmtool.cli import app, colour, emit, emit_line, options, paint, plural, say, scrub
from pmtool.cli.options import TaskArg, TaskIdAlias, resolve_task
from pmtool.errors import EXIT_OK, EXIT_SIGINT, UsageError
from pmtool.ops import duration as _dur  # every command here imports pmtool.ops anyway
from pmtool.ops import usd


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


def status_view(result: dict[str, Any]) -> list[str]:
    rows = []
    for r in result["runners"]:
        last = r.get("last_event") or {}
        title = (r.get("title") or "")[:28]
        rows.append([r["agent_id"], r.get("role") or "-", r.get("level") or "-",
                     str(r.get("pid") or "-"),
                     str(r["task_id"]) if r.get("task_id") is not None else "-", title,
                     r.get("step") or "-", _dur(r.get("task_s")), _dur(r.get("step_s")),
                     f"${r.get('cost_usd') or 0:.4f}",
                     f"{last.get('event', '-')} {str(last.get('time') or '')[11:19]}".strip()])
    lines = [f"pmtool status  {result['time']}  {result['live']} live of "
             f"{plural(len(result['runners']), 'runner')}  ({result['state_dir']})", ""]
    table = _table(["AGENT", "ROLE", "LEVEL", "PID", "TASK", "TITLE", "STEP", "ON TASK",
                    "IN STEP", "COST", "LAST EVENT"], rows)
    if colour():  # colour the step cell only, after padding (escapes have no width)
        for i, r in enumerate(result["runners"], start=1):
            step = r.get("step") or "-"
            table[i] = table[i].replace(f"  {step}  ",
                                        f"  {paint(step, STEP_COLOURS.get(step, '0'))}  ", 1)
    lines += table if rows else ["no runners on this machine"]
    for kind, label in (("parked", "parked for a person"), ("cooling_down", "cooling down")):
        for e in result[kind]:
            task = e.get("task_id") or (e.get("task") or {}).get("id")
            title = f" ({e['title']})" if e.get("title") else ""
            why = e.get("reason") or (f"until {e['until']}" if e.get("until") else "")
            cause = f" [{e['cause']}]" if e.get("cause") else ""
            lines.append(paint(f"{label}: task {task}{title}: {why}{cause}".rstrip(": "), "33"))
    u = result["usage"]
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
    from pmtool.ops import status

    state = options().settings().state_path
    if not watch:
        result = status(state)
        if sys.stderr.isatty():
            say("\n".join(status_view(result)))
        emit(result)
        return
    if not sys.stderr.isatty():
        raise UsageError("--watch draws on a terminal, and stderr is not one",
                         hint="pmtool status (without --watch) prints the JSON")
    out = sys.stderr
    out.write("\033[?25l\033[2J")  # hide the cursor, clear once; then redraw in place
    result = status(state)
    try:
        while True:
            lines = [*status_view(result), "", "(Ctrl-C to stop)"]
            # Home, overwrite each line, clear what is left of it and below: no blank frame.
            out.write("\033[H" + "".join(scrub(ln) + "\033[K\n" for ln in lines) + "\033[J")
            out.flush()
            time.sleep(max(0.2, interval))
            result = status(state)
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
    from pmtool.ops import TaskLog, render

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
    from pmtool.ops import parse_since, report, report_html

    result = report(options().settings().state_path, parse_since(since), by)
    if html:
        try:
            html.write_text(report_html(result))
        except OSError as exc:
            raise UsageError(f"cannot write --html {html}: {exc.strerror}") from None
        result["html"] = str(html)
    if sys.stderr.isatty():
        say("\n".join(report_view(result)))
    emit(result)


def report_view(result: dict[str, Any]) -> list[str]:
    t = result["totals"]
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(t["outcomes"].items())) or "none"
    lines = [f"{plural(t['tasks'], 'task')} since "
             f"{result['since'] or 'the start'}: {outcomes}",
             f"cost {usd(t['cost_usd'])}, {plural(t['attempts'], 'attempt')}, "
             f"{plural(t['turns'], 'turn')}, "
             f"agent time {_dur(t['agent_s'])}, per task mean {_dur(t['mean_task_s'])} "
             f"p95 {_dur(t['p95_task_s'])}", ""]
    groups = result["groups"]
    peak = max((g["cost_usd"] for g in groups), default=0) or 1
    rows = [[g["key"], str(g["tasks"]), str(g["attempts"]), usd(g["cost_usd"]),
             paint("█" * max(1, round(30 * g["cost_usd"] / peak)), "32")] for g in groups]
    lines += _table([result["by"].upper(), "TASKS", "ATTEMPTS", "COST", ""], rows)
    if result["most_expensive"]:
        lines += ["", "most expensive:"] + [
            f"  task {e['task_id']} {usd(e['cost_usd'])} {e['outcome']} {e.get('title') or ''}"
            .rstrip() for e in result["most_expensive"]]
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
    from pmtool.config import default_config_path
    from pmtool.ops import init

    result = init(folder or default_config_path().parent)
    say(f"wrote {plural(len(result['written']), 'file')} into {result['folder']}; edit "
        f"{result['config']} (hooks_dir points at {result['hooks_dir']})")
    emit(result)


"""Commands about pmtool itself and its surroundings: config, model-for, health, sandbox."""

from typing import Annotated

import typer

from pmtool.cli import app, emit, options, read_json_arg, say
from pmtool.errors import UsageError


@app.command("config")
def config_cmd() -> None:
    """Print the resolved settings, each with its source (flag, env, file, default), and
    under "about" what each one is and the environment variables that set it.

    The API key is masked.

    Example: pmtool config --pretty
    """
    from pmtool.config import about

    settings = options().settings()
    emit({"config_file": str(settings.config_path), "settings": settings.public(),
          "about": about()})


@app.command("model-for")
def model_for_cmd(
    level: Annotated[str | None, typer.Argument(help="junior, senior or principal.")] = None,
    task_json: Annotated[str | None, typer.Option(
        "--task-json", help="Read the level from a task's `difficulty` (file or - for stdin).")
    ] = None,
) -> None:
    """Print the claude model for a task level.

    Defaults: junior and senior -> sonnet, principal -> opus (aliases that follow the newest
    model); override with PMTOOL_MODEL_JUNIOR/SENIOR/PRINCIPAL or the config file.

    Example: pmtool model-for principal

    Example: pmtool claim ... | jq .task | pmtool model-for --task-json -
    """
    from pmtool.models import level_of, model_for

    if task_json is not None:
        data = read_json_arg(task_json, "--task-json")
        task = data.get("task", data) if isinstance(data, dict) else data
        level = level_of(task)
    if level is None:
        raise UsageError("give a LEVEL or --task-json", hint="pmtool model-for senior")
    emit(model_for(level, options().settings()))


@app.command("health")
def health_cmd(
    check: Annotated[list[str] | None, typer.Option(
        "--check", help="Run only this check (repeatable): api, auth, disk, memory, claude, "
                        "git, hooks, records, parked, remote.")] = None,
    hooks_dir: Annotated[str | None, typer.Option(
        "--hooks-dir", help="Hooks folder [env HEADLESS_PM_HOOKS_DIR].")] = None,
    repo: Annotated[str | None, typer.Option(
        "--repo", help="The checkout whose remote is checked [default: the current "
                       "directory's].")] = None,
) -> int:
    """Check the server, the key, disk, memory, claude, git, hooks, task records and the
    repository's remote (reachable; takes pushes when push is on).

    Exit 0 when every check passes, 1 when any fails, 4 when only the server is
    unreachable. Runs the `health_check` hook if there is one. Made for cron.

    Example: pmtool health --check api --check disk
    """
    from pmtool.views.health import run_health

    settings = options().settings(hooks_dir=hooks_dir)
    result, code = run_health(settings, check, repo=repo)
    for item in result.failed():
        hint = f" ({item['hint']})" if item.get("hint") else ""
        say(f"pmtool: health: {item['name']} failed: {item['detail']}{hint}")
    emit(result, ok=result.ok)
    return code


sandbox_app = typer.Typer(help="The bundled stand-in Headless PM server, for trying pipelines.",
                          no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("serve")
def sandbox_serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 = any free port).")] = 6969,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Key to accept [default: $HEADLESS_PM_API_KEY or development-key].")
    ] = None,
    dev_keys: Annotated[bool, typer.Option(
        "--dev-keys", help="Also accept development-key and XXXXXX (the real server's "
                           "development mode).")] = False,
    workers: Annotated[int, typer.Option(
        min=1, help="Request threads (uvicorn's pool for sync endpoints).")] = 40,
    race_window: Annotated[float | None, typer.Option(
        min=0, help="Longest pause in seconds between a lock's check and its set, so "
                    "concurrent lockers can all get 200 as on the real server; 0 makes "
                    "locking atomic [default: 0.005].", show_default=False)] = None,
    poll_interval: Annotated[float, typer.Option(
        help="Seconds between checks of a long poll (the real server: 5).")] = 5.0,
    db_pool: Annotated[str, typer.Option(
        help="Database connections: pool size + overflow, or one number.")] = "5+10",
    db_pool_timeout: Annotated[float, typer.Option(
        min=0, help="Seconds a request waits for a connection before it answers 500.")
    ] = 30.0,
    db_latency: Annotated[float, typer.Option(
        min=0, help="Seconds each request holds its database connection.")] = 0.0,
    reset_after_500: Annotated[float | None, typer.Option(
        min=0, max=1, help="Chance that the request after a 500 on the same connection is "
                           "reset [default: 1/3, as measured].", show_default=False)] = None,
    fail_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Share of /api/v1 requests that answer a real-shaped 500.")] = 0.0,
    log: Annotated[bool, typer.Option("--log", help="Log each request on stderr.")] = False,
) -> None:
    """Run the stand-in Headless PM server in the foreground until Ctrl-C.

    Prints one JSON line with its URL when it is ready. Its defaults fail the way the real
    server was measured to (lock races, the database pool, resets after a 500); the same
    switches as `python -m pmtool.testing.server`.

    Example: pmtool sandbox serve --port 6970 &  export HEADLESS_PM_API_URL=http://127.0.0.1:6970

    Example: pmtool sandbox serve --race-window 0 --fail-rate 0.05
    """
    import os
    import threading

    from pmtool.testing.server import (
        DEFAULT_RACE_WINDOW,
        DEFAULT_RESET_AFTER_500,
        StandInServer,
    )

    try:
        pool = sum(int(n) for n in db_pool.split("+"))
    except ValueError:
        raise UsageError(f'--db-pool "{db_pool}": give a number or size+overflow',
                         hint="e.g. --db-pool 5+10") from None
    if pool < 1:
        raise UsageError(f"--db-pool {db_pool}: at least 1 connection")
    key = api_key or os.environ.get("HEADLESS_PM_API_KEY") or "development-key"
    server = StandInServer(
        host=host, port=port, api_key=key, production=not dev_keys, workers=workers,
        poll_check_interval=poll_interval,
        race_window=DEFAULT_RACE_WINDOW if race_window is None else race_window,
        db_pool=pool, db_pool_timeout=db_pool_timeout, db_latency=db_latency,
        reset_after_500=DEFAULT_RESET_AFTER_500 if reset_after_500 is None else reset_after_500,
        fail_rate=fail_rate, log=log).start()
    emit({"url": server.url, "pid": os.getpid(), "race_window": server.race_window,
          "db_pool": server.db_pool, "fail_rate": server.fail_rate})
    say(f"stand-in Headless PM at {server.url} (Ctrl-C stops it)")
    try:
        threading.Event().wait()
    finally:
        server.stop()

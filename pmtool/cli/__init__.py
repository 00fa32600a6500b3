"""The command line: a thin typer layer over the library.

Each command parses its arguments, calls one library function and hands the result to
`emit`. Errors travel up as `PmtoolError` and are turned into the JSON error shape and the
exit-code table in exactly one place: `main` (through `pmtool.errors.exit_code`, which a
command that answers rather than raises uses for its own code).

No module here uses `from __future__ import annotations`: typer reads every registered
command's parameter annotations on each call, and string annotations cost it an eval and a
compile apiece (20 ms of `pmtool --help`). Names imported only for type checking are
quoted where they are used.
"""

import contextlib
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pmtool import __version__
from pmtool.errors import PmtoolError, Stopped, UsageError, exit_code
from pmtool.results import Result, as_json

app = typer.Typer(
    name="pmtool",
    help="Worker-side toolkit for Headless PM: claim tasks safely and run Claude Code on them. "
         "Every command prints one JSON object on stdout (`ok` true or false); progress "
         "and errors go to stderr.\n\n"
         "\b\nExamples:\n"
         "  pmtool demo                       # the whole job on the bundled stand-in\n"
         "  pmtool health                     # is this machine fit to work?\n"
         "  pmtool run --role backend_dev --agent-id dev_001 --repo ~/src/app --single-task\n"
         "  pmtool claim --agent-id dev_001 --role backend_dev | jq .task.id\n\n"
         "Each command's --help has its own examples. The manual (tutorial, how-to "
         "guides, reference, explanation) is the docs/ folder of pmtool's source, "
         "docs/index.md first; `mkdocs serve` shows it as a site.",
    no_args_is_help=True,
    # Turned on in `main` only for root-level calls (`--install-completion`,
    # `--show-completion`, help): building the options imports shellingham.
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Options:
    pretty: bool = False
    emitted: bool = False  # the command printed its one JSON object
    overrides: dict[str, Any] = field(default_factory=dict)
    config: Path | None = None
    warned: set[str] = field(default_factory=set)

    def settings(self, **flags: Any):  # -> pmtool.config.Settings
        from pmtool.config import load_settings

        merged = {**self.overrides, **{k: v for k, v in flags.items() if v is not None}}
        settings = load_settings(merged, self.config, explicit=self.config is not None)
        _secrets.add(settings.api_key)
        for warning in settings.warnings:
            if warning not in self.warned:  # once, however often a command reads them
                self.warned.add(warning)
                say(f"pmtool: {warning}")
        return settings


# Every secret the process has seen; scrubbed from anything printed (the key never
# appears in output, even inside an error message copied from elsewhere).
_secrets: set[str | None] = set()
_state = Options()


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"pmtool {__version__}\n")
        raise typer.Exit()


@app.callback()
def _global(
    pretty: Annotated[bool, typer.Option("--pretty", help="Indent the JSON output.")] = False,
    api_url: Annotated[str | None, typer.Option(
        "--api-url", help="Headless PM base URL [env HEADLESS_PM_API_URL].")] = None,
    state_dir: Annotated[str | None, typer.Option(
        "--state-dir", help="Task records and logs [env PMTOOL_STATE_DIR].")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Config file (TOML) [env PMTOOL_CONFIG].")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Log each request to the server, its status and time, on "
                                "stderr [env PMTOOL_DEBUG=1].")] = False,
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print pmtool's version and exit.")] = False,
) -> None:
    _state.pretty = pretty or _state.pretty
    _state.overrides = {"api_url": api_url, "state_dir": state_dir}
    _state.config = config
    if verbose:  # the client reads it; commands pmtool starts (hooks) inherit it
        os.environ["PMTOOL_DEBUG"] = "1"


def options() -> Options:
    return _state


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<api-key>")
    return text


def emit(result: dict[str, Any] | Result, ok: bool = True) -> None:
    """Print the one JSON object of a command (a result dataclass by its `to_json`)."""
    _state.emitted = True
    payload = {"ok": ok, **as_json(result)}
    text = json.dumps(payload, indent=2 if _state.pretty else None, default=str)
    sys.stdout.write(scrub(text) + "\n")
    sys.stdout.flush()


def emit_line(event: dict[str, Any]) -> None:
    """One JSON object per line, for the event stream of `pmtool run`."""
    sys.stdout.write(scrub(json.dumps(event, default=str)) + "\n")
    sys.stdout.flush()


_ANSI = re.compile(r"\033\[[0-9;]*m")


def colour(stream: Any = None) -> bool:
    """Whether to colour what goes to `stream` (default stderr).

    NO_COLOR (any value) and FORCE_COLOR=0 (or false) turn colour off; FORCE_COLOR set to
    anything else turns it on even into a pipe; otherwise colour only on a terminal that
    is not TERM=dumb. NO_COLOR wins when both are set.
    """
    force = os.environ.get("FORCE_COLOR", "").strip().lower()
    if os.environ.get("NO_COLOR") or force in ("0", "false"):
        return False
    if force:
        return True
    return terminal(stream) and os.environ.get("TERM") != "dumb"


def terminal(stream: Any = None) -> bool:
    """Whether `stream` (default stderr) is a terminal a person watches."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class WaitingLine:
    """One line on a terminal's stderr that says what pmtool waits for, rewritten in
    place; `clear()` takes it away before the command's own lines."""

    def __init__(self, what: str, total: float) -> None:
        self.what, self.total, self.drawn = what, total, False

    def __call__(self, waited: float, left: float) -> None:
        sys.stderr.write(f"\r\033[K{paint('pmtool:', '2')} {self.what}: {waited:.0f}s of "
                         f"{self.total:g}s (Ctrl-C stops)")
        sys.stderr.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def waiting_line(what: str, total: float) -> WaitingLine | None:
    """A WaitingLine when stderr is a terminal and there is a wait; None in a pipe or a
    log, which must not fill with carriage returns."""
    if total <= 0 or not terminal() or os.environ.get("TERM") == "dumb":
        return None
    return WaitingLine(what, total)


def paint(text: str, code: str, stream: Any = None) -> str:
    """`text` in the ANSI colour `code` (e.g. "32"), when `colour(stream)`."""
    return f"\033[{code}m{text}\033[0m" if colour(stream) else text


def say(message: str) -> None:
    """A human line on stderr (colour removed when NO_COLOR asks for none)."""
    if not colour():
        message = _ANSI.sub("", message)
    sys.stderr.write(scrub(message) + "\n")
    sys.stderr.flush()


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 task`, `2 tasks`: messages never say "1 tasks"."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def fail(error: PmtoolError) -> int:
    emit({"error": error.to_json()}, ok=False)
    hint = f" ({error.hint})" if error.hint else ""
    say(f"pmtool: {error.kind}: {error.message}{hint}")
    return error.exit_code


def _stopped(error: Stopped) -> int:
    """A signal stopped the command: its answer, unless it already printed one (`sandbox
    serve` prints its URL first), so that stdout still holds exactly one JSON object."""
    if not _state.emitted:
        return fail(error)
    say(f"pmtool: {error.message}")
    return error.exit_code


def read_json_arg(value: str, what: str) -> Any:
    """Read JSON from a file path or `-` (stdin); bad input is a usage error."""
    try:
        text = sys.stdin.read() if value == "-" else Path(value).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {value}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None


# Which module registers each command. Only that module is imported for a run, and only
# that command is kept: typer builds every registered command's parameters at each call,
# which cost 30 ms for all.
COMMAND_MODULES = {
    "config": "core", "model-for": "core", "health": "core", "sandbox": "core",
    "register": "work", "claim": "work", "lock": "work", "finish": "work", "recover": "work",
    "worktree": "agent_tools", "hook": "agent_tools", "exec-claude": "agent_run",
    "run": "loop", "demo": "loop",
    "status": "ops", "logs": "ops", "report": "ops", "init": "ops", "metrics": "ops",
    "fleet": "ops",
}
_VALUE_OPTIONS = ("--api-url", "--state-dir", "--config")


def command_name(args: list[str]) -> str | None:
    """The subcommand named in `args`, skipping the global options and their values."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


# Every command and group registered so far, whichever ones the last call kept on `app`.
_registered: tuple[list[Any], list[Any]] = ([], [])


def _register_commands(args: list[str]) -> None:
    import importlib

    name = command_name(args)
    module = COMMAND_MODULES.get(name or "")
    importlib.import_module(f"pmtool.cli.{module}" if module else "pmtool.cli.commands")
    # Only the called command is built: its module registers its neighbours too (`claim`
    # brings eight), and typer builds each one's parameters on every call. No command, or
    # an unknown one, keeps them all: the help lists every command.
    on_app: tuple[list[Any], list[Any]] = (app.registered_commands, app.registered_groups)
    for known, now in zip(_registered, on_app, strict=True):
        known.extend(info for info in now if all(info is not k for k in known))
        now[:] = [info for info in known if not module or info.name == name]
    # Completion options only where they are offered: the root, bare or with its options.
    app._add_completion = name is None


class SignalStop(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where the program is, as Ctrl-C raises
    KeyboardInterrupt.

    A KeyboardInterrupt, so it unwinds through the same paths as Ctrl-C: child process
    trees are ended and `finally` blocks run, where SIGTERM's default action would kill
    pmtool at once and leave its children behind. Commands that stop gracefully (`run`,
    `exec-claude`) install their own handlers over these and answer for themselves.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The signals that reached pmtool's own handlers. Kept here because typer turns a
# KeyboardInterrupt that leaves the command into a plain 130 before `main` can see which
# signal it was; a command that catches the interrupt (`status --watch`: Ctrl-C is how it
# ends) answers for itself.
_stopped_by: list[int] = []


def _raise_stop(signum: int, _frame: Any) -> None:
    _stopped_by.append(signum)
    raise SignalStop(signum)


def _stop_on_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, _raise_stop)


COMPLETION_FLAGS = ("--install-completion", "--show-completion")
SHELLS = ("bash", "zsh", "fish")


def _completion(args: list[str]) -> int | None:
    """`--show-completion [SHELL]` and `--install-completion [SHELL]`, answered here:
    typer takes them as flags that detect the shell (a SHELL after one reads as a command
    name), and only on an app built with them, which pmtool's lazily built app is not for
    a call that names anything. None when `args` ask for neither."""
    flags = [a for a in args if a in COMPLETION_FLAGS]
    if not flags:
        return None
    rest = [a for a in args if a not in COMPLETION_FLAGS and a != "--pretty"]
    from typer import _completion_shared as shared

    shell = rest[0] if rest else shared._get_shell_name()
    if len(rest) > 1 or shell not in SHELLS:
        return fail(UsageError(f'{flags[0]}: shell "{shell or "(not detected)"}" is not one '
                               "of " + ", ".join(SHELLS),
                               hint=f"pmtool {flags[0]} bash", valid=list(SHELLS)))
    names = {"prog_name": "pmtool", "complete_var": "_PMTOOL_COMPLETE"}
    if flags[0] == "--show-completion":
        sys.stdout.write(shared.get_completion_script(shell=shell, **names) + "\n")
        return 0
    shell, path = shared.install(shell=shell, **names)
    say(f"pmtool: {shell} completion installed in {path}; it takes effect in a new shell")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the app and applies the one exit-code table."""
    args = sys.argv[1:] if argv is None else argv
    if os.name != "posix":  # fcntl locks, process groups, POSIX signals: a clear word, no trace
        return fail(UsageError("pmtool runs on Linux and macOS only",
                               hint="on Windows, run it in WSL"))
    answered = _completion(args)
    if answered is not None:
        return answered
    _register_commands(args)
    if os.environ.get("PMTOOL_PRETTY") == "1":
        _state.pretty = True
    _stop_on_signals()
    if command_name(args) is None and not any(a.startswith("--") and "-completion" in a
                                              for a in args):
        # No command (`pmtool`, `pmtool --pretty`): the help, not a "missing command" error.
        args = [*args, "--help"]
    try:
        rv = app(args=args, prog_name="pmtool", standalone_mode=False)
    except PmtoolError as exc:
        code = fail(exc)
    except KeyboardInterrupt as exc:
        code = _stopped(Stopped(getattr(exc, "signum", signal.SIGINT)))
    except OSError as exc:  # a folder of pmtool's full, read-only or closed: one JSON answer
        from pmtool.errors import disk_fault

        fault = disk_fault(exc)
        if fault is None:
            raise
        code = fail(fault)
    except Exception as exc:  # typer/click usage errors carry exit_code and format_message
        click_exc: Any = exc  # format_message and exit_code, when it is click's
        if type(exc).__name__ == "NoArgsIsHelpError":
            # A bare `pmtool` (or `pmtool worktree`): the help, once, on stdout; not an error.
            sys.stdout.write(click_exc.format_message() + "\n")
            code = 0
        elif hasattr(exc, "format_message") and getattr(exc, "exit_code", None) is not None:
            if click_exc.exit_code == 0:
                code = 0
            else:
                message = click_exc.format_message()
                ctx = getattr(exc, "ctx", None)
                hint = f"see `{ctx.command_path} --help`" if ctx else "see `pmtool --help`"
                code = fail(UsageError(message, hint=hint))
        elif type(exc).__name__ in ("Exit", "Abort"):
            code = getattr(exc, "exit_code", 1)
        else:
            raise
    else:
        if _stopped_by and rv == 130:  # typer's answer to the interrupt, whichever signal
            code = _stopped(Stopped(_stopped_by[0]))
        else:
            code = rv if isinstance(rv, int) else exit_code(None)
    return code

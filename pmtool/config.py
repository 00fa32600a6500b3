"""Settings: flags beat environment, environment beats the config file, the file beats defaults.

Every setting remembers where its value came from, so `pmtool config` can say why a
value is what it is. The API key is only ever shown masked. `init` writes a set-up folder
to start from: a commented config file of every setting, and the bundled hooks and scripts.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmtool.errors import Conflict, UsageError
from pmtool.results import Result

LEVELS = ("junior", "senior", "principal")
ROLES = ("frontend_dev", "backend_dev", "qa", "architect", "pm")


@dataclass(frozen=True)
class Spec:
    """One setting: its type, default, and the environment names that set it (first wins)."""

    type: type
    default: Any
    env: tuple[str, ...] = ()
    help: str = ""


SPECS: dict[str, Spec] = {
    "api_url": Spec(str, "http://localhost:6969", ("HEADLESS_PM_API_URL",),
                    "Headless PM base URL"),
    "api_key": Spec(str, None, ("HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM"),
                    "API key (sent as X-API-Key)"),
    "worktree_base": Spec(str, None, ("HEADLESS_PM_WORKTREE_BASE",),
                          "where worktrees go (default <repo>/.worktrees)"),
    "hooks_dir": Spec(str, "hooks", ("HEADLESS_PM_HOOKS_DIR",), "where hooks are found"),
    "hook_timeout": Spec(float, 30.0, ("HEADLESS_PM_HOOK_TIMEOUT",), "seconds per hook"),
    "claude_timeout": Spec(float, 600.0, ("HEADLESS_PM_CLAUDE_TIMEOUT",),
                           "seconds per agent run"),
    "health_check_interval": Spec(float, 300.0, ("HEADLESS_PM_HEALTH_CHECK_INTERVAL",),
                                  "seconds between health checks in `run`"),
    "heartbeat": Spec(float, 300.0, ("PMTOOL_HEARTBEAT",),
                      "seconds between re-registrations while an agent works"),
    "http_timeout": Spec(float, 10.0, ("PMTOOL_HTTP_TIMEOUT",), "seconds per server call"),
    "state_dir": Spec(str, None, ("PMTOOL_STATE_DIR",), "task records and logs"),
    "model_junior": Spec(str, "sonnet", ("PMTOOL_MODEL_JUNIOR",), "model for junior tasks"),
    "model_senior": Spec(str, "sonnet", ("PMTOOL_MODEL_SENIOR",), "model for senior tasks"),
    "model_principal": Spec(str, "opus", ("PMTOOL_MODEL_PRINCIPAL",),
                            "model for principal tasks"),
    "claude_bin": Spec(str, None, ("PMTOOL_CLAUDE_BIN",), "path of the claude CLI"),
    "permission_mode": Spec(str, "bypassPermissions", ("PMTOOL_PERMISSION_MODE",),
                            "claude permission mode"),
    "allowed_tools": Spec(str, None, ("PMTOOL_ALLOWED_TOOLS",),
                          "comma-separated tools for claude --allowedTools"),
    "instructions_dir": Spec(str, None, ("PMTOOL_INSTRUCTIONS_DIR",),
                             "folder of per-role instruction files"),
    "disk_min_free_mb": Spec(int, 1024, ("PMTOOL_DISK_MIN_FREE_MB",),
                             "health: least free disk space"),
    "memory_min_available_mb": Spec(int, 256, ("PMTOOL_MEMORY_MIN_AVAILABLE_MB",),
                                    "health: least available memory"),
    # -- run policies (checked by pmtool.settings; `pmtool run` flags of the same names) ----
    "on_agent_failure": Spec(str, "retry", ("PMTOOL_ON_AGENT_FAILURE",),
                             "agent run without a verdict: retry, release or stop"),
    "on_hook_failure": Spec(str, "release", ("PMTOOL_ON_HOOK_FAILURE",),
                            "failing pre_task hook: release, continue or stop"),
    "ask_timeout": Spec(float, 300.0, ("PMTOOL_ASK_TIMEOUT",),
                        "seconds the pre_task question at a terminal waits (0: no limit)"),
    "max_attempts": Spec(int, 3, ("PMTOOL_MAX_ATTEMPTS",), "claims of one task, at most"),
    "retry_cooldown": Spec(float, 60.0, ("PMTOOL_RETRY_COOLDOWN",),
                           "seconds before a given-back task is claimed again"),
    "max_bounces": Spec(int, 3, ("PMTOOL_MAX_BOUNCES",), "QA fails of one task, at most"),
    "max_consecutive_failures": Spec(int, 3, ("PMTOOL_MAX_CONSECUTIVE_FAILURES",),
                                     "failed tasks in a row before a runner backs off"),
    "daily_budget_usd": Spec(float, None, ("PMTOOL_DAILY_BUDGET_USD",),
                             "spend of this machine per day, at most"),
    "max_turns": Spec(int, None, ("PMTOOL_MAX_TURNS",), "claude turns per agent run"),
    "poll_interval": Spec(float, 2.0, ("PMTOOL_POLL_INTERVAL",),
                          "seconds between looks for work, at first"),
    "poll_max": Spec(float, 10.0, ("PMTOOL_POLL_MAX",),
                     "seconds between looks for work, at most"),
    "keep_logs": Spec(float, 30.0, ("PMTOOL_KEEP_LOGS",),
                      "days to keep transcripts and event logs"),
    "leftover": Spec(str, "commit", ("PMTOOL_LEFTOVER",),
                     "uncommitted work left by an agent: commit or rescue"),
    "push": Spec(bool, False, ("PMTOOL_PUSH",), "push task branches"),
    "minor_in_checkout": Spec(bool, False, ("PMTOOL_MINOR_IN_CHECKOUT",),
                              "minor tasks work in the repo's checkout (clean, one at a "
                              "time), not in their own worktree"),
    "pass_key_to_hooks": Spec(bool, False, ("PMTOOL_PASS_KEY_TO_HOOKS",),
                              "hooks get HEADLESS_PM_API_KEY in their environment"),
    "grace": Spec(float, 900.0, ("PMTOOL_GRACE",),
                  "seconds a dead runner's task waits before it is given back"),
    "metrics_addr": Spec(str, None, ("PMTOOL_METRICS_ADDR",),
                         "where `run` serves /metrics and /status: HOST:PORT, or a port "
                         "on 127.0.0.1"),
}


@dataclass
class Settings:
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    # Things a person should hear about once (a key in a file others can read); the CLI
    # prints them on stderr.
    warnings: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def state_path(self) -> Path:
        return Path(self.values["state_dir"]).expanduser()

    def model_for(self, level: str) -> str:
        return self.values[f"model_{level}"]

    def hooks_path(self, repo: str | Path | None = None) -> Path:
        """The hooks folder. A relative one is found where it was written down, never in
        whatever directory pmtool happens to run in: a `--hooks-dir` flag from the current
        directory (as a shell would), a config file's from that file's folder, and the
        environment's or the default `hooks` in the repo (`repo`, else the checkout of the
        current directory)."""
        path = Path(self.values["hooks_dir"]).expanduser()
        if path.is_absolute():
            return path
        source = self.sources.get("hooks_dir", "default")
        if source == "flag":
            return Path.cwd() / path
        if source == "file" and self.config_path is not None:
            return self.config_path.expanduser().parent / path
        if repo is None:
            from pmtool import git

            repo = git.toplevel(Path.cwd())
        return Path(repo or Path.cwd()).expanduser() / path

    def public(self) -> dict[str, Any]:
        """The settings as `pmtool config` shows them: value and source, the key masked."""
        out = {}
        for name, value in self.values.items():
            if name == "api_key" and value:
                value = mask(value)
            out[name] = {"value": value, "source": self.sources.get(name, "default")}
        return out


def about() -> dict[str, dict[str, Any]]:
    """What each setting is and the environment variables that set it (first wins)."""
    return {name: {"help": spec.help, "env": list(spec.env)} for name, spec in SPECS.items()}


def mask(secret: str) -> str:
    return f"<set, {len(secret)} chars>"


def _xdg(variable: str, fallback: str) -> str | None:
    """On Linux, the folder platformdirs would answer, read from the XDG variable without
    importing it (its import costs every command a few ms); None elsewhere."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    base = os.environ.get(variable, "").strip() or os.path.expanduser(fallback)
    return os.path.join(base, "pmtool")


def default_config_path() -> Path:
    env = os.environ.get("PMTOOL_CONFIG")
    if env:
        return Path(env).expanduser()
    folder = _xdg("XDG_CONFIG_HOME", "~/.config")
    if folder is None:
        from platformdirs import user_config_dir

        folder = user_config_dir("pmtool")
    return Path(folder) / "config.toml"


def default_state_dir() -> str:
    folder = _xdg("XDG_STATE_HOME", "~/.local/state")
    if folder is None:
        from platformdirs import user_state_dir

        folder = user_state_dir("pmtool")
    return folder


_KIND = {str: "text", int: "a whole number", float: "a number, 0 or more"}


def _convert(name: str, raw: Any, where: str) -> Any:
    spec = SPECS[name]
    if raw is None:
        return None
    try:
        if spec.type is int and isinstance(raw, str):
            return int(raw.strip())
        if spec.type is bool:  # bool("false") is True: read the word
            return _boolean(raw)
        if spec.type is float:
            value = float(raw)
            if value < 0:
                raise ValueError("negative")
            return value
        return spec.type(raw)
    except (TypeError, ValueError):
        raise UsageError(
            f'{where}: {name} must be {_KIND.get(spec.type, spec.type.__name__)}, got "{raw}"',
            hint=f"fix {where}",
        ) from None


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(word)


def load_file(path: Path, explicit: bool = False) -> dict[str, Any]:
    """Read the TOML config file. A missing default file is empty; a file named on purpose
    (`explicit`: --config, PMTOOL_CONFIG) that is missing, and a malformed one, are exit 2:
    going on with the defaults would claim tasks with settings nobody chose."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not explicit:
            return {}
        raise UsageError(f"config file {path} does not exist",
                         hint="fix the path given to --config or PMTOOL_CONFIG; "
                              "`pmtool init FOLDER` writes one") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")  # TOML is UTF-8, whatever the locale says
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UsageError(f"config file {path} is not UTF-8 text (byte {exc.start}, line "
                         f"{line})", hint="save it as UTF-8; TOML files are UTF-8") from None
    import tomllib  # only when there is a file: start-up matters for every command

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}",
                         hint="fix or move the file; PMTOOL_CONFIG points elsewhere") from None
    unknown = sorted(set(data) - set(SPECS))
    if unknown:
        raise UsageError(f"config file {path} has unknown settings: {', '.join(unknown)}",
                         hint="valid settings: " + ", ".join(SPECS))
    return data


def key_file_warning(path: Path) -> str | None:
    """A line for a config file that holds the key and that others may read (as ssh says
    of a private key); None when it is private."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    return (f"warning: {path} holds the API key and is readable by others "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 {path}")


def load_settings(overrides: dict[str, Any] | None = None,
                  config_path: Path | None = None, explicit: bool = False) -> Settings:
    """Resolve every setting. `overrides` are command-line flags; None means not given.
    `explicit`: `config_path` was named by the user, so it must exist (PMTOOL_CONFIG is
    always taken as named)."""
    if config_path is None and os.environ.get("PMTOOL_CONFIG"):
        explicit = True
    path = config_path or default_config_path()
    file_values = load_file(path, explicit)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, spec in SPECS.items():
        flag = (overrides or {}).get(name)
        env_name = next((e for e in spec.env if os.environ.get(e)), None)
        if flag is not None:
            values[name], sources[name] = _convert(name, flag, "--" + name), "flag"
        elif env_name:
            values[name] = _convert(name, os.environ[env_name], env_name)
            sources[name] = f"env:{env_name}"
        elif name in file_values:
            values[name], sources[name] = _convert(name, file_values[name], str(path)), "file"
        else:
            values[name], sources[name] = spec.default, "default"
    if values["state_dir"] is None:
        values["state_dir"] = default_state_dir()
    values["api_url"] = values["api_url"].rstrip("/")
    warnings = []
    if file_values.get("api_key"):  # warned even when a flag or variable beats it
        warnings = [w for w in (key_file_warning(path),) if w]
    return Settings(values=values, sources=sources, config_path=path, warnings=warnings)


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise UsageError(f'unknown level "{level}"', hint="valid levels: " + ", ".join(LEVELS),
                         valid=list(LEVELS))
    return level


# -- init --------------------------------------------------------------------------------


def examples_dir() -> Path:
    """Where the bundled hooks/ and scripts/ are (package data, or the source checkout)."""
    return Path(__file__).parent / "examples"


def config_text(hooks_dir: Path | None = None) -> str:
    """A commented config file: every setting, its default, the variable that beats it;
    `hooks_dir` set to the hooks written beside it."""
    lines = ["# pmtool configuration (TOML). Flags beat environment variables, which beat",
             "# this file, which beats the defaults. `pmtool config` shows where each",
             "# value comes from. Uncomment what you change.", ""]
    for name, spec in SPECS.items():
        env = f" [env {', '.join(spec.env)}]" if spec.env else ""
        lines.append(f"# {spec.help}{env}")
        if name == "api_key":
            lines.append("# (better in the environment than in a file)")
        default = spec.default
        shown = ('""' if default is None else json.dumps(default) if isinstance(default, str)
                 else repr(default))
        if name == "hooks_dir" and hooks_dir is not None:
            lines += [f"hooks_dir = {json.dumps(str(hooks_dir))}", ""]
        else:
            lines += [f"# {name} = {shown}", ""]
    return "\n".join(lines)


@dataclass
class Initialised(Result):
    """`pmtool init`: the folder written, every file in it, the config and the hooks."""

    folder: str
    written: list[str]
    config: str
    hooks_dir: str


def init(folder: str | Path) -> Initialised:
    """Write config.toml, hooks/ and scripts/ into `folder`; never overwrite a file."""
    root = Path(folder).expanduser()
    source = examples_dir()
    text = config_text(root.resolve() / "hooks").encode()
    plan: dict[Path, tuple[bytes, bool]] = {root / "config.toml": (text, False)}
    for sub in ("hooks", "scripts"):
        for path in sorted((source / sub).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                executable = path.suffix in (".py", ".sh") or bool(path.stat().st_mode & 0o111)
                plan[root / sub / path.name] = (path.read_bytes(), executable)
    existing = sorted(str(p) for p in plan if p.exists() or p.is_symlink())
    if existing:
        raise Conflict(f"{len(existing)} of the files init writes already exist in {root}; "
                       "nothing was written", existing=existing,
                       hint="init into a new folder, or move those files away first")
    for path, (data, executable) in plan.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        # x: never replace a file that appeared meanwhile; the config has an api_key slot,
        # so it is the owner's alone from the start (0600), not after a later chmod.
        mode = 0o600 if path.name == "config.toml" else 0o666
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with open(fd, "wb") as fh:
            fh.write(data)
        if executable:
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return Initialised(folder=str(root), written=[str(p) for p in plan],
                       config=str(root / "config.toml"), hooks_dir=str(root / "hooks"))

"""The output and exit-code contract, configuration precedence, and model-for / health,
through the real console script in subprocesses."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import PMTOOL, ROOT, pmtool, wait_for
from pmtool.client import PMClient
from pmtool.errors import AuthError, ServerError


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No settings leak in from the machine: every source is ours."""
    for name in ("HEADLESS_PM_API_URL", "HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM",
                 "PMTOOL_MODEL_JUNIOR", "PMTOOL_MODEL_SENIOR", "PMTOOL_MODEL_PRINCIPAL",
                 "PMTOOL_CLAUDE_BIN", "HEADLESS_PM_HOOKS_DIR"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.toml").touch()  # named, so it must exist
    monkeypatch.setenv("PMTOOL_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("PMTOOL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


@pytest.mark.parametrize(("level", "model"),
                         [("junior", "sonnet"), ("senior", "sonnet"), ("principal", "opus")])
def test_model_for_defaults(clean_env, level, model):
    r = pmtool("model-for", level)
    assert r.code == 0
    assert r.out == {"ok": True, "level": level, "model": model}


def test_model_for_unknown_level_lists_valid_ones(clean_env):
    r = pmtool("model-for", "staff")
    assert r.code == 2
    assert r.out["error"]["type"] == "usage"
    assert r.out["error"]["valid"] == ["junior", "senior", "principal"]
    assert "staff" in r.stderr


def test_model_for_reads_task_difficulty_from_stdin(clean_env):
    r = pmtool("model-for", "--task-json", "-", input='{"id": 3, "difficulty": "principal"}')
    assert r.out["model"] == "opus"
    r = pmtool("model-for", "--task-json", "-", input="not json")
    assert r.code == 2
    r = pmtool("model-for", "--task-json", "-", input='{"id": 3}')
    assert r.code == 2 and "difficulty" in r.out["error"]["message"]


def test_precedence_flag_env_file_default(clean_env, monkeypatch):
    (clean_env / "config.toml").write_text(
        'api_url = "http://file:1"\nmodel_senior = "file-model"\nhook_timeout = 7\n')
    r = pmtool("config")
    s = r.out["settings"]
    assert vs(s["api_url"]) == {"value": "http://file:1", "source": "file"}
    assert vs(s["hook_timeout"]) == {"value": 7.0, "source": "file"}
    assert vs(s["claude_timeout"]) == {"value": 600.0, "source": "default"}
    assert pmtool("model-for", "senior").out["model"] == "file-model"

    monkeypatch.setenv("HEADLESS_PM_API_URL", "http://env:2")
    monkeypatch.setenv("PMTOOL_MODEL_SENIOR", "env-model")
    s = pmtool("config").out["settings"]
    assert vs(s["api_url"]) == {"value": "http://env:2", "source": "env:HEADLESS_PM_API_URL"}
    assert pmtool("model-for", "senior").out["model"] == "env-model"

    s = pmtool("--api-url", "http://flag:3", "config").out["settings"]
    assert vs(s["api_url"]) == {"value": "http://flag:3", "source": "flag"}


def vs(setting: dict) -> dict:
    """A setting's value and source."""
    return {"value": setting["value"], "source": setting["source"]}


def test_config_shows_what_each_setting_is(clean_env):
    out = pmtool("config").out
    about = out["about"]
    assert about["hook_timeout"] == {"help": "seconds per hook",
                                     "env": ["HEADLESS_PM_HOOK_TIMEOUT"]}
    assert set(about) == set(out["settings"])
    assert all(entry["help"] for entry in about.values())


def test_second_key_variable_and_masking(clean_env, monkeypatch):
    monkeypatch.setenv("API_KEY_HEADLESS_PM", "s3cret-key-value")
    r = pmtool("config")
    key = r.out["settings"]["api_key"]
    assert key["source"] == "env:API_KEY_HEADLESS_PM"
    assert "s3cret" not in r.stdout + r.stderr
    assert key["value"] == "<set, 16 chars>"


@pytest.mark.parametrize("content", ["api_url = ", "[[broken", 'nonsense_key = "x"',
                                     'hook_timeout = "soon"'])
def test_malformed_config_file_is_usage_error(clean_env, content):
    (clean_env / "config.toml").write_text(content)
    r = pmtool("model-for", "senior")
    assert r.code == 2
    assert "config" in r.out["error"]["message"] or "hook_timeout" in r.out["error"]["message"]


def test_a_config_file_that_is_not_utf8_is_a_usage_error(clean_env):
    (clean_env / "config.toml").write_bytes('model_senior = "caf\u00e9"\n'.encode("latin-1"))
    r = pmtool("model-for", "senior")
    assert r.code == 2 and "Traceback" not in r.stderr
    assert "is not UTF-8" in r.out["error"]["message"] and "line 1" in r.out["error"]["message"]


def test_a_named_config_file_that_is_missing_is_a_usage_error(clean_env, monkeypatch):
    """Named by --config or PMTOOL_CONFIG: a typo must not run on the defaults."""
    typo = clean_env / "typo.toml"
    r = pmtool("--config", str(typo), "model-for", "senior")
    assert r.code == 2 and str(typo) in r.out["error"]["message"]
    assert "does not exist" in r.out["error"]["message"]
    monkeypatch.setenv("PMTOOL_CONFIG", str(typo))
    r = pmtool("model-for", "senior")
    assert r.code == 2 and "--config or PMTOOL_CONFIG" in r.out["error"]["hint"]


def test_a_missing_default_config_file_is_fine(clean_env, monkeypatch):
    monkeypatch.delenv("PMTOOL_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(clean_env / "xdg"))  # nothing there
    r = pmtool("config")
    assert r.code == 0
    assert r.out["config_file"] == str(clean_env / "xdg" / "pmtool" / "config.toml")


def test_a_key_in_a_file_others_can_read_is_warned_of_once(clean_env):
    config = clean_env / "config.toml"
    config.write_text('api_key = "s3cret-in-file"\n')
    config.chmod(0o644)
    r = pmtool("config")
    assert r.code == 0
    assert r.stderr.count("readable by others") == 1, r.stderr
    assert f"chmod 600 {config}" in r.stderr and "s3cret" not in r.stderr + r.stdout
    config.chmod(0o600)
    assert "readable by others" not in pmtool("config").stderr
    config.write_text('model_senior = "x"\n')  # no key in it: its mode is its owner's business
    config.chmod(0o644)
    assert "readable by others" not in pmtool("config").stderr


def test_bad_environment_value_is_usage_error(clean_env, monkeypatch):
    monkeypatch.setenv("HEADLESS_PM_HOOK_TIMEOUT", "thirty")
    r = pmtool("config")
    assert r.code == 2 and "HEADLESS_PM_HOOK_TIMEOUT" in r.out["error"]["message"]


@pytest.mark.parametrize("args", [["model-for", "--no-such-flag"], ["no-such-command"],
                                  ["health", "--check"]])
def test_typer_usage_errors_are_json_exit_2(clean_env, args):
    r = pmtool(*args)
    assert r.code == 2
    assert r.out["error"]["type"] == "usage"
    assert "Traceback" not in r.stderr


def test_pretty_indents(clean_env):
    proc = subprocess.run([PMTOOL, "--pretty", "model-for", "junior"], capture_output=True,
                          text=True, check=True)
    assert proc.stdout.startswith("{\n  ")


def test_python_dash_m(clean_env):
    proc = subprocess.run([sys.executable, "-m", "pmtool", "model-for", "principal"],
                          capture_output=True, text=True, check=True)
    assert '"model": "opus"' in proc.stdout


def test_help_explains_with_examples(clean_env):
    proc = subprocess.run([PMTOOL, "model-for", "--help"], capture_output=True, text=True,
                          check=True)
    assert "Example:" in proc.stdout


def _subcommands(*group: str) -> list[str]:
    """The commands `pmtool [GROUP] --help` lists under "Commands:"."""
    text = subprocess.run([PMTOOL, *group, "--help"], capture_output=True, text=True,
                          check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    listed = text.split("Commands:", 1)[1] if "Commands:" in text else ""
    return [line.split()[0] for line in listed.splitlines()
            if line.startswith("  ") and line.split() and not line.startswith("   ")]


def test_every_command_explains_itself_with_an_example(clean_env):
    """The help is the manual at hand: every command a user runs shows how (a group's
    subcommands each, the group itself only lists them)."""
    leaves = []
    for name in _subcommands():
        inner = _subcommands(name)
        leaves += [[name, sub] for sub in inner] if inner else [[name]]
    assert len(leaves) >= 25, leaves
    bare = [" ".join(cmd) for cmd in leaves
            if "Example:" not in subprocess.run([PMTOOL, *cmd, "--help"], capture_output=True,
                                                text=True, check=True).stdout]
    assert bare == []


# -- health ---------------------------------------------------------------------------------

def test_health_local_checks_pass(clean_env):
    r = pmtool("health", "--check", "git", "--check", "disk", "--check", "memory",
               "--check", "records", "--check", "hooks")
    assert r.code == 0, r.out
    assert "error" not in r.out
    assert [c["name"] for c in r.out["checks"]] == ["git", "disk", "memory", "records", "hooks"]


def test_health_failing_check_exits_1(clean_env):
    r = pmtool("health", "--check", "claude", "--check", "git",
               env={"PMTOOL_CLAUDE_BIN": str(clean_env / "no-claude-here")})
    assert r.code == 1
    assert r.out["error"] == {"type": "failed", "message": "unhealthy: claude"}
    claude = r.out["checks"][0]
    assert claude["name"] == "claude" and claude["ok"] is False
    assert r.out["checks"][1]["ok"] is True


def test_health_disk_threshold(clean_env):
    r = pmtool("health", "--check", "disk", env={"PMTOOL_DISK_MIN_FREE_MB": str(10**12)})
    assert r.code == 1 and "low free space" in r.out["checks"][0]["detail"]


def test_health_only_server_unreachable_exits_4(clean_env, free_port):
    r = pmtool("health", "--check", "api", "--check", "auth", "--check", "git",
               env={"HEADLESS_PM_API_URL": f"http://127.0.0.1:{free_port}",
                    "HEADLESS_PM_API_KEY": "k-unreachable"})
    assert r.code == 4
    assert r.out["error"]["type"] == "server"  # exit_code(answer) gives the 4
    assert "cannot reach" in r.out["checks"][0]["detail"]


def test_health_against_server(clean_env, pm_server):
    env = {"HEADLESS_PM_API_URL": pm_server.url, "HEADLESS_PM_API_KEY": pm_server.api_key}
    r = pmtool("health", "--check", "api", "--check", "auth", env=env)
    assert r.code == 0, r.out
    assert r.out["checks"][0]["latency_ms"] >= 0


def test_health_wrong_key_never_shows_it(clean_env, pm_server):
    secret = "wrong-key-0123456789"
    r = pmtool("health", "--check", "auth", "--check", "records",
               env={"HEADLESS_PM_API_URL": pm_server.url, "HEADLESS_PM_API_KEY": secret})
    assert r.code == 1
    assert r.out["checks"][0]["detail"] == "the server rejected the API key"
    assert secret not in r.stdout + r.stderr


def test_health_runs_health_check_hook(clean_env):
    hooks = clean_env / "hooks"
    hooks.mkdir()
    hook = hooks / "health_check.sh"
    hook.write_text("#!/bin/sh\necho 'queue too long' >&2\nexit 3\n")
    hook.chmod(0o755)
    r = pmtool("health", "--hooks-dir", str(hooks),
               env={"HEADLESS_PM_API_URL": "http://127.0.0.1:9", "PMTOOL_CLAUDE_BIN": "true"})
    names = {c["name"]: c for c in r.out["checks"]}
    assert names["hook:health_check"]["ok"] is False
    assert names["hook:health_check"]["detail"] == "queue too long"
    assert r.code == 1


# -- the client's typed errors ----------------------------------------------------------------

def test_client_wrong_key_names_variable_not_key(pm_server):
    client = PMClient(pm_server.url, "definitely-wrong-key")
    with pytest.raises(AuthError) as err:
        client.agents()
    assert err.value.exit_code == 6  # fatal, not the transient 4
    assert "HEADLESS_PM_API_KEY" in err.value.hint
    assert "definitely-wrong-key" not in str(err.value.to_json())


def test_client_unreachable_is_server_error(free_port):
    client = PMClient(f"http://127.0.0.1:{free_port}", "k", retries=1, backoff=0.01)
    with pytest.raises(ServerError) as err:
        client.list_tasks()
    assert err.value.exit_code == 4


def test_client_validation_error_is_usage(pm_server):
    from pmtool.errors import ApiError

    client = PMClient(pm_server.url, pm_server.api_key)
    with pytest.raises(ApiError) as err:
        client.register("contract-agent", "fullstack_dev", "senior")
    assert err.value.exit_code == 2
    assert "backend_dev" in err.value.message


def test_every_command_is_in_the_lazy_registration_map():
    from pmtool.cli import (
        COMMAND_MODULES,
        app,
        command_name,
        commands,  # noqa: F401  (all of them)
    )

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == set(COMMAND_MODULES)
    assert command_name(["--pretty", "--api-url", "http://x", "claim", "--role", "qa"]) == "claim"


def test_help_lists_every_command(clean_env):
    proc = subprocess.run([PMTOOL, "--help"], capture_output=True, text=True, check=True)
    for name in ("claim", "exec-claude", "worktree", "run", "demo", "recover", "health"):
        assert name in proc.stdout


# -- the README and the manual keep up with the CLI (the sqlite-utils way) ---------------------

README = ROOT / "README.md"


def readme_section(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def table_rows(section: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines()
            if line.startswith("|") and not line.startswith("| ---")][1:]


def help_commands(*path: str) -> list[str]:
    """The commands a `--help` lists, from the real console script."""
    out = subprocess.run([PMTOOL, *path, "--help"], capture_output=True, text=True,
                         check=True).stdout
    listing = out.split("\nCommands:\n", 1)[1] if "\nCommands:\n" in out else ""
    return [line.split()[0] for line in listing.splitlines()
            if line.startswith("  ") and not line.startswith("   ")]


def test_every_command_is_in_the_readme_table():
    documented: set[str] = set()
    for row in table_rows(readme_section("The commands")):
        words = row[0].strip("`").split()
        assert words[0] == "pmtool", row
        if len(words) > 2 and re.fullmatch(r"[a-z][a-z/-]*", words[2]):  # sub-commands
            documented.update(f"{words[1]} {sub}" for sub in words[2].split("/"))
        else:
            documented.add(words[1])
    listed = set()
    for name in help_commands():
        subs = help_commands(name)
        listed.update(f"{name} {sub}" for sub in subs) if subs else listed.add(name)
    assert listed, "no commands parsed from `pmtool --help`"
    assert listed - documented == set(), "commands missing from the README's table"
    assert documented - listed == set(), "README documents commands pmtool does not have"


def test_every_exit_code_is_in_the_exit_code_reference():
    """The one exit-code table is docs/reference/exit-codes.md, generated from errors.py
    (`python -m pmtool.cli.reference`); tests/contract/test_docs.py checks it is current."""
    from pmtool import errors

    codes = {value for name, value in vars(errors).items()
             if name.startswith("EXIT_") and isinstance(value, int)}
    page = (README.parent / "docs" / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    table = {int(row[0]): row[2] for row in table_rows(page) if row[0].isdigit()}
    assert set(table) == codes
    kinds = {kind.strip("` ") for types in table.values() for kind in types.split(",")} - {""}
    assert set(errors.KIND_EXIT) | {"stopped"} <= kinds
    for kind, code in errors.KIND_EXIT.items():
        assert kind in table[code], (kind, code)


# -- a CLI that feels finished -----------------------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PMTOOL, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


def test_version():
    import pmtool as package

    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"pmtool {package.__version__}\n"


@pytest.mark.parametrize("args", [[], ["--pretty"], ["worktree"], ["lock"]])
def test_bare_command_prints_help_once_and_exits_0(args):
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Usage: pmtool") == 1
    assert proc.stderr == ""
    assert not proc.stdout.lstrip().startswith("{")


def test_root_help_offers_completion_and_commands_do_not_pay_for_it():
    assert "--install-completion" in run_cli("--help").stdout
    assert "--install-completion" not in run_cli("model-for", "--help").stdout


def test_completion_script_and_completion_itself():
    proc = run_cli("--show-completion", env={"SHELL": "/bin/bash"})
    assert proc.returncode == 0, proc.stderr
    assert "_PMTOOL_COMPLETE=complete_bash" in proc.stdout
    # What bash then asks for: the commands starting with "wor", and a command's options.
    words = run_cli(env={"_PMTOOL_COMPLETE": "complete_bash",
                         "COMP_WORDS": "pmtool wor", "COMP_CWORD": "1"})
    assert words.stdout.split() == ["worktree"]
    words = run_cli(env={"_PMTOOL_COMPLETE": "complete_bash",
                         "COMP_WORDS": "pmtool worktree create --ag", "COMP_CWORD": "3"})
    assert words.stdout.split() == ["--agent-id"]


@pytest.mark.parametrize(("env", "coloured"), [
    ({"FORCE_COLOR": "1"}, True), ({"FORCE_COLOR": "0"}, False), ({}, False),
    ({"NO_COLOR": "1"}, False), ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, False)])
def test_colour_follows_no_color_and_force_color(monkeypatch, env, coloured):
    from pmtool.cli import colour, paint

    for name in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert colour(io.StringIO()) is coloured  # not a terminal
    assert ("\033[" in paint("x", "32", io.StringIO())) is coloured


def test_no_color_on_a_terminal(monkeypatch):
    """On a real terminal colour is on, and NO_COLOR turns it off, also in `say`."""
    import pty

    from pmtool.cli import colour, say

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        assert colour(tty) is True
        monkeypatch.setenv("NO_COLOR", "1")
        assert colour(tty) is False
        monkeypatch.setattr(sys, "stderr", tty)
        say("\033[32mgreen\033[0m words")
    assert os.read(leader, 1024) == b"green words\r\n"
    os.close(leader)


def test_sigterm_stops_a_command_with_143_one_json_answer_and_no_leftovers(clean_env):
    """A hook that would run for a minute: SIGTERM to pmtool ends the hook's process tree
    (where SIGTERM's default action would leave it running) and answers 143."""
    hooks = clean_env / "hooks"
    hooks.mkdir()
    started = clean_env / "started"
    hook = hooks / "slow.sh"
    hook.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {started}.tmp\n"
                    f"mv {started}.tmp {started}\nwait\n")
    hook.chmod(0o755)
    proc = subprocess.Popen([PMTOOL, "hook", "run", "slow", "--hooks-dir", str(hooks),
                             "--timeout", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        sleeper = int(started.read_text())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    answer = json.loads(out)
    assert answer["ok"] is False
    assert answer["error"] == {"type": "stopped", "message": "stopped by SIGTERM",
                               "signal": "SIGTERM"}
    import psutil

    def gone() -> bool:
        try:
            return psutil.Process(sleeper).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, timeout=60, what="the sleeper to end")


def test_exit_code_is_one_function_of_answer_or_error():
    from pmtool.errors import (
        Conflict,
        NothingToDo,
        Stopped,
        TimeLimit,
        exit_code,
    )

    assert exit_code(None) == 0
    assert exit_code({"ok": True}) == 0
    assert exit_code({"ok": False}) == 1
    assert exit_code({"ok": False, "timed_out": True}) == 124
    assert exit_code({"ok": False, "signal": 15}) == 143
    assert exit_code({"ok": False, "error": {"type": "conflict"}}) == 5
    assert exit_code({"ok": False, "error": TimeLimit("x").to_json()}) == 124
    assert exit_code(Conflict("x")) == 5 and exit_code(NothingToDo("x")) == 3
    assert [exit_code(Stopped(n)) for n in (1, 2, 15)] == [129, 130, 143]
    assert exit_code(KeyboardInterrupt()) == 130


def test_task_is_positional_with_task_id_as_alias(clean_env, tmp_path):
    """`worktree create TASK` and `--task-id` name the same task; two different ones are
    refused."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "init"],
                   check=True)
    first = pmtool("worktree", "create", "7", "--branch", "feature/x", "--repo", str(repo))
    assert first.code == 0, first.stderr
    again = pmtool("worktree", "create", "--task-id", "7", "--branch", "feature/x",
                   "--repo", str(repo))
    assert again.code == 0 and again.out["path"] == first.out["path"]
    assert again.out["created"] is False
    clash = pmtool("worktree", "create", "7", "--task-id", "8", "--repo", str(repo))
    assert clash.code == 2 and "different" in clash.out["error"]["message"]
    removed = pmtool("worktree", "remove", "--task-id", "7", "--repo", str(repo))
    assert removed.code == 0, removed.stderr
    assert removed.out["removed"] is True


def test_logs_takes_the_task_as_every_command_does(clean_env):
    """`logs TASK` and `logs --task-id TASK` are the same call; two tasks are refused."""
    positional, alias = pmtool("logs", "9"), pmtool("logs", "--task-id", "9")
    assert positional.code == alias.code == 3
    assert positional.out == alias.out and "task 9" in alias.out["error"]["message"]
    clash = pmtool("logs", "9", "--task-id", "8")
    assert clash.code == 2 and "different" in clash.out["error"]["message"]


def test_messages_count_in_words():
    from pmtool.cli import plural

    assert [plural(n, "task") for n in (0, 1, 2)] == ["0 tasks", "1 task", "2 tasks"]
    assert plural(1, "entry", "entries") == "1 entry"


def test_every_setting_is_explained_in_the_configuration_guide():
    """docs/reference/settings.md is generated; the guide's table, which says what each
    default means, is written by hand and must name every setting too."""
    from pmtool.config import SPECS

    page = README.parent / "docs" / "how-to" / "configure.md"
    rows = [row for row in table_rows(page.read_text(encoding="utf-8")) if row[0].startswith("`")]
    documented = {name.strip("` ") for row in rows for name in row[0].split(",")}
    assert set(SPECS) == documented


def stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run pmtool with stderr on a pseudo-terminal; what it wrote there."""
    import pty
    import threading

    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    clean = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    proc = subprocess.Popen([PMTOOL, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=follower, env={**clean, **env})
    os.close(follower)
    proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks)
    return b"".join(chunks)


def test_no_color_turns_off_the_colour_of_a_real_run(tmp_path):
    """`pmtool demo` colours its progress on a terminal, and not with NO_COLOR."""
    coloured = stderr_on_a_terminal(["demo", "--workdir", str(tmp_path / "a")], {})
    assert b"\033[" in coloured
    plain = stderr_on_a_terminal(["demo", "--workdir", str(tmp_path / "b")], {"NO_COLOR": "1"})
    assert b"\033[" not in plain
    assert b"claimed" in plain


def test_ctrl_c_ends_sandbox_serve_with_130_and_its_one_json_line(free_port):
    proc = subprocess.Popen([PMTOOL, "sandbox", "serve", "--port", str(free_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["url"] == f"http://127.0.0.1:{free_port}"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert rest == ""  # still exactly one JSON object on stdout
    assert "stopped by SIGINT" in err


def test_the_supported_systems_are_said(monkeypatch, capsys):
    """Linux and macOS: in the package's classifiers, the README, and in one line (not a
    traceback from `import fcntl`) on any other system."""
    import tomllib

    from pmtool import cli

    root = ROOT
    classifiers = tomllib.loads((root / "pyproject.toml").read_text())["project"]["classifiers"]
    assert {"Operating System :: POSIX :: Linux", "Operating System :: MacOS"} <= set(
        classifiers)
    assert not any("Windows" in c or c == "Operating System :: OS Independent"
                   for c in classifiers)
    readme = (root / "README.md").read_text()
    assert "runs on Linux and macOS" in readme and "PowerShell" not in readme
    monkeypatch.setattr(cli.os, "name", "nt")
    assert cli.main(["model-for", "senior"]) == 2
    assert "Linux and macOS only" in json.loads(capsys.readouterr().out)["error"]["message"]

"""The output and exit-code contract, configuration precedence, and model-for / health,
through the real console script in subprocesses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import PMTOOL, pmtool
from pmtool.client import PMClient
from pmtool.errors import AuthError, ServerError


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No settings leak in from the machine: every source is ours."""
    for name in ("HEADLESS_PM_API_URL", "HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM",
                 "PMTOOL_MODEL_JUNIOR", "PMTOOL_MODEL_SENIOR", "PMTOOL_MODEL_PRINCIPAL",
                 "PMTOOL_CLAUDE_BIN", "HEADLESS_PM_HOOKS_DIR"):
        monkeypatch.delenv(name, raising=False)
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
    assert s["api_url"] == {"value": "http://file:1", "source": "file"}
    assert s["hook_timeout"] == {"value": 7.0, "source": "file"}
    assert s["claude_timeout"] == {"value": 600.0, "source": "default"}
    assert pmtool("model-for", "senior").out["model"] == "file-model"

    monkeypatch.setenv("HEADLESS_PM_API_URL", "http://env:2")
    monkeypatch.setenv("PMTOOL_MODEL_SENIOR", "env-model")
    s = pmtool("config").out["settings"]
    assert s["api_url"] == {"value": "http://env:2", "source": "env:HEADLESS_PM_API_URL"}
    assert pmtool("model-for", "senior").out["model"] == "env-model"

    s = pmtool("--api-url", "http://flag:3", "config").out["settings"]
    assert s["api_url"] == {"value": "http://flag:3", "source": "flag"}


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


# -- health ---------------------------------------------------------------------------------

def test_health_local_checks_pass(clean_env):
    r = pmtool("health", "--check", "git", "--check", "disk", "--check", "memory",
               "--check", "records", "--check", "hooks")
    assert r.code == 0, r.out
    assert [c["name"] for c in r.out["checks"]] == ["git", "disk", "memory", "records", "hooks"]


def test_health_failing_check_exits_1(clean_env):
    r = pmtool("health", "--check", "claude", "--check", "git",
               env={"PMTOOL_CLAUDE_BIN": str(clean_env / "no-claude-here")})
    assert r.code == 1
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

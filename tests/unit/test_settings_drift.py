"""One source for the defaults of the limits: the config's SPECS. The library's fallback
`Limits()` (a Python caller that passes none) and the runner's `RunOptions()` must say
what `pmtool config` says, or a caller of the library is bounded differently from a user
of the CLI without anyone noticing."""

from __future__ import annotations

import dataclasses

import pytest

from pmtool import failure_policy as fl
from pmtool.config import SPECS, load_settings
from pmtool.run.loop import RunOptions
from pmtool.work.options import limits as limits_from

LIMITS = [f.name for f in dataclasses.fields(fl.Limits) if f.name in SPECS]


def test_every_configurable_limit_is_compared():
    """task_budget_usd is a flag of `run` only (no config key): Limits' None is its default."""
    assert set(LIMITS) >= {"max_attempts", "retry_cooldown", "max_bounces",
                           "max_consecutive_failures", "daily_budget_usd"}
    assert fl.Limits().task_budget_usd is None


@pytest.mark.parametrize("name", LIMITS)
def test_the_library_fallback_limits_are_the_config_defaults(name):
    assert getattr(fl.Limits(), name) == SPECS[name].default


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(RunOptions)
                                  if f.name in SPECS])
def test_the_runner_options_default_to_the_config_defaults(name):
    """None is "the settings decide" (hooks_dir: the settings' folder), never a rival value."""
    value = getattr(RunOptions(agent_id="a", role="backend_dev"), name)
    assert value is None or value == SPECS[name].default


def test_the_builder_from_settings_gives_the_fallback_on_defaults(tmp_path, monkeypatch):
    """limits_from(settings with nothing set) is Limits(): one value, two roads."""
    for spec in SPECS.values():
        for env in spec.env:
            monkeypatch.delenv(env, raising=False)
    settings = load_settings({}, config_path=tmp_path / "none.toml")
    assert limits_from(settings) == fl.Limits()


def test_the_step_limits_from_settings_are_the_fallback_on_defaults(tmp_path, monkeypatch):
    """exec-claude's `next` is bounded as `pmtool run`'s step: StepLimits() on defaults,
    the on_agent_failure setting when set, a given value first."""
    from pmtool.work.options import step_limits

    for spec in SPECS.values():
        for env in spec.env:
            monkeypatch.delenv(env, raising=False)
    settings = load_settings({}, config_path=tmp_path / "none.toml")
    assert step_limits(settings) == fl.StepLimits()
    assert step_limits(settings, escalate=True).escalate is True
    monkeypatch.setenv("PMTOOL_ON_AGENT_FAILURE", "release")
    settings = load_settings({}, config_path=tmp_path / "none.toml")
    assert step_limits(settings).on_failure == "release"


def test_the_agent_options_take_the_settings_unless_given(tmp_path, monkeypatch):
    from pmtool.work.options import agent_options

    monkeypatch.setenv("HEADLESS_PM_CLAUDE_TIMEOUT", "42")
    monkeypatch.setenv("PMTOOL_MAX_TURNS", "7")
    settings = load_settings({}, config_path=tmp_path / "none.toml")
    options = agent_options(settings, model="opus", idle_timeout=None)
    assert (options.timeout, options.max_turns, options.model) == (42.0, 7, "opus")
    assert options.idle_timeout is None
    assert agent_options(settings, timeout=0).timeout == 0


def test_the_finish_plan_keeps_a_hooks_folder_given_and_finds_the_settings_one(tmp_path):
    """The runner's resolved --hooks-dir wins; without one, the settings' folder is found
    in the task's repository (not the directory cron runs in)."""
    from pmtool.work.options import finish_plan, recover_options

    settings = load_settings({}, config_path=tmp_path / "none.toml")
    given = finish_plan(settings, hooks_dir=str(tmp_path / "mine"), push=False)
    assert given.hooks(tmp_path / "repo") == str(tmp_path / "mine") and given.push is False
    found = finish_plan(settings)
    assert found.hooks(tmp_path / "repo") == str(settings.hooks_path(tmp_path / "repo"))
    options = recover_options(settings, dry_run=True, agent_id=None)
    assert (options.dry_run, options.agent_id, options.grace) == (True, None, settings.grace)
    assert options.limits == limits_from(settings) and options.plan is not None

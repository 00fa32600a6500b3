"""The builders of a claim's and a worktree's options read the settings: a value set in the
config file reaches the library, and with nothing set they give what the library's own
defaults give (one value, two roads), as `limits` does (test_settings_drift.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmtool.config import SPECS, Settings, load_settings
from pmtool.work.claim import ClaimOptions
from pmtool.work.options import claim_options, worktree_options
from pmtool.worktree import WorktreeOptions


@pytest.fixture
def settings_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings from a config file with the given lines, no environment in the way."""
    for spec in SPECS.values():
        for env in spec.env:
            monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv("PMTOOL_CONFIG", raising=False)

    def make(text: str = "") -> Settings:
        path = tmp_path / "pmtool.toml"
        path.write_text(text)
        return load_settings({}, config_path=path)

    return make


def test_a_limit_set_in_the_config_reaches_the_claim(settings_from):
    assert claim_options(settings_from()).limits.max_attempts == SPECS["max_attempts"].default
    changed = claim_options(settings_from("max_attempts = 7\nretry_cooldown = 12.5\n"))
    assert (changed.limits.max_attempts, changed.limits.retry_cooldown) == (7, 12.5)


def test_given_values_come_first_and_none_is_not_given(settings_from):
    def seen(waited: float, left: float) -> None:
        return None

    given = claim_options(settings_from(), wait=30, settle=0.5, explain=False, on_wait=seen,
                          register_first=None)
    assert (given.wait, given.settle, given.explain, given.on_wait) == (30, 0.5, False, seen)
    assert given.register_first is True  # None: not given, the default stands


def test_the_claim_builder_on_defaults_is_the_library_default(settings_from):
    assert claim_options(settings_from()) == ClaimOptions()


def test_worktree_settings_in_the_config_reach_the_worktree(settings_from, tmp_path):
    repo = tmp_path / "repo"
    default = worktree_options(settings_from(), repo)
    assert (default.worktree_base, default.hook_timeout, default.minor_in_checkout) == \
        (None, WorktreeOptions().hook_timeout, False)
    assert default.hooks_dir == repo / "hooks"  # the default folder is the repo's
    changed = worktree_options(settings_from(
        'worktree_base = "/srv/trees"\nhook_timeout = 5.0\nminor_in_checkout = true\n'
        'hooks_dir = "my-hooks"\n'), repo, base="develop")
    assert (changed.worktree_base, changed.hook_timeout, changed.minor_in_checkout) == \
        ("/srv/trees", 5.0, True)
    assert changed.hooks_dir == tmp_path / "my-hooks"  # a file's folder is the file's
    assert changed.base == "develop"


def test_a_given_hooks_folder_beats_the_settings(settings_from, tmp_path):
    assert worktree_options(settings_from(), tmp_path, hooks_dir="/x/hooks").hooks_dir \
        == "/x/hooks"

"""pmtool.git, the one door to git: real git for what real git does, pytest-subprocess
(`fp`) only for what a real git on this machine cannot be made to do (be missing, be too
old for worktrees)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pmtool import git, worktree
from pmtool.errors import OperationFailed, UsageError
from pmtool.views import health

OLD_GIT = "git: 'worktree' is not a git command. See 'git --help'.\n"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    path = tmp_path / "repo"
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@x.invalid",
                    "commit", "-q", "--allow-empty", "-m", "first commit"], check=True)
    return path


def test_failures_carry_gits_own_words(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(OperationFailed, match="not a git repository") as caught:
        git.run(tmp_path, "rev-parse", "HEAD")
    assert caught.value.details["git_exit"] != 0
    with pytest.raises(UsageError, match="does not exist"):
        git.run(tmp_path / "missing", "status")
    assert git.current_branch(repo) == "main" and git.current_branch(tmp_path) is None
    assert git.toplevel(repo) == repo.resolve() and git.toplevel(tmp_path) is None
    assert git.last_commit(repo).endswith("first commit")  # type: ignore[union-attr]


def test_git_never_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GIT_TERMINAL_PROMPT", raising=False)
    env = git.git_env({"GIT_EDITOR": "vi"})
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_EDITOR"] == "vi"  # the caller wins


def test_a_hung_git_is_ended_at_its_time_limit(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(git.GitTimeout) as caught:
        git.run(tmp_path, "fetch", timeout=0.5)
    assert caught.value.exit_code == 124


def _missing(process: Any) -> None:
    raise FileNotFoundError(2, "No such file or directory", "git")


def test_git_missing_is_a_clear_error(fp: Any, tmp_path: Path) -> None:
    fp.register(["git", fp.any()], callback=_missing, occurrences=10)
    with pytest.raises(git.GitMissing, match="not installed"):
        git.run(tmp_path, "status")
    with pytest.raises(git.GitMissing):
        worktree.repo_root(tmp_path)
    assert git.current_branch(tmp_path) is None
    check = health.check_git(None)  # type: ignore[arg-type]
    assert check["ok"] is False and "not found" in check["detail"]


def test_git_without_worktree_support(fp: Any, tmp_path: Path) -> None:
    fp.register(["git", "--version"], stdout="git version 2.4.0\n")
    fp.register(["git", "worktree", "-h"], returncode=1, stderr=OLD_GIT)
    check = health.check_git(None)  # type: ignore[arg-type]
    assert check["ok"] is False and "no worktree support" in check["detail"]
    assert check["version"] == "git version 2.4.0"
    for args in (["worktree", "list", "--porcelain", "-z"], ["worktree", "list", "--porcelain"]):
        fp.register(["git", *args], returncode=1, stderr=OLD_GIT)
    with pytest.raises(OperationFailed, match="no `git worktree`") as caught:
        worktree.git_worktrees(tmp_path)
    assert caught.value.hint and "2.20" in caught.value.hint

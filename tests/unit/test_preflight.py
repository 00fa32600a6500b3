"""pmtool.preflight: the problems that would make every task fail, found before a claim,
against the real server and real git repos (with the real claude binary: in tests/e2e/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PMServer

from helpers import (
    ago,
    checks,
    settings_for,
)
from pmtool import preflight as pf
from pmtool.errors import AuthError, ClaudeMissing


def test_key_missing_or_rejected(pm_server: PMServer, tmp_path: Path, repo: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("HEADLESS_PM_API_KEY", "API_KEY_HEADLESS_PM"):
        monkeypatch.delenv(env, raising=False)
    missing = checks(settings_for(pm_server, tmp_path, api_key=None), repo)["key"]
    assert (missing.ok, missing.detail) == (False, "HEADLESS_PM_API_KEY is not set")
    wrong = checks(settings_for(pm_server, tmp_path, api_key="wrong-key"), repo)["key"]
    assert "rejected the key" in wrong.detail and wrong.error is AuthError
    with pytest.raises(AuthError) as exc:
        wrong.raise_it()
    assert exc.value.exit_code == 6 and "wrong-key" not in str(exc.value.to_json())


def test_unreachable_server_is_transient(tmp_path: Path, repo: Path, free_port: int) -> None:
    server = PMServer(f"http://127.0.0.1:{free_port}", "k", is_standin=True)
    key = checks(settings_for(server, tmp_path), repo)["key"]
    assert not key.ok and key.unreachable and key.error is None


def test_claude_missing_or_broken(pm_server: PMServer, tmp_path: Path, repo: Path) -> None:
    missing = checks(settings_for(pm_server, tmp_path, claude_bin=str(tmp_path / "nope")),
                     repo)["claude"]
    assert missing.error is ClaudeMissing and missing.detail.startswith("claude not found")
    assert "PMTOOL_CLAUDE_BIN" in (missing.fix or "")
    broken = tmp_path / "claude"
    broken.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    broken.chmod(0o755)
    bad = checks(settings_for(pm_server, tmp_path, claude_bin=str(broken)), repo)["claude"]
    assert bad.error is ClaudeMissing and "broken" in bad.detail
    skipped = checks(settings_for(pm_server, tmp_path, claude_bin=str(broken)), repo,
                     agent_cmd="python fake.py")["claude"]
    assert skipped.ok


def test_repo_role_level_and_hooks(pm_server: PMServer, tmp_path: Path, repo: Path) -> None:
    settings = settings_for(pm_server, tmp_path, claude_bin=None)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "is not a git repository" in checks(settings, plain)["repo"].detail
    assert "not a folder" in checks(settings, tmp_path / "missing")["repo"].detail
    assert "unknown role" in checks(settings, repo, role="fullstack_dev")["role"].detail
    assert "unknown level" in checks(settings, repo, level="guru")["role"].detail
    # Relative hooks folders are found in the repo, whatever the current directory.
    (repo / "hooks").mkdir()
    (repo / "hooks" / "pre_task").write_text("#!/bin/sh\nexit 0\n")
    hooks = checks(settings, repo, hooks_dir="hooks")["hooks"]
    assert not hooks.ok and "not executable: pre_task" in hooks.detail
    assert f"chmod +x {repo / 'hooks' / 'pre_task'}" in (hooks.fix or "")
    (repo / "hooks" / "pre_task").chmod(0o755)
    found = checks(settings, repo, hooks_dir="hooks")["hooks"]
    assert found.ok and found.detail == (
        f"hooks folder {repo / 'hooks'}: pre_task; not there (skipped): post_task, "
        "worktree_setup, health_check, notify")
    gone = checks(settings, repo, hooks_dir="nohooks", hooks_explicit=True)["hooks"]
    assert not gone.ok and "does not exist" in gone.detail
    assert checks(settings, repo, hooks_dir="nohooks")["hooks"].ok


def test_explain_nothing() -> None:
    def t(i: int, status: str = "created", role: str = "backend_dev",
          difficulty: str = "junior", locked_by: str | None = None) -> dict:
        return {"id": i, "status": status, "target_role": role, "difficulty": difficulty,
                "locked_by": locked_by}

    assert pf.explain_nothing([], "backend_dev", "senior") == [
        "nothing is created or pending for backend_dev"]
    assert pf.explain_nothing([t(8, difficulty="principal")], "backend_dev", "senior")[1] \
        == "no other task is created or pending for backend_dev"
    # The pending tasks may come as a list of their own (why_nothing asks for them apart).
    assert pf.explain_nothing([], "backend_dev", "senior", pending=[t(9, status="pending")]
                              )[0].startswith("1 task(s) for backend_dev are pending")
    why = pf.explain_nothing([t(1, difficulty="principal"), t(2, status="pending"),
                              t(3, role="qa")], "backend_dev", "senior")
    assert why[0].startswith("1 created task(s) for backend_dev are above level senior")
    assert why[1].startswith("1 task(s) for backend_dev are pending")
    until = ago(minutes=-5)
    why = pf.explain_nothing([t(4, locked_by="dev9"), t(5)], "backend_dev", "senior",
                             cooling={5: until})
    assert why == ["1 created task(s) are locked by dev9",
                   "1 task(s) are cooling down on this machine after failed attempts "
                   f"(until #5 {until})"]
    assert pf.explain_nothing([t(6)], "backend_dev", "senior") == []
    assert pf.explain_nothing([t(7, status="dev_done")], "qa", "junior") == []

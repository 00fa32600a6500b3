"""Worktrees: create, remove (with rescue), list and prune, in real git repositories.

Each test builds a scratch repository in a temporary folder and drives it the way a user
would: the console script in a subprocess for the commands, the library for the corners.
What matters is checked in git itself: the branch heads, the rescue ref's files byte for
byte, the main checkout's status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from helpers import ago, pmtool
from pmtool.errors import Conflict, NothingToDo, TaskFault, UsageError
from pmtool.records import RecordStore, TaskRecord
from pmtool.worktree import (
    WorktreeOptions,
    create_worktree,
    default_branch,
    land,
    list_worktrees,
    remove_worktree,
    repo_root,
    rescue,
)

BINARY = bytes(range(256)) * 40 + b"\0\r\n\xff tail"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Git and pmtool see only what the test sets: no global git config, no user settings."""
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "pmtool tests")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "pmtool-tests@example.invalid")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    (tmp_path / "config.toml").touch()  # named, so it must exist
    monkeypatch.setenv("PMTOOL_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("PMTOOL_STATE_DIR", str(tmp_path / "state"))
    for name in ("HEADLESS_PM_WORKTREE_BASE", "HEADLESS_PM_HOOKS_DIR",
                 "HEADLESS_PM_HOOK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def git(cwd: Path | str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def git_bytes(cwd: Path | str, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=True).stdout


@pytest.fixture
def repo(env: Path) -> Path:
    """A project with one commit, an ignored .env in the main checkout."""
    root = env / "project"
    git(env, "init", "-q", "-b", "main", str(root))
    (root / "app.py").write_text("print('hello')\n")
    (root / ".gitignore").write_text(".env\nnode_modules/\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    (root / ".env").write_text("API_TOKEN=from-main-checkout\n")
    return root


def commit_on(path: Path, name: str, text: str) -> str:
    (path / name).write_text(text)
    git(path, "add", name)
    git(path, "commit", "-q", "-m", f"add {name}")
    return git(path, "rev-parse", "HEAD")


def save_record(env: Path, task: dict, agent_id: str = "dev_001",
                worktree: str | None = None) -> TaskRecord:
    record = TaskRecord(agent_id=agent_id, role="backend_dev", level="senior",
                        server_url="http://127.0.0.1:1",
                        task={"title": "t", "difficulty": "senior", **task},
                        previous_status="created", worktree=worktree)
    RecordStore(env / "state").save(record)
    return record


# -- create ------------------------------------------------------------------------------

def test_major_task_gets_a_worktree_on_a_new_branch(repo: Path) -> None:
    res = pmtool("worktree", "create", "--task-id", "7", "--branch", "feature/login",
                 "--repo", str(repo))
    assert res.code == 0, res.out
    path = repo / ".worktrees" / "task-7"
    assert res.out["path"] == str(path) and res.out["worktree"] == str(path)
    assert res.out["created"] is True and res.out["task_id"] == 7
    assert res.out["branch"] == "feature/login" and res.out["base"] == "main"
    assert git(path, "symbolic-ref", "--short", "HEAD") == "feature/login"
    assert git(path, "rev-parse", "HEAD") == git(repo, "rev-parse", "main")
    # .worktrees/ stays out of the main checkout's status, through info/exclude only.
    assert git(repo, "status", "--porcelain") == ""
    assert "/.worktrees/" in (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert ".worktrees" not in (repo / ".gitignore").read_text()

    # Idempotent, and from inside the worktree --repo is not needed.
    again = pmtool("worktree", "create", "--task-id", "7", "--branch", "feature/login",
                   cwd=path)
    assert again.code == 0 and again.out["created"] is False
    assert again.out["path"] == str(path) and again.out["branch"] == "feature/login"
    assert (repo / ".git" / "info" / "exclude").read_text().count("/.worktrees/") == 1


def test_existing_branch_is_reused_with_its_commits(repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "feature/x")
    head = commit_on(repo, "x.txt", "work in progress\n")
    git(repo, "switch", "-q", "main")
    result = create_worktree(repo, 3, "feature/x")
    assert result.created is True and result.branch_source == "existing"
    assert git(result.path, "rev-parse", "HEAD") == head


def test_branch_pushed_by_another_machine_comes_from_origin(env: Path, repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "feature/qa")
    head = commit_on(repo, "dev.txt", "the developer's work\n")
    git(repo, "switch", "-q", "main")
    clone = env / "clone"
    git(env, "clone", "-q", str(repo), str(clone))
    git(clone, "switch", "-q", "-c", "someone-elses-branch")
    # origin's HEAD names the default branch, whatever the main checkout is on.
    assert default_branch(clone) == "main"
    result = create_worktree(clone, 4, "feature/qa")
    assert result.branch_source == "origin/feature/qa" and result.base == "main"
    assert git(result.path, "rev-parse", "HEAD") == head


def test_default_branch_without_a_remote_is_the_checkout_branch(repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "develop")
    assert default_branch(repo) == "develop"


def test_minor_task_gets_its_own_worktree_and_lands_by_fast_forward(repo: Path) -> None:
    (repo / "app.py").write_text("the owner's unsaved edit\n")  # the checkout is dirty
    result = create_worktree(repo, 9, "feature/ignored", complexity="minor",
                             created_at=ago(zone=""))
    path = Path(result.worktree)
    assert path.parent == repo / ".worktrees" and path.name.startswith("task-9-")
    assert result.branch == f"pmtool/{path.name}" and result.lands_on == "main"
    commit_on(path, "fix.txt", "a minor fix\n")
    # The base is checked out in the dirty main checkout: never written to, left for review.
    kept = land(repo, path, "main")
    assert kept.landed is False and "dirty checkout" in kept.reason
    assert (repo / "app.py").read_text() == "the owner's unsaved edit\n"
    assert git(repo, "rev-parse", "main") != kept.head
    # Clean checkout: main is fast-forwarded there, the owner's tree follows.
    git(repo, "checkout", "--", "app.py")
    landed = land(repo, path, "main")
    assert landed.landed is True and git(repo, "rev-parse", "main") == landed.head
    assert (repo / "fix.txt").read_text() == "a minor fix\n"
    assert git(repo, "status", "--porcelain") == ""
    removed = remove_worktree(repo, path, delete_branch=True, base="main")
    assert removed.removed and removed.branch_deleted


def test_minor_task_left_on_its_branch_when_the_base_moved_on(repo: Path) -> None:
    result = create_worktree(repo, 10, None, complexity="minor")
    path = Path(result.worktree)
    commit_on(path, "fix.txt", "a minor fix\n")
    commit_on(repo, "other.txt", "someone else landed first\n")
    kept = land(repo, path, "main")
    assert kept.landed is False and "moved on" in kept.reason
    assert kept.branch == result.branch
    # Nothing of the task's reached main, nothing of it is lost.
    assert git(repo, "cat-file", "-t", f"{kept.branch}:fix.txt") == "blob"
    assert not (repo / "fix.txt").exists()


def test_minor_lands_on_a_base_nobody_has_checked_out(repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "elsewhere")
    result = create_worktree(repo, 11, None, options=WorktreeOptions(base="main"),
                             complexity="minor")
    head = commit_on(Path(result.worktree), "fix.txt", "x\n")
    assert land(repo, result.worktree, "main").landed is True
    assert git(repo, "rev-parse", "main") == head
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "elsewhere"


def test_minor_in_checkout_only_when_clean_and_one_task_at_a_time(repo: Path) -> None:
    result = create_worktree(repo, 9, None, options=WorktreeOptions(minor_in_checkout=True),
                             complexity="minor")
    assert result.worktree is None and result.path == str(repo)
    assert result.branch == "main" and result.in_checkout is True
    assert not (repo / ".worktrees").exists()
    # Another task, while task 9 (this process) holds it: refused.
    with pytest.raises(Conflict) as err:
        create_worktree(repo, 12, None, options=WorktreeOptions(minor_in_checkout=True),
                        complexity="minor")
    assert err.value.details["checkout_in_use"] and err.value.details["held_by_task"] == 9
    # The same task again is fine (a resume).
    create_worktree(repo, 9, None, options=WorktreeOptions(minor_in_checkout=True),
                    complexity="minor")
    removed = remove_worktree(repo, 9)
    assert removed.checkout_released is True
    create_worktree(repo, 12, None, options=WorktreeOptions(minor_in_checkout=True),
                    complexity="minor")
    remove_worktree(repo, 12)
    # A dirty checkout is never worked in.
    (repo / "app.py").write_text("the owner's unsaved edit\n")
    with pytest.raises(Conflict, match="dirty checkout"):
        create_worktree(repo, 13, None, options=WorktreeOptions(minor_in_checkout=True),
                        complexity="minor")


def test_a_dead_owner_frees_the_checkout(repo: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    create_worktree(repo, 9, None, options=WorktreeOptions(minor_in_checkout=True),
                    complexity="minor", owner_pid=dead.pid)
    assert create_worktree(repo, 12, None, options=WorktreeOptions(minor_in_checkout=True),
                           complexity="minor").in_checkout


def test_a_reused_task_id_gets_a_fresh_worktree(repo: Path) -> None:
    old = create_worktree(repo, 7, "feature/a", created_at=ago(hours=2, zone=""))
    (Path(old.path) / "old-work.txt").write_text("the deleted task's work\n")
    new = create_worktree(repo, 7, "feature/b", created_at=ago(hours=1, zone=""))
    assert new.created is True and new.path != old.path
    assert not (Path(new.path) / "old-work.txt").exists()
    with pytest.raises(UsageError, match="2 worktrees"):
        remove_worktree(repo, 7)
    assert remove_worktree(repo, new.path).removed


def test_trunk_named_branch_becomes_the_task_branch(repo: Path) -> None:
    result = create_worktree(repo, 8, "main")
    assert result.branch == "task-8" and "task-8" in result.note
    assert git(result.path, "symbolic-ref", "--short", "HEAD") == "task-8"
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main"


def test_branch_held_by_the_main_checkout_is_a_conflict(repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "feature/y")
    with pytest.raises(Conflict) as err:
        create_worktree(repo, 5, "feature/y", options=WorktreeOptions(base="main"))
    assert "main checkout" in err.value.message


def test_branch_checked_out_by_another_task_is_never_shared(env: Path, repo: Path) -> None:
    first = create_worktree(repo, 5, "feature/z")
    with pytest.raises(Conflict) as err:
        create_worktree(repo, 6, "feature/z")
    assert err.value.details["branch_in_use"] is True
    assert err.value.details["held_by_task"] == 5
    assert err.value.details["checked_out_at"] == first.path
    assert not (repo / ".worktrees" / "task-6").exists()
    # Once the first task's worktree is gone, the second gets the branch.
    remove_worktree(repo, 5)
    assert create_worktree(repo, 6, "feature/z").created is True


def test_not_a_repository_and_bad_input(env: Path, repo: Path) -> None:
    plain = env / "plain"
    plain.mkdir()
    res = pmtool("worktree", "create", "--task-id", "1", "--branch", "b", "--repo", str(plain))
    assert res.code == 2 and "git repository" in res.out["error"]["message"]
    with pytest.raises(UsageError):
        repo_root(plain)
    with pytest.raises(TaskFault):  # the task's fault: its runner parks it
        create_worktree(repo, 1, "bad..name")
    with pytest.raises(UsageError):
        create_worktree(repo, 1, "b", options=WorktreeOptions(base="no-such-base"))


def test_worktree_base_from_the_environment(env: Path, repo: Path) -> None:
    base = env / "trees"
    res = pmtool("worktree", "create", "--task-id", "2", "--branch", "f/2", "--repo", str(repo),
                 env={"HEADLESS_PM_WORKTREE_BASE": str(base)})
    assert res.code == 0 and res.out["path"] == str(base / "task-2")
    assert (base / "task-2" / "app.py").exists()


def test_setup_hook_runs_in_the_new_worktree_and_the_record_follows(env: Path,
                                                                     repo: Path) -> None:
    hooks = env / "hooks"
    hooks.mkdir()
    (hooks / "worktree_setup.sh").write_text(
        '#!/bin/sh\ncp "$PMTOOL_REPO/.env" .env\npwd > "$OUT/pwd"\ncat > "$OUT/ctx.json"\n')
    (hooks / "worktree_setup.sh").chmod(0o755)
    save_record(env, {"id": 12, "branch": "feature/env", "complexity": "major"})
    out = env / "out"
    out.mkdir()
    res = pmtool("worktree", "create", "--agent-id", "dev_001", "--repo", str(repo),
                 "--hooks-dir", str(hooks), env={"OUT": str(out)})
    assert res.code == 0, res.out
    path = repo / ".worktrees" / "task-12"
    assert res.out["hook"]["ok"] is True
    assert (path / ".env").read_text() == "API_TOKEN=from-main-checkout\n"
    assert (out / "pwd").read_text().strip() == str(path)
    ctx = json.loads((out / "ctx.json").read_text())
    assert ctx["worktree"] == str(path) and ctx["agent_id"] == "dev_001"
    assert ctx["task"]["branch"] == "feature/env" and ctx["repo"] == str(repo)
    record = RecordStore(env / "state").load("dev_001")
    assert record.worktree == str(path) and record.branch == "feature/env"
    # A second call neither recreates nor re-runs a setup that worked.
    (out / "pwd").unlink()
    again = pmtool("worktree", "create", "--agent-id", "dev_001", "--hooks-dir", str(hooks),
                   cwd=repo, env={"OUT": str(out)})
    assert again.code == 0 and again.out["created"] is False and again.out["hook"] is None
    assert not (out / "pwd").exists()


def test_failing_setup_hook_keeps_the_worktree_and_is_retried(env: Path, repo: Path) -> None:
    hooks = env / "hooks"
    hooks.mkdir()
    (hooks / "worktree_setup").write_text(
        '#!/bin/sh\n[ -e "$OUT/fixed" ] && exit 0\necho "npm install failed" >&2\nexit 1\n')
    (hooks / "worktree_setup").chmod(0o755)
    args = ("worktree", "create", "--task-id", "6", "--branch", "f/6", "--repo", str(repo),
            "--hooks-dir", str(hooks))
    res = pmtool(*args, env={"OUT": str(env)})
    assert res.code == 1 and res.out["ok"] is False
    assert res.out["hook"]["exit_code"] == 1 and "npm install failed" in res.stderr
    assert (repo / ".worktrees" / "task-6" / "app.py").exists()
    (env / "fixed").touch()
    again = pmtool(*args, env={"OUT": str(env)})
    assert again.code == 0 and again.out["created"] is False
    assert again.out["hook"]["ok"] is True


# -- remove and rescue -----------------------------------------------------------------------

def make_dirty(path: Path) -> None:
    (path / "app.py").write_text("print('changed by the agent')\n")
    (path / "notes.md").write_text("new, untracked\n")
    (path / "data").mkdir()
    (path / "data" / "blob.bin").write_bytes(BINARY)
    (path / ".env").write_text("API_TOKEN=edited-in-the-worktree\n")
    (path / "node_modules" / "pkg").mkdir(parents=True)
    (path / "node_modules" / "pkg" / "index.js").write_text("module.exports = 1\n")


def test_dirty_remove_refuses_and_rescue_keeps_every_byte(env: Path, repo: Path) -> None:
    created = create_worktree(repo, 7, "feature/login")
    path = Path(created.path)
    branch_head = commit_on(path, "login.py", "def login(): ...\n")
    make_dirty(path)

    res = pmtool("worktree", "remove", "7", "--repo", str(repo))
    assert res.code == 5 and res.out["error"]["type"] == "conflict"
    listed = {d["path"] for d in res.out["error"]["dirty"]}
    assert listed == {"app.py", "notes.md", "data/blob.bin"}
    assert "app.py" in res.stderr and path.is_dir()

    res = pmtool("worktree", "remove", str(path), "--rescue")
    assert res.code == 0, res.out
    rescued = res.out["rescued"]
    ref = rescued["ref"]
    assert ref.startswith("refs/pmtool/rescue/task-7/")
    assert git(repo, "rev-parse", ref) == rescued["commit"]
    assert git_bytes(repo, "show", f"{ref}:app.py") == b"print('changed by the agent')\n"
    assert git_bytes(repo, "show", f"{ref}:notes.md") == b"new, untracked\n"
    assert git_bytes(repo, "show", f"{ref}:data/blob.bin") == BINARY
    assert git_bytes(repo, "show", f"{ref}:login.py") == b"def login(): ...\n"
    # Small ignored files are rescued (.env); ignored folders are not (node_modules).
    assert git_bytes(repo, "show", f"{ref}:.env") == b"API_TOKEN=edited-in-the-worktree\n"
    assert rescued["ignored_included"] == [".env"]
    assert rescued["ignored_left"] == ["node_modules/"]
    # The task branch and its commit are untouched; the rescue sits on top of it.
    assert git(repo, "rev-parse", "refs/heads/feature/login") == branch_head
    assert git(repo, "rev-parse", f"{ref}^") == branch_head
    assert not path.exists() and res.out["removed"] is True
    assert res.out["branch_deleted"] is False
    assert git(repo, "status", "--porcelain") == ""


def test_rescue_touches_neither_index_nor_head(repo: Path) -> None:
    path = Path(create_worktree(repo, 3, "f/3").path)
    (path / "app.py").write_text("staged\n")
    git(path, "add", "app.py")
    (path / "app.py").write_text("staged, then edited again\n")
    (path / "new.txt").write_text("untracked\n")
    before = (git(path, "status", "--porcelain"), git(path, "rev-parse", "HEAD"),
              git(path, "diff", "--cached"), git(repo, "for-each-ref", "refs/heads"))
    result = rescue(repo, 3)
    after = (git(path, "status", "--porcelain"), git(path, "rev-parse", "HEAD"),
             git(path, "diff", "--cached"), git(repo, "for-each-ref", "refs/heads"))
    assert before == after
    assert git(repo, "show", f"{result.ref}:app.py") == "staged, then edited again"
    assert {f["path"] for f in result.files} == {"app.py", "new.txt"}


def test_detached_commits_no_branch_holds_count_as_dirty(repo: Path) -> None:
    path = Path(create_worktree(repo, 4, "f/4").path)
    git(path, "switch", "-q", "--detach")
    lost = commit_on(path, "orphan.txt", "only reachable from this worktree's HEAD\n")
    with pytest.raises(Conflict) as err:
        remove_worktree(repo, 4)
    assert err.value.details["detached_head"] == lost
    result = remove_worktree(repo, 4, rescue=True)
    assert git(repo, "rev-parse", f"{result.rescued.ref}^") == lost


def test_delete_branch_only_when_merged(repo: Path) -> None:
    path = Path(create_worktree(repo, 1, "f/unmerged").path)
    commit_on(path, "u.txt", "not merged\n")
    result = remove_worktree(repo, 1, delete_branch=True)
    assert result.branch_deleted is False and "not merged" in result.branch_kept
    assert git(repo, "rev-parse", "--verify", "refs/heads/f/unmerged")

    path = Path(create_worktree(repo, 2, "f/merged").path)
    commit_on(path, "m.txt", "merged\n")
    git(repo, "merge", "-q", "--no-edit", "f/merged")
    res = pmtool("worktree", "remove", "2", "--delete-branch", "--repo", str(repo))
    assert res.code == 0 and res.out["branch_deleted"] is True
    assert git(repo, "branch", "--list", "f/merged") == ""


def test_remove_by_agent_id_updates_the_record(env: Path, repo: Path) -> None:
    path = create_worktree(repo, 21, "f/21").path
    save_record(env, {"id": 21, "branch": "f/21", "complexity": "major"}, worktree=path)
    res = pmtool("worktree", "remove", "--agent-id", "dev_001")
    assert res.code == 0 and res.out["path"] == path
    assert RecordStore(env / "state").load("dev_001").worktree is None


def test_remove_corners(repo: Path) -> None:
    res = pmtool("worktree", "remove", "99", "--repo", str(repo))
    assert res.code == 3  # no worktree for that task: nothing to do
    res = pmtool("worktree", "remove", str(repo), "--repo", str(repo))
    assert res.code == 2 and "main checkout" in res.out["error"]["message"]
    with pytest.raises(NothingToDo):
        rescue(repo, Path(create_worktree(repo, 5, "f/5").path))  # clean: nothing to save


# -- list and prune --------------------------------------------------------------------------

def test_list_and_prune(env: Path, repo: Path) -> None:
    kept_by_record = create_worktree(repo, 1, "f/1").path
    orphan = create_worktree(repo, 2, "f/2").path
    dirty = create_worktree(repo, 3, "f/3").path
    busy = create_worktree(repo, 4, "f/4").path
    (Path(dirty) / "wip.txt").write_text("unsaved\n")
    git(repo, "worktree", "add", "-q", "-b", "mine", str(env / "not-pmtools"))
    save_record(env, {"id": 1, "branch": "f/1", "complexity": "major"}, worktree=kept_by_record)

    res = pmtool("worktree", "list", "--repo", str(repo))
    assert res.code == 0
    by_path = {w["path"]: w for w in res.out["worktrees"]}
    assert by_path[str(repo)]["main"] is True
    assert by_path[kept_by_record]["task_id"] == 1
    assert by_path[kept_by_record]["agent_id"] == "dev_001"
    assert by_path[orphan]["task_id"] == 2 and by_path[orphan]["dirty"] is False
    assert by_path[dirty]["dirty"] is True and by_path[dirty]["changes"] == 1
    assert by_path[str(env / "not-pmtools")]["managed"] is False

    worker = subprocess.Popen(["sleep", "60"], cwd=busy)
    try:
        res = pmtool("worktree", "prune", "--repo", str(repo))
    finally:
        worker.kill()
        worker.wait()
    assert res.code == 0, res.out
    assert [r["path"] for r in res.out["removed"]] == [orphan]
    kept = {k["path"]: k for k in res.out["kept"]}
    assert set(kept) == {kept_by_record, dirty, busy}
    assert kept[dirty]["dirty"][0]["path"] == "wip.txt"
    assert kept[busy]["pids"] == [worker.pid]
    assert Path(dirty).is_dir() and not Path(orphan).exists()
    assert (env / "not-pmtools").is_dir()
    assert git(repo, "rev-parse", "--verify", "refs/heads/f/2")  # branches stay

    res = pmtool("worktree", "prune", "--rescue", "--repo", str(repo))
    removed = {r["path"]: r for r in res.out["removed"]}
    assert set(removed) == {dirty, busy}
    assert git(repo, "show", f"{removed[dirty]['rescued']['ref']}:wip.txt") == "unsaved"
    assert Path(kept_by_record).is_dir()
    assert [w["task_id"] for w in list_worktrees(repo) if w["managed"]] == [1]


def test_prune_dry_run_removes_nothing(env: Path, repo: Path) -> None:
    path = create_worktree(repo, 2, "f/2").path
    res = pmtool("worktree", "prune", "--dry-run", "--repo", str(repo))
    assert res.code == 0 and res.out["removed"][0]["would_remove"] is True
    assert Path(path).is_dir()


def test_worktree_folder_deleted_by_hand(repo: Path) -> None:
    path = Path(create_worktree(repo, 5, "f/5").path)
    subprocess.run(["rm", "-rf", str(path)], check=True)
    again = create_worktree(repo, 5, "f/5")  # recreated, on the same branch
    assert again.created is True and Path(again.path).is_dir()
    subprocess.run(["rm", "-rf", str(path)], check=True)
    result = remove_worktree(repo, 5)
    assert result.removed is True and "gone" in result.note
    assert os.listdir(repo / ".worktrees") == []


def test_a_leftover_worktree_frees_its_branch_only_when_nobody_has_it(repo: Path) -> None:
    old = create_worktree(repo, 5, "feature/z")
    (Path(old.path) / "wip.txt").write_text("left behind\n")
    # A task record names it: the next task on the branch waits.
    with pytest.raises(Conflict):
        create_worktree(repo, 6, "feature/z", live_paths=[old.path])
    # Nobody names it, nobody works in it: removed with its work rescued, branch free.
    new = create_worktree(repo, 6, "feature/z", live_paths=[])
    assert new.created is True and not Path(old.path).exists()
    ref = new.leftover_removed["rescued"]
    assert git(repo, "show", f"{ref}:wip.txt") == "left behind"
    # A process working in it keeps it.
    busy = create_worktree(repo, 7, "feature/w")
    sleeper = subprocess.Popen(["sleep", "30"], cwd=busy.path)
    try:
        with pytest.raises(Conflict):
            create_worktree(repo, 8, "feature/w", live_paths=[])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_python_caller_gives_a_record_its_workspace_as_the_cli_does(env: Path,
                                                                      repo: Path) -> None:
    """`work.task_workspace` is what `worktree create --agent-id` and the run loop call:
    the library alone makes the worktree and writes it into the record."""
    from pmtool.config import load_settings
    from pmtool.work import claim as work
    from pmtool.work.options import worktree_options

    save_record(env, {"id": 12, "branch": "feature/lib", "complexity": "major",
                      "created_at": ago(days=1, zone="")})
    store = RecordStore(env / "state")
    settings = load_settings()
    answer, record = work.task_workspace(store, "dev_001", repo, settings,
                                         worktree_options(settings, repo))
    assert answer.ok and answer.created and answer.branch == "feature/lib"
    assert Path(answer.path).is_dir()
    assert git(answer.path, "symbolic-ref", "--short", "HEAD") == "feature/lib"
    kept = store.load("dev_001")
    assert kept is not None and kept.worktree == record.worktree == answer.path
    assert kept.branch == "feature/lib" and kept.steps[-1]["step"] == "worktree"
    # A second call finds the same workspace, and says so.
    again, _ = work.task_workspace(store, "dev_001", repo, settings,
                                   worktree_options(settings, repo))
    assert again.path == answer.path and again.created is False


def test_a_branch_taken_between_the_look_and_the_add_is_waited_for(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runners on one branch at the same instant: both look, see it free, and add; the
    second add fails in git. That is a task to defer, not a broken worktree."""
    import inspect

    from pmtool import worktree

    real, looks = worktree.git_worktrees, []

    def racing(root: str | Path) -> list:
        seen = real(root)
        if inspect.stack()[1].function == "create_worktree":
            looks.append(1)
            if len(looks) == 1:  # its look: the other runner adds right after it
                git(repo, "worktree", "add", "-q", str(repo / ".worktrees" / "task-5"),
                    "-b", "feature/race")
        return seen

    monkeypatch.setattr(worktree, "git_worktrees", racing)
    with pytest.raises(Conflict) as err:
        create_worktree(repo, 6, "feature/race")
    assert err.value.details["branch_in_use"] is True
    assert err.value.details["held_by_task"] == 5
    assert len(looks) == 2  # it looked again after git refused the add


# -- many machines: the branch comes through the remote --------------------------------------

@pytest.fixture
def machines(env: Path) -> tuple[Path, Path, Path]:
    """A bare origin with `main`, and two clones of it made before any task work: machine
    A (the developer's) and machine B (QA's), which has never fetched since."""
    origin, a, b = env / "origin.git", env / "a", env / "b"
    git(env, "init", "-q", "--bare", "-b", "main", str(origin))
    git(env, "clone", "-q", str(origin), str(a))
    commit_on(a, "app.py", "print('hello')\n")
    git(a, "push", "-q", "origin", "main")
    git(env, "clone", "-q", str(origin), str(b))
    return origin, a, b


def push_work(a: Path, branch: str, name: str = "dev.txt") -> str:
    """On machine A: a commit on `branch` (from its tip, else main), pushed to origin."""
    git(a, "switch", "-q", branch) if _has(a, branch) else git(a, "switch", "-q", "-c", branch)
    head = commit_on(a, name, f"work in {name}\n")
    git(a, "push", "-q", "origin", branch)
    git(a, "switch", "-q", "main")
    return head


def _has(repo: Path, branch: str) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
                          cwd=repo, capture_output=True).returncode == 0


def test_a_machine_that_never_fetched_gets_the_pushed_branch(machines) -> None:
    _origin, a, b = machines
    head = push_work(a, "feature/mm")
    assert not _has(b, "feature/mm")
    result = create_worktree(b, 4, "feature/mm", follow_up=True)
    assert result.sync.local == "missing" and result.sync.branch_on_remote
    assert result.branch_source == "origin/feature/mm"
    assert git(result.path, "rev-parse", "HEAD") == head


def test_a_local_branch_behind_the_remote_is_fast_forwarded(machines) -> None:
    _origin, a, b = machines
    first = push_work(a, "feature/mm")
    git(b, "fetch", "-q", "origin")
    git(b, "branch", "-q", "feature/mm", "origin/feature/mm")  # B worked it once, before
    second = push_work(a, "feature/mm", "more.txt")
    result = create_worktree(b, 4, "feature/mm")
    assert result.sync.local == "behind" and "fast-forwarded" in result.note
    assert git(result.path, "rev-parse", "HEAD") == second
    assert git(b, "merge-base", "--is-ancestor", first, second) == ""


def test_diverged_local_commits_go_to_a_rescue_ref_and_work_follows_the_remote(
        machines) -> None:
    _origin, a, b = machines
    push_work(a, "feature/mm")
    git(b, "fetch", "-q", "origin")
    git(b, "switch", "-q", "-c", "feature/mm", "origin/feature/mm")
    mine = commit_on(b, "b-only.txt", "B's unpushed work\n")
    git(b, "switch", "-q", "main")
    theirs = push_work(a, "feature/mm", "a-later.txt")
    result = create_worktree(b, 4, "feature/mm")
    sync = result.sync
    assert sync.local == "diverged" and sync.rescued.startswith("refs/pmtool/rescue/task-4/")
    assert sync.rescued in result.note and "diverged" in result.note
    # Nothing lost: B's commit on the rescue ref, the remote's work on the branch, and
    # the remote itself untouched (nothing pushed, nothing forced).
    assert git(b, "rev-parse", sync.rescued) == mine
    assert git(b, "show", f"{sync.rescued}:b-only.txt") == "B's unpushed work"
    assert git(result.path, "rev-parse", "HEAD") == theirs
    assert git(a, "ls-remote", "origin", "refs/heads/feature/mm").split()[0] == theirs


def test_a_local_branch_ahead_of_the_remote_is_kept(machines) -> None:
    _origin, a, b = machines
    pushed = push_work(a, "feature/mm")
    git(b, "fetch", "-q", "origin")
    git(b, "switch", "-q", "-c", "feature/mm", "origin/feature/mm")
    mine = commit_on(b, "b-more.txt", "more on top\n")
    git(b, "switch", "-q", "main")
    result = create_worktree(b, 4, "feature/mm")
    assert result.sync.local == "ahead" and result.sync.rescued is None
    assert git(result.path, "rev-parse", "HEAD") == mine
    assert git(b, "merge-base", "--is-ancestor", pushed, mine) == ""


def test_a_new_branch_starts_from_the_remotes_newer_base(machines) -> None:
    _origin, a, b = machines
    newer = commit_on(a, "later.txt", "main moved on\n")
    git(a, "push", "-q", "origin", "main")
    result = create_worktree(b, 4, "feature/new")
    assert result.branch_source == "new from main"
    assert git(result.path, "rev-parse", "HEAD") == newer
    assert git(b, "rev-parse", "main") != newer  # B's own main is not touched


def test_nothing_to_review_when_the_branch_is_nowhere(machines, repo: Path) -> None:
    _origin, _a, b = machines
    for where in (b, repo):  # with a remote, and without one
        with pytest.raises(NothingToDo) as err:
            create_worktree(where, 4, "feature/never-pushed", follow_up=True)
        assert err.value.details["no_branch"] is True
        assert "nothing to review" in err.value.message
        assert not _has(where, "feature/never-pushed")
        assert not (where / ".worktrees" / "task-4").exists()
    # Not a follow-up (a developer's first claim): the branch is made from the base.
    assert create_worktree(b, 5, "feature/never-pushed").branch_source == "new from main"


def test_a_remote_that_cannot_be_reached_is_a_machine_fault(machines, repo: Path) -> None:
    from pmtool.git import RemoteUnreachable

    origin, a, b = machines
    push_work(a, "feature/mm")
    git(b, "remote", "set-url", "origin", str(origin) + "-gone")
    with pytest.raises(RemoteUnreachable) as err:
        create_worktree(b, 4, "feature/mm", follow_up=True)
    assert err.value.details["remote_unreachable"] is True
    assert err.value.details["remote"] == "origin" and "git remote -v" in err.value.hint
    assert not (b / ".worktrees" / "task-4").exists() and not _has(b, "feature/mm")
    # Without a remote nothing is fetched and nothing changes.
    result = create_worktree(repo, 4, "feature/local")
    assert result.sync is None and result.branch_source == "new from main"


def test_a_remote_that_hangs_is_ended_on_time_and_is_a_machine_fault(machines, env) -> None:
    """A dead host keeps git waiting (ssh to a black hole): the fetch is bounded, the whole
    tree ended, and nothing prompts. `ext::` runs a command as the remote: here, a sleep."""
    import time

    _origin, _a, b = machines
    marker = env / "hung.pid"
    git(b, "config", "protocol.ext.allow", "always")
    git(b, "remote", "set-url", "origin", f"ext::sh -c echo% $$% >{marker}% &&% sleep% 60")
    start = time.monotonic()
    res = pmtool("worktree", "create", "4", "--branch", "feature/mm", "--repo", str(b),
                 env={"PMTOOL_GIT_REMOTE_TIMEOUT": "2"}, timeout=60)
    assert res.code == 1 and time.monotonic() - start < 30
    error = res.out["error"]
    assert error["type"] == "machine_fault" and error["remote_unreachable"] is True
    assert "did not answer" in error["message"] and "ran past 2s" in error["message"]
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # ended with its tree, not left to sleep on
            os.kill(pid, 0)
            time.sleep(0.05)
    assert not (b / ".worktrees" / "task-4").exists()


def test_a_minor_task_left_for_review_comes_from_the_remote_too(machines) -> None:
    """A minor task's short-lived branch has the same name on every machine: QA on B finds
    the developer's pushed work on it, and B's own main is not touched."""
    from pmtool.worktree import MINOR_PREFIX, workspace_name

    _origin, a, b = machines
    born = ago(days=1, zone="")
    head = push_work(a, MINOR_PREFIX + workspace_name(4, born), "minor.txt")
    result = create_worktree(b, 4, None, "minor", created_at=born, follow_up=True)
    assert result.branch_source == f"origin/{MINOR_PREFIX}{workspace_name(4, born)}"
    assert git(result.path, "rev-parse", "HEAD") == head
    assert git(b, "rev-parse", "main") == git(b, "rev-parse", "origin/main")

def test_a_branch_pmtool_named_goes_with_its_worktree_unless_it_holds_work(
        env: Path, repo: Path) -> None:
    """`worktree create 999` (a mistyped task, no branch) makes task-999; removing the
    worktree takes that branch away too while it holds nothing the base lacks. A commit
    on it keeps it, and the task's own branch (named by the server) always stays."""
    made = pmtool("worktree", "create", "999", "--repo", str(repo))
    assert made.code == 0 and made.out["branch"] == "task-999"
    gone = pmtool("worktree", "remove", "999", "--repo", str(repo))
    assert gone.code == 0 and gone.out["branch_deleted"] is True
    assert not git(repo, "branch", "--list", "task-999")

    worked = pmtool("worktree", "create", "998", "--repo", str(repo)).out["path"]
    tip = commit_on(Path(worked), "work.txt", "real work\n")
    kept = pmtool("worktree", "remove", "998", "--repo", str(repo))
    assert kept.code == 0 and kept.out["branch_deleted"] is False
    assert "not merged" in kept.out["branch_kept"]
    assert git(repo, "rev-parse", "refs/heads/task-998") == tip

    pmtool("worktree", "create", "997", "--branch", "feature/x", "--repo", str(repo))
    assert pmtool("worktree", "remove", "997", "--repo", str(repo)).out["branch_deleted"] is False
    assert git(repo, "branch", "--list", "feature/x")


def test_worktree_create_says_why_it_does_not_ask_the_server(env: Path) -> None:
    from helpers import PMTOOL

    text = subprocess.run([PMTOOL, "worktree", "create", "--help"], capture_output=True,
                          text=True, check=True).stdout
    assert "not looked up on the server" in " ".join(text.split())


# Each case of the worktree's answers, and the keys its JSON has always had (`worktree
# create` and `worktree remove` print them; tests/contract pins the main case).
WORKSPACE = {"ok", "path", "worktree", "branch", "base", "created", "task_id", "complexity",
             "hook"}
REMOVED = {"path", "task_id", "branch", "removed", "rescued", "branch_deleted", "branch_kept"}
WORKTREE_ANSWER_KEYS = {
    "create": WORKSPACE | {"branch_source"},
    "create again": WORKSPACE,
    "create minor": WORKSPACE | {"lands_on", "branch_source"},
    "create in checkout": WORKSPACE | {"on_base", "in_checkout"},
    "remove": REMOVED,
    "remove in checkout": REMOVED | {"checkout_released"},
    "remove gone": REMOVED | {"note"},
}


def worktree_answers(repo: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    found["create"] = create_worktree(repo, 1, "feature/one")
    found["create again"] = create_worktree(repo, 1, "feature/one")
    found["remove"] = remove_worktree(repo, 1)
    found["create minor"] = create_worktree(repo, 2, None, "minor")
    found["create in checkout"] = create_worktree(
        repo, 3, None, "minor", WorktreeOptions(minor_in_checkout=True))
    found["remove in checkout"] = remove_worktree(repo, 3)
    shutil.rmtree(create_worktree(repo, 4, "feature/four").path)
    found["remove gone"] = remove_worktree(repo, 4)
    return found


def test_the_worktree_answers_keep_their_keys(repo: Path) -> None:
    answers = worktree_answers(repo)
    assert {case: set(answer.to_json()) for case, answer in answers.items()} \
        == WORKTREE_ANSWER_KEYS

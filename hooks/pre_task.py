#!/usr/bin/env python3
"""pre_task hook (example): is this machine fit to start the task?

Checks free disk space where the agent will work, the git state of that checkout (a git
repository, no merge/rebase/cherry-pick half done, no conflicted files), and that the
claude CLI can be found. Prints one JSON line on stdout; each failed check is one line on
stderr, and the exit status is 1 when any failed.

Reads (all optional): the task context on stdin; PMTOOL_WORKTREE (else the current
directory); PMTOOL_BRANCH; PMTOOL_DISK_MIN_FREE_MB (default 1024); PMTOOL_CLAUDE_BIN;
PMTOOL_PRE_TASK_SKIP, a comma-separated list of checks to skip (disk, git, claude), e.g.
"claude" when the agent is not Claude Code.

Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def read_context() -> dict:
    if sys.stdin is None or sys.stdin.isatty():
        return {}
    try:
        data = json.loads(sys.stdin.read() or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def check_disk(where: Path) -> tuple[bool, str]:
    need = int(os.environ.get("PMTOOL_DISK_MIN_FREE_MB") or 1024)
    free = shutil.disk_usage(where).free // (1024 * 1024)
    if free < need:
        return False, f"only {free} MiB free at {where}, need {need} (PMTOOL_DISK_MIN_FREE_MB)"
    return True, f"{free} MiB free at {where.resolve()}"


def git(where: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                          check=False)


def check_git(where: Path, branch: str | None) -> tuple[bool, str]:
    if shutil.which("git") is None:
        return False, "git is not on PATH"
    top = git(where, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return False, f"{where} is not in a git repository"
    for marker, what in (("MERGE_HEAD", "a merge"), ("rebase-merge", "a rebase"),
                         ("rebase-apply", "a rebase or am"),
                         ("CHERRY_PICK_HEAD", "a cherry-pick"), ("REVERT_HEAD", "a revert")):
        found = git(where, "rev-parse", "--git-path", marker).stdout.strip()
        if found and (where / found).exists():
            return False, f"{where} is in the middle of {what}; finish or abort it first"
    status = git(where, "status", "--porcelain", "-z").stdout.split("\0")
    conflicted = [rec[3:] for rec in status
                  if rec[:2] in ("DD", "AU", "UD", "UA", "DU", "AA", "UU")]
    if conflicted:
        return False, f"conflicted files in {where}: {', '.join(conflicted[:5])}"
    on = git(where, "symbolic-ref", "--quiet", "--short", "HEAD").stdout.strip()
    detail = f"{top.stdout.strip()} on {on or 'a detached HEAD'}"
    if branch and on and on != branch:
        # Not a failure: a minor task's record may name the base while the task names another.
        detail += f" (the task names branch {branch})"
    return True, detail


def check_claude() -> tuple[bool, str]:
    configured = os.environ.get("PMTOOL_CLAUDE_BIN")
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return True, configured
        return False, f"PMTOOL_CLAUDE_BIN={configured} is not an executable file"
    for candidate in (shutil.which("claude"), str(Path.home() / ".claude/local/claude")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return True, candidate
    return False, ("claude not found: install it (npm install -g @anthropic-ai/claude-code) "
                   "or set PMTOOL_CLAUDE_BIN")


def main() -> int:
    context = read_context()
    where = Path(os.environ.get("PMTOOL_WORKTREE") or context.get("worktree") or ".")
    branch = os.environ.get("PMTOOL_BRANCH") or context.get("branch")
    skip = {s.strip() for s in os.environ.get("PMTOOL_PRE_TASK_SKIP", "").split(",")}
    checks = {"disk": lambda: check_disk(where), "git": lambda: check_git(where, branch),
              "claude": check_claude}
    if not where.is_dir():
        print(f"pre_task: {where} does not exist", file=sys.stderr)
        return 1
    results = []
    for name, check in checks.items():
        if name in skip:
            continue
        try:
            ok, detail = check()
        except Exception as exc:  # a broken check is a failed check, with its reason
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"name": name, "ok": ok, "detail": detail})
    failed = [r for r in results if not r["ok"]]
    print(json.dumps({"ok": not failed, "task_id": context.get("task_id"), "checks": results}))
    for r in failed:
        print(f"pre_task: {r['name']}: {r['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

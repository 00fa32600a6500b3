"""Before the first claim: is there anything that would make every task fail?

A runner that claims with a wrong key, no `claude`, or a folder that is not a repo hands
every task back, forever (issue 9, item 4). `preflight` finds those problems first, each
with one line that says how to fix it; the caller raises the first fatal one, so `run`
ends at once with its exit code, having claimed nothing.

`explain_nothing` answers "why is nothing picked up?" from the task list: the reasons a
role and level get no task, in the order a person should look at them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool.config import LEVELS, ROLES, Settings
from pmtool.errors import (
    EXIT_SERVER,
    AuthError,
    ClaudeMissing,
    PmtoolError,
    UsageError,
)

if TYPE_CHECKING:
    from pmtool.client import PMApi


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    error: type[PmtoolError] | None = None
    unreachable: bool = False  # transient: the server did not answer

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ok": self.ok, "detail": self.detail}
        if self.fix:
            out["fix"] = self.fix
        if self.unreachable:
            out["unreachable"] = True
        return out

    def raise_it(self) -> None:
        assert self.error is not None
        raise self.error(self.detail, hint=self.fix, check=self.name)


KNOWN_HOOKS = ("pre_task", "post_task", "worktree_setup", "health_check", "notify")


def hooks_folder(configured: str | Path | None, repo: str | Path | None) -> Path | None:
    """The hooks folder: as configured when absolute, else relative to the repo (never to
    whatever directory the runner happened to be started from)."""
    if not configured:
        return None
    path = Path(configured).expanduser()
    if path.is_absolute():
        return path
    return (Path(repo).expanduser().resolve() if repo else Path.cwd()) / path


def check_key(settings: Settings, client: PMApi) -> Finding:
    if not settings.api_key:
        return Finding("key", False, "HEADLESS_PM_API_KEY is not set",
                       "export HEADLESS_PM_API_KEY=<the server's key> (or api_key in the "
                       "config file)", AuthError)
    try:
        client.agents()
    except AuthError:
        return Finding("key", False, f"the server at {settings.api_url} rejected the key",
                       "set HEADLESS_PM_API_KEY to the key the server was started with",
                       AuthError)
    except PmtoolError as exc:
        return Finding("key", False, exc.message, exc.hint,
                       unreachable=exc.exit_code == EXIT_SERVER)
    return Finding("key", True, "key accepted")


def check_repo(repo: str | Path | None) -> Finding:
    where = Path(repo or os.getcwd()).expanduser()
    if not where.is_dir():
        return Finding("repo", False, f"--repo {where} is not a folder",
                       "pass --repo the path of a git checkout", UsageError)
    from pmtool import git

    top = git.toplevel(where)
    if top is None:
        return Finding("repo", False, f"{where} is not a git repository",
                       "pass --repo the path of a git checkout (or git init it)",
                       UsageError)
    return Finding("repo", True, str(top))


def check_role(role: str, level: str) -> Finding:
    if role not in ROLES:
        return Finding("role", False, f'unknown role "{role}"',
                       "valid roles: " + ", ".join(ROLES), UsageError)
    if level not in LEVELS:
        return Finding("role", False, f'unknown level "{level}"',
                       "valid levels: " + ", ".join(LEVELS), UsageError)
    return Finding("role", True, f"{role}/{level}")


def check_hooks(folder: Path | None, explicit: bool) -> Finding:
    """A hooks folder given on purpose must exist; every hook in it must be executable."""
    if folder is None or not folder.exists():
        if explicit:
            return Finding("hooks", False, f"hooks folder {folder} does not exist",
                           "create it, or drop --hooks-dir / HEADLESS_PM_HOOKS_DIR",
                           UsageError)
        return Finding("hooks", True, f"no hooks folder at {folder} (hooks are optional)")
    if not folder.is_dir():
        return Finding("hooks", False, f"hooks folder {folder} is not a folder",
                       "point --hooks-dir at a folder", UsageError)
    bad = sorted(p.name for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith((".", "_"))
                 and not os.access(p, os.X_OK))
    if bad:
        return Finding("hooks", False, f"hooks not executable: {', '.join(bad)}",
                       f"chmod +x {' '.join(str(folder / b) for b in bad)}", UsageError)
    from pmtool.hooks import find_hook

    found = [n for n in KNOWN_HOOKS if find_hook(n, folder)]
    missing = [n for n in KNOWN_HOOKS if n not in found]
    return Finding("hooks", True, f"hooks folder {folder}: "
                   + (", ".join(found) if found else "no hooks")
                   + (f"; not there (skipped): {', '.join(missing)}" if missing else ""))


def check_claude(settings: Settings, agent_cmd: str | None = None) -> Finding:
    """`claude --version` runs (skipped when --agent-cmd replaces claude). The same check
    as `health --check claude`: through procs, so a hung claude cannot hang the start."""
    from pmtool.agent.binary import check_version, find_claude

    if agent_cmd:
        return Finding("claude", True, f"--agent-cmd {agent_cmd.split()[0]} replaces claude")
    if not find_claude(settings.claude_bin):
        where = settings.claude_bin or "claude on PATH"
        return Finding("claude", False, f"claude not found ({where})",
                       "install it (npm install -g @anthropic-ai/claude-code) or set "
                       "PMTOOL_CLAUDE_BIN to its path", ClaudeMissing)
    check = check_version(settings.claude_bin, timeout=15)
    if check["ok"]:
        return Finding("claude", True, check["detail"])
    return Finding("claude", False, str(check["detail"])[:300],
                   "reinstall claude, or set PMTOOL_CLAUDE_BIN to a working one",
                   ClaudeMissing)


def preflight(settings: Settings, client: PMApi, *, role: str, level: str,
              repo: str | Path | None, hooks_dir: str | Path | None = None,
              hooks_explicit: bool = False, agent_cmd: str | None = None,
              need_repo: bool = True) -> list[Finding]:
    """Every check, in the order a person fixes them; none of them claims anything."""
    findings = [check_role(role, level), check_key(settings, client)]
    if need_repo:
        findings.append(check_repo(repo))
    folder = hooks_folder(hooks_dir or settings.hooks_dir, repo)
    findings.append(check_hooks(folder, hooks_explicit))
    findings.append(check_claude(settings, agent_cmd))
    return findings


def first_fatal(findings: Iterable[Finding]) -> Finding | None:
    return next((f for f in findings if not f.ok and f.error is not None), None)


# -- why nothing is picked up ----------------------------------------------------------------


def explain_nothing(tasks: Iterable[Mapping[str, Any]], role: str, level: str,
                    cooling: Mapping[int, str] | None = None,
                    pending: Iterable[Mapping[str, Any]] | None = None) -> list[str]:
    """Why `role`/`level` gets no task, from the tasks the role picks from (`tasks`; others
    are left out) and the tasks this machine lets cool down (`{task_id: until}`); the
    pending tasks are taken from `pending` when given, else from `tasks`. Empty when a
    task should be there."""
    tasks = list(tasks)
    cooling = cooling or {}
    rank = LEVELS.index(level) if level in LEVELS else 0
    mine = [t for t in tasks if role == "qa" or t.get("target_role") == role]
    waiting = mine if pending is None else [
        t for t in pending if role == "qa" or t.get("target_role") == role]
    want = "dev_done" if role == "qa" else "created"
    ready = [t for t in mine if t.get("status") == want]
    reasons = []
    if role != "qa":
        above = [t for t in ready
                 if (LEVELS.index(t["difficulty"]) if t.get("difficulty") in LEVELS else 0) > rank]
        if above:
            reasons.append(f"{len(above)} {want} task(s) for {role} are above level {level} "
                           f"(ids {', '.join(str(t['id']) for t in above[:5])})")
        ready = [t for t in ready if t not in above]
    locked = [t for t in ready if t.get("locked_by")]
    if locked:
        reasons.append(f"{len(locked)} {want} task(s) are locked by "
                       + ", ".join(sorted({str(t['locked_by']) for t in locked})))
    cool = [t for t in ready if t.get("id") in cooling and not t.get("locked_by")]
    if cool:
        reasons.append(f"{len(cool)} task(s) are cooling down on this machine after failed "
                       "attempts (until " + ", ".join(f"#{t['id']} {cooling[t['id']]}"
                                                      for t in cool[:5]) + ")")
    if not [t for t in ready if t not in locked and t not in cool]:
        parked = [t for t in waiting if t.get("status") == "pending"]
        if parked:
            reasons.append(f"{len(parked)} task(s) for {role} are pending: a person must set "
                           "them to created (parked tasks are pending too)")
        if not ready and not parked:
            reasons.append(f"{'no other task' if reasons else 'nothing'} is {want} or "
                           f"pending for {role}")
        return reasons
    return []

"""`pmtool health`: is this machine fit to run agents on tasks of that server?

Each check answers `{"name", "ok", "detail", ...}`; checks run concurrently because the
slow ones (the server, `claude --version`) wait on other processes, not on us.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmtool.config import Settings
from pmtool.errors import EXIT_SERVER, PmtoolError, UsageError, exit_code
from pmtool.results import Result

Check = dict[str, Any]


@dataclass
class HealthReport(Result):
    """`pmtool health`: every check run; `error` names the failed ones (exit 1, or 4 when
    only the server is out of reach)."""

    checks: list[Check]
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c["ok"]]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": self.checks,
                **({"error": self.error} if self.error else {})}


def check_api(settings: Settings) -> Check:
    from pmtool.client import PMClient

    client = PMClient(settings.api_url, None, timeout=settings.http_timeout, retries=0)
    start = time.monotonic()
    try:
        answer = client.health()
    except PmtoolError as exc:
        return {"ok": False, "detail": exc.message, "unreachable": True, "hint": exc.hint}
    latency = round((time.monotonic() - start) * 1000, 1)
    status = answer.get("status") if isinstance(answer, dict) else None
    ok = status == "healthy"
    detail = f"{status} in {latency} ms" + ("" if ok else f" (database: {answer.get('database')})")
    return {"ok": ok, "detail": detail, "latency_ms": latency,
            "version": answer.get("version") if isinstance(answer, dict) else None}


def check_auth(settings: Settings) -> Check:
    from pmtool.client import PMClient
    from pmtool.errors import AuthError

    if not settings.api_key:
        return {"ok": False, "detail": "no API key set (HEADLESS_PM_API_KEY)"}
    client = PMClient(settings.api_url, settings.api_key, timeout=settings.http_timeout,
                      retries=0)
    try:
        client.agents()
    except AuthError:
        return {"ok": False, "detail": "the server rejected the API key"}
    except PmtoolError as exc:
        return {"ok": False, "detail": exc.message, "unreachable": exc.exit_code == EXIT_SERVER,
                "hint": exc.hint}
    return {"ok": True, "detail": "key accepted"}


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unwritable(folder: Path) -> str | None:
    """Why a file cannot be written in `folder` (read-only, full, no access), or None.
    One byte, synced: a full filesystem still makes empty files."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".pmtool-health-") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_disk(settings: Settings) -> Check:
    places = {"state_dir": settings.state_path}
    places["worktree_base"] = Path(settings.worktree_base or ".").expanduser()
    need = settings.disk_min_free_mb
    free, unwritable = {}, {}
    for name, path in places.items():
        folder = _existing_parent(path.absolute())  # where pmtool would make it
        free[name] = shutil.disk_usage(folder).free // 2**20
        why = _unwritable(folder)
        if why:
            unwritable[name] = f"{folder}: {why}"
    low = [f"{name} {mb} MB" for name, mb in free.items() if mb < need]
    problems = ([f"not writable: {', '.join(f'{n} {w}' for n, w in unwritable.items())}"]
                if unwritable else []) + \
        ([f"low free space: {', '.join(low)} (need {need} MB)"] if low else [])
    detail = "; ".join(problems) or ", ".join(f"{n} {mb} MB free" for n, mb in free.items())
    out = {"ok": not problems, "detail": detail, "free_mb": free, "min_free_mb": need,
           "unwritable": unwritable}
    if unwritable:
        out["hint"] = ("make the folders writable (remount read-write, free space, or fix "
                       "their owner), or point PMTOOL_STATE_DIR / HEADLESS_PM_WORKTREE_BASE "
                       "elsewhere")
    return out


def check_memory(settings: Settings) -> Check:
    import psutil

    avail = psutil.virtual_memory().available // 2**20
    need = settings.memory_min_available_mb
    return {"ok": avail >= need, "detail": f"{avail} MB available (need {need} MB)",
            "available_mb": avail}


def check_claude(settings: Settings, timeout: float | None = None) -> Check:
    from pmtool.agent.binary import check_version

    return check_version(settings.claude_bin, timeout)


def check_git(settings: Settings) -> Check:
    from pmtool import git

    try:
        version = git.version()
        ok = git.has_worktree_support()
    except git.GitMissing:
        return {"ok": False, "detail": "git not found on PATH"}
    except PmtoolError as exc:  # timed out, or failed to run
        return {"ok": False, "detail": exc.message}
    return {"ok": ok, "detail": version + ("" if ok else " (no worktree support)"),
            "version": version}


REMOTE_CHECK_TIMEOUT = 20.0  # seconds per git call: a health check must not hang on a dead host
PROBE_REF = "refs/pmtool/health-probe"  # named in a dry-run push only: never written


def check_remote(settings: Settings, repo: str | Path | None = None) -> Check:
    """The repository's remote, through which machines share work: can it be read (`git
    ls-remote`), and does it take pushes (`git push --dry-run` of HEAD to a probe ref:
    the remote is asked, nothing is sent or changed)? A refused push fails the check only
    with push on; with it off, the detail says the work stays on this machine.
    A dry run sees refusals of the connection (auth, permissions, a wrong push URL), not
    those of the remote's own hooks."""
    from pmtool import git
    from pmtool.worktree import remotes

    where = Path(repo or Path.cwd()).expanduser()
    top = git.toplevel(where) if where.is_dir() else None
    if top is None:
        return {"ok": True, "detail": f"{where} is not a git checkout: no remote to check",
                "remote": None}
    names = remotes(top)
    if not names:
        return {"ok": True, "detail": "no remote: work stays on this machine (fine when it "
                                      "is the only one)", "remote": None}
    name, push_on = names[0], bool(settings.values.get("push"))
    answer: Check = {"remote": name, "push_setting": push_on, "fetch": False, "push": None}
    fix = f"check `git remote -v` in {top}, the network, and this machine's access"
    try:
        listed = git.remote(top, "ls-remote", "--heads", "--", name,
                            timeout=REMOTE_CHECK_TIMEOUT)
    except git.GitTimeout as exc:
        return {**answer, "ok": False, "hint": fix,
                "detail": f"remote {name} cannot be reached: {exc.message}"}
    if listed.returncode != 0:
        return {**answer, "ok": False, "hint": fix, "detail": f"remote {name} cannot be "
                f"reached: {listed.stderr.strip()[-300:] or listed.returncode}"}
    answer["fetch"] = True
    head = git.run(top, "rev-parse", "--verify", "--quiet", "HEAD", check=False,
                   timeout=git.QUERY_TIMEOUT).stdout.strip()
    refused = None
    if head:
        try:
            probe = git.remote(top, "push", "--dry-run", "--porcelain", "--", name,
                               f"{head}:{PROBE_REF}", timeout=REMOTE_CHECK_TIMEOUT)
            refused = probe.stderr.strip()[-300:] or str(probe.returncode) \
                if probe.returncode != 0 else None
        except git.GitTimeout as exc:
            refused = exc.message
        answer["push"] = refused is None
    if refused and push_on:
        return {**answer, "ok": False, "detail": f"remote {name} refuses pushes: {refused}",
                "hint": f"{fix}; with push on, task branches must reach it"}
    if not push_on:
        detail = (f"remote {name} answers; push is off: this machine's work stays here, "
                  "other machines do not see it (push = true shares it)")
        if refused:
            detail += f"; it also refuses pushes: {refused}"
        return {**answer, "ok": True, "detail": detail}
    return {**answer, "ok": True, "detail": f"remote {name} answers and takes pushes"}


def check_hooks(settings: Settings) -> Check:
    hooks = settings.hooks_path()
    if not hooks.exists():
        return {"ok": True, "detail": f"no hooks folder at {hooks} (hooks are optional)",
                "hooks": []}
    if not hooks.is_dir() or not os.access(hooks, os.R_OK | os.X_OK):
        return {"ok": False, "detail": f"hooks folder {hooks} is not a readable folder"}
    names, bad = [], []
    for path in sorted(hooks.iterdir()):
        if path.is_file() and not path.name.startswith((".", "_")):
            names.append(path.name)
            if not os.access(path, os.X_OK):
                bad.append(path.name)
    detail = (f"not executable: {', '.join(bad)} (chmod +x them)" if bad
              else f"{len(names)} hooks in {hooks}")
    return {"ok": not bad, "detail": detail, "hooks": names}


def check_records(settings: Settings) -> Check:
    from pmtool.records import RecordStore

    store = RecordStore(settings.state_path)
    records, corrupt = store.scan(quarantine=False)
    kept = _recover_corrupt(settings, store, corrupt)
    strays = store.state.stray_temps()
    stale = [r for r in records if not store.is_live(r)]
    problems, hints = [], []
    if stale:
        problems.append("stale records (runner gone): "
                        + ", ".join(f"{r.agent_id} (task {r.task_id})" for r in stale))
        # What really frees them: the runner coming back resumes its task; cron's
        # `recover --all` only gives a task back once its runner is gone for --grace.
        hints.append("restart the runner (pmtool run --agent-id "
                     + "/".join(r.agent_id for r in stale[:3])
                     + ") to resume, or `pmtool recover --give-back` to hand the tasks back "
                       "now (`pmtool recover --all` does it by itself once the runner has "
                       f"been gone {settings.grace:g}s)")
    if kept:
        problems.append("corrupt records kept aside: " + ", ".join(
            f"{e['kept_as']} (task {e.get('task_id', '?')}: "
            f"{e.get('task_action') or e.get('task_error')})" for e in kept))
        hints.append("read the kept files (their tasks were given back); "
                     "`pmtool recover --all` tries again where the server could not be asked")
    detail = "; ".join(problems) or f"{len(records)} live records"
    if strays:
        detail += f"; {len(strays)} unfinished temp file(s) of a killed write cleaned"
    out = {"ok": not problems, "detail": detail, "records": len(records),
           "stale": [r.agent_id for r in stale], "corrupt": [e["kept_as"] for e in kept],
           "corrupt_tasks": kept, "stray_temps": strays}
    if hints:
        out["hint"] = "; ".join(hints)
    return out


def _recover_corrupt(settings: Settings, store: Any, corrupt: list[Any]) -> list[dict]:
    """Corrupt records kept aside and their tasks given back, as `recover` does: once
    moved aside, no later `recover` would find the task through its record."""
    if not corrupt:
        return []
    from pmtool.client import PMClient
    from pmtool.work.recover import recover_corrupt

    client = PMClient(settings.api_url, settings.api_key, timeout=settings.http_timeout,
                      retries=0)
    try:
        return [recover_corrupt(client, store, c.path, c.reason).to_json() for c in corrupt]
    finally:
        client.close()


def check_parked(settings: Settings) -> Check:
    """Tasks parked for a person (status pending with pmtool's park comment): not a fault
    of this machine, but nobody will work them until a person sets them back."""
    from pmtool.client import PMClient
    from pmtool.ledger import parked_tasks

    client = PMClient(settings.api_url, settings.api_key, timeout=settings.http_timeout,
                      retries=0)
    try:
        parked = parked_tasks(client)
    except PmtoolError as exc:
        return {"ok": False, "detail": exc.message, "unreachable": exc.exit_code == EXIT_SERVER}
    finally:
        client.close()
    if not parked:
        return {"ok": True, "detail": "no tasks parked for a person", "parked": []}
    shown = "; ".join(f"#{p['id']} {p['reason']}" for p in parked[:5])
    return {"ok": True, "detail": f"{len(parked)} task(s) parked for a person: {shown}",
            "parked": parked,
            "hint": "fix what the reason says, then set the task back to created "
                    "(PUT /api/v1/tasks/ID/status) to have it worked again"}


CHECKS: dict[str, Callable[[Settings], Check]] = {
    "api": check_api, "auth": check_auth, "disk": check_disk, "memory": check_memory,
    "claude": check_claude, "git": check_git, "hooks": check_hooks, "records": check_records,
    "parked": check_parked, "remote": check_remote,
}


def run_health(settings: Settings, only: list[str] | None = None, hook: bool | None = None,
               hooks_dir: str | Path | None = None,
               repo: str | Path | None = None) -> tuple[HealthReport, int]:
    """Run the checks (all, or `only`) and the `health_check` hook (by default only with
    all checks; `hook` says otherwise); answer and exit code. `hooks_dir` replaces the
    setting (the run loop resolves it against the repo); `repo` is the checkout whose
    remote is checked (default: the current directory's)."""
    names = list(only) if only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise UsageError(f"unknown check {', '.join(unknown)}",
                         hint="checks: " + ", ".join(CHECKS), valid=list(CHECKS))

    def run(name: str) -> Check:
        start = time.monotonic()
        try:
            result = check_remote(settings, repo) if name == "remote" else \
                CHECKS[name](settings)
        except Exception as exc:  # a check that breaks is a failed check, not a crash
            result = {"ok": False, "detail": f"check crashed: {type(exc).__name__}: {exc}"}
        return {"name": name, **result, "duration_ms": round((time.monotonic() - start) * 1000)}

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        checks = list(pool.map(run, names))
    if hook if hook is not None else not only:
        found = _health_hook(settings, hooks_dir)
        if found:
            checks.append(found)
    answer = HealthReport(checks)
    if failed := answer.failed():
        # Only the server out of reach is a server error (exit 4): this machine may be fine.
        kind = "server" if all(c.get("unreachable") for c in failed) else "failed"
        answer.error = {"type": kind,
                        "message": "unhealthy: " + ", ".join(c["name"] for c in failed)}
    return answer, exit_code(answer)


def _health_hook(settings: Settings, hooks_dir: str | Path | None = None) -> Check | None:
    from pmtool.hooks import find_hook, run_hook

    folder = hooks_dir or settings.hooks_path()
    if not find_hook("health_check", folder):
        return None
    result = run_hook("health_check", folder,
                      {"api_url": settings.api_url, "state_dir": str(settings.state_path)},
                      timeout=settings.hook_timeout)
    detail = (result.stderr or result.stdout).strip().splitlines()
    return {"name": "hook:health_check", "ok": result.ok,
            "detail": detail[-1] if detail else f"exit {result.exit_code}",
            "exit_code": result.exit_code, "path": result.path}

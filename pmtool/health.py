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
from pathlib import Path
from typing import Any

from pmtool.config import Settings
from pmtool.errors import EXIT_SERVER, PmtoolError, UsageError, exit_code

Check = dict[str, Any]


def check_api(settings: Settings) -> Check:
    from pmtool.client import PMClient

    client = PMClient(settings.api_url, None, timeout=settings.http_timeout, retries=0)
    start = time.monotonic()
    try:
        answer = client.health()
    except PmtoolError as exc:
        return {"ok": False, "detail": exc.message, "unreachable": True}
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
        return {"ok": False, "detail": exc.message, "unreachable": exc.exit_code == EXIT_SERVER}
    return {"ok": True, "detail": "key accepted"}


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(settings: Settings) -> Check:
    places = {"state_dir": settings.state_path}
    places["worktree_base"] = Path(settings.worktree_base or ".").expanduser()
    need = settings.disk_min_free_mb
    free = {}
    for name, path in places.items():
        free[name] = shutil.disk_usage(_existing_parent(path.absolute())).free // 2**20
    low = [f"{name} {mb} MB" for name, mb in free.items() if mb < need]
    detail = (f"low free space: {', '.join(low)} (need {need} MB)" if low
              else ", ".join(f"{n} {mb} MB free" for n, mb in free.items()))
    return {"ok": not low, "detail": detail, "free_mb": free, "min_free_mb": need}


def check_memory(settings: Settings) -> Check:
    import psutil

    avail = psutil.virtual_memory().available // 2**20
    need = settings.memory_min_available_mb
    return {"ok": avail >= need, "detail": f"{avail} MB available (need {need} MB)",
            "available_mb": avail}


CLAUDE_VERSION_TIMEOUT = 20.0  # seconds; a first start of claude may update itself


def check_claude(settings: Settings, timeout: float | None = None) -> Check:
    from pmtool import procs
    from pmtool.agent.binary import find_claude

    timeout = CLAUDE_VERSION_TIMEOUT if timeout is None else timeout
    binary = find_claude(settings.claude_bin)
    if not binary:
        where = settings.claude_bin or "claude on PATH"
        return {"ok": False, "detail": f"claude CLI not found ({where})",
                "hint": "npm install -g @anthropic-ai/claude-code, or set PMTOOL_CLAUDE_BIN"}
    # Through procs, not subprocess.run: a hung `claude --version` whose helper holds its
    # output open would keep run() waiting after the timeout; procs ends the whole tree.
    try:
        ending, out, err = procs.run([binary, "--version"], timeout=timeout,
                                     env={**os.environ, "DISABLE_AUTOUPDATER": "1"},
                                     label="claude-version")
    except OSError as exc:
        return {"ok": False, "detail": f"{binary} does not run: {exc}", "path": binary}
    if ending.timed_out:
        return {"ok": False, "path": binary, "timed_out": True,
                "detail": f"{binary} --version did not answer in {timeout:g}s"}
    if ending.exit_code != 0:
        return {"ok": False, "path": binary, "detail": f"{binary} --version exited "
                                                       f"{ending.exit_code}: {err.strip()[:200]}"}
    version = out.strip()
    return {"ok": True, "detail": version, "path": binary, "version": version}


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
    records, corrupt = store.scan()
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
    if corrupt:
        kept = ", ".join(str(c.moved_to) for c in corrupt)
        problems.append(f"corrupt records kept aside: {kept}")
        hints.append("read the kept files, then `pmtool recover --all` releases any lock "
                     "their agent still holds on the server")
    detail = "; ".join(problems) or f"{len(records)} live records"
    out = {"ok": not problems, "detail": detail, "records": len(records),
           "stale": [r.agent_id for r in stale], "corrupt": [str(c.moved_to) for c in corrupt]}
    if hints:
        out["hint"] = "; ".join(hints)
    return out


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
    "parked": check_parked,
}


def run_health(settings: Settings, only: list[str] | None = None, hook: bool | None = None,
               hooks_dir: str | Path | None = None) -> tuple[dict, int]:
    """Run the checks (all, or `only`) and the `health_check` hook (by default only with
    all checks; `hook` says otherwise); answer and exit code. `hooks_dir` replaces the
    setting (the run loop resolves it against the repo)."""
    names = list(only) if only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise UsageError(f"unknown check {', '.join(unknown)}",
                         hint="checks: " + ", ".join(CHECKS), valid=list(CHECKS))

    def run(name: str) -> Check:
        start = time.monotonic()
        try:
            result = CHECKS[name](settings)
        except Exception as exc:  # a check that breaks is a failed check, not a crash
            result = {"ok": False, "detail": f"check crashed: {type(exc).__name__}: {exc}"}
        return {"name": name, **result, "duration_ms": round((time.monotonic() - start) * 1000)}

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        checks = list(pool.map(run, names))
    if hook if hook is not None else not only:
        found = _health_hook(settings, hooks_dir)
        if found:
            checks.append(found)
    failed = [c for c in checks if not c["ok"]]
    answer: dict[str, Any] = {"ok": not failed, "checks": checks}
    if failed:
        # Only the server out of reach is a server error (exit 4): this machine may be fine.
        kind = "server" if all(c.get("unreachable") for c in failed) else "failed"
        answer["error"] = {"type": kind,
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
    detail = (result.get("stderr") or result.get("stdout") or "").strip().splitlines()
    return {"name": "hook:health_check", "ok": result["ok"],
            "detail": detail[-1] if detail else f"exit {result.get('exit_code')}",
            "exit_code": result.get("exit_code"), "path": result.get("path")}

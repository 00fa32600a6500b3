"""The one door to git: every git command pmtool runs goes through `run`.

pmtool runs from cron and long loops, so git must never wait for a person: no password
prompt (GIT_TERMINAL_PROMPT=0, stdin /dev/null), no editor (GIT_EDITOR=true), and a
time limit on every call. A failure carries git's own words (its stderr); git missing from
PATH is `GitMissing`, a call that ran out of time `GitTimeout` (exit 124). A test that
needs git to misbehave patches this one module (or fakes the `git` process).

Commands that talk to another machine (fetch, ls-remote, push) go through `remote`
instead: its own session (no terminal, so ssh cannot ask for a password either) and a
shorter time limit that ends the whole tree, ssh included (a dead host can hold a
connection for minutes, and an ssh left behind would hold our pipes open).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pmtool.errors import MachineFault, OperationFailed, TimeLimit, UsageError

# Long enough for `worktree add` checking out a large tree; queries pass shorter limits.
TIMEOUT = 300.0
QUERY_TIMEOUT = 30.0
# Fetches and pushes of one task's branch: long enough for a slow link, short enough that a
# dead remote costs a runner two minutes, not the ssh default of "forever".
REMOTE_TIMEOUT = float(os.environ.get("PMTOOL_GIT_REMOTE_TIMEOUT") or 120.0)
# stdin is /dev/null as well, so an ssh password prompt gets no answer instead of a wait.
QUIET_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GCM_INTERACTIVE": "never"}


class GitMissing(MachineFault):
    """git is not installed (not on PATH): a fault of the machine, not of a task."""


class GitTimeout(TimeLimit):
    """A git command ran past its time limit (it was killed)."""


class RemoteUnreachable(MachineFault):
    """The repository's remote did not answer a fetch (gone, down, refused this machine,
    or too slow): a fault of this machine's link, not of the task. Its details carry
    `remote_unreachable: true` and the remote's name, so scripts can tell it apart."""

    def __init__(self, message: str, remote: str, **details: object) -> None:
        super().__init__(message, hint=f"check `git remote -v` and that this machine can "
                                       f"reach {remote} (git ls-remote {remote})",
                         remote=remote, remote_unreachable=True, **details)


def git_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ plus `env`, with the no-prompt settings unless the caller set them."""
    full = {**os.environ, **(env or {})}
    for name, value in QUIET_ENV.items():
        full.setdefault(name, value)
    return full


def run(cwd: str | Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
        text: bool = True, timeout: float | None = TIMEOUT) -> subprocess.CompletedProcess:
    """Run `git ARGS` in `cwd`; with `check`, a non-zero exit raises OperationFailed carrying
    git's stderr. Raises GitMissing, GitTimeout, UsageError (cwd is not a directory)."""
    try:
        return _checked(subprocess.run(["git", *args], cwd=str(cwd), env=git_env(env),
                                       capture_output=True, text=text, check=False,
                                       stdin=subprocess.DEVNULL, timeout=timeout),
                        args, check, text)
    except FileNotFoundError as exc:
        # subprocess says ENOENT both for a missing program and for a missing cwd.
        if exc.filename is not None and str(exc.filename) == str(cwd):
            raise UsageError(f"{cwd} does not exist") from None
        raise GitMissing("git is not installed (not found on PATH)",
                         hint="install git (2.20 or newer)") from None
    except NotADirectoryError:
        raise UsageError(f"{cwd} is not a directory") from None
    except subprocess.TimeoutExpired:
        raise GitTimeout(f"git {args[0] if args else ''} ran past {timeout:g}s and was ended",
                         command=["git", *args]) from None


def _checked(proc: subprocess.CompletedProcess, args: tuple[str, ...], check: bool,
             text: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        stderr = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise OperationFailed(f"git {args[0]} failed: {stderr.strip() or proc.returncode}",
                              command=["git", *args], git_exit=proc.returncode)
    return proc


def remote(cwd: str | Path, *args: str,
           timeout: float = REMOTE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `git ARGS` that talks to a remote; never raises for git's own failure (the
    caller judges `returncode` and `stderr`). Raises GitMissing, GitTimeout (the whole
    tree was ended), UsageError (cwd is not a directory)."""
    import shutil

    from pmtool import procs

    if not Path(cwd).is_dir():
        raise UsageError(f"{cwd} is not a directory")
    if shutil.which("git") is None:  # under a keeper a missing program is only an exit code
        raise GitMissing("git is not installed (not found on PATH)",
                         hint="install git (2.20 or newer)")
    ending, stdout, stderr = procs.run(["git", *args], timeout=timeout, cwd=cwd,
                                       env=git_env(), label="git-remote")
    if ending.timed_out:
        raise GitTimeout(f"git {args[0] if args else ''} ran past {timeout:g}s and was ended",
                         command=["git", *args])
    code = ending.exit_code if ending.exit_code is not None else 1
    return subprocess.CompletedProcess(["git", *args], code, stdout, stderr)


def ok(cwd: str | Path, *args: str, timeout: float | None = QUERY_TIMEOUT) -> bool:
    """Whether `git ARGS` exits 0."""
    return run(cwd, *args, check=False, timeout=timeout).returncode == 0


def out(cwd: str | Path, *args: str, timeout: float | None = TIMEOUT) -> str:
    """`git ARGS`'s stdout, stripped; raises OperationFailed when git fails."""
    return run(cwd, *args, timeout=timeout).stdout.strip()


def current_branch(cwd: str | Path) -> str | None:
    """The branch checked out in `cwd`; None if detached, not a checkout, or git is missing."""
    try:
        proc = run(cwd, "symbolic-ref", "--quiet", "--short", "HEAD", check=False,
                   timeout=QUERY_TIMEOUT)
    except (OperationFailed, TimeLimit, UsageError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def toplevel(path: str | Path) -> Path | None:
    """The top of the git checkout `path` is in; None when it is in none (or no git)."""
    try:
        proc = run(path, "rev-parse", "--show-toplevel", check=False, timeout=QUERY_TIMEOUT)
    except (OperationFailed, TimeLimit, UsageError):
        return None
    top = proc.stdout.strip()
    return Path(top) if proc.returncode == 0 and top else None


def last_commit(cwd: str | Path) -> str | None:
    """`<short hash> <subject>` of HEAD in `cwd`, None when there is none."""
    try:
        proc = run(cwd, "log", "-1", "--format=%h %s", check=False, timeout=QUERY_TIMEOUT)
    except (OperationFailed, TimeLimit, UsageError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def version(timeout: float = QUERY_TIMEOUT) -> str:
    """`git --version`. Raises GitMissing, GitTimeout."""
    return run(".", "--version", timeout=timeout).stdout.strip()


def has_worktree_support(timeout: float = QUERY_TIMEOUT) -> bool:
    """Whether this git knows `git worktree` (2.5+): `git worktree -h` prints its usage."""
    probe = run(".", "worktree", "-h", check=False, timeout=timeout)
    return "usage: git worktree" in (probe.stdout + probe.stderr)


__all__ = ["GitMissing", "GitTimeout", "RemoteUnreachable", "current_branch", "git_env",
           "has_worktree_support", "last_commit", "ok", "out", "remote", "run", "toplevel",
           "version"]

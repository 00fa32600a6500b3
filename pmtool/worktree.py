"""Git worktrees per task: create one for a major task, remove it without losing work.

Layout: every task works in its own worktree `<worktree_base>/task-<id>-<hash>` (default
`<repo>/.worktrees`; the hash is of the task's `created_at`, because the server reuses task
ids, quirk 9), never shared:
- a major task on the task's own branch; a branch another task's worktree has checked out
  is a Conflict with `branch_in_use` (the runner defers the task), never a shared folder;
- a minor task (`complexity: minor` = commit straight to the main branch) on a short-lived
  branch `pmtool/task-<id>-<hash>` from the base, landed on the base by fast-forward
  afterwards (`land`), or left on that branch for review when the base moved on or the
  checkout that has the base is dirty. With `minor_in_checkout` it works in the repo
  itself as before, but only when that checkout is clean and no other task holds it
  (`<git-common-dir>/pmtool-checkout.json`).

Never losing work is the point of this module:
- a worktree with uncommitted or untracked changes is only removed after `rescue` has
  committed all of it to `refs/pmtool/rescue/task-<id>/<UTC time>`, a ref outside
  refs/heads, built with a temporary index so the task branch, the worktree's index and
  its HEAD are never touched;
- a detached HEAD whose commits no ref holds counts as dirty (removing the worktree would
  drop its reflog, the only thing that still finds them);
- the task branch is only deleted when asked and when it is merged into the base.

git is driven through its machine-stable forms only (`--porcelain -z`, `for-each-ref
--format`, `rev-parse --verify`), so output does not depend on the git release or locale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import git
from pmtool.errors import (
    Conflict,
    NothingToDo,
    OperationFailed,
    TaskFault,
    UsageError,
    disk_fault,
)
from pmtool.faults import fault
from pmtool.results import Result

if TYPE_CHECKING:
    from pmtool.hooks import HookResult

RESCUE_PREFIX = "refs/pmtool/rescue"
DEFAULT_DIR = ".worktrees"
SETUP_HOOK = "worktree_setup"
SETUP_MARKER = "pmtool-setup.json"  # in the worktree's private git dir, not in its files
# Ignored files are rescued too (a hand-edited .env is usually ignored and often the most
# valuable file in a tree), but only single files up to these sizes: ignored directories
# are node_modules, .venv and build output, which are large and can be rebuilt.
IGNORED_FILE_MAX = 1024 * 1024
IGNORED_TOTAL_MAX = 16 * 1024 * 1024
TASK_DIR_RE = re.compile(r"^task-(\d+)(?:-[0-9a-f]{6})?$")
MINOR_PREFIX = "pmtool/"  # short-lived branches of minor tasks: pmtool/task-<id>-<hash>
CHECKOUT_CLAIM = "pmtool-checkout.json"  # in the git common dir: who works in the checkout
# Branch names a major task must never work on directly (see `task_branch`).
TRUNK_NAMES = ("main", "master", "trunk", "develop")
# A ref is a file under .git/refs (and refs/remotes/origin/ when pushed): most file systems
# take 255 bytes per name, so a longer branch fails in the middle of a worktree add.
BRANCH_MAX_BYTES = 200
LEFTOVER_MESSAGE = "pmtool: uncommitted work the agent left on task {task_id}"

# A branch's git config entry saying pmtool named and made it for a task; `git branch -D`
# drops it with the branch.
MADE_MARK = "pmtoolTask"


# -- running git ---------------------------------------------------------------------------

def _git(cwd: str | Path, *args: str, env: dict[str, str] | None = None,
         check: bool = True, text: bool = True) -> subprocess.CompletedProcess:
    """Run git in `cwd` through the one door (pmtool.git)."""
    return git.run(cwd, *args, env=env, check=check, text=text)


def _ok(cwd: str | Path, *args: str) -> bool:
    return _git(cwd, *args, check=False).returncode == 0


def _out(cwd: str | Path, *args: str) -> str:
    return _git(cwd, *args).stdout.strip()


def _abs(cwd: Path, git_path: str) -> Path:
    """rev-parse answers some paths relative to cwd (`.git`), some absolute."""
    return (cwd / git_path).resolve()


def _same(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# -- repositories and branches ---------------------------------------------------------

@dataclass
class GitWorktree:
    """One entry of `git worktree list --porcelain`."""

    path: str
    head: str | None = None
    branch: str | None = None  # short name; None when detached
    bare: bool = False
    locked: str | None = None  # the reason ("" when locked without one)
    prunable: bool = False
    main: bool = False


def git_worktrees(repo: str | Path) -> list[GitWorktree]:
    """Every worktree git knows for `repo`; the first is the main checkout."""
    proc = _git(repo, "worktree", "list", "--porcelain", "-z", check=False)
    sep = "\0"
    if proc.returncode != 0 and "not a git repository" not in proc.stderr:
        # -z arrived in git 2.36; older git (Ubuntu 22.04 has 2.34) prints one per line.
        proc, sep = _git(repo, "worktree", "list", "--porcelain", check=False), "\n"
    if proc.returncode != 0 and "is not a git command" in proc.stderr:
        # git before 2.5 has no worktrees at all: a fault of the machine, not of the repo.
        raise OperationFailed(f"this git has no `git worktree`: {proc.stderr.strip()}",
                              hint="install git 2.20 or newer")
    if proc.returncode != 0:
        raise UsageError(f"{repo} is not in a git repository",
                         hint="pass --repo PATH, or run from inside the repository",
                         git=proc.stderr.strip())
    entries: list[GitWorktree] = []
    current: GitWorktree | None = None
    for line in proc.stdout.split(sep):
        if not line:
            current = None
            continue
        key, _, value = line.partition(" ")
        if key == "worktree":
            current = GitWorktree(path=value, main=not entries)
            entries.append(current)
        elif current is None:
            continue
        elif key == "HEAD":
            current.head = value
        elif key == "branch":
            current.branch = value.removeprefix("refs/heads/")
        elif key == "bare":
            current.bare = True
        elif key == "locked":
            current.locked = value
        elif key == "prunable":
            current.prunable = True
    return entries


def repo_root(path: str | Path | None = None) -> Path:
    """The main checkout of the repository that `path` (default: cwd) is in.

    From inside a task worktree this is still the main repository, so commands run in a
    worktree act on the repo, not on a worktree of a worktree.
    """
    where = Path(path or ".").expanduser()
    if not where.is_dir():
        raise UsageError(f"{where} is not a directory",
                         hint="pass --repo PATH of a git repository")
    main = git_worktrees(where)[0]
    if main.bare:
        raise UsageError(f"{main.path} is a bare repository; pmtool needs a checkout",
                         hint="pass --repo PATH of a repository with a working tree")
    return Path(main.path)


def default_branch(repo: str | Path) -> str:
    """The branch tasks start from: origin's HEAD, else the main checkout's branch,
    else main or master."""
    root = repo_root(repo)
    remote_head = _git(root, "symbolic-ref", "--quiet", "refs/remotes/origin/HEAD", check=False)
    if remote_head.returncode == 0:
        return remote_head.stdout.strip().removeprefix("refs/remotes/origin/")
    current = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if current.returncode == 0 and current.stdout.strip():
        return current.stdout.strip()
    for name in ("main", "master"):
        if _ok(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{name}"):
            return name
    raise UsageError(f"cannot tell the default branch of {root}", hint="pass --base REF")


def start_point(repo: str | Path, base: str) -> str:
    """The ref a new task branch starts from: the local branch `base`, else
    origin's, else `base` as any commit-ish (tag, sha, origin/main)."""
    for ref in (f"refs/heads/{base}", f"refs/remotes/origin/{base}", base):
        if _ok(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"):
            return ref
    raise UsageError(f'base "{base}" is not a branch or commit in {repo}',
                     hint="pass --base REF (a repository needs one commit before worktrees)")


def task_branch(branch: str | None, base: str, task_id: int) -> tuple[str, str | None]:
    """The branch a major task works on, and a note when it is not the task's own.

    A major task needs its own branch (its work goes through a PR), but the server's
    `branch` field is free text and is often "main". Working on the base branch in a
    worktree would also be refused by git while the main checkout has it. So a missing,
    trunk-like or base-equal branch becomes `task-<id>`.
    """
    fallback = f"task-{task_id}"
    if not branch:
        return fallback, f"the task has no branch; using {fallback}"
    trunk = {base, base.removeprefix("origin/"), *TRUNK_NAMES}
    if branch in trunk or branch.removeprefix("origin/") in trunk:
        return fallback, (f"the task's branch \"{branch}\" is a base branch; a major task works "
                          f"on its own branch: {fallback}")
    return branch, None


def check_branch_name(repo: str | Path, branch: str) -> None:
    """TaskFault unless `branch` is a name git takes as a branch (`--upload-pack=x`,
    `../../etc`, `a b`, `a..b`, `-b` are not), and short enough for a ref file.

    Checked before any git command that could read the name as an option or a path;
    `check-ref-format --branch NAME` itself takes NAME as an operand, whatever it starts with.
    """
    if not branch or len(branch.encode()) > BRANCH_MAX_BYTES:
        raise TaskFault(f"the task's branch name is empty or longer than {BRANCH_MAX_BYTES} "
                        f"bytes ({len(branch.encode())})", branch=branch[:100],
                        hint="give the task a shorter branch name")
    if branch.startswith("-") or not _ok(repo, "check-ref-format", "--branch", branch):
        raise TaskFault(f'"{branch}" is not a valid git branch name', branch=branch,
                        hint="give the task a branch git accepts (git check-ref-format)")


def workspace_name(task_id: int, created_at: str | None = None) -> str:
    """`task-<id>-<hash>`: the server reuses ids (quirk 9), so a new task with an old id
    must not find the old task's folder; the hash of `created_at` tells them apart.
    `task-<id>` when the creation time is unknown."""
    if not created_at:
        return f"task-{int(task_id)}"
    return f"task-{int(task_id)}-{hashlib.sha1(str(created_at).encode()).hexdigest()[:6]}"


def worktree_path(repo: str | Path, task_id: int, worktree_base: str | Path | None = None,
                  created_at: str | None = None) -> Path:
    """`<worktree_base>/task-<id>-<hash>`; a relative base is taken from the repo root, so
    the answer does not depend on where pmtool was started."""
    base = Path(worktree_base).expanduser() if worktree_base else Path(DEFAULT_DIR)
    if not base.is_absolute():
        base = Path(repo) / base
    return Path(os.path.normpath(base / workspace_name(task_id, created_at)))


def _exclude(repo: Path, folder: Path) -> None:
    """Keep the worktree folder out of the main checkout's `git status`.

    info/exclude rather than .gitignore: it is local to this clone and changes no file the
    project tracks.
    """
    try:
        rel = folder.resolve().relative_to(repo.resolve())
    except ValueError:
        return  # outside the repository: nothing to hide
    line = f"/{rel.as_posix()}/"
    exclude = _abs(repo, _out(repo, "rev-parse", "--git-common-dir")) / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text() if exclude.exists() else ""
    if line in text.splitlines():
        return
    with open(exclude, "a") as fh:
        fh.write(("" if not text or text.endswith("\n") else "\n")
                 + "# task worktrees made by pmtool\n" + line + "\n")


# -- the user's checkout, for minor tasks with minor_in_checkout ---------------------------

def _claim_path(root: Path) -> Path:
    return _abs(root, _out(root, "rev-parse", "--git-common-dir")) / CHECKOUT_CLAIM


def _checkout_holder(root: Path) -> dict[str, Any] | None:
    """Who works in the main checkout now: the claim, if its owner process lives."""
    from pmtool.records import pid_alive

    try:
        claim = json.loads(_claim_path(root).read_text())
    except (OSError, ValueError):
        return None
    pid = claim.get("pid") if isinstance(claim, dict) else None
    return claim if isinstance(pid, int) and pid_alive(pid, claim.get("pid_started")) else None


def _claim_checkout(root: Path, task_id: int, created_at: str | None,
                    owner_pid: int | None) -> None:
    """Take the main checkout for one task: refused while it is dirty (the agent's
    `git add -A` would take its owner's work into the task's commit) or held by another
    live task (two agents in one folder)."""
    from pmtool.records import process_started

    dirty = dirty_paths(root)
    if dirty:
        raise Conflict(f"the checkout {root} has {len(dirty)} uncommitted changes; a minor "
                       "task never works in a dirty checkout",
                       hint="commit or stash them, or leave minor_in_checkout off so minor "
                            "tasks get their own worktree", path=str(root),
                       dirty=dirty[:50], checkout_in_use=True)
    me = {"task_id": int(task_id), "created_at": created_at}
    path = _claim_path(root)
    # Read, decide and write under one lock: two runners taking the checkout at once
    # must not both see it free.
    with _locked(path.with_name(path.name + ".lock")):
        holder = _checkout_holder(root)
        if holder and {k: holder.get(k) for k in me} != me:
            raise Conflict(f"the checkout {root} is in use by task {holder.get('task_id')} "
                           f"(pid {holder.get('pid')})",
                           hint="the task waits until that one is finished", path=str(root),
                           held_by_task=holder.get("task_id"), checkout_in_use=True)
        pid = owner_pid or os.getpid()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**me, "pid": pid, "pid_started": process_started(pid)}))
        os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def release_checkout(repo: str | Path, task_id: int) -> bool:
    """Free the main checkout if task `task_id` holds it; True if it did."""
    root = repo_root(repo)
    path = _claim_path(root)
    if not path.exists():
        return False
    with _locked(path.with_name(path.name + ".lock")):
        try:
            claim = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(claim, dict) or claim.get("task_id") != int(task_id):
            return False
        path.unlink(missing_ok=True)
        return True


# -- landing a minor task --------------------------------------------------------------------

@dataclass
class Landing(Result):
    """`land`'s answer: whether a minor task's branch landed on `base`, and why (`reason`);
    `note` is the sentence for the task's notes. `nothing_to_land` (the branch is the base
    already) is in its JSON only when set."""

    landed: bool
    branch: str | None
    base: str
    head: str | None = None
    reason: str | None = None
    nothing_to_land: bool | None = None
    note: str | None = None

    OPTIONAL = ("nothing_to_land",)


def land(repo: str | Path, path: str | Path, base: str) -> Landing:
    """Fast-forward the base branch to a minor task's branch, or say why it stays there.

    Answers a `Landing` (`landed`, `branch`, `base`, `head`, `reason`, `note`: the sentence
    for the task's notes, saying which happened). Lands only by fast-forward (never a
    merge or a rebase nobody reviewed), and never writes to a checkout that has the base
    checked out while it is dirty or another task holds it: then the work stays on its
    branch for review, and `reason` says why.
    """
    answer = _land(repo, path, base)
    if answer.landed:
        answer.note = (f"minor task: landed on {answer.base} by fast-forward "
                       f"({(answer.head or '')[:12]})")
    else:
        answer.note = (f"minor task: left on branch {answer.branch} for review, not "
                       f"on {answer.base}: {answer.reason}")
    return answer


def _land(repo: str | Path, path: str | Path, base: str) -> Landing:
    root = repo_root(repo)
    base = base.removeprefix("origin/")
    wt = next((w for w in git_worktrees(root) if _same(w.path, path)), None)
    branch = wt.branch if wt else None
    answer = Landing(landed=False, branch=branch, base=base)
    if not branch:
        answer.reason = f"{path} has no branch checked out"
        return answer
    head = _out(root, "rev-parse", f"refs/heads/{branch}")
    answer.head = head
    tip = _git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{base}", check=False)
    old = tip.stdout.strip()
    if not old:
        answer.reason = f"there is no local branch {base} to land on"
        return answer
    if old == head:
        answer.reason, answer.nothing_to_land = "no commits to land", True
        return answer
    if not _ok(root, "merge-base", "--is-ancestor", old, head):
        answer.reason = f"{base} moved on since the task started; left on {branch} for review"
        return answer
    holder = next((w for w in git_worktrees(root) if w.branch == base and not w.prunable), None)
    if holder is None:
        # Nobody has the base checked out: move the ref, only if it is still where we saw it.
        if not _ok(root, "update-ref", "-m", f"pmtool: land {branch}", f"refs/heads/{base}",
                   head, old):
            answer.reason = f"{base} moved while landing; left on {branch} for review"
            return answer
    else:
        if dirty_paths(holder.path):
            answer.reason = (f"{holder.path} has {base} checked out with uncommitted "
                                f"changes; pmtool never writes to a dirty checkout; left on "
                                f"{branch} for review")
            return answer
        taken = _checkout_holder(root) if holder.main else None
        if taken:
            answer.reason = (f"task {taken.get('task_id')} works in {holder.path}; left on "
                                f"{branch} for review")
            return answer
        merged = _git(holder.path, "merge", "--ff-only", "--quiet", branch, check=False)
        if merged.returncode != 0:
            answer.reason = (f"fast-forward of {base} in {holder.path} failed "
                                f"({merged.stderr.strip()}); left on {branch} for review")
            return answer
    answer.landed, answer.reason = True, f"fast-forwarded {base} to {head[:12]}"
    return answer


# -- the remote's copy ---------------------------------------------------------------------

@dataclass
class Synced(Result):
    """`sync_branch`'s answer (a new worktree's `sync`): the remote, whether it has the
    branch, what was found and done here (`local`), a rescue ref and a note when said."""

    remote: str
    branch_on_remote: bool
    local: str | None = None
    rescued: str | None = None
    note: str | None = None


def sync_branch(root: Path, branch: str, base: str, label: str) -> Synced | None:
    """Bring the task's branch and the base from the repository's remote, before a worktree
    is made: machines hand work over only through the remote, and a machine that never
    fetched would start QA (or a bounced task) from the base instead of the work.

    Answers a `Synced` (`remote`, `branch_on_remote`, `local`, `rescued`, `note`); `local`
    says what was found and done: "missing" (the worktree starts from the remote's copy),
    "same", "behind" (fast-forwarded to the remote's copy), "ahead" (kept: it holds the
    remote's copy and more), "diverged" (the local commits kept on `rescued`, a rescue ref,
    and the branch set to the remote's copy), "only_local". A repository without a remote
    answers None and nothing is touched. Never pushes, never rewrites the remote.
    Raises RemoteUnreachable when the remote cannot be read (GitTimeout past the limit).
    """
    names = remotes(root)
    if not names:
        return None
    name = names[0]
    try:
        return _sync_from(root, name, branch, base, label)
    except git.GitTimeout as exc:  # a dead host, a hung ssh: the same machine fault
        raise git.RemoteUnreachable(f"remote {name} did not answer: {exc.message}",
                                    remote=name, branch=branch) from None


def _sync_from(root: Path, name: str, branch: str, base: str, label: str) -> Synced:
    base = base.removeprefix(f"{name}/").removeprefix("origin/")
    wanted = {f"refs/heads/{b}" for b in (base, branch)}
    listed = git.remote(root, "ls-remote", "--heads", "--", name, *sorted(wanted))
    if listed.returncode != 0:
        raise git.RemoteUnreachable(f"cannot reach remote {name} to fetch {branch}: "
                                    f"{listed.stderr.strip()[-300:] or listed.returncode}",
                                    remote=name, branch=branch)
    there = {ref: sha for sha, _, ref in (line.partition("\t") for line in
                                           listed.stdout.splitlines()) if ref in wanted}
    specs = [f"+{ref}:refs/remotes/{name}/{ref.removeprefix('refs/heads/')}"
             for ref, sha in sorted(there.items())
             if _rev(root, f"refs/remotes/{name}/{ref.removeprefix('refs/heads/')}") != sha]
    if specs:
        fetched = git.remote(root, "fetch", "--quiet", "--no-tags", "--", name, *specs)
        if fetched.returncode != 0:
            raise git.RemoteUnreachable(f"cannot fetch {branch} from remote {name}: "
                                        f"{fetched.stderr.strip()[-300:]}", remote=name,
                                        branch=branch)
    answer = Synced(remote=name, branch_on_remote=f"refs/heads/{branch}" in there)
    _follow_remote(root, branch, f"refs/remotes/{name}/{branch}"
                   if answer.branch_on_remote else None, label, answer)
    return answer


def _rev(root: Path, ref: str) -> str | None:
    proc = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    return proc.stdout.strip() or None


def _follow_remote(root: Path, branch: str, remote_ref: str | None, label: str,
                   answer: Synced) -> None:
    """Set the local branch to the remote's copy when that loses nothing (missing, behind),
    or after keeping the local commits on a rescue ref (diverged); `answer` says which."""
    local = _rev(root, f"refs/heads/{branch}")
    theirs = _rev(root, remote_ref) if remote_ref else None
    if theirs is None or remote_ref is None:
        answer.local = "only_local" if local else "missing"
        return
    if local is None:
        answer.local = "missing"
        return
    if local == theirs:
        answer.local = "same"
        return
    if _ok(root, "merge-base", "--is-ancestor", theirs, local):
        answer.local = "ahead"  # this machine's commits on top of the remote's: keep
        return
    ref = None
    if not _ok(root, "merge-base", "--is-ancestor", local, theirs):
        ref = _keep_commit(root, label, local)
    # The old value makes update-ref refuse if the branch moved since we looked.
    _git(root, "update-ref", "-m", f"pmtool: follow {remote_ref}", f"refs/heads/{branch}",
         theirs, local)
    if ref is None:
        answer.local = "behind"
        answer.note = (f"branch {branch} fast-forwarded to "
                       f"{remote_ref.removeprefix('refs/remotes/')} ({theirs[:12]})")
        return
    answer.local, answer.rescued = "diverged", ref
    answer.note = (f"branch {branch} here had diverged from "
                   f"{remote_ref.removeprefix('refs/remotes/')}: its commits "
                   f"({local[:12]}) are kept at {ref}, and the work goes on from the "
                   f"remote's copy ({theirs[:12]}); restore with "
                   f"`git switch -c rescued-{label} {ref}`")


def _keep_commit(root: Path, label: str, commit: str) -> str:
    """A new rescue ref pointing at `commit` (never overwriting one)."""
    for n in range(1, 50):
        ref = f"{RESCUE_PREFIX}/{label}/{_stamp()}-diverged" + (f"-{n}" if n > 1 else "")
        if _ok(root, "update-ref", ref, commit, ""):
            return ref
    raise OperationFailed(f"could not create a rescue ref for {label}")


# -- create ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorktreeOptions:
    """Where and how a task's worktree is made: the knobs that travel together from the
    settings (pmtool.work.options.worktree_options) to `create_worktree`.

    `base`: the branch new work starts from (None: the repo's default branch);
    `worktree_base`: the folder of the worktrees (None: `<repo>/.worktrees`); `hooks_dir`
    and `hook_timeout`: where worktree_setup is found and how long it may run;
    `minor_in_checkout`: a minor task works in the repo's clean checkout itself.
    """

    base: str | None = None
    worktree_base: str | Path | None = None
    hooks_dir: str | Path | None = None
    hook_timeout: float = 30.0
    minor_in_checkout: bool = False


@dataclass
class Workspace(Result):
    """`create_worktree`'s answer: where the task works. The optional fields (the last
    seven) are in its JSON only when set."""

    ok: bool
    path: str | None
    worktree: str | None
    branch: str | None
    base: str
    created: bool
    task_id: int
    complexity: str
    hook: HookResult | None = None
    note: str | None = None
    lands_on: str | None = None
    on_base: bool | None = None
    in_checkout: bool | None = None
    leftover_removed: dict[str, Any] | None = None
    sync: Synced | None = None
    branch_source: str | None = None

    OPTIONAL = ("note", "lands_on", "on_base", "in_checkout", "leftover_removed", "sync",
                "branch_source")


def create_worktree(repo: str | Path, task_id: int, branch: str | None,
                    complexity: str | None = "major", options: WorktreeOptions | None = None,
                    *, context: dict[str, Any] | None = None, created_at: str | None = None,
                    owner_pid: int | None = None, live_paths: Iterable[str] | None = None,
                    follow_up: bool = False) -> Workspace:
    """Give task `task_id` a place to work, its own; answer where.

    `options` (WorktreeOptions: base, worktree base, setup hook, minor_in_checkout) say
    where and how. Answers a `Workspace` (`ok`, `path`, `worktree`, `branch`, `base`,
    `created`, `task_id`, `complexity`, `hook`) and, when something is worth saying, `note`.
    - minor: a worktree at `worktree_path(...)` on `pmtool/task-<id>-<hash>` from the base,
      with `lands_on` the base (see `land`). With `minor_in_checkout`: `path` is the repo
      itself, `worktree` null, `branch` the base, and only when the checkout is clean and
      no other live task holds it (claimed for `owner_pid`; `release_checkout` frees it);
      else a Conflict.
    - major: a worktree at `worktree_path(...)` on the task branch (`task_branch`), made
      from `base` if the branch does not exist locally (from origin's copy if there is one,
      so QA sees the developer's pushed work). A second call answers the existing worktree
      with `created: false`. A branch checked out anywhere else (another task's worktree,
      the main checkout) is a Conflict with `branch_in_use` and `checked_out_at`: two
      tasks never share a folder. Given `live_paths` (the worktrees of this machine's task
      records), a pmtool worktree holding the branch that is not among them and that no
      process works in is a leftover: it is removed first (its work rescued; said in
      `leftover_removed`).
    - before a new worktree is made, the branch and the base are fetched from the remote
      (`sync_branch`, answered as `sync`): the branch is made from, or set to, the
      remote's copy, a diverged local branch kept on a rescue ref first; a new branch
      starts from the remote's base when the local one is behind it.
    - `follow_up` (QA's review, a task QA sent back): a major task whose branch exists
      neither here nor on the remote has nothing to review or continue: NothingToDo with
      `no_branch`, instead of a branch made from the base.
    - runs the `worktree_setup` hook in a new worktree (and again on a later call if it
      failed last time); `ok` is false when it failed, and the worktree is kept.
    Raises UsageError (not a repository, bad base or branch), Conflict (path taken,
    branch held by the main checkout), OperationFailed (git failed), RemoteUnreachable
    (the fetch found no remote to answer), NothingToDo (`follow_up` with no branch).
    """
    opts = options or WorktreeOptions()
    worktree_base, hooks_dir, hook_timeout = opts.worktree_base, opts.hooks_dir, opts.hook_timeout
    root = repo_root(repo)
    task_id = int(task_id)
    complexity = complexity or "major"
    if complexity not in ("major", "minor"):
        raise UsageError(f'unknown complexity "{complexity}"', valid=["major", "minor"])
    base = opts.base or default_branch(root)
    start = start_point(root, base)
    answer = Workspace(ok=True, path=None, worktree=None, branch=None, base=base,
                       created=False, task_id=task_id, complexity=complexity)

    if complexity == "minor" and opts.minor_in_checkout:
        current = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        on = current.stdout.strip() or None
        _claim_checkout(root, task_id, created_at, owner_pid)
        answer.path, answer.branch = str(root), base
        answer.on_base, answer.in_checkout = on == base.removeprefix("origin/"), True
        if not answer.on_base:
            answer.note = (f"the main checkout is on {on or 'a detached HEAD'}, not {base}; "
                           f"a minor task commits on {base}: switch the checkout first")
        return answer

    note = None
    if complexity == "minor":
        # Its own short-lived branch: the base may be checked out by its owner (git
        # keeps a branch in one worktree), and the work lands by fast-forward later.
        branch = MINOR_PREFIX + workspace_name(task_id, created_at)
        answer.lands_on = base.removeprefix("origin/")
    else:
        branch, note = task_branch(branch, base, task_id)
    check_branch_name(root, branch)
    path = worktree_path(root, task_id, worktree_base, created_at)
    _exclude(root, path.parent)
    if note:
        answer.note = note

    worktrees = git_worktrees(root)
    here = next((w for w in worktrees if _same(w.path, path)), None)
    if here and not here.prunable:
        return _existing(answer, here, branch, hooks_dir, hook_timeout, context, root)

    holder = next((w for w in worktrees if w.branch == branch and not w.prunable), None)
    if holder and holder.main:
        raise Conflict(f"branch {branch} is checked out in the main checkout {holder.path}; "
                       "git keeps a branch in one worktree at a time",
                       hint=f"switch {holder.path} to another branch, then run this again",
                       branch=branch, checked_out_at=holder.path, branch_in_use=True)
    if holder and live_paths is not None and _leftover(root, holder, live_paths,
                                                      worktree_base):
        # A finished or given-back task's folder that nobody works in: its commits stay on
        # the branch, anything uncommitted goes to a rescue ref, then the branch is free.
        gone = remove_worktree(root, holder.path, rescue=True, worktree_base=worktree_base)
        answer.leftover_removed = {"path": holder.path,
                                   "rescued": gone.rescued.ref if gone.rescued else None}
        holder = None
    if holder:
        # Another task works on this branch: sharing its folder is how one task's cleanup
        # removed the other's work. Wait for it (the caller defers the task).
        held_by, _ = _label(holder)
        raise Conflict(f"branch {branch} is checked out in {holder.path}"
                       + (f" (task {held_by})" if held_by is not None else "")
                       + "; a task never shares another task's worktree",
                       hint="the task waits until that one is finished and its worktree "
                            "removed (pmtool worktree list shows it)",
                       branch=branch, checked_out_at=holder.path, held_by_task=held_by,
                       branch_in_use=True)

    if here and here.prunable:
        # Registered, but its folder is gone (deleted by hand): clear git's note of it.
        _git(root, "worktree", "prune")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise Conflict(f"{path} exists and is not a worktree of {root}",
                       hint="move it away (pmtool does not delete what it did not make), "
                            "or set HEADLESS_PM_WORKTREE_BASE elsewhere", path=str(path))

    sync = sync_branch(root, branch, base, f"task-{task_id}")
    remote = sync.remote if sync else "origin"
    if sync:
        answer.sync = sync
        if sync.note:
            answer.note = "; ".join(filter(None, [answer.note, sync.note]))
        start = _newest_base(root, start, f"refs/remotes/{remote}/{base.removeprefix('origin/')}")
    if _ok(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"):
        args, source = [str(path), branch], "existing"
    elif _ok(root, "rev-parse", "--verify", "--quiet", f"refs/remotes/{remote}/{branch}"):
        args, source = (["--track", "-b", branch, str(path), f"{remote}/{branch}"],
                        f"{remote}/{branch}")
    elif follow_up and complexity == "major":
        where = f"on remote {sync.remote}" if sync else "on any remote (none)"
        raise NothingToDo(f"nothing to review: branch {branch} exists neither here nor "
                          f"{where}", branch=branch, no_branch=True,
                          remote=sync.remote if sync else None,
                          hint="the machine that did the work must push it (push = true, "
                               "PMTOOL_PUSH=1), or it is worked on that machine")
    else:
        # --no-track: a branch started from origin/main must not get origin/main as its
        # upstream, or a plain `git push` from the agent would aim at main.
        args, source = ["--no-track", "-b", branch, str(path), start], f"new from {base}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_fault(exc, path.parent) or exc from None
    added = _git(root, "worktree", "add", *args, check=False)
    if added.returncode != 0:
        # A full, read-only or closed worktree base fails every task alike: the machine's.
        machine = disk_fault(added.stderr, path.parent)
        if machine is not None:
            raise machine
        # Another pmtool may have made it a moment ago: that is the idempotent case.
        now = git_worktrees(root)
        again = next((w for w in now if _same(w.path, path)), None)
        if again:
            return _existing(answer, again, branch, hooks_dir, hook_timeout, context, root)
        taken = next((w for w in now if w.branch == branch and not w.prunable), None)
        if taken:
            # Another task's worktree took the branch between our look and our add: wait.
            raise Conflict(f"branch {branch} was just checked out in {taken.path}; a task "
                           "never shares another task's worktree", branch=branch,
                           checked_out_at=taken.path, held_by_task=_label(taken)[0],
                           branch_in_use=True)
        # The task's branch or path, not the machine: park the task, go on to the next one.
        raise TaskFault(f"git worktree add failed: {added.stderr.strip()}",
                        path=str(path), branch=branch)
    if source.startswith("new") and (complexity == "minor" or note):
        # Named and made by pmtool (task-<id>, pmtool/task-...), not the task's own
        # branch: `remove_worktree` takes it away again while it holds no work.
        _git(root, "config", f"branch.{branch}.{MADE_MARK}", str(task_id), check=False)
    answer.path = answer.worktree = str(path)
    answer.branch, answer.created, answer.branch_source = branch, True, source
    _setup(answer, hooks_dir, hook_timeout, context, root)
    return answer


def _newest_base(root: Path, start: str, remote_base: str) -> str:
    """The remote's base when the local base is only behind it (a new branch then starts
    from the newest work); the local one when it has commits of its own (a landed minor
    task not pushed yet), or when it is the same."""
    theirs, ours = _rev(root, remote_base), _rev(root, start)
    if theirs and ours and theirs != ours and _ok(root, "merge-base", "--is-ancestor", ours,
                                                   theirs):
        return remote_base
    return start


def _leftover(root: Path, wt: GitWorktree, live_paths: Iterable[str],
              worktree_base: str | Path | None) -> bool:
    """A pmtool worktree that no task record on this machine names and no process is in."""
    task_id, _ = _label(wt)
    managed = task_id is not None and _same(Path(wt.path).parent,
                                            worktree_path(root, 0, worktree_base).parent)
    if not managed or wt.locked is not None:
        return False
    if any(_same(wt.path, live) for live in live_paths if live):
        return False
    return not _users(wt.path)


def _existing(answer: Workspace, wt: GitWorktree, branch: str,
              hooks_dir: str | Path | None, hook_timeout: float,
              context: dict[str, Any] | None, root: Path) -> Workspace:
    answer.path = answer.worktree = wt.path
    answer.branch, answer.created = wt.branch or branch, False
    if wt.branch != branch:
        # Not switched: the worktree may hold work on the branch it has.
        answer.note = (f"the worktree has {wt.branch or 'a detached HEAD'} checked out, "
                       f"not {branch}; left as it is")
    # Not "ok": it failed, or a kill cut it short ("running"), or the worktree was made
    # before its marker: run it again (setup hooks must be idempotent, README).
    if _setup_state(Path(wt.path)) != "ok":
        _setup(answer, hooks_dir, hook_timeout, context, root)
    return answer


def _setup_marker(path: Path) -> Path | None:
    proc = _git(path, "rev-parse", "--git-dir", check=False)
    return _abs(path, proc.stdout.strip()) / SETUP_MARKER if proc.returncode == 0 else None


def _setup_state(path: Path) -> str | None:
    marker = _setup_marker(path)
    try:
        return json.loads(marker.read_text()).get("state") if marker else None
    except (OSError, ValueError):
        return None


def _setup(answer: Workspace, hooks_dir: str | Path | None, hook_timeout: float,
           context: dict[str, Any] | None, root: Path) -> None:
    """Run worktree_setup in the worktree; remember the outcome so a failure is retried."""
    from pmtool.hooks import find_hook, run_hook

    if not hooks_dir or not find_hook(SETUP_HOOK, hooks_dir):
        return
    assert answer.path is not None
    ctx = {**(context or {}), "task_id": answer.task_id, "worktree": answer.path,
           "branch": answer.branch, "base": answer.base, "repo": str(root),
           "complexity": answer.complexity}
    marker = _setup_marker(Path(answer.path))
    _mark_setup(marker, {"state": "running", "at": _stamp()})
    fault("setup")
    result = run_hook(SETUP_HOOK, hooks_dir, ctx, timeout=hook_timeout, cwd=answer.path)
    answer.hook = result
    answer.ok = result.ok
    _mark_setup(marker, {"state": "ok" if result.ok else "failed", "at": _stamp(),
                         "exit_code": result.exit_code})


def forget_setup(path: str | Path) -> None:
    """Make the next `create_worktree` of this worktree run worktree_setup again: what it
    started (a watcher, a dev server) was ended with a dead runner's leftovers."""
    if Path(path).is_dir():
        _mark_setup(_setup_marker(Path(path)), {"state": "ended", "at": _stamp()})


def _mark_setup(marker: Path | None, state: dict[str, Any]) -> None:
    if marker:
        with contextlib.suppress(OSError):
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, marker)


# -- dirty state and rescue ------------------------------------------------------------

def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _parse_status(raw: str) -> list[dict[str, str]]:
    """`git status --porcelain -z` records -> [{"status": "XY", "path": ...}]."""
    items, parts, i = [], raw.split("\0"), 0
    while i < len(parts):
        rec = parts[i]
        i += 1
        if len(rec) < 4:
            continue
        status, path = rec[:2], rec[3:]
        item = {"status": status, "path": path}
        if "R" in status or "C" in status:
            item["from"] = parts[i]  # renames carry the old path as the next record
            i += 1
        items.append(item)
    return items


def dirty_paths(path: str | Path) -> list[dict[str, str]]:
    """Uncommitted changes and untracked files (not ignored ones), as git status says."""
    proc = _git(path, "status", "--porcelain", "-z", "--untracked-files=all",
                "--ignore-submodules=none", env={"GIT_OPTIONAL_LOCKS": "0"})
    return _parse_status(proc.stdout)


def _unreachable_head(path: str | Path) -> str | None:
    """The HEAD commit of a detached worktree when no branch, tag or rescue ref holds it."""
    head = _git(path, "rev-parse", "--verify", "--quiet", "HEAD", check=False).stdout.strip()
    if not head or _ok(path, "symbolic-ref", "--quiet", "HEAD"):
        return None
    holders = _out(path, "for-each-ref", "--count=1", "--format=%(refname)", "--contains",
                   head, "refs/heads", "refs/remotes", "refs/tags", RESCUE_PREFIX)
    return None if holders else head


def _ignored_files(path: Path) -> tuple[list[str], list[str]]:
    """Ignored paths to rescue (small single files) and to leave (folders, big files)."""
    proc = _git(path, "status", "--porcelain", "-z", "--ignored=matching",
                "--untracked-files=all", env={"GIT_OPTIONAL_LOCKS": "0"})
    take, leave, total = [], [], 0
    for item in _parse_status(proc.stdout):
        if item["status"] != "!!":
            continue
        name = item["path"]
        full = path / name
        size = full.lstat().st_size if full.is_file() and not full.is_symlink() else -1
        if name.endswith("/") or size < 0 or size > IGNORED_FILE_MAX \
                or total + size > IGNORED_TOTAL_MAX:
            leave.append(name)
            continue
        take.append(name)
        total += size
    return take, leave


def _identity_env(path: Path) -> dict[str, str]:
    """A committer for the rescue commit when the machine has none configured: a rescue
    must not fail for want of user.name on a fresh agent box."""
    if _ok(path, "var", "GIT_COMMITTER_IDENT") and _ok(path, "var", "GIT_AUTHOR_IDENT"):
        return {}
    return {"GIT_AUTHOR_NAME": "pmtool", "GIT_AUTHOR_EMAIL": "pmtool@localhost",
            "GIT_COMMITTER_NAME": "pmtool", "GIT_COMMITTER_EMAIL": "pmtool@localhost"}


@dataclass
class Rescued(Result):
    """`rescue`'s answer: the ref and commit that hold a worktree's uncommitted state, the
    HEAD it sits on, the files it saved (`{"status", "path"}`), the ignored files taken
    and left, and the command that restores it."""

    ref: str
    commit: str
    head: str | None
    files: list[dict[str, str]]
    ignored_included: list[str]
    ignored_left: list[str]
    restore: str


def _rescue_commit(root: Path, path: Path, label: str,
                   include_ignored: bool = True) -> Rescued:
    """Commit the worktree's whole content to a new rescue ref; touch nothing else."""
    head = _git(path, "rev-parse", "--verify", "--quiet", "HEAD", check=False).stdout.strip()
    real_index = _abs(path, _out(path, "rev-parse", "--git-path", "index"))
    with tempfile.TemporaryDirectory(prefix="pmtool-rescue-") as tmp:
        index = Path(tmp) / "index"
        env = {"GIT_INDEX_FILE": str(index)}
        # Start from a copy of the real index (its stat cache makes `add -A` fast on big
        # trees); the real one is never written, so staged state is left exactly as it was.
        if real_index.exists():
            shutil.copyfile(real_index, index)
        elif head:
            _git(path, "read-tree", head, env=env)
        _git(path, "add", "-A", "--", ".", env=env)
        taken, left = _ignored_files(path) if include_ignored else ([], [])
        for i in range(0, len(taken), 200):
            _git(path, "add", "-f", "--", *taken[i:i + 200], env=env)
        tree = _out_env(path, env, "write-tree")
    found = _same_rescue(root, label, tree, head)
    if found:
        # The same content, already saved (a finish that rescued and was then cut short,
        # or rescued before the worktree went): one ref, not two copies.
        ref, commit = found
    else:
        ref, commit = _new_rescue(root, path, label, tree, head)
    diff_args = ["diff-tree", "-r", "-z", "--no-renames", "--name-status"]
    diff = _out(root, *diff_args, head, commit) if head else _out(root, *diff_args, "--root",
                                                                   commit)
    fields = diff.split("\0")
    files = [{"status": fields[i], "path": fields[i + 1]}
             for i in range(0, len(fields) - 1, 2)]
    return Rescued(ref=ref, commit=commit, head=head or None, files=files,
                   ignored_included=taken, ignored_left=left,
                   restore=f"git switch -c rescued-{label} {ref}")


def _new_rescue(root: Path, path: Path, label: str, tree: str, head: str) -> tuple[str, str]:
    message = (f"pmtool rescue of {label}\n\nworktree: {path}\nrepo: {root}\n"
               f"head: {head or '(none)'}\n")
    commit_args = ["commit-tree", "--no-gpg-sign", tree, "-m", message]
    if head:
        commit_args[2:2] = ["-p", head]
    commit = _out_env(path, _identity_env(path), *commit_args)
    ref = f"{RESCUE_PREFIX}/{label}/{_stamp()}"
    for n in range(2, 50):
        # The empty old value makes update-ref refuse to overwrite an existing rescue.
        if _ok(root, "update-ref", ref, commit, ""):
            return ref, commit
        ref = f"{RESCUE_PREFIX}/{label}/{_stamp()}-{n}"
    raise OperationFailed(f"could not create a rescue ref for {label}")


def _same_rescue(root: Path, label: str, tree: str, head: str) -> tuple[str, str] | None:
    """The newest rescue ref of `label` holding exactly `tree` on top of `head`, if any."""
    refs = _out(root, "for-each-ref", "--sort=-refname",
                "--format=%(refname) %(objectname) %(tree) %(parent)", f"{RESCUE_PREFIX}/{label}")
    for line in refs.splitlines():
        ref, commit, its_tree, *parent = line.split(" ")
        if its_tree == tree and (parent[0] if parent else "") == (head or ""):
            return ref, commit
    return None


def _out_env(path: Path, env: dict[str, str], *args: str) -> str:
    return _git(path, *args, env=env).stdout.strip()


def _label(wt: GitWorktree) -> tuple[int | None, str]:
    match = TASK_DIR_RE.match(Path(wt.path).name)
    if match:
        return int(match.group(1)), f"task-{match.group(1)}"
    return None, re.sub(r"[^A-Za-z0-9_.-]", "_", Path(wt.path).name) or "worktree"


def _find(root: Path, path_or_task_id: str | int | Path,
          worktree_base: str | Path | None) -> GitWorktree:
    worktrees = git_worktrees(root)
    target = str(path_or_task_id)
    if target.isdigit():
        task_id = int(target)
        expected = worktree_path(root, task_id, worktree_base)
        found = next((w for w in worktrees if _same(w.path, expected)), None)
        if not found:
            named = [w for w in worktrees[1:] if (m := TASK_DIR_RE.match(Path(w.path).name))
                     and int(m.group(1)) == task_id]
            if len(named) > 1:  # a reused id (quirk 9): the path says which one
                raise UsageError(f"task {task_id} has {len(named)} worktrees: "
                                 + ", ".join(w.path for w in named),
                                 hint="pass the worktree's path instead of the task id")
            found = named[0] if named else None
        if not found:
            # Already gone is the usual reason: exit 3 lets a cleanup step be re-run.
            raise NothingToDo(f"no worktree for task {task_id} in {root}", task_id=task_id)
        wt = found
    else:
        given = next((w for w in worktrees if _same(w.path, Path(target).expanduser())), None)
        if not given:
            raise UsageError(f"{target} is not a worktree of {root}",
                             hint="pmtool worktree list shows them")
        wt = given
    if wt.main:
        raise UsageError(f"{wt.path} is the main checkout, not a task worktree; "
                         "pmtool never removes it")
    return wt


def rescue(repo: str | Path, path_or_task_id: str | int | Path,
           worktree_base: str | Path | None = None,
           include_ignored: bool = True) -> Rescued:
    """Commit a worktree's uncommitted state to `refs/pmtool/rescue/<task-N>/<time>`.

    Answers a `Rescued` (`ref`, `commit`, `head`, `files`, `ignored_included`,
    `ignored_left`, `restore`). The task branch, the worktree's index and HEAD are untouched. Raises
    NothingToDo when there is nothing uncommitted.
    """
    root = repo_root(repo)
    wt = _find(root, path_or_task_id, worktree_base)
    _, label = _label(wt)
    if not dirty_paths(wt.path) and not _unreachable_head(wt.path):
        raise NothingToDo(f"{wt.path} has nothing uncommitted to rescue")
    return _rescue_commit(root, Path(wt.path), label, include_ignored)


# -- after the agent: leftover work, push ------------------------------------------------

@dataclass
class LeftoverCommit(Result):
    """`commit_leftover`'s answer: the commit pmtool made, and the paths it took."""

    commit: str
    files: list[str]


def commit_leftover(path: str | Path, task_id: int) -> LeftoverCommit | None:
    """Commit what the agent left uncommitted in `path` (tracked and untracked files, not
    ignored ones) on the branch checked out there, as a commit of its own whose message
    says pmtool made it; None when the tree is clean.

    Answers a `LeftoverCommit` (`commit`, `files`). Commit hooks are skipped
    (`--no-verify`): a hook that refuses would leave the work where no reviewer looks.
    Raises OperationFailed when git cannot commit (the caller rescues to a ref instead).
    """
    where = Path(path)
    dirty = dirty_paths(where)
    if not dirty:
        return None
    _git(where, "add", "-A", "--", ".")
    message = (LEFTOVER_MESSAGE.format(task_id=task_id) + "\n\nThe agent stopped with "
               "these changes uncommitted; pmtool committed them so that they are on the "
               "task branch, where the next person looks.\n\nCommitted-by: pmtool\n")
    _git(where, "commit", "--no-verify", "--no-gpg-sign", "-q", "-m", message,
         env=_identity_env(where))
    return LeftoverCommit(_out(where, "rev-parse", "HEAD"), [d["path"] for d in dirty])


def remotes(repo: str | Path) -> list[str]:
    """The repository's remotes (`origin` first when there is one)."""
    names = _out(repo, "remote").split()
    return sorted(names, key=lambda name: name != "origin")


@dataclass
class Pushed(Result):
    """`push_branch`'s answer; `reason` (why not pushed) is in its JSON only when set."""

    pushed: bool
    remote: str | None
    branch: str
    reason: str | None = None

    OPTIONAL = ("reason",)


def push_branch(repo: str | Path, branch: str) -> Pushed:
    """Push `branch` to the repository's remote (origin if there is one), never forced.

    Answers a `Pushed` (`pushed`, `remote`, `branch`) with `reason` when not pushed (no
    remote, a bad name, git refused: its words). Never raises for the push's sake: a
    branch that did not get out stays on this machine and the task's notes say so.
    """
    answer = Pushed(pushed=False, remote=None, branch=branch)
    names = remotes(repo)
    if not names:
        answer.reason = "the repository has no remote"
        return answer
    answer.remote = names[0]
    try:
        check_branch_name(repo, branch)
    except TaskFault as exc:
        answer.reason = exc.message
        return answer
    ref = f"refs/heads/{branch}"
    try:  # bounded, never prompting: a dead remote must not hold the finish
        proc = git.remote(repo, "push", "--porcelain", "--", names[0], f"{ref}:{ref}")
    except git.GitTimeout as exc:
        answer.reason = exc.message
        return answer
    if proc.returncode != 0:
        answer.reason = f"git push failed: {proc.stderr.strip()[-300:]}"
        return answer
    answer.pushed = True
    return answer


# -- remove, list, prune -------------------------------------------------------------------

@dataclass
class RemovedWorktree(Result):
    """`remove_worktree`'s answer; `rescued` is the rescue answer (see `rescue`) or None.
    `checkout_released` and `note` are in its JSON only when set."""

    path: str
    task_id: int | None
    branch: str | None
    removed: bool = False
    rescued: Rescued | None = None
    branch_deleted: bool = False
    branch_kept: str | None = None
    checkout_released: bool | None = None
    note: str | None = None

    OPTIONAL = ("checkout_released", "note")


def remove_worktree(repo: str | Path, path_or_task_id: str | int | Path, rescue: bool = False,
                    delete_branch: bool = False, base: str | None = None,
                    worktree_base: str | Path | None = None) -> RemovedWorktree:
    """Remove a task worktree (by path or task id) without losing work.

    Answers a `RemovedWorktree` (`path`, `task_id`, `branch`, `removed`, `rescued`,
    `branch_deleted`, `branch_kept`); `rescued` is the rescue answer (see `rescue`) or None.
    Raises Conflict (dirty without `rescue`, with `dirty` listing the paths; locked),
    NothingToDo (no worktree for that task id), UsageError (not a worktree; the main checkout).
    """
    root = repo_root(repo)
    given = str(path_or_task_id)
    freed = given.isdigit() and release_checkout(root, int(given))
    try:
        wt = _find(root, path_or_task_id, worktree_base)
    except NothingToDo:
        if not freed:
            raise
        # A minor task that worked in the checkout (minor_in_checkout): nothing to
        # remove, the checkout is free for the next task.
        return RemovedWorktree(str(root), int(given), None, checkout_released=True)
    task_id, label = _label(wt)
    answer = RemovedWorktree(wt.path, task_id, wt.branch)
    if wt.locked is not None:
        raise Conflict(f"worktree {wt.path} is locked"
                       + (f" ({wt.locked})" if wt.locked else ""),
                       hint=f"git worktree unlock {wt.path}", path=wt.path)
    if wt.prunable or not Path(wt.path).is_dir():
        _git(root, "worktree", "prune")
        answer.removed, answer.note = True, "its folder was already gone; git's entry was pruned"
    else:
        dirty = dirty_paths(wt.path)
        lost_head = _unreachable_head(wt.path)
        if (dirty or lost_head) and not rescue:
            names = [d["path"] for d in dirty]
            shown = ", ".join(names[:5]) + (f", +{len(names) - 5} more" if len(names) > 5 else "")
            what = f"{len(dirty)} uncommitted changes ({shown})" if dirty else ""
            if lost_head:
                what += ("; " if what else "") + f"a detached HEAD {lost_head[:12]} " \
                                                 "that no branch holds"
            raise Conflict(f"worktree {wt.path} has {what}",
                           hint="commit them, or add --rescue to save everything to "
                                f"{RESCUE_PREFIX}/{label}/<time> before removing",
                           path=wt.path, task_id=task_id, dirty=dirty[:500],
                           dirty_count=len(dirty), detached_head=lost_head)
        if dirty or lost_head:
            answer.rescued = _rescue_commit(root, Path(wt.path), label)
        # Without a rescue, no --force: git checks cleanliness again itself, which closes
        # the gap between our check and the removal (an agent still writing).
        force = ["--force"] if answer.rescued else []
        removed = _git(root, "worktree", "remove", *force, wt.path, check=False)
        if removed.returncode != 0:
            raise Conflict(f"git refused to remove {wt.path}: {removed.stderr.strip()}",
                           hint="it changed since it was checked; run again, or --rescue",
                           path=wt.path)
        answer.removed = True
    if delete_branch or (answer.removed and _made_here(root, wt.branch)):
        # A branch pmtool made for the task goes with its worktree when it holds nothing
        # the base lacks (a mistyped task id, a task given back unworked); with work on it
        # it stays, whatever was asked.
        _delete_branch(root, answer, base)
    return answer


def _made_here(root: Path, branch: str | None) -> bool:
    """Whether pmtool named and made `branch` (not the task's branch, nor origin's)."""
    return bool(branch) and _ok(root, "config", "--get", f"branch.{branch}.{MADE_MARK}")


def _delete_branch(root: Path, answer: RemovedWorktree, base: str | None) -> None:
    branch = answer.branch
    if not branch:
        answer.branch_kept = "the worktree had no branch (detached HEAD)"
        return
    base = base or default_branch(root)
    if branch in (base, base.removeprefix("origin/")):
        answer.branch_kept = f"{branch} is the base branch"
        return
    holder = next((w for w in git_worktrees(root) if w.branch == branch), None)
    if holder:
        answer.branch_kept = f"{branch} is checked out in {holder.path}"
        return
    merged = _git(root, "merge-base", "--is-ancestor", f"refs/heads/{branch}",
                  start_point(root, base), check=False)
    if merged.returncode != 0:
        answer.branch_kept = f"{branch} is not merged into {base}"
        return
    # -D after our own check: `branch -d` would test against the main checkout's HEAD,
    # which need not be the base.
    _git(root, "branch", "-D", branch)
    answer.branch_deleted = True


def list_worktrees(repo: str | Path, records: Iterable[Any] | None = None,
                   worktree_base: str | Path | None = None) -> list[dict[str, Any]]:
    """Every worktree of the repo (the main checkout first), with its dirty state and the
    task and agent it belongs to (from `records`, TaskRecords, else from its folder name).

    Each: `{"path", "branch", "head", "main", "managed", "task_id", "agent_id", "dirty",
    "changes", "locked", "prunable"}`; `managed` means pmtool made it (task-N under the
    worktree base); `dirty` is null when the folder is gone.
    """
    root = repo_root(repo)
    base_dir = worktree_path(root, 0, worktree_base).parent
    by_path = {os.path.realpath(r.worktree): r for r in records or () if r.worktree}
    out = []
    for wt in git_worktrees(root):
        record = by_path.get(os.path.realpath(wt.path))
        task_id, _ = _label(wt)
        managed = task_id is not None and _same(Path(wt.path).parent, base_dir)
        exists = Path(wt.path).is_dir() and not wt.prunable
        dirty = dirty_paths(wt.path) if exists else None
        out.append({
            "path": wt.path, "branch": wt.branch, "head": wt.head, "main": wt.main,
            "managed": managed,
            "task_id": record.task_id if record else (task_id if managed else None),
            "agent_id": record.agent_id if record else None,
            "dirty": None if dirty is None else bool(dirty or _unreachable_head(wt.path)),
            "changes": None if dirty is None else len(dirty),
            "locked": wt.locked is not None, "prunable": wt.prunable,
        })
    return out


def _users(path: str) -> list[int]:
    """Processes working inside `path` (their cwd): an agent nobody recorded, still busy."""
    import psutil

    inside, found = os.path.realpath(path), []
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and (cwd == inside or cwd.startswith(inside + os.sep)):
            found.append(proc.pid)
    return found


@dataclass
class Pruned(Result):
    """`prune`'s answer: the worktrees removed (each a `RemovedWorktree`'s JSON, or under
    `dry_run` what would go), and the ones kept (`{"path", "task_id", "reason", ...}`)."""

    removed: list[dict[str, Any]]
    kept: list[dict[str, Any]]
    dry_run: bool


def prune(repo: str | Path, live_task_ids: Iterable[int], rescue: bool = False,
          worktree_base: str | Path | None = None, dry_run: bool = False) -> Pruned:
    """Remove pmtool's worktrees (task-N under the worktree base) of tasks no record
    refers to; a dirty one is kept and reported unless `rescue`. Worktrees pmtool did not
    make, and ones a process is working in, are never touched.

    Answers a `Pruned` (`removed`: remove answers, `kept`: `{"path", "task_id", "reason",
    ...}`, `dry_run`).
    """
    root = repo_root(repo)
    live = {int(t) for t in live_task_ids}
    removed: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    for item in list_worktrees(root, worktree_base=worktree_base):
        if not item["managed"]:
            continue
        task_id, path = item["task_id"], item["path"]
        if task_id in live:
            kept.append({"path": path, "task_id": task_id, "reason": "a task record refers to it"})
            continue
        users = [] if item["prunable"] else _users(path)
        if users:
            kept.append({"path": path, "task_id": task_id, "reason": "processes work in it",
                         "pids": users})
            continue
        if dry_run:
            removed.append({"path": path, "task_id": task_id, "removed": False,
                            "would_remove": True, "dirty": item["dirty"]})
            continue
        try:
            removed.append(remove_worktree(root, path, rescue=rescue,
                                           worktree_base=worktree_base).to_json())
        except Conflict as exc:
            kept.append({"path": path, "task_id": task_id, "reason": exc.message,
                         **{k: v for k, v in exc.details.items() if k not in ("path",
                                                                               "task_id")}})
    return Pruned(removed=removed, kept=kept, dry_run=dry_run)

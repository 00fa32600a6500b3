"""Doing the work: `worktree create|remove|land|list|prune` and `hook run`.

Each command resolves settings and the task record, calls one function of
`pmtool.worktree` or `pmtool.hooks`, and emits its answer. The libraries are imported
inside the commands, so `pmtool --help` does not pay for them.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pmtool.cli import app, emit, options, plural, read_json_arg, say
from pmtool.cli.options import (
    AgentIdOrNone,
    Base,
    HooksDir,
    Repo,
    TaskArg,
    TaskIdAlias,
    WorktreeBase,
    record_store,
    resolve_task,
    server,
)
from pmtool.errors import NothingToDo, TimeLimit, UsageError, exit_code

if TYPE_CHECKING:
    from pmtool.hooks import HookResult
    from pmtool.records import TaskRecord

worktree_app = typer.Typer(help="One git worktree per task, never shared; removal never "
                                "loses work.",
                           no_args_is_help=True)
app.add_typer(worktree_app, name="worktree")
hook_app = typer.Typer(help="Run the hooks of the hooks folder with a task's context.",
                       no_args_is_help=True)
app.add_typer(hook_app, name="hook")


def _repo_of(repo: str | None, record: "TaskRecord | None" = None) -> Path:
    from pmtool.worktree import repo_root

    if repo is None and record is not None and record.worktree and Path(record.worktree).is_dir():
        return repo_root(record.worktree)  # the worktree knows its repository
    return repo_root(repo)


@worktree_app.command("create")
def worktree_create(
    task: TaskArg = None,
    agent_id: AgentIdOrNone = None,
    task_id: TaskIdAlias = None,
    branch: Annotated[str | None, typer.Option(
        "--branch", help="The task's branch (the server's `branch` field).")] = None,
    complexity: Annotated[str | None, typer.Option(
        "--complexity", help="major (own worktree and branch) or minor (own worktree on a "
                             "short-lived branch that lands on the base; the checkout "
                             "itself with PMTOOL_MINOR_IN_CHECKOUT) [default: the task's, "
                             "else major].")] = None,
    repo: Repo = None,
    base: Base = None,
    hooks_dir: HooksDir = None,
    worktree_base: WorktreeBase = None,
) -> int:
    """Give a task its own place to work: a worktree on the task branch for a major task,
    on a short-lived pmtool/task-<id>-<hash> branch for a minor one (the repo's clean
    checkout with PMTOOL_MINOR_IN_CHECKOUT). Runs the worktree_setup hook in a new worktree.
    A branch another task's worktree has checked out is exit 5: tasks never share one.

    A second call answers the existing worktree with "created": false. With --agent-id the
    task record's worktree and branch are updated. A branch named like the base ("main")
    becomes task-<id>. Exit 1 when worktree_setup failed (the worktree is kept), 124 when it
    ran out of time.

    A new worktree's branch and base are fetched from the remote first ("sync"): a local
    branch that diverged is kept on a rescue ref. Exit 1 with "remote_unreachable" when
    the remote does not answer; with --agent-id, exit 3 with "no_branch" for QA's review
    (or a bounced task) whose branch is neither here nor on the remote.
    TASK is not looked up on the server: this command works offline, from what a claim
    printed (its id and branch), and a lookup would cost a list of every task (the server
    has no single-task read). A mistyped TASK gets a worktree and a task-<id> branch that
    `worktree remove TASK` takes away again, branch included while it holds no work.

    Example: pmtool worktree create --agent-id dev_001 --repo ~/src/app

    Example: pmtool worktree create 7 --branch feature/login --base main
    """
    from pmtool.hooks import task_context
    from pmtool.work.claim import task_workspace
    from pmtool.work.options import worktree_options
    from pmtool.worktree import create_worktree

    task_id = resolve_task(task, task_id)
    settings = options().settings(hooks_dir=hooks_dir, worktree_base=worktree_base)
    extra: dict[str, Any] = {}
    if agent_id:
        store = record_store(settings)
        record = store.need(agent_id)
        if task_id is not None and task_id != record.task_id:
            raise UsageError(f"task {task_id} is not the task of {agent_id}'s record "
                             f"({record.task_id})")
        root = _repo_of(repo, record)
        result, _record = task_workspace(store, agent_id, root, settings,
                                         worktree_options(settings, root, base=base),
                                         branch=branch, complexity=complexity,
                                         client=server(settings))
        extra["record"] = str(store.path(agent_id))
    elif task_id is None:
        raise UsageError("give --agent-id, or the TASK (with --branch for a major task)",
                         hint="pmtool worktree create 7 --branch feature/login")
    else:
        root = _repo_of(repo, None)
        result = create_worktree(
            root, task_id, branch, complexity, worktree_options(settings, root, base=base),
            context=task_context(state_dir=settings.state_path, api_url=settings.api_url,
                                 task_id=task_id, branch=branch))
    if result.note:
        say(f"pmtool: worktree: {result.note}")
    answer = {k: v for k, v in result.to_json().items() if k != "ok"} | extra
    if not result.ok:
        hook = result.hook
        say(f"pmtool: worktree_setup failed ({_hook_why(hook) if hook else None}); the "
            f"worktree is kept at {result.path}")
        emit(answer, ok=False)
        return exit_code({"ok": False, "timed_out": hook.timed_out if hook else None})
    emit(answer)
    return exit_code(None)


@worktree_app.command("remove")
def worktree_remove(
    target: Annotated[str | None, typer.Argument(
        metavar="TASK|PATH", help="The task's id, or the worktree's path.")] = None,
    agent_id: AgentIdOrNone = None,
    task_id: TaskIdAlias = None,
    rescue: Annotated[bool, typer.Option(
        "--rescue", help="Commit uncommitted and untracked work (and small ignored files "
                         "such as .env) to refs/pmtool/rescue/task-<id>/<time> first.")
    ] = False,
    delete_branch: Annotated[bool, typer.Option(
        "--delete-branch", help="Also delete the task branch, if it is merged into the base.")
    ] = False,
    repo: Repo = None,
    base: Base = None,
    worktree_base: WorktreeBase = None,
) -> None:
    """Remove a task worktree; never loses work.

    A worktree with uncommitted or untracked changes is refused (exit 5, listing them)
    unless --rescue. Commits on the task branch always stay; the branch itself is deleted
    only when merged into the base, and then with --delete-branch, or when pmtool named and
    made it (task-<id>, pmtool/task-...). Exit 3 when the task has no worktree.

    Example: pmtool worktree remove 7 --rescue

    Example: pmtool worktree remove --agent-id dev_001 --delete-branch
    """
    from pmtool.worktree import remove_worktree

    if task_id is not None:
        if target is not None and target != str(task_id):
            raise UsageError(f"{target} and --task-id {task_id} name different worktrees",
                             hint="give one of them")
        target = str(task_id)
    settings = options().settings(worktree_base=worktree_base)
    store, record = record_store(settings), None
    if agent_id:
        record = store.need(agent_id)
        if not record.worktree:
            raise NothingToDo(f"task {record.task_id} has no worktree",
                              task_id=record.task_id)
        in_checkout = Path(record.worktree).resolve() == _repo_of(repo, record).resolve()
        # minor_in_checkout: the task id frees the checkout; nothing is removed.
        target = target or (str(record.task_id) if in_checkout else record.worktree)
    if target is None:
        raise UsageError("give the worktree's path or task id, or --agent-id",
                         hint="pmtool worktree list")
    root = _repo_of(repo, record) if repo or record or target.isdigit() else _repo_near(target)
    result = remove_worktree(root, target, rescue=rescue, delete_branch=delete_branch,
                             base=base, worktree_base=settings.worktree_base)
    if result.rescued:
        say(f"pmtool: worktree: rescued {plural(len(result.rescued.files), 'file')} to "
            f"{result.rescued.ref}")
    if record is not None and result.removed:
        record.worktree = None
        record.step("worktree_removed", path=result.path,
                    rescue_ref=result.rescued.ref if result.rescued else None)
        store.save(record)
    emit(result)


@worktree_app.command("land")
def worktree_land(
    target: Annotated[str | None, typer.Argument(
        help="The minor task's worktree path.")] = None,
    agent_id: AgentIdOrNone = None,
    repo: Repo = None,
    base: Base = None,
) -> None:
    """Land a minor task's work on the base branch by fast-forward, or leave it on its
    branch for review when the base moved on or the checkout that has it is dirty.

    Prints {"landed", "branch", "base", "head", "reason", "note"}; exit 0 either way
    (`note` is the sentence for the task's notes). pmtool never merges or rebases here,
    and never writes to a dirty checkout.

    Example: pmtool worktree land --agent-id dev_001
    """
    from pmtool.worktree import default_branch, land

    settings = options().settings()
    record = record_store(settings).need(agent_id) if agent_id else None
    target = target or (record.worktree if record else None)
    if not target:
        raise UsageError("give the worktree's path, or --agent-id")
    root = _repo_of(repo, record) if repo or record else _repo_near(target)
    emit(land(root, target, base or default_branch(root)))


def _repo_near(path: str) -> Path:
    """The repository of a worktree path; from the cwd when the folder is already gone."""
    from pmtool.worktree import repo_root

    where = Path(path).expanduser()
    return repo_root(where if where.is_dir() else None)


@worktree_app.command("list")
def worktree_list(repo: Repo = None, worktree_base: WorktreeBase = None) -> None:
    """List the repo's worktrees with their task, agent and dirty state.

    Example: pmtool worktree list | jq '.worktrees[] | select(.dirty)'
    """
    from pmtool.worktree import list_worktrees

    settings = options().settings(worktree_base=worktree_base)
    records, corrupt = record_store(settings).scan()
    root = _repo_of(repo)
    emit({"repo": str(root),
          "worktrees": list_worktrees(root, records, worktree_base=settings.worktree_base),
          "corrupt_records": [str(c.moved_to) for c in corrupt]})


@worktree_app.command("prune")
def worktree_prune(
    repo: Repo = None,
    rescue: Annotated[bool, typer.Option(
        "--rescue", help="Rescue dirty worktrees and remove them too (default: keep them).")
    ] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Say what would be removed; remove nothing.")] = False,
    worktree_base: WorktreeBase = None,
) -> None:
    """Remove pmtool's task worktrees that no task record on this machine refers to.

    Dirty ones are kept and listed unless --rescue; worktrees pmtool did not make, and ones
    a process is working in, are never touched. Branches are kept.

    Example: pmtool worktree prune --dry-run
    """
    from pmtool.worktree import prune

    settings = options().settings(worktree_base=worktree_base)
    records, corrupt = record_store(settings).scan()
    result = prune(_repo_of(repo), {r.task_id for r in records}, rescue=rescue,
                   worktree_base=settings.worktree_base, dry_run=dry_run)
    for kept in result.kept:
        if kept.get("dirty"):
            say(f"pmtool: worktree: kept {kept['path']}: {kept['reason']}")
    emit({**result.to_json(), "corrupt_records": [str(c.moved_to) for c in corrupt]})


def _hook_why(hook: "HookResult") -> str:
    if hook.error:
        return hook.error
    if hook.timed_out:
        return f"timed out after {hook.duration_s:g}s"
    last = (hook.stderr or hook.stdout).strip().splitlines()
    return f"exit {hook.exit_code}" + (f": {last[-1]}" if last else "")


@hook_app.command("run")
def hook_run(
    name: Annotated[str, typer.Argument(
        help="pre_task, post_task, worktree_setup, health_check, or any hook's name.")],
    hooks_dir: HooksDir = None,
    agent_id: AgentIdOrNone = None,
    input_: Annotated[str | None, typer.Option(
        "--input", help="Context JSON object (file, or - for stdin); merged over the "
                        "record's context.")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Seconds before the hook's whole process tree is ended "
                          "[env HEADLESS_PM_HOOK_TIMEOUT; default 30; 0 = no limit].")] = None,
    cwd: Annotated[str | None, typer.Option(
        "--cwd", help="Run the hook here [default: the record's worktree, else the current "
                      "directory].")] = None,
) -> int:
    """Run hook NAME (NAME, NAME.py or NAME.sh in the hooks folder) with a task's context.

    The context goes to the hook as JSON on stdin and as PMTOOL_* environment variables.
    Exit 0 when it passed or there is no such hook ("skipped": true), 1 when it failed or
    is not executable, 124 when it ran out of time (its whole process tree is ended).

    Example: pmtool hook run pre_task --agent-id dev_001

    Example: echo '{"task_id": 7, "outcome": "done"}' | pmtool hook run post_task --input -
    """
    from pmtool.hooks import check_name, run_hook, task_context

    check_name(name)
    settings = options().settings(hooks_dir=hooks_dir, hook_timeout=timeout)
    record = record_store(settings).need(agent_id) if agent_id else None
    context = task_context(record, state_dir=settings.state_path, api_url=settings.api_url)
    if input_ is not None:
        data = read_json_arg(input_, "--input")
        if not isinstance(data, dict):
            raise UsageError("--input must be a JSON object")
        context.update(data)
    if cwd is None and record is not None and record.worktree and Path(record.worktree).is_dir():
        cwd = record.worktree
    from pmtool import git

    repo = git.toplevel(Path(cwd or Path.cwd()))
    result = run_hook(name, settings.hooks_path(repo), context,
                      timeout=settings.hook_timeout, cwd=cwd,
                      api_key=settings.api_key if settings.pass_key_to_hooks else None)
    answer = result.to_json()
    ok = answer.pop("ok")
    if result.skipped:
        say(f"pmtool: hook: {result.reason} (skipped)")
    elif not ok:
        say(f"pmtool: hook: {name} failed: {_hook_why(result)}")
        if result.timed_out:
            answer["error"] = TimeLimit(f"hook {name} ran out of time: {_hook_why(result)}",
                                        hint="raise --timeout or HEADLESS_PM_HOOK_TIMEOUT"
                                        ).to_json()
        elif result.error:
            answer["error"] = {"type": "failed", "message": result.error}
    emit(answer, ok=ok)
    return exit_code({**answer, "ok": ok})

"""The finish of a task once its agent gave a verdict, one recorded step at a time:

    leftover -> push -> status -> post_task -> worktree -> closed (history)

- leftover: what the agent left uncommitted is committed on the task branch as a commit
  of its own that says pmtool made it (`leftover = commit`), or saved to a rescue ref and
  the task given back (`leftover = rescue`);
- push: the task branch goes to the repository's remote when `push` is on;
- status: the verdict's status, with notes naming the branch, its head commit, any
  rescue ref, whether it was pushed, and what the agent runs cost (`summary`);
- post_task: the user's hook, started at most once (a kill during it does not start it
  again: a hook that sends mail must not send two);
- worktree: removed (anything left dirty is rescued to a ref first, never lost);
- closed: the record goes to the history, once.

Each step is noted in the task record (a `finish` step naming its `part`) before the
next begins, so a kill at any point is completed by the next start of the agent
(`pmtool run` resumes its record) or by `pmtool recover`, from the first step not noted.
Steps are written to be run twice safely (a kill between a step's deed and its note).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pmtool.errors import NothingToDo, OperationFailed, PmtoolError, RecordCorrupt
from pmtool.faults import fault
from pmtool.records import RecordStore, TaskRecord, now_iso
from pmtool.results import Result
from pmtool.work.accounting import accounting, summary

if TYPE_CHECKING:
    from pmtool.client import PMApi

STEP = "finish"
# The last step name of a run that produced a verdict (pmtool.run.loop writes it).
VERDICT_STEP = "agent-done"
AGENT_START_STEPS = ("agent_starting", "agent_running")

Emit = Callable[..., None]


@dataclass(frozen=True)
class FinishPlan:
    """What the finish needs beyond the record: where, which hooks, which policies."""

    repo: Path | None = None  # None: the repository of the record's worktree
    hooks_dir: str | None = None
    hook_timeout: float = 30.0
    leftover: str = "commit"  # pmtool.settings.Leftover
    push: bool = False
    state_dir: str | None = None
    api_url: str | None = None
    base: str | None = None  # where a minor task lands (default: the repo's default branch)
    # The API key for post_task, only with pass_key_to_hooks; never shown in a repr.
    hook_key: str | None = field(default=None, repr=False)
    limits: Any = None  # pmtool.failure_policy.Limits: the bounce cap for QA's fail, attempts
    settings: Any = None  # when given, the hooks folder is found for the task's repo

    def hooks(self, repo: Path | None) -> str | None:
        """The hooks folder: as given, or the settings' one found for `repo` (a relative
        folder is the repo's, not the directory cron runs recover in)."""
        if self.settings is not None:
            return str(self.settings.hooks_path(repo))
        return self.hooks_dir


@dataclass
class FinishedTask(Result):
    """The finish's answer (`finish_task`: `pmtool finish --full`, the runner's finish,
    recover's `finished` entries): the verdict's `outcome`, what the server was told
    (`action`, `status`, with the `notes`), where the work is (`branch` at `head`,
    `rescued` ref, `pushed`), whether post_task `ran`, and whether the `worktree` went."""

    task_id: int
    outcome: str
    action: str | None
    status: str | None
    branch: str | None
    head: str | None
    rescued: str | None
    pushed: bool | None
    post_task: str | None
    worktree: bool | None
    notes: str | None


@dataclass
class LeftToRunner(Result):
    """The `finisher`'s answer when a live runner of the agent holds its lock: that runner
    completes the finish (`reason` says so)."""

    action: str = "left to its runner"
    status: str | None = None
    reason: str = ""


FinishAnswer = FinishedTask | LeftToRunner  # what the `finisher` answers

# -- reading the record --------------------------------------------------------------------


def kept_verdict(record: TaskRecord) -> dict[str, Any] | None:
    """The verdict of an agent run that ended before a stop, if no run started since.
    pm-runner.sh: the jq that reads a record from before (agent-done, or agent_finished)."""
    for step in reversed(record.steps):
        if step.get("step") == VERDICT_STEP:
            return step.get("verdict")
        if step.get("step") in AGENT_START_STEPS:
            return None
    return None


def transcript_verdict(store: RecordStore, record: TaskRecord) -> dict[str, Any] | None:
    """The verdict of the record's last agent run as pmtool's transcript holds it, for a
    runner killed after claude's result line reached the transcript but before the
    verdict was noted (`VERDICT_STEP`); None when that run gave none.

    Only the run the last `agent_starting` step began counts (its `start` line is not
    older than the step): an earlier run's result in the same transcript (a --resume
    appends) is no verdict for this one.
    """
    from pmtool.agent.claude import log_paths
    from pmtool.agent.stream import parse_stream

    last = next((s for s in reversed(record.steps)
                 if s.get("step") in (VERDICT_STEP, "agent_starting")), None)
    if last is None or last["step"] == VERDICT_STEP or not last.get("session_id"):
        return None
    path, _err = log_paths(store.state_dir / "logs", record.task_id, last["session_id"])
    run: list[str] | None = None  # the lines of that run, once its start line is read
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            mark = _pmtool_line(line)
            if mark.get("event") == "start":
                run = [] if str(mark.get("at") or "") >= str(last.get("at") or "") else None
            elif run is not None:
                run.append(line)
    if not run:
        return None
    said = parse_stream(run, record.role)
    if not said["has_result"] or said["is_error"] or said["outcome"] is None:
        return None
    return {"outcome": said["outcome"], "summary": said["summary"],
            "model": last.get("model") or record.model,
            "num_turns": said["num_turns"], "source": "transcript"}


def _pmtool_line(line: str) -> dict[str, Any]:
    """A line pmtool wrote into a transcript (`{"type": "pmtool", ...}`), else {}."""
    if '"pmtool"' not in line:
        return {}
    with contextlib.suppress(ValueError):
        obj = json.loads(line)
        if isinstance(obj, dict) and obj.get("type") == "pmtool":
            return obj
    return {}


def kept_or_transcript_verdict(store: RecordStore, record: TaskRecord) -> dict[str, Any] | None:
    """The record's verdict: the one noted, else the one its transcript holds
    (`transcript_verdict`), which is noted now, so that the finish goes on from it and
    the agent is not run again to give the same verdict twice."""
    verdict = kept_verdict(record)
    if verdict is None:
        verdict = transcript_verdict(store, record)
        if verdict is not None:
            record.step(VERDICT_STEP, verdict=verdict)
            store.save(record)
    return verdict


def parts_done(record: TaskRecord) -> dict[str, dict[str, Any]]:
    """The finish steps noted since the last verdict, by part."""
    done: dict[str, dict[str, Any]] = {}
    for step in record.steps:
        if step.get("step") in (VERDICT_STEP, *AGENT_START_STEPS):
            done = {}
        elif step.get("step") == STEP:
            done[step["part"]] = step
    return done


def _note(store: RecordStore, record: TaskRecord, part: str, **info: Any) -> dict[str, Any]:
    record.step(STEP, part=part, **info)
    store.save(record)
    return record.steps[-1]


# -- the finish ----------------------------------------------------------------------------


def finish_task(client: PMApi, store: RecordStore, agent_id: str, plan: FinishPlan,
                emit: Emit = lambda *_a, **_k: None) -> FinishedTask:
    """Complete the finish of the agent's task from the first step not yet noted.

    The record must hold a verdict (`kept_verdict`). `emit(kind, task_id, **data)` is told
    of each step (the runner's events). Answers a `FinishedTask` (`task_id`, `outcome`,
    `action`, `status`, `branch`, `head`, `rescued`, `pushed`, `post_task`, `worktree`,
    `notes`).
    Raises NothingToDo without a record or a verdict; ServerError when the server cannot
    be reached (the record keeps every step done so far: run it again).
    """
    record = store.need(agent_id)
    verdict = kept_verdict(record)
    if verdict is None:
        raise NothingToDo(f"agent {agent_id}'s task {record.task_id} has no verdict to "
                          "finish with", hint="run the agent first (pmtool run resumes it)")
    repo = plan.repo or _repo_of(record)
    tree = task_tree(record, repo)
    done = parts_done(record)
    if "leftover" not in done:
        done["leftover"] = _leftover(store, record, tree, plan)
    if "push" not in done:
        done["push"] = _push(store, record, repo, tree, plan)
    if "land" not in done:
        done["land"] = _land(store, record, verdict, repo, tree, plan, emit)
    told = "status" in done  # told before a kill: the finished event (and notify) once
    if not told:
        done["status"] = _status(client, store, record, verdict, done, plan)
    status = done["status"]
    if not told:
        _tell(record, verdict, done, emit)
    if "post_task" not in done:
        done["post_task"] = _post_task(store, record, verdict, status, repo, plan, emit)
    if "worktree" not in done:
        done["worktree"] = _remove(store, record, repo, tree, plan, emit)
    _close(store, record, status)
    return FinishedTask(task_id=record.task_id, outcome=verdict["outcome"],
                        action=status.get("action"), status=status.get("status"),
                        branch=record.branch, head=status.get("head"),
                        rescued=done["leftover"].get("rescued"),
                        pushed=done["push"].get("pushed"),
                        post_task=done["post_task"].get("ran"),
                        worktree=done["worktree"].get("removed"), notes=status.get("notes"))


def finish_given(client: PMApi, store: RecordStore, agent_id: str, plan: FinishPlan,
                 outcome: str, summary: str | None,
                 emit: Emit = lambda *_a, **_k: None) -> FinishedTask:
    """`finish_task` with a verdict the caller gives (`pmtool finish --full`: a script has
    it from exec-claude), holding the agent's runner lock meanwhile (Conflict when a
    `pmtool run` of the agent lives).

    The verdict is noted in the record first, so a kill is completed as under `pmtool
    run` (the next `finish --full`, or `pmtool recover`). A finish already begun goes on
    with the verdict it began with: UsageError when `outcome` is another one.
    """
    from pmtool.errors import UsageError

    with store.runner_lock(agent_id):
        record = store.need(agent_id)
        kept = kept_verdict(record)
        if kept is not None and parts_done(record):
            if kept.get("outcome") != outcome:
                raise UsageError(f"task {record.task_id}'s finish was begun with outcome "
                                 f"{kept.get('outcome')}, not {outcome}",
                                 hint=f"finish it with --outcome {kept.get('outcome')}")
        else:
            record.step(VERDICT_STEP, verdict={"outcome": outcome, "summary": summary or None,
                                               "source": "finish"})
            store.save(record)
        return finish_task(client, store, agent_id, plan, emit)


def _tell(record: TaskRecord, verdict: dict[str, Any], done: dict[str, dict[str, Any]],
          emit: Emit) -> None:
    """The `finished` event (and `parked`, when the finish parked the task)."""
    status = done["status"]
    emit("finished", record.task_id, outcome=verdict["outcome"], status=status.get("status"),
         action=status.get("action"), summary=verdict.get("summary"),
         cost_usd=round(record.cost_usd, 6), branch=record.branch, head=status.get("head"),
         rescued=done["leftover"].get("rescued"), pushed=done["push"].get("pushed"),
         parked=status.get("parked"))
    if status.get("parked"):  # blocked, or QA's last bounce: a person decides now
        emit("parked", record.task_id, reason=status["parked"], status=status.get("status"))


def finisher(client: PMApi, store: RecordStore, plan: FinishPlan
             ) -> Callable[[TaskRecord], FinishedTask | LeftToRunner]:
    """`finish_task` for `pmtool recover` (pmtool.work.recover.recover's `finisher`): holds the
    agent's runner lock meanwhile, so a runner of that agent starting at the same moment
    does not finish the same task too (it finds the record closed, or waits its turn)."""
    from pmtool.errors import Conflict

    def complete(record: TaskRecord) -> FinishedTask | LeftToRunner:
        try:
            with store.runner_lock(record.agent_id):
                return finish_task(client, store, record.agent_id, plan)
        except Conflict as exc:
            return LeftToRunner(reason=exc.message)

    return complete


def notes_for(store: RecordStore, agent_id: str, outcome: str, notes: str | None) -> str:
    """What `pmtool finish` alone writes: the summary a runner's finish writes (branch,
    head, the agent runs' session, model, turns, cost, time), then the caller's notes."""
    from pmtool import git

    record = store.need(agent_id)
    where = _work_dir(record)
    if where is not None:  # where the agent's commits landed, whatever the task asked
        record.branch = git.current_branch(where) or record.branch
    text = summary(store, record, {"outcome": outcome}, head=_head(where) if where else None)
    return f"{notes}\n{text}" if notes else text  # the caller's reason first


def _work_dir(record: TaskRecord) -> Path | None:
    """Where the agent worked: the record's worktree, else its last run's directory."""
    dirs = [record.worktree] + [s.get("cwd") for s in reversed(record.steps)
                                if s.get("step") == "agent_starting"]
    return next((Path(d) for d in dirs if d and Path(d).is_dir()), None)


def _repo_of(record: TaskRecord) -> Path | None:
    from pmtool.worktree import repo_root

    if record.worktree and Path(record.worktree).is_dir():
        with contextlib.suppress(PmtoolError):
            return repo_root(record.worktree)
    return None


def task_tree(record: TaskRecord, repo: Path | None = None) -> Path | None:
    """The task's own worktree, when it has one: never the main checkout (a minor task's
    work there is the user's checkout, left as it is)."""
    repo = repo or _repo_of(record)
    if not record.worktree or repo is None:
        return None
    if os.path.realpath(record.worktree) == os.path.realpath(repo):
        return None
    return Path(record.worktree)


def _leftover(store: RecordStore, record: TaskRecord, tree: Path | None,
              plan: FinishPlan) -> dict[str, Any]:
    from pmtool import worktree as wt

    if tree is None or not tree.is_dir():
        return _note(store, record, "leftover", clean=True)
    info: dict[str, Any] = {}
    if plan.leftover == "commit":
        try:
            made = wt.commit_leftover(tree, record.task_id)
        except OperationFailed as exc:  # git would not commit: keep it on a ref instead
            made, info["commit_error"] = None, exc.message
        if made:
            info["committed"] = made.commit
            info["files"] = made.files[:50]
        elif _head_is_leftover(tree, record.task_id):
            info["committed"] = _head(tree)  # made before a kill cut the note short
    if "committed" not in info:
        with contextlib.suppress(NothingToDo):
            rescued = wt.rescue(tree, tree)
            info["rescued"] = rescued.ref
            info["files"] = [f["path"] for f in rescued.files][:50]
    fault("leftover")
    return _note(store, record, "leftover", **info)


def _head(tree: Path) -> str | None:
    from pmtool.worktree import _git

    proc = _git(tree, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
    return proc.stdout.strip() or None


def _head_is_leftover(tree: Path, task_id: int) -> bool:
    from pmtool.worktree import LEFTOVER_MESSAGE, _git

    subject = _git(tree, "log", "-1", "--format=%s", check=False).stdout.strip()
    return subject == LEFTOVER_MESSAGE.format(task_id=task_id)


def _push(store: RecordStore, record: TaskRecord, repo: Path | None, tree: Path | None,
          plan: FinishPlan) -> dict[str, Any]:
    from pmtool.worktree import push_branch

    if not plan.push:
        return _note(store, record, "push", pushed=False, reason=push_off_reason(repo))
    if repo is None or tree is None or not record.branch:
        return _note(store, record, "push", pushed=False, reason="no task branch to push")
    answer = push_branch(repo, record.branch)
    fault("push")
    return _note(store, record, "push", pushed=answer.pushed, remote=answer.remote,
                 reason=answer.reason)


def push_off_reason(repo: Path | None) -> str:
    """Why a branch was not pushed, saying where the work stays when others could see it:
    machines share work only through the remote."""
    from pmtool.worktree import remotes

    try:
        names = remotes(repo) if repo is not None else []
    except PmtoolError:
        names = []
    if not names:
        return "push is off"
    return (f"push is off: the work stays on this machine, {names[0]} and other machines "
            "do not see it (push = true, PMTOOL_PUSH=1 or --push shares it)")


def _land(store: RecordStore, record: TaskRecord, verdict: dict[str, Any],
          repo: Path | None, tree: Path | None, plan: FinishPlan,
          emit: Emit) -> dict[str, Any]:
    """A minor task's work lands on the base by fast-forward, or stays on its branch for
    review (a developer's `done`, or QA's `pass` of work left there); the notes say which."""
    from pmtool.worktree import Landing, default_branch, land

    if (record.task.get("complexity") != "minor" or tree is None or repo is None
            or verdict.get("outcome") not in ("done", "pass")):
        return _note(store, record, "land", landed=None)
    base = plan.base or default_branch(repo)
    try:
        answer = land(repo, tree, base)
    except PmtoolError as exc:
        answer = Landing(landed=False, branch=record.branch, base=base, reason=exc.message)
    if answer.nothing_to_land:
        return _note(store, record, "land", landed=None)  # e.g. QA of work that landed
    emit("landed" if answer.landed else "not_landed", record.task_id,
         branch=answer.branch, base=answer.base, head=answer.head, reason=answer.reason)
    note = answer.note or (f"minor task: left on branch {record.branch} for "
                           f"review, not on {base}: {answer.reason}")
    return _note(store, record, "land", landed=answer.landed, note=note)


def _status(client: PMApi, store: RecordStore, record: TaskRecord, verdict: dict[str, Any],
            done: dict[str, dict[str, Any]], plan: FinishPlan) -> dict[str, Any]:
    """Set the verdict's status (or give the task back when its leftover went to a rescue
    ref under `leftover = rescue`), with the summary as notes; the record stays open."""
    from pmtool.work import claim as work

    give_back = plan.leftover == "rescue" and bool(done["leftover"].get("rescued"))
    head = _head(Path(record.worktree)) if record.worktree and \
        Path(record.worktree).is_dir() else None
    notes = summary(store, record, verdict, done, head)
    target = record.previous_status if give_back else \
        work.outcome_status(record.role, verdict["outcome"], record.previous_status)
    begun = "status-begin" in done
    if not begun:
        _note(store, record, "status-begin", target=target, give_back=give_back)
    elif (found := _already_set(client, record, target)) is not None:
        # A kill came between the status change and its note: it is done, say so once.
        return _note(store, record, "status", outcome=verdict["outcome"], status=found,
                     action="given_back" if give_back else "finished", head=head,
                     notes=notes, replayed=True)
    held = _HeldClose(store)
    as_store = cast(RecordStore, held)
    result: work.Released | work.Finished  # it stands in for the store: all but close forwarded
    if give_back:  # the agent's verdict stands; the work waits on a ref for a person
        result = work.release(client, as_store, record.agent_id, notes=notes, kind="stopped",
                              limits=plan.limits)
    else:
        result = work.finish(client, as_store, record.agent_id, verdict["outcome"], notes=notes,
                             limits=plan.limits)
    fault("status")
    try:  # work.finish noted its own steps: take them along
        record.steps = store.need(record.agent_id).steps
    except RecordCorrupt:  # kept aside by need(); the finish goes on with the record it holds
        record.step("record_corrupt", part="status")
    action = "given_back" if give_back and result.action == "released" else result.action
    return _note(store, record, "status", outcome=held.outcome or verdict["outcome"],
                 status=(result.task or {}).get("status") or result.status,
                 action=action, head=head, notes=notes, parked=result.parked,
                 **{k: v for k, v in held.info.items() if k not in ("status", "parked")})


def _already_set(client: PMApi, record: TaskRecord, target: str) -> str | None:
    from pmtool.work import claim as work

    task = work.read_task(client, record.task_id)
    # `pending` too: a finish may park the task (blocked, or QA's last bounce).
    if task and task.get("status") in (target, work.PARKED) \
            and task.get("locked_by") in (None, record.agent_id):
        return task["status"]
    return None


class _HeldClose:
    """A RecordStore whose `close` only remembers: the finish closes the record itself,
    after post_task and the worktree, so a kill between them is completed later."""

    def __init__(self, store: RecordStore) -> None:
        self._store = store
        self.outcome: str | None = None
        self.info: dict[str, Any] = {}

    def close(self, record: TaskRecord, outcome: str, **info: Any) -> None:
        self.outcome, self.info = outcome, info
        self._store.save(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _post_task(store: RecordStore, record: TaskRecord, verdict: dict[str, Any],
               status: dict[str, Any], repo: Path | None, plan: FinishPlan,
               emit: Emit) -> dict[str, Any]:
    from pmtool.hooks import run_hook, task_context

    if "post_task-begin" in parts_done(record):
        # Started before a kill: never a second time (it may have sent its mail).
        emit("hook", record.task_id, hook="post_task", ok=False, skipped=True,
             reason="interrupted by a kill; not started again")
        return _note(store, record, "post_task", ran="interrupted")
    _note(store, record, "post_task-begin")
    ctx = task_context(record, state_dir=plan.state_dir, api_url=plan.api_url, **verdict,
                       status=status.get("status"), action=status.get("action"),
                       head=status.get("head"))
    result = run_hook("post_task", plan.hooks(repo), ctx, timeout=plan.hook_timeout,
                      api_key=plan.hook_key,
                      cwd=str(repo) if repo else None)
    fault("post-task")
    emit("hook", record.task_id, hook="post_task", ok=result.ok, skipped=result.skipped,
         exit_code=result.exit_code, timed_out=result.timed_out,
         duration_s=result.duration_s, stderr=result.stderr[-500:] or None)
    # post_task never blocks: its result is reported, not acted on (pm-runner.sh too).
    return _note(store, record, "post_task", ran="skipped" if result.skipped else "ran",
                 ok=result.ok, exit_code=result.exit_code)


def _remove(store: RecordStore, record: TaskRecord, repo: Path | None, tree: Path | None,
            plan: FinishPlan, emit: Emit) -> dict[str, Any]:
    answer = remove_task_worktree(record, repo, plan.base)  # also frees a held checkout
    fault("worktree-remove")
    if answer is None:
        return _note(store, record, "worktree", removed=False)
    emit("worktree", record.task_id, path=answer.get("path"), removed=answer.get("removed"),
         rescued=answer.get("rescued"), reason=answer.get("reason"))
    return _note(store, record, "worktree", **answer)


def remove_task_worktree(record: TaskRecord, repo: Path | None,
                         base: str | None = None) -> dict[str, Any] | None:
    """Remove the task's worktree; anything dirty is rescued to a ref first, never lost.
    Answers `{"path", "removed", "rescued"}` (`reason` when it stays), None when the task
    has no worktree of its own. pm-runner.sh: `finish --full`, or after a give-back
    `worktree remove --rescue`."""
    from pmtool.errors import UsageError
    from pmtool.worktree import release_checkout, remove_worktree

    repo = repo or _repo_of(record)
    if repo is not None and record.worktree and \
            os.path.realpath(record.worktree) == os.path.realpath(repo):
        release_checkout(repo, record.task_id)  # minor_in_checkout: free for the next task
        return None
    tree = task_tree(record, repo) if repo is not None else None
    if repo is None or tree is None:
        return None
    minor = record.task.get("complexity") == "minor"
    try:
        # By path: a reused task id (quirk 9) may have an older task's worktree too. A
        # minor task's short-lived branch goes once it has landed (merged), not before.
        answer = remove_worktree(repo, str(tree), rescue=True, delete_branch=minor,
                                 base=base if minor else None)
    except (NothingToDo, UsageError):
        return {"path": record.worktree, "removed": True, "rescued": None,
                "reason": "already gone"}
    except PmtoolError as exc:  # locked, or git refused: kept, and said
        return {"path": record.worktree, "removed": False, "rescued": None,
                "reason": exc.message}
    return {"path": answer.path, "removed": answer.removed,
            "rescued": answer.rescued.ref if answer.rescued else None}


def _close(store: RecordStore, record: TaskRecord, status: dict[str, Any]) -> None:
    """Close the record into the history exactly once, also when a kill came between the
    history line and the record's removal."""
    outcome = status.get("outcome") or "done"
    info = {k: status.get(k) for k in ("status", "action", "head") if status.get(k)}
    if "closing" not in parts_done(record):
        _note(store, record, "closing")
    if not _in_history(store, record):
        # What RecordStore.close does, with the fault point between its two halves; the
        # cost is every run's, crashed ones included (the record only adds finished runs).
        acc = accounting(store, record)
        record.step("closed", outcome=outcome, **info)
        store.state.append_history({"closed_at": now_iso(), "outcome": outcome,
                                    **record.to_json(), "cost_usd": acc.cost_usd,
                                    "runs": acc.to_json()})
    fault("close")
    with contextlib.suppress(FileNotFoundError):
        store.path(record.agent_id).unlink()


def _in_history(store: RecordStore, record: TaskRecord) -> bool:
    return any(h.get("claimed_at") == record.claimed_at
               for h in store.state.history(task_id=record.task_id, agent_id=record.agent_id,
                                            kind="closed"))

"""`pmtool run`: the continuous runner, a thin loop over the library functions the
subcommands use, in the same order as `scripts/pm-runner.sh`:

    health (when due) -> recover own record -> claim -> pre_task hook -> worktree ->
    exec-claude (with heartbeat) -> finish: leftover -> push -> status -> post_task hook
    -> remove worktree -> close (pmtool.work.finish, each step noted in the record)

A task the runner cannot work for reasons of its own (TaskFault: a branch git rejects,
a worktree git refuses, a worktree_setup failing twice) is parked and the runner goes on;
any other error gives the task back, so no task stays claimed with nobody on it.

Every step is one event (a dict) handed to `emit`, and kept in the runner's event log
(`StateDir.append_event`); the CLI prints them as JSON lines. The loop never releases a
lock on exit while work is in progress: a stop leaves the task record, and the next start
resumes it.

The same loop in bash is `scripts/pm-runner.sh`; a test runs one scenario through both
and compares their steps (tests/cli/test_scripts.py). Where each policy lives in the script
(`pm-runner.sh:` comments below mark the same places here; "none" is a difference):

    one runner per agent (runner lock)   none; PMTOOL_RUNNER_PID marks the record instead
    live runner of our record -> exit 5  the first `recover` loop, action "running"
    health before claiming               none (scripts/cron-health.sh, from cron)
    claim wait / idle                    `claim --wait "$wait"`
    verdict kept across a stop           the record's agent_finished or agent-done step
    pre_task failure (--on-hook-failure) always give_back (release); never asks
    worktree failure                     give_back "no worktree: ..."
    poison task (TaskFault) -> parked    none: `worktree create` fails, give_back
    agent failure (--on-agent-failure)   exec-claude's `next`: the same next_step, under
                                         the on_agent_failure setting; no --escalate or
                                         --task-budget-usd; `park` given back as well
    heartbeat                            exec-claude re-registers every --heartbeat s
    task moved or given away mid-work    none (no reconciliation; `recover --orphans`
                                         from the PM's cron puts it back)
    server away (exit 4)                 `pause 10` (fixed), record kept
    cooldown after a give-back           the same: `lock release --kind` and `claim`
                                         (the library) skip the task while it cools
    the finish (pmtool.work.finish)           `finish --full`: the same finish_task, its
                                         events in the answer's "events"
    finish completed after a kill        the same: the next start (its `recover`, or
                                         `finish --full` again) completes it
    worktree removal after a give-back   `worktree remove --rescue`
    signals: stop after the step         trap INT TERM -> stopping=1
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as fl
from pmtool import ledger as bounds
from pmtool.config import SPECS, Settings, check_level
from pmtool.errors import (
    EXIT_FAILED,
    EXIT_NOTHING,
    EXIT_OK,
    ApiError,
    AuthError,
    ClaudeMissing,
    Conflict,
    MachineFault,
    NothingToDo,
    OperationFailed,
    PmtoolError,
    ServerError,
    TaskFault,
    UsageError,
    disk_fault,
)
from pmtool.faults import fault
from pmtool.git import RemoteUnreachable
from pmtool.records import RecordStore, TaskRecord, now_iso
from pmtool.settings import POLICY_SETTINGS, AgentFailure, HookFailure, Leftover, check_run_policy
from pmtool.work import claim as work
from pmtool.work import recover as work_recover
from pmtool.work.finish import kept_verdict

if TYPE_CHECKING:
    from pmtool.agent.result import AgentResult
    from pmtool.client import PMApi
    from pmtool.hooks import HookResult
    from pmtool.views.health import HealthReport
    from pmtool.worktree import Workspace, WorktreeOptions

# Checked inside the loop on --health-interval, with the health_check hook: while one
# fails the loop does not claim; it waits, reports and goes on by itself (a refused key
# stops it: waiting will not fix that).
HEALTH_CHECKS = ["api", "auth", "claude", "disk", "memory", "git"]
PAUSE_CAP = 3600.0  # the longest single wait for an overloaded model API or a breaker
IDLE_POLL = 30.0  # seconds of looking for a task before an `idle` event
BACKOFF_CAP = 60.0
# While an agent works, the task is checked this often (and at least every heartbeat): a
# person or another agent may have moved it.
RECONCILE_EVERY = float(os.environ.get("PMTOOL_RECONCILE_INTERVAL") or 60.0)
# Kept for callers that listed the choices; the enums in pmtool.settings are the source.
AGENT_FAILURE_POLICIES = tuple(p.value for p in AgentFailure)
HOOK_FAILURE_POLICIES = tuple(p.value for p in HookFailure)


# Repositories whose "push is off" warning this process has shown on stderr already.
_TOLD_PUSH_OFF: set[str] = set()


def _default(name: str) -> Any:
    return SPECS[name].default


@dataclass(frozen=True)
class RunOptions:
    """What one runner does. Policies and limits are checked here (UsageError, exit 2),
    so a Python caller gets the checks the CLI gives. Settings of the same name in
    `pmtool.config.SPECS` give the defaults; `from_settings` takes them from a Settings.

    Reserved, not acted on yet (the settings exist so that flags, env and config files
    can name them now): keep_logs. The bounds
    (max_attempts, retry_cooldown, max_bounces, max_consecutive_failures,
    daily_budget_usd, task_budget_usd) are pmtool.failure_policy.Limits (`limits`); max_turns
    goes to claude; grace is recover's; leftover and push are the finish's
    (pmtool.work.finish); poll_interval and poll_max pace the machine's poller (pmtool.run.poller).
    """

    agent_id: str
    role: str
    level: str = "senior"
    repo: str | None = None
    base: str | None = None
    hooks_dir: str | None = None
    single_task: bool = False
    max_tasks: int | None = None
    heartbeat: float = 300.0
    health_interval: float = 300.0
    on_agent_failure: AgentFailure = AgentFailure.RETRY
    on_hook_failure: HookFailure = HookFailure.RELEASE
    task_budget_usd: float | None = None
    escalate: bool = False
    agent_cmd: str | None = None
    timeout: float | None = None
    idle_timeout: float | None = None
    max_budget_usd: float | None = None
    idle_poll: float = IDLE_POLL
    settle: float = work.DEFAULT_SETTLE
    give_back_wait: float = 30.0
    max_attempts: int = _default("max_attempts")
    retry_cooldown: float = _default("retry_cooldown")
    max_bounces: int = _default("max_bounces")
    max_consecutive_failures: int = _default("max_consecutive_failures")
    daily_budget_usd: float | None = _default("daily_budget_usd")
    max_turns: int | None = _default("max_turns")
    poll_interval: float = _default("poll_interval")
    poll_max: float = _default("poll_max")
    keep_logs: float = _default("keep_logs")
    leftover: Leftover = Leftover.COMMIT
    push: bool = _default("push")
    grace: float = _default("grace")

    def __post_init__(self) -> None:
        check_level(self.level)
        checked = check_run_policy({f.name: getattr(self, f.name) for f in fields(self)})
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: converted once, here

    @classmethod
    def from_settings(cls, settings: Settings, **given: Any) -> RunOptions:
        """Options whose settings-backed fields (policies, limits, heartbeat, hooks
        folder, health interval) come from `settings` unless given."""
        from_settings = {"heartbeat": settings.heartbeat, "hooks_dir": settings.hooks_dir,
                         "health_interval": settings.health_check_interval}
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in given.items() if v is not None}
        for name, value in settings.values.items():
            if name in names and name in POLICY_SETTINGS and name not in given:
                from_settings[name] = value
                try:
                    check_run_policy({name: value})
                except UsageError as exc:  # say where the bad value came from
                    where = settings.sources.get(name, "default")
                    raise UsageError(f"{exc.message} (from {where})", hint=f"fix {where}",
                                     **exc.details) from None
        return cls(**{**from_settings, **given})

    @property
    def limits(self) -> fl.Limits:
        return fl.Limits(max_attempts=self.max_attempts, retry_cooldown=self.retry_cooldown,
                         max_bounces=self.max_bounces,
                         max_consecutive_failures=self.max_consecutive_failures,
                         task_budget_usd=self.task_budget_usd,
                         daily_budget_usd=self.daily_budget_usd)


def notify_event(event: dict[str, Any]) -> str | None:
    """Which `notify` hook event (pmtool.hooks.NOTIFY_EVENTS) a run event calls for, if any:
    a person is told when a task is parked or given up, when the daily budget stops the
    claims, and (the hook decides whether to pass it on) when a task is finished."""
    kind = event.get("event")
    if kind == "parked":
        return "parked"
    if kind == "paused" and event.get("reason") == "daily_budget":
        return "budget"
    if kind == "finished":
        return "given_up" if event.get("outcome") == "given_back" else "finished"
    return None


class Stop(Exception):
    """Raised between steps once a stop was asked for."""


class Runner:
    def __init__(self, settings: Settings, opts: RunOptions,
                 emit: Callable[[dict[str, Any]], None],
                 progress: Callable[[str], None] = lambda _msg: None,
                 ask: Callable[[str, list[str]], str] | None = None,
                 client: PMApi | None = None, poller: Any = None,
                 health: Callable[[Callable[[], tuple[HealthReport, int]]],
                                  tuple[HealthReport, int]] | None = None,
                 clock: Callable[[], datetime] | None = None,
                 wait: Callable[[float], None] | None = None) -> None:
        """`poller` and `health` are shared by the runners of a `pmtool.run.fleet.Fleet`; a
        runner of its own makes its own poller (which still shares the poll lease with
        other processes on the same state folder). `clock` (aware UTC) is the calendar of
        the gate (daily budget, circuit breaker) and `wait` (a sleep a stop signal cuts
        short) every wait of the loop: a test moves through a day without living it. A
        `wait` that lets no real time pass suits the gate's waits and the server
        back-off, not a usage-limit pause, whose deadline is monotonic time."""
        from pmtool.client import PMClient
        from pmtool.run.poller import Poller, process_agent

        self.settings = settings
        self.opts = opts
        self._emit = emit
        self.progress = progress
        self.ask = ask  # operator prompt, only when a person is at a terminal
        self.client = client or PMClient(settings.api_url, settings.api_key,
                                         timeout=settings.http_timeout,
                                         agent=process_agent())
        self.store = RecordStore(settings.state_path)
        self._own_poller = poller is None
        self.poller = poller or Poller(self.client, self.store.state, opts.role, opts.level,
                                       opts.poll_interval, opts.poll_max)
        self._health = health
        self._seen = 0  # the newest poller offer this runner acted on
        self._cooling: dict[int, str] = {}
        self._empty_looks = 0  # looks in a row that found nothing (idle_poll 0)
        # Monotonic time of the last registration; None: not registered (yet, or again).
        # Not a negative number: monotonic time starts near 0 at boot, so on a machine up
        # for less than a heartbeat "long ago" would read as "just now" and the first
        # claim would lock as an agent the server has never seen.
        self._registered: float | None = None
        self.state = self.store.state
        self._event_log_failed = False
        self.stopping = threading.Event()  # first signal: stop after the current step
        self.kill_now = threading.Event()  # second signal: end the agent now
        self.done = 0
        self.last_health = 0.0
        self.backoff = 1.0
        self._agent_stop: threading.Event | None = None
        self.limits = opts.limits
        self.ledger = bounds.Ledger(self.state)
        self.hooks_dir: str | None = opts.hooks_dir or settings.hooks_dir
        self.last_why: list[str] = []
        self._told_missing: set[str] = set()
        self._breaker_tripped = False
        self._lost_info: dict[str, Any] | None = None
        self.clock = clock or (lambda: datetime.now(UTC))
        self._wait = wait or self.stopping.wait

    # -- events -------------------------------------------------------------------------

    def event(self, kind: str, task_id: int | None = None, **data: Any) -> None:
        # role and level too: pmtool.views.metrics labels what it counts from the log with them.
        event = {"ok": kind != "error", "event": kind, "time": now_iso(),
                 "agent": self.opts.agent_id, "role": self.opts.role,
                 "level": self.opts.level, "task_id": task_id, **data}
        # Kept in the runner's event log (what status, logs and report read), then shown.
        try:
            self.state.append_event(self.opts.agent_id, event)
        except OSError as exc:  # a full disk must not stop the work; say so once
            if not self._event_log_failed:
                self._event_log_failed = True
                self.progress(f"cannot keep events in {self.state.events_dir}: {exc}")
        self._emit(event)
        which = notify_event(event)
        if which:
            self._notify(which, event)

    def _notify(self, which: str, event: dict[str, Any]) -> None:
        """Tell a person through the `notify` hook; its failure is said, never acted on."""
        from pmtool.hooks import notify

        extra = {k: v for k, v in event.items() if k not in ("ok", "event", "time", "agent")}
        result = notify(which, self.hooks_dir, record=self._safe_load(),
                        agent_id=self.opts.agent_id, timeout=self.settings.hook_timeout,
                        **extra)
        if not result.ok:
            why = result.error or f"exit {result.exit_code}"
            self.progress(f"notify hook failed for {which}: {why}")

    def request_stop(self) -> None:
        """Signal handler body: the first call stops softly, the second ends the agent."""
        if self.stopping.is_set():
            self.kill_now.set()
            if self._agent_stop:
                self._agent_stop.set()
            self.progress("second signal: ending the agent now (record kept)")
        else:
            self.stopping.set()
            self.progress("stopping after the current step (signal again to end it now)")
        self.poller.wake()

    def _check_stop(self) -> None:
        if self.stopping.is_set():
            raise Stop

    def _sleep(self, seconds: float) -> None:
        self._wait(seconds)
        self._check_stop()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except OSError as exc:  # a state folder that is read-only or full from the start
            machine = disk_fault(exc, self.state.root)
            if machine is None:
                raise
            self._fatal(machine)
            self.event("stopped", task_id=None, tasks_done=self.done, reason="fatal",
                       record_kept=self._safe_load() is not None)
            return machine.exit_code

    def _run(self) -> int:
        from pmtool import procs

        # pm-runner.sh: none (no runner lock; PMTOOL_RUNNER_PID marks the record).
        self.state.ensure()  # private folders before any transcript or record is written
        # Descendants that double-fork or setsid are re-parented to us, found by tree and
        # ended with their run, whatever their environment (Linux; elsewhere the mark).
        procs.become_subreaper()
        try:
            lock = self.store.runner_lock(self.opts.agent_id).acquire()
        except Conflict as exc:
            self.event("error", error=exc.to_json())
            return exc.exit_code
        try:
            fatal = self._preflight()
            if fatal is not None:
                self.event("stopped", task_id=None, tasks_done=0,
                           record_kept=self._safe_load() is not None, reason="fatal")
                return fatal
            return self._loop()
        finally:
            lock.release()
            if self._own_poller:
                self.poller.close()

    def _preflight(self) -> int | None:
        """Before the first claim: what would fail every task (key, repo, role and level,
        hooks, claude) ends the run at once with its exit code and a one-line fix, having
        claimed nothing. A server that does not answer is not fatal: the loop waits."""
        from pmtool.preflight import first_fatal, preflight

        opts, settings = self.opts, self.settings
        repo = opts.repo or os.getcwd()
        explicit = bool(opts.hooks_dir and opts.hooks_dir != settings.hooks_dir) or \
            settings.sources.get("hooks_dir", "default") != "default"
        findings = preflight(settings, self.client, role=opts.role, level=opts.level,
                             repo=repo, hooks_dir=self._hooks_path(repo),
                             hooks_explicit=explicit, agent_cmd=opts.agent_cmd)
        fatal = first_fatal(findings)
        self.event("preflight", ok=fatal is None, checks=[f.to_json() for f in findings])
        if fatal is None:
            # Hooks are found in the repo's folder, whatever directory we were started in.
            self.hooks_dir = str(self._hooks_path(self._repo()))
            self._say_where_work_goes()
            return None
        assert fatal.error is not None
        error = fatal.error(fatal.detail, hint=fatal.fix, check=fatal.name, fatal=True)
        self.event("error", error=error.to_json())
        self.progress(f"fatal: {fatal.detail}" + (f"; fix: {fatal.fix}" if fatal.fix else ""))
        self._notify_fatal(error)
        return error.exit_code

    def _say_where_work_goes(self) -> None:
        """Once at the start: with a remote and push off, nothing this runner does reaches
        another machine (QA elsewhere would find no branch). pm-runner.sh: the same line."""
        from pmtool.work.finish import push_off_reason
        from pmtool.worktree import remotes

        if self.opts.push:
            return
        try:
            repo = self._repo()
            names = remotes(repo)
        except PmtoolError:
            return
        if names:
            reason = push_off_reason(repo)
            self.event("push_off", remote=names[0], reason=reason)
            if str(repo) not in _TOLD_PUSH_OFF:  # a fleet's 200 agents: one line, not 200
                _TOLD_PUSH_OFF.add(str(repo))
                self.progress(f"warning: {reason}")

    def _loop(self) -> int:
        code = EXIT_OK
        while True:
            try:
                self._check_stop()
                self._health_if_due()
                record = self._recover()
                if record is None:
                    self._gate()
                    record = self._claim()
                    if record is None:
                        if self.opts.single_task:
                            code = EXIT_NOTHING
                            break
                        continue
                finished = self._work(record)
                if finished:
                    self.backoff = 1.0
                    self.done += 1
                if self.opts.single_task:
                    code = EXIT_OK if finished else EXIT_FAILED
                    break
                if self.opts.max_tasks and self.done >= self.opts.max_tasks:
                    break
                # Given back: no wait here; the task cools down in the claim instead
                # (retry_cooldown), and other tasks are taken meanwhile.
            except Stop:
                break
            except (AuthError, ClaudeMissing) as exc:
                # A refused key or login, or no claude: every task would fail the same way.
                # Stop, keep the record for a resume once a person fixed it.
                self.event("error", error={**exc.to_json(), "fatal": True})
                self.progress(f"fatal: {exc.message}" + (f"; {exc.hint}" if exc.hint else "")
                              + "; the task record is kept for a resume")
                self._notify_fatal(exc)
                code = exc.exit_code
                break
            except (ServerError, RemoteUnreachable) as exc:
                # Server away: keep the record, back off (capped, jittered), try again.
                # The remote away: the task went back uncounted; the same back-off.
                # pm-runner.sh: `pause 10` on exit 4 (a fixed wait), and after a give_back
                # of kind remote.
                remote = isinstance(exc, RemoteUnreachable)
                if remote and self.opts.single_task:
                    self.event("error", error=exc.to_json())
                    self.progress(f"remote trouble: {exc.message}; fix: {exc.hint}")
                    code = EXIT_FAILED
                    break
                wait = min(BACKOFF_CAP, self.backoff) * random.uniform(0.5, 1.0)
                self.backoff = min(BACKOFF_CAP, self.backoff * 2)
                self.event("error", error=exc.to_json(), retry_in_s=round(wait, 1))
                self.progress(f"{'remote' if remote else 'server'} trouble: {exc.message}; "
                              + (f"fix: {exc.hint}; " if remote else "")
                              + f"retrying in {wait:.0f}s")
                try:
                    self._sleep(wait)
                except Stop:
                    break
            except OSError as exc:
                # A full, read-only or closed state folder: every task would fail alike.
                # The record on disk stands as last written (atomic), so the task resumes.
                machine = disk_fault(exc, self.state.root)
                if machine is None:
                    raise
                self._fatal(machine)
                code = machine.exit_code
                break
            except PmtoolError as exc:
                if exc.details.get("fatal"):  # a person is needed: the notify hook
                    self._fatal(exc)
                    code = exc.exit_code
                    break
                self.event("error", error=exc.to_json())
                if self.opts.single_task:
                    code = exc.exit_code
                    break
                try:
                    self._sleep(min(BACKOFF_CAP, self.backoff))
                except Stop:
                    break
                self.backoff = min(BACKOFF_CAP, self.backoff * 2)
        record = self._safe_load()
        self.event("stopped", task_id=record.task_id if record else None,
                   tasks_done=self.done, record_kept=bool(record),
                   reason="signal" if self.stopping.is_set() else "done")
        return code

    def _hooks_path(self, repo: str | Path) -> Path:
        """The hooks folder: --hooks-dir as given (a Python caller's relative folder is
        the repo's), else the setting, found in the repo (see Settings.hooks_path)."""
        if self.opts.hooks_dir and self.opts.hooks_dir != self.settings.hooks_dir:
            path = Path(self.opts.hooks_dir).expanduser()
            return path if path.is_absolute() else Path(repo) / path
        return self.settings.hooks_path(repo)

    def _fatal(self, exc: PmtoolError) -> None:
        """The one `error` event of a fatal stop, its fix on stderr, and the notify hook."""
        self.event("error", error={**exc.to_json(), "fatal": True})
        self.progress(f"fatal: {exc.message}" + (f"; fix: {exc.hint}" if exc.hint else ""))
        with contextlib.suppress(OSError):  # the notify hook, on a disk that may be full
            self._notify_fatal(exc)

    def _notify_fatal(self, exc: PmtoolError) -> None:
        self._notify("fatal", {"error": exc.to_json()})

    def _safe_load(self) -> TaskRecord | None:
        try:
            return self.store.load(self.opts.agent_id)
        except Exception:
            return None

    # -- steps ----------------------------------------------------------------------------

    def _health_if_due(self) -> None:
        # pm-runner.sh: none; scripts/cron-health.sh runs `pmtool health` from cron.
        if time.monotonic() - self.last_health < self.opts.health_interval and self.last_health:
            return
        from pmtool.views.health import run_health

        checks = HEALTH_CHECKS if not self.opts.agent_cmd else \
            [c for c in HEALTH_CHECKS if c != "claude"]

        def check() -> tuple[HealthReport, int]:
            return run_health(self.settings, checks, hook=True, hooks_dir=self.hooks_dir)

        # A fleet's runners share one check (pmtool.run.poller.SharedHealth).
        result, _code = self._health(check) if self._health else check()
        self.last_health = time.monotonic()
        failed = result.failed()
        self.event("health", ok=result.ok, failed=[c["name"] for c in failed],
                   details={c["name"]: c["detail"] for c in failed} or None)
        if failed:
            refused = [c for c in failed if c["name"] == "auth" and not c.get("unreachable")]
            if refused:
                raise AuthError(refused[0]["detail"], fatal=True,
                                hint="set HEADLESS_PM_API_KEY to the server's key")
            if all(c.get("unreachable") for c in failed):
                # The api and auth checks fail alike when the server is away: say it once.
                raise ServerError("; ".join(dict.fromkeys(c["detail"] for c in failed)),
                                  hint=next((c["hint"] for c in failed if c.get("hint")), None))
            self.last_health = 0.0  # check again next turn
            raise OperationFailed("health check failed: " + "; ".join(
                f"{c['name']}: {c['detail']}" for c in failed))

    def _gate(self) -> None:
        """Before a claim: the machine's daily budget, and this runner's circuit breaker.
        Each wait is an event and a line on stderr; a stop signal cuts it short."""
        lines = self.ledger.lines()
        over, spent, tomorrow = fl.over_daily_budget(lines, self.limits, now=self.clock())
        if over:
            self.event("paused", reason="daily_budget", spent_usd=spent,
                       daily_budget_usd=self.limits.daily_budget_usd,
                       until=fl.iso(tomorrow))
            self.progress(f"daily budget ${self.limits.daily_budget_usd:g} spent "
                          f"(${spent:.2f}); no claims until {fl.iso(tomorrow)[:16]}Z")
            if self.opts.single_task:
                raise NothingToDo("the machine's daily budget is spent",
                                  hint="raise --daily-budget-usd, or wait for tomorrow (UTC)")
            self._sleep_until(tomorrow)
            return
        mine = [a for a in lines if a.get("kind") == fl.ATTEMPT
                and a.get("agent_id") == self.opts.agent_id]
        state = fl.breaker(mine, self.limits, now=self.clock())
        if state.state == "open" and state.until is not None:
            self.event("breaker", state="open", failures=state.failures, trips=state.trips,
                       wait_s=state.wait_s, until=fl.iso(state.until))
            self.progress(f"{state.failures} tasks failed in a row: no claims for "
                          f"{state.wait_s:.0f}s (circuit breaker), then one try")
            self._sleep_until(state.until)
            state = fl.breaker(mine, self.limits, now=self.clock())
        if state.state == "half_open":
            self.event("breaker", state="half_open", failures=state.failures,
                       trips=state.trips)
            self.progress("circuit breaker: trying one task")
        elif state.state == "closed" and self._breaker_tripped:
            self.event("breaker", state="closed")
            self.progress("circuit breaker closed: the last task went well")
        self._breaker_tripped = state.state != "closed"

    def _sleep_until(self, until: Any) -> None:
        left = (until - self.clock()).total_seconds()
        if left > 0:
            self._sleep(left)

    def _recover(self) -> TaskRecord | None:
        """This agent's record from before (a crash, a stop): resume it when still ours.

        `pmtool recover`'s own entry point, for this agent's record only, with what the
        runner does itself left out: no finish plan (a record with a verdict comes back
        as `finish` and the loop completes it with its own plan and events), and none of
        the machine's chores (old logs, stray temp files, the parked list): those are
        cron's, not something to repeat before every claim."""
        options = work_recover.RecoverOptions(
            agent_id=self.opts.agent_id, settle=self.opts.settle, grace=self.opts.grace,
            limits=self.limits, plan=None, keep_logs=None, chores=False)
        try:
            report = work_recover.recover_machine(self.client, self.store, options)
        except NothingToDo:
            return None
        for entry in report.entries:
            if entry.action == "running" and entry.pid != os.getpid():
                # pm-runner.sh: first recover loop, exit 5
                raise Conflict(f"agent {self.opts.agent_id} has a task record whose runner "
                               f"(pid {entry.pid}) is alive", fatal=True,
                               hint="stop that runner, or use another --agent-id")
            if entry.action in ("resume", "finish"):  # finish: the verdict was given
                record, _ = work.update_record(self.store, self.opts.agent_id,
                                               runner_pid=os.getpid(), step="resumed")
                self.event("resumed", task_id=record.task_id, session_id=record.session_id,
                           worktree=record.worktree)
                return record
            self.event("recovered", task_id=entry.task_id, action=entry.action,
                       reason=entry.reason)
        return None

    def _claim(self) -> TaskRecord | None:
        """Look for a task for up to `idle_poll` seconds; None (and an `idle` event) if none.

        The machine's poller does the looking (one request per poll for all runners of
        the role and level on this state folder); this runner claims what it offers.
        """
        # pm-runner.sh: `claim --wait "$wait"`.
        opts = self.opts
        self._cooling = {}  # what this look found cooling down after a give-back
        if opts.single_task or opts.idle_poll <= 0:  # look once, now
            record = self._claim_offer(None, look=True)
            if record is not None or opts.single_task:
                self._empty_looks = 0
                return record
            # idle_poll 0 (the demo): one `idle` event per idle period, not one per look,
            # and a pause between looks at claim's own pace, not a busy loop (a stalled
            # demo once printed 11,506 of them in 100 s).
            if not self._empty_looks:
                self.event("idle", waited_s=0.0)
            self._sleep(min(work.POLL_CAP, work.POLL_FIRST * 2 ** min(self._empty_looks, 8)))
            self._empty_looks += 1
            return None
        if self._registered is None:  # once at the start: a refused role shows at once
            self._register()
        deadline = time.monotonic() + opts.idle_poll
        while True:
            self._check_stop()
            offer = self.poller.wait(self._seen, deadline - time.monotonic(), self.stopping)
            self._check_stop()
            if offer is None:
                # Once per idle period, not per poll, and once for all runners of the
                # process: why nothing was picked up (it lists every task on the server).
                why = self.poller.explain(lambda: work.why_nothing(
                    self.client, opts.role, opts.level, self._cooling))
                self.event("idle", waited_s=opts.idle_poll, why=why or None,
                           cooling=self._cooling or None)
                if why and why != self.last_why:
                    self.progress("nothing to pick up: " + "; ".join(why))
                self.last_why = why
                return None
            self._seen = offer.seq
            if offer.error:
                raise ServerError(offer.error)
            record = self._claim_offer(offer.task)
            if record is not None:
                return record

    def _register(self) -> None:
        work.register(self.client, self.opts.agent_id, self.opts.role, self.opts.level)
        self._registered = time.monotonic()

    def _claim_offer(self, task: dict[str, Any] | None, look: bool = False
                     ) -> TaskRecord | None:
        """Claim the offered task, or another free one if it went to someone else."""
        opts = self.opts
        # An idle runner holds no lock, so it need not refresh last_seen; a claim does,
        # or the 30-minute rule could take the lock from under it (quirk 3).
        if (self._registered is None
                or time.monotonic() - self._registered > min(opts.heartbeat, 600.0)):
            self._register()
        from pmtool.work.options import claim_options

        stats = work.ClaimStats()
        # The runner registers itself (on its heartbeat) and says why nothing came itself.
        how = claim_options(self.settings, settle=opts.settle, limits=self.limits,
                            register_first=False, explain=False)
        try:
            claimed = work.claim(self.client, self.store, opts.agent_id, opts.role,
                                 opts.level, how, runner_pid=os.getpid(), stats=stats,
                                 first=None if look else task)
        except NothingToDo:
            self._parked(stats)
            return None
        except ApiError as exc:
            if exc.status == 404:  # the agent was deleted on the server: register again
                self._registered = None
            raise
        self._parked(stats)
        self.poller.found()
        task = claimed.task
        self.event("claimed", task_id=task["id"], title=task.get("title"),
                   status=task.get("status"), previous_status=claimed.record.previous_status,
                   difficulty=task.get("difficulty"), complexity=task.get("complexity"),
                   record=str(claimed.path))
        return claimed.record

    def _parked(self, stats: work.ClaimStats) -> None:
        """Say what a claim parked for a person, and keep what was cooling down."""
        self._cooling.update(stats.cooling)
        for parked in stats.parked:
            self.event("parked", task_id=parked["task_id"], reason=parked["reason"])
            self.progress(f"task {parked['task_id']} parked for a person: {parked['reason']}")

    def _context(self, record: TaskRecord, **extra: Any) -> dict[str, Any]:
        from pmtool.hooks import task_context

        return task_context(record, state_dir=str(self.settings.state_path),
                            api_url=self.settings.api_url, **extra)

    def _hook(self, name: str, record: TaskRecord, cwd: str | None,
              **extra: Any) -> HookResult:
        from pmtool.hooks import run_hook

        result = run_hook(name, self.hooks_dir, self._context(record, **extra),
                          timeout=self.settings.hook_timeout, cwd=cwd,
                          api_key=self.settings.api_key
                          if self.settings.values.get("pass_key_to_hooks") else None)
        if result.skipped and name not in self._told_missing:
            # Said once per hook, not silently skipped: a hook with a typo in its name
            # would otherwise never run, and nobody would know.
            self._told_missing.add(name)
            self.progress(f"no {name} hook in {self.hooks_dir} (looked for {name}, "
                          f"{name}.py, {name}.sh): skipped")
        self.event("hook", task_id=record.task_id, hook=name, ok=result.ok,
                   skipped=result.skipped, reason=result.reason, signal=result.signal,
                   exit_code=result.exit_code, timed_out=result.timed_out,
                   duration_s=result.duration_s, stderr=result.stderr[-500:] or None)
        return result

    def _repo(self) -> Path:
        from pmtool.worktree import repo_root

        try:
            return repo_root(self.opts.repo or os.getcwd())
        except UsageError as exc:  # the machine's checkout, not the task's fault
            raise MachineFault(exc.message, hint=exc.hint, **exc.details) from None

    def _work(self, record: TaskRecord) -> bool | None:
        """One task from claimed (or resumed) to finished (True), given back (False) or
        parked as poison (None). No error leaves the task claimed with nobody on it: a
        fault of the task parks it, any other error (but a stop, the server away, or a
        policy's `stop`, which keep the record to resume) gives it back."""
        repo = None
        if kept_verdict(record) is None:
            try:
                repo = self._repo()
                if not self._start(record, repo):
                    return False
            except TaskFault as exc:
                self._poison(record, exc, repo)
                return None
            except (ServerError, Stop, ClaudeMissing, RemoteUnreachable):
                # The record is kept: the server comes back, a person fixes claude; or
                # the task went back already, and the loop backs off (the remote).
                raise
            except PmtoolError as exc:
                machine = isinstance(exc, MachineFault)
                if (machine or not exc.details.get("fatal")) and self._safe_load() is not None:
                    # The machine's fault is not the task's: back to the queue, not counted.
                    self._give_back(record, f"pmtool could not work it here: {exc.message}",
                                    kind=fl.MACHINE if machine else fl.FAILED)
                if machine:
                    exc.details["fatal"] = True  # every next task would fail the same way
                raise
        return self._finish(repo or self._repo())

    def _start(self, record: TaskRecord, repo: Path) -> bool:
        """pre_task, worktree, agent: True once the agent gave a verdict."""
        self._check_branch(record, repo)
        if not self._pre_task(record, repo):
            return False
        self._check_stop()
        cwd = self._worktree(record, repo)
        if cwd is None:
            return False  # deferred: its branch or the checkout is another task's now
        self._check_stop()
        return self._agent(record, cwd) is not None  # None: given back

    def _check_branch(self, record: TaskRecord, repo: Path) -> None:
        """A branch git would reject is the task's fault: found before any hook or git
        command sees it (TaskFault), so the task is parked at once."""
        from pmtool.worktree import check_branch_name, default_branch, task_branch

        if record.task.get("complexity") == "minor" or record.worktree:
            return  # a minor task works on the base; a resumed one has its worktree
        base = self.opts.base or default_branch(repo)
        branch, _note = task_branch(record.branch or record.task.get("branch"), base,
                                    record.task_id)
        check_branch_name(repo, branch)

    def _poison(self, record: TaskRecord, exc: TaskFault, repo: Path | None) -> None:
        """A task that would fail the same way on any machine: park it for a person, keep
        whatever its worktree holds, and go on to the next task."""
        from pmtool.work.finish import remove_task_worktree

        record = self._safe_load() or record
        removed = remove_task_worktree(record, repo)
        if removed:
            self.event("worktree", task_id=record.task_id, **removed)
        result = work.park(self.client, self.store, self.opts.agent_id, exc.message,
                           cause="poison", error=exc.to_json(),
                           rescued=(removed or {}).get("rescued"))
        self.event("parked", task_id=record.task_id, cause="poison", reason=exc.message,
                   action=result.action, status=result.status, error=exc.to_json())

    def _pre_task(self, record: TaskRecord, repo: Path) -> bool:
        # pm-runner.sh: a failing pre_task always gives the task back (release), no ask.
        while True:
            result = self._hook("pre_task", record, str(repo))
            if result.ok:
                return True
            why = result.error or result.stderr.strip() or f"exit {result.exit_code}"
            choice: str = self.opts.on_hook_failure
            if self.ask:
                choice = self.ask(f"pre_task hook failed for task {record.task_id}: {why}",
                                  ["retry", "continue", "release"])
            if choice == "retry":
                self._sleep(1.0)
                continue
            if choice == "continue":
                self.progress("continuing without the pre_task checks")
                return True
            if choice == "stop":
                raise OperationFailed(f"pre_task hook failed: {why}", fatal=True)
            self._give_back(record, f"pre_task hook failed: {why}", kind=fl.HOOK)
            return False

    def _worktree(self, record: TaskRecord, repo: Path) -> str | None:
        """The task's own worktree (None: deferred, given back, because another task on
        this machine has its branch or the checkout: tasks never share a folder)."""
        self._plan_worktree(record, repo)
        try:
            answer, saved = work.task_workspace(self.store, self.opts.agent_id, repo,
                                                self.settings, self._worktree_options(repo),
                                                owner_pid=os.getpid(), client=self.client)
        except RemoteUnreachable as exc:
            # This machine's link, not the task: back it goes, uncounted, and the loop
            # backs off as for the server away (pm-runner.sh: give_back remote, pause).
            self._give_back(record, f"remote unreachable: {exc.message}", kind=fl.REMOTE)
            raise
        except NothingToDo as exc:
            if not exc.details.get("no_branch"):
                raise
            # Reviewing a branch made from the base would pass work nobody looked at.
            self.event("no_branch", task_id=record.task_id, reason=exc.message,
                       branch=exc.details.get("branch"), remote=exc.details.get("remote"),
                       hint=exc.hint)
            self.progress(f"task {record.task_id}: {exc.message}; given back ({exc.hint})")
            self._give_back(record, exc.message, kind=fl.NO_BRANCH)
            return None
        except (TaskFault, MachineFault):
            raise  # parked (the task's own fault), or given back uncounted (_work)
        except Conflict as exc:
            if exc.details.get("branch_in_use") or exc.details.get("checkout_in_use"):
                # Wait for the other task: give this one back (the queue offers it again
                # after the give-back pause, or a cooldown) rather than share.
                self.event("deferred", task_id=record.task_id, reason=exc.message,
                           held_by_task=exc.details.get("held_by_task"),
                           path=exc.details.get("checked_out_at") or exc.details.get("path"))
                self._give_back(record, f"deferred: {exc.message}", kind=fl.DEFERRED)
                return None
            self._give_back(record, f"no worktree: {exc.message}",  # pm-runner.sh: give_back
                            kind=fl.FAILED)
            raise
        except OperationFailed as exc:  # pm-runner.sh: give_back "no worktree"
            self._give_back(record, f"no worktree: {exc.message}", kind=fl.FAILED)
            raise
        fault("worktree")
        cwd = str(saved.worktree)
        record.worktree, record.branch = cwd, saved.branch
        sync = answer.sync
        self.event("worktree", task_id=record.task_id, path=answer.worktree,
                   branch=answer.branch, base=answer.base,
                   created=answer.created, lands_on=answer.lands_on,
                   source=answer.branch_source, remote=sync.remote if sync else None,
                   local=sync.local if sync else None, rescued=sync.rescued if sync else None)
        if sync and sync.note:
            self.progress(f"task {record.task_id}: {sync.note}")
        if not answer.ok:
            self._setup_again(record, repo, answer)
        return cwd

    def _worktree_options(self, repo: Path) -> WorktreeOptions:
        from pmtool.work.options import worktree_options

        return worktree_options(self.settings, repo, base=self.opts.base,
                                hooks_dir=self.hooks_dir)

    def _plan_worktree(self, record: TaskRecord, repo: Path) -> None:
        """Name the worktree in the record before it exists: a kill while it is made
        leaves recover a path to remove (pmtool.work.finish.remove_task_worktree)."""
        from pmtool.worktree import worktree_path

        if record.worktree or record.task.get("complexity") == "minor":
            return
        planned = str(worktree_path(repo, record.task_id, self.settings.worktree_base,
                                    created_at=record.task.get("created_at")))
        work.update_record(self.store, self.opts.agent_id, worktree=planned,
                           step="worktree-planned")
        record.worktree = planned

    def _setup_again(self, record: TaskRecord, repo: Path, answer: Workspace) -> None:
        """worktree_setup failed: run it once more (setup hooks are idempotent, README);
        failing twice in a row, it fails for good: the task's fault."""
        first = answer.hook.exit_code if answer.hook else None
        self.progress(f"worktree_setup failed (exit {first}); once more")
        again, _saved = work.task_workspace(self.store, self.opts.agent_id, repo,
                                            self.settings, self._worktree_options(repo),
                                            owner_pid=os.getpid())
        if again.ok:
            return
        hook = again.hook
        why = ("timed out" if hook and hook.timed_out else
               f"exit {hook.exit_code if hook else None}")
        tail = (hook.stderr if hook else "").strip()[-300:]
        raise TaskFault(f"worktree_setup failed twice ({why})" + (f": {tail}" if tail else ""),
                        task_id=record.task_id)

    def _agent(self, record: TaskRecord, cwd: str) -> dict[str, Any] | None:
        """Run the agent until it gives a verdict; retries, escalation and budget here."""
        # pm-runner.sh: does exec-claude's `next`, the same step (next_after); it has no
        # escalation and no task budget.
        from pmtool.models import stronger_model
        from pmtool.work.accounting import runs_note
        from pmtool.work.exec import next_after, note_next, tried_from_record, why_failed

        opts = self.opts
        resume = bool(record.session_id)  # a recorded session: continue it
        model = record.model
        # What this claim tried is read from its record (a runner started again knows it
        # too); `taken` only keeps steps after runs the record could not note (no session).
        taken: tuple[str, ...] = ()
        pauses = 0
        # The task's spend on this machine before this claim: the task budget counts
        # every attempt and claim, not only this one.
        before = fl.task_cost(fl.attempts_of(self.ledger.lines(), record.task))
        while True:
            stop_agent = threading.Event()
            self._agent_stop = stop_agent
            lost = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=(record, stop_agent, lost),
                                    daemon=True)
            beat.start()
            try:
                result = self._run_agent(resume=resume, model=model, stop_event=stop_agent,
                                         max_budget_usd=self._run_budget(record, before))
            finally:
                stop_agent.set()
                beat.join(timeout=5)
            fault("agent-end")
            record = self.store.load(opts.agent_id) or record
            self.event("agent", task_id=record.task_id, ok=result.ok,
                       outcome=result.outcome, summary=result.summary,
                       session_id=result.session_id, model=result.model,
                       num_turns=result.num_turns, total_cost_usd=result.total_cost_usd,
                       task_cost_usd=record.cost_usd, duration_s=result.duration_s,
                       timed_out=result.timed_out, stopped=result.stopped,
                       resumed=result.resumed, log=result.log, stop=result.stop)
            if lost.is_set():
                self._lost(record)
                return None
            if self.kill_now.is_set() or (result.stopped and self.stopping.is_set()):
                raise Stop
            if result.ok and result.outcome:
                record.step("agent-done", verdict={
                    "outcome": result.outcome, "summary": result.summary,
                    "model": result.model, "num_turns": result.num_turns,
                    "duration_s": result.duration_s})
                self.store.save(record)
                self._check_stop()
                return record.steps[-1]["verdict"]
            # What to do is failure_policy.next_step's (as exec-claude's `next`); carrying
            # it out is the loop's. The give-back's notes end with the claim's runs.
            runs = runs_note(self.store, opts.agent_id)
            tried = tried_from_record(record, self.store, runs=runs, taken=taken)
            stronger = (stronger_model(result.model or model or "", self.settings)
                        if opts.escalate and not tried.escalated else None)
            step = next_after(result, tried,
                              fl.StepLimits(opts.on_agent_failure, opts.escalate, self.limits),
                              stronger)
            note_next(self.store, opts.agent_id, result, step)
            why = why_failed(result)
            if isinstance(step, fl.Pause):
                # Not the task's fault and not an attempt: keep the task, wait, go on with
                # the same session.
                pauses += 1
                self._pause(record, step.kind, why, step.until, pauses)
                resume = bool(record.session_id)
                continue
            if isinstance(step, fl.Fatal) and step.kind == fl.AUTH:
                raise AuthError(f"claude's login or key was refused: {why}", fatal=True,
                                task_id=record.task_id,
                                hint="log claude in again (or fix ANTHROPIC_API_KEY), then "
                                     "start the runner again: it resumes the kept task")
            # A park is carried out as the give-back it comes from: release parks it.
            given = step.give_back if isinstance(step, fl.Park) else step
            if isinstance(given, fl.GiveBack) and given.spent:
                self._give_back(record, given.reason, kind=given.kind, runs=runs)
                return None
            self._check_stop()
            if isinstance(step, fl.Fatal):
                raise OperationFailed(f"agent failed on task {record.task_id}: {why}",
                                      fatal=True, task_id=record.task_id)
            if isinstance(step, fl.Resume):
                taken, resume = (*taken, "resume"), bool(record.session_id)
                self.progress(f"agent failed ({why}); retrying once with --resume")
                continue
            if isinstance(step, fl.Retry):
                taken, resume, model = (*taken, "retry"), False, step.model
                self.progress(f"agent failed ({why}); escalating to {step.model}")
                continue
            assert isinstance(given, fl.GiveBack)
            self._give_back(record, given.reason, kind=given.kind, runs=runs)
            return None

    def _run_budget(self, record: TaskRecord, before: float) -> float | None:
        """claude's --max-budget-usd for the next run: the per-run cap, and no more than
        what is left of the task budget over every claim."""
        caps = [self.opts.max_budget_usd] if self.opts.max_budget_usd is not None else []
        if self.opts.task_budget_usd is not None:
            caps.append(max(self.opts.task_budget_usd - before - record.cost_usd, 0.0))
        return min(caps) if caps else None

    def _pause(self, record: TaskRecord, kind: str, why: str, resets_at: str | None,
               pauses: int) -> None:
        """Wait out a rate limit (until claude's `resetsAt`) or an overloaded model API
        (backing off, capped and jittered), keeping the task: heartbeats go on, so the
        server does not hand the task to someone else meanwhile."""
        from datetime import UTC, datetime

        until = fl.parse_time(resets_at) if resets_at else None
        if until is not None:
            wait = max((until - datetime.now(UTC)).total_seconds(), 0.0) + 1.0
        else:
            base = max(self.opts.retry_cooldown, 1.0)
            wait = fl.cooldown_s(pauses, base, PAUSE_CAP) * random.uniform(0.75, 1.0)
        self.event("paused", task_id=record.task_id, reason=kind, detail=why,
                   wait_s=round(wait, 1), until=resets_at, task_kept=True)
        self.progress(f"{kind.replace('_', ' ')}: {why}; task {record.task_id} kept, going on "
                      f"in {wait:.0f}s" + (f" (resets at {resets_at})" if resets_at else ""))
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._sleep(min(left, self.opts.heartbeat))
            if deadline - time.monotonic() > 0:
                try:  # quirk 3: unseen for 30 minutes, the lock would go
                    self.client.register(self.opts.agent_id, self.opts.role, self.opts.level)
                except PmtoolError as exc:
                    self.progress(f"heartbeat failed: {exc.message} (still waiting)")

    def _run_agent(self, resume: bool, model: str | None,
                   stop_event: threading.Event,
                   max_budget_usd: float | None = None) -> AgentResult:
        from pmtool.agent.result import AgentResult
        from pmtool.agent.stream import describe_event
        from pmtool.work.exec import run_for_record
        from pmtool.work.options import agent_options

        opts = self.opts

        def agent_progress(event: dict[str, Any]) -> None:
            fault({"init": "agent-start", "tool": "agent-tool"}.get(str(event.get("event")), ""))
            line = describe_event(event)
            if line:
                self.progress(line)

        run = agent_options(self.settings, model=model,
                            timeout=opts.timeout or self.settings.claude_timeout,
                            idle_timeout=opts.idle_timeout, max_budget_usd=max_budget_usd,
                            agent_cmd=opts.agent_cmd, max_turns=opts.max_turns)
        try:
            return run_for_record(self.store, opts.agent_id, self.settings, run, resume=resume,
                                  stop_event=stop_event, progress=agent_progress)
        except (ClaudeMissing, AuthError):
            raise  # fatal: the loop stops, the record is kept
        except PmtoolError as exc:
            return AgentResult.failed(exc.to_json())

    def _heartbeat(self, record: TaskRecord, stop_agent: threading.Event,
                   lost: threading.Event) -> None:
        """While the agent works: re-register every `heartbeat` seconds (the server drops
        locks of agents unseen for 30 minutes, quirk 3), and about every minute check that
        the task is still ours (one filtered list call). If a person or another agent moved
        it (parked, deleted, finished, re-assigned) or the lock ran out, stop the agent;
        `_lost` keeps its work and says who moved the task.
        pm-runner.sh: exec-claude re-registers on the same interval (no reconciliation)."""
        every = max(0.05, min(RECONCILE_EVERY, self.opts.heartbeat or RECONCILE_EVERY))
        last_beat = time.monotonic()
        while not stop_agent.wait(every):
            beat = time.monotonic() - last_beat >= self.opts.heartbeat
            try:
                if beat:
                    self.client.register(self.opts.agent_id, self.opts.role, self.opts.level)
                    last_beat = time.monotonic()
                info = work.check_ours(self.client, record)
            except PmtoolError as exc:
                self.progress(f"heartbeat failed: {exc.message} (agent goes on)")
                continue
            if info and info.get("late_lock") and self._retake(record):
                continue
            if info:
                self.progress(f"{info['reason']}; stopping the agent")
                self._lost_info = info
                lost.set()
                stop_agent.set()
                return
            if beat:
                self.event("heartbeat", task_id=record.task_id)

    def _retake(self, record: TaskRecord) -> bool:
        """A lock that landed after our claim had settled took the lock of our task under
        work (its agent walked away): take it back and go on (pmtool.work.claim.retake_lock)."""
        try:
            late = work.retake_lock(self.client, record, settle=self.opts.settle)
        except PmtoolError as exc:
            self.progress(f"could not take back the lock: {exc.message}")
            return False
        if late:
            self.event("lock_retaken", task_id=record.task_id, from_agent=late)
            self.progress(f"task {record.task_id}: {late}'s lock landed after our claim "
                          "had settled; took it back")
        return late is not None

    def _lost(self, record: TaskRecord) -> None:
        """The task is no longer ours mid-work (moved by a person or an agent, or its lock
        ran out): keep the work, record the loss (event, note, history), and put a task
        nobody holds back in the queue."""
        info = self._lost_info or {"loss": "taken", "reason": "the task is no longer ours"}
        self._lost_info = None
        rescued = self._remove_worktree(record)
        work_note = (f"its work is on branch {record.branch}"
                     + (f", uncommitted changes at {rescued}" if rescued else "")
                     + f" (machine {record.host})") if record.branch else None
        try:
            result = work.record_loss(self.client, self.store, record, info, work_note)
        except PmtoolError as exc:  # the server away: history still has it
            self.store.close(record, "lost", **{k: v for k, v in info.items()
                                                if k != "reason"}, reason=info.get("reason"))
            result = {"action": "unrecorded on the server", "error": exc.message}
        self.event("lost", task_id=record.task_id, loss=info.get("loss"),
                   reason=info.get("reason"), moved_by=info.get("moved_by"),
                   status=info.get("status"), locked_by=info.get("locked_by"),
                   action=result.get("action"), branch=record.branch, rescued=rescued)
        raise Conflict(f"task {record.task_id} is no longer ours: {info.get('reason')}",
                       task_id=record.task_id, rescued=rescued, loss=info.get("loss"),
                       moved_by=info.get("moved_by"),
                       hint="its work is kept (branch, rescue ref); see the `lost` event")

    def _give_back(self, record: TaskRecord, why: str, kind: str = fl.FAILED,
                   runs: str | None = None) -> None:
        """Give the task back (release parks it when it is its last); `runs`: the line
        about the claim's agent runs its notes end with, when already read."""
        from pmtool.work.accounting import runs_note

        if runs is None:
            runs = runs_note(self.store, self.opts.agent_id)
        result = work.release(self.client, self.store, self.opts.agent_id,
                              notes=why + runs, kind=kind, limits=self.limits)
        # The event when it happened, before the worktree goes (as _finish does; the
        # script's `lock release` then `worktree remove` print in this order too).
        attempt = result.attempt or {}
        self.event("finished", task_id=record.task_id, outcome="given_back", reason=why,
                   action=result.action, stop=kind, cost_usd=attempt.get("cost_usd"),
                   parked=result.parked, cooling_until=result.cooling_until)
        if result.parked:
            self.event("parked", task_id=record.task_id, reason=result.parked)
            self.progress(f"task {record.task_id} parked for a person: {result.parked}")
        self._remove_worktree(record)

    def _finish(self, repo: Path) -> bool:
        """leftover -> push -> status -> post_task -> worktree -> closed, each step noted in
        the record, so a kill anywhere is completed by the next start (pmtool.work.finish).
        False when the task was given back (its leftover went to a rescue ref).
        pm-runner.sh: `finish --full` (pmtool.work.finish.finish_given)."""
        from pmtool.work.finish import finish_task
        from pmtool.work.options import finish_plan

        # The runner's own choices over the settings': its hooks folder (resolved for the
        # repo at the start), leftover and push policies (flags first), its limits.
        plan = finish_plan(self.settings, repo=repo, hooks_dir=self.hooks_dir,
                           base=self.opts.base, leftover=str(self.opts.leftover),
                           push=self.opts.push, limits=self.limits)
        result = finish_task(self.client, self.store, self.opts.agent_id, plan,
                             emit=self.event)
        return result.action != "given_back"

    def _remove_worktree(self, record: TaskRecord) -> str | None:
        """Remove the task's worktree; a dirty one is rescued to a ref first, never lost.
        pm-runner.sh: `worktree remove --rescue`."""
        from pmtool.worktree import release_checkout, remove_worktree

        if not record.worktree:
            return None
        repo = self._repo()
        if os.path.realpath(record.worktree) == os.path.realpath(repo):
            # minor_in_checkout: nothing to remove; the checkout is free for the next task.
            release_checkout(repo, record.task_id)
            return None
        minor = record.task.get("complexity") == "minor"
        try:
            # By path: a reused task id (quirk 9) may have an older task's worktree too.
            # rescue=True saves a dirty tree to a ref first, and does nothing to a clean one;
            # a minor task's short-lived branch goes once it has landed (merged), not before.
            answer = remove_worktree(repo, record.worktree, rescue=True, delete_branch=minor,
                                     base=self.opts.base if minor else None)
        except (NothingToDo, UsageError):  # already gone
            return None
        rescued = answer.rescued.ref if answer.rescued else None
        self.event("worktree", task_id=record.task_id, path=answer.path,
                   removed=answer.removed, rescued=rescued)
        if rescued:
            self.progress(f"task {record.task_id}: uncommitted work kept at {rescued}")
        return rescued

"""What to do when a task does not end well: pure functions over plain data.

Two halves, both without I/O, so the library's claim and finish, the run loop and the
shell pipeline all decide the same way:

- `classify` reads how one claude run ended (its result object, the stream events before
  it, stderr, the exit status, whether pmtool ended it) and names the stop: `ok`,
  `budget`, `auth`, `rate_limit`, `overloaded`, `max_turns`, `timeout`, `idle`, `killed`,
  `stopped`, `failed`. `POLICIES` says, per kind, whether it is an attempt of the task,
  whether the task may be tried again, whether the runner keeps the task and pauses, or
  stops altogether.
- The accounting: one *attempt line* per claim in the machine's history (outcome, kind,
  cost, reason), and from those lines the cooldown before the task may be claimed again
  (exponential from `retry_cooldown`, capped at an hour), whether it is to be parked
  (`max_attempts`, `max_bounces` QA fails counted from the server's changelog or the
  notes, the task budget), the circuit breaker of a runner (`max_consecutive_failures`),
  and the machine's spend per day.

Measured facts about the claude CLI's stops are in ../shared/claude-cli.md: `subtype`
"success" does not mean success (a 429 ends as success with `is_error` and
`api_error_status`); usage limits come as `rate_limit_event` with `resetsAt` (epoch
seconds); the CLI's own retries come as `api_retry` system events.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# -- the kinds of stop, and what each means -------------------------------------------------

OK = "ok"
BUDGET = "budget"
AUTH = "auth"
RATE_LIMIT = "rate_limit"
OVERLOADED = "overloaded"
MAX_TURNS = "max_turns"
TIMEOUT = "timeout"
IDLE = "idle"
KILLED = "killed"
STOPPED = "stopped"
FAILED = "failed"
# Not claude stops, but ends of a claim all the same (hooks, worktrees, a verdict).
HOOK = "hook"
BLOCKED = "blocked"
QA_FAIL = "qa_fail"
# Given back unworked: its branch (or the checkout) is another task's on this machine, and
# tasks never share a folder. Not the task's fault: not counted, but it waits a cooldown.
DEFERRED = "deferred"
# Given back unworked too: a follow-up (QA's review, a task QA sent back) whose branch is
# neither here nor on the remote (the work stayed on a machine that did not push), and a
# remote that did not answer the fetch (a fault of this machine's link).
NO_BRANCH = "no_branch"
REMOTE = "remote"
# Given back by a person (`pmtool lock release` without --kind): trying steps by hand must
# not use up the task's attempts nor cool it down.
BY_HAND = "by_hand"
# Given back unworked: a folder of this machine cannot be written (pmtool.errors.disk_fault).
MACHINE = "machine"


@dataclass(frozen=True)
class Policy:
    """What a kind of stop means for the task and for the runner.

    attempt:  counts towards `max_attempts` and the cooldown (the task's fault, or ours)
    retry:    the task may be run again (after the cooldown); False: park it for a person
    keep:     the runner keeps the task and its record and pauses, then resumes it
    stop:     the runner stops (the record is kept for a resume once fixed)
    breaker:  counts as a failure for the circuit breaker
    cool_once: given back unworked: a plain cooldown before this machine takes it again
              (not counted; doubling while such give-backs repeat)
    """

    attempt: bool
    retry: bool
    keep: bool = False
    stop: bool = False
    breaker: bool = True
    what: str = ""
    cool_once: bool = False


POLICIES: dict[str, Policy] = {
    OK: Policy(attempt=True, retry=True, breaker=False, what="finished"),
    BUDGET: Policy(attempt=True, retry=False,
                   what="parked: the budget is spent; a retry would spend it again"),
    AUTH: Policy(attempt=False, retry=True, keep=True, stop=True, breaker=False,
                 what="runner stops, task and record kept for a resume"),
    RATE_LIMIT: Policy(attempt=False, retry=True, keep=True, breaker=False,
                       what="runner pauses until the limit resets, then resumes the task"),
    OVERLOADED: Policy(attempt=False, retry=True, keep=True, breaker=False,
                       what="runner backs off, then resumes the task"),
    MAX_TURNS: Policy(attempt=True, retry=True, what="given back, retried after a cooldown"),
    TIMEOUT: Policy(attempt=True, retry=True, what="given back, retried after a cooldown"),
    IDLE: Policy(attempt=True, retry=True, what="given back, retried after a cooldown"),
    KILLED: Policy(attempt=True, retry=True, what="given back, retried after a cooldown"),
    STOPPED: Policy(attempt=False, retry=True, keep=True, stop=True, breaker=False,
                    what="stopped by a signal; record kept for a resume"),
    FAILED: Policy(attempt=True, retry=True, what="given back, retried after a cooldown"),
    HOOK: Policy(attempt=True, retry=True, what="given back, retried after a cooldown"),
    BLOCKED: Policy(attempt=True, retry=False, breaker=False,
                    what="parked for a person (status pending)"),
    QA_FAIL: Policy(attempt=False, retry=True, breaker=False,
                    what="back to the developers; parked after max_bounces"),
    MACHINE: Policy(attempt=False, retry=True, stop=True, breaker=False,
                    what="given back unworked, not counted: this machine's disk is full, "
                         "read-only or not writable; the runner stops until a person "
                         "fixes it"),
    DEFERRED: Policy(attempt=False, retry=True, breaker=False, cool_once=True,
                     what="given back unworked: its branch or the checkout is another "
                          "task's here; taken again after a cooldown, not counted"),
    NO_BRANCH: Policy(attempt=False, retry=True, breaker=False, cool_once=True,
                      what="given back unworked: nothing to review, its branch is neither "
                           "here nor on the remote; taken again after a cooldown, not "
                           "counted"),
    REMOTE: Policy(attempt=False, retry=True, breaker=False, cool_once=True,
                   what="given back unworked: the remote did not answer the fetch (a "
                        "machine fault); the runner backs off as for a server outage"),
    BY_HAND: Policy(attempt=False, retry=True, breaker=False,
                    what="given back by a person: not counted, no cooldown"),
}

KINDS = tuple(POLICIES)


def policy(kind: str) -> Policy:
    """The policy of a kind; an unknown kind is treated as a plain failure."""
    return POLICIES.get(kind, POLICIES[FAILED])


# -- classifying one claude run ---------------------------------------------------------------

SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV",
                13: "SIGPIPE", 15: "SIGTERM"}
# Words of claude's result text or stderr that mean the login or key is not accepted.
AUTH_RE = re.compile(r"invalid api key|authentication[_ ]failed|oauth token has expired|"
                     r"please run /login|not logged in|invalid x-api-key|"
                     r"authentication_error|credit balance is too low", re.I)
# Older CLIs ended a usage limit with the text "Claude AI usage limit reached|<epoch>".
USAGE_LIMIT_RE = re.compile(r"usage limit reached\|(\d{9,13})", re.I)
RETRY_KINDS = {"rate_limit": RATE_LIMIT, "overloaded": OVERLOADED,
               "authentication_failed": AUTH, "server_error": OVERLOADED}


@dataclass(frozen=True)
class Stop:
    """How one claude run ended: its kind and everything worth showing about it."""

    kind: str
    message: str
    resets_at: str | None = None  # ISO UTC, when a usage limit lifts
    retries: int = 0  # how often claude itself retried the model API
    last_retry: dict[str, Any] | None = None  # the last `api_retry` event, trimmed
    api_error_status: int | None = None
    exit_code: int | None = None
    signal: int | None = None

    @property
    def policy(self) -> Policy:
        return policy(self.kind)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, 0) or k == "kind"}


def _epoch_iso(value: Any) -> str | None:
    """`resetsAt` as ISO UTC: epoch seconds (or milliseconds), or an ISO string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        number = float(value)
        if number > 1e12:  # milliseconds
            number /= 1000
        return datetime.fromtimestamp(number, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, str):
        parsed = parse_time(value)
        return parsed.strftime("%Y-%m-%dT%H:%M:%SZ") if parsed else None
    return None


def _signal_of(exit_code: int | None) -> int | None:
    """The signal that ended a process: Popen's -N, or a shell's 128+N."""
    if exit_code is None:
        return None
    if exit_code < 0:
        return -exit_code
    if 128 < exit_code < 160:
        return exit_code - 128
    return None


def _short(text: Any, limit: int = 200) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def classify(result: Mapping[str, Any] | None, events: Iterable[Mapping[str, Any]] = (), *,
             exit_code: int | None = None, timed_out_by: str | None = None,
             stopped: bool = False, stderr: str = "", has_verdict: bool | None = None,
             timeout_s: float | None = None, idle_s: float | None = None) -> Stop:
    """Name how a claude run ended, from what pmtool saw of it.

    `result`: the stream's `result` object (None if there was none); `events`: the other
    stream objects (only `api_retry` system events and `rate_limit_event` are read);
    `timed_out_by`: "timeout" or "idle_timeout" when pmtool ended it for time; `stopped`:
    pmtool ended it on a stop signal; `has_verdict`: whether a verdict was found (None:
    do not judge the verdict).
    """
    retries: list[Mapping[str, Any]] = []
    limit: Mapping[str, Any] | None = None
    for event in events:
        if event.get("type") == "system" and event.get("subtype") == "api_retry":
            retries.append(event)
        elif event.get("type") == "rate_limit_event":
            info = event.get("rate_limit_info")
            if isinstance(info, Mapping) and info.get("status") not in ("allowed",
                                                                        "allowed_warning"):
                limit = info
    last = retries[-1] if retries else None
    trimmed = ({k: last.get(k) for k in ("attempt", "max_retries", "retry_delay_ms",
                                          "error_status", "error") if k in last}
               if last else None)
    result = result or {}
    status = result.get("api_error_status")
    status = status if isinstance(status, int) else None
    text = _short(result.get("result") or " ".join(map(str, result.get("errors") or [])))
    base = {"retries": len(retries), "last_retry": trimmed, "api_error_status": status,
            "exit_code": exit_code}

    def stop(kind: str, message: str, **extra: Any) -> Stop:
        return Stop(kind, message, **{**base, **extra})

    if stopped:
        return stop(STOPPED, "pmtool stopped the agent (signal); its process tree was ended")
    if limit is not None:
        resets = _epoch_iso(limit.get("resetsAt"))
        kind = limit.get("rateLimitType") or "usage"
        return stop(RATE_LIMIT, f"claude's {kind} limit is reached"
                    + (f"; it resets at {resets}" if resets else ""), resets_at=resets)
    usage = USAGE_LIMIT_RE.search(text)
    if usage:
        resets = _epoch_iso(usage.group(1))
        return stop(RATE_LIMIT, f"claude's usage limit is reached; it resets at {resets}",
                    resets_at=resets)
    if timed_out_by and last and RETRY_KINDS.get(str(last.get("error"))):
        # pmtool's time limit ran out while claude was still retrying the model API: the
        # cause is the API, not the task.
        kind = RETRY_KINDS[str(last.get("error"))]
        return stop(kind, f"claude was still retrying the model API ({last.get('error')}, "
                          f"{len(retries)} retries) when its time ran out")
    if timed_out_by == "idle_timeout":
        return stop(IDLE, "the agent was silent"
                    + (f" for {idle_s:g}s" if idle_s else "") + "; its process tree was ended")
    if timed_out_by:
        return stop(TIMEOUT, "the agent ran past its time limit"
                    + (f" of {timeout_s:g}s" if timeout_s else "")
                    + "; its process tree was ended")
    subtype = result.get("subtype")
    if subtype == "error_max_budget_usd":
        return stop(BUDGET, "claude stopped at --max-budget-usd"
                    + (f" (spent ${result['total_cost_usd']:.4f})"
                       if isinstance(result.get("total_cost_usd"), int | float) else ""))
    if subtype == "error_max_turns":
        return stop(MAX_TURNS, f"claude stopped at --max-turns ({result.get('num_turns')} "
                               "turns)")
    if status == 429:
        return stop(RATE_LIMIT, f"the model API kept answering 429 (rate limit): {text}")
    if status in (401, 403) or AUTH_RE.search(text) or AUTH_RE.search(stderr or ""):
        return stop(AUTH, f"claude's login or key was refused: {text or _short(stderr)}")
    if status is not None and (status == 529 or status >= 500):
        return stop(OVERLOADED, f"the model API kept answering {status} (overloaded): {text}")
    if last and not result and RETRY_KINDS.get(str(last.get("error"))):
        kind = RETRY_KINDS[str(last.get("error"))]
        return stop(kind, f"claude ended while retrying the model API ({last.get('error')})")
    sig = _signal_of(exit_code)
    if sig and not result:
        name = SIGNAL_NAMES.get(sig, f"signal {sig}")
        return stop(KILLED, f"the agent was killed by {name} (exit {128 + sig})", signal=sig,
                    exit_code=128 + sig)
    if not result:
        tail = _short(stderr, 300)
        return stop(FAILED, f"the agent exited {exit_code} without a result line"
                    + (f": {tail}" if tail else ""))
    if result.get("is_error") or (exit_code not in (0, None)):
        return stop(FAILED, f"the agent failed (exit {exit_code}, {subtype}): "
                            f"{text or _short(stderr) or 'no details'}")
    if has_verdict is False:
        return stop(FAILED, "the agent gave no verdict")
    return stop(OK, "finished")


def read_stream(lines: Iterable[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """From stream-json lines of one run: its result object and the events `classify` reads.

    A transcript pmtool wrote holds several runs of a session; only the lines after the
    last `{"type": "pmtool", "event": "start"}` are read.
    """
    import json

    result: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type")
        if kind == "pmtool" and obj.get("event") == "start":
            result, events = None, []
        elif kind == "result":
            result = obj
        elif kind == "rate_limit_event" or (kind == "system"
                                            and obj.get("subtype") == "api_retry"):
            events.append(obj)
    return result, events


def describe_retry(event: Mapping[str, Any]) -> str | None:
    """One human line for claude's own retry of the model API (else minutes of silence)."""
    if event.get("type") == "system" and event.get("subtype") == "api_retry":
        delay = event.get("retry_delay_ms")
        secs = float(delay) / 1000 if isinstance(delay, int | float) else None
        wait = "" if secs is None else f", next try in {secs:.1f}s" if secs < 10 \
            else f", next try in {secs:.0f}s"
        return (f"model API answered {event.get('error_status')} ({event.get('error')}); "
                f"claude retry {event.get('attempt')}/{event.get('max_retries')}{wait}")
    if event.get("type") == "rate_limit_event":
        info = event.get("rate_limit_info") or {}
        if info.get("status") in ("allowed", "allowed_warning"):
            return None
        return (f"claude's {info.get('rateLimitType') or 'usage'} limit reached; resets at "
                f"{_epoch_iso(info.get('resetsAt')) or '?'}")
    return None


# -- time ------------------------------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    """An ISO time (pmtool's `...Z`, or the server's naive UTC), aware; None if not one."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- attempt accounting ----------------------------------------------------------------------

ATTEMPT = "attempt"  # the `kind` of attempt lines in the history
PARK = "parked"  # the `kind` of the line written when a task is parked (as ops reads it)
PARKED_MARK = "parked by pmtool"  # starts a park's comment; QA fails before it are settled
COOLDOWN_CAP = 3600.0
BREAKER_CAP = 3600.0


def task_key(task: Mapping[str, Any]) -> str:
    """The task's id and creation time: ids are reused by the server (quirk 9), so an id
    alone could carry a deleted task's attempts over to a new one."""
    return f"{task.get('id')}@{task.get('created_at') or ''}"


def attempt_line(task: Mapping[str, Any], agent_id: str, *, outcome: str, kind: str,
                 cost_usd: float = 0.0, reason: str | None = None, host: str | None = None,
                 at: datetime | None = None, claimed_at: str | None = None) -> dict[str, Any]:
    """The history line for one claim's end (`kind` "attempt"; the stop kind is `stop`)."""
    pol = policy(kind)
    return {"kind": ATTEMPT, "at": iso(at or datetime.now(UTC)), "task_id": task.get("id"),
            "task_key": task_key(task), "agent_id": agent_id, "host": host,
            "outcome": outcome, "stop": kind, "counts": pol.attempt,
            "failure": pol.breaker and kind != OK, "cost_usd": round(float(cost_usd or 0), 6),
            "reason": _short(reason, 500) if reason else None, "claimed_at": claimed_at}


def park_line(task: Mapping[str, Any], agent_id: str, reason: str,
              at: datetime | None = None, cause: str | None = None) -> dict[str, Any]:
    """The history line for parking a task: the attempts before it are settled."""
    return {"kind": PARK, "at": iso(at or datetime.now(UTC)), "task_id": task.get("id"),
            "task_key": task_key(task), "agent_id": agent_id, "cause": cause,
            "reason": _short(reason, 500), "task": {"id": task.get("id"),
                                                    "title": task.get("title")}}

COOLDOWN = "cooldown"  # the `kind` of the line saying until when a task cools down


def attempts_of(history: Iterable[Mapping[str, Any]],
                task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The attempt lines of this task (same id and creation time) since it was last parked,
    oldest first: a person who sets a parked task back to `created` gives it fresh tries."""
    key = task_key(task)
    rows = sorted((h for h in history if h.get("kind") in (ATTEMPT, PARK)
                   and h.get("task_key") == key), key=lambda h: str(h.get("at") or ""))
    last_park = max((n for n, h in enumerate(rows) if h.get("kind") == PARK), default=-1)
    return [h for h in rows[last_park + 1:] if h.get("kind") == ATTEMPT]


def counted(attempts: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Attempts that count towards `max_attempts` (not pauses, signals or QA verdicts)."""
    return [a for a in attempts if a.get("counts")]


def task_cost(attempts: Iterable[Mapping[str, Any]]) -> float:
    return round(sum(float(a.get("cost_usd") or 0) for a in attempts), 6)


def cooldown_s(failures: int, base: float, cap: float = COOLDOWN_CAP) -> float:
    """Seconds to wait after the n-th failed attempt in a row: base, 2*base, 4*base... cap."""
    if failures <= 0 or base <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 30))


def _failed_in_a_row(attempts: list[Mapping[str, Any]]) -> int:
    n = 0
    for a in reversed(attempts):
        if a.get("stop") == OK or not a.get("counts"):
            if a.get("stop") == OK:
                break
            continue
        n += 1
    return n


def cooling_until(attempts: Iterable[Mapping[str, Any]], base: float,
                  cap: float = COOLDOWN_CAP) -> datetime | None:
    """When this task may be claimed again by this machine; None if it may be now-ish.

    Counted attempts that failed in a row (since the last good end) set the wait,
    exponentially from `base`, from the time of the last of them.
    """
    every = list(attempts)
    unworked = list(itertools.takewhile(lambda a: policy(str(a.get("stop"))).cool_once,
                                        reversed(every)))
    if unworked:
        # Waiting for another task on this machine, a push, or the remote: a plain
        # cooldown, so the task is not claimed and given back every few seconds; doubling
        # while it repeats (a branch nobody pushes would be taken every minute for ever).
        last = parse_time(unworked[0].get("at"))
        wait = cooldown_s(len(unworked), base, cap)
        return last + timedelta(seconds=wait) if last and wait > 0 else None
    rows = counted(every)
    if not rows or rows[-1].get("stop") == OK:
        return None
    n = _failed_in_a_row(rows)
    last = parse_time(rows[-1].get("at"))
    if not n or last is None:
        return None
    return last + timedelta(seconds=cooldown_s(n, base, cap))


def qa_bounces(changelog: Iterable[Mapping[str, Any]] = (),
               task: Mapping[str, Any] | None = None, notes: str | None = None) -> int:
    """How often QA failed this task: from the server's changelog, else from its notes.

    A QA fail is `under_work` -> `created` right after `dev_done` -> `under_work` (a
    developer's give-back is `created` -> `under_work` -> `created`). Changelog entries
    older than the task's creation belong to a deleted task with the same id (quirk 9).
    Notes count the lines pmtool's finish writes for a QA fail (`<agent>: fail: ...`).
    The larger count wins: the changelog may be cut by its limit, notes may be edited.
    """
    task = task or {}
    tid = task.get("id")
    born = parse_time(task.get("created_at"))
    rows = [c for c in changelog if tid is None or c.get("task_id") == tid]
    if born:
        rows = [c for c in rows if (parse_time(c.get("changed_at")) or born) >= born]
    rows.sort(key=lambda c: (str(c.get("changed_at") or ""), c.get("id") or 0))
    # A person taking the task out of `pending` (un-parking it) starts the count afresh.
    unparked = max((n for n, c in enumerate(rows) if c.get("old_status") == "pending"),
                   default=-1)
    rows = rows[unparked + 1:]
    from_log = 0
    for before, this in itertools.pairwise(rows):
        if (before.get("old_status"), before.get("new_status")) == ("dev_done", "under_work") \
                and (this.get("old_status"), this.get("new_status")) == ("under_work",
                                                                         "created"):
            from_log += 1
    text = (notes if notes is not None else task.get("notes")) or ""
    text = text.rsplit(PARKED_MARK, 1)[-1]
    from_notes = len(re.findall(r"^\S+: fail: ", text, re.M))
    return max(from_log, from_notes)


@dataclass(frozen=True)
class Limits:
    """The settings the accounting needs (plumbed from flags, env and config elsewhere)."""

    max_attempts: int = 3
    retry_cooldown: float = 60.0
    max_bounces: int = 3
    max_consecutive_failures: int = 3
    task_budget_usd: float | None = None
    daily_budget_usd: float | None = None
    cooldown_cap: float = COOLDOWN_CAP
    breaker_cap: float = BREAKER_CAP


def park_reason(attempts: Iterable[Mapping[str, Any]], limits: Limits,
                bounces: int = 0) -> str | None:
    """Why this task must go to a person instead of being worked again; None if not.

    Parked after `max_attempts` counted attempts, after an attempt whose kind is not
    retried (blocked, budget), once its budget across every attempt is spent, or after
    `max_bounces` QA fails.
    """
    rows = list(attempts)
    tries = counted(rows)
    if tries and not policy(str(tries[-1].get("stop"))).retry:
        last = tries[-1]
        return f"{last.get('stop')}: {last.get('reason') or 'no reason given'}"
    if limits.max_attempts and len(tries) >= limits.max_attempts \
            and tries[-1].get("stop") != OK:
        reasons = "; ".join(f"{a.get('stop')}: {_short(a.get('reason'), 80)}"
                            for a in tries[-limits.max_attempts:])
        return f"{len(tries)} attempts failed (max_attempts {limits.max_attempts}): {reasons}"
    spent = task_cost(rows)
    if limits.task_budget_usd is not None and spent >= limits.task_budget_usd > 0:
        return (f"task budget ${limits.task_budget_usd:g} spent (${spent:.4f} over "
                f"{len(rows)} claims)")
    if limits.max_bounces and bounces >= limits.max_bounces:
        return f"QA failed it {bounces} times (max_bounces {limits.max_bounces})"
    return None


def history_note(attempts: Iterable[Mapping[str, Any]]) -> str:
    """The task's attempts as a few note lines, for the notes of a parked task."""
    lines = []
    for n, a in enumerate(attempts, 1):
        lines.append(f"  {n}. {a.get('at', '')[:19]} {a.get('agent_id')}: {a.get('outcome')} "
                     f"({a.get('stop')}, ${float(a.get('cost_usd') or 0):.4f})"
                     + (f" {_short(a.get('reason'), 120)}" if a.get("reason") else ""))
    return "\n".join(lines)


# -- circuit breaker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Breaker:
    """A runner's circuit breaker, as derived from its attempts.

    state: `closed` (claim), `open` (do not claim until `until`), `half_open` (one task
    may be tried; its failure opens the breaker again, for twice as long).
    """

    state: str
    failures: int = 0
    trips: int = 0
    until: datetime | None = None
    wait_s: float = 0.0

    def allows(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return self.state != "open" or (self.until is not None and now >= self.until)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["until"] = iso(self.until) if self.until else None
        return out


def breaker(attempts: Iterable[Mapping[str, Any]], limits: Limits,
            now: datetime | None = None) -> Breaker:
    """The breaker state after these attempts (a runner's own, oldest first).

    `max_consecutive_failures` failures in a row open it for `retry_cooldown` seconds,
    doubling on every failed half-open try, capped at `breaker_cap`; a good end closes it.
    Pauses (rate limit, overload), signals and verdicts (blocked, QA fail) are neither.
    """
    now = now or datetime.now(UTC)
    limit = limits.max_consecutive_failures
    fails = trips = 0
    until: datetime | None = None
    wait = 0.0
    for a in sorted(attempts, key=lambda h: str(h.get("at") or "")):
        if a.get("stop") == OK:
            fails, trips, until, wait = 0, 0, None, 0.0
            continue
        if not a.get("failure"):
            continue
        fails += 1
        if limit and (trips or fails >= limit):
            trips += 1
            wait = min(limits.breaker_cap,
                       max(limits.retry_cooldown, 1.0) * 2 ** min(trips - 1, 30))
            at = parse_time(a.get("at")) or now
            until = at + timedelta(seconds=wait)
    if until is None:
        return Breaker("closed", failures=fails)
    if now < until:
        return Breaker("open", failures=fails, trips=trips, until=until, wait_s=wait)
    return Breaker("half_open", failures=fails, trips=trips, until=until, wait_s=wait)


# -- daily budget ----------------------------------------------------------------------------


def day_start(now: datetime | None = None) -> datetime:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def spent_today(history: Iterable[Mapping[str, Any]], now: datetime | None = None) -> float:
    """What this machine's agents spent since midnight UTC, from the attempt lines."""
    since = day_start(now)
    total = 0.0
    for h in history:
        if h.get("kind") != ATTEMPT:
            continue
        when = parse_time(h.get("at"))
        if when is not None and when >= since:
            total += float(h.get("cost_usd") or 0)
    return round(total, 6)


def over_daily_budget(history: Iterable[Mapping[str, Any]], limits: Limits,
                      now: datetime | None = None) -> tuple[bool, float, datetime]:
    """(over, spent, when the next day starts): over once spent >= daily_budget_usd."""
    spent = spent_today(history, now)
    tomorrow = day_start(now) + timedelta(days=1)
    over = limits.daily_budget_usd is not None and spent >= limits.daily_budget_usd
    return over, spent, tomorrow


@dataclass
class Decision:
    """What the claim should do about one candidate task."""

    action: str  # "claim" | "cool" | "park"
    reason: str | None = None
    until: datetime | None = None
    attempts: int = 0
    bounces: int = 0
    cost_usd: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason,
                "until": iso(self.until) if self.until else None, "attempts": self.attempts,
                "bounces": self.bounces, "cost_usd": self.cost_usd, **self.extra}


def decide(task: Mapping[str, Any], history: Iterable[Mapping[str, Any]], limits: Limits,
           changelog: Iterable[Mapping[str, Any]] = (), role: str | None = None,
           now: datetime | None = None) -> Decision:
    """Claim, let cool, or park this candidate task, from the machine's history of it.

    The bounce cap applies to developer roles (a task QA failed goes back to them); a QA
    agent is never kept from judging a task.
    """
    now = now or datetime.now(UTC)
    rows = attempts_of(history, task)
    bounces = qa_bounces(changelog, task) if role != "qa" else 0
    attempts, cost = len(counted(rows)), task_cost(rows)
    reason = park_reason(rows, limits, bounces)
    if reason:
        return Decision("park", reason, attempts=attempts, bounces=bounces, cost_usd=cost)
    until = cooling_until(rows, limits.retry_cooldown, limits.cooldown_cap)
    if until and now < until:
        return Decision("cool", f"cooling down after {attempts} failed attempt(s)",
                        until=until, attempts=attempts, bounces=bounces, cost_usd=cost)
    return Decision("claim", attempts=attempts, bounces=bounces, cost_usd=cost)


# -- the next step after a run without a verdict ---------------------------------------------
# One pure decision for every caller that runs an agent on a claimed task, or finds its
# runner dead: the runner's loop carries it out (pmtool.run.loop.Runner._agent),
# exec-claude answers it as `next` (its `to_json`) for a script to carry out
# (scripts/pm-runner.sh), and recover asks it for a dead runner's task (stop kind
# `killed`, pmtool.work.recover). The values say what, the caller does it: wait, resume,
# retry on another model, give the task back, park it, or stop. A give-back that is the
# task's last is answered as a Park (`give_back_or_park` over the task's attempt rows and
# this give-back's); pmtool.work.claim.release, which carries out both, decides again with
# the line it writes: the same function over the same rows, the same answer.


@dataclass(frozen=True)
class Tried:
    """What this claim has done so far, and the task's attempts before it."""

    retried: bool = False  # resumed once after a failure
    escalated: bool = False  # moved to a stronger model once
    cost_usd: float = 0.0  # this claim's spend so far (its record's)
    # The task's attempt rows on this machine before this claim (`attempts_of` the ledger).
    attempts: tuple[Mapping[str, Any], ...] = ()
    # What a give-back's notes add after the step's reason (the runner's line about the
    # claim's agent runs); the attempt line's reason is both, and a park's reason cites it.
    runs: str = ""
    # Its runner died (recover): the claim cannot go on; it is given back (or parked) with
    # `why` as its reason, whatever else it could have tried.
    runner_gone: bool = False
    # This claim's attempt line when it is written already (recover counts the attempt
    # before it decides): the give-back's line, instead of one made from the step.
    written: Mapping[str, Any] | None = None

    @property
    def spent_usd(self) -> float:
        """The task's spend over every claim on this machine, this one's included."""
        return task_cost(self.attempts) + self.cost_usd


@dataclass(frozen=True)
class StepLimits:
    """The runner's choices that bound the next step (RunOptions carries them), and the
    limits that bound the task's attempts (max_attempts, the task budget)."""

    on_failure: str = "retry"  # pmtool.settings.AgentFailure: retry | release | stop
    escalate: bool = False
    limits: Limits = Limits()

    @property
    def task_budget_usd(self) -> float | None:
        return self.limits.task_budget_usd


def step_json(step: Any) -> dict[str, Any]:
    """A step as JSON (exec-claude's `next`): `{"step": <its name>, **its fields}`, the
    name being its class's in snake_case (GiveBack: give_back), so a new kind of step has
    its JSON without more code."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(step).__name__).lower()
    return {"step": name, **asdict(step)}


class _Step:
    """What every step can do: say itself as JSON."""

    def to_json(self) -> dict[str, Any]:
        return step_json(self)


@dataclass(frozen=True)
class Pause(_Step):
    """Not the task's fault and no attempt: keep the task, wait, go on with the session."""

    kind: str  # rate_limit | overloaded
    until: str | None = None  # claude's resetsAt, when it said


@dataclass(frozen=True)
class Resume(_Step):
    """Once more with --resume, the same session and model."""


@dataclass(frozen=True)
class Retry(_Step):
    """A fresh session on a stronger model."""

    model: str


@dataclass(frozen=True)
class GiveBack(_Step):
    """The task goes back to the queue (its attempt line says `kind`)."""

    kind: str
    reason: str

    @property
    def spent(self) -> bool:
        """A budget ran out: given back before the runner looks at a stop request."""
        return self.kind == BUDGET


@dataclass(frozen=True)
class Fatal(_Step):
    """Stop the runner with the task record kept (a login refused, or `stop` chosen)."""

    kind: str
    reason: str


@dataclass(frozen=True)
class Park(_Step):
    """The give-back is the task's last: it goes to a person (status pending) instead.
    `give_back` is the give-back it comes from: its kind and reason are the attempt
    line's and the notes', as for any give-back (a caller carries out both alike)."""

    cause: str  # max_attempts | task_budget | the kind not to be retried (budget, blocked)
    reason: str
    give_back: GiveBack | None = None


# What next_step answers: a give-back that is the task's last comes as a Park.
Step = Pause | Resume | Retry | GiveBack | Park | Fatal


def next_step(stop: Mapping[str, Any] | None, tried: Tried, limits: StepLimits, *,
              why: str = "no verdict", stronger: str | None = None) -> Step:
    """What follows a run that ended without a verdict (or a runner found dead: `stop`
    kind `killed`). `stop` is its classified stop (`classify`: kind, resets_at), `why` the
    run's own words for it, `stronger` the model an escalation would move to (None: none
    is stronger). A give-back is a Park when, with its attempt line, it is the task's last
    (`give_back_or_park`)."""
    step = _agent_step(stop, tried, limits, why, stronger)
    if not isinstance(step, GiveBack):
        return step
    line = tried.written or attempt_line({}, "", outcome="given_back", kind=step.kind,
                                         cost_usd=tried.cost_usd,
                                         reason=step.reason + tried.runs)
    return give_back_or_park(step.kind, step.reason, [*tried.attempts, line], limits.limits)


def _agent_step(stop: Mapping[str, Any] | None, tried: Tried, limits: StepLimits, why: str,
                stronger: str | None) -> Pause | Resume | Retry | GiveBack | Fatal:
    kind = (stop or {}).get("kind") or FAILED
    if tried.runner_gone:
        return GiveBack(kind, why)
    if kind in (RATE_LIMIT, OVERLOADED):
        return Pause(kind, (stop or {}).get("resets_at"))
    if kind == AUTH:
        return Fatal(AUTH, why)
    spent = tried.spent_usd
    if kind == BUDGET:  # a retry would spend it again
        return GiveBack(BUDGET, f"{why} (${spent:.4f} over all claims)")
    if limits.task_budget_usd is not None and spent >= limits.task_budget_usd:
        return GiveBack(BUDGET, f"task budget ${limits.task_budget_usd:g} spent "
                                f"(${spent:.4f} over all claims); last run: {why}")
    if limits.on_failure == "stop":
        return Fatal(kind, why)
    if limits.on_failure == "retry" and not tried.retried:
        return Resume()
    if limits.escalate and not tried.escalated and stronger:
        return Retry(stronger)
    return GiveBack(kind, f"agent failed: {why}")


def give_back_or_park(kind: str, why: str, attempts: Iterable[Mapping[str, Any]],
                      limits: Limits) -> GiveBack | Park:
    """What a give-back of `kind` comes to, once its attempt is written down: back to the
    queue, or parked for a person when it is the last (`park_reason`: `max_attempts`
    counted attempts, a kind not to be retried, the task budget spent over every claim).
    `attempts` are the task's attempt rows on this machine, this give-back's included;
    the QA bounce cap is the finish's, not a give-back's."""
    given = GiveBack(kind, why)
    reason = park_reason(attempts, limits)
    if reason is None:
        return given
    if limits.task_budget_usd is not None and reason.startswith("task budget"):
        return Park("task_budget", reason, given)
    return Park(kind if not policy(kind).retry else "max_attempts", reason, given)

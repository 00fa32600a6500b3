"""failure_policy.next_step as a table: a stop, what the claim has tried (and the task's
attempts before it), the runner's limits in; the one next step out, a park included. The
runner (Runner._agent), exec-claude's `next` and recover only carry it out."""

from __future__ import annotations

import pytest

from helpers import ago
from pmtool import failure_policy as fl

RETRY = fl.StepLimits()  # the default: once more with --resume, then give back
RELEASE = fl.StepLimits(on_failure="release")
STOP = fl.StepLimits(on_failure="stop")
ESCALATE = fl.StepLimits(on_failure="release", escalate=True)
BUDGET_1 = fl.StepLimits(limits=fl.Limits(task_budget_usd=1.0))
RESETS = ago(days=-30)  # a usage limit that resets a month from now, whatever today is
FRESH = fl.Tried()
RETRIED = fl.Tried(retried=True)
SPENT = fl.Tried(cost_usd=1.25)

TABLE = [
    # stop kind, tried, limits, stronger -> step
    ("rate_limit", FRESH, STOP, None, fl.Pause("rate_limit", RESETS)),
    ("overloaded", RETRIED, RELEASE, None, fl.Pause("overloaded", None)),
    ("auth", FRESH, RETRY, None, fl.Fatal("auth", "why")),
    # A budget stop is never retried: the give-back is the task's last, it is parked.
    ("budget", FRESH, RETRY, None, fl.Park(
        "budget", "budget: why ($0.0000 over all claims)",
        fl.GiveBack("budget", "why ($0.0000 over all claims)"))),
    ("failed", SPENT, BUDGET_1, None, fl.Park(
        "budget", "budget: task budget $1 spent ($1.2500 over all claims); last run: why",
        fl.GiveBack("budget", "task budget $1 spent ($1.2500 over all claims); last run: "
                              "why"))),
    ("failed", FRESH, BUDGET_1, None, fl.Resume()),
    ("timeout", FRESH, STOP, None, fl.Fatal("timeout", "why")),
    ("failed", FRESH, RETRY, None, fl.Resume()),
    ("failed", RETRIED, RETRY, None, fl.GiveBack("failed", "agent failed: why")),
    ("max_turns", FRESH, RELEASE, None, fl.GiveBack("max_turns", "agent failed: why")),
    ("failed", FRESH, ESCALATE, "opus", fl.Retry("opus")),
    ("failed", fl.Tried(escalated=True), ESCALATE, "opus",
     fl.GiveBack("failed", "agent failed: why")),
    ("failed", FRESH, ESCALATE, None, fl.GiveBack("failed", "agent failed: why")),
    ("failed", RETRIED, fl.StepLimits(escalate=True), "opus", fl.Retry("opus")),
    (None, FRESH, RELEASE, None, fl.GiveBack("failed", "agent failed: why")),
]


@pytest.mark.parametrize(("kind", "tried", "limits", "stronger", "step"), TABLE)
def test_next_step(kind, tried, limits, stronger, step):
    stop = {"kind": kind, "resets_at": RESETS if kind == "rate_limit"
            else None} if kind else None
    assert fl.next_step(stop, tried, limits, why="why", stronger=stronger) == step


def test_every_stop_kind_has_a_step():
    """A kind `classify` can name never falls through the table (ok has a verdict)."""
    for kind in fl.KINDS:
        step = fl.next_step({"kind": kind}, FRESH, RELEASE)
        assert isinstance(step, fl.Pause | fl.Resume | fl.Retry | fl.GiveBack | fl.Park
                          | fl.Fatal)


def test_a_budget_give_back_comes_before_a_stop_request_is_looked_at():
    parked = fl.next_step({"kind": "budget"}, FRESH, RETRY)
    assert isinstance(parked, fl.Park) and parked.give_back and parked.give_back.spent
    step = fl.next_step({"kind": "failed"}, RETRIED, RETRY)
    assert isinstance(step, fl.GiveBack) and not step.spent


@pytest.mark.parametrize(("step", "json"), [
    (fl.Pause("rate_limit", RESETS), {"step": "pause", "kind": "rate_limit", "until": RESETS}),
    (fl.Pause("overloaded"), {"step": "pause", "kind": "overloaded", "until": None}),
    (fl.Resume(), {"step": "resume"}),
    (fl.Retry("opus"), {"step": "retry", "model": "opus"}),
    (fl.GiveBack("failed", "agent failed: why"),
     {"step": "give_back", "kind": "failed", "reason": "agent failed: why"}),
    (fl.Fatal("auth", "why"), {"step": "fatal", "kind": "auth", "reason": "why"}),
])
def test_a_step_as_json(step, json):
    """exec-claude's `next`: the step's name, then its fields, for a script to act on."""
    assert step.to_json() == json == fl.step_json(step)


def test_a_new_kind_of_step_has_its_json_by_its_name():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class WaitForPerson:
        reason: str

    assert fl.step_json(WaitForPerson("why")) == {"step": "wait_for_person", "reason": "why"}


# -- a give-back, or the park it becomes ---------------------------------------------------
# The task's attempt rows on this machine (this give-back's the last) and the limits in;
# back to the queue, or parked for a person. pmtool.work.claim.release and
# pmtool.work.recover carry it out.

TASK = {"id": 7, "created_at": ago(days=1, zone="")}
THREE = fl.Limits(max_attempts=3)


def rows(*kinds, cost=0.0):
    return [fl.attempt_line(TASK, "dev_1", outcome="given_back", kind=kind, cost_usd=cost,
                            reason=f"r{n}") for n, kind in enumerate(kinds, 1)]


GIVE_BACK_TABLE = [
    # attempt rows (this give-back's last), limits -> step
    (rows("failed"), THREE, fl.GiveBack("failed", "why")),
    (rows("failed", "timeout"), THREE, fl.GiveBack("timeout", "why")),
    (rows("failed", "timeout", "killed"), THREE, fl.Park(
        "max_attempts", "3 attempts failed (max_attempts 3): failed: r1; timeout: r2; "
                        "killed: r3", fl.GiveBack("killed", "why"))),
    (rows("killed", "killed", "killed", "killed"), fl.Limits(max_attempts=0),
     fl.GiveBack("killed", "why")),
    # Not counted: the two attempts before it do not make it the last.
    (rows("failed", "failed", "deferred"), THREE, fl.GiveBack("deferred", "why")),
    (rows("by_hand"), THREE, fl.GiveBack("by_hand", "why")),
    (rows("budget"), THREE, fl.Park("budget", "budget: r1", fl.GiveBack("budget", "why"))),
    (rows("blocked"), THREE, fl.Park("blocked", "blocked: r1", fl.GiveBack("blocked", "why"))),
    (rows("failed", cost=1.25), fl.Limits(task_budget_usd=1.0), fl.Park(
        "task_budget", "task budget $1 spent ($1.2500 over 1 claims)",
        fl.GiveBack("failed", "why"))),
    (rows("failed", cost=0.5), fl.Limits(task_budget_usd=1.0),
     fl.GiveBack("failed", "why")),
]


@pytest.mark.parametrize(("attempts", "limits", "step"), GIVE_BACK_TABLE)
def test_give_back_or_park(attempts, limits, step):
    kind = attempts[-1]["stop"]
    assert fl.give_back_or_park(kind, "why", attempts, limits) == step


def test_every_step_says_its_name_in_json():
    assert fl.Park("max_attempts", "3 attempts", fl.GiveBack("failed", "why")).to_json() == {
        "step": "park", "cause": "max_attempts", "reason": "3 attempts",
        "give_back": {"kind": "failed", "reason": "why"}}
    assert fl.GiveBack("failed", "why").to_json() == {
        "step": "give_back", "kind": "failed", "reason": "why"}
    assert fl.Resume().to_json() == {"step": "resume"}
    assert fl.Pause("rate_limit", None).to_json()["step"] == "pause"


# -- a give-back that is the task's last comes out of next_step as a park ----------------
# The task's attempt rows before this claim (Tried.attempts) and this give-back's line (made
# from the step, or the one already written) go to give_back_or_park: the same answer
# pmtool.work.claim.release reaches with the line it writes.

TWO_FAILED = fl.Tried(retried=True, attempts=tuple(rows("failed", "timeout")))
PARK_TABLE = [
    # stop kind, tried, limits -> step
    ("failed", TWO_FAILED, RETRY, fl.Park(
        "max_attempts", "3 attempts failed (max_attempts 3): failed: r1; timeout: r2; "
                        "failed: agent failed: why", fl.GiveBack("failed", "agent failed: why"))),
    # The runner's notes end with its runs line: the park's reason cites it, as release's.
    ("failed", fl.Tried(retried=True, attempts=TWO_FAILED.attempts, runs="\nagent: x"), RETRY,
     fl.Park("max_attempts", "3 attempts failed (max_attempts 3): failed: r1; timeout: r2; "
                             "failed: agent failed: why agent: x",
             fl.GiveBack("failed", "agent failed: why"))),
    # Not retried yet: once more with --resume, whatever the attempts.
    ("failed", fl.Tried(attempts=TWO_FAILED.attempts), RETRY, fl.Resume()),
    ("failed", TWO_FAILED, fl.StepLimits(limits=fl.Limits(max_attempts=4)),
     fl.GiveBack("failed", "agent failed: why")),
    # Not counted: a pause never parks.
    ("rate_limit", TWO_FAILED, RETRY, fl.Pause("rate_limit", RESETS)),
    ("failed", fl.Tried(retried=True, cost_usd=0.5, attempts=tuple(rows("failed", cost=0.25))),
     fl.StepLimits(on_failure="release", limits=fl.Limits(task_budget_usd=1.0)),
     fl.GiveBack("failed", "agent failed: why")),
    ("failed", fl.Tried(cost_usd=0.5, attempts=tuple(rows("failed", cost=0.5))), BUDGET_1,
     fl.Park("budget", "budget: task budget $1 spent ($1.0000 over all claims); last run: why",
             fl.GiveBack("budget", "task budget $1 spent ($1.0000 over all claims); last run: "
                                   "why"))),
    # A dead runner's task (recover): given back with its own words, never resumed.
    ("killed", fl.Tried(runner_gone=True), RETRY, fl.GiveBack("killed", "why")),
    ("killed", fl.Tried(runner_gone=True, attempts=TWO_FAILED.attempts), RETRY, fl.Park(
        "max_attempts", "3 attempts failed (max_attempts 3): failed: r1; timeout: r2; "
                        "killed: why", fl.GiveBack("killed", "why"))),
    # Its attempt already written (recover counts it first): that line is the give-back's.
    ("killed", fl.Tried(runner_gone=True, attempts=tuple(rows("failed", "timeout")),
                        written=rows("deferred")[0]), RETRY, fl.GiveBack("killed", "why")),
    ("killed", fl.Tried(runner_gone=True, attempts=tuple(rows("failed", "timeout")),
                        written=rows("killed")[0]), RETRY, fl.Park(
        "max_attempts", "3 attempts failed (max_attempts 3): failed: r1; timeout: r2; "
                        "killed: r1", fl.GiveBack("killed", "why"))),
]


@pytest.mark.parametrize(("kind", "tried", "limits", "step"), PARK_TABLE)
def test_next_step_parks_the_last_give_back(kind, tried, limits, step):
    stop = {"kind": kind, "resets_at": RESETS if kind == "rate_limit" else None}
    assert fl.next_step(stop, tried, limits, why="why") == step


@pytest.mark.parametrize(("kind", "tried", "limits", "step"), PARK_TABLE)
def test_the_park_is_the_one_release_decides_with_its_line(kind, tried, limits, step):
    """The same function over the same rows: release's line (kind, cost, the notes it
    writes: the step's reason and the runs line) parks the task as next_step said."""
    if not isinstance(step, fl.GiveBack | fl.Park) or tried.written:
        return
    given = step.give_back if isinstance(step, fl.Park) else step
    assert given is not None
    line = fl.attempt_line(TASK, "dev_1", outcome="given_back", kind=given.kind,
                           cost_usd=tried.cost_usd, reason=given.reason + tried.runs)
    assert fl.give_back_or_park(given.kind, given.reason, [*tried.attempts, line],
                                limits.limits) == step

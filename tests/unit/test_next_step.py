"""failure_policy.next_step as a table: a stop, what the claim has tried, the runner's
limits in; the one next step out. The runner (Runner._agent) only carries it out."""

from __future__ import annotations

import pytest

from helpers import ago
from pmtool import failure_policy as fl

RETRY = fl.StepLimits()  # the default: once more with --resume, then give back
RELEASE = fl.StepLimits(on_failure="release")
STOP = fl.StepLimits(on_failure="stop")
ESCALATE = fl.StepLimits(on_failure="release", escalate=True)
BUDGET_1 = fl.StepLimits(task_budget_usd=1.0)
RESETS = ago(days=-30)  # a usage limit that resets a month from now, whatever today is
FRESH = fl.Tried()
RETRIED = fl.Tried(retried=True)
SPENT = fl.Tried(spent_usd=1.25)

TABLE = [
    # stop kind, tried, limits, stronger -> step
    ("rate_limit", FRESH, STOP, None, fl.Pause("rate_limit", RESETS)),
    ("overloaded", RETRIED, RELEASE, None, fl.Pause("overloaded", None)),
    ("auth", FRESH, RETRY, None, fl.Fatal("auth", "why")),
    ("budget", FRESH, RETRY, None, fl.GiveBack("budget", "why ($0.0000 over all claims)")),
    ("failed", SPENT, BUDGET_1, None, fl.GiveBack(
        "budget", "task budget $1 spent ($1.2500 over all claims); last run: why")),
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
        assert isinstance(step, fl.Pause | fl.Resume | fl.Retry | fl.GiveBack | fl.Fatal)


def test_a_budget_give_back_comes_before_a_stop_request_is_looked_at():
    assert fl.next_step({"kind": "budget"}, FRESH, RETRY).spent
    assert not fl.next_step({"kind": "failed"}, RETRIED, RETRY).spent


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

TASK = {"id": 7, "created_at": "2026-01-01T00:00:00"}
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
                        "killed: r3")),
    (rows("killed", "killed", "killed", "killed"), fl.Limits(max_attempts=0),
     fl.GiveBack("killed", "why")),
    # Not counted: the two attempts before it do not make it the last.
    (rows("failed", "failed", "deferred"), THREE, fl.GiveBack("deferred", "why")),
    (rows("by_hand"), THREE, fl.GiveBack("by_hand", "why")),
    (rows("budget"), THREE, fl.Park("budget", "budget: r1")),
    (rows("blocked"), THREE, fl.Park("blocked", "blocked: r1")),
    (rows("failed", cost=1.25), fl.Limits(task_budget_usd=1.0), fl.Park(
        "task_budget", "task budget $1 spent ($1.2500 over 1 claims)")),
    (rows("failed", cost=0.5), fl.Limits(task_budget_usd=1.0),
     fl.GiveBack("failed", "why")),
]


@pytest.mark.parametrize(("attempts", "limits", "step"), GIVE_BACK_TABLE)
def test_give_back_or_park(attempts, limits, step):
    kind = attempts[-1]["stop"]
    assert fl.give_back_or_park(kind, "why", attempts, limits) == step


def test_every_step_says_its_name_in_json():
    assert fl.Park("max_attempts", "3 attempts").to_json() == {
        "step": "park", "cause": "max_attempts", "reason": "3 attempts"}
    assert fl.GiveBack("failed", "why").to_json() == {
        "step": "give_back", "kind": "failed", "reason": "why"}
    assert fl.Resume().to_json() == {"step": "resume"}
    assert fl.Pause("rate_limit", None).to_json()["step"] == "pause"

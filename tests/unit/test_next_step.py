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

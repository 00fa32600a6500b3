"""pmtool.failure_policy: how claude stops are named, and the attempt accounting built on them.

The classification is checked here against recorded stream lines; against the real claude
binary and the scripted model server, for every stop the server can produce (budget,
max_turns, 429, usage limit with resetsAt, 529, 401, a hang ended by pmtool), in
tests/e2e/test_claude_stops.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from pmtool import failure_policy as f

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def naive(when: datetime) -> str:
    """As the server writes times: naive UTC."""
    return when.replace(tzinfo=None).isoformat()


TASK = {"id": 7, "created_at": naive(at(-120) + timedelta(microseconds=1)), "notes": None}


def line(kind: str, minutes: float, cost: float = 0.0, task: dict | None = None,
         agent: str = "dev1", outcome: str | None = None) -> dict:
    return f.attempt_line(task or TASK, agent, outcome=outcome or ("done" if kind == "ok"
                                                                   else "given_back"),
                          kind=kind, cost_usd=cost, reason=f"{kind} reason", at=at(minutes))


# -- recorded stream lines ---------------------------------------------------------------------


def test_recorded_stops() -> None:
    retry = {"type": "system", "subtype": "api_retry", "attempt": 3, "max_retries": 10,
             "retry_delay_ms": 2000, "error_status": 529, "error": "overloaded"}
    # Timed out by pmtool while claude was still retrying an overloaded API: overload.
    stop = f.classify(None, [retry], exit_code=-15, timed_out_by="timeout")
    assert stop.kind == "overloaded" and stop.retries == 1
    assert f.classify(None, [], exit_code=-15, timed_out_by="idle_timeout",
                      idle_s=30).kind == "idle"
    killed = f.classify(None, [], exit_code=-9)
    assert (killed.kind, killed.signal, killed.exit_code) == ("killed", 9, 137)
    assert "SIGKILL" in killed.message
    assert f.classify(None, [], exit_code=137).signal == 9
    assert f.classify(None, [], exit_code=1, stopped=True).kind == "stopped"
    auth_retry = {**retry, "error": "authentication_failed", "error_status": 401}
    assert f.classify(None, [auth_retry], exit_code=-15, timed_out_by="timeout").kind == "auth"
    expired = {"type": "result", "subtype": "success", "is_error": True,
               "result": "OAuth token has expired. Please run /login"}
    assert f.classify(expired, exit_code=1).kind == "auth"
    old_limit = {"type": "result", "is_error": True,
                 "result": "Claude AI usage limit reached|1796010553"}
    stop = f.classify(old_limit, exit_code=1)
    assert stop.kind == "rate_limit" and stop.resets_at.startswith("2026-")
    allowed = {"type": "rate_limit_event",
               "rate_limit_info": {"status": "allowed_warning", "resetsAt": 1796010553}}
    good = {"type": "result", "subtype": "success", "is_error": False, "result": "ok"}
    assert f.classify(good, [allowed], exit_code=0, has_verdict=True).kind == "ok"
    assert f.classify({**good, "is_error": True, "api_error_status": 500},
                      exit_code=1).kind == "overloaded"
    assert f.classify(None, [], exit_code=1, stderr="boom").message.endswith("boom")


def test_read_stream_reads_only_the_last_run_of_a_transcript() -> None:
    lines = [json.dumps(x) for x in (
        {"type": "pmtool", "event": "start"},
        {"type": "system", "subtype": "api_retry", "error": "overloaded"},
        {"type": "result", "subtype": "error_max_turns"},
        {"type": "pmtool", "event": "start"},
        {"type": "assistant", "message": {}},
    )] + ["not json"]
    assert f.read_stream(lines) == (None, [])


def test_describe_retry_says_what_claude_waits_for() -> None:
    text = f.describe_retry({"type": "system", "subtype": "api_retry", "attempt": 2,
                             "max_retries": 10, "retry_delay_ms": 4000, "error_status": 529,
                             "error": "overloaded"})
    assert text == "model API answered 529 (overloaded); claude retry 2/10, next try in 4.0s"
    assert f.describe_retry({"type": "assistant"}) is None


# -- accounting --------------------------------------------------------------------------------


def test_cooldown_grows_and_is_capped() -> None:
    assert [f.cooldown_s(n, 60) for n in range(0, 5)] == [0, 60, 120, 240, 480]
    assert f.cooldown_s(20, 60) == 3600
    rows = [line("failed", 0), line("timeout", 10)]
    assert f.cooling_until(rows, 60) == at(10) + timedelta(seconds=120)
    # Pauses (rate limits) are not attempts and do not lengthen the wait.
    assert f.cooling_until([*rows, line("rate_limit", 11)], 60) == at(10) + timedelta(
        seconds=120)
    assert f.cooling_until([*rows, line("ok", 20)], 60) is None
    assert f.cooling_until([], 60) is None


def test_a_task_given_back_unworked_cools_down_longer_while_it_repeats() -> None:
    # deferred, no_branch (nothing pushed to review), remote (the fetch failed): not
    # counted, but a branch nobody pushes must not be claimed every minute for ever.
    rows = [line("failed", 0), line("no_branch", 10)]
    assert f.cooling_until(rows, 60) == at(10) + timedelta(seconds=60)
    rows += [line("no_branch", 20), line("remote", 30)]
    assert f.cooling_until(rows, 60) == at(30) + timedelta(seconds=240)
    assert f.cooling_until([*rows, line("deferred", 40)], 60, cap=300) == at(40) + timedelta(
        seconds=300)
    assert not f.counted(rows[1:]) and f.park_reason(rows, f.Limits()) is None
    assert f.cooling_until([*rows, line("ok", 50)], 60) is None


def test_attempts_are_per_task_and_restart_after_a_park() -> None:
    other = {"id": 7, "created_at": naive(at(12 * 60))}  # same id, a new task (quirk 9)
    history = [line("failed", 0), line("failed", 1, task=other),
               f.park_line(TASK, "dev1", "3 attempts", at=at(2)), line("failed", 3),
               {"kind": "closed", "task": TASK}]
    rows = f.attempts_of(history, TASK)
    assert [r["at"] for r in rows] == [f.iso(at(3))]
    assert len(f.attempts_of(history, other)) == 1


def test_park_reasons() -> None:
    limits = f.Limits(max_attempts=3, task_budget_usd=1.0, max_bounces=2)
    assert f.park_reason([line("failed", 0), line("hook", 1)], limits) is None
    three = [line("failed", 0), line("hook", 1), line("timeout", 2)]
    assert "3 attempts failed" in f.park_reason(three, limits)
    # A rate-limit pause in between is not an attempt.
    assert f.park_reason([line("failed", 0), line("rate_limit", 1), line("hook", 2)],
                         limits) is None
    assert f.park_reason([line("blocked", 0, outcome="blocked")], limits).startswith(
        "blocked:")
    assert f.park_reason([line("budget", 0, cost=0.2)], limits).startswith("budget:")
    assert "task budget $1 spent" in f.park_reason([line("failed", 0, cost=0.6),
                                                    line("failed", 1, cost=0.5)], limits)
    assert "QA failed it 2 times" in f.park_reason([], limits, bounces=2)
    assert f.park_reason([line("ok", 0)], limits, bounces=1) is None


def test_qa_bounces_from_the_changelog_and_the_notes() -> None:
    def change(n: int, old: str, new: str, task_id: int = 7) -> dict:
        return {"id": n, "task_id": task_id, "old_status": old, "new_status": new,
                "changed_at": naive(at(-60) + timedelta(seconds=n))}

    flow = [("created", "under_work"), ("under_work", "dev_done"),  # dev done
            ("dev_done", "under_work"), ("under_work", "created"),  # QA fail 1
            ("created", "under_work"), ("under_work", "created"),   # dev gave back: no bounce
            ("created", "under_work"), ("under_work", "dev_done"),
            ("dev_done", "under_work"), ("under_work", "created")]  # QA fail 2
    log = [change(n, *pair) for n, pair in enumerate(flow)] + [change(40, "dev_done",
                                                                      "under_work", 8)]
    assert f.qa_bounces(log, TASK) == 2
    # Un-parked by a person (pending -> created): the count starts again.
    log += [change(20, "created", "pending"), change(21, "pending", "created")]
    assert f.qa_bounces(log, TASK) == 0
    # Entries older than the task belong to a deleted task with the same id.
    assert f.qa_bounces([change(n, *p) for n, p in enumerate(flow)],
                        {"id": 7, "created_at": naive(T0)}) == 0
    notes = "qa1: fail: tests red\n\nqa2: fail: still red\ndev: done"
    assert f.qa_bounces([], {**TASK, "notes": notes}) == 2
    assert f.qa_bounces([], {**TASK, "notes": notes + f"\n{f.PARKED_MARK}: x\nqa: fail: y"}) == 1


def test_breaker_opens_doubles_and_closes() -> None:
    limits = f.Limits(max_consecutive_failures=3, retry_cooldown=60)
    rows = [line("failed", 0), line("hook", 1)]
    assert f.breaker(rows, limits, now=at(2)).state == "closed"
    rows.append(line("timeout", 2))
    state = f.breaker(rows, limits, now=at(2.5))
    assert (state.state, state.wait_s, state.until) == ("open", 60, at(3))
    assert not state.allows(at(2.5)) and state.allows(at(3))
    assert f.breaker(rows, limits, now=at(3)).state == "half_open"
    rows.append(line("failed", 4))  # the half-open try failed: twice as long
    state = f.breaker(rows, limits, now=at(4.5))
    assert (state.state, state.wait_s) == ("open", 120)
    rows += [line("failed", 10 + n) for n in range(10)]
    assert f.breaker(rows, limits, now=at(20)).wait_s == 3600
    # Pauses and verdicts are no failures; a good end closes it.
    assert f.breaker([*rows, line("rate_limit", 21)], limits, now=at(21)).trips == 12
    assert f.breaker([*rows, line("ok", 30)], limits, now=at(30)).state == "closed"
    assert f.breaker([line("blocked", n) for n in range(5)], limits, now=at(6)).state == \
        "closed"


def test_daily_budget_counts_today_only() -> None:
    limits = f.Limits(daily_budget_usd=1.0)
    history = [line("ok", -60 * 13, cost=5.0), line("ok", 0, cost=0.7),
               line("failed", 1, cost=0.3, task={"id": 9})]
    over, spent, tomorrow = f.over_daily_budget(history, limits, now=at(2))
    assert (over, spent) == (True, 1.0)
    assert tomorrow == datetime(2026, 12, 1, tzinfo=UTC)
    assert not f.over_daily_budget(history, f.Limits(), now=at(2))[0]


def test_decide_claim_cool_park() -> None:
    limits = f.Limits(max_attempts=3, retry_cooldown=60, max_bounces=3)
    assert f.decide(TASK, [], limits, now=at(0)).action == "claim"
    history = [line("failed", 0)]
    cool = f.decide(TASK, history, limits, now=at(0.5))
    assert (cool.action, cool.until) == ("cool", at(1))
    assert f.decide(TASK, history, limits, now=at(1)).action == "claim"
    history += [line("failed", 2), line("failed", 5)]
    park = f.decide(TASK, history, limits, now=at(100))
    assert park.action == "park" and park.attempts == 3
    bounced = {**TASK, "notes": "q: fail: a\nq: fail: b\nq: fail: c"}
    assert f.decide(bounced, [], limits, role="backend_dev").action == "park"
    assert f.decide(bounced, [], limits, role="qa").action == "claim"


def test_claudes_own_retries_are_shown_while_they_happen() -> None:
    """During claude's retries of an overloaded API nothing else is printed for minutes:
    each retry becomes a progress line, and the stop is classified from them."""
    from pmtool.agent.stream import StreamParser, describe_event

    parser = StreamParser("backend_dev")
    retry = {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10,
             "retry_delay_ms": 500, "error_status": 529, "error": "overloaded"}
    shown = [describe_event(e) for line in (json.dumps(retry),) for e in parser.feed(line)]
    assert shown == ["model API answered 529 (overloaded); claude retry 1/10, next try in 0.5s"]
    assert f.classify(None, parser.stops, exit_code=-15, timed_out_by="timeout").kind == \
        "overloaded"

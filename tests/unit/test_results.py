"""A result dataclass is a command's answer: its JSON, its exit code, nested results too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pmtool.errors import EXIT_CONFLICT, EXIT_OK, exit_code
from pmtool.results import Result, as_json


@dataclass
class Inner(Result):
    ref: str


@dataclass
class Outer(Result):
    task_id: int
    ok: bool = True
    inner: Inner | None = None
    rows: list[Inner] = field(default_factory=list)
    error: dict[str, Any] | None = None


def test_to_json_walks_nested_results():
    answer = Outer(7, inner=Inner("a"), rows=[Inner("b")])
    assert answer.to_json() == {"task_id": 7, "ok": True, "inner": {"ref": "a"},
                                "rows": [{"ref": "b"}], "error": None}
    assert as_json({"x": [answer]}) == {"x": [answer.to_json()]}


def test_exit_code_reads_a_result_as_its_json():
    assert exit_code(Outer(1)) == EXIT_OK
    failed = Outer(1, ok=False, error={"type": "conflict", "message": "locked"})
    assert exit_code(failed) == EXIT_CONFLICT == exit_code(failed.to_json())


@dataclass
class Sometimes(Result):
    done: bool
    reason: str | None = None
    note: str | None = None

    OPTIONAL = ("reason",)


def test_an_optional_key_is_in_the_json_only_when_set():
    """`note` is not optional: None is said; `reason` only when there is one."""
    assert Sometimes(True).to_json() == {"done": True, "note": None}
    assert Sometimes(False, "why").to_json() == {"done": False, "reason": "why", "note": None}

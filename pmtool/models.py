"""Which model works a task of a given level (`pmtool model-for`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pmtool.config import LEVELS, Settings, check_level
from pmtool.errors import UsageError
from pmtool.results import Result


@dataclass
class ModelChoice(Result):
    """`pmtool model-for`: the model that works a task of `level`."""

    level: str
    model: str


def model_for(level: str, settings: Settings) -> ModelChoice:
    check_level(level)
    return ModelChoice(level, settings.model_for(level))


def level_of(task: dict[str, Any]) -> str:
    """A task's `difficulty` is the agent level it needs."""
    level = task.get("difficulty") if isinstance(task, dict) else None
    if not level:
        raise UsageError("the task has no `difficulty`", hint="pass a Headless PM task object")
    return check_level(level)


def task_level(task: Mapping[str, Any], default: str | None = None) -> str:
    """The level a task's model is chosen for: its `difficulty`, else `default`, else
    senior (a record or task from elsewhere may lack it; a run still needs a model)."""
    level = task.get("difficulty") or default
    return level if level in LEVELS else "senior"


def stronger_model(model: str, settings: Settings) -> str | None:
    """The next model up the junior < senior < principal ladder that differs from `model`."""
    ladder = [settings.model_for(level) for level in LEVELS]
    if model in ladder:
        for candidate in ladder[ladder.index(model) + 1:]:
            if candidate != model:
                return candidate
    return None


def same_task(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True when two task objects are the same server task, not merely the same id.

    The server reuses the newest task's id after it is deleted (SQLite rowid, contract
    quirk 9), so an id seen before can name a different task now: compare `created_at`
    as well, or the title when either side lacks it (the id alone when both lack that).
    """
    if not a or not b or a.get("id") != b.get("id"):
        return False
    for key in ("created_at", "title"):
        if a.get(key) and b.get(key):
            return a[key] == b[key]
    return True

"""What pmtool does when something fails, and the limits that bound it: one place.

The choices are enums (a `str` subclass, so they print and compare as their values); the
limits are plain numbers. `check_run_policy` validates both for any caller, so a Python
caller of `pmtool.run.loop.Runner` gets the same UsageError (exit 2) the CLI gives. The
values come from flags, the environment or the config file (`pmtool.config.SPECS`).

Where each policy lives in `scripts/pm-runner.sh` (the same loop in bash) is named next
to its use in `pmtool/run/loop.py`.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pmtool.errors import UsageError


class AgentFailure(StrEnum):
    """An agent run that ends without a verdict."""

    RETRY = "retry"      # once more with --resume, then give the task back
    RELEASE = "release"  # give the task back at once
    STOP = "stop"        # stop the runner, task record kept


class HookFailure(StrEnum):
    """A failing pre_task hook when nobody is at a terminal to ask."""

    RELEASE = "release"    # give the task back and wait
    CONTINUE = "continue"  # work the task anyway
    STOP = "stop"          # stop the runner, task record kept


class Leftover(StrEnum):
    """Uncommitted work an agent leaves in its worktree."""

    COMMIT = "commit"  # commit it on the task branch
    RESCUE = "rescue"  # keep it on a rescue ref only


def choose(kind: type[StrEnum], value: Any, name: str) -> Any:
    """`value` as a member of `kind`; a UsageError naming the valid values otherwise."""
    try:
        return kind(value)
    except ValueError:
        valid = [m.value for m in kind]
        raise UsageError(f'{name} "{value}" is not one of ' + ", ".join(valid),
                         valid=valid) from None


# name -> (kind, least value, None allowed). Counts are ints; times are seconds unless
# the name says otherwise (keep_logs: days).
LIMITS: dict[str, tuple[type, float, bool]] = {
    "max_attempts": (int, 1, False),
    "retry_cooldown": (float, 0, False),
    "max_bounces": (int, 1, False),
    "max_consecutive_failures": (int, 1, False),
    "daily_budget_usd": (float, 0, True),
    "task_budget_usd": (float, 0, True),
    "max_budget_usd": (float, 0, True),
    "max_turns": (int, 1, True),
    "poll_interval": (float, 0, False),
    "poll_max": (float, 0, False),
    "keep_logs": (float, 0, False),
    "grace": (float, 0, False),
    "heartbeat": (float, 0, False),
    "health_interval": (float, 0, False),
}
CHOICES: dict[str, type[StrEnum]] = {
    "on_agent_failure": AgentFailure,
    "on_hook_failure": HookFailure,
    "leftover": Leftover,
}

SWITCHES = ("push",)
# Every setting that is a run policy: the names shared by pmtool.config.SPECS, the flags
# of `pmtool run` and the fields of pmtool.run.loop.RunOptions.
POLICY_SETTINGS = (*CHOICES, *LIMITS, *SWITCHES)


def check_limit(name: str, value: Any) -> Any:
    """A limit of LIMITS as its type; UsageError when it is the wrong type or too small."""
    kind, least, optional = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    if value is None:
        if optional:
            return None
        raise UsageError(f"{flag} needs a value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f'{flag} must be a number, got "{value}"')
    if kind is int and value != int(value):
        raise UsageError(f'{flag} must be a whole number, got "{value}"')
    if math.isnan(value) or value < least:
        raise UsageError(f'{flag} must be at least {least:g}, got "{value}"')
    return kind(value)


def check_run_policy(values: dict[str, Any]) -> dict[str, Any]:
    """The policy values among `values`, checked and converted (enums, ints, floats)."""
    out = {}
    for name, value in values.items():
        if name in CHOICES:
            out[name] = choose(CHOICES[name], value, "--" + name.replace("_", "-"))
        elif name in LIMITS:
            out[name] = check_limit(name, value)
        elif name in SWITCHES:
            if not isinstance(value, bool):
                raise UsageError(f"--{name.replace('_', '-')} must be true or false, "
                                 f'got "{value}"')
            out[name] = value
    if "poll_interval" in out and "poll_max" in out and out["poll_max"] < out["poll_interval"]:
        raise UsageError(f"--poll-max {out['poll_max']:g} is below --poll-interval "
                         f"{out['poll_interval']:g}")
    return out

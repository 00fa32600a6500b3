"""From the settings to the library's values: the one builder.

Flags, the environment and the config file become a `pmtool.config.Settings`; everything
the library takes from it (the limits that bound attempts, the finish's plan, the options
of a claim, an agent run, a recover) is built here and nowhere else, so the CLI, a cron
job, a bash pipeline and the runner bound a task the same way. A Python caller that builds
its own values gets the same defaults: pmtool.failure_policy.Limits() is what
`limits(settings)` gives when nothing is set (tests/unit/test_settings_drift.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmtool import failure_policy as fl

# Each builder imports the module it builds for when it is called: `pmtool claim` pays
# for the claim's module, not for the finish's, recover's and the agent's (their result
# dataclasses cost start-up time to create).
if TYPE_CHECKING:
    from pmtool.agent.options import AgentOptions
    from pmtool.work.claim import ClaimOptions
    from pmtool.work.finish import FinishPlan
    from pmtool.work.recover import RecoverOptions
    from pmtool.worktree import WorktreeOptions

# The limits a Settings can name (the rest of fl.Limits are fixed caps).
LIMIT_NAMES = ("max_attempts", "retry_cooldown", "max_bounces", "max_consecutive_failures",
               "task_budget_usd", "daily_budget_usd")


def limits(settings: Any, **given: Any) -> fl.Limits:
    """The limits named by the settings (flags, env, config), `given` values first."""
    values = {}
    for name in LIMIT_NAMES:
        value = given.get(name)
        if value is None:
            value = getattr(settings, "values", {}).get(name)
        if value is not None:
            values[name] = value
    return fl.Limits(**values)


def finish_plan(settings: Any, **given: Any) -> FinishPlan:
    """The finish's plan: hooks, leftover and push policies, the limits; `given` first
    (None values are not given). A `hooks_dir` given is the folder itself (a runner's
    resolved --hooks-dir); without one, the settings' folder is found per repository."""
    from pmtool.work.finish import FinishPlan

    values: dict[str, Any] = {
        "hooks_dir": settings.hooks_dir, "hook_timeout": settings.hook_timeout,
        "leftover": str(settings.values.get("leftover", "commit")),
        "push": bool(settings.values.get("push", False)),
        "state_dir": str(settings.state_path), "api_url": settings.api_url,
        "settings": settings, "limits": limits(settings),
        # The key reaches a hook only when a setting passes it on.
        "hook_key": settings.api_key if settings.values.get("pass_key_to_hooks") else None}
    values.update({k: v for k, v in given.items() if v is not None})
    if given.get("hooks_dir") is not None:
        values["settings"] = None  # FinishPlan.hooks: the folder as given wins
    return FinishPlan(**values)


def agent_options(settings: Any, **given: Any) -> AgentOptions:
    """The options of an agent run: `given` (None values are not given), then the
    settings' time limit, turn cap and instructions folder."""
    from pmtool.agent.options import AgentOptions

    values: dict[str, Any] = {"timeout": settings.claude_timeout,
                              "max_turns": settings.max_turns,
                              "instructions_dir": settings.instructions_dir}
    values.update({k: v for k, v in given.items() if v is not None})
    return AgentOptions(**values)


def step_limits(settings: Any, **given: Any) -> fl.StepLimits:
    """What bounds the step after a run without a verdict: --on-agent-failure (the
    on_agent_failure setting), --escalate, and the limits of the task's attempts
    (`limits`: max_attempts, the task budget) that say when a give-back parks it; `given`
    first."""
    values = getattr(settings, "values", {})
    chosen: dict[str, Any] = {"on_failure": str(values.get("on_agent_failure") or "retry"),
                              "limits": limits(settings)}
    chosen.update({k: v for k, v in given.items() if v is not None})
    return fl.StepLimits(**chosen)


def recover_options(settings: Any, **given: Any) -> RecoverOptions:
    """What `pmtool recover` does: the grace, the logs kept, the limits a give-back is
    judged by, the finish's plan for a record with a verdict; `given` first (None values
    are not given)."""
    from pmtool.work.recover import RecoverOptions

    bounds = limits(settings)
    values: dict[str, Any] = {
        "grace": settings.grace, "keep_logs": settings.keep_logs, "limits": bounds,
        "plan": finish_plan(settings, limits=bounds)}
    values.update({k: v for k, v in given.items() if v is not None})
    return RecoverOptions(**values)


def claim_options(settings: Any, **given: Any) -> ClaimOptions:
    """How a claim looks and takes: the limits from the settings, the rest (wait, settle,
    explain, register_first, on_wait, sleep) as `given` (None values are not given)."""
    from pmtool.work.claim import ClaimOptions

    values: dict[str, Any] = {"limits": limits(settings)}
    values.update({k: v for k, v in given.items() if v is not None})
    return ClaimOptions(**values)


def worktree_options(settings: Any, repo: str | Path | None = None,
                     **given: Any) -> WorktreeOptions:
    """Where and how a task's worktree is made: the worktree base, the hooks folder (found
    as `settings.hooks_path(repo)` says), the hook timeout and minor_in_checkout from the
    settings; `base` and the rest `given` first (None values are not given)."""
    from pmtool.worktree import WorktreeOptions  # git's module: only when a worktree is made

    values: dict[str, Any] = {
        "worktree_base": settings.worktree_base, "hooks_dir": settings.hooks_path(repo),
        "hook_timeout": settings.hook_timeout,
        "minor_in_checkout": bool(settings.minor_in_checkout)}
    values.update({k: v for k, v in given.items() if v is not None})
    return WorktreeOptions(**values)

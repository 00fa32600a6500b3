"""How an agent run is to go: `AgentOptions`, the caller's choices in one value.

`exec-claude`'s flags and the runner's options travel together to
`pmtool.agent.claude.run_for_task` and `pmtool.work.exec.run_for_record`; build them from
the settings with `pmtool.work.options.agent_options(settings, **given)` so the CLI and the
runner fill the same defaults, and vary one field with `dataclasses.replace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentOptions:
    """The choices of one agent run; None means "the settings' (or the record's) own".

    model:      the model (else the record's, else `model_for` the task's difficulty)
    cwd:        where to run when the task has no worktree (else the current git checkout)
    prompt:     send this text as it is (--prompt-file); template: build the prompt from
                this template text (--prompt-template)
    instructions_dir: folder of <role>.md files; context_instructions_path: the server's
                instructions_path (asked from /api/v1/context when needed and not given)
    timeout, idle_timeout: seconds before the whole process tree is ended (0: none)
    max_budget_usd, max_turns: claude's own caps of the run
    agent_cmd:  a command line run instead of claude (the --agent-cmd contract)
    env:        the base environment instead of os.environ
    """

    model: str | None = None
    cwd: str | Path | None = None
    prompt: str | None = None
    template: str | None = None
    instructions_dir: str | Path | None = None
    context_instructions_path: str | Path | None = None
    timeout: float | None = None
    idle_timeout: float | None = None
    max_budget_usd: float | None = None
    max_turns: int | None = None
    agent_cmd: str | None = None
    env: Mapping[str, str] | None = None

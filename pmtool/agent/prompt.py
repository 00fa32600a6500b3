"""What the agent is asked and what it must answer: the prompt, the verdict's schema, and how
the verdict is read.

Text in, text out: nothing here runs a process or talks to a server; the only reads are
the role's instruction files (`role_instructions`).

The prompt
----------
`build_prompt` fills a template (DEFAULT_TEMPLATE, or the text of --prompt-template) with
`prompt_fields`: the role's instructions (--instructions-dir, else the server's
`instructions_path` when it exists on this machine, else pmtool's own `prompts/<role>.md`),
the task, the rules of the run (where to work, which branch to commit on) and how to give
the verdict. A resumed run sends `continuation_prompt`, which says the task again.

The verdict
-----------
The outcome of a task never comes from the exit code alone. The agent is asked for a final
structured answer, ``{"outcome": ..., "summary": ...}`` (`verdict_schema`: ``done|blocked``
for developer roles, architect and pm; ``pass|fail|blocked`` for qa), which Claude Code
returns as ``structured_output`` of its result line. The fallback is a line
``PMTOOL_VERDICT: <outcome> <summary>`` in the final text (or, if the CLI asked once more
after it, in the latest assistant text that has one). Without either, ``outcome`` is null
and the run is not ok (`extract_verdict`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pmtool.config import ROLES
from pmtool.errors import UsageError

QA_OUTCOMES = ("pass", "fail", "blocked")
DEV_OUTCOMES = ("done", "blocked")
VERDICT_PREFIX = "PMTOOL_VERDICT:"
# Models dress the line in Markdown (`**PMTOOL_VERDICT: done** ...`, backticks, a bullet).
VERDICT_RE = re.compile(r"^[\s*_`>#-]*PMTOOL_VERDICT:[\s*_`]*([A-Za-z]+)[*_`]*\s*(.*?)[\s*_`]*$")


# -- the verdict ----------------------------------------------------------------------------


def outcomes_for(role: str | None) -> tuple[str, ...]:
    """The outcomes a role can report: qa pass/fail/blocked, everybody else done/blocked."""
    return QA_OUTCOMES if role == "qa" else DEV_OUTCOMES


def verdict_schema(role: str | None = None) -> dict[str, Any]:
    """The JSON schema of the agent's final answer (given to claude as --json-schema)."""
    return {
        "type": "object",
        "properties": {
            "outcome": {"type": "string", "enum": list(outcomes_for(role)),
                        "description": "How the task ended."},
            "summary": {"type": "string",
                        "description": "One to three sentences: what was done, or what is "
                                       "wrong or missing."},
        },
        "required": ["outcome", "summary"],
        "additionalProperties": False,
    }


def verdict_line(text: str | None, role: str | None = None) -> tuple[str, str] | None:
    """The last `PMTOOL_VERDICT: <outcome> <summary>` line of `text`, if its outcome is valid."""
    if not text:
        return None
    for line in reversed(text.strip().splitlines()):
        match = VERDICT_RE.match(line)
        if match:
            outcome = match.group(1).lower()
            if outcome in outcomes_for(role):
                return outcome, match.group(2).strip()
            return None
    return None


def extract_verdict(result: Mapping[str, Any] | None, role: str | None = None,
                    texts: Iterable[str] = ()) -> dict[str, Any]:
    """`{"outcome", "summary", "verdict_source", "verdict_error"}` from a result line.

    Structured output first; then a verdict line in the final text; then (newest first) in
    `texts`, the assistant's earlier texts: when the model wrote the line but did not call
    the structured-output tool, the CLI asks once more and the final text is that answer.
    """
    found: dict[str, Any] = {"outcome": None, "summary": None, "verdict_source": None,
                             "verdict_error": None}
    result = result or {}
    structured = result.get("structured_output")
    if isinstance(structured, Mapping):
        outcome = str(structured.get("outcome", "")).lower()
        if outcome in outcomes_for(role):
            summary = structured.get("summary")
            found.update(outcome=outcome, summary=str(summary) if summary is not None else "",
                         verdict_source="structured_output")
            return found
        found["verdict_error"] = (f'structured output has outcome "{structured.get("outcome")}"'
                                  f", not one of {', '.join(outcomes_for(role))}")
    for text in [result.get("result"), *reversed(list(texts))]:
        line = verdict_line(text if isinstance(text, str) else None, role)
        if line:
            found.update(outcome=line[0], summary=line[1], verdict_source="verdict_line",
                         verdict_error=None)
            return found
    if not found["verdict_error"]:
        found["verdict_error"] = ("the agent gave no verdict (no structured output, no "
                                  f"{VERDICT_PREFIX} line)")
    return found


# -- the prompt ------------------------------------------------------------------------------

DEFAULT_TEMPLATE = """\
{instructions}

# Your task

Task {task_id}: {title}

- Role: {role}
- Complexity: {complexity}
- Difficulty: {difficulty}
- Branch: {task_branch}

## Description

{description}

## Notes on the task so far

{notes}

# Rules for this run

These rules come from pmtool, which runs you; they win over anything above.

{rules}

# When you are done

{verdict}
"""

# The task is said again: a kill can cut claude's own session file short, and the resumed
# agent then sees this prompt alone (it once redid committed work from the title only).
CONTINUATION_TEMPLATE = """\
Your earlier run on task {task_id} was interrupted before it finished. Continue from where
you stopped: look at `git status` and `git log` in {cwd} to see what is already done (do
not redo committed work), finish the task, commit on branch `{branch}`, and end with your
verdict as before.

# The task, again

Task {task_id}: {title}

{description}

# Rules for this run

{rules}

# When you are done

{verdict}
"""


class _SafeDict(dict):
    """format_map mapping that leaves unknown `{placeholders}` as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def role_file(role: str, folder: str | Path | None) -> Path | None:
    """`<folder>/<role>.md` when the folder is given and the file exists."""
    if not folder:
        return None
    path = Path(folder).expanduser() / f"{role}.md"
    return path if path.is_file() else None


def role_instructions(role: str, instructions_dir: str | Path | None = None,
                      context_instructions_path: str | Path | None = None) -> tuple[str, str]:
    """The role's instruction text and where it came from (a path, or `builtin:<role>`).

    `instructions_dir` (--instructions-dir / PMTOOL_INSTRUCTIONS_DIR) first; then the
    server's `instructions_path` from /api/v1/context, which names a folder on the
    server's machine and so is only used when it exists here too; then pmtool's own file.
    A file that cannot be read is passed over, never a hard failure.
    """
    for folder in (instructions_dir, context_instructions_path):
        path = role_file(role, folder)
        if path:
            try:
                return path.read_text(encoding="utf-8", errors="replace").strip(), str(path)
            except OSError:
                continue
    name = role if role in ROLES else "backend_dev"
    text = resources.files("pmtool").joinpath("prompts", f"{name}.md").read_text("utf-8")
    return text.strip(), f"builtin:{name}"


def verdict_instructions(role: str | None) -> str:
    outcomes = outcomes_for(role)
    if role == "qa":
        meaning = ("- `pass`: the work on the branch does what the task asks.\n"
                   "- `fail`: it does not; the summary says what is wrong so that a developer "
                   "can fix it.\n"
                   "- `blocked`: you could not test it (say why).")
        example = "pass The change does what the task asks; its tests pass."
    else:
        meaning = ("- `done`: the task is implemented and committed.\n"
                   "- `blocked`: you cannot finish it (say why: missing information, a broken "
                   "environment, a task it depends on).")
        example = "done Implemented the change and its tests; all tests pass."
    return (f"End by calling the `StructuredOutput` tool exactly once with `outcome` (one of: "
            f"{', '.join(outcomes)}) and `summary` (one to three sentences: what you did, or "
            f"what is wrong or missing).\n\n{meaning}\n\n"
            f"If that tool is not available to you, make the last line of your final answer "
            f"`{VERDICT_PREFIX} <outcome> <summary>`, for example "
            f"`{VERDICT_PREFIX} {example}`")


def run_rules(cwd: str | Path, branch: str | None, complexity: str | None,
              role: str | None = None) -> str:
    where = branch or "the branch that is checked out"
    if role == "qa":
        branch_rule = (f"- Review the work on `{where}`. Tests you add or fix are committed "
                       "there too, with messages that say why.")
    elif complexity == "minor":
        branch_rule = (f"- This is a minor task: commit straight onto `{where}` (the base "
                       "branch), in small commits with messages that say why.")
    else:
        branch_rule = (f"- Commit your work on `{where}`, the task's own branch, in small "
                       "commits with messages that say why; it is reviewed before it is "
                       "merged.")
    return "\n".join([
        f"- Work only in this directory: `{cwd}` (a git checkout on `{where}`).",
        branch_rule,
        "- Do not switch branches, push, or rewrite history that is already committed.",
        "- Do not change the task on the Headless PM server (status, lock, comments): pmtool "
        "reports your verdict for you when you finish.",
        "- Leave the working tree clean (everything that belongs to the task committed) and "
        "no background processes running.",
    ])


def prompt_fields(task: Mapping[str, Any], role: str, cwd: str | Path, branch: str | None,
                  instructions: str = "") -> dict[str, Any]:
    """The values a prompt template can use, by placeholder name."""
    notes = task.get("notes")
    return {
        "instructions": instructions,
        "role": role,
        "task_id": task.get("id", "?"),
        "title": task.get("title") or "(untitled)",
        "description": (task.get("description") or "(no description)").strip(),
        "complexity": task.get("complexity") or "major",
        "difficulty": task.get("difficulty") or "?",
        "branch": branch or task.get("branch") or "?",
        "task_branch": task.get("branch") or "?",
        "notes": notes.strip() if isinstance(notes, str) and notes.strip() else "(none)",
        "status": task.get("status") or "?",
        "cwd": str(cwd),
        "outcomes": ", ".join(outcomes_for(role)),
        "rules": run_rules(cwd, branch or task.get("branch"), task.get("complexity"), role),
        "verdict": verdict_instructions(role),
        "task_json": json.dumps(dict(task), indent=2, default=str),
    }


def render(template: str, fields: Mapping[str, Any], what: str = "the prompt template") -> str:
    """`template.format_map(fields)`; unknown placeholders stay, bad braces are exit 2."""
    try:
        return template.format_map(_SafeDict(fields))
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise UsageError(f"{what} is not a valid template: {exc}",
                         hint="placeholders look like {title}; write a literal brace as {{ or }}",
                         placeholders=sorted(fields)) from None


def build_prompt(task: Mapping[str, Any], role: str, cwd: str | Path, branch: str | None,
                 instructions_dir: str | Path | None = None,
                 context_instructions_path: str | Path | None = None,
                 template: str | None = None) -> str:
    """The prompt for one run: the role's instructions, the task, the run's rules, and how
    to give the verdict. `template` (the text of --prompt-template) replaces the built-in
    DEFAULT_TEMPLATE; its `{placeholders}` are the keys of `prompt_fields`."""
    instructions, _source = role_instructions(role, instructions_dir, context_instructions_path)
    fields = prompt_fields(task, role, cwd, branch, instructions)
    return render(template or DEFAULT_TEMPLATE, fields).strip() + "\n"


def continuation_prompt(task: Mapping[str, Any], role: str, cwd: str | Path,
                        branch: str | None) -> str:
    """The short prompt a --resume run sends: the session already holds the task."""
    return render(CONTINUATION_TEMPLATE, prompt_fields(task, role, cwd, branch)).strip() + "\n"


__all__ = [
    "CONTINUATION_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "build_prompt",
    "continuation_prompt",
    "extract_verdict",
    "outcomes_for",
    "prompt_fields",
    "role_file",
    "role_instructions",
    "verdict_line",
    "verdict_schema",
]

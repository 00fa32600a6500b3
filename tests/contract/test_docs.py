"""The manual keeps up with the code: the generated reference pages are current, every
command has help with an example and a place in the docs, and the shell examples of the
README and the tutorial run, against a private stand-in with a stand-in claude on PATH.

A `bash` block in README.md or docs/tutorial.md runs unless the line before it says
`<!-- not run by the tests: WHY -->`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

import helpers
from helpers import (
    PMTOOL,
    TUTORIAL,
    assert_nothing_left,
    bash_blocks,
    documented_keys,
    main_log,
    run_block,
    run_tutorial,
    wait_for,
)
from pmtool.cli import reference

ROOT = helpers.ROOT
README = ROOT / "README.md"
REGENERATE = ("the reference is stale: run `.venv/bin/python -m pmtool.cli.reference` "
              "and commit docs/reference/")


# -- the generated reference ----------------------------------------------------------------

def test_reference_pages_are_generated_from_the_current_code():
    assert reference.stale() == [], REGENERATE


def test_a_stale_page_is_seen(tmp_path):
    """The check compares text: a page edited by hand (or an old one) is stale."""
    for name, text in reference.pages().items():
        (tmp_path / name).write_text(text)
    assert reference.stale(tmp_path) == []
    page = tmp_path / "settings.md"
    page.write_text(page.read_text().replace("`PMTOOL_GRACE`", "`PMTOOL_GRACE_OLD`"))
    assert reference.stale(tmp_path) == ["settings.md"]


def test_every_setting_and_exit_code_is_in_the_reference():
    from pmtool import errors
    from pmtool.config import SPECS

    settings = (ROOT / "docs/reference/settings.md").read_text()
    for name, spec in SPECS.items():
        row = next(line for line in settings.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{env}`" in row for env in spec.env), row
    assert "`pmtool run --max-attempts`" in settings  # flags found from the CLI itself
    codes = (ROOT / "docs/reference/exit-codes.md").read_text()
    table = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \|(.*)$", codes, re.M)}
    assert set(table) == {v for k, v in vars(errors).items()
                          if k.startswith("EXIT_") and isinstance(v, int)}
    for kind, code in errors.KIND_EXIT.items():
        assert f"`{kind}`" in table[code], (kind, code)
    assert all("`stopped`" in table[code] for code in errors.EXIT_SIGNALS.values())


def commands() -> list[tuple[str, ...]]:
    return [path for path, _command in reference.walk(reference.root_command())]


@pytest.mark.parametrize("path", commands(), ids=" ".join)
def test_every_command_has_help_an_example_and_docs(path):
    proc = subprocess.run([PMTOOL, *path, "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"Usage: pmtool {' '.join(path)}" in proc.stdout
    is_group = "\nCommands:\n" in proc.stdout
    if not is_group:
        assert "Example:" in proc.stdout, f"`pmtool {' '.join(path)} --help` has no Example:"
    assert f"\n## pmtool {' '.join(path)}\n" in (ROOT / "docs/reference/commands.md").read_text()
    # The README's table names every command (a group's sub-commands as `group a/b/c`).
    table = README.read_text().split("\n## The commands\n", 1)[1].split("\n## ", 1)[0]
    first = re.findall(r"^\| `pmtool ([a-z-]+)(?: ([a-z/-]+))?", table, re.M)
    named = {(cmd, sub) for cmd, subs in first for sub in (subs.split("/") if subs else [""])}
    assert (path[0], path[1] if len(path) > 1 else "") in named or \
        (is_group and any(cmd == path[0] for cmd, _ in named)), path


def test_root_help_has_examples_and_points_at_the_manual():
    out = subprocess.run([PMTOOL, "--help"], capture_output=True, text=True, check=True).stdout
    assert "Examples:" in out and "pmtool demo" in out
    assert "docs/" in out


# -- the README as a front page ---------------------------------------------------------------

def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    quick = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert ".venv/bin/pmtool demo" in quick and "tests/run.sh" in quick
    # The short exit table agrees with errors.py.
    from pmtool import errors

    table = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    listed = {int(c) for row in re.findall(r"^\| ([\d, ]+) \|", table, re.M)
              for c in row.split(",")}
    assert listed == {v for k, v in vars(errors).items()
                      if k.startswith("EXIT_") and isinstance(v, int)}


def test_docs_links_of_the_readme_exist():
    for target in re.findall(r"\]\((docs/[^)#]+)", README.read_text()):
        assert (ROOT / target).is_file(), target


# -- the shell examples run --------------------------------------------------------------------


def test_only_bash_blocks_hold_commands():
    """A ```sh or ```shell block would escape the run: the pages use ```bash only."""
    for path in (README, TUTORIAL):
        assert not re.search(r"^```(sh|shell|console)$", path.read_text(), re.M), path


def task_status(reader: dict, task_id: int) -> dict:
    return next(t for t in reader["seeder"].client.list_tasks() if t["id"] == task_id)


def test_readme_shell_blocks_run(reader):
    """In order, each in a fresh shell (the exports are the test's environment); before
    each, the server has a task for the developers, as after the README's own curl block."""
    blocks = bash_blocks(README)
    assert len([b for b in blocks if b[1] is None]) >= 5
    client = reader["seeder"].client

    def statuses() -> list[str]:
        return [t["status"] for t in client.list_tasks()]

    for line, skip, code in blocks:
        if skip:
            continue
        if "created" not in statuses():
            reader["seeder"].create_task(title=f"for the block at README.md:{line}")
        done = sum(s in ("dev_done", "qa_done") for s in statuses())
        proc = run_block(reader, code)
        assert proc.returncode == 0, (line, code, proc.stdout[-2000:], proc.stderr[-3000:])
        if "pmtool run" in code or "finish" in code:
            # Each pipeline finished a task and left nothing behind.
            assert sum(s in ("dev_done", "qa_done") for s in statuses()) > done, line
            assert "under_work" not in statuses(), line
            assert_nothing_left(reader, reader["repo"])


def test_the_tutorial_runs_in_one_terminal(reader):
    """From an empty server and no repository to a task done and landed on main."""
    proc, task = run_tutorial(reader)
    assert f"task {task['id']}" in main_log(reader["home"] / "src" / "hello")
    assert '"outcome":"done"' in proc.stdout.replace(" ", "")


def readme_pipeline(title: str) -> str:
    text = README.read_text()
    block = text[text.index(title):]
    block = block[block.index("```bash\n") + 8:]
    return block[:block.index("```")]


def test_one_task_pipeline_resumes_after_a_kill(reader):
    """Killed while the agent works, the pipeline run again goes on with the same task
    (claim would refuse it) and finishes it fully: no worktree, no record left."""
    first = reader["seeder"].create_task(difficulty="junior")
    second = reader["seeder"].create_task(difficulty="junior")
    code = readme_pipeline("**One task.**")
    record = reader["home"] / ".local/state/pmtool/records/dev_001.json"
    proc = subprocess.Popen(["bash", "-c", code], cwd=reader["home"], text=True,
                            env={**reader["env"], "PMTOOL_FAKE_AGENT_SLEEP": "60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: record.is_file() and json.loads(record.read_text()).get("session_id"),
                 timeout=60, what="the agent at work")
        logs = reader["home"] / ".local/state/pmtool/logs"
        wait_for(lambda: any(p.stat().st_size for p in logs.glob("task-*.jsonl")),
                 timeout=60, what="the agent's first lines")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and pmtool, as a power cut would
        proc.wait()
    assert task_status(reader, first["id"])["status"] == "under_work"

    again = run_block(reader, code)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume" in again.stderr
    assert task_status(reader, first["id"])["status"] == "dev_done"
    assert task_status(reader, second["id"])["status"] == "created"  # not claimed instead
    assert_nothing_left(reader, reader["repo"])


def test_one_task_pipeline_gives_a_failed_run_back(reader):
    """claude failing: the task goes back with an attempt noted, never `finish`ed."""
    task = reader["seeder"].create_task(difficulty="junior")
    proc = run_block(reader, readme_pipeline("**One task.**"),
                     {"PMTOOL_FAKE_AGENT_EXIT": "1", "PMTOOL_FAKE_AGENT_OUTCOME": "none"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = task_status(reader, task["id"])
    assert after["status"] == "created"
    assert "released: attempt 1/3" in (after["notes"] or "")
    assert_nothing_left(reader, reader["repo"])


def test_each_command_answers_the_keys_the_reference_lists(reader):
    """One task through every command by hand, each answer's keys against the table."""
    reader["seeder"].create_task(complexity="major", branch="feature/keys")
    env = {**reader["env"], "PMTOOL_RUNNER_PID": str(os.getpid())}
    repo, agent = str(reader["repo"]), ["--agent-id", "dev_keys"]
    calls = {
        "config": ["config"], "model-for": ["model-for", "senior"], "health": ["health"],
        "register": ["register", *agent, "--role", "backend_dev"],
        "claim": ["claim", *agent, "--role", "backend_dev"],
        "lock show": ["lock", "show", *agent],
        "lock update": ["lock", "update", *agent, "--model", "sonnet"],
        "worktree create": ["worktree", "create", *agent, "--repo", repo],
        "worktree list": ["worktree", "list", "--repo", repo],
        "hook run": ["hook", "run", "pre_task", *agent],
        "exec-claude": ["exec-claude", *agent],
        "recover": ["recover"],
        "finish --full": ["finish", *agent, "--outcome", "done", "--full"],
        "worktree prune": ["worktree", "prune", "--repo", repo, "--dry-run"],
        "recover --orphans": ["recover", "--orphans"],
        "status": ["status"], "logs TASK": ["logs", "1"], "report": ["report"],
        "init DIR": ["init", str(reader["home"] / "pmtool-init")],
    }
    documented = documented_keys()
    assert set(documented) == set(calls)
    for name, args in calls.items():
        proc = subprocess.run([PMTOOL, *args], capture_output=True, text=True, env=env,
                              cwd=reader["home"], timeout=120, check=False)
        answer = json.loads(proc.stdout)
        assert answer["ok"], (name, answer, proc.stderr[-2000:])
        keys = set(answer) - {"ok"}
        assert keys == documented[name], (
            f"`pmtool {name}` answers {sorted(keys)}; docs/reference/output.md lists "
            f"{sorted(documented[name])}: add {sorted(keys - documented[name])}, drop "
            f"{sorted(documented[name] - keys)}")


def test_the_pipelines_guide_shows_the_pipelines_the_readme_runs():
    """docs/how-to/pipelines.md repeats the README's pipelines; the README's are the ones
    run above, so the guide's must be the same text."""
    lines = README.read_text().splitlines()
    start = lines.index("## Pipelines that survive a crash")
    ran = [code for line, skip, code in bash_blocks(README) if skip is None and line > start]
    guide = [code for _line, _skip, code in bash_blocks(ROOT / "docs/how-to/pipelines.md")]
    assert len(ran) == 3
    assert guide[:3] == ran

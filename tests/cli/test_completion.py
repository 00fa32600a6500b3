"""Shell completion: the scripts pmtool prints and installs, fed to a real bash."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import PMTOOL

BIN = str(Path(PMTOOL).parent)


def run(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([PMTOOL, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def complete(script: str, *words: str) -> list[str]:
    """What bash offers for the last of `words`, with `script` loaded (as a shell would)."""
    quoted = " ".join(f"'{w}'" for w in ("pmtool", *words))
    program = (f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words)}\n"
               "_pmtool_completion pmtool\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, env=env, timeout=60, check=True)
    return done.stdout.split()


@pytest.mark.parametrize(("shell", "sign"), [("bash", "complete -o default -F"),
                                             ("zsh", "#compdef pmtool"),
                                             ("fish", "complete --command pmtool")])
def test_show_completion_for_a_named_shell(shell: str, sign: str) -> None:
    shown = run("--show-completion", shell)
    assert shown.returncode == 0, shown.stderr
    assert sign in shown.stdout and "_PMTOOL_COMPLETE" in shown.stdout


def test_an_unknown_shell_is_a_usage_error() -> None:
    shown = run("--show-completion", "tcsh")
    assert shown.returncode == 2 and '"valid": ["bash", "zsh", "fish"]' in shown.stdout


def test_bash_completes_commands_roles_and_levels() -> None:
    script = run("--show-completion", "bash").stdout
    assert complete(script, "cl") == ["claim"]
    assert set(complete(script, "claim", "--role", "")) == {
        "frontend_dev", "backend_dev", "qa", "architect", "pm"}
    assert complete(script, "run", "--level", "pr") == ["principal"]
    assert complete(script, "worktree", "cr") == ["create"]


def test_install_completion_for_bash_works_in_a_new_shell(tmp_path: Path) -> None:
    installed = run("--install-completion", "bash", home=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    rc = (tmp_path / ".bashrc").read_text()
    script = (tmp_path / ".bash_completions" / "pmtool.sh").read_text()
    assert str(tmp_path / ".bash_completions" / "pmtool.sh") in rc
    assert complete(script, "lock", "re") == ["release"]

"""pmtool.procs, the one door to child processes, with real processes.

The subreaper and parent-death tests run their "runner" in a separate Python process: a
subreaper adopts every orphan below it, which must not change the pytest process itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from helpers import wait_for
from pmtool import procs

linux = pytest.mark.skipif(not procs.has_parent_death_signal(),
                           reason="parent-death signal and subreaper are Linux only")


def _token() -> str:
    """A sleep length no other process uses, so the test can find its sleeper by argv."""
    return f"1000.{uuid.uuid4().int % 10**9:09d}"


def _sleepers(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and token in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_gone(token: str, within: float = 5.0) -> list[psutil.Process]:
    """Poll (a bounded wait, not a speed check) until no sleeper with `token` is left."""
    deadline = time.monotonic() + within
    while _sleepers(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _sleepers(token)


def _kill(procs_: list[psutil.Process]) -> None:
    for proc in procs_:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("keeper", [True, False], ids=["kept", "bare"])
@pytest.mark.parametrize(("script", "code", "name"), [
    ("exit 0", 0, None), ("exit 3", 3, None),
    ("kill -KILL $$", 137, "SIGKILL"), ("kill -TERM $$", 143, "SIGTERM")])
def test_exit_status_is_the_childs(script: str, code: int, name: str | None,
                                   keeper: bool) -> None:
    if keeper and not procs.has_keeper():
        pytest.skip("no keeper here (Linux only)")
    with procs.start(["sh", "-c", script], keeper=keeper) as child:
        ending = child.wait(10)
    assert (ending.exit_code, ending.signal, ending.timed_out) == (code, name, False)
    assert (child.inner_pid != child.pid) is keeper


@pytest.mark.parametrize("keeper", [True, False], ids=["kept", "bare"])
def test_no_python_runs_between_fork_and_exec(keeper: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # `run --agents N` starts children from several threads: a preexec_fn there can
    # deadlock the child on a lock another thread held at the fork. The keeper asks for its
    # parent-death signal itself (test_a_child_dies_with_its_killed_parent holds it to it).
    if keeper and not procs.has_keeper():
        pytest.skip("no keeper here (Linux only)")
    seen: list[dict] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    with procs.start(["true"], keeper=keeper, parent_death=signal.SIGTERM) as child:
        assert child.wait(10).exit_code == 0
    assert seen and all(kw.get("preexec_fn") is None for kw in seen), seen
    assert all(kw.get("start_new_session") for kw in seen)  # its own process group still


@pytest.mark.skipif(not procs.has_keeper(), reason="the keeper is Linux only")
def test_children_started_from_many_threads_at_once_all_run() -> None:
    import threading

    codes: list[int | None] = []

    def one(n: int) -> None:
        with procs.start(["sh", "-c", f"exit {n}"], parent_death=signal.SIGTERM) as child:
            codes.append(child.wait(30).exit_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(codes) == sorted(n for n in range(8) for _ in range(3))


def test_pmtool_keeper_0_turns_the_keeper_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMTOOL_KEEPER", "0")
    assert not procs.has_keeper()
    with procs.start(["true"]) as child:
        assert child.wait(10).exit_code == 0
    assert child.inner_pid == child.pid


@pytest.mark.skipif(not procs.has_keeper(), reason="Linux only")
def test_a_keeper_that_cannot_run_is_done_without(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "keeper.py"
    broken.write_text("raise SystemExit(1)\n")
    monkeypatch.setattr(procs, "KEEPER", broken)
    monkeypatch.setattr(procs, "keeper_trouble", None)
    with procs.start(["sh", "-c", "cat; exit 5"], stdin="in\n",
                     stdout=subprocess.PIPE) as child:
        assert child.popen.stdout is not None
        with child.popen.stdout:
            assert child.popen.stdout.read() == b"in\n"
        assert child.wait(10).exit_code == 5
    assert child.inner_pid == child.pid and not procs.has_keeper()
    assert procs.keeper_trouble and "did not start" in procs.keeper_trouble


@pytest.mark.skipif(not procs.has_keeper(), reason="Linux only")
def test_a_child_that_cannot_start_raises_through_the_keeper(tmp_path: Path) -> None:
    import errno

    script = tmp_path / "no-shebang"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    with pytest.raises(OSError) as missing:
        procs.start([str(tmp_path / "missing")])
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(OSError) as noexec:
        procs.start([str(script)])
    assert noexec.value.errno == errno.ENOEXEC
    script.chmod(0o644)
    with pytest.raises(OSError) as denied:
        procs.start([str(script)])
    assert denied.value.errno == errno.EACCES


def test_stdin_and_stdout_pass_through_untouched(tmp_path: Path) -> None:
    # A hook reads its JSON context on stdin and prints; an agent writes to a pipe.
    from pmtool.hooks import run_hook

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hook = hooks / "pre_task"
    hook.write_text(f"#!{sys.executable}\nimport json, sys\nctx = json.load(sys.stdin)\n"
                    "print(ctx['hook'], ctx['task_id'])\nprint('err', file=sys.stderr)\n")
    hook.chmod(0o755)
    result = run_hook("pre_task", hooks, {"task_id": 42}, timeout=30)
    assert result.ok, result
    assert (result.stdout, result.stderr) == ("pre_task 42\n", "err\n")
    payload = bytes(range(256)) * 64  # binary, bigger than a pipe write
    with procs.start(["cat"], stdin=payload, stdout=subprocess.PIPE) as child:
        assert child.popen.stdout is not None
        with child.popen.stdout:
            out = child.popen.stdout.read()
        child.wait(10)
    assert out == payload


def test_a_time_limit_ends_the_tree_and_reports_124() -> None:
    token = _token()
    with procs.start(["sh", "-c", f"sleep {token} & wait"]) as child:
        ending = child.wait(0.5, grace=1)
    assert ending.timed_out and ending.timed_out_by == "timeout" and ending.exit_code == 124
    assert child.pid in ending.swept
    assert _wait_gone(token) == []


def test_an_exception_while_waiting_ends_the_tree() -> None:
    token = _token()
    with pytest.raises(KeyboardInterrupt), procs.start(["sleep", token]):
        raise KeyboardInterrupt
    assert _wait_gone(token) == []


def test_stdin_is_fed_from_a_file(tmp_path: Path) -> None:
    ending, out, _err = procs.run(["cat"], timeout=10, stdin="hello\n")
    assert ending.exit_code == 0 and out == "hello\n"


# -- escaped children: the subreaper finds them whatever their environment ------------------

ESCAPE = "(env -i setsid sleep {token} &)"  # double fork + new session + no mark

HOOK_RUNNER = """
import json, sys
from pathlib import Path
from pmtool import procs
from pmtool.hooks import run_hook
if sys.argv[1] == "subreaper":
    assert procs.become_subreaper()
if sys.argv[1] == "plain":
    procs.has_keeper = lambda: False
result = run_hook("escape", sys.argv[2], {}, timeout=float(sys.argv[3]))
print(json.dumps(result.to_json()))
"""


def _escaping_hook(tmp_path: Path, token: str, then: str) -> Path:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hook = hooks / "escape"
    hook.write_text(f"#!/bin/sh\n{ESCAPE.format(token=token)}\n{then}\n")
    hook.chmod(0o755)
    return hooks


@linux
@pytest.mark.parametrize("net", ["subreaper", "keeper"])
def test_a_hook_child_that_hides_ends_with_the_timed_out_hook(tmp_path: Path,
                                                              net: str) -> None:
    # Either net alone finds it: the runner as a subreaper, or the hook's keeper.
    token = _token()
    hooks = _escaping_hook(tmp_path, token, "sleep 60")
    try:
        run = _python(HOOK_RUNNER, net, str(hooks), "1")
        assert run.returncode == 0, run.stderr
        assert '"timed_out": true' in run.stdout and '"exit_code": 124' in run.stdout
        assert _wait_gone(token) == []
    finally:
        _kill(_sleepers(token))


@linux
def test_without_subreaper_and_keeper_the_same_child_escapes(tmp_path: Path) -> None:
    # The control for the test above: the mark alone cannot find `env -i setsid`.
    token = _token()
    hooks = _escaping_hook(tmp_path, token, "sleep 60")
    try:
        run = _python(HOOK_RUNNER, "plain", str(hooks), "1")
        assert run.returncode == 0, run.stderr
        assert _sleepers(token), "expected the hidden child to escape without a subreaper"
    finally:
        _kill(_sleepers(token))


AGENT_RUNNER = """
import json, sys
from pmtool import procs
from pmtool.agent.claude import AgentRun, run_agent
assert procs.become_subreaper()
run = AgentRun("the prompt", cwd=sys.argv[1], model="m", task_id=7, log_dir=sys.argv[2],
               agent_cmd=sys.argv[3], grace=1)
print(json.dumps(run_agent(run).to_json()))
"""


@linux
def test_an_agent_child_that_hides_ends_with_the_run(tmp_path: Path) -> None:
    token = _token()
    agent = tmp_path / "agent.sh"
    result = ('{"type": "result", "is_error": false, "num_turns": 1, "result": '
              '"PMTOOL_VERDICT: done ok"}')
    agent.write_text(f"#!/bin/sh\ncat >/dev/null\n{ESCAPE.format(token=token)}\n"
                     f"echo '{result}'\n")
    agent.chmod(0o755)
    try:
        run = _python(AGENT_RUNNER, str(tmp_path), str(tmp_path / "logs"), str(agent))
        assert run.returncode == 0, run.stderr
        assert '"outcome": "done"' in run.stdout
        assert _wait_gone(token) == []
    finally:
        _kill(_sleepers(token))


# -- kill -9 of the parent -------------------------------------------------------------------

PARENT = """
import sys, time
from pmtool import procs
with procs.start(["sleep", sys.argv[1]], parent_death=int(sys.argv[2])) as child:
    print(child.pid, flush=True)
    child.wait()
"""


@linux
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_child_dies_with_its_killed_parent(sig: int) -> None:
    token = _token()
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARENT), token, str(sig)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert _sleepers(token)
        parent.kill()  # SIGKILL: the parent runs no cleanup at all
        parent.communicate(timeout=10)
        assert _wait_gone(token) == [], f"child {child_pid} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill(_sleepers(token))


HIDING_PARENT = """
import sys
from pmtool import procs
token, keeper, sig = sys.argv[1][1:], sys.argv[2] == "kept", int(sys.argv[3])
# setsid and env -i setsid, each double-forked (the shell's & child exits at once), and
# one that ignores SIGTERM; then the child waits, as claude waits for a slow tool step.
script = (f"setsid sleep {token} & (env -i setsid sleep {token} &); "
          f"(trap '' TERM; exec env -i setsid sleep {token}) & sleep {token}")
with procs.start(["sh", "-c", script], parent_death=sig, grace=1, keeper=keeper) as child:
    print(child.pid, flush=True)
    child.wait()
"""


def _start_hiding_parent(token: str, keeper: str, sig: int) -> subprocess.Popen:
    # "=token": an argument of its own would make _sleepers count the parent.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HIDING_PARENT),
                               f"={token}", keeper, str(sig)],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    parent.stdout.readline()
    wait_for(lambda: len(_sleepers(token)) >= 4, timeout=60, what="the child's sleepers")
    assert len(_sleepers(token)) == 4
    return parent


@pytest.mark.skipif(not procs.has_keeper(), reason="the keeper is Linux only")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_9_of_the_parent_ends_every_process_the_child_hid(sig: int) -> None:
    # issue 13: the parent is no subreaper; the keeper alone ends the tree, setsid'd and
    # env -i'd double-forks included, and SIGKILLs the one that ignores SIGTERM.
    token = _token()
    parent = _start_hiding_parent(token, "kept", sig)
    try:
        parent.kill()
        parent.communicate(timeout=10)  # and closes its stdout
        assert _wait_gone(token) == []
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill(_sleepers(token))


@pytest.mark.skipif(not procs.has_keeper(), reason="the keeper is Linux only")
def test_kill_9_of_the_runner_during_a_hook_ends_what_the_hook_started(
        tmp_path: Path) -> None:
    # A worktree_setup running `npm install`, say: the hook waits on a child of its own
    # while another hides with env -i setsid; the runner (no subreaper) is killed.
    token = _token()
    hooks = _escaping_hook(tmp_path, token, f"sleep {token}")
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOOK_RUNNER), "keeper",
                               str(hooks), "600"], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(_sleepers(token)) >= 2, timeout=60, what="the hook's children")
        assert len(_sleepers(token)) == 2
        runner.kill()
        runner.communicate(timeout=10)
        assert _wait_gone(token) == []
    finally:
        if runner.poll() is None:
            runner.kill()
        _kill(_sleepers(token))


@linux
def test_without_the_keeper_the_hidden_processes_outlive_the_parent() -> None:
    # The control: the parent-death signal reaches the child only.
    token = _token()
    parent = _start_hiding_parent(token, "bare", signal.SIGKILL)
    try:
        parent.kill()
        parent.communicate(timeout=10)  # and closes its stdout
        time.sleep(1)
        assert len(_sleepers(token)) == 4  # the signal ended the shell, none of its sleeps
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill(_sleepers(token))


def test_adopted_ignores_our_own_session_children() -> None:
    # A plain subprocess of ours (git, say) is never taken for an escaped orphan.
    with subprocess.Popen(["sleep", "5"]) as plain:
        try:
            assert plain.pid not in [p.pid for p in procs.adopted(0.0)]
        finally:
            plain.kill()


def test_only_procs_and_git_start_processes() -> None:
    """Children are started through procs, and git through pmtool.git: nowhere else.

    pmtool.testing is left out: its stand-in agent *is* a child, and does what agents do.
    """
    package = Path(procs.__file__).parent
    doors = {package / "procs.py", package / "git.py"}
    offenders = []
    for path in package.rglob("*.py"):
        if "testing" in path.relative_to(package).parts or path in doors:
            continue
        text = path.read_text(encoding="utf-8")
        if '["git"' in text or "['git'" in text or 'which("git")' in text:
            offenders.append(f"{path.name}: runs git itself")
        if "subprocess.Popen(" in text or "subprocess.run(" in text:
            offenders.append(f"{path.name}: starts a process itself")
    assert offenders == []
    assert os.path.exists(package / "git.py")


@pytest.mark.timeout(120)  # a hang here is the bug: fail, do not wait forever
def test_a_hung_claude_version_fails_the_health_check(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pmtool.agent import binary
    from pmtool.config import load_settings
    from pmtool.views import health

    token = _token()
    fake = tmp_path / "claude"
    # The helper it starts holds the output open: subprocess.run would wait for it.
    fake.write_text(f"#!/bin/sh\nsleep {token} &\nsleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(binary, "CLAUDE_VERSION_TIMEOUT", 1.0)
    settings = load_settings({"claude_bin": str(fake)}, config_path=tmp_path / "none.toml")
    try:
        check = health.check_claude(settings)
        assert check["ok"] is False and check["timed_out"] is True
        assert "did not answer" in check["detail"]
        assert _wait_gone(token) == []
    finally:
        _kill(_sleepers(token))


def test_a_stopped_child_reports_the_signal_not_0() -> None:
    # Ending the tree must leave the child's exit status to its owner: a reaped-elsewhere
    # child makes Popen say 0, which is how a killed hook once read "failed: exit 0".
    import threading

    stop = threading.Event()
    stop.set()
    with procs.start(["sleep", _token()]) as child:
        ending = child.wait(stop=stop, grace=2)
    assert ending.stopped and not ending.timed_out
    assert (ending.exit_code, ending.signal) == (143, "SIGTERM")


WATCHER_RUNNER = """
import json, sys
from pmtool import procs
from pmtool.hooks import run_hook
assert procs.become_subreaper()
first = run_hook("escape", sys.argv[1], {}, timeout=10)
second = run_hook("quick", sys.argv[1], {}, timeout=10)
print(json.dumps([first.to_json(), second.to_json()]))
"""


@linux
def test_a_watcher_a_hook_leaves_is_reported_and_not_taken_for_the_next_childs(
        tmp_path: Path) -> None:
    # A worktree_setup may start a watcher on purpose: it is listed, and the next child
    # (started after it) does not count it among its own leftovers.
    import json

    token = _token()
    hooks = _escaping_hook(tmp_path, token, "exit 0")
    (hooks / "quick").write_text("#!/bin/sh\nexit 0\n")
    (hooks / "quick").chmod(0o755)
    try:
        run = _python(WATCHER_RUNNER, str(hooks))
        assert run.returncode == 0, run.stderr
        first, second = json.loads(run.stdout)
        watcher = [p.pid for p in _sleepers(token)]
        assert first["ok"] and watcher and first["left_running"] == watcher
        assert second["ok"] and "left_running" not in second
    finally:
        _kill(_sleepers(token))


TWO_AGENTS_RUNNER = """
import json, os, sys, time
import psutil
os.environ["PMTOOL_KEEPER"] = "0"  # with a keeper, orphans go to it, not to us
from pmtool import procs
assert procs.become_subreaper()
token = sys.argv[1]
first = procs.start(["sleep", "30"], label="agent-a")
time.sleep(0.2)  # the orphan below is born after the first agent
# The second agent leaves an orphan (its subshell exits): we adopt it, with its mark.
second = procs.start(["sh", "-c", f"(setsid sleep {token} &); sleep 30"], label="agent-b")
deadline = time.monotonic() + 10
orphans = []
while not orphans and time.monotonic() < deadline:  # adopted: re-parented to us
    for child in psutil.Process().children():
        try:
            if child.cmdline() == ["sleep", token]:
                orphans.append(child.pid)
        except psutil.Error:
            pass
    time.sleep(0.05)
mine = [p.pid for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] == ["sleep", token]]
print(json.dumps({"leftovers_a": [p.pid for p in first.leftovers()], "orphan": mine,
                  "of_b": [p.pid for p in second.leftovers()]}))
first.end(grace=1.0)
second.end(grace=1.0)
"""


@linux
def test_one_agents_orphan_is_not_another_agents_leftover() -> None:
    # `pmtool run --agents N`: several agents' children under one subreaper. An orphan of
    # the second agent, born after the first started, carries the second's mark.
    import json

    token = _token()
    try:
        run = _python(TWO_AGENTS_RUNNER, token)
        assert run.returncode == 0, run.stderr
        seen = json.loads(run.stdout)
        assert seen["orphan"], seen
        assert not set(seen["orphan"]) & set(seen["leftovers_a"]), seen
        assert set(seen["orphan"]) <= set(seen["of_b"]), seen
    finally:
        _kill(_sleepers(token))

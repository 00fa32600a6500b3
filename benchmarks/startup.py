"""Start-up time of pmtool commands, as ratios to `python -c "import typer"` in the same run;
then `pmtool claim` with no task against the headless-pm client's `tasks next`.

    .venv/bin/python benchmarks/startup.py [--runs 15] [--hpm-client PATH --hpm-python PY]

Target: `pmtool model-for senior` <= 1.3x the baseline; `worktree`, `hook run` and
`model-for` import no HTTP stack (checked with -X importtime). Runs are interleaved so that a
noisy neighbour slows the baseline and the commands alike. Besides wall time, each run's
CPU time (user + system, of the process and its children) is shown: on a loaded machine it
moves much less than the wall time does, so it is the figure to compare between runs.

Claim (issue 11, target `claim` with no task <= 1.0x the client's `tasks next`): against
the server of PMTOOL_TEST_PM_URL/KEY, else a stand-in. The client (headless-pm's
agents/client/headless_pm_client.py, not part of pmtool: give its path and a Python that
has `requests`, or PMTOOL_HPM_CLIENT / PMTOOL_HPM_PYTHON) is given a task of another role
to answer at once (with none, its `tasks next` long-polls for 180 s); without it its row
reads n/a. Then, on a stand-in of its own, what a claim with no task asks of the server
(requests, bytes answered) and takes, with 0 and 500 finished tasks on it: it must not grow.
Install pmtool with `pip install .` (not -e) for the figures a user sees: an editable
install's import finder adds ~12 ms to every start.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PMTOOL = str(Path(sys.executable).with_name("pmtool"))


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   input=b"{}", check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def loaded(cmd: list[str], env: dict[str, str]) -> set[str]:
    """The top-level modules a command imports (python -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pmtool", *cmd[1:]],
                         capture_output=True, text=True, env=env, input="{}", check=False)
    return {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in out.stderr.splitlines() if line.startswith("import time:")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--hpm-client", default=os.environ.get("PMTOOL_HPM_CLIENT"),
                        help="headless-pm's headless_pm_client.py [env PMTOOL_HPM_CLIENT]")
    parser.add_argument("--hpm-python", default=os.environ.get("PMTOOL_HPM_PYTHON"),
                        help="the Python to run it with [env PMTOOL_HPM_PYTHON; default: "
                             "this one]")
    parser.add_argument("--finished", type=int, default=500,
                        help="finished tasks on the stand-in for the history check")
    parser.add_argument("--only", choices=("startup", "claim", "history"),
                        help="run one part")
    args = parser.parse_args()
    if args.only in (None, "startup"):
        startup(args)
    if args.only in (None, "claim"):
        claim_vs_client(args)
    if args.only in (None, "history"):
        claim_history(args)


def startup(args: argparse.Namespace) -> None:
    state = tempfile.mkdtemp(prefix="pmtool-bench-")
    env = {**os.environ, "PMTOOL_STATE_DIR": state,
           "PMTOOL_CONFIG": os.devnull}
    cases = {
        'python -c "import typer"': [sys.executable, "-c", "import typer"],
        "pmtool model-for senior": [PMTOOL, "model-for", "senior"],
        "pmtool --help": [PMTOOL, "--help"],
        "pmtool health --check git": [PMTOOL, "health", "--check", "git"],
        # Commands pm-runner.sh runs per task that need no server: no HTTP stack.
        "pmtool worktree list": [PMTOOL, "worktree", "list", "--repo", state],
        "pmtool hook run pre_task": [PMTOOL, "hook", "run", "pre_task", "--input", "-"],
    }
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    for cmd in cases.values():  # warm the page cache once
        timed(cmd, env)
    for _ in range(args.runs):
        for name, cmd in cases.items():
            wall, cpu = timed(cmd, env)
            walls[name].append(wall)
            cpus[name].append(cpu)
    base = statistics.median(walls['python -c "import typer"'])
    cpu_base = statistics.median(cpus['python -c "import typer"'])
    print(f"{'command':32} {'median ms':>10} {'ratio':>7} {'cpu ms':>8} {'ratio':>7}")
    for name in cases:
        med, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        print(f"{name:32} {med * 1000:10.1f} {med / base:6.2f}x {cpu * 1000:8.1f} "
              f"{cpu / cpu_base:6.2f}x")
    for name in ("pmtool model-for senior", "pmtool worktree list", "pmtool hook run pre_task"):
        heavy = [m for m in ("requests", "urllib3") if m in loaded(cases[name], env)]
        print(f"{name:32} imports {', '.join(heavy) if heavy else 'no HTTP stack'}")
    ratio = statistics.median(walls["pmtool model-for senior"]) / base
    cpu_ratio = statistics.median(cpus["pmtool model-for senior"]) / cpu_base
    print(f"\nmodel-for target <= 1.30x: {'met' if ratio <= 1.3 else 'MISSED'} ({ratio:.2f}x "
          f"wall, {cpu_ratio:.2f}x CPU, median of {args.runs}; load {os.getloadavg()[0]:.1f})")



# -- claim with no task vs the headless-pm client ------------------------------------------

CLIENT_ROLE = "frontend_dev"  # the client is given a task of this role, to answer at once
CLAIM_ROLE, CLAIM_LEVEL = "architect", "junior"  # pmtool finds none of this role and level


def _pmtool_env(url: str, key: str, home: str) -> dict[str, str]:
    """As a user runs it: server and key only, config and state in their default places
    (under a HOME of the benchmark's own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMTOOL_", "HEADLESS_PM_", "XDG_"))}
    return {**env, "HOME": home, "HEADLESS_PM_API_URL": url, "HEADLESS_PM_API_KEY": key}


def _claim_cmd(agent: str, role: str = CLAIM_ROLE, level: str = CLAIM_LEVEL) -> list[str]:
    return [PMTOOL, "claim", "--agent-id", agent, "--role", role, "--level", level,
            "--wait", "0"]


def _nothing(cmd: list[str], env: dict[str, str]) -> None:
    """The claim must find nothing (exit 3): a benchmark never takes someone's task."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 3:
        sys.exit(f"`pmtool claim` answered exit {out.returncode}, not 3 (no task): "
                 f"{out.stdout.strip()[:300]}")


def claim_vs_client(args: argparse.Namespace) -> None:
    from pmtool.testing.seed import Seeder, unique_id
    from pmtool.testing.server import server_under_test

    url, key, proc = server_under_test(PMTOOL)
    env = _pmtool_env(url, key, tempfile.mkdtemp(prefix="pmtool-bench-claim-"))
    seed = Seeder(url, key)
    try:
        offered = seed.next_task(CLAIM_ROLE, CLAIM_LEVEL)
        if offered:
            sys.exit(f"the server offers {CLAIM_ROLE}/{CLAIM_LEVEL} task {offered['id']}; "
                     "the benchmark needs none (it claims nothing that is not its own)")
        cases: dict[str, list[str]] = {"pmtool claim --wait 0 (no task)":
                                       _claim_cmd(unique_id("bench_claim"))}
        client_env = {**os.environ, "HEADLESS_PM_URL": url, "API_KEY_HEADLESS_PM": key}
        task = None
        if args.hpm_client:
            task = seed.create_task(title="for the headless-pm client's tasks next",
                                    target_role=CLIENT_ROLE, difficulty="junior")
            cases[f"client tasks next ({CLIENT_ROLE}: one waiting)"] = [
                args.hpm_python or sys.executable, args.hpm_client, "tasks", "next",
                "--role", CLIENT_ROLE, "--level", "senior"]
        # Where the time goes: the HTTP stack both pay, and typer, which only pmtool does.
        cases['python -c "import requests"'] = [sys.executable, "-c", "import requests"]
        cases['python -c "import requests, typer"'] = [sys.executable, "-c",
                                                       "import requests, typer"]
        _nothing(cases["pmtool claim --wait 0 (no task)"], env)
        walls: dict[str, list[float]] = {name: [] for name in cases}
        cpus: dict[str, list[float]] = {name: [] for name in cases}
        load = [os.getloadavg()[0]]
        for _ in range(args.runs):
            if task and not seed.get_task(task["id"], status="created"):
                sys.exit(f"task {task['id']} was taken by someone; the client would long-poll")
            for name, cmd in cases.items():
                wall, cpu = timed(cmd, client_env if cmd[0] != PMTOOL else env)
                walls[name].append(wall)
                cpus[name].append(cpu)
            load.append(os.getloadavg()[0])
        where = "stand-in" if proc else f"real server {url}"
        print(f"\nclaim vs the headless-pm client ({where}, median of {args.runs}, "
              f"load {min(load):.1f}-{max(load):.1f})")
        print(f"{'command':44} {'wall ms':>8} {'cpu ms':>8}")
        for name in cases:
            print(f"{name:44} {statistics.median(walls[name]) * 1000:8.1f} "
                  f"{statistics.median(cpus[name]) * 1000:8.1f}")
        mine, theirs = "pmtool claim --wait 0 (no task)", next(
            (name for name in cases if name.startswith("client")), None)
        if theirs is None:
            print(f"{'client tasks next':44} {'n/a':>8}  (give --hpm-client)")
            return
        ratio = statistics.median(walls[mine]) / statistics.median(walls[theirs])
        cpu_ratio = statistics.median(cpus[mine]) / statistics.median(cpus[theirs])
        print(f"claim target <= 1.00x the client: {'met' if ratio <= 1.0 else 'MISSED'} "
              f"({ratio:.2f}x wall, {cpu_ratio:.2f}x CPU)")
    finally:
        if task:
            seed.release(task["id"], "committed")
        seed.close()
        if proc:
            proc.terminate()
            proc.wait(10)


def _requests_since(url: str, since: float) -> list[dict[str, Any]]:
    """The stand-in's logged API requests after `since` (its clock), its own admin calls
    left out so that counting does not count itself."""
    import requests

    logged = requests.get(f"{url}/_sandbox/requests", timeout=10).json()
    return [r for r in logged if r["at"] > since and not r["route"].startswith("/_sandbox")]


def _bytes_answered(url: str, key: str, logged: list[dict[str, Any]]) -> int:
    """What the logged GETs answered, asked again (the log keeps no sizes)."""
    import requests

    total = 0
    for entry in logged:
        if entry["method"] == "GET" and entry["route"].startswith("/api/"):
            total += len(requests.get(url + entry["route"], params=entry.get("query"),
                                      headers={"X-API-Key": key}, timeout=10).content)
    return total


def claim_history(args: argparse.Namespace) -> None:
    """A claim with no task, as the stand-in's finished tasks grow from 0 to --finished."""
    import json

    from pmtool.testing.seed import Seeder, unique_id

    key = "bench-" + os.urandom(6).hex()
    proc = subprocess.Popen([PMTOOL, "sandbox", "serve", "--port", "0", "--api-key", key,
                             "--race-window", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    url = json.loads(proc.stdout.readline())["url"]
    env = _pmtool_env(url, key, tempfile.mkdtemp(prefix="pmtool-bench-history-"))
    role, level = "backend_dev", "senior"
    seed = Seeder(url, key)
    rows = []
    try:
        seed.create_task(title="pending: a reason to give", promote=False)
        for finished in (0, args.finished):
            while len(seed.created) - 1 < finished:
                done = seed.create_task(title="finished", target_role=role)
                seed.set_status(done["id"], "committed")
            cmd = _claim_cmd(unique_id("bench_hist"), role, level)
            since = max((r["at"] for r in _requests_since(url, 0.0)), default=0.0)
            _nothing(cmd, env)
            logged = _requests_since(url, since)
            answered = _bytes_answered(url, key, logged)
            walls = [timed(cmd, env)[0] for _ in range(max(5, args.runs // 2))]
            rows.append((finished, len(logged), answered, statistics.median(walls),
                         sorted({f"{r['method']} {r['route']}" for r in logged})))
    finally:
        seed.close()
        proc.terminate()
        proc.wait(10)
    print(f"\nclaim with no task as finished tasks grow (stand-in, {role}/{level})")
    print(f"{'finished tasks':>14} {'requests':>9} {'bytes answered':>15} {'wall ms':>8}")
    for finished, count, answered, wall, _routes in rows:
        print(f"{finished:14} {count:9} {answered:15} {wall * 1000:8.1f}")
    print("requests: " + ", ".join(rows[-1][4]))
    grew = rows[-1][2] > rows[0][2] * 1.1
    print(f"bytes do not grow with finished tasks: {'MISSED' if grew else 'met'}")


if __name__ == "__main__":
    main()

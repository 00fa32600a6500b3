"""Start-up time of pmtool commands, as ratios to `python -c "import typer"` in the same run.

    .venv/bin/python benchmarks/startup.py [--runs 15]

Target: `pmtool model-for senior` <= 1.3x the baseline; `worktree`, `hook run` and
`model-for` import no HTTP stack (checked with -X importtime). Runs are interleaved so that a
noisy neighbour slows the baseline and the commands alike. Besides wall time, each run's
CPU time (user + system, of the process and its children) is shown: on a loaded machine it
moves much less than the wall time does, so it is the figure to compare between runs.
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    state = tempfile.mkdtemp(prefix="pmtool-bench-")
    env = {**os.environ, "PMTOOL_STATE_DIR": state,
           "PMTOOL_CONFIG": os.path.join(state, "none.toml")}
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


if __name__ == "__main__":
    main()

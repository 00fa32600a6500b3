"""Start-up time of pmtool commands, as ratios to `python -c "import typer"` in the same run.

    .venv/bin/python benchmarks/startup.py [--runs 15]

Target: `pmtool model-for senior` <= 1.3x the baseline. Runs are interleaved so that a
noisy neighbour slows the baseline and the commands alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PMTOOL = str(Path(sys.executable).with_name("pmtool"))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   check=False)
    return time.perf_counter() - start


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
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for cmd in cases.values():  # warm the page cache once
        timed(cmd, env)
    for _ in range(args.runs):
        for name, cmd in cases.items():
            times[name].append(timed(cmd, env))
    base = statistics.median(times['python -c "import typer"'])
    print(f"{'command':32} {'median ms':>10} {'ratio':>7}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:32} {med * 1000:10.1f} {med / base:6.2f}x")
    ratio = statistics.median(times["pmtool model-for senior"]) / base
    print(f"\nmodel-for target <= 1.30x: {'met' if ratio <= 1.3 else 'MISSED'} ({ratio:.2f}x, "
          f"median of {args.runs})")


if __name__ == "__main__":
    main()

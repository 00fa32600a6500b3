#!/usr/bin/env python3
"""post_task hook (example): append one JSON line of task metrics to
$PMTOOL_STATE_DIR/metrics.jsonl.

The task context arrives on stdin (the fields of the task record plus what the caller
adds, e.g. the exec-claude answer: outcome, exit_code, total_cost_usd, num_turns,
duration_s). Known metric fields are kept when present; a `metrics` object in the context
is merged in as it is. Prints the line it wrote. Exit 1 when there is no state folder to
write to, 2 when stdin is not a JSON object.

Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

FIELDS = ("task_id", "title", "agent_id", "role", "level", "complexity", "branch", "worktree",
          "outcome", "status", "exit_code", "timed_out", "model", "session_id", "num_turns",
          "total_cost_usd", "cost_usd", "duration_s", "attempts", "summary")


def main() -> int:
    try:
        context = json.loads(sys.stdin.read() or "{}")
    except ValueError as exc:
        print(f"post_task: the context on stdin is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(context, dict):
        print("post_task: the context on stdin is not a JSON object", file=sys.stderr)
        return 2
    state = os.environ.get("PMTOOL_STATE_DIR") or context.get("state_dir")
    if not state:
        print("post_task: PMTOOL_STATE_DIR is not set; nowhere to write metrics",
              file=sys.stderr)
        return 1
    line = {"at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    task = context["task"] if isinstance(context.get("task"), dict) else {}
    for name in FIELDS:
        value = context.get(name, task.get(name) if name in ("title", "complexity") else None)
        if value is not None:
            line[name] = value
    if "task_id" not in line and "id" in task:
        line["task_id"] = task["id"]
    if isinstance(context.get("metrics"), dict):
        line.update(context["metrics"])
    path = Path(state).expanduser() / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(line, default=str) + "\n").encode()
    # One write on an O_APPEND descriptor: lines from agents finishing at once do not mix.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    sys.stdout.write(data.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""notify hook (example): a desktop notification through `notify-send`.

To use it: cp notify_desktop.py notify.py (pmtool runs the hook named `notify`). Events as
in notify.py: `parked`, `given_up`, `fatal`, `budget` are urgent; `finished` is shown
only when PMTOOL_NOTIFY_FINISHED=1. Exit 1 when notify-send is missing or fails.

Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def main() -> int:
    try:
        context = json.loads(sys.stdin.read() or "{}")
    except ValueError as exc:
        print(f"notify: stdin is not JSON: {exc}", file=sys.stderr)
        return 2
    event = context.get("event") or "notify"
    if event == "finished" and os.environ.get("PMTOOL_NOTIFY_FINISHED") != "1":
        return 0
    send = shutil.which("notify-send")
    if not send:
        print("notify: notify-send is not installed (libnotify-bin)", file=sys.stderr)
        return 1
    urgency = "normal" if event == "finished" else "critical"
    done = subprocess.run([send, "--app-name=pmtool", f"--urgency={urgency}",
                           f"pmtool: {event}", context.get("message") or ""], check=False)
    return 1 if done.returncode else 0


if __name__ == "__main__":
    sys.exit(main())

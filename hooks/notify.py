#!/usr/bin/env python3
"""notify hook (example): post a Slack-compatible message to a webhook URL.

pmtool runs `notify` when a person is needed: event `parked`, `given_up`, `fatal` (a
runner stopped on a fatal error), `budget`, and `finished` (each finished task; sent only
when PMTOOL_NOTIFY_FINISHED=1). The context arrives on stdin: the task fields plus
`event`, `message` and `time`.

Set PMTOOL_NOTIFY_WEBHOOK to a Slack (or Mattermost, Rocket.Chat, Discord `/slack`)
incoming-webhook URL. Without it the hook says so on stderr and exits 0, so an unset
URL never counts as a failed hook. Exit 1 when the post fails, 2 on bad input.

For desktop notifications instead, use notify_desktop.py: cp notify_desktop.py notify.py

Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request


def main() -> int:
    try:
        context = json.loads(sys.stdin.read() or "{}")
    except ValueError as exc:
        print(f"notify: stdin is not JSON: {exc}", file=sys.stderr)
        return 2
    event = context.get("event")
    if event == "finished" and os.environ.get("PMTOOL_NOTIFY_FINISHED") != "1":
        return 0
    url = os.environ.get("PMTOOL_NOTIFY_WEBHOOK")
    if not url:
        print("notify: PMTOOL_NOTIFY_WEBHOOK is not set; nothing sent", file=sys.stderr)
        return 0
    text = f"pmtool {event}: {context.get('message') or ''}".strip()
    body = json.dumps({"text": text}).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except OSError as exc:
        print(f"notify: posting to the webhook failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

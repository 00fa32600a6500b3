#!/usr/bin/env python3
"""health_check hook (example): memory, disk and the Headless PM server.

- memory: MemAvailable from /proc/meminfo >= PMTOOL_MEMORY_MIN_AVAILABLE_MB (default 256);
  skipped where there is no /proc (macOS);
- disk: free space at PMTOOL_STATE_DIR (else the current directory) >=
  PMTOOL_DISK_MIN_FREE_MB (default 1024);
- server: GET $PMTOOL_API_URL/health answers 200 with "status": "healthy" (the endpoint
  needs no key; none is sent); skipped when PMTOOL_API_URL is not set.
Prints one JSON line on stdout, and the failed checks as one line on stderr (the line
`pmtool health` shows). Exit 1 when any check failed.

Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path


def check_memory() -> tuple[bool | None, str]:
    need = int(os.environ.get("PMTOOL_MEMORY_MIN_AVAILABLE_MB") or 256)
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return None, "no /proc/meminfo here; skipped"
    available = int(info["MemAvailable"].split()[0]) // 1024
    if available < need:
        return False, f"{available} MiB available, need {need} (PMTOOL_MEMORY_MIN_AVAILABLE_MB)"
    return True, f"{available} MiB available"


def check_disk() -> tuple[bool | None, str]:
    need = int(os.environ.get("PMTOOL_DISK_MIN_FREE_MB") or 1024)
    where = Path(os.environ.get("PMTOOL_STATE_DIR") or ".").expanduser()
    while not where.exists() and where != where.parent:
        where = where.parent  # the state folder may not exist yet; its disk does
    free = shutil.disk_usage(where).free // (1024 * 1024)
    if free < need:
        return False, f"only {free} MiB free at {where}, need {need} (PMTOOL_DISK_MIN_FREE_MB)"
    return True, f"{free} MiB free at {where}"


def check_server() -> tuple[bool | None, str]:
    url = os.environ.get("PMTOOL_API_URL")
    if not url:
        return None, "PMTOOL_API_URL not set; skipped"
    url = url.rstrip("/") + "/health"
    timeout = float(os.environ.get("PMTOOL_HEALTH_HTTP_TIMEOUT") or 5)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"cannot reach {url}: {reason}"
    status = body.get("status") if isinstance(body, dict) else None
    if status != "healthy":
        return False, f"{url} says status {status!r} (database: {body.get('database')!r})"
    return True, f"{url} healthy"


def main() -> int:
    results = []
    for name, check in (("memory", check_memory), ("disk", check_disk),
                        ("server", check_server)):
        try:
            ok, detail = check()
        except Exception as exc:  # a broken check is a failed check, with its reason
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append({"name": name, "ok": ok, "detail": detail})
    failed = [r for r in results if r["ok"] is False]
    print(json.dumps({"ok": not failed, "checks": results}))
    if failed:
        # One line: `pmtool health` shows the hook's last stderr line as its detail.
        print("health_check: " + "; ".join(f"{r['name']}: {r['detail']}" for r in failed),
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

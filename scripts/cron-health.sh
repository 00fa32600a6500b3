#!/usr/bin/env bash
# cron-health.sh: run `pmtool health`, append its JSON to a log, and on failure print one
# line naming the failed checks (cron mails it) and exit non-zero (pmtool's exit code:
# 1 unhealthy, 4 server unreachable). Silent when healthy.
#   */5 * * * * /path/to/scripts/cron-health.sh --check api --check disk
# PMTOOL_HEALTH_LOG sets the log file (default: health.log in pmtool's state folder);
# arguments go to `pmtool health` (e.g. --check api).
set -euo pipefail
PMTOOL=${PMTOOL:-pmtool}
log=${PMTOOL_HEALTH_LOG:-${PMTOOL_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/pmtool}/health.log}
mkdir -p "$(dirname "$log")"

rc=0
out=$("$PMTOOL" health "$@" 2>/dev/null) || rc=$?
printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${out:-"{\"ok\": false}"}" >>"$log"
if [ "$rc" != 0 ]; then
  failed=$(jq -r '[.checks[]? | select(.ok | not) | "\(.name): \(.detail)"] | join("; ")' <<<"$out" 2>/dev/null || true)
  [ -n "$failed" ] || failed=$(jq -r '.error.message // empty' <<<"$out" 2>/dev/null || true)
  [ -n "$failed" ] || failed="no answer from $PMTOOL"
  echo "pmtool health: exit $rc: ${failed//$'\n'/ }" >&2
fi
exit "$rc"

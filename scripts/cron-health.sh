#!/usr/bin/env bash
# cron-health.sh: run `pmtool health`, append its JSON to a log, and on failure print one
# line naming the failed checks (cron mails it) and exit non-zero (pmtool's exit code).
#   */5 * * * * /path/to/scripts/cron-health.sh
# PMTOOL_HEALTH_LOG sets the log file; arguments go to `pmtool health` (e.g. --check api).
set -euo pipefail
PMTOOL=${PMTOOL:-pmtool}
log=${PMTOOL_HEALTH_LOG:-${PMTOOL_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/pmtool}/health.log}
mkdir -p "$(dirname "$log")"

rc=0
out=$("$PMTOOL" health "$@" 2>/dev/null) || rc=$?
printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$out" >>"$log"
if [ "$rc" != 0 ]; then
  failed=$(jq -r '[.checks[]? | select(.ok | not) | "\(.name): \(.detail)"] | join("; ")' <<<"$out" 2>/dev/null || true)
  [ -n "$failed" ] || failed=$(jq -r '.error.message // "no answer"' <<<"$out" 2>/dev/null || echo "pmtool failed")
  echo "pmtool health: exit $rc: $failed" >&2
fi
exit "$rc"

#!/usr/bin/env bash
# cron-recover.sh: reconcile every task record on this machine with the server
# (`pmtool recover --all`) and report what was done in one line: the counts, then each
# record as agent/task=action, with ",ended=N" when recover ended N processes a dead
# runner had left (its agent, hooks, anything working in its worktree: recover does this
# before a task is resumed, finished or given back). A task whose agent gave its verdict
# is finished (`finished`), never given back. Exit 0 when all is reconciled or there was
# nothing to do;
# pmtool's exit code otherwise, with the reason in one line on stderr (cron mails it).
#   */15 * * * * /path/to/scripts/cron-recover.sh >>"$HOME/.local/state/pmtool/recover.log"
# Arguments go to `pmtool recover` (e.g. --give-back, --dry-run); with --orphans it puts
# back the server's orphaned tasks instead (on the PM's machine), one line the same way.
set -euo pipefail
PMTOOL=${PMTOOL:-pmtool}
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

rc=0
out=$("$PMTOOL" recover --all "$@" 2>/dev/null) || rc=$?
case $rc in
  0) echo "$(stamp) pmtool recover: $(jq -r '
       (.counts | to_entries | map("\(.key)=\(.value)") | join(" ")) + ": " +
       ((.entries // .orphans) | map("\(.agent_id // .locked_by // "?")/\(.task_id // "?")=\(.action)"
         + (if (.ended // [] | length) > 0 then ",ended=\(.ended | length)" else "" end))
         | join(" "))
       + (if .dry_run then " (dry run)" else "" end)' <<<"$out")" ;;
  3) echo "$(stamp) pmtool recover: no task records" ;;
  *) echo "$(stamp) pmtool recover: exit $rc: $(jq -r '.error.message // "failed"' <<<"$out" 2>/dev/null || echo "no answer from $PMTOOL")" >&2
     exit "$rc" ;;
esac

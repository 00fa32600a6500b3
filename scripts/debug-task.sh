#!/usr/bin/env bash
# debug-task.sh: walk one task through every step by hand. Shows each pmtool command and
# its JSON, and waits for Enter before the next one (Ctrl-C leaves the record in place;
# `pmtool lock release --agent-id ID` gives the task back).
#
# Usage: debug-task.sh --role ROLE --agent-id ID [--level L] [--repo DIR] [--task-id N]
#                      [--agent-cmd CMD]
# With --task-id it takes that task (lock acquire); otherwise the next one (claim).
set -euo pipefail
PMTOOL=${PMTOOL:-pmtool}
role="" agent="" level=senior repo=$PWD task="" agent_cmd=()
while [ $# -gt 0 ]; do
  case $1 in
    --role) role=$2; shift 2 ;;
    --agent-id) agent=$2; shift 2 ;;
    --level) level=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --task-id) task=$2; shift 2 ;;
    --agent-cmd) agent_cmd=(--agent-cmd "$2"); shift 2 ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
[ -n "$role" ] && [ -n "$agent" ] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
export PMTOOL_RUNNER_PID=$$
exec 3<&0                      # the operator's Enter comes from here, whatever a step reads
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

bold="" plain=""
if [ -t 2 ]; then bold=$'\033[1m' plain=$'\033[0m'; fi

out="" rc=0
# show ARGS...: print the command, run it, print its JSON (pretty on stderr, as is on
# stdout), then wait for Enter. Steps read /dev/null, so they never eat the operator's Enter.
show() {
  printf '\n%s$ pmtool%s%s\n' "$bold" "$(printf ' %q' "$@")" "$plain" >&2
  rc=0
  out=$("$PMTOOL" "$@" </dev/null) || rc=$?
  jq . <<<"$out" >&2 2>/dev/null || printf '%s\n' "$out" >&2
  printf '%s\n' "$out"
  echo "(exit $rc) press Enter for the next step, Ctrl-C to stop here" >&2
  read -r _ <&3 || true
}

if [ -n "$task" ]; then
  show lock acquire "$task" --agent-id "$agent" --role "$role" --level "$level"
else
  show claim --agent-id "$agent" --role "$role" --level "$level"
fi
[ "$rc" = 0 ] || exit "$rc"
task=$(jq -r '.task.id' <<<"$out")
jq .task <<<"$out" >"$tmp/task.json"
show model-for --task-json "$tmp/task.json"
show hook run pre_task --agent-id "$agent" --cwd "$repo"
show worktree create --agent-id "$agent" --repo "$repo"
show exec-claude --agent-id "$agent" --print-prompt
show exec-claude --agent-id "$agent" "${agent_cmd[@]}"
agent_out=$out
outcome=$(jq -r '.outcome // "blocked"' <<<"$agent_out")
if [ "$(jq -r '.complexity // "major"' "$tmp/task.json")" = minor ]; then
  # Its own short-lived branch onto the base by fast-forward, or left there for review.
  show worktree land --agent-id "$agent" --repo "$repo"
  agent_out=$(jq -c --arg note "$(jq -r '.note // empty' <<<"$out")" \
    '.summary = ((.summary // "no summary") + "\n" + $note)' <<<"$agent_out")
fi
show finish --agent-id "$agent" --outcome "$outcome" --notes "debug-task.sh: $(jq -r '.summary // "no summary"' <<<"$agent_out")"
jq -c --argjson task "$task" --arg outcome "$outcome" --arg status "$(jq -r '.status // empty' <<<"$out")" \
  '{task_id: $task, agent_id, role, branch, worktree: .cwd, model, session_id, num_turns,
    total_cost_usd, duration_s, summary, outcome: $outcome, status: $status}' \
  <<<"$agent_out" >"$tmp/result.json"
show hook run post_task --input "$tmp/result.json" --cwd "$repo"
show worktree remove "$task" --repo "$repo"

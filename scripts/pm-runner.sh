#!/usr/bin/env bash
# pm-runner.sh: the continuous runner built only from pmtool subcommands. It does what
# `pmtool run` does, step by step, so you can copy it and change any step:
#   recover -> claim -> hook pre_task -> worktree create -> exec-claude -> finish
#   -> hook post_task -> worktree remove -> next
#
# Usage: pm-runner.sh --role ROLE --agent-id ID [--level L] [--repo DIR] [--single-task]
#                     [--agent-cmd CMD] [--wait SECONDS]
# Prints each step's JSON on stdout, one object per line. Ctrl-C stops after the current
# step and keeps the task record, so the next start resumes the same task.
set -euo pipefail

PMTOOL=${PMTOOL:-pmtool}
role="" agent="" level=senior repo=$PWD single=0 wait=30 agent_cmd=()
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --role) role=$2; shift 2 ;;
    --agent-id) agent=$2; shift 2 ;;
    --level) level=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --wait) wait=$2; shift 2 ;;
    --agent-cmd) agent_cmd=(--agent-cmd "$2"); shift 2 ;;
    --single-task) single=1; shift ;;
    -h|--help) usage ;;
    *) echo "pm-runner: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$role" ] && [ -n "$agent" ] || usage
command -v jq >/dev/null || { echo "pm-runner: needs jq" >&2; exit 2; }

# The task record names this script as the process working the task: while it lives,
# `pmtool recover` leaves the record alone.
export PMTOOL_RUNNER_PID=$$
stopping=0
trap 'stopping=1; echo "pm-runner: stopping after this step; the task record is kept" >&2' INT TERM

out="" rc=0
# step ARGS...: run one pmtool command, echo its JSON line, keep it in $out and its code in $rc.
step() {
  rc=0
  out=$("$PMTOOL" "$@") || rc=$?
  printf '%s\n' "$out"
}

step recover --agent-id "$agent"          # 3 = nothing to recover
case $rc in 0|3) ;; *) exit "$rc" ;; esac

while [ "$stopping" = 0 ]; do
  step lock show --agent-id "$agent"
  if [ "$rc" = 3 ]; then                   # no task yet: claim one
    step claim --agent-id "$agent" --role "$role" --level "$level" --wait "$wait"
    case $rc in
      0) ;;
      3) if [ "$single" = 1 ]; then exit 3; fi; continue ;;
      4) sleep 10; continue ;;              # server away: the record (if any) is kept
      *) exit "$rc" ;;
    esac
    step lock show --agent-id "$agent"
  fi
  task_id=$(jq -r '.record.task.id' <<<"$out")
  session=$(jq -r '.record.session_id // empty' <<<"$out")
  [ "$stopping" = 0 ] || break

  step hook run pre_task --agent-id "$agent" --cwd "$repo"
  if [ "$rc" != 0 ]; then
    step lock release --agent-id "$agent" --notes "pre_task hook failed"
    sleep "$wait"; continue
  fi
  [ "$stopping" = 0 ] || break

  step worktree create --agent-id "$agent" --repo "$repo"
  if [ "$rc" != 0 ]; then
    step lock release --agent-id "$agent" --notes "no worktree: $(jq -r '.error.message // "setup failed"' <<<"$out")"
    continue
  fi
  [ "$stopping" = 0 ] || break

  resume=()
  [ -n "$session" ] && resume=(--resume)
  step exec-claude --agent-id "$agent" "${resume[@]}" "${agent_cmd[@]}"
  if { [ "$rc" = 1 ] || [ "$rc" = 124 ]; } && [ "$stopping" = 0 ]; then  # retry once, same session
    step exec-claude --agent-id "$agent" --resume "${agent_cmd[@]}"
  fi
  [ "$stopping" = 0 ] || break
  outcome=$(jq -r '.outcome // empty' <<<"$out")
  summary=$(jq -r '"\(.summary // "") (model \(.model), \(.num_turns) turns, $\(.total_cost_usd))"' <<<"$out")
  if [ "$rc" != 0 ] || [ -z "$outcome" ]; then
    step lock release --agent-id "$agent" --notes "agent failed: $(jq -r '.error.message // "no verdict"' <<<"$out")"
    step worktree remove "$task_id" --repo "$repo" --rescue
    continue
  fi

  step lock show --agent-id "$agent"
  context=$(jq -c --arg outcome "$outcome" '.record + {outcome: $outcome}' <<<"$out")
  step finish --agent-id "$agent" --outcome "$outcome" --notes "$summary"
  step hook run post_task --input - <<<"$context" || true   # post_task never blocks
  step worktree remove "$task_id" --repo "$repo"
  if [ "$rc" = 5 ]; then                     # uncommitted work: keep it on a rescue ref
    step worktree remove "$task_id" --repo "$repo" --rescue
  fi
  if [ "$single" = 1 ]; then exit 0; fi
done
echo "pm-runner: stopped; $("$PMTOOL" lock show --agent-id "$agent" >/dev/null 2>&1 && echo "task record kept for resume" || echo "no task in progress")" >&2

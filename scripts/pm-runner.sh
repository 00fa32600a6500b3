#!/usr/bin/env bash
# pm-runner.sh: the continuous runner built only from pmtool subcommands. It does what
# `pmtool run` does, step by step, so you can copy it and change any step:
#   recover -> claim -> hook pre_task -> worktree create -> exec-claude -> finish --full
#   -> next
# (`finish --full` is the finish of `pmtool run`: leftover commit, push, land a minor task,
# status, post_task hook, worktree removal, record closed; each step noted in the record.)
#
# Usage: pm-runner.sh --role ROLE --agent-id ID [--level L] [--repo DIR] [--single-task]
#                     [--max-tasks N] [--agent-cmd CMD] [--wait SECONDS]
# Prints each step's JSON on stdout, one object per line, and a last `stopped` line.
# --wait: seconds each claim looks for work, and the pause after giving a task back
# (default 30; 0 with --single-task). --single-task exits 0 after one finished task, 1
# when it was given back, 3 when there was none. Ctrl-C or SIGTERM stops after the
# current step and keeps the task record, so the next start resumes the same task.
# PMTOOL names the pmtool to run (default: pmtool on PATH).
#
# `pmtool run` is the same loop in Python (pmtool/run/loop.py, Runner); tests/test_scripts.py
# runs one scenario through both and compares their steps. Where each policy lives there
# is named next to it below ("pmtool run:"); what only `pmtool run` has: one runner per
# agent id (a runner lock), health checks before claiming (here: cron-health.sh), noticing
# mid-work that a task was moved or given away (here exec-claude only keeps the lock alive,
# and `recover --orphans` from the PM's cron puts back what is left), the
# --on-hook-failure choice, --escalate and --task-budget-usd. After a run without a
# verdict both do the step the failure policy names (here: exec-claude's `next`).
#
# Each pmtool process costs a hundred milliseconds or more (a jq one some 15 ms), so the
# script starts none it does not need: the finish is one process, a hook that does not
# exist is not run, a record is read (from the answer that printed it) only where it is
# needed, by one jq: on the way from a claim to its finish, only exec-claude's answer is.
set -euo pipefail

PMTOOL=${PMTOOL:-pmtool}
role="" agent="" level=senior repo=$PWD single=0 max_tasks=0 wait="" agent_cmd=()
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --role) role=$2; shift 2 ;;
    --agent-id) agent=$2; shift 2 ;;
    --level) level=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --wait) wait=$2; shift 2 ;;
    --max-tasks) max_tasks=$2; shift 2 ;;
    --agent-cmd) agent_cmd=(--agent-cmd "$2"); shift 2 ;;
    --single-task) single=1; shift ;;
    -h|--help) usage ;;
    *) echo "pm-runner: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$role" ] && [ -n "$agent" ] || usage
command -v jq >/dev/null || { echo "pm-runner: needs jq" >&2; exit 2; }
command -v "$PMTOOL" >/dev/null || { echo "pm-runner: $PMTOOL not found (PATH, or set PMTOOL)" >&2; exit 2; }
# --single-task looks once, as `pmtool run --single-task` does.
if [ -z "$wait" ]; then
  if [ "$single" = 1 ]; then wait=0; else wait=30; fi
fi

# Where the hooks are, found as pmtool finds them (Settings.hooks_path): an absolute
# folder as it is, a config file's relative one from that file's folder, the
# environment's or the default `hooks` in the repository.
config=$("$PMTOOL" config) || config='{}'
hooks_dir=$(jq -r '
  .settings.hooks_dir as $h | ($h.value // "" | sub("^~"; env.HOME)) as $v
  | if $v == "" or ($v | startswith("/")) then $v
    elif $h.source == "file" then (.config_file | sub("/[^/]*$"; "")) + "/" + $v
    else "@repo/" + $v end' <<<"$config") || hooks_dir=""
if [[ $hooks_dir == @repo/* ]]; then
  hooks_dir="$(git -C "$repo" rev-parse --show-toplevel 2>/dev/null || echo "$repo")/${hooks_dir#@repo/}"
fi
# Seconds between re-registrations while a task waits (whole seconds, at least one).
heartbeat=$(jq -r '[(.settings.heartbeat.value // 300 | ceil), 1] | max' <<<"$config") || heartbeat=300
# Machines share work only through the remote: with one and push off, say so once.
# pmtool run: Runner._say_where_work_goes (an event `push_off` there).
remote=$(git -C "$repo" remote 2>/dev/null | awk '$1 == "origin" { o = 1 } NR == 1 { f = $1 } END { print (o ? "origin" : f) }') || remote=""
if [ -n "$remote" ] && [ "$(jq -r '.settings.push.value // false' <<<"$config")" != true ]; then
  echo "pm-runner: warning: push is off: the work stays on this machine, $remote and other machines do not see it (push = true, PMTOOL_PUSH=1 shares it)" >&2
fi
# has_hook NAME: the hook exists (as `pmtool hook run` finds it: NAME, NAME.py, NAME.sh).
has_hook() {
  [ -n "$hooks_dir" ] || return 1
  local suffix
  for suffix in "" .py .sh; do [ -f "$hooks_dir/$1$suffix" ] && return 0; done
  return 1
}

# The task record names this script as the process working the task: while it lives,
# `pmtool recover` (cron-recover.sh) leaves the record alone.
export PMTOOL_RUNNER_PID=$$
stopping=0 done_tasks=0
need_show=1   # whether the agent may have a record (0: it has none, no need to look)
# pmtool run: Runner.request_stop (there a second signal ends the agent at once).
trap 'stopping=1; echo "pm-runner: stopping after this step; the task record is kept" >&2' INT TERM

out="" rc=0
# step ARGS...: run one pmtool command, echo its JSON line, keep it in $out and its code in $rc.
step() {
  rc=0
  out=$("$PMTOOL" "$@") || rc=$?
  if [ -z "$out" ]; then  # pmtool died before it could answer: still one JSON line
    out=$(jq -nc --arg cmd "$1" --argjson rc "$rc" \
      '{ok: false, error: {type: "failed", message: "pmtool \($cmd) printed nothing (exit \($rc))"}}')
  fi
  printf '%s\n' "$out"
}

# pause SECONDS: sleep, but let a signal cut it short (a foreground sleep would delay the trap).
pause() {
  [ "$stopping" = 0 ] || return 0
  sleep "$1" & local pid=$!
  wait "$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
}

# hold SECONDS: pause with a task kept, re-registering every heartbeat (the heartbeat
# setting, read below): the server drops the locks of agents unseen for 30 minutes, and a
# usage limit can last hours (pmtool run: Runner._pause, its heartbeats going on).
hold() {
  local left=$1 now
  while [ "$left" -gt 0 ] && [ "$stopping" = 0 ]; do
    now=$(( left < heartbeat ? left : heartbeat ))
    pause "$now"
    left=$(( left - now ))
    if [ "$left" -gt 0 ] && [ "$stopping" = 0 ] && ! "$PMTOOL" register --agent-id "$agent" \
        --role "$role" --level "$level" >/dev/null 2>&1; then
      echo "pm-runner: could not re-register $agent while waiting; again in ${heartbeat}s" >&2
    fi
  done
}

# stop CODE: the last line, as `pmtool run` ends, then exit.
stop() {
  local kept=false task=null record reason="done"
  [ "$stopping" = 0 ] || reason=signal
  if [ "$need_show" = 1 ] && record=$("$PMTOOL" lock show --agent-id "$agent" 2>/dev/null); then
    kept=true task=$(jq '.record.task.id' <<<"$record")
  fi
  jq -nc --arg agent "$agent" --argjson task "$task" --argjson kept "$kept" \
    --argjson tasks "$done_tasks" --arg reason "$reason" \
    '{ok: true, event: "stopped", time: (now | todate), agent: $agent, task_id: $task,
      tasks_done: $tasks, record_kept: $kept, reason: $reason}'
  if [ "$kept" = true ]; then
    echo "pm-runner: stopped; task $task's record is kept, the next start resumes it" >&2
  fi
  exit "$1"
}

# fields: the task's id and complexity, read from the claim's answer when first needed
# (only a give-back needs them: nothing of a new claim is read on the way to its finish).
fields() {
  [ -z "$task_id" ] || return 0
  eval "$(jq -r '@sh "task_id=\(.task.id) complexity=\(.task.complexity // "major")"' <<<"$claimed")"
}

# tidy: remove the task's own worktree after a give-back; uncommitted work goes to a rescue
# ref first, a minor task's short-lived branch goes once it has landed. pmtool run:
# Runner._remove_worktree.
tidy() {
  if [ -z "$worktree" ] && [ -n "$created" ]; then worktree=$(jq -r '.path // empty' <<<"$created"); fi
  [ -n "$worktree" ] || return 0
  fields
  if [ "$(realpath "$worktree")" = "$(realpath "$repo")" ]; then
    step worktree remove "$task_id" --repo "$repo"   # minor_in_checkout: frees the checkout
  elif [ "$complexity" = minor ]; then
    step worktree remove "$worktree" --repo "$repo" --rescue --delete-branch
  else
    step worktree remove "$worktree" --repo "$repo" --rescue
  fi
}

# give_back REASON [KIND]: the task goes back to the queue (an attempt of KIND, default
# failed: this machine lets it cool down, and parks it after PMTOOL_MAX_ATTEMPTS); work in
# its worktree goes to a rescue ref. pmtool run: Runner._give_back (no pause: the claim
# skips the task while it cools, and takes others meanwhile).
give_back() {
  step lock release --agent-id "$agent" --notes "$1" --kind "${2:-failed}"
  [ "$rc" != 0 ] || need_show=0   # released: no record; else it is kept, look again
  tidy
  fields
  echo "pm-runner: task $task_id given back: $1" >&2
  if [ "$single" = 1 ]; then stop 1; fi
}

# A record of ours from before (a crash, a stop): recover says whether it is still ours.
# pmtool run: Runner._recover (a live runner is exit 5 there too).
while :; do
  step recover --agent-id "$agent"
  case $rc in
    0) break ;;
    3) need_show=0; break ;;                   # no record: straight to claim
    4) [ "$stopping" = 0 ] || stop 0; pause 10 ;;  # server away: the record is kept (pmtool run: capped, jittered backoff in Runner._loop)
    *) exit "$rc" ;;
  esac
done
if [ "$rc" = 0 ] && jq -e 'any(.entries[]; .action == "running")' <<<"$out" >/dev/null; then
  echo "pm-runner: agent $agent's task has a live runner (pid $(jq '.entries[0].pid' <<<"$out")); stop it or use another --agent-id" >&2
  exit 5
fi
# A verdict given before a stop or a kill (noted, or in the transcript) was finished by
# recover itself: that task is done. pmtool run: Runner._recover, then _finish.
if [ "$rc" = 0 ] && jq -e 'any(.entries[]; .action == "finished")' <<<"$out" >/dev/null; then
  need_show=0 done_tasks=1
  if [ "$single" = 1 ]; then stop 0; fi
fi

# need_show: whether the agent may have a record (at the start, after a failed step);
# after a finished or released task it has none, and the loop goes straight to claim.
# The task's fields, set by one jq (eval of its @sh-quoted answer) per record:
task_id="" complexity="" session="" worktree="" pid="" outcome="" summary="" created="" claimed=""
while [ "$stopping" = 0 ]; do
  rc=3
  if [ "$need_show" = 1 ]; then
    step lock show --agent-id "$agent"
  fi
  need_show=1 created=""
  case $rc in
    0) # A record from before: where it got to, in one jq. An agent run that gave a
       # verdict before a stop is finished with, not run again (pmtool run:
       # finish.kept_verdict; `finish --full` notes its verdict as agent-done).
       eval "$(jq -r '.record | ([.steps[] | select(.step | test("^agent[_-]"))] | last) as $last
         | @sh "task_id=\(.task.id) complexity=\(.task.complexity // "major")
                session=\(.session_id // "") worktree=\(.worktree // "") pid=\(.pid)
                outcome=\(if $last.step == "agent-done" then $last.verdict.outcome
                          elif $last.step == "agent_finished" and $last.ok then $last.outcome
                          else null end // "")
                summary=\(if $last.step == "agent-done" then $last.verdict.summary
                          else null end // "(verdict of an earlier run, before a stop)")"' <<<"$out")"
       if [ "$pid" != $$ ]; then  # resumed: we are its runner now
         step lock update --agent-id "$agent" --runner-pid $$ --step resumed
       fi ;;
    3) # pmtool run: Runner._claim (looks for --idle-poll seconds, then an `idle` event)
       step claim --agent-id "$agent" --role "$role" --level "$level" --wait "$wait"
       case $rc in
         0) ;;
         3) need_show=0; if [ "$single" = 1 ]; then stop 3; fi; continue ;;
         4) pause 10; continue ;;           # server away: the record (if any) is kept
         *) exit "$rc" ;;
       esac
       # A new record: no session, no worktree, no verdict yet, this script its runner;
       # its id and complexity are read from $claimed only if a give-back needs them.
       claimed=$out task_id="" complexity="" session="" worktree="" outcome="" summary="" ;;
    *) exit "$rc" ;;
  esac
  [ "$stopping" = 0 ] || break

  if [ -z "$outcome" ]; then
    rc=0
    if has_hook pre_task; then step hook run pre_task --agent-id "$agent" --cwd "$repo"; fi
    if [ "$rc" != 0 ]; then  # pmtool run: Runner._pre_task, policy --on-hook-failure (default release)
      give_back "pre_task hook failed: $(jq -r '.error.message? // .error // (.stderr // "" | .[-200:] | sub("\\s+$"; "") | select(length > 0)) // "exit \(.exit_code)"' <<<"$out")" hook
      continue
    fi
    [ "$stopping" = 0 ] || break

    # It fetches the task's branch and the base from the remote first (a diverged local
    # branch is kept on a rescue ref). pmtool run: Runner._worktree
    step worktree create --agent-id "$agent" --repo "$repo"
    worktree=""   # the path is read from $created only if tidy needs it
    if [ "$rc" = 5 ]; then  # its branch or the checkout is another task's: wait, never share
      give_back "deferred: $(jq -r '.error.message' <<<"$out")" deferred
      continue
    elif [ "$rc" = 3 ] && jq -e '.error.no_branch' <<<"$out" >/dev/null; then
      # QA's review or a bounced task whose branch is nowhere: nothing to review, not counted
      give_back "$(jq -r '.error.message' <<<"$out")" no_branch
      continue
    elif [ "$rc" != 0 ] && jq -e '.error.remote_unreachable' <<<"$out" >/dev/null; then
      # The remote did not answer the fetch: this machine's fault, not counted; back off
      # as for the server away (pmtool run: the same, capped and jittered).
      echo "pm-runner: $(jq -r '.error.message + "; fix: " + .error.hint' <<<"$out")" >&2
      give_back "remote unreachable: $(jq -r '.error.message' <<<"$out")" remote
      pause 10
      continue
    elif [ "$rc" != 0 ]; then
      created=$out  # a worktree whose setup hook failed is still there: tidy removes it
      give_back "no worktree: $(jq -r '.error.message // "worktree_setup hook failed"' <<<"$out")"
      continue
    fi
    created=$out
    [ "$stopping" = 0 ] || break

    resume=() model=() next="" stronger="" left=0
    [ -n "$session" ] && resume=(--resume)
    # What follows a run without a verdict is exec-claude's `next`: the failure policy's
    # step (pmtool run: Runner._agent, the same next_step), under the on_agent_failure
    # setting (default retry: once with --resume); Runner._heartbeat too. Here without
    # --escalate and --task-budget-usd, which are `pmtool run`'s flags.
    while :; do
      step exec-claude --agent-id "$agent" "${resume[@]}" "${model[@]}" "${agent_cmd[@]}"
      case $rc in
        130|143) stopping=1 ;;                # the agent was stopped by a signal: record kept
        5) exit 5 ;;                          # an agent of this record runs elsewhere
        6|7) echo "pm-runner: $(jq -r '.error.message // "claude cannot run"' <<<"$out"); the task record is kept" >&2
             exit "$rc" ;;                    # claude's login refused, or no claude: fatal
      esac
      [ "$stopping" = 0 ] || break
      # The verdict, or the next step; left: seconds until a rate limit resets (claude
      # said when), else a minute's back-off.
      eval "$(jq -r '@sh "outcome=\(.outcome // "") summary=\(.summary // "")
        next=\(.next.step // "") stronger=\(.next.model // "")
        left=\(if .next.until then (.next.until | fromdateiso8601) - now + 1 | floor else 60 end)"' <<<"$out")"
      case $next in
        resume) resume=(--resume) ;;          # once more, the same session
        retry) resume=() model=(--model "$stronger") ;;  # a fresh session, a stronger model
        pause)  # a rate limit or an overloaded API: keep the task, wait, go on with the session
          echo "pm-runner: $(jq -r '.next.kind' <<<"$out"); task kept, going on in ${left}s" >&2
          hold "$(( left > 0 ? left : 1 ))"
          resume=(--resume) ;;
        *) break ;;
      esac
      [ "$stopping" = 0 ] || break
    done
    [ "$stopping" = 0 ] || break
    case $next in
      give_back|park)  # park: the give-back is the task's last; `lock release` parks it
        give_back "$(jq -r '(.next.give_back // .next).reason' <<<"$out")" \
          "$(jq -r '(.next.give_back // .next).kind' <<<"$out")"
        continue ;;
      fatal)  # on_agent_failure = stop: the record is kept for a resume
        echo "pm-runner: $(jq -r '.next.reason' <<<"$out"); stopping, the task record is kept" >&2
        exit 1 ;;
    esac
    if [ "$rc" != 0 ] || [ -z "$outcome" ]; then  # no run, so no `next` (exit 2, 3, 4)
      give_back "agent failed: $(jq -r '.error.message // (if .timed_out then "timed out" else "no verdict" end)' <<<"$out")" \
        "$(jq -r '.stop.kind // "failed"' <<<"$out")"
      continue
    fi
  fi

  # The finish of `pmtool run`, in one process (pmtool run: Runner._finish, pmtool.finish):
  # leftover committed -> branch pushed (when push is on) -> a minor task landed on the
  # base -> status -> post_task hook (it never blocks) -> worktree removed (dirty work to a
  # rescue ref first) -> record closed. Each step is noted in the record, so after a kill
  # or with the server away the same command (or `pmtool recover`) completes it.
  step finish --agent-id "$agent" --outcome "$outcome" --notes "$summary" --full
  case $rc in
    0) ;;
    4) pause 10; continue ;;                  # server away: the record is kept, finish again
    *) exit "$rc" ;;
  esac
  need_show=0   # finished: the record is closed
  # leftover = rescue, and the agent left work uncommitted: the task went back, its work on
  # a rescue ref. (json.dumps' spacing; a quote inside a string value would be escaped.)
  if [[ $out == *'"action": "given_back"'* ]]; then
    fields
    echo "pm-runner: task $task_id given back: uncommitted work saved to a rescue ref" >&2
    if [ "$single" = 1 ]; then stop 1; fi
    continue
  fi
  done_tasks=$((done_tasks + 1))
  if [ "$single" = 1 ]; then stop 0; fi
  if [ "$max_tasks" -gt 0 ] && [ "$done_tasks" -ge "$max_tasks" ]; then stop 0; fi
done
stop 0

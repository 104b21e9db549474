#!/bin/bash
# Leaves a process behind the way a real agent's tool call does, then ends
# as ESCAPE_THEN says. The leftover appends its pid to $PWD/escaped.pids
# (or $ESCAPE_PIDS) before it execs a long sleep.
#   ESCAPE: bg      `cmd &`, holding the pipes
#           nohup   `nohup cmd &`, output elsewhere
#           setsid  `setsid cmd &` (a new session, as Claude Code's and Codex's shells are)
#           daemon  a double fork that daemonizes (setsid, parent exits)
#           envi    `setsid env -i cmd &`: a new session and no environment (no mark)
#           pipes   a new session that keeps stdout and stderr open
#           reexec  four new sessions whose processes execute themselves again
#                   without end (reexec.sh): often caught inside execve
#   ESCAPE_THEN: exit (completes the task), hang (prints, then waits),
#                silent (prints nothing, waits); unset: hang for a task whose
#                id contains "hang", else exit
pids="${ESCAPE_PIDS:-$PWD/escaped.pids}"
echo "run pid=$$" >> "${FAKE_LOG:-fake-runs.log}"
leave="echo \$\$ >> '$pids'; exec sleep 300"
case "${ESCAPE:-setsid}" in
  bg) sh -c "$leave" & ;;
  nohup) nohup sh -c "$leave" >/dev/null 2>&1 & ;;
  setsid) setsid sh -c "$leave" >/dev/null 2>&1 < /dev/null & ;;
  daemon) ( setsid sh -c "$leave" >/dev/null 2>&1 < /dev/null & ) ;;
  envi) setsid env -i /bin/sh -c "$leave" >/dev/null 2>&1 < /dev/null & ;;
  pipes) setsid sh -c "$leave" & ;;
  reexec)
    for _ in 1 2 3 4; do
      setsid sh -c "echo \$\$ >> '$pids'; exec /bin/sh '$(dirname "$0")/reexec.sh'" >/dev/null 2>&1 < /dev/null &
    done ;;
esac
# The leftovers are running (their pids are written) before we go on.
want=1
[ "${ESCAPE:-}" = reexec ] && want=4
for _ in $(seq 1 200); do
  [ -s "$pids" ] && [ "$(wc -l < "$pids")" -ge "$want" ] && break
  sleep 0.01
done
then="${ESCAPE_THEN:-}"
if [ -z "$then" ]; then
  case "${RALPH_QCHAT_TASK_ID:-}" in *hang*) then=hang ;; *) then=exit ;; esac
fi
case "$then" in
  exit)
    echo "left a process behind, exiting"
    printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
    exit 0 ;;
  hang)
    echo "left a process behind, working"
    exec sleep 300 ;;
  silent)
    exec sleep 300 ;;
esac

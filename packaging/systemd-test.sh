#!/usr/bin/env bash
# Installs the .deb in a systemd-nspawn container running a real systemd (the
# build machines' own PID 1 is not systemd) and operates the service: start on
# install, /health, a task with a fake agent, reload with a task running, stop
# with nothing left, resume on the next start, priorities in the journal,
# purge. Learned from ../shared/tools/systemd-harness.sh.
#   usage: [UNIFIED=1] packaging/systemd-test.sh PKG.deb   (root; ROOTFS caches the base system)
# UNIFIED=1 boots the container on a pure cgroup v2 hierarchy
# (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1): the daemon must run in cgroup mode
# there; otherwise in subreaper mode.
set -euo pipefail
DEB=$(realpath "$1")
ROOTFS=${ROOTFS:-/var/tmp/ralph-qchat-rootfs}
NAME=rq-test-$$
CG=ralph-qchat-test-$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ralph-qchat-nspawn.XXXXXX")
NSPAWN_PID= SD=
UNIFIED=${UNIFIED:-0}
if [[ $UNIFIED == 1 ]]; then MODE=cgroup; else MODE=subreaper; fi
t0=$(date +%s.%N)
say() { printf '[%6.2fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')" "$*"; }
fail() { echo "FAIL: $*" >&2; in_ct journalctl -u ralph-qchat --no-pager -n 60 >&2 || true; exit 1; }
in_ct() { nsenter -t "$SD" -a "$@"; }
# Waits up to $1 seconds for the shell condition $2, run inside the container.
wait_for() {
  local n=$(( $1 * 10 ))
  for _ in $(seq "$n"); do in_ct sh -c "$2" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

mirror() {
  local m
  m=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
  [[ -n $m ]] || m=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if [[ ! -x $ROOTFS/lib/systemd/systemd ]]; then
  say "creating $ROOTFS with debootstrap (once)"
  rm -rf "$ROOTFS.partial"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,adduser,procps bookworm \
    "$ROOTFS.partial" "$(mirror)" >"$WORK/debootstrap.log" || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  rm -rf "$ROOTFS.partial"/var/cache/apt/archives/*.deb "$ROOTFS.partial"/var/lib/apt/lists/*
  echo rq-test >"$ROOTFS.partial/etc/hostname"
  for u in getty.target console-getty.service serial-getty@.service getty@.service e2scrub_reap.service; do
    ln -sf /dev/null "$ROOTFS.partial/etc/systemd/system/$u"
  done
  mv "$ROOTFS.partial" "$ROOTFS"
fi

teardown() {
  local rc=$?
  set +e
  if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    kill -TERM "$NSPAWN_PID"
    for _ in $(seq 300); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$NSPAWN_PID" 2>/dev/null && { kill -KILL "$NSPAWN_PID"; sleep 1; }
  fi
  for h in unified systemd; do
    [[ -d /sys/fs/cgroup/$h/$CG ]] && find "/sys/fs/cgroup/$h/$CG" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  [[ -d /sys/fs/cgroup/$CG ]] && find "/sys/fs/cgroup/$CG" -depth -type d -exec rmdir {} + 2>/dev/null
  rmdir "/run/systemd/nspawn/propagate/$NAME" 2>/dev/null
  rm -rf "$WORK"
  say "container torn down (rc=$rc)"
}
trap teardown EXIT

mkdir -p "$WORK/stage"
cp "$DEB" "$WORK/stage/ralph-qchat.deb"
cat >"$WORK/stage/fake-agent" <<'AGENT'
#!/bin/sh
# A fake agent: works (sleeps) when the prompt says SLOW, then completes the task.
echo "fake agent pid $$ on iteration $RALPH_QCHAT_ITERATION"
echo "a warning from the agent" >&2
# A tool call that leaves a process in a session of its own, as Claude
# Code's and Codex's shells do.
if grep -q ESCAPE "$RALPH_QCHAT_PROMPT_FILE"; then
  setsid sh -c 'echo $$ > "$HOME/escaped.pid"; exec sleep 300' </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do [ -s "$HOME/escaped.pid" ] && break; sleep 0.05; done
fi
if grep -q SLOW "$RALPH_QCHAT_PROMPT_FILE" && [ ! -e /etc/fake-agent-fast ]; then sleep 30; fi
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
AGENT
cat >"$WORK/stage/qchat.toml" <<'CONF'
[adapter]
command = "/usr/local/bin/fake-agent"
kill_grace = 1.0
[orchestrator]
iteration_delay = 0.0
shutdown_grace = 1.0
CONF

for h in unified systemd; do [[ -d /sys/fs/cgroup/$h ]] && mkdir -p "/sys/fs/cgroup/$h/$CG"; done
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then mkdir -p "/sys/fs/cgroup/$CG"; fi
say "booting container"
setsid bash -c '
  for d in /sys/fs/cgroup/unified/'"$CG"' /sys/fs/cgroup/systemd/'"$CG"' /sys/fs/cgroup/'"$CG"'; do
    [[ -f $d/cgroup.procs ]] && echo $$ > $d/cgroup.procs 2>/dev/null && break
  done
  [[ $3 == 1 ]] && export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
  exec systemd-nspawn --quiet --boot --directory="$0" --machine="$1" \
       --register=no --keep-unit --console=passive \
       --volatile=overlay --private-network \
       --bind-ro="$2":/mnt/stage' "$ROOTFS" "$NAME" "$WORK/stage" "$UNIFIED" \
  </dev/null >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!
for _ in $(seq 200); do
  SD=$(pgrep -P "$NSPAWN_PID" -x systemd || true); [[ -n $SD ]] && break; sleep 0.05
done
[[ -n $SD ]] || { cat "$WORK/nspawn.log"; fail "container did not start"; }
for _ in $(seq 300); do in_ct test -S /run/systemd/private 2>/dev/null && break; sleep 0.05; done
state=$(timeout 90 nsenter -t "$SD" -a systemctl is-system-running --wait || true)
say "booted: $state"
[[ $state == running || $state == degraded ]] || fail "systemd did not come up"

status_of() {  # status of task $1
  in_ct ralph-qchat status "$1" --json --state-dir /var/lib/ralph-qchat 2>/dev/null \
    | sed -n 's/.*"status": "\([a-z_]*\)".*/\1/p' | head -1
}
field_of() {  # numeric field $2 of task $1
  in_ct ralph-qchat status "$1" --json --state-dir /var/lib/ralph-qchat 2>/dev/null \
    | sed -n "s/.*\"$2\": \\([0-9]*\\).*/\\1/p" | head -1
}
completes_after_restart() {  # task $1 completes, its interrupted iteration counted
  wait_for 15 "[ \"\$(ralph-qchat status $1 --json --state-dir /var/lib/ralph-qchat | grep -c '\"status\": \"completed\"')\" = 1 ]" \
    || fail "$1 did not complete after the restart: $(status_of "$1")"
  [[ $(field_of "$1" interrupted_iterations) == 1 ]] || fail "$1: interrupted_iterations=$(field_of "$1" interrupted_iterations)"
}
submit() {  # submit a task $1 with prompt text $2
  in_ct sh -c "printf '%s\n' '$2' > /tmp/$1.md && ralph-qchat submit /tmp/$1.md --id $1 --state-dir /var/lib/ralph-qchat"
}

# As on a minimal server: no procps kill (the checks below use pgrep only).
in_ct sh -c 'rm -f /bin/kill /usr/bin/kill; ! command -v kill >/dev/null || [ "$(command -v kill)" = kill ]' \
  || fail "cannot remove kill from the container"
say "dpkg -i: the unit is enabled and started"
in_ct dpkg -i /mnt/stage/ralph-qchat.deb >/dev/null
[[ $(in_ct systemctl is-active ralph-qchat) == active ]] || fail "not active after install"
[[ $(in_ct systemctl is-enabled ralph-qchat) == enabled ]] || fail "not enabled after install"
in_ct id ralph-qchat
[[ $(in_ct stat -c '%U:%G %a' /etc/default/ralph-qchat) == "root:ralph-qchat 640" ]] || fail "/etc/default/ralph-qchat permissions"
wait_for 10 'ralph-qchat health' || fail "/health does not answer"
in_ct ralph-qchat health
in_ct sh -c 'ralph-qchat health | grep -q "\"adapter\":\"qchat\""' || fail "unexpected /health body"

say "a task with a fake agent, after systemctl reload"
in_ct install -m 0755 /mnt/stage/fake-agent /usr/local/bin/fake-agent
in_ct install -m 0644 /mnt/stage/qchat.toml /etc/ralph-qchat/qchat.toml
pid=$(in_ct systemctl show -p MainPID --value ralph-qchat)
in_ct systemctl reload ralph-qchat
wait_for 10 'journalctl -u ralph-qchat --no-pager | grep -q "configuration reloaded"' || fail "reload not applied"
[[ $(in_ct systemctl show -p MainPID --value ralph-qchat) == "$pid" ]] || fail "reload restarted the daemon"
submit quick "# a quick task"
wait_for 15 '[ "$(ralph-qchat status quick --json --state-dir /var/lib/ralph-qchat | grep -c "\"status\": \"completed\"")" = 1 ]' \
  || fail "task quick did not complete: $(status_of quick)"
say "task quick: $(status_of quick)"

say "containment: auto is cgroup mode under Delegate=yes; the daemon sits in its leaf"
in_ct journalctl -u ralph-qchat --no-pager | grep -q "containment: cgroup (" \
  || fail "auto did not choose cgroup mode: $(in_ct journalctl -u ralph-qchat --no-pager | grep containment:)"
main=$(in_ct systemctl show -p MainPID --value ralph-qchat)
rel=$(in_ct sed -n 's/^0:://p' /proc/"$main"/cgroup)
hier=/sys/fs/cgroup; in_ct test -d /sys/fs/cgroup/unified && hier=/sys/fs/cgroup/unified
svc=$hier${rel%/supervisor}
[[ $rel == */ralph-qchat.service/supervisor ]] || fail "the daemon is in $rel, not in its leaf supervisor"
if [[ $UNIFIED == 1 ]]; then
  # On a pure cgroup v2 host the limits go to the attempts' own cgroups. A
  # container on a hybrid host has no controllers in its v2 tree (the host
  # binds them to v1): then the log says where the limits fall back.
  if in_ct grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    in_ct journalctl -u ralph-qchat --no-pager | grep -q "memory: cgroup v2; pids: cgroup v2)" \
      || fail "memory and pids controllers not delegated: $(in_ct journalctl -u ralph-qchat --no-pager | grep containment:)"
  else
    say "no memory controller in this container's cgroup v2 (the host keeps it on v1)"
  fi
fi
say "daemon $main in $svc/supervisor"
if [[ $MODE == subreaper ]]; then
  in_ct sh -c 'echo QCHAT_CONTAINMENT=subreaper >> /etc/default/ralph-qchat'
  in_ct systemctl restart ralph-qchat
  wait_for 10 'journalctl -u ralph-qchat --no-pager | grep -q "containment: subreaper ("' \
    || fail "QCHAT_CONTAINMENT=subreaper not in force: $(in_ct journalctl -u ralph-qchat --no-pager | grep containment:)"
  pid=$(in_ct systemctl show -p MainPID --value ralph-qchat)
fi

say "$MODE mode: an agent that setsid-forks leaves nothing after its iteration"
submit escape "# ESCAPE task"
wait_for 15 '[ "$(ralph-qchat status escape --json --state-dir /var/lib/ralph-qchat | grep -c "\"status\": \"completed\"")" = 1 ]' \
  || fail "task escape did not complete: $(status_of escape)"
esc=$(in_ct cat /var/lib/ralph-qchat/escaped.pid)
[[ -n $esc ]] || fail "the agent left no process to look for"
in_ct sh -c "kill -0 $esc" 2>/dev/null && fail "the setsid-forked process $esc outlived its iteration"
[[ $(in_ct systemctl is-active ralph-qchat) == active ]] || fail "not active after the escape task"
in_ct pgrep -u ralph-qchat -x sleep >/dev/null && fail "left running: $(in_ct pgrep -a -u ralph-qchat -x sleep)"
if [[ $MODE == cgroup ]]; then
  # .control is systemd's, for ExecReload= of a delegated unit. Empty cells
  # are the daemon's, kept for the next attempts; none may hold a process.
  left=$(in_ct sh -c "for d in \$(find $svc -mindepth 1 -maxdepth 1 -type d ! -name supervisor ! -name .control); do
    grep -q '^populated 1' \$d/cgroup.events && echo \$d; done; true")
  [[ -z $left ]] || fail "attempt cgroups still holding processes: $left"
fi
say "the escaped process $esc ended with its iteration; the unit is active"

say "reload keeps a running task alive"
submit slow1 "# SLOW task"
wait_for 10 'pgrep -u ralph-qchat -x sleep' || fail "slow agent did not start"
agent=$(in_ct pgrep -u ralph-qchat -x sleep)
in_ct systemctl reload ralph-qchat
sleep 0.5
in_ct sh -c "kill -0 $agent" || fail "reload killed the running agent"
[[ $(in_ct systemctl is-active ralph-qchat) == active ]] || fail "not active after reload"
[[ $(in_ct systemctl show -p MainPID --value ralph-qchat) == "$pid" ]] || fail "reload restarted the daemon"
say "agent $agent still running after reload"

say "systemctl stop with the agent running: Result=success, nothing left"
in_ct systemctl stop ralph-qchat
[[ $(in_ct systemctl show -p Result --value ralph-qchat) == success ]] || fail "Result=$(in_ct systemctl show -p Result --value ralph-qchat)"
in_ct pgrep -u ralph-qchat >/dev/null && fail "processes of ralph-qchat left: $(in_ct pgrep -a -u ralph-qchat)"
[[ $(status_of slow1) == running ]] || fail "slow1 should be unfinished, is $(status_of slow1)"

say "systemctl start resumes the unfinished task"
in_ct touch /etc/fake-agent-fast
in_ct systemctl start ralph-qchat
completes_after_restart slow1
say "slow1 completed after the restart, its interrupted iteration counted"

say "kill -9 of the daemon: what its agent left is ended with the unit, the next start resumes"
in_ct rm -f /etc/fake-agent-fast
submit slow2 "# SLOW task"
# The agent is sh running sleep: sh dies with the daemon (PDEATHSIG), sleep is
# left to systemd, which ends the rest of the unit's cgroup.
wait_for 10 'pgrep -u ralph-qchat -x sleep' || fail "slow agent did not start"
# The record of the running iteration is written a moment after the start.
wait_for 10 'grep -q "\"in_progress\": 1" /var/lib/ralph-qchat/tasks/slow2/state.json' \
  || fail "slow2's iteration is not recorded as running: $(in_ct cat /var/lib/ralph-qchat/tasks/slow2/state.json)"
pid=$(in_ct systemctl show -p MainPID --value ralph-qchat)
in_ct sh -c "kill -KILL $pid"
wait_for 10 '! pgrep -u ralph-qchat >/dev/null' || fail "left after kill -9: $(in_ct pgrep -a -u ralph-qchat)"
in_ct touch /etc/fake-agent-fast
in_ct systemctl restart ralph-qchat
completes_after_restart slow2
say "nothing outlived the killed daemon; slow2 completed after the restart"

say "journal priorities"
in_ct journalctl -u ralph-qchat --no-pager -p warning..warning | grep "was interrupted" >/dev/null \
  || fail "the interruption warning is not at priority warning"
in_ct journalctl -u ralph-qchat --no-pager -p info..info | grep "workers, agent" >/dev/null \
  || fail "the start-up line is not at priority info"
in_ct journalctl -u ralph-qchat --no-pager -p err | grep "ralph-qchat" >/dev/null && fail "unexpected errors in the journal"
say "journal keeps warning and info priorities"

say "dpkg -P removes everything"
in_ct dpkg -P ralph-qchat >/dev/null
in_ct test -e /usr/lib/systemd/system/ralph-qchat.service && fail "unit file left"
in_ct test -e /var/lib/ralph-qchat && fail "state left after purge"
in_ct test -e /etc/ralph-qchat/qchat.toml && fail "config left after purge"
in_ct pgrep -u ralph-qchat >/dev/null && fail "processes left after purge"
[[ $(in_ct systemctl is-active ralph-qchat || true) != active ]] || fail "still active after purge"
say "packaging test passed"

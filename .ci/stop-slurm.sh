#!/usr/bin/env bash
# stop-slurm.sh -- stop the one-node SLURM cluster started by .ci/start-slurm.sh.
#
# Order: cancel every job -> slurmd -> slurmctld -> munged, each daemon by the pid in
# its pid file (after checking the process name), SIGTERM first, SIGKILL after 15 s.
# Jobs go first because job steps (slurmstepd) are designed to outlive slurmd.
# Idempotent: daemons that are not running are skipped.
#
#   --keep-munge   leave munged running (other services on the host may use it)
set -uo pipefail

CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
KEEP_MUNGE=0
[ "${1:-}" = "--keep-munge" ] && KEEP_MUNGE=1

log() { echo "[stop-slurm] $*"; }

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { log "ERROR: must run as root"; exit 1; }
  exec sudo -E "$0" "$@"
fi

# live, non-zombie process $1 named $2 (see start-slurm.sh for why zombies matter)
pid_is() {
  local state
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

alive_pid() {
  local pid
  [ -r "$1" ] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && pid_is "$pid" "$2" || return 1
  echo "$pid"
}

stop_daemon() {
  local pid i
  if ! pid=$(alive_pid "$1" "$2"); then
    log "$2 is not running"
    return 0
  fi
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do
    if ! pid_is "$pid" "$2"; then
      log "$2 stopped"
      return 0
    fi
    sleep 0.1
  done
  log "$2 (pid $pid) ignored SIGTERM for 15 s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.5
}

# 1. jobs, while slurmctld and slurmd can still clean them up
if alive_pid "$CTLD_PID" slurmctld >/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do  # KillWait=5, so 30 s is plenty
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# 2. daemons, in reverse start order
stop_daemon "$SLURMD_PID" slurmd
stop_daemon "$CTLD_PID" slurmctld
[ "$KEEP_MUNGE" = 0 ] && stop_daemon "$MUNGE_PID" munged

# 3. report, without killing, job steps that survived (only if cancelling failed)
left=""
for d in /proc/[0-9]*; do
  pid_is "${d#/proc/}" slurmstepd && left="$left ${d#/proc/}"
done
[ -n "$left" ] && log "WARNING: slurmstepd processes still running (pids:$left)"
log "done"
exit 0

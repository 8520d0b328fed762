# slurm-lib.sh -- helpers shared by start-slurm.sh and stop-slurm.sh (sourced, not run).
# The caller defines log().

CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

# Re-run the calling script as root: CI runners usually are a normal user with
# password-less sudo.
become_root() {
  [ "$(id -u)" -eq 0 ] && return 0
  command -v sudo >/dev/null || { log "ERROR: must run as root (and sudo is not available)"; exit 1; }
  exec sudo -E "$@"
}

# True if $1 is a live process named $2. A zombie does not count: on machines whose
# PID 1 reaps orphans late, a killed daemon lingers in /proc under its old name, and
# trusting it would leave the cluster without that daemon.
pid_is() {
  local state
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# Print the pid of daemon $2 from pid file $1 if it is running; fail otherwise.
alive_pid() {
  local pid
  [ -r "$1" ] || return 1
  pid=$(tr -dc '0-9' <"$1")
  [ -n "$pid" ] && pid_is "$pid" "$2" || return 1
  echo "$pid"
}

# SIGTERM daemon $2 (pid file $1), wait up to 15 s, then SIGKILL.
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

# Pids of live job step daemons, i.e. jobs that outlived a slurmctld or slurmd.
stepds() {
  local d
  for d in /proc/[0-9]*; do
    pid_is "${d#/proc/}" slurmstepd && echo "${d#/proc/}"
  done
  return 0
}

# Cancel every job and wait until squeue is empty (job steps outlive slurmd).
cancel_all_jobs() {
  local jobs i
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  [ -n "${jobs// /}" ] || return 0
  log "cancelling all jobs: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for i in $(seq 1 60); do  # KillWait=5, so 30 s is plenty
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.5
  done
  log "WARNING: jobs still listed after 30 s: $(squeue -h -o %i | tr '\n' ' ')"
}

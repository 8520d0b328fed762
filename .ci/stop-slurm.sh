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

KEEP_MUNGE=0
[ "${1:-}" = "--keep-munge" ] && KEEP_MUNGE=1

log() { echo "[stop-slurm] $*"; }

# shellcheck source=.ci/slurm-lib.sh
. "$(dirname "$0")/slurm-lib.sh"
become_root "$0" "$@"

# 1. jobs, while slurmctld and slurmd can still clean them up
if alive_pid "$CTLD_PID" slurmctld >/dev/null; then cancel_all_jobs; fi

# 2. daemons, in reverse start order
stop_daemon "$SLURMD_PID" slurmd
stop_daemon "$CTLD_PID" slurmctld
[ "$KEEP_MUNGE" = 0 ] && stop_daemon "$MUNGE_PID" munged

# 3. report, without killing, job steps that survived (only if cancelling failed)
left=$(stepds | tr '\n' ' ')
[ -n "${left// /}" ] && log "WARNING: slurmstepd processes still running (pids: $left)"
log "done"
exit 0

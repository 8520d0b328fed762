#!/usr/bin/env bash
# start-slurm.sh -- a real one-node SLURM cluster on this machine, for the tests marked
# `slurm` (tests/test_slurm.py) and examples/adaptive_slurm.py.
#
# Installs Debian's slurm + munge if missing, writes a single-node slurm.conf on the
# loopback interface, starts munged -> slurmctld -> slurmd by hand (no systemd needed:
# CI containers and sandboxes have none) and waits until `sinfo` shows the node idle.
#
# Idempotent: running it again on a healthy cluster changes nothing and takes well under
# a second. A daemon counts as running only if its pid file names a live, non-zombie
# process with the right name; slurm.conf is rewritten (and the daemons restarted) only
# when its content changes. Stop everything with .ci/stop-slurm.sh.
#
# Needs root (it re-runs itself with sudo when it can). Tested on Debian 12 (slurm-wlm
# 22.05, munge 0.5.15); jobs run as the submitting user.
#
# Environment:
#   SLURM_CPUS          CPUs the node declares (default max(8, nproc)). More than the
#                       cores so that several 1-core dask worker jobs fit on a small
#                       CI machine; the workers are mostly idle, waiting on each other.
#   SLURM_MEM_MB        RealMemory of the node in MB (default 85% of MemTotal).
#   SLURM_PREEMPT_MODE  what happens to a `scavenger` job preempted by a `high` job:
#                       REQUEUE (default) or CANCEL.
#   SLURM_GRACE_TIME    GraceTime (seconds) of the `grace` partition (default 10).
#   SLURM_KEEP_STATE=1  restart slurmctld with its saved jobs instead of a clean state.
#   SLURM_TIMEOUT       seconds to wait for each readiness step (default 60).
#   SLURM_SMOKE=0       skip the smoke job run after a daemon (re)start.
#
# Partitions: debug (default), scavenger (preemptable, lowest PriorityTier), grace
# (preemptable with a warning: GraceTime) and high (preempts scavenger and grace jobs),
# so that tests can preempt worker jobs the way a busy production cluster does.
set -euo pipefail

TIMEOUT=${SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm

log() { echo "[start-slurm] $*"; }
die() { echo "[start-slurm] ERROR: $*" >&2; exit 1; }

# shellcheck source=.ci/slurm-lib.sh
. "$(dirname "$0")/slurm-lib.sh"
become_root "$0" "$@"

# Poll command "$@" every 0.5 s until it succeeds, for at most TIMEOUT seconds.
wait_for() {
  local i
  for i in $(seq 1 $((TIMEOUT * 2))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

# ------------------------------------------------------------------ 1. packages
missing=0
for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/sinfo /usr/sbin/munged /usr/bin/munge; do
  [ -x "$b" ] || missing=1
done
if [ "$missing" = 1 ]; then
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: 8 small packages instead of the 43 of slurm-wlm. The
  # postinst scripts print "policy-rc.d denied execution of start": expected, nothing is
  # started by the packages, this script starts the daemons below.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
else
  log "slurm and munge are installed ($(/usr/sbin/slurmctld -V 2>/dev/null))"
fi

# ------------------------------------------------------------------ 2. munge
# Slurm authenticates every RPC with munge, so munged must work before slurmctld starts.
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 0700 /etc/munge
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge

if pid=$(alive_pid "$MUNGE_PID" munged); then
  log "munged is running (pid $pid)"
else
  log "starting munged"
  # --force: start even over the stale socket a killed munged leaves behind
  runuser -u munge -- /usr/sbin/munged --force
fi
wait_for sh -c 'munge -n | unmunge' || die "munge does not work; see /var/log/munge/munged.log"

# ------------------------------------------------------------------ 3. slurm.conf
NODE=$(hostname -s)
NPROC=$(nproc)
CPUS=${SLURM_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}
MEM_MB=${SLURM_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)}
PREEMPT_MODE=${SLURM_PREEMPT_MODE:-REQUEUE}
case "$PREEMPT_MODE" in REQUEUE|CANCEL) ;; *) die "SLURM_PREEMPT_MODE must be REQUEUE or CANCEL" ;; esac
GRACE_TIME=${SLURM_GRACE_TIME:-10}
case "$GRACE_TIME" in ''|*[!0-9]*) die "SLURM_GRACE_TIME must be a number of seconds" ;; esac

install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"

NEWCONF=$(mktemp /tmp/slurm.conf.XXXXXX)
trap 'rm -f "$NEWCONF"' EXIT
cat >"$NEWCONF" <<EOF
# Written by .ci/start-slurm.sh (dask-context): one-node test cluster on loopback,
# no cgroups, no accounting database, no systemd.
ClusterName=local
# localhost + NodeAddr=127.0.0.1: no DNS needed, nothing listens beyond loopback
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no mail on this machine; the default mail program logs an error at every start
MailProg=/bin/true
# no cgroups (containers rarely delegate them): track job processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule each submission at once: the default batch_sched_delay=3 holds a job
# submitted within 3 s of the previous scheduling pass for ~3 s, which adds straight
# to every adaptive scale-up
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=512
# the node declares more CPUs than the hardware has; without this slurmd drains it
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=60
InactiveLimit=0
Waittime=0
# preemption by partition: a job in 'high' takes the CPUs of 'scavenger' and 'grace'
# jobs. The global mode must not be OFF once preemption is on, so partitions that must
# never be preempted say OFF themselves.
# 'grace' warns first: a preempted job's steps get SIGTERM at once and the job ends
# GraceTime later (slurmctld checks end times on a timer: up to ~30 s later), with
# SIGTERM to every process and SIGKILL KillWait after it. The batch script itself is
# not signalled at the start of the grace time: a worker that must hear the warning
# runs in a job step (srun).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=5 PreemptMode=OFF
PartitionName=scavenger Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=$PREEMPT_MODE
PartitionName=grace Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL GraceTime=$GRACE_TIME
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF

conf_changed=0
if ! cmp -s "$NEWCONF" "$CONF"; then
  log "writing $CONF"
  install -m 0644 "$NEWCONF" "$CONF"
  conf_changed=1
fi

if [ "$conf_changed" = 1 ] && { alive_pid "$CTLD_PID" slurmctld >/dev/null || alive_pid "$SLURMD_PID" slurmd >/dev/null; }; then
  # 'scontrol reconfigure' does not pick up node definition changes in 22.05, so
  # restart. Cancel jobs first: slurmctld restarts with a clean state below, and a job
  # it forgot would be killed as an orphan when slurmd registers again.
  log "slurm.conf changed under running daemons: restarting slurmctld and slurmd"
  if alive_pid "$CTLD_PID" slurmctld >/dev/null; then cancel_all_jobs; fi
  stop_daemon "$SLURMD_PID" slurmd
  stop_daemon "$CTLD_PID" slurmctld
fi

# ------------------------------------------------------------------ 4. slurmctld
started=0
if pid=$(alive_pid "$CTLD_PID" slurmctld); then
  log "slurmctld is running (pid $pid)"
else
  started=1
  left=$(stepds | tr '\n' ' ')
  if [ "${SLURM_KEEP_STATE:-0}" = 1 ] || [ -n "${left// /}" ]; then
    # job steps still run (slurmctld died under them): recover the saved state so
    # that they are adopted instead of forgotten
    log "starting slurmctld with its saved state${left:+ (live slurmstepd: $left)}"
    /usr/sbin/slurmctld
  else
    # -c: no stale jobs or node states from an earlier run
    log "starting slurmctld (clean state)"
    /usr/sbin/slurmctld -c
  fi
fi
wait_for sh -c 'scontrol ping | grep -q "is UP"' \
  || { tail -n 30 "$LOGDIR/slurmctld.log" >&2; die "slurmctld did not come up"; }

# ------------------------------------------------------------------ 5. slurmd
if pid=$(alive_pid "$SLURMD_PID" slurmd); then
  log "slurmd is running (pid $pid)"
else
  started=1
  log "starting slurmd for node $NODE"
  /usr/sbin/slurmd -N "$NODE"
fi
# ask slurmd itself: sinfo keeps showing 'idle' for a dead slurmd until SlurmdTimeout
wait_for scontrol show slurmd \
  || { tail -n 30 "$LOGDIR/slurmd.log" >&2; die "slurmd did not come up"; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }
resumed=0
for _ in $(seq 1 $((TIMEOUT * 2))); do
  state=$(node_state)
  case "$state" in
    idle|mixed|allocated|completing) break ;;  # up (busy when re-run under jobs)
    drain*|down)
      # registered but marked down or drained by an earlier run: resume it, once
      if [ "$resumed" = 0 ]; then
        log "node is '$state', resuming it"
        scontrol update NodeName="$NODE" State=RESUME || true
        resumed=1
      fi ;;
  esac
  sleep 0.5
done
state=$(node_state)
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) tail -n 20 "$LOGDIR/slurmd.log" >&2; scontrol show node "$NODE" >&2 || true
     die "node $NODE is not ready (state '$state')" ;;
esac

# ------------------------------------------------------------------ 6. smoke job
# After a start, run one batch job end to end (munge credential, launch, completion).
# It also absorbs the ~2.5 s a fresh slurmctld takes before scheduling its first job,
# which would otherwise be charged to the first test.
if [ "$started" = 1 ] && [ "${SLURM_SMOKE:-1}" = 1 ]; then
  job=$(sbatch --parsable -J start-slurm-smoke -o /dev/null -e /dev/null -t 1 --wrap true) \
    || die "sbatch failed"
  job_done() {
    [ "$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')" = COMPLETED ]
  }
  wait_for job_done || { scontrol show job "$job" >&2 || true; die "smoke job $job did not complete"; }
  log "smoke job $job completed"
fi

# wait for idle proper when nothing runs, so that callers see the state they expect
if [ -z "$(squeue -h -o %i 2>/dev/null)" ]; then
  wait_for sh -c "sinfo -h -N -n '$NODE' -o %T | grep -qx idle" \
    || die "node $NODE did not become idle (state '$(node_state)')"
fi
log "ready: node $NODE is $(node_state), $CPUS CPUs, ${MEM_MB} MB"
sinfo

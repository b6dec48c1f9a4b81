#!/usr/bin/env bash
# Stop the SLURM cluster started by start.sh: cancel all jobs, shut down slurmctld and
# every node's slurmd, then slurmdbd, MariaDB and (if start.sh started it) munged.
# Idempotent: whatever is not running is skipped. Every wait is bounded.
set -euo pipefail

STATE=${MNIST_ADD_SLURM_DIR:-/tmp/mnist-add-slurm}
DB=$STATE/mysql
export SLURM_CONF=$STATE/etc/slurm.conf

log() { echo "stop.sh: $*"; }
# running PIDFILE NAME: true if the pid in PIDFILE is alive and is NAME (not a reused pid).
running() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }
# stop_pid COMM PIDFILE SECONDS [SIGNAL]: send SIGNAL (default TERM; "-" sends nothing),
# wait up to SECONDS for the process to exit, then SIGKILL it.
stop_pid() {
    local pid i
    running "$2" "$1" || { rm -f "$2"; return 0; }
    pid=$(cat "$2")
    log "stopping $1"
    [ "${4:-TERM}" = - ] || kill -"${4:-TERM}" "$pid" 2>/dev/null || true
    # Poll the pid we read, not the pid file: some daemons delete it before they exit.
    for ((i = 0; i < $3 * 5; i++)); do kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }; sleep 0.2; done
    log "WARNING: $1 (pid $pid) still alive after $3 s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$2"
}

if [ -f "$SLURM_CONF" ] && running "$STATE/run/slurmctld.pid" slurmctld; then
    # Cancel jobs first so no job steps outlive slurmd (no cgroups to clean them up).
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(tr "\n" " " <<<"$jobs")"
        # shellcheck disable=SC2086
        scancel $jobs || true
        # Jobs that ignore SIGTERM (submitit's do) would only die after KillWait (30 s).
        # After 8 s SIGKILL their processes ourselves (scancel cannot signal a completing job);
        # before 10 s, because after that slurmd checks for finished jobs only every 10 s.
        for ((i = 0; i < 40; i++)); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break   # squeue lists CG too
            if [ "$i" = 8 ]; then
                pids=$(scontrol listpids 2>/dev/null | awk 'NR > 1 {print $1}')
                # shellcheck disable=SC2086
                [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
            fi
            sleep 1
        done
    fi
    log "scontrol shutdown (slurmctld + slurmd)"
    scontrol shutdown >/dev/null 2>&1 || true
fi
stop_pid slurmctld "$STATE/run/slurmctld.pid" 30 -   # already told by scontrol shutdown
# Each node's slurmd (slurmd-NAME.pid; slurmd.pid from a cluster started before there were several),
# in case slurmctld was not there to tell it.
for pidfile in "$STATE"/run/slurmd-*.pid "$STATE"/run/slurmd.pid; do
    [ -e "$pidfile" ] || continue
    stop_pid slurmd "$pidfile" 30
done
stop_pid slurmdbd "$STATE/run/slurmdbd.pid" 30
stop_pid mariadbd "$DB/mariadb.pid" 60          # SIGTERM = clean InnoDB shutdown
if [ -e "$STATE/run/munged.ours" ]; then
    stop_pid munged /run/munge/munged.pid 10
    rm -f "$STATE/run/munged.ours"
fi
log "stopped"

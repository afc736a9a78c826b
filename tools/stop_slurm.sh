#!/usr/bin/env bash
# Stops what tools/setup_slurm.sh RUN_DIR started (by the pid files under RUN_DIR/run, newest first):
# slurmd daemons, slurmctld, slurmdbd, MariaDB, and munged if setup_slurm.sh started it. Cancels the
# cluster's jobs first so no job step outlives it. Safe to run twice or on a half-started cluster.
set -uo pipefail
RUN_DIR=$(realpath -m "${1:?usage: tools/stop_slurm.sh RUN_DIR}")
RUN=$RUN_DIR/run
export SLURM_CONF=$RUN_DIR/etc/slurm.conf

stop() {  # stop PIDFILE NAME: SIGTERM, then SIGKILL after 15 s
    local pidfile=$1 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null && echo "stop_slurm: $2 (pid $pid) killed after 15 s" >&2
    fi
    rm -f "$pidfile"
}

[ -f "$SLURM_CONF" ] && timeout 10 scancel --quiet --full --user="$(id -un)" 2>/dev/null
[ -f "$SLURM_CONF" ] && timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null && sleep 1
for pidfile in "$RUN"/slurmd.*.pid; do [ -e "$pidfile" ] && stop "$pidfile" slurmd; done
stop "$RUN/slurmctld.pid" slurmctld
stop "$RUN/slurmdbd.pid" slurmdbd
stop "$RUN/mariadb.pid" MariaDB
stop "$RUN/munged.pid" munged
echo "stop_slurm: stopped the cluster in $RUN_DIR"

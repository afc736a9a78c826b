#!/usr/bin/env bash
# Stops what tools/setup_slurm.sh RUN_DIR started (by the pid files under RUN_DIR/run, daemons before what they use):
# slurmd daemons, slurmctld, slurmdbd, MariaDB, and munged if setup_slurm.sh started it. Cancels the
# cluster's jobs first so no job step outlives it. Safe to run twice or on a half-started cluster.
set -uo pipefail
RUN_DIR=$(realpath -m "${1:?usage: tools/stop_slurm.sh RUN_DIR}")
RUN=$RUN_DIR/run
export SLURM_CONF=$RUN_DIR/etc/slurm.conf

stop() {  # stop NAME PIDFILE...: SIGTERM to all of them, then SIGKILL to any left after 15 s
    local name=$1 pidfile pid alive pids=()
    shift
    for pidfile in "$@"; do
        [ -s "$pidfile" ] && pid=$(cat "$pidfile") && kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for _ in $(seq 1 75); do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        pids=("${alive[@]}")
        [ ${#pids[@]} -eq 0 ] && return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null && echo "stop_slurm: $name (pid $pid) killed after 15 s" >&2; done
}

[ -f "$SLURM_CONF" ] && timeout 10 scancel --quiet --full --user="$(id -un)" 2>/dev/null
[ -f "$SLURM_CONF" ] && timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null && sleep 1
# Each daemon takes ~2 s to exit: the nodes' and the controller's together, then the accounting daemon, then
# what it used (15 s one after another).
stop "slurmd and slurmctld" "$RUN"/slurmd.*.pid "$RUN/slurmctld.pid"
stop slurmdbd "$RUN/slurmdbd.pid"
stop "MariaDB and munged" "$RUN/mariadb.pid" "$RUN/munged.pid"
echo "stop_slurm: stopped the cluster in $RUN_DIR"

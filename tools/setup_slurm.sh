#!/usr/bin/env bash
# Starts a real SLURM cluster on this machine for the tests: munge, MariaDB + slurmdbd (accounting:
# sacct, which nemo-run polls), slurmctld and NODES slurmd daemons (one per simulated node, distinct
# ports) with GPUS_PER_NODE fake GPUs each. Without systemd; everything lives under RUN_DIR.
#
#   tools/setup_slurm.sh RUN_DIR        # then: export SLURM_CONF=RUN_DIR/etc/slurm.conf
#   tools/stop_slurm.sh RUN_DIR
#
# Idempotent: installs the Debian packages only when missing, rewrites the configs, starts only the
# daemons that are not running. Needs root (apt-get, mknod, daemons running as root).
# Fake GPUs: gres.conf with AutoDetect=off points at character devices made with mknod (slurmd rejects
# plain files); SlurmdParameters=config_overrides lets each node declare more CPUs, memory and GPUs than
# exist, so `--gpus-per-node=8` schedules and sets CUDA_VISIBLE_DEVICES without a GPU. Nothing opens them.
set -euo pipefail
RUN_DIR=$(realpath -m "${1:?usage: tools/setup_slurm.sh RUN_DIR}")
NODES=${NODES:-3}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_NODE=${CPUS_PER_NODE:-16}
MEMORY_MB_PER_NODE=${MEMORY_MB_PER_NODE:-32000}
# Ports away from SLURM's defaults (6817-6819) so a site install on the same host is left alone.
PORT_BASE=${PORT_BASE:-16800}
CTLD_PORT=$((PORT_BASE + 17)) DBD_PORT=$((PORT_BASE + 19)) DB_PORT=$((PORT_BASE + 6)) SLURMD_PORT0=$((PORT_BASE + 21))
HOST=$(hostname -s)

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null || ! command -v munged >/dev/null; then
    echo "setup_slurm: installing slurm-wlm, slurmdbd, munge, mariadb-server (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client >/dev/null
fi

mkdir -p "$RUN_DIR"/{etc,state,log,run,dev,spool}
ETC=$RUN_DIR/etc LOG=$RUN_DIR/log RUN=$RUN_DIR/run

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then echo "setup_slurm: $what did not come up; logs in $LOG" >&2; return 1; fi
        sleep 0.2
    done
}

# --- munge: one daemon per host, shared by every SLURM daemon and client --------------------------
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    cp /run/munge/munged.pid "$RUN/munged.pid"  # started here, so tools/stop_slurm.sh stops it
    wait_for 10 munged sh -c 'munge -n | unmunge'
fi

# --- MariaDB + slurmdbd: job accounting (sacct) --------------------------------------------------
DB=$RUN_DIR/mysql
if [ ! -d "$DB/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DB" --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1
fi
if ! running "$RUN/mariadb.pid"; then
    mariadbd --user=root --datadir="$DB" --socket="$RUN/mariadb.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M --skip-log-bin >/dev/null 2>&1 &
    wait_for 30 MariaDB mariadb --socket="$RUN/mariadb.sock" -u root -e "SELECT 1"
fi
mariadb --socket="$RUN/mariadb.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"

# --- slurm.conf and gres.conf: NODES nodes on this host, fake GPUs -------------------------------
{
    cat <<EOF
ClusterName=opsdc
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
# A requeued job waits cred_expire + 1 seconds (default 120; SLURM's least is 5) before it may start again.
AuthInfo=cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$RUN_DIR/state
SlurmdSpoolDir=$RUN_DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Test cluster: schedule within seconds of a job becoming eligible (default cycles are 30-60 s).
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
JobRequeue=1
# SIGTERM to SIGKILL: time for the trainer to checkpoint its last finished step (train/preemption.py) on a loaded machine.
KillWait=120
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
EOF
    for i in $(seq 1 "$NODES"); do
        echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + i - 1)) CPUs=$CPUS_PER_NODE RealMemory=$MEMORY_MB_PER_NODE Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"
    done
    echo "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$ETC/slurm.conf"
{
    echo "AutoDetect=off"
    for i in $(seq 1 "$NODES"); do
        for g in $(seq 0 $((GPUS_PER_NODE - 1))); do
            [ -c "$RUN_DIR/dev/node$i-gpu$g" ] || mknod "$RUN_DIR/dev/node$i-gpu$g" c 1 3
        done
        echo "NodeName=node$i Name=gpu File=$RUN_DIR/dev/node$i-gpu[0-$((GPUS_PER_NODE - 1))]"
    done
} >"$ETC/gres.conf"
export SLURM_CONF=$ETC/slurm.conf

if ! running "$RUN/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
fi
if ! running "$RUN/slurmctld.pid"; then
    slurmctld -i
    wait_for 30 slurmctld scontrol ping
fi
for i in $(seq 1 "$NODES"); do
    mkdir -p "$RUN_DIR/spool/node$i"
    running "$RUN/slurmd.node$i.pid" || slurmd -N "node$i"
done
idle_nodes() { [ "$(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l)" = "$NODES" ]; }
wait_for 60 "$NODES idle nodes" idle_nodes
echo "setup_slurm: cluster up: $NODES nodes x $GPUS_PER_NODE fake GPUs; export SLURM_CONF=$SLURM_CONF"

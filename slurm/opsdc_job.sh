# The body of every OPSDC sbatch script: slurm/<recipe>.sbatch sets OPSDC_RECIPE after its #SBATCH
# header and sources this file. Arguments of the sbatch command are key=value overrides of the recipe.
#
#   sbatch slurm/qwen3_8b.sbatch model.hf_path=/models/Qwen3-8B out_dir=/scratch/opsdc/qwen3_8b
#   OPSDC_VALIDATE=1 sbatch slurm/qwen3_32b.sbatch     # check the allocation, print the steps, start nothing
#
# One allocation: the first slurm.rollout_nodes nodes run the SGLang servers (rollout.engine=sglang; and
# sglang-router when rollout.sglang.router_port is set), the next slurm.trainer_nodes nodes run the
# trainer, one process per GPU, which sends its rollouts and pushes its weights to those servers.
# Everything is checked first (`python -m opsdc_megatron.launch.plan`): recipe, parallel plan against
# the allocation, model and prompt files; a wrong job fails in seconds with one line naming the problem.
#
# Checkpoint and requeue: `#SBATCH --signal=B:USR1@SECONDS` sends SIGUSR1 here before the time limit;
# it is forwarded to the trainer, which checkpoints its last finished step (rollouts in progress end at once) and exits 75
# (opsdc_megatron/train/preemption.py); this script then requeues the job, and the next run resumes
# from OUT/checkpoints/latest (a trainer that exits without that checkpoint fails the job instead). SIGTERM (scancel, `scontrol requeue`, preemption) checkpoints the same
# way; SLURM decides whether the job comes back.
#
# Environment (all optional; sbatch passes the submitting shell's environment):
#   OPSDC_HOME              checkout to run from (default: the directory sbatch was called from)
#   OPSDC_PYTHON            interpreter with opsdc_megatron (default: python in a container, else
#                           $OPSDC_HOME/.venv/bin/python, else python3)
#   OPSDC_CONTAINER_IMAGE, OPSDC_CONTAINER_MOUNTS   run every step in a pyxis/enroot container
#   OPSDC_MAX_REQUEUES      requeues this script asks for before giving up (default 20)
#   OPSDC_VALIDATE=1        validation mode
#   NCCL_*, CUDA_DEVICE_MAX_CONNECTIONS, OMP_NUM_THREADS: defaults below unless already set

set -uo pipefail
# bash 4.2 (RHEL 7) calls an empty array unbound under `set -u`: every job without overrides or a container died.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "opsdc_job.sh: needs bash >= 4.4, this is $BASH_VERSION" >&2; exit 2
fi
: "${OPSDC_RECIPE:?set OPSDC_RECIPE before sourcing slurm/opsdc_job.sh}"
OPSDC_HOME=${OPSDC_HOME:-${SLURM_SUBMIT_DIR:?run this through sbatch}}
cd "$OPSDC_HOME" || exit 2
OPSDC_HOME=$PWD  # a relative one named the checkout from the submit directory, which this script just left
if [ -z "${OPSDC_PYTHON:-}" ]; then
    # In a container, the image's interpreter: a host venv's python links to a host path the container lacks.
    if [ -n "${OPSDC_CONTAINER_IMAGE:-}" ]; then OPSDC_PYTHON=python
    elif [ -x .venv/bin/python ]; then OPSDC_PYTHON=$OPSDC_HOME/.venv/bin/python; else OPSDC_PYTHON=python3; fi
fi
VALIDATE=${OPSDC_VALIDATE:-0}
RESTART=${SLURM_RESTART_COUNT:-0}
OVERRIDES=("$@")

log() { echo "[opsdc $(date +%T) job $SLURM_JOB_ID restart $RESTART] $*"; }

# Signals, trapped from the start: SIGUSR1's default action would end this script during the checks or
# the servers' start-up, leaving the job neither requeued nor cleaned up. SIGUSR1 (only this script gets
# it, from --signal=B:USR1@...) is forwarded through srun to every trainer process once there is one,
# and written down in STOP_FILE, which the trainer also reads: its processes ignore SIGUSR1 until the
# handler is in place (a signal during Python's start-up would otherwise kill them), and the file
# stands in for a signal they ignored. Before the trainer starts, the job is requeued when the servers are up (nothing to checkpoint yet). SIGTERM (scancel,
# requeue, preemption): SLURM sends it to every process of the job itself; it is not forwarded, because
# srun answers a SIGTERM during a job kill by killing its step at once.
declare -A STEP_PIDS
REQUEUE_ASKED=0
write_stop_file() {  # renamed into place whole: the trainer's ranks read it at any moment
    echo "SIGUSR1 to the job" > "$STOP_FILE.tmp" && mv -f "$STOP_FILE.tmp" "$STOP_FILE"
}
on_usr1() {
    INTERRUPTED=1
    log "received SIGUSR1: the trainer checkpoints its last finished step and exits; then the job is requeued"
    REQUEUE_ASKED=1
    [ -n "${STOP_FILE:-}" ] && write_stop_file
    [ -n "${STEP_PIDS[trainer]:-}" ] && kill -s USR1 "${STEP_PIDS[trainer]}" 2>/dev/null
}
trap on_usr1 USR1
TERM_RECEIVED=0
trap 'TERM_RECEIVED=1; INTERRUPTED=1; log "received SIGTERM: the trainer checkpoints its last finished step if SLURM waits long enough (KillWait)"' TERM
requeue() {  # requeue REASON: ask SLURM to run the job again; exit 75 when it refuses (--no-requeue, site policy)
    log "$1; requeueing the job to resume from $OPSDC_OUT_DIR/checkpoints/latest"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    log "FAILED to requeue (scontrol requeue refused: the job was submitted with --no-requeue, or site policy); submit it again to resume"
    exit 75
}

CONTAINER=()
if [ -n "${OPSDC_CONTAINER_IMAGE:-}" ]; then
    CONTAINER=(--container-image="$OPSDC_CONTAINER_IMAGE" --container-workdir="$OPSDC_HOME" --no-container-mount-home)
    [ -n "${OPSDC_CONTAINER_MOUNTS:-}" ] && CONTAINER+=(--container-mounts="$OPSDC_CONTAINER_MOUNTS")
fi

# --- 1. check the recipe against this allocation --------------------------------------------------
log "recipe $OPSDC_RECIPE ${OVERRIDES[*]:-}; nodes $SLURM_JOB_NODELIST; validate=$VALIDATE"
PLAN_ARGS=(--recipe "$OPSDC_RECIPE" --allocated-nodes "$SLURM_JOB_NUM_NODES"
           --allocated-gpus-per-node "${SLURM_GPUS_ON_NODE:-0}" --allocated-cpus-per-node "${SLURM_CPUS_ON_NODE:-0}")
[ "$VALIDATE" = 1 ] && PLAN_ARGS+=(--validate)
if [ ${#CONTAINER[@]} -gt 0 ]; then
    PLAN=$(srun --nodes=1 --ntasks=1 --overlap "${CONTAINER[@]}" "$OPSDC_PYTHON" -m opsdc_megatron.launch.plan "${PLAN_ARGS[@]}" "${OVERRIDES[@]}")
else
    PLAN=$("$OPSDC_PYTHON" -m opsdc_megatron.launch.plan "${PLAN_ARGS[@]}" "${OVERRIDES[@]}")
fi || { log "FAILED before starting anything: the recipe does not fit this job (error above)"; exit 2; }
eval "$PLAN"

# --- 2. addresses, ports, NCCL -------------------------------------------------------------------
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
node_addr() { scontrol show node "$1" -o | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p'; }
url_host() { if [[ $1 == *:* ]]; then echo "[$1]"; else echo "$1"; fi; }  # an IPv6 address goes in brackets
comma_joined() { (IFS=,; echo "$*"); }
yaml_strings() { local items=() item; for item in "$@"; do items+=("'$item'"); done; echo "[$(comma_joined "${items[@]}")]"; }  # [ in a URL is YAML too
# Steps are placed on these hosts by name (srun --nodelist), not by index (--relative): a step's node index
# follows slurm.conf's order of the nodes, and the job's node list above is sorted by name, so the servers
# could start on a node other than the one their URLs and MASTER_ADDR name.
ROLLOUT_HOSTS=("${HOSTS[@]:0:$OPSDC_ROLLOUT_NODES}")
TRAINER_HOSTS=("${HOSTS[@]:$OPSDC_ROLLOUT_NODES:$OPSDC_TRAINER_NODES}")
# torch.distributed rendezvous on the first trainer node; its port from the job id so that jobs
# sharing a node (and the simulated nodes of the test cluster) do not collide. SGLang's ports: the recipe's
# (rollout.sglang.base_port, router_port) shifted by 100 x (job id mod 20) for the same reason; a job on
# another's ports would take that job's servers, which answer /health, for its own.
export MASTER_ADDR; MASTER_ADDR=$(node_addr "${TRAINER_HOSTS[0]}")
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 5000))
PORT_SHIFT=$((SLURM_JOB_ID % 20 * 100))
OPSDC_SERVER_BASE_PORT=$((OPSDC_SERVER_BASE_PORT + PORT_SHIFT))
[ "$OPSDC_ROUTER_PORT" -gt 0 ] && OPSDC_ROUTER_PORT=$((OPSDC_ROUTER_PORT + PORT_SHIFT))
# As the recipe's check (config.py): base_port + num_servers - 1 and router_port must be ports.
if [ $((OPSDC_SERVER_BASE_PORT + OPSDC_ROLLOUT_NODES * OPSDC_SERVERS_PER_ROLLOUT_NODE)) -gt 65536 ] || [ "$OPSDC_ROUTER_PORT" -gt 65535 ]; then
    log "FAILED before starting anything: rollout.sglang.base_port/router_port + $PORT_SHIFT (this job's shift) pass 65535; lower them"; exit 2
fi
[ "$OPSDC_ROLLOUT_ENGINE" = sglang ] && OVERRIDES+=("rollout.sglang.base_port=$OPSDC_SERVER_BASE_PORT" "rollout.sglang.router_port=$OPSDC_ROUTER_PORT")
TRAINER_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron: TP communication kept in order (trainer step only: SGLang overlaps streams)
unset CUDA_DEVICE_MAX_CONNECTIONS  # a value from the submitting shell would reach the server step too
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank ends the step, not a hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Site-specific fabric settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) come from the submitting environment.

LOG_DIR=$OPSDC_OUT_DIR/slurm_logs/job_${SLURM_JOB_ID}_restart_${RESTART}
[ "$VALIDATE" = 1 ] || mkdir -p "$LOG_DIR"
export OPSDC_STOP_FILE=$LOG_DIR/stop_requested  # read by train/preemption.py
[ "$VALIDATE" = 1 ] || STOP_FILE=$OPSDC_STOP_FILE
[ "$REQUEUE_ASKED" = 1 ] && [ -n "${STOP_FILE:-}" ] && write_stop_file
log "rollout nodes: ${ROLLOUT_HOSTS[*]:-none}; trainer nodes: ${TRAINER_HOSTS[*]}; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT; logs in $LOG_DIR"
[ "$OPSDC_ROLLOUT_ENGINE" = sglang ] && log "SGLang ports: servers from $OPSDC_SERVER_BASE_PORT, router $OPSDC_ROUTER_PORT (0: none): the recipe's + $PORT_SHIFT for this job"

# Each step states its task count: srun would otherwise take the job's (SLURM_NTASKS) for a step on fewer nodes.
start_step() {  # start_step NAME SRUN_ARGS...: a background srun step named NAME (validation mode: print it)
    local name=$1; shift
    if [ "$VALIDATE" = 1 ]; then
        echo "would run step $name: $(printf '%q ' srun --job-name="$name" "$@")"
    else
        srun --job-name="$name" "$@" &
        STEP_PIDS[$name]=$!
    fi
}

stop_steps() {
    # srun passes SIGTERM to its tasks; a step still running 60 s later (a server stuck in teardown) is
    # killed, so that this script always goes on to its exit status or requeue (the job's end or the
    # requeue then ends whatever that step left).
    local name deadline=$((SECONDS + 60))
    for name in "${!STEP_PIDS[@]}"; do
        [ "$name" = trainer ] || kill -TERM "${STEP_PIDS[$name]}" 2>/dev/null
    done
    for name in "${!STEP_PIDS[@]}"; do
        while kill -0 "${STEP_PIDS[$name]}" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 1; done
        kill -KILL "${STEP_PIDS[$name]}" 2>/dev/null
    done
    wait 2>/dev/null
}

# --- 3. rollout step: SGLang servers (+ sglang-router) on the rollout nodes ------------------------
# Each task execs the server command the trainer's launcher builds from rollout.sglang (launch/sglang_step.py):
# task i of a node serves on port OPSDC_SERVER_BASE_PORT + i, on GPU group i. The trainer gets their URLs
# (rollout.sglang.server_urls), sends rollouts and pushes weights to them, and leaves them to this script.
TRAINER_OVERRIDES=()
if [ "$OPSDC_ROLLOUT_ENGINE" = sglang ]; then
    log "rollout step: $OPSDC_ROLLOUT_NODES node(s) x $OPSDC_SERVERS_PER_ROLLOUT_NODE SGLang server(s)," \
        "rollout.sglang.tensor_parallel_size=$OPSDC_GPUS_PER_SERVER, router port $OPSDC_ROUTER_PORT (0: none)"
    # Servers listen on every address of their node: IPv6 ones too when a rollout node's address is IPv6.
    export OPSDC_BIND_HOST=0.0.0.0
    for host in "${ROLLOUT_HOSTS[@]}"; do [[ $(node_addr "$host") == *:* ]] && OPSDC_BIND_HOST=::; done
    export OPSDC_FAILED_TASK_DIR=$LOG_DIR  # a server or router task that fails writes why there (launch/sglang_step.py)
    SERVER_GPU_ARGS=()
    [ "$OPSDC_GPUS_PER_NODE" -gt 0 ] && SERVER_GPU_ARGS=(--gpus-per-node="$OPSDC_GPUS_PER_NODE")
    WORKER_URLS=()
    for host in "${ROLLOUT_HOSTS[@]}"; do
        addr=$(node_addr "$host")
        for ((i = 0; i < OPSDC_SERVERS_PER_ROLLOUT_NODE; i++)); do WORKER_URLS+=("http://$(url_host "$addr"):$((OPSDC_SERVER_BASE_PORT + i))"); done
    done
    if [ "$VALIDATE" != 1 ]; then  # another job's server there would answer the health wait below and serve this job
        for url in "${WORKER_URLS[@]}"; do
            if curl --noproxy '*' -s --max-time 5 -o /dev/null "$url/health"; then
                log "FAILED: $url answers before this job started its servers: another job's server on that port (ports shift by job id % 20)"
                exit 1
            fi
        done
    fi
    start_step sglang_servers --nodes="$OPSDC_ROLLOUT_NODES" --nodelist="$(comma_joined "${ROLLOUT_HOSTS[@]}")" --ntasks-per-node="$OPSDC_SERVERS_PER_ROLLOUT_NODE" \
        --ntasks=$((OPSDC_ROLLOUT_NODES * OPSDC_SERVERS_PER_ROLLOUT_NODE)) \
        "${SERVER_GPU_ARGS[@]}" --kill-on-bad-exit=0 --label --output="$LOG_DIR/sglang_servers.log" "${CONTAINER[@]}" \
        "$OPSDC_PYTHON" -m opsdc_megatron.launch.sglang_step server --recipe "$OPSDC_RECIPE" "${OVERRIDES[@]}"
    READY_PROBES=()  # a server answers /health once its model is loaded
    for url in "${WORKER_URLS[@]}"; do READY_PROBES+=("$url/health"); done
    if [ "$OPSDC_ROUTER_PORT" -gt 0 ]; then
        ROUTER_URL="http://$(url_host "$(node_addr "${ROLLOUT_HOSTS[0]}")"):$OPSDC_ROUTER_PORT"
        start_step sglang_router --nodes=1 --ntasks=1 --nodelist="${ROLLOUT_HOSTS[0]}" --overlap --output="$LOG_DIR/sglang_router.log" \
            "${CONTAINER[@]}" "$OPSDC_PYTHON" -m opsdc_megatron.launch.sglang_step router --recipe "$OPSDC_RECIPE" \
            --worker-urls "$(comma_joined "${WORKER_URLS[@]}")" "${OVERRIDES[@]}"
        READY_PROBES+=("$ROUTER_URL/readiness")  # the router's /health answers before it has registered its workers
    fi
    if [ "$VALIDATE" != 1 ]; then
        deadline=$((SECONDS + OPSDC_SERVER_STARTUP_TIMEOUT_S))  # rollout.sglang.startup_timeout_s
        for probe in "${READY_PROBES[@]}"; do
            # Straight to the node (a cluster's http_proxy cannot reach it), and never longer than 10 s a try.
            until curl --noproxy '*' -sf --max-time 10 "$probe" >/dev/null; do
                [ "$REQUEUE_ASKED" = 1 ] && break 2  # SIGUSR1: nothing to wait for, the job is requeued below
                # A task that failed said why (its step may go on: --kill-on-bad-exit=0 keeps a server's death
                # mid-run from ending the others). Read before the steps' ends: a task writes it, then exits.
                for failed in "$LOG_DIR"/sglang_*.failed; do
                    [ -f "$failed" ] || continue
                    log "FAILED while waiting for $probe: $(cat "$failed") (see $LOG_DIR/sglang_*.log)"; stop_steps; exit 1
                done
                for step in sglang_servers sglang_router; do
                    if [ -n "${STEP_PIDS[$step]:-}" ] && ! kill -0 "${STEP_PIDS[$step]}" 2>/dev/null; then
                        log "FAILED: the $step step ended while waiting for $probe (see $LOG_DIR/$step.log)"; stop_steps; exit 1
                    fi
                done
                if [ $SECONDS -ge $deadline ]; then
                    log "FAILED: $probe did not answer within rollout.sglang.startup_timeout_s = $OPSDC_SERVER_STARTUP_TIMEOUT_S s (see $LOG_DIR/sglang_*.log)"
                    stop_steps; exit 1
                fi
                sleep 2
            done
        done
        [ "$REQUEUE_ASKED" = 1 ] || log "rollout servers ready: ${WORKER_URLS[*]}${ROUTER_URL:+ (router $ROUTER_URL)}"
    fi
    TRAINER_OVERRIDES+=("rollout.sglang.server_urls=$(yaml_strings "${WORKER_URLS[@]}")")
else
    log "no rollout server step: rollout.engine=$OPSDC_ROLLOUT_ENGINE generates inside the trainer processes" \
        "(opsdc_megatron/rollout/hf_engine.py); set rollout.engine=sglang and slurm.rollout_nodes to serve from SGLang"
fi

# --- 4. trainer step: one process per GPU (per task on CPU), ranks from SLURM ----------------------
if [ "$REQUEUE_ASKED" = 1 ] && [ "$VALIDATE" != 1 ] && [ "$RESTART" -lt "${OPSDC_MAX_REQUEUES:-20}" ]; then
    stop_steps; requeue "SIGUSR1 came before the trainer started (nothing to checkpoint)"
fi
# A rank from its node's place in TRAINER_HOSTS, not SLURM_PROCID: rank 0 (the rendezvous store) must run on
# TRAINER_HOSTS[0], MASTER_ADDR's node, whatever order srun numbers the step's nodes in.
export OPSDC_TRAINER_HOSTS="${TRAINER_HOSTS[*]}"
TRAINER_CMD='trap "" USR1; read -ra hosts <<< "$OPSDC_TRAINER_HOSTS"; node=-1
for i in "${!hosts[@]}"; do [ "${hosts[$i]}" = "$SLURMD_NODENAME" ] && node=$i; done
[ "$node" -ge 0 ] || { echo "opsdc_job.sh: this node, $SLURMD_NODENAME, is none of the trainer hosts $OPSDC_TRAINER_HOSTS" >&2; exit 2; }
export RANK=$((node * '"$OPSDC_TRAINER_TASKS_PER_NODE"' + SLURM_LOCALID)) WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID CUDA_DEVICE_MAX_CONNECTIONS='"$TRAINER_MAX_CONNECTIONS"' OPSDC_INPUTS_CHECKED=1
exec "$0" -m opsdc_megatron.cli train "$@"'
GPU_ARGS=()
[ "$OPSDC_GPUS_PER_NODE" -gt 0 ] && GPU_ARGS=(--gpus-per-node="$OPSDC_GPUS_PER_NODE")
start_step trainer --nodes="$OPSDC_TRAINER_NODES" --nodelist="$(comma_joined "${TRAINER_HOSTS[@]}")" \
    --ntasks-per-node="$OPSDC_TRAINER_TASKS_PER_NODE" --ntasks=$((OPSDC_TRAINER_NODES * OPSDC_TRAINER_TASKS_PER_NODE)) "${GPU_ARGS[@]}" --kill-on-bad-exit=1 --label \
    --output="$LOG_DIR/trainer.log" "${CONTAINER[@]}" \
    bash -c "$TRAINER_CMD" "$OPSDC_PYTHON" "$OPSDC_RECIPE" "${OVERRIDES[@]}" "${TRAINER_OVERRIDES[@]}"
if [ "$VALIDATE" = 1 ]; then
    log "validation mode: resources and commands checked, nothing started"
    exit 0
fi

# --- 5. wait for the trainer (the signal traps are set at the top) --------------------------------------
[ "$REQUEUE_ASKED" = 1 ] && kill -s USR1 "${STEP_PIDS[trainer]}" 2>/dev/null  # it came as the step started (srun may not pass it on yet)
log "trainer started ($OPSDC_TRAINER_NODES node(s) x $OPSDC_TRAINER_TASKS_PER_NODE processes)"
while true; do  # a trapped signal interrupts wait (status 128 + signal); the step's own status comes from waiting again
    INTERRUPTED=0
    wait "${STEP_PIDS[trainer]}"; STATUS=$?
    [ "$INTERRUPTED" = 1 ] || break
done
stop_steps
# After SIGUSR1 the exit status is not enough: the first rank to exit 75 makes srun (--kill-on-bad-exit)
# terminate the others, so srun may report 143. The line rank 0 prints when it stops on request
# (train/preemption.py) tells a clean stop from a crash, which is reported, not requeued.
STOPPED=0
grep -q "opsdc train: stopping" "$LOG_DIR/trainer.log" 2>/dev/null && STOPPED=1
MAX_REQUEUES=${OPSDC_MAX_REQUEUES:-20}
if [ "$STATUS" = 0 ]; then
    log "trainer finished"; exit 0
elif [ "$STOPPED" = 1 ] && [ "$REQUEUE_ASKED" = 1 ] && [ "$RESTART" -lt "$MAX_REQUEUES" ]; then
    requeue "trainer stopped on SIGUSR1 (status $STATUS)"
elif [ "$TERM_RECEIVED" = 1 ]; then
    log "trainer stopped on SIGTERM (status $STATUS); SLURM requeues or ends the job"; exit "$STATUS"
elif [ "$STOPPED" = 1 ]; then
    [ "$REQUEUE_ASKED" = 1 ] && log "OPSDC_MAX_REQUEUES ($MAX_REQUEUES) reached"
    log "trainer checkpointed and stopped (exit 75); rerun the same command to resume"; exit 75
elif [ "$REQUEUE_ASKED" = 1 ]; then
    log "FAILED: after SIGUSR1 the trainer exited with status $STATUS without its stop checkpoint (see $LOG_DIR/trainer.log); not requeued"
    exit "$STATUS"
fi
log "FAILED: trainer exited with status $STATUS (see $LOG_DIR/trainer.log)"; exit "$STATUS"

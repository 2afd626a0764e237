#!/bin/bash
#PBS -N Microbead_Multinode
#PBS -l walltime=12:00:00
#PBS -l select=2:ncpus=36:ngpus=1:mem=240gb:mpiprocs=1
#PBS -l place=scatter
#PBS -j oe
#PBS -S /bin/bash
#
# Data-parallel training over several nodes with tf.distribute.MultiWorkerMirroredStrategy:
# one TensorFlow worker per node (each uses all of its node's GPUs), TF_CONFIG built from
# $PBS_NODEFILE by hpc_tools.py. Worker 0 (the first node, where this script starts) is the
# chief and the only one that writes the run folder; the other workers write into a scratch
# folder that is deleted at the end. Checks, resume and post-run analysis are those of
# pbs_microbead_optimized.sh (same settings, read its header), run once on the first node.
#
#   qsub pbs_microbead_multinode.sh
#   qsub -l select=4:ncpus=36:ngpus=1:mem=240gb:mpiprocs=1 -v EPOCHS=50 \
#        pbs_microbead_multinode.sh
#
# BATCH_SIZE is the global batch over all workers' GPUs.
# Extra settings (environment variables):
#   MW_PORT       first TCP port of the workers                                  [29500]
#   MW_PORT_STEP  worker k listens on MW_PORT + k*MW_PORT_STEP (1: workers share a host) [0]
#   LAUNCHER      how workers start on their nodes: pbsdsh, ssh or local (all on this host,
#                 for tests and debugging)                                       [pbsdsh]
#   NODEFILE      host list, one line per host or per cpu                        [$PBS_NODEFILE]
# Internal: `pbs_microbead_multinode.sh --worker INDEX ENV_FILE` runs one worker.

set -euo pipefail

# shellcheck disable=SC2034  # read by the functions of pbs_microbead_optimized.sh
MB_NAME=multinode
: "${PBS_O_WORKDIR:=$PWD}"
# shellcheck source=/dev/null
MB_LIBRARY_ONLY=1 source "${SCRIPT_DIR:-$PBS_O_WORKDIR}/pbs_microbead_optimized.sh"

# Everything a worker needs, written by the launcher (pbsdsh starts tasks with an empty
# environment, so nothing can be inherited).
MN_SHARED_VARS=(PATH PBS_O_WORKDIR PBS_JOBID SCRIPT_DIR CONTAINER DATA_DIR OUTPUT_DIR MODELS
    EPOCHS BATCH_SIZE FILTERS STEPS_PER_EPOCH TRAIN_ARGS ALLOW_CPU RUN_KEY JOB_TAG STAGING
    CONTAINER_PYTHON CONTAINER_RUNTIME MB_BINDS MW_PORT MW_PORT_STEP RUN_DIR_FILE RESUME_DIR
    TF_CPP_MIN_LOG_LEVEL)

mn_launch() {
    local index=$1 host=$2 env_file=$3
    local -a worker=(/bin/bash "$SCRIPT_DIR/pbs_microbead_multinode.sh" --worker "$index"
        "$env_file")
    case $LAUNCHER in
        pbsdsh) pbsdsh -h "$host" -- "${worker[@]}" ;;
        ssh) ssh -o BatchMode=yes "$host" "${worker[@]}" ;;
        local) "${worker[@]}" ;;
        *) mb_die "LAUNCHER must be pbsdsh, ssh or local, got '$LAUNCHER'" ;;
    esac
}

mn_main() {
    mb_setup
    mb_start_log
    LAUNCHER=${LAUNCHER:-pbsdsh}
    MW_PORT=${MW_PORT:-29500}
    MW_PORT_STEP=${MW_PORT_STEP:-0}
    NODEFILE=${NODEFILE:-${PBS_NODEFILE:-}}
    mb_print_settings
    [[ -n $NODEFILE && -f $NODEFILE ]] ||
        mb_die "no node file: run under PBS (PBS_NODEFILE) or set NODEFILE=hosts.txt"
    if [[ $LAUNCHER != local ]]; then
        command -v "$LAUNCHER" >/dev/null 2>&1 || mb_die "LAUNCHER=$LAUNCHER: command not found"
    fi
    mb_checks
    # The node file lives on the first node only: workers read this copy (shared folder).
    mb_py "$SCRIPT_DIR/hpc_tools.py" hosts --nodefile "$NODEFILE" >"$STAGING/hosts.txt" ||
        mb_die "cannot read the node file $NODEFILE"
    local -a hosts=()
    mapfile -t hosts <"$STAGING/hosts.txt"
    mb_log "${#hosts[@]} worker(s) on: ${hosts[*]} (port $MW_PORT, step $MW_PORT_STEP," \
        "launcher $LAUNCHER)"
    mb_plan_run
    local env_file="$STAGING/worker_env.sh"
    local var
    for var in "${MN_SHARED_VARS[@]}"; do
        if [[ -v $var ]]; then declare -p "$var"; fi
    done >"$env_file"

    local i rc failed=0
    local -a pids=()
    for i in "${!hosts[@]}"; do
        mn_launch "$i" "${hosts[i]}" "$env_file" &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" || true
    done
    # Exit codes come from files: pbsdsh does not reliably return its task's status.
    for i in "${!hosts[@]}"; do
        rc=$(cat "$STAGING/worker_$i.rc" 2>/dev/null || echo "none")
        if [[ $rc != 0 ]]; then
            failed=1
            mb_error "worker $i on ${hosts[i]} failed (exit code $rc); last lines of its log:"
            tail -n 20 "$STAGING/worker_$i.log" 2>/dev/null || true
        fi
    done
    MB_RC=$failed
    mb_collect_run_dir "$STAGING/worker_0.log"
    if [[ -n $RUN_DIR ]]; then
        mkdir -p "$RUN_DIR/multinode_logs"
        cp "$STAGING"/worker_*.log "$STAGING/hosts.txt" "$RUN_DIR/multinode_logs/" 2>/dev/null ||
            true
    fi
    ((failed == 0)) || mb_die "multi-worker training failed; see the worker logs above"
    mb_post_run
    mb_log "done: $RUN_DIR"
}

# One worker: TF_CONFIG for this index, then the trainer with --strategy multiworker. Only the
# chief (index 0) writes the run folder and the run-dir file.
mn_worker() {
    local index=$1 output resume="" dir_file=""
    cd "$PBS_O_WORKDIR"
    mb_export PYTHONNOUSERSITE 1
    mb_export PYTHONUNBUFFERED 1
    mb_export TF_CPP_MIN_LOG_LEVEL "${TF_CPP_MIN_LOG_LEVEL:-2}"
    mb_export KERAS_BACKEND tensorflow
    mb_export MPLBACKEND Agg
    local log="$STAGING/worker_$index.log"
    local cluster_json
    cluster_json=$(mb_py "$SCRIPT_DIR/hpc_tools.py" tf-config --nodefile "$STAGING/hosts.txt" \
        --index "$index" --port "$MW_PORT" --port_step "$MW_PORT_STEP")
    mb_export TF_CONFIG "$cluster_json"
    if ((index == 0)); then
        output=$OUTPUT_DIR
        resume=$RESUME_DIR
        dir_file=$RUN_DIR_FILE
    else
        output="$STAGING/worker_$index"
        mkdir -p "$output"
        if [[ -n $RESUME_DIR ]]; then
            # Same starting point as the chief, without writing into the chief's folder.
            resume="$output/$(basename "$RESUME_DIR")"
            cp -a "$RESUME_DIR" "$resume"
        fi
    fi
    mb_train_cmd "$output" "$resume" "$dir_file" --strategy multiworker
    mb_log "worker $index on $(hostname): TF_CONFIG=$cluster_json"
    mb_log "worker $index: ${MB_TRAIN_CMD[*]}"
    if ((index == 0)); then
        mb_run_logged "$log" "${MB_TRAIN_CMD[@]}"
    else
        set +e
        mb_container "${MB_TRAIN_CMD[@]}" >"$log" 2>&1
        MB_RC=$?
        set -e
    fi
    echo "$MB_RC" >"$STAGING/worker_$index.rc"
    return "$MB_RC"
}

if [[ ${1:-} == --worker ]]; then
    (($# == 3)) || mb_die "usage: $0 --worker INDEX ENV_FILE"
    # shellcheck source=/dev/null
    source "$3"
    mn_worker "$2"
else
    mn_main
fi

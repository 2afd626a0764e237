#!/bin/bash
#PBS -N Microbead_Optimized_Training
#PBS -l walltime=12:00:00
#PBS -l select=1:ncpus=36:ngpus=1:mem=240gb
#PBS -j oe
#PBS -S /bin/bash
#
# Train the microbead U-Nets on one GPU node inside the TensorFlow 2.16.1 Singularity image,
# then analyse the run (curves, summary table, best val Jaccard beside the label ceiling).
# Everything lands in the ONE run folder the trainer creates and names; its path comes back
# through --run_dir_file, never from "the newest folder".
#
#   cd /path/to/repo && qsub pbs_microbead_optimized.sh
#   qsub -v EPOCHS=50,MODELS=unet pbs_microbead_optimized.sh
#
# Resubmitting with the same job name (or RUN_KEY) after a walltime kill resumes the run that
# did not finish; once it has finished, the next submission starts a new run folder.
# More than one GPU on the node (-l select=1:...:ngpus=2) -> the trainer uses
# tf.distribute.MirroredStrategy automatically (BATCH_SIZE stays the global batch).
#
# Settings: environment variables (qsub -v NAME=value,...). Empty = the trainer's default.
#   CONTAINER         Singularity image           [$PBS_O_WORKDIR/tensorflow_2.16.1-gpu.sif]
#   DATA_DIR          dataset: images/ + masks/   [$PBS_O_WORKDIR/dataset_microscope]
#   OUTPUT_DIR        parent of the run folders   [$PBS_O_WORKDIR/runs]
#   MODELS            unet,attention_unet,attention_resunet or a subset      [all three]
#                     (with qsub -v write unet+attention_unet: -v splits at commas)
#   EPOCHS            [100]      BATCH_SIZE  global batch [32]
#   FILTERS           base filters [64]      STEPS_PER_EPOCH  [auto]
#   TRAIN_ARGS        extra trainer flags, whitespace-separated (no quoting), e.g.
#                     "--config runs/dataset_analysis/recommended_config.json --lr 3e-4"
#   ALLOW_CPU=1       let a dry run proceed without a GPU                   [0]
#   RUN_KEY           run series name: a resubmission with the same key resumes  [job name]
#   RESUME=0          always start a new run folder                         [1]
#   SCRIPT_DIR        folder holding the Python scripts                     [$PBS_O_WORKDIR]
#   CONTAINER_PYTHON  python inside the image, e.g. a --system-site-packages venv [python3]
#   CONTAINER_RUNTIME singularity or apptainer                              [first found]
#   CONTAINER_MODULE  environment module to load first, e.g. singularity/3.11  []
#   EXTRA_BINDS       more bind mounts, comma-separated src[:dst]           []
#   DATA_CHECK_ARGS   extra flags for analyze_microbead_dataset.py, e.g. "--strict" []
#
# Pre-execution checks (each fails fast with one clear message): scripts present, image
# present, GPU visible (host nvidia-smi and TensorFlow inside the image), dataset present and
# paired (analyze_microbead_dataset.py integrity check), every package of requirements.txt
# importable inside the image with a matching version. Nothing is ever pip-installed.
#
# The other job scripts (pbs_predict_microscope.sh, pbs_microbead_multinode.sh,
# pbs_microbead_array.sh) source this file with MB_LIBRARY_ONLY=1 to reuse its functions.

set -euo pipefail

MB_NAME=${MB_NAME:-train}

mb_log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "$MB_NAME" "$*"; }
mb_warn() { printf '[%s %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$MB_NAME" "$*" >&2; }
mb_error() { printf '[%s %s] ERROR: %s\n' "$(date +%H:%M:%S)" "$MB_NAME" "$*" >&2; }
mb_die() {
    mb_error "$@"
    exit 1
}

# Absolute path without requiring it to exist (no realpath on some login nodes).
mb_abspath() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# Safe file-name fragment: anything but [A-Za-z0-9_.-] becomes "_".
mb_sanitize() { printf '%s' "$1" | tr -c 'A-Za-z0-9_.-' '_'; }

# "1234567.pbs01" -> "1234567", "1234[2].pbs01" -> "1234_2"; no PBS -> "local<pid>".
mb_job_tag() {
    local id=${PBS_JOBID:-local$$}
    id=${id%%.*}
    id=${id//\[/_}
    id=${id//\]/}
    mb_sanitize "$id"
}

# Model list with commas: `qsub -v` splits its argument at commas, so MODELS may also be
# written unet+attention_unet (or with ':' or spaces).
mb_models() {
    local m=${1//[+: ]/,}
    printf '%s\n' "$m"
}

# Export for the host and for a container started with --cleanenv.
mb_export() {
    export "$1=$2" "SINGULARITYENV_$1=$2" "APPTAINERENV_$1=$2"
}

# Settings -> absolute paths and defaults. Sets STAGING, a per-attempt folder inside
# OUTPUT_DIR for what exists before the run folder does (job log, dataset check).
mb_setup() {
    : "${PBS_O_WORKDIR:=$PWD}"
    cd "$PBS_O_WORKDIR"
    SCRIPT_DIR=$(mb_abspath "${SCRIPT_DIR:-$PBS_O_WORKDIR}")
    CONTAINER=$(mb_abspath "${CONTAINER:-$PBS_O_WORKDIR/tensorflow_2.16.1-gpu.sif}")
    DATA_DIR=$(mb_abspath "${DATA_DIR:-$PBS_O_WORKDIR/dataset_microscope}")
    OUTPUT_DIR=$(mb_abspath "${OUTPUT_DIR:-$PBS_O_WORKDIR/runs}")
    MODELS=$(mb_models "${MODELS:-}")
    EPOCHS=${EPOCHS:-}
    BATCH_SIZE=${BATCH_SIZE:-}
    FILTERS=${FILTERS:-}
    STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-}
    TRAIN_ARGS=${TRAIN_ARGS:-}
    DATA_CHECK_ARGS=${DATA_CHECK_ARGS:-}
    ALLOW_CPU=${ALLOW_CPU:-0}
    RESUME=${RESUME:-1}
    CONTAINER_PYTHON=${CONTAINER_PYTHON:-python3}
    RUN_KEY=$(mb_sanitize "${RUN_KEY:-${PBS_JOBNAME:-microbead}}")
    JOB_TAG=$(mb_job_tag)
    RUN_DIR=""
    MB_FINAL_DIR=""  # where the job log and dataset check end up (the run folder)
    mkdir -p "$OUTPUT_DIR"
    STAGING="$OUTPUT_DIR/.staging_${RUN_KEY}_${JOB_TAG}"
    mkdir -p "$STAGING"
    # ~/.local packages from an old `pip install --user` must not shadow the image's.
    mb_export PYTHONNOUSERSITE 1
    mb_export PYTHONUNBUFFERED 1
    mb_export TF_CPP_MIN_LOG_LEVEL "${TF_CPP_MIN_LOG_LEVEL:-2}"
    mb_export KERAS_BACKEND tensorflow
    mb_export MPLBACKEND Agg
}

# Copy everything printed from here on into STAGING/pbs_job_<tag>.log (copied into
# MB_FINAL_DIR, the run folder, at exit), and finalise on every exit path.
mb_start_log() {
    MB_JOB_LOG="$STAGING/pbs_job_${JOB_TAG}.log"
    exec 3>&1 4>&2
    # tee ignores SIGTERM so that, at a walltime kill (PBS signals every process of the job),
    # it is still there to record the last lines; it ends when the script closes its output.
    exec > >(
        trap '' TERM
        exec tee -a "$MB_JOB_LOG"
    ) 2>&1
    MB_TEE_PID=${!:-}  # bash < 4.4 does not report the process substitution's pid
    trap mb_finalize EXIT
    trap mb_on_term TERM
}

mb_on_term() {
    mb_warn "received SIGTERM (walltime reached or qdel); submit the same job again to resume"
    exit 143
}

mb_stop_log() {
    [[ -n ${MB_JOB_LOG:-} && -e /dev/fd/3 ]] || return 0
    exec 1>&3 2>&4 3>&- 4>&-
    if [[ -n ${MB_TEE_PID:-} ]]; then
        wait "$MB_TEE_PID" 2>/dev/null || true
    else
        sleep 1  # let tee drain what it has read
    fi
}

mb_finalize() {
    local rc=$?
    trap - EXIT TERM
    local dest=${MB_FINAL_DIR:-}
    if [[ -z $dest && -s ${RUN_DIR_FILE:-} ]]; then
        # Killed during training: the trainer has already named its folder.
        dest=$(head -n 1 "$RUN_DIR_FILE")
    fi
    if [[ -n $dest && -d $dest && -d ${STAGING:-} ]]; then
        if [[ -d $STAGING/dataset_check ]]; then
            rm -rf "$dest/dataset_check"
            mv "$STAGING/dataset_check" "$dest/dataset_check"
        fi
        mb_log "exit code $rc; job log: $dest/$(basename "${MB_JOB_LOG:-pbs_job.log}")"
        mb_stop_log
        if [[ -f ${MB_JOB_LOG:-} ]]; then cp "$MB_JOB_LOG" "$dest/"; fi
        rm -rf "$STAGING"
    elif [[ -d ${STAGING:-} ]]; then
        mb_log "exit code $rc; no output folder was created; logs kept in $STAGING"
        mb_stop_log
    fi
    exit "$rc"
}

mb_find_runtime() {
    if [[ -n ${CONTAINER_MODULE:-} ]] && type module >/dev/null 2>&1; then
        module load "$CONTAINER_MODULE"
    fi
    if [[ -z ${CONTAINER_RUNTIME:-} ]]; then
        CONTAINER_RUNTIME=$(command -v singularity || command -v apptainer || true)
    fi
    [[ -n $CONTAINER_RUNTIME ]] || mb_die "neither singularity nor apptainer is on PATH" \
        "(set CONTAINER_MODULE=<module> to load one, or CONTAINER_RUNTIME=/path/to/it)"
    MB_BINDS=(-B "$SCRIPT_DIR" -B "$DATA_DIR" -B "$OUTPUT_DIR")
    local b
    local -a extra=()
    IFS=, read -r -a extra <<<"${EXTRA_BINDS:-}"
    for b in ${extra[@]+"${extra[@]}"}; do
        if [[ -n $b ]]; then MB_BINDS+=(-B "$b"); fi
    done
}

# Run a command inside the image, GPU visible, job folders bound at the same paths.
mb_container() {
    "$CONTAINER_RUNTIME" exec --nv "${MB_BINDS[@]}" "$CONTAINER" "$@"
}

mb_py() { mb_container "$CONTAINER_PYTHON" "$@"; }

mb_print_settings() {
    mb_log "host $(hostname), job ${PBS_JOBID:-none} (tag $JOB_TAG), run key $RUN_KEY"
    mb_log "scripts   $SCRIPT_DIR"
    mb_log "container $CONTAINER"
    mb_log "data      $DATA_DIR"
    mb_log "output    $OUTPUT_DIR"
    mb_log "models=${MODELS:-default} epochs=${EPOCHS:-default} batch=${BATCH_SIZE:-default}" \
        "filters=${FILTERS:-default} steps=${STEPS_PER_EPOCH:-default} extra='$TRAIN_ARGS'"
}

# Arguments: the scripts this job runs (besides the shared modules).
mb_check_files() {
    local f missing=()
    for f in "$@" microbead_io.py microbead_metrics.py models.py hpc_tools.py requirements.txt
    do
        [[ -f $SCRIPT_DIR/$f ]] || missing+=("$f")
    done
    ((${#missing[@]} == 0)) || mb_die "missing in SCRIPT_DIR=$SCRIPT_DIR: ${missing[*]}" \
        "(submit from the repository folder or set SCRIPT_DIR)"
    [[ -e $CONTAINER ]] || mb_die "container image not found: $CONTAINER" \
        "(set CONTAINER=/path/to/tensorflow_2.16.1-gpu.sif)"
    mb_log "scripts and container image present"
}

mb_check_host_gpu() {
    local out rc=0
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        [[ $ALLOW_CPU == 1 ]] || mb_die "nvidia-smi not found: this node has no GPU driver" \
            "(request one with -l select=...:ngpus=1; ALLOW_CPU=1 only for a dry run)"
        mb_warn "nvidia-smi not found; continuing on CPU (ALLOW_CPU=1)"
        return 0
    fi
    out=$(nvidia-smi --query-gpu=index,name,memory.total,driver_version \
        --format=csv,noheader 2>&1) || rc=$?
    if ((rc != 0)); then
        [[ $ALLOW_CPU == 1 ]] || mb_die "nvidia-smi failed (exit $rc): $out"
        mb_warn "nvidia-smi failed (exit $rc); continuing on CPU (ALLOW_CPU=1)"
        return 0
    fi
    mb_log "GPU(s) on the host:"
    printf '    %s\n' "$out"
}

mb_check_data() {
    [[ -d $DATA_DIR/images && -d $DATA_DIR/masks ]] ||
        mb_die "dataset not found: expected $DATA_DIR/images and $DATA_DIR/masks (set DATA_DIR)"
    local rc=0
    local -a extra=()
    read -r -a extra <<<"$DATA_CHECK_ARGS"
    mb_log "dataset check (integrity, pairing) -> $STAGING/dataset_check"
    mb_py "$SCRIPT_DIR/analyze_microbead_dataset.py" --data_dir "$DATA_DIR" \
        --output_dir "$STAGING/dataset_check" --no_progress ${extra[@]+"${extra[@]}"} || rc=$?
    ((rc == 0)) || mb_die "dataset check failed (exit $rc): problems in $DATA_DIR are listed" \
        "above and in $STAGING/dataset_check/integrity_problems.csv"
}

mb_check_packages() {
    local gpu=require rc=0
    [[ $ALLOW_CPU == 1 ]] && gpu=warn
    mb_log "packages and GPU inside the container:"
    mb_py "$SCRIPT_DIR/hpc_tools.py" check-env --requirements "$SCRIPT_DIR/requirements.txt" \
        --gpu "$gpu" || rc=$?
    ((rc == 0)) || mb_die "container check failed (exit $rc); see the messages above"
}

mb_checks() {
    mb_check_files train_microbead_optimized.py analyze_microbead_dataset.py \
        plot_training_curves.py
    mb_find_runtime
    mb_check_host_gpu
    mb_check_data
    mb_check_packages
}

# Decide between a new run and resuming the last one of this RUN_KEY. Sets RUN_DIR_FILE
# (the file the trainer writes its run folder to) and RESUME_DIR ('' = new run).
mb_plan_run() {
    RUN_DIR_FILE="$OUTPUT_DIR/${RUN_KEY}.run_dir"
    RESUME_DIR=""
    [[ -s $RUN_DIR_FILE ]] || return 0
    local previous state
    previous=$(head -n 1 "$RUN_DIR_FILE")
    state=$(mb_py "$SCRIPT_DIR/hpc_tools.py" run-status "$previous" | tail -n 1) ||
        mb_die "cannot read the state of the previous run $previous"
    if [[ $state == unfinished && $RESUME == 1 ]]; then
        RESUME_DIR=$previous
        mb_log "resuming the unfinished run $RESUME_DIR (RESUME=0 starts a new one)"
    else
        mb_log "previous run $previous is $state; starting a new run"
        # A crash before the trainer writes the new path must not leave the old one here.
        mv "$RUN_DIR_FILE" "$RUN_DIR_FILE.previous"
    fi
}

# Trainer command line -> MB_TRAIN_CMD. Arguments: output dir, resume dir ('' = new run),
# run-dir file ('' = none), then extra trainer flags.
mb_train_cmd() {
    local output=$1 resume=$2 run_dir_file=$3
    shift 3
    MB_TRAIN_CMD=("$CONTAINER_PYTHON" "$SCRIPT_DIR/train_microbead_optimized.py" --verbose 2)
    [[ -z $run_dir_file ]] || MB_TRAIN_CMD+=(--run_dir_file "$run_dir_file")
    if [[ -n $resume ]]; then
        # The run's config.json restores every setting; --epochs and --max_minutes may
        # change, any other flag given again (TRAIN_ARGS) must equal its saved value.
        MB_TRAIN_CMD+=(--resume "$resume")
        [[ -z $EPOCHS ]] || MB_TRAIN_CMD+=(--epochs "$EPOCHS")
    else
        MB_TRAIN_CMD+=(--data_dir "$DATA_DIR" --output_dir "$output")
        [[ -z $MODELS ]] || MB_TRAIN_CMD+=(--models "$MODELS")
        [[ -z $EPOCHS ]] || MB_TRAIN_CMD+=(--epochs "$EPOCHS")
        [[ -z $BATCH_SIZE ]] || MB_TRAIN_CMD+=(--batch_size "$BATCH_SIZE")
        [[ -z $FILTERS ]] || MB_TRAIN_CMD+=(--filters "$FILTERS")
        [[ -z $STEPS_PER_EPOCH ]] || MB_TRAIN_CMD+=(--steps_per_epoch "$STEPS_PER_EPOCH")
    fi
    local -a extra=()
    read -r -a extra <<<"$TRAIN_ARGS"
    MB_TRAIN_CMD+=(${extra[@]+"${extra[@]}"} "$@")
}

# Run a command in the container, output to the terminal and LOGFILE; MB_RC = its exit code
# (PIPESTATUS: the exit code of tee would hide a crash).
mb_run_logged() {
    local logfile=$1
    shift
    set +e
    mb_container "$@" 2>&1 | tee "$logfile"
    local -a status=("${PIPESTATUS[@]}")
    set -e
    MB_RC=${status[0]}
}

# RUN_DIR from the run-dir file the trainer wrote (cross-checked with its RUN_DIR= line).
mb_collect_run_dir() {
    local logfile=$1 printed
    RUN_DIR=""
    if [[ -s $RUN_DIR_FILE ]]; then RUN_DIR=$(head -n 1 "$RUN_DIR_FILE"); fi
    [[ -n $RUN_DIR ]] && MB_FINAL_DIR=$RUN_DIR
    ((MB_RC == 0)) || return 0
    [[ -n $RUN_DIR && -d $RUN_DIR ]] ||
        mb_die "training exited 0 but did not report its run folder in $RUN_DIR_FILE"
    printed=$(sed -n 's/^RUN_DIR=//p' "$logfile" | tail -n 1)
    [[ $printed == "$RUN_DIR" ]] ||
        mb_warn "trainer printed RUN_DIR=$printed but wrote $RUN_DIR; using the latter"
    mb_log "run folder: $RUN_DIR"
}

# Train (or resume) into the run folder the trainer names. Sets RUN_DIR and TRAIN_RC.
mb_train() {
    mb_plan_run
    mb_train_cmd "$OUTPUT_DIR" "$RESUME_DIR" "$RUN_DIR_FILE"
    mb_log "training: ${MB_TRAIN_CMD[*]}"
    mb_run_logged "$STAGING/train_output.log" "${MB_TRAIN_CMD[@]}"
    TRAIN_RC=$MB_RC
    mb_collect_run_dir "$STAGING/train_output.log"
    if ((TRAIN_RC != 0)); then
        mb_error "training FAILED with exit code $TRAIN_RC (run folder: ${RUN_DIR:-none});" \
            "the error is printed above${RUN_DIR:+ and in $RUN_DIR/training_console.log}"
    fi
}

# Curves + report into RUN_DIR/training_analysis, summary table into RUN_DIR/pbs_summary.txt.
mb_post_run() {
    local rc=0
    mb_log "training curves -> $RUN_DIR/training_analysis"
    # --overwrite: a resubmitted job redraws the figures (only the plotter's own files).
    mb_py "$SCRIPT_DIR/plot_training_curves.py" "$RUN_DIR" \
        --output_dir "$RUN_DIR/training_analysis" --overwrite || rc=$?
    ((rc == 0)) || mb_die "plot_training_curves.py failed (exit $rc); the trained models in" \
        "$RUN_DIR are intact"
    mb_log "summary:"
    mb_py "$SCRIPT_DIR/hpc_tools.py" summary "$RUN_DIR" --out "$RUN_DIR/pbs_summary.txt" ||
        rc=$?
    ((rc == 0)) || mb_die "summary failed (exit $rc)"
}

mb_main() {
    mb_setup
    mb_start_log
    mb_print_settings
    mb_checks
    mb_train
    ((TRAIN_RC == 0)) || exit "$TRAIN_RC"
    mb_post_run
    mb_log "done: $RUN_DIR"
}

if [[ ${MB_LIBRARY_ONLY:-0} != 1 ]]; then
    mb_main
fi

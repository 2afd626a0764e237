#!/bin/bash
#PBS -N Microbead_Array
#PBS -J 0-2
#PBS -l walltime=12:00:00
#PBS -l select=1:ncpus=12:ngpus=1:mem=80gb
#PBS -j oe
#PBS -S /bin/bash
#
# Job array: train the models in parallel, one GPU each (subjob i trains the i-th model of
# MODELS), then merge their summaries. Each subjob is a complete single-GPU training job
# (same checks, resume and post-run analysis as pbs_microbead_optimized.sh, whose settings
# apply; read its header) with its own run folder, keyed RUN_KEY_<model> so that
# resubmitting the array resumes each unfinished model.
#
#   qsub pbs_microbead_array.sh                      # PBS Pro: 3 subjobs, -J 0-2
#   qsub -J 0-1 -v MODELS=unet+attention_unet pbs_microbead_array.sh
#   Torque: qsub -t 0-2 pbs_microbead_array.sh       (PBS_ARRAYID)
#
# Every subjob that finishes merges the summaries of the subjobs finished so far into
# OUTPUT_DIR/<RUN_KEY>_array_<array job number>/ (training_summary.csv with a run_dir column,
# run_dirs.txt); the last one also plots all runs together into training_analysis/ there.
# Extra settings (environment variables):
#   MODELS        models, one per subjob, in index order [unet,attention_unet,attention_resunet]
#   ARRAY_INDEX   subjob index when run outside PBS (tests, debugging)       []
#   ARRAY_TAG     name of the merge folder's suffix        [array job number, or "local"]

set -euo pipefail

# shellcheck disable=SC2034  # read by the functions of pbs_microbead_optimized.sh
MB_NAME=array
: "${PBS_O_WORKDIR:=$PWD}"
# shellcheck source=/dev/null
MB_LIBRARY_ONLY=1 source "${SCRIPT_DIR:-$PBS_O_WORKDIR}/pbs_microbead_optimized.sh"

AR_DEFAULT_MODELS=unet,attention_unet,attention_resunet

# "1234[2].server" -> "1234"; no PBS -> "local".
ar_array_tag() {
    local id=${PBS_ARRAY_ID:-${PBS_JOBID:-local}}
    id=${id%%\[*}
    mb_sanitize "${id%%.*}"
}

# Merge the summaries of every subjob registered in MERGE_DIR; plot them all once complete.
ar_merge() {
    local merge_dir=$1 n_models=$2 f rc=0
    local -a run_dirs=()
    for f in "$merge_dir"/subjob_*.run_dir; do
        [[ -s $f ]] && run_dirs+=("$(head -n 1 "$f")")
    done
    mb_log "merging ${#run_dirs[@]} of $n_models finished subjob(s) -> $merge_dir"
    # --overwrite: the folder also holds the subjob registry; only the merged table is replaced.
    mb_py "$SCRIPT_DIR/hpc_tools.py" merge-summaries --output_dir "$merge_dir" --overwrite \
        --expect "$n_models" --allow_missing "${run_dirs[@]}" || rc=$?
    ((rc == 0)) || mb_die "merging the summaries failed (exit $rc)"
    if ((${#run_dirs[@]} == n_models)); then
        mb_log "all $n_models subjobs finished: comparison plots -> $merge_dir/training_analysis"
        mb_py "$SCRIPT_DIR/plot_training_curves.py" "${run_dirs[@]}" \
            --output_dir "$merge_dir/training_analysis" --overwrite || rc=$?
        ((rc == 0)) || mb_die "plot_training_curves.py failed on the merged runs (exit $rc)"
    fi
}

ar_main() {
    local index=${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-${ARRAY_INDEX:-}}}
    [[ $index =~ ^[0-9]+$ ]] || mb_die "no array index: submit with qsub -J 0-2 (PBS Pro) or" \
        "qsub -t 0-2 (Torque), or set ARRAY_INDEX for a run outside PBS"
    local -a models=()
    IFS=, read -r -a models <<<"$(mb_models "${MODELS:-$AR_DEFAULT_MODELS}")"
    ((index < ${#models[@]})) || mb_die "array index $index is out of range:" \
        "MODELS has ${#models[@]} model(s) (${models[*]}); submit with -J 0-$((${#models[@]} - 1))"
    local model=${models[index]} base
    base=$(mb_sanitize "${RUN_KEY:-${PBS_JOBNAME:-microbead}}")
    RUN_KEY="${base}_${model}"
    MODELS=$model
    mb_setup
    mb_start_log
    mb_log "subjob $index of ${#models[@]}: model $model"
    mb_print_settings
    mb_checks
    mb_train
    ((TRAIN_RC == 0)) || exit "$TRAIN_RC"
    mb_post_run

    local merge_dir
    merge_dir="$OUTPUT_DIR/${base}_array_$(mb_sanitize "${ARRAY_TAG:-$(ar_array_tag)}")"
    mkdir -p "$merge_dir"
    printf '%s\n' "$RUN_DIR" >"$merge_dir/subjob_${index}.run_dir"
    if command -v flock >/dev/null 2>&1; then
        # Subjobs finishing together must not overwrite each other's merge.
        (
            flock 9
            ar_merge "$merge_dir" "${#models[@]}"
        ) 9>"$merge_dir/.merge.lock"
    else
        ar_merge "$merge_dir" "${#models[@]}"
    fi
    mb_log "done: $RUN_DIR (merged: $merge_dir)"
}

ar_main

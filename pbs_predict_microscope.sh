#!/bin/bash
#PBS -N Microbead_Predict
#PBS -l walltime=02:00:00
#PBS -l select=1:ncpus=8:ngpus=1:mem=64gb
#PBS -j oe
#PBS -S /bin/bash
#
# Predict bead masks and counts on new microscope frames with a trained run, as a second,
# smaller job (predict_microscope.py inside the same Singularity image); optionally evaluate
# against ground-truth masks. Preprocessing comes from the run's config.json.
#
#   qsub -v INPUT_DIR=/scratch/me/new_frames pbs_predict_microscope.sh
#   qsub -v INPUT_DIR=new_frames,MODEL=attention_unet,GT_DIR=new_frames_masks \
#        pbs_predict_microscope.sh
#
# Settings (environment variables), defaults in brackets; CONTAINER, OUTPUT_DIR, SCRIPT_DIR,
# ALLOW_CPU, CONTAINER_PYTHON, CONTAINER_RUNTIME, CONTAINER_MODULE and EXTRA_BINDS as in
# pbs_microbead_optimized.sh.
#   INPUT_DIR      folder of images to predict                                   (required)
#   RUN_DIR        training run folder   [the last run of TRAIN_RUN_KEY, from OUTPUT_DIR]
#   TRAIN_RUN_KEY  job name / RUN_KEY of the training job     [Microbead_Optimized_Training]
#   MODEL          unet, attention_unet or attention_resunet -> RUN_DIR/best_<MODEL>_model.hdf5
#                  [the model with the best validation Jaccard in the run's summary]
#   PRED_DIR       output folder, must be new or empty
#                  [RUN_DIR/predictions_<input folder name>_<job id>]
#   GT_DIR         ground-truth masks: also run evaluate_predictions.py -> PRED_DIR/evaluation []
#   PREDICT_ARGS   extra predict_microscope.py flags, e.g. "--tta --save_prob"  []

set -euo pipefail

# shellcheck disable=SC2034  # read by the functions of pbs_microbead_optimized.sh
MB_NAME=predict
: "${PBS_O_WORKDIR:=$PWD}"
# shellcheck source=/dev/null
MB_LIBRARY_ONLY=1 source "${SCRIPT_DIR:-$PBS_O_WORKDIR}/pbs_microbead_optimized.sh"

pr_main() {
    local requested_run=${RUN_DIR:-}  # mb_setup clears RUN_DIR
    mb_setup
    mb_start_log
    [[ -n ${INPUT_DIR:-} ]] ||
        mb_die "set INPUT_DIR: qsub -v INPUT_DIR=/path/to/images pbs_predict_microscope.sh"
    INPUT_DIR=$(mb_abspath "$INPUT_DIR")
    [[ -d $INPUT_DIR ]] || mb_die "INPUT_DIR not found: $INPUT_DIR"
    # shellcheck disable=SC2034  # bound into the container by mb_find_runtime
    DATA_DIR=$INPUT_DIR
    local key run_dir_file
    key=$(mb_sanitize "${TRAIN_RUN_KEY:-Microbead_Optimized_Training}")
    run_dir_file="$OUTPUT_DIR/$key.run_dir"
    RUN_DIR=$requested_run
    if [[ -z $RUN_DIR && -s $run_dir_file ]]; then RUN_DIR=$(head -n 1 "$run_dir_file"); fi
    [[ -n $RUN_DIR ]] || mb_die "no training run: set RUN_DIR=runs/microbead_training_..." \
        "(or TRAIN_RUN_KEY to the training job's name; $run_dir_file not found)"
    RUN_DIR=$(mb_abspath "$RUN_DIR")
    [[ -f $RUN_DIR/config.json ]] || mb_die "$RUN_DIR/config.json not found: not a training run"
    local model_arg=$RUN_DIR
    if [[ -n ${MODEL:-} ]]; then
        model_arg="$RUN_DIR/best_${MODEL}_model.hdf5"
        [[ -f $model_arg ]] || mb_die "model not found: $model_arg (MODEL=$MODEL)"
    fi
    local default_pred
    default_pred="$RUN_DIR/predictions_$(mb_sanitize "$(basename "$INPUT_DIR")")_$JOB_TAG"
    PRED_DIR=$(mb_abspath "${PRED_DIR:-$default_pred}")
    if [[ -d $PRED_DIR && -n $(ls -A "$PRED_DIR") ]]; then
        mb_die "PRED_DIR $PRED_DIR exists and is not empty; choose another (nothing overwritten)"
    fi
    mkdir -p "$PRED_DIR"
    # shellcheck disable=SC2034  # mb_finalize copies the job log there
    MB_FINAL_DIR=$PRED_DIR
    mb_log "model     $model_arg"
    mb_log "images    $INPUT_DIR"
    mb_log "output    $PRED_DIR"

    local -a scripts=(predict_microscope.py)
    [[ -z ${GT_DIR:-} ]] || scripts+=(evaluate_predictions.py)
    mb_check_files "${scripts[@]}"
    mb_find_runtime
    MB_BINDS+=(-B "$RUN_DIR" -B "$PRED_DIR")
    if [[ -n ${GT_DIR:-} ]]; then
        GT_DIR=$(mb_abspath "$GT_DIR")
        [[ -d $GT_DIR ]] || mb_die "GT_DIR not found: $GT_DIR"
        MB_BINDS+=(-B "$GT_DIR")
    fi
    mb_check_host_gpu
    mb_check_packages

    local -a extra=()
    read -r -a extra <<<"${PREDICT_ARGS:-}"
    local -a cmd=("$CONTAINER_PYTHON" "$SCRIPT_DIR/predict_microscope.py" --model "$model_arg"
        --input_dir "$INPUT_DIR" --output_dir "$PRED_DIR" ${extra[@]+"${extra[@]}"})
    mb_log "prediction: ${cmd[*]}"
    mb_run_logged "$STAGING/predict_output.log" "${cmd[@]}"
    ((MB_RC == 0)) || mb_die "prediction FAILED with exit code $MB_RC; the error is printed" \
        "above and in $PRED_DIR/prediction.log"
    if [[ -n ${GT_DIR:-} ]]; then
        mb_log "evaluation against $GT_DIR -> $PRED_DIR/evaluation"
        mb_run_logged "$STAGING/evaluate_output.log" "$CONTAINER_PYTHON" \
            "$SCRIPT_DIR/evaluate_predictions.py" --pred_dir "$PRED_DIR" --gt_dir "$GT_DIR" \
            --output_dir "$PRED_DIR/evaluation" --no_progress
        ((MB_RC == 0)) || mb_die "evaluation FAILED with exit code $MB_RC (predictions kept)"
    fi
    if [[ -f $PRED_DIR/prediction_summary.txt ]]; then cat "$PRED_DIR/prediction_summary.txt"; fi
    mb_log "done: $PRED_DIR"
}

pr_main

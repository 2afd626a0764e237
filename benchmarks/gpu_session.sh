#!/usr/bin/env bash
# Issue 19: the one prepared command of a GPU session (H200: JAX + PyTorch, no TensorFlow,
# no network). Runs benchmarks/bench_train_gpu.py under KERAS_BACKEND=jax:
#   1. throughput: 64-filter models, batch 32, bf16 / fp32, 256 / 512 px, in-memory vs the
#      NumPy input pipeline (16 threads), in priority order, each in its own process;
#   2. recipe: the trainer's default recipe (all three models), then --preset cpu (U-Net),
#      20 epochs x 50 steps each on the generated set: val Jaccard curves, s/epoch with
#      checkpoints, then bead counts on two 3840x2160 frames;
#   3. variants, if time is left: batch 64, and steps_per_execution 4, for the bf16 U-Net.
# Every phase writes its JSON after each configuration, so a phase cut short keeps its rows.
# Budget (BUDGET_S, default 540 s of a 600 s call): ~25 % throughput (the first 3-4
# configurations), the rest for the recipes, whose per-model --max_minutes the benchmark sets
# from the time left (epochs_run in the JSON shows a cut); the variants only if time is left.
#
# Prepare here (CPU machine), once, in the repo root. Keras and its two missing dependencies
# travel as wheels (2.9 MB); everything else the benchmark imports is on the device (jax 0.11.2
# with CUDA, numpy, scipy, scikit-image, scikit-learn, opencv-python-headless, h5py, tifffile,
# tqdm, matplotlib, absl-py, rich, ml-dtypes, packaging, typing-extensions):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
# Then one device call: command "bash benchmarks/gpu_session.sh", carry [".whl"],
# timeout_s 600. Copy the JSON files it returns into benchmarks/results/.
#
# Outputs in $OUT (at most 8 files come back): session.log, env.txt,
#   bench_train_gpu_h200.json (throughput), bench_train_gpu_recipe_default_h200.json,
#   bench_train_gpu_recipe_cpu_h200.json, bench_train_gpu_b64_h200.json,
#   bench_train_gpu_spe4_h200.json (variants).
# Knobs (environment): BUDGET_S (seconds for the whole script, default 540), PHASES (default
#   "throughput recipe variants"; e.g. PHASES=recipe to redo one phase), RECIPE_MODELS
#   (default recipe's models, default all three: the microscope-style tiles are 512 px, so
#   with three models the per-model time cap may end the curves before epoch 20; "unet"
#   gives one complete curve), PYTHON (python3),
#   TINY=1 (8 filters, 64 px, a few steps: a CPU dry run of this script's logic).
set -uo pipefail

OUT=${OUT:-/tmp/gpu_session_out}
BUDGET_S=${BUDGET_S:-540}
PHASES=${PHASES:-throughput recipe variants}
PYTHON=${PYTHON:-python3}
TINY=${TINY:-0}
DATA=${DATA:-/tmp/bench_train_gpu_data}
WORK=${WORK:-/tmp/bench_train_gpu_work}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/session.log") 2>&1
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
has_phase() { [[ " $PHASES " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 MPLBACKEND=Agg

{
    date -Is
    nvidia-smi -L 2>&1 || true
    nproc
    free -g 2>&1 | head -2
    "$PYTHON" -c 'import jax, keras, numpy, cv2, sklearn, skimage, h5py
print("jax", jax.__version__, jax.devices())
print("keras", keras.__version__, keras.backend.backend(), "numpy", numpy.__version__,
      "cv2", cv2.__version__)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# A Keras that cannot import here would make every phase fail: stop now, cheaply.
"$PYTHON" -c 'import keras, models' || { echo "keras/models import failed"; exit 4; }

if [[ "$TINY" == 1 ]]; then
    GEN=(--n 73 --size 128 --large 1 --large_size 512 288)
    TP=(--filters 8 --steps 3 --rounds 2 --warmup 1 --batch_size 4 --workers 2
        --configs "unet:64:mixed_bfloat16,unet:64:float32")
    RECIPE=(--epochs 2 --steps_per_epoch 2 --train_args "--filters 8 --depth 3 --batch_size 4")
    DEFAULT_MODELS=unet
    VAR=(--filters 8 --steps 3 --rounds 2 --warmup 1 --workers 2 --batch_size 4
         --configs unet:64:mixed_bfloat16)
    B64=(--batch_size 8)
else
    GEN=(--n 73 --large 2)
    TP=(--steps 20 --rounds 3 --warmup 3
        --configs "unet:256:mixed_bfloat16,unet:512:mixed_bfloat16,unet:256:float32,\
attention_unet:256:mixed_bfloat16,attention_resunet:256:mixed_bfloat16,\
attention_unet:512:mixed_bfloat16,attention_resunet:512:mixed_bfloat16,unet:512:float32,\
attention_unet:256:float32,attention_resunet:256:float32")
    RECIPE=(--epochs 20 --steps_per_epoch 50)
    DEFAULT_MODELS=${RECIPE_MODELS:-unet,attention_unet,attention_resunet}
    VAR=(--steps 20 --rounds 3 --warmup 3 --configs unet:256:mixed_bfloat16)
    B64=(--batch_size 64)
fi

# The microscope-like style, where the generator has one (another engineer is adding it).
if "$PYTHON" make_synthetic_dataset.py --help | grep -q -- "--style"; then
    GEN+=(--style microscope)
fi
rm -rf "$DATA"
"$PYTHON" make_synthetic_dataset.py --out "$DATA" "${GEN[@]}" || { echo "data failed"; exit 5; }
BENCH=("$PYTHON" benchmarks/bench_train_gpu.py --data "$DATA" --work "$WORK")

if has_phase throughput; then
    budget=$(( $(left) * 25 / 100 ))
    echo "== throughput: ${budget} s budget, $(left) s left"
    timeout -k 10 $((budget + 90)) "${BENCH[@]}" --isolate --max_seconds "$budget" \
        "${TP[@]}" --out "$OUT/bench_train_gpu_h200.json"
    echo "throughput exit $?"
fi
if has_phase recipe; then
    # --preset cpu (8 filters, U-Net only) needs ~1 min; the default recipe gets the rest.
    budget=$(( $(left) - 75 ))
    echo "== recipe default: ${budget} s budget, $(left) s left"
    timeout -k 10 $((budget + 60)) "${BENCH[@]}" --archs none --recipes default \
        --recipe_models "$DEFAULT_MODELS" --max_seconds "$budget" "${RECIPE[@]}" \
        --out "$OUT/bench_train_gpu_recipe_default_h200.json"
    echo "recipe default exit $?"
    budget=$(( $(left) - 5 ))
    if (( budget > 30 )); then
        echo "== recipe cpu: ${budget} s budget"
        timeout -k 10 $((budget + 30)) "${BENCH[@]}" --archs none --recipes cpu \
            --recipe_models unet --max_seconds "$budget" "${RECIPE[@]}" \
            --out "$OUT/bench_train_gpu_recipe_cpu_h200.json"
        echo "recipe cpu exit $?"
    fi
fi
if has_phase variants && (( $(left) > 45 )); then
    echo "== variants: $(left) s left"
    timeout -k 10 $(( $(left) / 2 + 20 )) "${BENCH[@]}" --max_seconds 1 "${VAR[@]}" \
        "${B64[@]}" --out "$OUT/bench_train_gpu_b64_h200.json"
    echo "batch-64 exit $?"
    if (( $(left) > 30 )); then
        timeout -k 10 $(( $(left) + 10 )) "${BENCH[@]}" --max_seconds 1 "${VAR[@]}" \
            --steps_per_execution 4 --out "$OUT/bench_train_gpu_spe4_h200.json"
        echo "steps-per-execution-4 exit $?"
    fi
fi
echo "== done in $(( $(date +%s) - T0 )) s; files in $OUT:"
ls -la "$OUT"

"""Benchmark: GPU training throughput and the default recipe's convergence (issue 19).

Two parts, both on any Keras backend (TensorFlow, or JAX on a machine without TensorFlow):

1. Throughput (``--archs``, default all three). For each architecture x ``--sizes`` x
   ``--precisions`` the model (``models.build_model``, ``--filters``, dropout 0.3, compiled
   with ``models.compile_model``: Adam 1e-4, ``--loss``) is trained with ``model.fit`` on
   ``--batch_size`` tiles for ``--rounds`` timed epochs of ``--steps`` steps after
   ``--warmup`` untimed steps (tracing / XLA compilation), once per input pipeline:

   - ``in_memory``: batches augmented once beforehand and replayed (only the host-to-device
     copy remains): the cost of the model step alone;
   - ``numpy``: the trainer's own input pipeline (``training_data.make_datasets``: NumPy /
     OpenCV augmentation in a ``keras.utils.PyDataset`` with ``--workers`` threads, the
     same on every backend).

   The first timed epoch is dropped (pipeline fill). Recorded per configuration: images/s
   (median and best epoch), pipeline / in-memory ratio (1.0 = the loader costs nothing),
   the loader alone (images/s with no model), compile seconds, peak accelerator memory,
   FLOPs per training image and the achieved TFLOP/s. FLOPs are counted analytically
   (``2 x H x W x k^2 x C_in x C_out`` per convolution, training = 3 x forward) and, under
   JAX, also by XLA's cost analysis of one image's forward + backward pass.
   ``--isolate`` runs each configuration in its own process, so peak memory is per
   configuration and an out-of-memory error costs one row only.

2. Recipe (``--recipes default,cpu``). Runs ``train_microbead_optimized.py`` itself (all of
   its callbacks, checkpoints, history and summary; in its own process) per recipe on a
   generated dataset for a fixed budget (``--epochs`` x ``--steps_per_epoch``), then
   ``predict_microscope.py`` with each best model on the dataset's full frames
   (``--large_frames``, 3840x2160) and compares the bead counts with the generator's truth.
   Records per model the val Jaccard curve, s/epoch, time to come within 0.02 of the curve's
   best, and a projection of the full (100-epoch) job. The trainer runs unchanged on every
   backend (nothing is patched).

Nothing is asserted; timings depend on the machine. Settings, versions and device names go
into the JSON with the numbers.

Outputs
    A table on stdout and ``benchmarks/results/bench_train_gpu.json`` (``--out``), rewritten
    after every configuration so an interrupted run keeps what it measured.

Example
    KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py --isolate --sizes 256,512 \\
        --precisions float32,mixed_bfloat16 --out /tmp/bench_train_gpu.json
    KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py --archs none --recipes default,cpu \\
        --epochs 20 --steps_per_epoch 50 --out /tmp/recipe.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import inspect
import json
import logging
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import machine_info  # noqa: E402

import microbead_config as mcfg  # noqa: E402
import training_data  # noqa: E402  (imports no Keras: the backend is chosen in main)

log = logging.getLogger("microbead.bench_train_gpu")

ARCHS = ("unet", "attention_unet", "attention_resunet")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
PIPELINES = ("in_memory", "numpy")
RECIPES = ("default", "cpu")
# Shares of a --max_seconds budget: the 64-filter default recipe needs far more than --preset cpu.
RECIPE_WEIGHT = {"default": 3.0, "cpu": 1.0}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_train_gpu.json"
# Issue 19's yardsticks: ~800 TFLOP/s dense bf16 on an H100/H200 (790 measured on the H200
# here), >= 600 images/s for the 64-filter U-Net at 256 px in bf16, loader overhead <= 5 %,
# and the default recipe within 0.02 of its plateau inside its epoch budget.
PEAK_TFLOPS_BF16 = 800.0
TARGETS = {"unet_256_bf16_images_per_s": 600.0, "pipeline_overhead_pct": 5.0,
           "plateau_tolerance": 0.02}
FULL_JOB_EPOCHS = 100  # the trainer's default --epochs (what qsub runs)


# ----------------------------------------------------------------------------- environment


def backend_name() -> str:
    import keras

    return keras.backend.backend()


def environment() -> dict:
    """Machine, backend, versions and devices recorded with the numbers
    (``_common.machine_info`` plus the backend's own facts)."""
    import importlib.util

    import cv2

    env = machine_info(keras_backend=True)
    env["opencv"] = cv2.__version__
    env["tensorflow_importable"] = importlib.util.find_spec("tensorflow") is not None
    env["device"] = env["accelerator"]
    if env["backend"] == "jax":
        import jax

        env["jax"] = jax.__version__
        env["jax_default_backend"] = jax.default_backend()
        env["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
        env["device"] = jax.devices()[0].device_kind
    elif env["backend"] == "tensorflow":
        import tensorflow as tf

        env["tensorflow"] = tf.__version__
    return env


def peak_memory() -> dict:
    """Peak accelerator memory (bytes) of this process so far, and host peak RSS.

    JAX: ``device.memory_stats()['peak_bytes_in_use']`` (a high-water mark for the
    process: use ``--isolate`` for per-configuration values); TensorFlow:
    ``tf.config.experimental.get_memory_info('GPU:0')['peak']``; None on a CPU.
    """
    out = {"device_peak_bytes": None, "device_bytes_limit": None,
           "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    backend = backend_name()
    try:
        if backend == "jax":
            import jax

            stats = [d.memory_stats() for d in jax.devices() if d.platform != "cpu"]
            stats = [s for s in stats if s]
            if stats:
                out["device_peak_bytes"] = int(max(s.get("peak_bytes_in_use", 0)
                                                   for s in stats))
                out["device_bytes_limit"] = int(max(s.get("bytes_limit", 0) for s in stats))
        elif backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                out["device_peak_bytes"] = int(
                    tf.config.experimental.get_memory_info("GPU:0")["peak"])
    except Exception as exc:  # a statistic we cannot read is a None, not a failed benchmark
        log.warning("peak memory unavailable: %s", exc)
    return out


# ----------------------------------------------------------------------------- FLOPs


def conv_flops_per_image(model) -> int:
    """Forward FLOPs of one image counted over the model's Conv2D layers (2 per MAC + bias).

    Needs a model built with a fixed input size. Batch norm, activations, pooling and the
    attention products are element-wise and left out (well under 1 % of the work here).
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            c_in = layer.input.shape[-1]
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * c_in * c_out + (h * w * c_out if layer.use_bias else 0)
    return int(total)


def xla_train_flops_per_image(model, loss_fn, size: int, channels: int = 1) -> float | None:
    """FLOPs of one image's forward + backward pass from XLA's cost analysis (JAX only).

    Lowers (does not compile) ``jax.value_and_grad`` of the loss through
    ``model.stateless_call(..., training=True)`` for a batch of one; the optimizer update
    is not included. Returns None on another backend or if the analysis is unavailable.
    """
    if backend_name() != "jax":
        return None
    try:
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]
        x = jnp.zeros((1, size, size, channels), jnp.float32)
        y = jnp.zeros((1, size, size, 1), jnp.float32)

        def loss(tv, ntv, xb, yb):
            pred, _ = model.stateless_call(tv, ntv, xb, training=True)
            return jnp.mean(loss_fn(yb, pred))

        cost = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, x, y).cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        flops = (cost or {}).get("flops")
        return float(flops) if flops else None
    except Exception as exc:
        log.warning("XLA cost analysis unavailable: %s", exc)
        return None


# ----------------------------------------------------------------------------- timing


def epoch_timer():
    """Keras callback: wall seconds of each epoch, synchronised on the epoch's loss value.

    Reading the loss as a Python float waits for the last step's result, so JAX's
    asynchronous dispatch cannot make an epoch look shorter than it was.
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.wall, self.loss = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.loss.append(float((logs or {}).get("loss", float("nan"))))
            self.wall.append(time.perf_counter() - self._t0)

    return EpochTimer()


def timed_fit(model, dataset, *, steps: int, rounds: int, warmup: int) -> dict:
    """Warm-up fit of ``warmup`` steps, then ``1 + rounds`` epochs of ``steps``; first dropped.

    Returns ``warmup_s`` (includes tracing / compilation the first time), ``epoch_s``
    (timed epochs) and ``losses``.
    """
    t0 = time.perf_counter()
    if warmup:
        model.fit(dataset, epochs=1, steps_per_epoch=warmup, verbose=0, shuffle=False)
    warmup_s = time.perf_counter() - t0
    timer = epoch_timer()
    model.fit(dataset, epochs=1 + rounds, steps_per_epoch=steps, callbacks=[timer], verbose=0,
              shuffle=False)
    return {"warmup_s": round(warmup_s, 3), "first_epoch_s": round(timer.wall[0], 4),
            "epoch_s": [round(t, 4) for t in timer.wall[1:]],
            "losses": [round(v, 5) for v in timer.loss]}


def loader_only_images_per_s(dataset, n_batches: int, workers: int, batch: int) -> float:
    """Images/s the NumPy pipeline produces with ``workers`` threads and no model running."""
    dataset[0]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(dataset.__getitem__, range(1, n_batches + 1)):
            pass
    return n_batches * batch / (time.perf_counter() - t0)


def make_pipeline(kind: str, images, masks, train_idx, aug_args, seed: int, workers: int,
                  prebatched=None):
    """Training dataset of one kind (see the module docstring)."""
    if kind == "in_memory":
        xb, yb = prebatched
        if backend_name() == "tensorflow":
            import tensorflow as tf

            return tf.data.Dataset.from_tensor_slices((xb, yb)).repeat().prefetch(2)
        import keras

        class Replay(keras.utils.PyDataset):
            @property
            def num_batches(self):
                return None

            def __getitem__(self, index):
                return xb[index % len(xb)], yb[index % len(yb)]

        return Replay(workers=1)
    if kind == "numpy":
        return training_data.make_datasets(images, masks, train_idx, train_idx[:1], aug_args,
                                           seed, workers=workers)[0]
    raise ValueError(f"unknown pipeline {kind!r}; choose from {', '.join(PIPELINES)}")


def load_tiles(data_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles and masks of ``data_dir`` resized to ``size`` (area / nearest), normalised."""
    import microbead_io as mio

    pairing = mio.pair_files(data_dir / "images", data_dir / "masks")
    loaded = mio.load_pairs(pairing.pairs, image_size=size, channels=1,
                            normalization=mio.DEFAULT_NORMALIZATION)
    if len(loaded.files) < 2:
        raise SystemExit(f"error: {data_dir}: need at least 2 usable image/mask pairs")
    return np.asarray(loaded.images, np.float32), np.asarray(loaded.masks)


def bench_config(arch: str, size: int, precision: str, args, data_dir: Path) -> dict:
    """Throughput of one architecture at one size and precision, for every pipeline."""
    import keras

    import models

    record = {"arch": arch, "size": size, "precision": precision, "filters": args.filters,
              "depth": args.depth, "batch_size": args.batch_size, "loss": args.loss,
              "steps_per_execution": args.steps_per_execution}
    images, masks = load_tiles(data_dir, size)
    train_idx = np.arange(len(images))
    aug_args = argparse.Namespace(
        batch_size=args.batch_size, patch_size=0, rotation=mcfg.TRAINING_DEFAULTS["rotation"],
        intensity_aug=mcfg.TRAINING_DEFAULTS["intensity_aug"],
        elastic=mcfg.TRAINING_DEFAULTS["elastic"])
    # In-memory batches come from the NumPy augmentation, so every pipeline feeds the same
    # shapes, dtypes and value statistics; enough distinct batches that nothing is cached.
    src = training_data.make_datasets(images, masks, train_idx, train_idx[:1], aug_args, 0,
                                      workers=1)[0]
    n_pre = max(2, min(args.steps, 8))
    pre = [src[i] for i in range(n_pre)]
    prebatched = (np.stack([b[0] for b in pre]), np.stack([b[1] for b in pre]))

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = models.build_model(arch, (size, size, 1), filters=args.filters,
                                   depth=args.depth, dropout=0.3, batch_norm=True)
        models.compile_model(model, lr=1e-4, loss=args.loss, jit_compile=args.jit_compile,
                             steps_per_execution=args.steps_per_execution)
        record["params"] = int(model.count_params())
        fwd = conv_flops_per_image(model)
        record["flops_per_image"] = {
            "forward_analytic": fwd,
            "train_analytic": 3 * fwd,
            "train_xla_cost_analysis": (xla_train_flops_per_image(model,
                                                                  models.get_loss(args.loss),
                                                                  size)
                                        if args.xla_flops else None),
            "note": "analytic: Conv2D layers only, training = 3 x forward; XLA: forward + "
                    "backward of one image (no optimizer update), lowered HLO",
        }
        limit = args.peak_tflops * 1e12 / (3 * fwd)
        record["images_per_s_limit_at_peak"] = round(limit, 1)
        record["peak_tflops_assumed"] = args.peak_tflops
        record["pipelines"] = {}
        baseline = None
        for kind in args.pipelines:
            ds = make_pipeline(kind, images, masks, train_idx, aug_args, 0, args.workers,
                               prebatched)
            res = timed_fit(model, ds, steps=args.steps, rounds=args.rounds,
                            warmup=args.warmup)
            per_epoch = args.steps * args.batch_size
            res["images_per_s_median"] = round(per_epoch / statistics.median(res["epoch_s"]), 2)
            res["images_per_s_best"] = round(per_epoch / min(res["epoch_s"]), 2)
            res["achieved_tflops"] = round(res["images_per_s_median"] * 3 * fwd / 1e12, 3)
            res["fraction_of_limit"] = round(res["images_per_s_median"] / limit, 4)
            if kind == "numpy":
                res["workers"] = args.workers
                res["loader_only_images_per_s"] = round(loader_only_images_per_s(
                    ds, max(4, args.steps // 2), args.workers, args.batch_size), 1)
            if kind == "in_memory":
                baseline = res
            elif baseline is not None:
                res["ratio_to_in_memory_median"] = round(
                    res["images_per_s_median"] / baseline["images_per_s_median"], 4)
                res["ratio_to_in_memory_best"] = round(
                    res["images_per_s_best"] / baseline["images_per_s_best"], 4)
                res["overhead_pct"] = round(100 * (1 - res["ratio_to_in_memory_best"]), 2)
            record["pipelines"][kind] = res
            log.info("%s %d px %s %-9s: %.1f img/s (median), %.1f best, warm-up %.1f s", arch,
                     size, precision, kind, res["images_per_s_median"],
                     res["images_per_s_best"], res["warmup_s"])
            del ds
        record["jit_compile"] = getattr(model, "jit_compile", None)
        record["memory"] = peak_memory()
        del model
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
        gc.collect()
    return record


# ----------------------------------------------------------------------------- recipe


def generate_data(out: Path, args) -> Path:
    """Synthetic tiles (+ full frames) with the generator's defaults unless flags say else."""
    from synthetic_dataset import generate_dataset

    kwargs = {"n": args.n_tiles, "seed": 0, "large": args.large_frames,
              "large_size": tuple(args.large_size), "log_file": False}
    if args.tile_size:
        kwargs["size"] = args.tile_size
    if args.style:
        if "style" not in inspect.signature(generate_dataset).parameters:
            raise SystemExit("error: synthetic_dataset.generate_dataset has no 'style' "
                             "parameter; drop --style")
        kwargs["style"] = args.style
    t0 = time.perf_counter()
    generate_dataset(out, **kwargs)
    log.info("generated %s (%s) in %.1f s", out, kwargs, time.perf_counter() - t0)
    return out


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def curve_summary(val_jaccard: list[float], epoch_s: list[float], tol: float) -> dict:
    """Plateau facts of a val Jaccard curve and the epoch time excluding the first epoch."""
    vj = np.asarray([np.nan if v is None else v for v in val_jaccard], float)
    out = {"best": None, "final": None, "first_epoch_within_tol_of_best": None,
           "still_rising": None}
    if vj.size and np.isfinite(vj).any():
        best = float(np.nanmax(vj))
        out["best"] = round(best, 4)
        out["final"] = round(float(vj[-1]), 4)
        out["first_epoch_within_tol_of_best"] = int(np.argmax(vj >= best - tol)) + 1
        if vj.size >= 6:
            # Mean of the last 3 epochs vs the 3 before: > tol means the budget ended before
            # the plateau, so "within tol of the best" is not "within tol of the plateau".
            out["still_rising"] = bool(np.nanmean(vj[-3:]) - np.nanmean(vj[-6:-3]) > tol)
    steady = [t for t in epoch_s[1:] if t is not None] or [t for t in epoch_s if t is not None]
    out["s_per_epoch_median"] = round(statistics.median(steady), 3) if steady else None
    out["first_epoch_s"] = round(epoch_s[0], 3) if epoch_s and epoch_s[0] else None
    return out


def _run_script(script: str, argv: list[str]) -> int:
    """Exit status of one of the project's entry points run in its own process (the
    environment, KERAS_BACKEND included, is inherited)."""
    return subprocess.run([sys.executable, str(ROOT / script), *argv], check=False).returncode


def count_frames(model_path: Path, data_dir: Path, out_dir: Path) -> dict:
    """Predict the full frames with ``predict_microscope.py``; bead count vs truth."""
    import microbead_metrics

    frames = data_dir / "large" / "images"
    truth = {r["stem"]: int(r["n_beads"]) for r in _read_csv(data_dir / "large" / "counts.csv")}
    if not frames.is_dir() or not truth:
        return {"error": f"{frames}: no full frames (generate with --large_frames > 0)"}
    t0 = time.perf_counter()
    rc = _run_script("predict_microscope.py", ["--model", str(model_path), "--input_dir",
                                               str(frames), "--output_dir", str(out_dir),
                                               "--no_figures", "--overwrite"])
    wall = time.perf_counter() - t0
    rows = []
    for r in _read_csv(out_dir / "prediction_summary.csv"):
        stem = Path(r["file"]).stem
        if r.get("status") != "ok" or stem not in truth:
            rows.append({"file": r["file"], "status": r.get("status")})
            continue
        err = microbead_metrics.count_error(truth[stem], int(r["beads"]))
        rows.append({"file": r["file"], "true": truth[stem], "pred": int(r["beads"]),
                     "rel_count_error": round(err["rel_count_error"], 4)})
    rel = [r["rel_count_error"] for r in rows if "rel_count_error" in r]
    return {"exit_code": rc, "wall_s": round(wall, 2), "frames": rows,
            "median_rel_count_error": round(float(np.median(rel)), 4) if rel else None,
            "max_rel_count_error": round(float(np.max(rel)), 4) if rel else None}


def run_recipe(recipe: str, data_dir: Path, work: Path, args, max_minutes: float = 0.0) -> dict:
    """One trainer run for ``recipe`` (``train_microbead_optimized.py`` in its own process,
    on this process's Keras backend) and its per-model results.

    ``max_minutes`` (0 = none) is passed as the trainer's per-model ``--max_minutes``.
    """
    out = work / f"runs_{recipe}"
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run_dir.txt"
    argv = ["--data_dir", str(data_dir), "--models", ",".join(args.recipe_models),
            "--output_dir", str(out), "--run_dir_file", str(run_file), "--verbose", "0"]
    if recipe == "cpu":
        argv += ["--preset", "cpu"]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if args.steps_per_epoch:
        argv += ["--steps_per_epoch", str(args.steps_per_epoch)]
    if max_minutes:
        argv += ["--max_minutes", f"{max_minutes:.3f}"]
    argv += shlex.split(args.train_args)
    result = {"argv": argv, "input_pipeline": "training_data PyDataset (the trainer's own)",
              "policy_if_mixed": "mixed_float16 (trainer)"}
    t0 = time.perf_counter()
    result["exit_code"] = _run_script("train_microbead_optimized.py", argv)
    if result["exit_code"]:
        result["error"] = f"train_microbead_optimized.py exited {result['exit_code']}"
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if not run_file.is_file():
        return result
    run_dir = Path(run_file.read_text().strip())
    config = json.loads((run_dir / "config.json").read_text()) if (
        run_dir / "config.json").is_file() else {}
    training = config.get("training", {})
    result["settings"] = {k: training.get(k) for k in (
        "preset", "filters", "depth", "batch_size", "patch_size", "image_size", "lr", "loss",
        "dropout", "epochs", "patience", "lr_schedule", "steps_per_epoch_used",
        "bn_momentum_used", "normalization", "mixed_precision")}
    result["environment"] = config.get("environment", {})
    summary = {r["model"]: r for r in _read_csv(run_dir / "training_summary.csv")}
    models_out = {}
    for name in args.recipe_models:
        hist = _read_csv(run_dir / f"{name}_history.csv")
        vj = [_float(r.get("val_jacard_coef")) for r in hist]
        ep_s = [_float(r.get("epoch_time_s")) for r in hist]
        res = {"val_jaccard_per_epoch": [None if v is None else round(v, 4) for v in vj],
               "train_jaccard_per_epoch": [_float(r.get("jacard_coef")) for r in hist],
               "epoch_time_s": ep_s, **curve_summary(vj, ep_s, TARGETS["plateau_tolerance"])}
        row = summary.get(name, {})
        res["summary"] = {k: _float(v) if k != "model" else v for k, v in row.items()}
        # Epoch times of the history exclude the per-epoch checkpoint saves; the fit's wall
        # time (train_time) includes them, so the projection uses it past the first epoch.
        fit_s, n_ep = res["summary"].get("train_time"), res["summary"].get("epochs_run")
        first = res["first_epoch_s"]
        if fit_s and n_ep and n_ep > 1 and first:
            res["s_per_epoch_with_checkpoints"] = round((fit_s - first) / (n_ep - 1), 3)
            res["projected_full_job_s"] = round(
                first + (FULL_JOB_EPOCHS - 1) * res["s_per_epoch_with_checkpoints"], 1)
        elif res["s_per_epoch_median"] is not None:
            res["projected_full_job_s"] = round(FULL_JOB_EPOCHS * res["s_per_epoch_median"], 1)
        res["projection_note"] = (f"{FULL_JOB_EPOCHS} epochs (the trainer's default) if early "
                                  "stopping does not end it sooner; first epoch includes "
                                  "compilation")
        best = run_dir / f"best_{name}_model.hdf5"
        if args.large_frames and best.is_file():
            try:
                res["frames"] = count_frames(best, data_dir, work / f"pred_{recipe}_{name}")
            except (Exception, SystemExit) as exc:
                log.exception("counting frames with %s failed", best)
                res["frames"] = {"error": f"{type(exc).__name__}: {exc}"}
        models_out[name] = res
    result["models"] = models_out
    proj = [m.get("projected_full_job_s") for m in models_out.values()]
    if proj and all(p is not None for p in proj):
        result["projected_full_job_s_all_models"] = round(sum(proj), 1)
    return result


# ----------------------------------------------------------------------------- CLI


def _csv_list(allowed=None, cast=str):
    def parse(text: str):
        items = [cast(t.strip()) for t in str(text).split(",")
                 if t.strip() and t.strip().lower() != "none"]
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {bad}; choose from {', '.join(map(str, allowed))}")
        return items
    return parse


def _configs(text: str):
    """``"unet:256:mixed_bfloat16,..."`` -> ``[("unet", 256, "mixed_bfloat16"), ...]``.

    ``"none"`` or an empty string -> None (use the product of --archs/--sizes/--precisions).
    """
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item or item.lower() == "none":
            continue
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ARCHS or parts[2] not in PRECISIONS \
                or not parts[1].isdigit():
            raise argparse.ArgumentTypeError(
                f"bad config {item!r}: expected ARCH:SIZE:PRECISION with ARCH in "
                f"{', '.join(ARCHS)} and PRECISION in {', '.join(PRECISIONS)}")
        out.append((parts[0], int(parts[1]), parts[2]))
    return out or None


def _jit(value: str):
    choices = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")
    return choices[value.lower()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(name, **kw):
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*flags, dest=name, **kw)

    add("backend", choices=("jax", "tensorflow", "torch"), default=None,
        help="sets KERAS_BACKEND before Keras is imported (default: the environment's)")
    add("out", default=str(DEFAULT_OUT), help="JSON results file")
    add("data", default=None, help="dataset folder (default: generate one under --work)")
    add("work", default=None, help="scratch folder (default: a temporary one, removed)")
    g = p.add_argument_group("throughput")
    g.add_argument("--archs", type=_csv_list(ARCHS), default=list(ARCHS),
                   help="architectures ('none': skip the throughput part)")
    g.add_argument("--sizes", type=_csv_list(cast=int), default=[256, 512])
    g.add_argument("--precisions", type=_csv_list(PRECISIONS),
                   default=["float32", "mixed_bfloat16"])
    g.add_argument("--pipelines", type=_csv_list(PIPELINES), default=list(PIPELINES))
    g.add_argument("--configs", type=_configs, default=None,
                   help="explicit ARCH:SIZE:PRECISION list, run in this order (overrides "
                        "--archs/--sizes/--precisions)")
    g.add_argument("--filters", type=int, default=64)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--batch_size", "--batch-size", type=int, default=32)
    g.add_argument("--loss", default="dice")
    g.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    g.add_argument("--rounds", type=int, default=3, help="timed epochs (after one dropped)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    g.add_argument("--jit_compile", "--jit-compile", type=_jit, default="auto")
    g.add_argument("--steps_per_execution", "--steps-per-execution", type=int, default=1)
    g.add_argument("--workers", type=int, default=0,
                   help="threads of the trainer's input pipeline (0: usable CPUs, at most 16)")
    g.add_argument("--xla_flops", "--xla-flops", type=_jit, default="auto",
                   help="XLA cost analysis of the FLOPs (auto: on under JAX)")
    g.add_argument("--peak_tflops", "--peak-tflops", type=float, default=PEAK_TFLOPS_BF16,
                   help="accelerator peak for the images/s limit (issue 19: ~800 bf16)")
    g.add_argument("--isolate", action="store_true",
                   help="one process per configuration (per-config peak memory, OOM-safe)")
    g.add_argument("--n_tiles", "--n-tiles", type=int, default=73,
                   help="tiles to generate when --data is not given")
    r = p.add_argument_group("recipe")
    r.add_argument("--recipes", "--recipe", type=_csv_list(RECIPES), default=[],
                   help="trainer recipes to run: default (what qsub runs), cpu (--preset cpu)")
    r.add_argument("--recipe_models", "--recipe-models", type=_csv_list(ARCHS),
                   default=list(ARCHS))
    r.add_argument("--epochs", type=int, default=20, help="0: the recipe's own")
    r.add_argument("--steps_per_epoch", "--steps-per-epoch", type=int, default=50,
                   help="0: the recipe's own")
    r.add_argument("--max_minutes", "--max-minutes", type=float, default=0.0,
                   help="trainer's per-model time cap (0: none)")
    r.add_argument("--train_args", "--train-args", default="",
                   help='extra trainer flags, e.g. "--lr 1e-3 --lr_schedule cosine"')
    r.add_argument("--large_frames", "--large-frames", type=int, default=2,
                   help="full frames to generate and count (0: no count check)")
    r.add_argument("--large_size", "--large-size", type=int, nargs=2, default=[3840, 2160],
                   metavar=("W", "H"))
    r.add_argument("--tile_size", "--tile-size", type=int, default=0,
                   help="generated tile edge (0: the generator's default)")
    r.add_argument("--style", default=None,
                   help="generator style, if make_synthetic_dataset supports one")
    p.add_argument("--max_seconds", "--max-seconds", type=float, default=0.0,
                   help="skip configurations / recipes not started within this (0: no limit)")
    args = p.parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size, args.filters) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --batch_size and --filters must be >= 1, --warmup >= 0")
    return args


def _set_backend(name: str | None) -> None:
    if not name:
        return
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise SystemExit(f"error: Keras is already imported with backend "
                             f"{keras.backend.backend()!r}; cannot switch to {name!r}")
        return
    os.environ["KERAS_BACKEND"] = name


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _isolated(arch, size, precision, argv, data_dir: Path, scratch: Path, timeout) -> dict:
    """Run one configuration in a child process of this script; its record or an error."""
    out = scratch / f"iso_{arch}_{size}_{precision}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--archs", arch, "--sizes",
           str(size), "--precisions", precision, "--configs", "none", "--recipes", "none",
           "--data",
           str(data_dir), "--out", str(out), "--max_seconds", "0"]
    cmd = [c for c in cmd if c != "--isolate"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-2000:]
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc, tail = None, f"timed out after {timeout:.0f} s"
    if rc == 0 and out.is_file():
        recs = json.loads(out.read_text()).get("throughput", [])
        if recs:
            recs[0]["process_wall_s"] = round(time.perf_counter() - t0, 1)
            return recs[0]
    return {"arch": arch, "size": size, "precision": precision, "error": tail,
            "exit_code": rc, "process_wall_s": round(time.perf_counter() - t0, 1)}


def print_table(report: dict) -> None:
    rows = report.get("throughput", [])
    if rows:
        print(f"\n{'arch':<18}{'size':>5} {'precision':<15}{'pipeline':<10}{'img/s':>9}"
              f"{'best':>9}{'ratio':>7}{'TFLOP/s':>9}{'of limit':>9}{'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<18}{r['size']:>5} {r['precision']:<15}FAILED: "
                  f"{str(r['error']).strip().splitlines()[-1:]}")
            continue
        peak = (r.get("memory") or {}).get("device_peak_bytes")
        for kind, p in r["pipelines"].items():
            print(f"{r['arch']:<18}{r['size']:>5} {r['precision']:<15}{kind:<10}"
                  f"{p['images_per_s_median']:>9.1f}{p['images_per_s_best']:>9.1f}"
                  f"{p.get('ratio_to_in_memory_median', 1.0):>7.3f}{p['achieved_tflops']:>9.2f}"
                  f"{p['fraction_of_limit']:>9.3f}"
                  f"{(peak / 2**30 if peak else float('nan')):>9.2f}")
    for recipe, res in report.get("recipes", {}).items():
        print(f"\nrecipe {recipe}: exit {res.get('exit_code')}, {res.get('wall_s')} s"
              + (f"  ERROR {res['error']}" if res.get("error") else ""))
        for name, m in (res.get("models") or {}).items():
            frames = m.get("frames") or {}
            print(f"  {name:<18} best {m['best']}  final {m['final']}  within 0.02 at epoch "
                  f"{m['first_epoch_within_tol_of_best']}  rising {m['still_rising']}  "
                  f"{m['s_per_epoch_median']} s/epoch  count err "
                  f"{frames.get('median_rel_count_error')}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _set_backend(args.backend)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import keras  # noqa: F401  (after the backend is chosen)

    backend = backend_name()
    args.workers = args.workers or training_data.default_workers()
    if args.xla_flops == "auto":
        args.xla_flops = backend == "jax"
    started = time.perf_counter()
    out = Path(args.out)
    report = {
        "benchmark": "bench_train_gpu (issue 19)",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": argv,
        "environment": environment(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "targets": TARGETS,
        "throughput": [],
        "recipes": {},
    }

    def time_left() -> float:
        return math.inf if not args.max_seconds else args.max_seconds - (
            time.perf_counter() - started)

    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_gpu_")))
        work.mkdir(parents=True, exist_ok=True)
        data_dir = Path(args.data) if args.data else None
        if data_dir is None:
            data_dir = generate_data(work / "data", args)
        report["dataset"] = {"path": str(data_dir), "generated": not args.data}
        skipped = []
        configs = args.configs if args.configs is not None else [
            (a, s, p) for a in args.archs for s in args.sizes for p in args.precisions]
        for arch, size, precision in configs:
            if time_left() <= 0:
                skipped.append(f"{arch}:{size}:{precision}")
                continue
            log.info("throughput: %s %d px %s, batch %d, %d filters", arch, size, precision,
                     args.batch_size, args.filters)
            if args.isolate:
                rec = _isolated(arch, size, precision, argv, data_dir, work,
                                None if math.isinf(time_left()) else max(60.0, time_left() + 30))
            else:
                try:
                    rec = bench_config(arch, size, precision, args, data_dir)
                except Exception as exc:  # e.g. out of memory: keep the other rows
                    log.exception("%s %d %s failed", arch, size, precision)
                    rec = {"arch": arch, "size": size, "precision": precision,
                           "error": f"{type(exc).__name__}: {exc}"[:2000]}
            report["throughput"].append(rec)
            _write(out, report)
        for i, recipe in enumerate(args.recipes):
            left = time_left()
            if left <= 0:
                skipped.append(f"recipe {recipe}")
                continue
            cap = args.max_minutes
            if not math.isinf(left):
                # This recipe's share of the time left, per model, minus a fifth for what the
                # trainer does after fit (reload, snapshot) and the frame counts.
                weights = [RECIPE_WEIGHT[r] for r in args.recipes[i:]]
                share = 0.8 * left * weights[0] / sum(weights) / len(args.recipe_models) / 60
                cap = min(cap, share) if cap else share
            log.info("recipe %s: %s x %s steps, models %s, %s min/model cap", recipe,
                     args.epochs or "own", args.steps_per_epoch or "own",
                     ",".join(args.recipe_models), f"{cap:.2f}" if cap else "no")
            report["recipes"][recipe] = run_recipe(recipe, data_dir, work, args, cap)
            _write(out, report)
        report["skipped_for_time"] = skipped
        report["wall_s"] = round(time.perf_counter() - started, 1)
        _write(out, report)
    print_table(report)
    print(f"written: {out}")
    failed = [r for r in report["throughput"] if "error" in r] + [
        r for r in report["recipes"].values() if r.get("exit_code")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

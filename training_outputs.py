"""What a training run writes besides the weights: the per-model calibration on the
validation tiles, validation counts, the validation snapshot figure, ``config.json``
(everything prediction needs), the summaries, and the CPU time estimate.

Called by ``train_microbead_optimized`` (through ``training_loop``) and by
``benchmarks/bench_real_cv.py`` (:func:`recalibrate_run`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

import bead_filter
import microbead_config as mcfg
import microbead_io as mio
import microbead_metrics
import runtime
import training_data

log = logging.getLogger("microbead.train")

SUMMARY_COLUMNS = (
    "model", "best_epoch", "best_val_jacard", "final_val_jacard", "train_time", "params",
    "epochs_run", "best_val_dice", "best_val_jacard_reloaded", "val_jacard_batchstats",
    "label_ceiling",
)


# ----------------------------------------------------------------------------- time estimate

#: Cost of a training step (and of a validation image) relative to the U-Net at the same
#: settings, on the 2-core development machine: 8-filter runs took 1.1-1.2x (Attention U-Net)
#: and 1.1-1.9x (Attention ResUNet) the U-Net's time (README "Measured", 2026-11/12).
MODEL_COST = {"unet": 1.0, "attention_unet": 1.2, "attention_resunet": 1.5}
#: ``--preset cpu`` on one core of that machine: one training step (16 crops of 128 px, 8
#: filters, depth 3, U-Net) and one megapixel of validation forward pass, in core-seconds.
PRESET_CPU_STEP_CORE_S = 1.7
PRESET_CPU_VAL_CORE_S_PER_MPX = 4.3
#: Per epoch outside the steps: checkpoint, history row, best-model save.
EPOCH_OVERHEAD_S = 3.0
#: Above this estimate the CPU notice is a warning.
CPU_WARN_SECONDS = 3600.0


def estimate_training_seconds(step_s: float, *, steps: int, epochs: int, models, batch: int,
                              train_px: int, val_px: int, n_val: int,
                              measured_model: str = "unet", folds: int = 1) -> float:
    """Wall time of a whole training from one measured training step.

    Parameters
    ----------
    step_s : seconds of one optimizer step of ``measured_model``, measured here.
    steps, epochs, batch : steps per epoch, maximum epochs, batch size.
    models : names of the models to train (their cost relative to the measured one:
        :data:`MODEL_COST`).
    train_px, val_px : pixels of one training input (crop or tile) and of one validation tile.
    n_val : validation tiles (a forward pass over them every epoch, costed at one third of
        a training step's per-pixel time: no backward pass).
    folds : splits trained one after the other (``--kfold``).

    Returns
    -------
    float
        Seconds if every model runs every epoch (early stopping can only shorten it).
    """
    val_image_s = step_s * val_px / (3.0 * max(1, batch) * max(1, train_px))
    epoch_s = steps * step_s + n_val * val_image_s + EPOCH_OVERHEAD_S
    cost = sum(MODEL_COST.get(m, 1.0) for m in models) / MODEL_COST.get(measured_model, 1.0)
    return float(epochs * epoch_s * cost * max(1, folds))


def preset_cpu_seconds(*, models, n_val: int, val_px: int, cores: int, folds: int = 1) -> float:
    """Wall time of ``--preset cpu`` on this dataset from the constants measured on the
    development machine (:data:`PRESET_CPU_STEP_CORE_S`), scaled to ``cores`` CPUs."""
    preset = mcfg.TRAINING_PRESETS["cpu"]
    cores = max(1, int(cores))
    epoch_s = (preset["steps_per_epoch"] * PRESET_CPU_STEP_CORE_S / cores
               + n_val * PRESET_CPU_VAL_CORE_S_PER_MPX * val_px / 1e6 / cores
               + EPOCH_OVERHEAD_S)
    return float(preset["epochs"] * epoch_s * sum(MODEL_COST.get(m, 1.0) for m in models)
                 * max(1, folds))


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"26.4 h"``, ``"3.1 days"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cpu_notice(estimate_s: float, preset_s: float | None) -> str:
    """The trainer's line on a machine without a GPU.

    ``preset_s`` None: the run already is ``--preset cpu`` (nothing faster to suggest).
    """
    if preset_s is None:
        return (f"no GPU found; this configuration (--preset cpu) needs about "
                f"{format_duration(estimate_s)} here")
    return (f"no GPU found; this configuration needs about {format_duration(estimate_s)} "
            f"here; `--preset cpu` takes about {format_duration(preset_s)}")


def log_cpu_notice(step_s: float, args, name: str, steps: int, n_val: int, val_px: int,
                   folds: int) -> None:
    """Log :func:`cpu_notice` from the measured step time of ``name`` (the first model)."""
    remaining = args.models[args.models.index(name):]
    train_px = (args.patch_size or args.image_size) ** 2
    total = estimate_training_seconds(step_s, steps=steps, epochs=args.epochs,
                                      models=remaining, batch=args.batch_size,
                                      train_px=train_px, val_px=val_px, n_val=n_val,
                                      measured_model=name, folds=folds)
    is_preset = all(getattr(args, k) == v for k, v in mcfg.TRAINING_PRESETS["cpu"].items())
    preset = None if is_preset else preset_cpu_seconds(
        models=remaining, n_val=n_val, val_px=val_px, cores=runtime.usable_cpus(), folds=folds)
    line = cpu_notice(total, preset)
    detail = (f"{step_s:.2f} s per training step measured on {name}: {steps} steps x "
              f"{args.epochs} epochs x {len(remaining)} model(s)"
              + (f" x {folds} folds" if folds > 1 else "") + "; early stopping may end it sooner")
    level = logging.WARNING if total > CPU_WARN_SECONDS and preset is not None else logging.INFO
    log.log(level, "%s (%s)", line, detail)



# ----------------------------------------------------------------------------- validation


def per_image_jaccard(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """NumPy twin of ``models.jacard_coef``: per-image IoU, both-empty = 1.

    ``pred`` ``(N, ...)`` probabilities, foreground ``> threshold``; ``truth`` ``(N, ...)``
    {0, 1} masks, foreground ``> 0.5`` (``microbead_metrics.above_threshold``, the one rule).
    Returns float64 ``(N,)``.
    """
    p = microbead_metrics.above_threshold(np.asarray(pred).reshape(len(pred), -1), threshold)
    t = microbead_metrics.above_threshold(np.asarray(truth).reshape(len(truth), -1), 0.5)
    inter = np.logical_and(p, t).sum(1)
    union = np.logical_or(p, t).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def calibration_file(name: str) -> str:
    """``calibration_<model>.json``: the model's object filter and predicted bead area."""
    return f"calibration_{name}.json"


def calibrate_on_validation(prob, x_val, y_val, threshold: float, median_area: float,
                            quantile: float = bead_filter.DEFAULT_QUANTILE,
                            colour=None) -> tuple[dict, list[np.ndarray]]:
    """The model's object filter and its own bead size, from its validation predictions.

    Each validation tile's prediction is split into beads as ``predict_microscope`` does;
    every object gets :func:`bead_filter.object_features` (against the normalised input);
    objects whose centre lies within :func:`bead_filter.match_radius` of a labelled
    object's are *confirmed*. :func:`bead_filter.calibrate` sets lower bounds that keep all
    but ``quantile`` of the confirmed objects per feature; with ``colour`` (the tiles in RGB
    at model scale, :func:`training_data.colour_tiles`) also a colour bound when the
    confirmed beads have a colour. ``predicted_bead_area_px`` is the
    median 8-connected component area of the kept objects (model scale): the scale check's
    reference (the masks' own beads may be shrunk).

    Returns
    -------
    (calibration dict, per-tile filtered labels). The dict has ``object_filter`` (or None),
    ``predicted_bead_area_px`` (None without objects) and ``validation`` counts.
    """
    labels, comps, feats, matched = [], [], [], []
    colours = [None] * len(x_val) if colour is None else colour
    for p, x, rgb in zip(prob, x_val, colours):
        p2 = np.asarray(p, np.float32)[..., 0]
        lab, comp = microbead_metrics.label_beads_and_components(
            microbead_metrics.above_threshold(p2, threshold).astype(np.uint8),
            median_area=median_area, prob=p2)
        img = np.asarray(x, np.float32).mean(axis=-1)
        f = bead_filter.object_features(lab, p2, img, colour=rgb)
        labels.append(lab)
        comps.append(comp)
        feats.append(f)
    all_area = np.concatenate([f["area_px"] for f in feats]) if feats else np.zeros(0)
    radius = bead_filter.match_radius(float(np.median(all_area)) if all_area.size else
                                      median_area)
    for f, t in zip(feats, y_val):
        truth = bead_filter.component_centres(np.asarray(t)[..., 0] > 0.5)
        matched.append(bead_filter.match_centres(
            truth, np.stack([f["cy"], f["cx"]], 1), radius)[1])
    cat = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} if feats else {}
    conf = np.concatenate(matched) if matched else np.zeros(0, bool)
    rule = bead_filter.calibrate(cat, conf, quantile=quantile) if feats else None
    kept_labels, areas, keeps = [], [], []
    for lab, comp, f in zip(labels, comps, feats):
        keeps.append(bead_filter.accepted(f, rule))
        kept_labels.append(bead_filter.apply_filter(lab, keeps[-1]))
        # The statistic the predictor's scale check takes (prediction.filtered_beads).
        areas.append(microbead_metrics.kept_component_areas(comp, lab, keeps[-1]))
    areas = np.concatenate(areas) if areas else np.zeros(0)
    keep = np.concatenate(keeps) if keeps else np.zeros(0, bool)
    return {
        "object_filter": rule,
        "predicted_bead_area_px": float(np.median(areas)) if areas.size else None,
        "match_radius_px": round(float(radius), 3),
        "validation": {
            "objects": int(conf.size), "kept": int(keep.sum()),
            "matched": int(conf.sum()), "unmatched": int((~conf).sum()),
            "dropped_matched": int((conf & ~keep).sum()),
            "dropped_unmatched": int((~conf & ~keep).sum()),
        },
    }, kept_labels


VALIDATION_COUNTS = "validation_counts.csv"
VALIDATION_COUNT_COLUMNS = ("model", "file", "n_true", "n_pred", "area_px")


def validation_count_rows(name, prob, y_val, files, threshold: float, median_area: float,
                          model_scale: float, pred_labels=None) -> list[dict]:
    """Per validation tile: beads in the label mask and in the prediction, split alike.

    Both masks go through ``microbead_metrics.label_beads`` with the same median bead area
    (prediction: with its probabilities, as ``predict_microscope`` does), so ``n_pred -
    n_true`` is the model's own counting error. ``area_px`` is the tile's area in native
    frame pixels (for densities). ``quantify_assay.py --model`` reads these rows.
    ``pred_labels``: the predicted beads already split and filtered (as prediction counts
    them, :func:`calibrate_on_validation`); else split here without a filter.
    """
    rows = []
    for k, (p, t, f) in enumerate(zip(prob, y_val, files)):
        p2 = np.asarray(p)[..., 0]
        t2 = microbead_metrics.above_threshold(np.asarray(t)[..., 0], 0.5).astype(np.uint8)
        if pred_labels is not None:
            n_pred = int(len(np.unique(pred_labels[k])) - 1)
        else:
            n_pred = int(microbead_metrics.label_beads(
                microbead_metrics.above_threshold(p2, threshold).astype(np.uint8),
                median_area=median_area, prob=p2).max())
        n_true = int(microbead_metrics.label_beads(t2, median_area=median_area).max())
        rows.append({"model": name, "file": f, "n_true": n_true, "n_pred": n_pred,
                     "area_px": round(t2.size / model_scale ** 2, 1)})
    return rows


def append_validation_counts(path: Path, name, prob, y_val, files, threshold, median_area,
                             model_scale, pred_labels=None) -> None:
    """Replace ``name``'s rows of ``validation_counts.csv`` (atomic; other models kept)."""
    rows = [r for r in _read_csv_rows(path) if r["model"] != name]
    rows += validation_count_rows(name, prob, y_val, files, threshold, median_area,
                                  model_scale, pred_labels)
    mio.atomic_write_csv(path, rows, VALIDATION_COUNT_COLUMNS)


def _read_csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def save_snapshot(path: Path, name, x_val, y_val, prob, files, threshold, k: int = 4) -> None:
    """Figure: image / truth / prediction for up to ``k`` validation images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(k, len(x_val))
    order = np.argsort([-float(m.sum()) for m in y_val])[:k]
    fig, axes = plt.subplots(k, 3, figsize=(9, 3 * k), squeeze=False)
    for row, i in enumerate(order):
        iou = per_image_jaccard(prob[i : i + 1], y_val[i : i + 1], threshold)[0]
        for ax, img, title in zip(
            axes[row],
            (x_val[i, ..., 0], y_val[i, ..., 0], prob[i, ..., 0]),
            (files[i], "truth", f"prediction (IoU {iou:.3f})"),
        ):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{name}: best model on validation tiles")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)



# ----------------------------------------------------------------------------- run folder


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Python, NumPy, TensorFlow (None where it cannot be imported), Keras and its backend.

    TensorFlow's version is read from its package metadata unless it is already imported:
    a run on another backend does not import TensorFlow just to name it.
    """
    import importlib.metadata
    import importlib.util
    import sys

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("tensorflow", "keras"):
        try:
            if mod in sys.modules:
                out[mod] = sys.modules[mod].__version__
            elif importlib.util.find_spec(mod) is None:
                out[mod] = None
            else:
                out[mod] = importlib.metadata.version(mod)
        except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
            out[mod] = None
    out["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    return out


def build_config(args, data, split_info, tf_facts, pixel_scale: float,
                 pixel_scale_source: str = "--pixel_scale") -> dict:
    """The resolved configuration written next to the weights; prediction reads it back."""
    train_masks = [data["masks"][i] for i in split_info["train_idx"]]
    area = float(microbead_metrics.estimate_bead_area(train_masks))
    stored_h = data["stored_size"][0]
    model_scale = pixel_scale * args.image_size / stored_h
    return {
        "format_version": mcfg.FORMAT_VERSION,
        "models": {
            m: {"architecture": m, "filters": args.filters, "depth": args.depth,
                "dropout": args.dropout, "batch_norm": True}
            for m in args.models
        },
        "preprocessing": {
            "channels": args.channels,
            "input_size": [args.image_size, args.image_size],
            "stored_tile_size": list(map(int, data["stored_size"])),
            "pixel_scale": pixel_scale,
            "pixel_scale_source": pixel_scale_source,
            "scale": model_scale,
            "scale_source": (f"pixel_scale x input size / stored tile size = {pixel_scale:g} x "
                             f"{args.image_size} / {stored_h}; input size from "
                             f"{data.get('image_size_source', '--image_size')}"),
            "channel_mode": ("luminance (ITU-R BT.601 of RGB)" if args.channels == 1
                             else "RGB"),
            "normalization": dict(data.get("normalization", mio.DEFAULT_NORMALIZATION)),
            "pad_multiple": 2 ** args.depth,
        },
        "postprocessing": {
            "threshold": args.threshold,
            "median_bead_area_px": area,
            "median_bead_area_native_px": area / model_scale ** 2,
        },
        "training": {k: v for k, v in vars(args).items()
                     if k != "resume" and not k.startswith("_")},
        "data": {
            "data_dir": str(Path(args.data_dir).resolve()),
            "n_images": len(data["files"]),
            "skipped": data["skipped"],
            "mean_objects_per_image": float(np.mean(data["counts"])),
            "positive_ratio": float(np.mean(data["masks"])),
            "label_consistency_ceiling": data.get("label_ceiling"),
        },
        "environment": {
            **versions(), **tf_facts,
            "git_commit": git_commit(),
            "pbs_job_id": os.environ.get("PBS_JOBID"),
            "hostname": platform.node(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        },
    }


def write_summary(path: Path, rows: list[dict], extra_cols=()) -> None:
    """``training_summary.csv``, atomically: resume and ``hpc_tools run_status`` read it while
    a job may be writing it."""
    mio.atomic_write_csv(path, rows, list(extra_cols) + list(SUMMARY_COLUMNS))


def read_calibrations(folder: Path, names) -> dict:
    """``postprocessing.per_model`` of a run folder: each model's ``calibration_<model>.json``
    (written when its training finished; a resumed run reads the earlier models' files)."""
    out = {}
    for name in names:
        path = folder / calibration_file(name)
        if path.is_file():
            c = json.loads(path.read_text())
            out[name] = {"predicted_bead_area_px": c.get("predicted_bead_area_px"),
                         "object_filter": c.get("object_filter")}
    return out


def recalibrate_run(run_dir, data_dir=None, models_=None) -> dict:
    """Calibrate a finished run's models on its own validation tiles after the fact.

    For runs trained before the object filter existed: reads ``config.json`` and
    ``split.json`` (validation files and windows), preprocesses those tiles exactly as
    training did, predicts them with each ``best_<model>_model.hdf5`` and runs
    :func:`calibrate_on_validation`; writes ``calibration_<model>.json`` and adds
    ``postprocessing.per_model`` to ``config.json``. The weights are not touched.

    Returns the new ``per_model`` dict.
    """
    import models

    run_dir = Path(run_dir)
    cfg = mcfg.read_run_config(run_dir / mcfg.CONFIG_FILE)
    split = json.loads((run_dir / "split.json").read_text())
    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    data_dir = Path(data_dir or cfg["data"]["data_dir"])
    images_dir, masks_dir = training_data.dataset_dirs(data_dir)
    pairs = dict((Path(i).name, m) for i, m in mio.pair_files(images_dir, masks_dir).pairs)
    windows = split.get("val_windows") or [None] * len(split["val"])
    xs, ys = [], []
    for name, w in zip(split["val"], windows):
        img, m = mio.load_pair(images_dir / name, pairs[name], image_size=pre["input_size"][0],
                               channels=pre["channels"], normalization=pre["normalization"])
        if w:
            img, m = img[w[0]:w[1], w[2]:w[3]], m[w[0]:w[1], w[2]:w[3]]
        xs.append(img)
        ys.append(m)
    x_val = np.stack(xs)
    y_val = np.stack(ys)[..., None].astype(np.float32)
    rgb_val = training_data.colour_tiles([images_dir / n for n in split["val"]],
                                         pre["input_size"][0], split.get("val_windows"))
    for name in models_ or list(cfg["models"]):
        path = run_dir / f"best_{name}_model.hdf5"
        if not path.is_file():
            continue
        prob = models.load_model(path).predict(x_val, batch_size=4, verbose=0)
        calib, _ = calibrate_on_validation(prob, x_val, y_val, float(post["threshold"]),
                                           float(post["median_bead_area_px"]),
                                           colour=rgb_val)
        mio.atomic_write_json(run_dir / calibration_file(name), calib)
        log.info("%s: %s", name, bead_filter.describe(calib["object_filter"]))
    cfg["postprocessing"]["per_model"] = read_calibrations(run_dir, list(cfg["models"]))
    mcfg.save_run_config(run_dir / mcfg.CONFIG_FILE, cfg)
    return cfg["postprocessing"]["per_model"]


def write_kfold_summary(path: Path, rows: list[dict]) -> None:
    """``kfold_summary.csv`` (atomic): mean and SD of the best val Jaccard over the folds."""
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        v = np.array([float(r["best_val_jacard"]) for r in rows if r["model"] == m])
        sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        out.append({"model": m, "folds": v.size, "mean_best_val_jacard": round(float(v.mean()), 6),
                    "sd_best_val_jacard": round(sd, 6)})
        log.info("%s: best val Jaccard over %d folds %.4f ± %.4f", m, v.size, v.mean(), sd)
    mio.atomic_write_csv(path, out, ("model", "folds", "mean_best_val_jacard",
                                     "sd_best_val_jacard"))


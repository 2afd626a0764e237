"""Predict bead masks and bead counts on microscope frames of any size.

Purpose
    Segment new brightfield frames (e.g. 3840x2160) with a model trained by
    ``train_microbead_optimized.py`` and count beads per image. Preprocessing is rebuilt
    from the run's ``config.json`` (scale relative to the training tiles, channels,
    normalization, threshold, median bead area), never from re-typed flags, so training and
    prediction cannot drift. The frame is normalised once, as a whole, at the training tiles'
    scale; overlapping tiles are predicted in batches and their *probabilities* blended with
    a smooth window; the threshold is applied once, after blending, at the original
    resolution. Touching beads are split (``microbead_metrics.label_beads``).

Inputs
    ``--model``: a ``best_<model>_model.hdf5`` / ``.keras`` file with ``config.json`` beside
    it, or a run folder (then the model with the best validation Jaccard in its
    ``training_summary.csv`` is used). ``--input_dir``: images (.tif/.png/.jpg/.bmp, 8/16-bit,
    gray/RGB).

Outputs (``--output_dir``)
    ``masks/<stem>_mask.png`` (0/255, original size), ``labels/<stem>_labels.tif`` (bead ids),
    ``overlays/<stem>_overlay.png``, ``comparisons/<stem>_comparison.png`` (image |
    probability | outlines), optional ``prob/<stem>_prob.tif``, ``prediction_summary.csv``,
    ``prediction_summary.txt``, ``prediction_config.json``, ``prediction.log`` and, when file
    names carry a dilution (``640x_...``), ``dilution_counts.csv`` + ``dilution_counts.png``.
    Per bead (``bead_exports.py``, from the label image, frame pixels): ``beads/<stem>_beads.csv``
    and, on request, ``rois/<stem>_rois.zip`` (``--roi``, Fiji), ``geojson/<stem>.geojson``
    (``--geojson``, QuPath), ``ome/<stem>.ome.tif`` (``--ome_tiff``, image + labels).

Example
    python predict_microscope.py --model microbead_training_20260101_120000 \
        --input_dir new_frames/ --output_dir predictions/
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import bead_filter
import cli
import microbead_config as mcfg
import microbead_io as mio
import runtime
import tiling

log = logging.getLogger("microbead.predict")

LOG_NAME = "prediction.log"
#: Every file predict writes in --output_dir (globs). The run's output_manifest.json lists
#: those it wrote, and --overwrite removes those first, nothing else: a stale mask of a frame
#: no longer in --input_dir would otherwise be paired by evaluate_predictions.py as if it
#: were a fresh prediction. A file matching these that no manifest lists is refused.
OUTPUT_FILES = (
    "masks/*_mask.png", "labels/*_labels.tif", "overlays/*_overlay.png",
    "comparisons/*_comparison.png", "prob/*_prob.tif", "beads/*_beads.csv",
    "rois/*_rois.zip", "geojson/*.geojson", "ome/*.ome.tif",
    "prediction_summary.csv", "prediction_summary.txt", "prediction_config.json",
    "dilution_counts.csv", "dilution_counts.png", LOG_NAME,
)

SUMMARY_COLUMNS = (
    "file", "width", "height", "dilution", "beads", "n_components", "coverage_pct",
    "mean_bead_area_px", "area_estimate", "bead_area_ratio", "scale_used", "scale_warning",
    "rejected_objects", "time_s", "status",
)
# A frame whose typical bead is this much smaller / larger (area, at model scale) than the
# model's own beads on its validation tiles is probably at another pixel scale: counts are
# then unreliable. Correct real frames span 0.46-1.65 (leave-one-frame-out on the users' 49
# tiles: one frame's beads are half the usual area, clumps lift crowded tiles); a frame at
# 2x or 0.5x the training scale gives ~4 or ~0.25 (area goes with the square of the scale).
SCALE_RATIO_RANGE = (0.4, 2.0)
# Fewer components than this give no scale verdict: a blank frame's few specks are no
# sample of the bead size (the demo's blank frames were flagged "0.32x" with 5-6 specks).
MIN_BEADS_FOR_SCALE = 20
#: Smallest --tile_size accepted at parse time (model px); it must also be a multiple of
#: the run's pad multiple, checked once config.json is read.
MIN_TILE = 16
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- config / model


def read_run_config(path: Path) -> dict:
    """A run's ``config.json``, validated by :func:`microbead_config.read_run_config`
    (unknown or missing keys are an error); exits naming the file and the keys."""
    try:
        return mcfg.read_run_config(path)
    except mcfg.ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def resolve_model(model_arg: str) -> tuple[Path, Path, str]:
    """Model file, its config.json and a note on how it was chosen.

    A run folder resolves to the model with the highest ``best_val_jacard`` in its
    ``training_summary.csv`` (k-fold runs: the best fold).
    """
    p = Path(model_arg)
    if p.is_dir():
        summary = p / mcfg.SUMMARY_FILE
        if not summary.is_file():
            raise SystemExit(f"error: {summary}: not found; pass a model file instead")
        rows = [r for r in mcfg.read_summary(summary) if r.get("best_val_jacard")]
        if not rows:
            raise SystemExit(f"error: {summary}: no finished model listed")
        best = max(rows, key=lambda r: float(r["best_val_jacard"]))
        folder = mcfg.fold_dir(p, int(best["fold"])) if best.get("fold") else p
        model_path = folder / f"best_{best['model']}_model.hdf5"
        if not model_path.is_file():
            model_path = model_path.with_suffix(".keras")
        note = (f"{best['model']} chosen from {summary} (best val Jaccard "
                f"{float(best['best_val_jacard']):.4f}"
                + (f", fold {best['fold']}" if best.get("fold") else "") + ")")
    else:
        model_path, note = p, f"model file {p}"
    if not model_path.is_file():
        raise SystemExit(f"error: {model_path}: model file not found")
    cfg = model_path.parent / mcfg.CONFIG_FILE
    if not cfg.is_file():
        raise SystemExit(
            f"error: {cfg}: not found next to {model_path.name}. Prediction rebuilds "
            "preprocessing (scale, channels, normalization, threshold) from it; copy the "
            "run's config.json next to the model."
        )
    return model_path, cfg, note


# ----------------------------------------------------------------------------- core


def preprocess_frame(image: np.ndarray, pre: dict) -> np.ndarray:
    """Native frame ``(H, W, C)`` -> normalised model-scale input, exactly as in training.

    Flat-field runs (the default): resize the frame to model scale (``scale`` model px per
    frame px), then normalise with the stored window and levels, exactly as each training
    tile was; the normalisation is local, so a tile cut from the frame gets the same values.
    Percentile runs (older): resize to the stored-tile scale (area), normalise once for the
    whole frame, resize to model scale, as those runs were trained.
    """
    pixel_scale = float(pre["pixel_scale"])
    scale = float(pre["scale"])
    norm = pre.get("normalization") or mio.DEFAULT_NORMALIZATION
    if norm.get("method", "percentile") != "percentile":
        # Local (crop-invariant) methods run at model scale, as on the training tiles.
        return mio.preprocess_image(image, norm, scale=None if math.isclose(scale, 1.0)
                                    else scale)
    x = image
    if not math.isclose(pixel_scale, 1.0):
        x = mio.resize_image(x, mio.scaled_shape(x.shape, pixel_scale))
    x = mio.apply_normalization(x, pre.get("normalization"))
    if not math.isclose(scale, pixel_scale):
        x = mio.resize_image(x, mio.scaled_shape(image.shape, scale))
    return x


def tta_predict_fn(predict_fn, tta: bool):
    """Wrap a batch predictor with flip/rot90 test-time augmentation (8 dihedral variants)."""
    if not tta:
        return predict_fn

    def wrapped(batch):
        acc = None
        square = batch.shape[1] == batch.shape[2]
        ks = (0, 1, 2, 3) if square else (0, 2)
        n = 0
        for k in ks:
            for flip in (False, True):
                b = np.rot90(batch, k, axes=(1, 2))
                b = b[:, :, ::-1] if flip else b
                out = np.asarray(predict_fn(np.ascontiguousarray(b)), np.float32)
                out = out[..., 0] if out.ndim == 4 else out
                out = out[:, :, ::-1] if flip else out
                out = np.rot90(out, -k, axes=(1, 2))
                acc = out if acc is None else acc + out
                n += 1
        return acc / n

    return wrapped


def finish_frame(prob_small: np.ndarray, native_shape, cfg: dict,
                 threshold: float | None = None, image_small: np.ndarray | None = None
                 ) -> dict:
    """Threshold, bead instances and counts from model-scale probabilities.

    Parameters
    ----------
    prob_small : float32 ``(h, w)`` blended probabilities at model scale
    native_shape : the frame's ``(H, W, ...)``; outputs are at this resolution
    cfg : the run's config dict (with ``microbead_config.for_model`` applied, so that
        ``postprocessing.object_filter`` / ``predicted_bead_area_px`` are the model's own)
    image_small : float ``(h, w[, C])`` the normalised network input; needed when the
        object filter bounds contrast (without it those bounds are not applied)

    Beads are split at model scale, then the run's object filter (``bead_filter``; from the
    validation tiles at training time) drops objects unlike any bead the labels confirm:
    faint smudges and noise in dark corners. ``rejected`` counts them.

    Returns
    -------
    dict with ``prob`` (float32 (H, W), native), ``mask`` (uint8 {0,1}), ``labels`` (int32),
    ``beads``, ``n_components``, ``coverage_pct``, ``mean_bead_area_px``, ``area_estimate``
    (foreground area / median bead area: a clump-robust cross-check of the count).
    """
    import microbead_metrics

    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    thr = float(post["threshold"] if threshold is None else threshold)
    h, w = native_shape[:2]
    prob = mio.resize_image(prob_small, (h, w)) if prob_small.shape != (h, w) else prob_small
    mask = microbead_metrics.above_threshold(prob, thr).astype(np.uint8)
    scale = float(pre["scale"])
    area_native = float(post.get("median_bead_area_native_px")
                        or post["median_bead_area_px"] / scale ** 2)
    # Beads are split at model scale, where the network saw them and where the median bead
    # area was measured (4x fewer pixels than a 2x-downscaled frame's native grid: splitting
    # dense frames at native scale cost more than the forward pass). The ids are then carried
    # to native resolution and clipped to the native mask's outline.
    mask_small = microbead_metrics.above_threshold(prob_small, thr).astype(np.uint8)
    labels_small = microbead_metrics.label_beads(
        mask_small, median_area=float(post["median_bead_area_px"]), prob=prob_small)
    rule = post.get("object_filter")
    rejected = 0
    if rule:
        img = None if image_small is None else np.asarray(image_small, np.float32)
        if img is not None and img.ndim == 3:
            img = img.mean(axis=-1)
        feats = bead_filter.object_features(labels_small, prob_small, img)
        keep = bead_filter.accepted(feats, rule)
        rejected = int((~keep & (feats["area_px"] > 0)).sum())
        if rejected:
            labels_small = bead_filter.apply_filter(labels_small, keep)
            mask_small = (labels_small > 0).astype(np.uint8)
            # The native mask follows: a rejected object is not bead at any resolution.
            if labels_small.shape != (h, w):
                mask &= mio.resize_mask(mask_small, (h, w)).astype(np.uint8)
            else:
                mask = mask_small.copy()
    labels = mio.resize_labels(labels_small, (h, w)) if labels_small.shape != (h, w) \
        else labels_small.copy()
    labels[mask == 0] = 0
    # A bead smaller than a native pixel's reach can vanish when clipped to the native
    # outline: renumber what is left, so the count is the number of ids in the label file.
    present = np.bincount(labels.ravel(), minlength=int(labels_small.max()) + 1) > 0
    present[0] = False
    n = int(present.sum())
    if n < present.size - 1:
        lut = np.zeros(present.size, labels.dtype)
        lut[present] = np.arange(1, n + 1, dtype=labels.dtype)
        labels = lut[labels]
    ratio = bead_area_ratio(mask_small, reference_bead_area(post))
    n_comp = microbead_metrics.count_components(mask)
    fg = int(mask.sum())
    return {
        "prob": prob, "mask": mask, "labels": labels, "beads": n, "n_components": n_comp,
        "coverage_pct": 100.0 * fg / mask.size,
        "mean_bead_area_px": float((labels > 0).sum() / n) if n else 0.0,
        "area_estimate": fg / area_native if area_native > 0 else float("nan"),
        "median_bead_area_native_px": area_native,
        "bead_area_ratio": ratio, "scale_warning": scale_warning(ratio), "scale_used": scale,
        "rejected": rejected,
    }


def reference_bead_area(post: dict) -> float:
    """The scale check's reference (model px): the model's own median predicted bead area on
    its validation tiles when the run stored it, else the training masks' median area (older
    runs; shrunk masks make that smaller than what the model segments)."""
    value = post.get("predicted_bead_area_px")
    return float(value) if value else float(post["median_bead_area_px"])


def bead_area_ratio(mask_small: np.ndarray, median_area: float) -> float:
    """Median 8-connected component area of a model-scale mask / the training median area.

    Components, not split beads: the split is itself guided by the training area, so it
    would hide a scale error. On dense frames clumps pull the median up a little; single
    beads still dominate the components. NaN with fewer than :data:`MIN_BEADS_FOR_SCALE`
    components or no training area.
    """
    import microbead_metrics

    areas = microbead_metrics.component_areas(mask_small)
    if areas.size < MIN_BEADS_FOR_SCALE or not median_area > 0:
        return float("nan")
    return float(np.median(areas) / median_area)


def scale_warning(ratio: float) -> str:
    """Empty if ``ratio`` (see :func:`bead_area_ratio`) is plausible, else what to do."""
    lo, hi = SCALE_RATIO_RANGE
    if not np.isfinite(ratio) or lo <= ratio <= hi:
        return ""
    side = "smaller" if ratio < lo else "larger"
    return (f"beads {ratio:.2f}x the training bead area ({side}): this frame is probably at "
            f"another pixel scale than the training tiles; check --pixel_scale at training "
            f"or rerun with --auto_scale (estimated factor {ratio ** -0.5:.2f})")


def predict_frame(image: np.ndarray, predict_fn, cfg: dict, *, tile_size: int, overlap: int,
                  batch_size: int, threshold: float | None = None, progress=None) -> dict:
    """Probability, mask, bead labels and counts for one native-resolution frame.

    ``image``: float32 ``(H, W, C)`` in its stored value range (``microbead_io.read_image``);
    ``predict_fn``: ``(B, t, t, C) -> (B, t, t[, 1])`` probabilities. The three stages
    (:func:`preprocess_frame`, ``tiling.predict_tiled``, :func:`finish_frame`) run one
    after the other; :func:`predict_files` runs the same stages overlapped across frames.
    Returns :func:`finish_frame`'s dict.
    """
    x = preprocess_frame(image, cfg["preprocessing"])
    prob_small = tiling.predict_tiled(
        x, predict_fn, tile_size=tile_size, overlap=overlap, batch_size=batch_size,
        pad_multiple=int(cfg["preprocessing"].get("pad_multiple", 16)), progress=progress,
    )
    return finish_frame(prob_small, image.shape, cfg, threshold, image_small=x)


def network_depth(model, pad_multiple: int = 16) -> int:
    """Pooling levels of a Keras model (its ``MaxPooling2D`` layers: the ``models.py``
    U-Nets' ``depth``); for a model without any, ``log2(pad_multiple)`` from the config."""
    n = sum(type(layer).__name__ == "MaxPooling2D" for layer in model.layers)
    return int(n) if n else int(round(math.log2(max(1, int(pad_multiple)))))


def resolve_overlap(overlap: int | None, depth: int) -> tuple[int, str]:
    """Tile overlap and where it came from: ``--overlap`` when given, else
    ``tiling.default_overlap(depth)`` (half of it covers the receptive field)."""
    if overlap is not None:
        return int(overlap), "--overlap"
    return (tiling.default_overlap(depth),
            f"default: receptive field of the depth-{depth} network, "
            f"{tiling.receptive_field(depth)} px, rounded up to a multiple of {2 ** depth}")


def make_keras_predict_fn(model):
    """Batch predictor ``(B, t, t, C) -> (B, t, t[, 1])`` for a Keras model.

    ``tiling.predict_tiled`` already sends a fixed number of tiles per call (its last
    batch filled up with zero tiles), so the traced / compiled network sees one shape per
    tile layout; nothing is padded here.
    """

    def fn(batch):
        return np.asarray(model.predict_on_batch(batch))

    return fn


# ----------------------------------------------------------------------------- figures / files


def display_gray(image: np.ndarray) -> np.ndarray:
    """Frame ``(H, W[, C])`` -> float32 ``(H, W)`` in [0, 1] for figures: percentiles of
    every 4th pixel in each direction (display only, 16x cheaper on a 4K frame)."""
    g = np.asarray(image, np.float32)
    return mio.normalize_image(g.mean(axis=-1) if g.ndim == 3 else g, sample_step=4)


def overlay_image(gray01: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8: the frame in gray, beads tinted green, each bead outlined in yellow.

    Outline pixels are bead pixels with a 4-neighbour of another label (so touching beads
    are outlined where they meet): the max and min of the label over the pixel's
    4-neighbourhood differ.
    """
    import cv2

    rgb = cv2.cvtColor(mio.to_uint8(gray01), cv2.COLOR_GRAY2RGB)
    fg = labels > 0
    solid = np.zeros_like(rgb)
    solid[..., 1] = 255
    rgb = cv2.copyTo(cv2.addWeighted(rgb, 0.6, solid, 0.4, 0.0), fg.view(np.uint8), rgb)
    lab = labels.astype(np.float32)  # exact for ids < 2**24
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    edge = (cv2.dilate(lab, cross) != cv2.erode(lab, cross)) & fg
    solid[:] = (255, 220, 0)
    return cv2.copyTo(solid, edge.view(np.uint8), rgb)


#: Panel titles of ``comparisons/*.png``.
COMPARISON_TITLES = ("image", "bead probability (black 0 - yellow 1)",
                     "beads found (tinted green, each outlined in yellow)")


def comparison_layout(h: int, w: int, max_side: int = 2400) -> tuple[bool, float]:
    """``(stacked, scale)`` for three ``h x w`` panels within ``max_side`` px each way:
    side by side or one above the other, whichever shows the frame larger (a 3362x512 row
    strip is stacked, a square tile side by side). Never enlarged."""
    side = min(1.0, max_side / (3 * w), max_side / h)
    stacked = min(1.0, max_side / w, max_side / (3 * h))
    return stacked > side, max(side, stacked)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` under a white banner with ``title`` in black (readable at 100 %)."""
    import cv2

    bar = np.full((30, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def comparison_image(gray01, prob, overlay, max_side: int = 2400) -> np.ndarray:
    """Image | probability (inferno) | overlay, each titled, downscaled for viewing: side by
    side, or stacked when the frame is a wide strip (see :func:`comparison_layout`)."""
    import cv2

    h, w = gray01.shape[:2]
    stacked, f = comparison_layout(h, w, max_side)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))

    def small(a):  # each panel shrunk first: 9x fewer pixels to move than the full row
        return a if f == 1.0 else cv2.resize(a, size, interpolation=cv2.INTER_AREA)

    g = mio.to_uint8(small(np.asarray(gray01, np.float32)))
    heat = cv2.applyColorMap(mio.to_uint8(np.clip(small(np.asarray(prob, np.float32)), 0, 1)),
                             cv2.COLORMAP_INFERNO)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    panels = [_titled(p, t) for p, t in zip(
        (cv2.cvtColor(g, cv2.COLOR_GRAY2RGB), heat, small(overlay)), COMPARISON_TITLES)]
    gap = 8
    if stacked:
        sep = np.full((gap, panels[0].shape[1], 3), 255, np.uint8)
        return np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=0)
    sep = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1)


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, res: dict, *,
                  save_prob: bool = False, figures: bool = True,
                  exports: frozenset[str] = frozenset()) -> None:
    """One frame's files: mask, labels, per-bead table, optional probability, overlay and
    comparison. ``exports`` adds per-bead files: ``"roi"`` (ImageJ ROI set), ``"geojson"``
    (QuPath detections), ``"ome_tiff"`` (image + labels), all from the written label image
    (``bead_exports.write_bead_outputs``)."""
    import bead_exports

    mio.write_mask(out_dir / "masks" / f"{stem}_mask.png", res["mask"])
    mio.write_labels(out_dir / "labels" / f"{stem}_labels.tif", res["labels"])
    bead_exports.write_bead_outputs(out_dir, stem, res["labels"], image, res["prob"],
                                    roi="roi" in exports, geojson="geojson" in exports,
                                    ome_tiff="ome_tiff" in exports)
    if save_prob:
        mio.write_image(out_dir / "prob" / f"{stem}_prob.tif", res["prob"])
    if figures:
        gray = display_gray(image)
        ov = overlay_image(gray, res["labels"])
        mio.write_image(out_dir / "overlays" / f"{stem}_overlay.png", ov)
        mio.write_image(out_dir / "comparisons" / f"{stem}_comparison.png",
                        comparison_image(gray, res["prob"], ov))


# ----------------------------------------------------------------------------- many frames

class UnusableImageError(ValueError):
    """A frame that reads fine but holds nothing to segment; the message names the file."""


def check_usable(image: np.ndarray, path) -> None:
    """Raise :class:`UnusableImageError` for a frame with non-finite (NaN / inf) pixels or
    one value everywhere.

    Either way the network would get a meaningless input (NaN spreads through the
    normalisation, a constant frame normalises to all zeros) and the row would read
    ``ok, 0 beads``: a count of zero that is not a measurement.
    """
    x = np.asarray(image)
    if x.size == 0:
        raise UnusableImageError(f"{path}: unusable image: no pixels")
    finite = np.isfinite(x)
    if not finite.all():
        n_bad = int(x.size - np.count_nonzero(finite))
        what = "every pixel" if n_bad == x.size else f"{n_bad} of {x.size} pixel values"
        raise UnusableImageError(f"{path}: unusable image: {what} NaN or infinite")
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        raise UnusableImageError(f"{path}: unusable image: constant (every pixel {lo:g}), "
                                 "nothing to segment")


def min_frame_side(pre: dict) -> int:
    """Smallest frame edge (native px) worth predicting: one pad multiple at model scale.

    A smaller frame (a 3x3 thumbnail) holds less than one network step: its row would read
    ``ok, 0 beads``, a count that is not a measurement.
    """
    pad = int(pre.get("pad_multiple", 16))
    return max(1, math.ceil(pad / float(pre["scale"]) - 1e-9))


def check_size(image: np.ndarray, path, pre: dict) -> None:
    """Raise :class:`UnusableImageError` for a frame below :func:`min_frame_side`."""
    h, w = np.asarray(image).shape[:2]
    n = min_frame_side(pre)
    if min(h, w) < n:
        raise UnusableImageError(
            f"{path}: too small to analyse: {w}x{h} px, each side needs at least {n} px "
            f"({int(pre.get('pad_multiple', 16))} px at model scale {float(pre['scale']):g})")


#: Errors that fail one image (reported by name, the rest still processed).
FRAME_ERRORS = (mio.ImageReadError, OSError, ValueError, MemoryError)
#: Nice value added to the pipeline's worker threads (reading, bead splitting, writing).
#: On 2 cores this took a 3840x2160 frame from 0.97 to 0.86 s (tiles of 1024).
WORKER_NICE = 10


class _Inline:
    """Executor stand-in that runs each job at once (``pipelined=False``)."""

    def __init__(self, *_, **__):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # delivered by .result(), as a thread's would be
            fut.set_exception(exc)
        return fut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _lower_priority(nice: int) -> None:
    """Raise this worker thread's nice value (Linux: per thread), so that on a machine
    with few cores the network's threads win every contended core and the workers use
    the gaps; where that is not possible, nothing changes."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except (AttributeError, OSError):
        pass


def _base_row(path: Path) -> dict:
    return {"file": path.name, "dilution": mio.parse_dilution(path.name) or ""}


def _error_row(path: Path, exc: BaseException, seconds: float) -> dict:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if path.name not in msg:
        msg = f"{path}: {msg}"
    log.error("%s", msg)
    return {**_base_row(path), "status": msg, "time_s": round(seconds, 3)}


def predict_files(files, predict_fn, cfg: dict, out_dir: Path, *, tile_size: int,
                  overlap: int, batch_size: int, threshold: float | None = None,
                  save_prob: bool = False, figures: bool = True, pipelined: bool = True,
                  workers: int | None = None, on_row=None,
                  exports: frozenset[str] = frozenset(), auto_scale: bool = False
                  ) -> list[dict]:
    """Predict every file and write its outputs; one summary row per file, in input order.

    Three stages per frame: *load* (read + :func:`preprocess_frame`), *forward*
    (``tiling.predict_tiled`` with ``predict_fn``, on the calling thread) and *finish*
    (:func:`finish_frame` + :func:`write_outputs`). With ``pipelined`` the next frames are
    loaded and the previous ones finished on worker threads while the current frame's tiles
    go through the network, so file I/O and bead splitting hide behind the forward passes.
    ``workers`` threads load and as many finish (default :func:`default_workers`: 1 on a
    2-core machine; on a GPU node, where a forward pass takes milliseconds, up to 8 frames
    are read and finished at once). The workers run at a lower CPU priority
    (:data:`WORKER_NICE`) and OpenCV runs single-threaded meanwhile: on a machine with few
    cores the network keeps its cores and the workers fill the gaps, instead of every stage
    slowing the others. Frames are read at most ``workers`` ahead and at most one waits to
    be finished, so memory stays bounded by ``2 * workers + 2`` frames, never by the number
    of files. A frame that fails in any stage gets its error (naming the file) as
    ``status``; the others are still processed.

    ``time_s`` in a row is the sum of that frame's own stage times (they overlap with
    neighbouring frames, so the rows add up to more than the wall time). ``on_row(row)`` is
    called as each row completes (progress bars).

    Every row carries ``bead_area_ratio`` and, outside :data:`SCALE_RATIO_RANGE`, a
    ``scale_warning``. With ``auto_scale`` such a frame is preprocessed again at the scale
    that brings its beads to the training size (``scale_used``) and predicted once more.
    """
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    import microbead_metrics

    pre = cfg["preprocessing"]
    channels, pad = int(pre["channels"]), int(pre.get("pad_multiple", 16))
    files = [Path(f) for f in files]
    rows: list[dict | None] = [None] * len(files)

    def load(path):
        t = time.perf_counter()
        image = mio.read_image(path, channels=channels)
        check_size(image, path, pre)
        check_usable(image, path)
        return image, preprocess_frame(image, pre), time.perf_counter() - t

    thr = float(cfg["postprocessing"]["threshold"] if threshold is None else threshold)
    train_area = float(cfg["postprocessing"]["median_bead_area_px"])
    ref_area = reference_bead_area(cfg["postprocessing"])

    def tiled(x):
        return tiling.predict_tiled(x, predict_fn, tile_size=tile_size, overlap=overlap,
                                 batch_size=batch_size, pad_multiple=pad)

    def forward(image, x):
        prob = tiled(x)
        scale = float(pre["scale"])
        if auto_scale:
            ratio = bead_area_ratio(microbead_metrics.above_threshold(prob, thr), ref_area)
            if scale_warning(ratio):
                scale *= float(np.clip(ratio ** -0.5, 0.25, 4.0))
                x = preprocess_frame(image, {**pre, "scale": scale})
                prob = tiled(x)
        return prob, scale, x

    def finish(path, image, fwd, seconds):
        prob_small, scale, x_small = fwd
        t = time.perf_counter()
        try:
            used = cfg if scale == float(pre["scale"]) else {
                **cfg, "preprocessing": {**pre, "scale": scale},
                "postprocessing": {**cfg["postprocessing"], "median_bead_area_native_px":
                                   train_area / scale ** 2}}
            res = finish_frame(prob_small, image.shape, used, threshold, image_small=x_small)
            write_outputs(out_dir, path.stem, image, res, save_prob=save_prob, figures=figures,
                          exports=exports)
        except FRAME_ERRORS as exc:
            return _error_row(path, exc, seconds + time.perf_counter() - t)
        dt = seconds + time.perf_counter() - t
        log.info("%s: %d beads (area estimate %.1f), %.2f%% coverage, %.2f s", path.name,
                 res["beads"], res["area_estimate"], res["coverage_pct"], dt)
        if res["scale_warning"]:
            log.warning("%s: %s%s", path.name, res["scale_warning"],
                        f" (auto-scaled: model scale {scale:.4g})" if scale != pre["scale"]
                        else "")
        return {
            **_base_row(path), "width": image.shape[1], "height": image.shape[0],
            "beads": res["beads"], "n_components": res["n_components"],
            "coverage_pct": round(res["coverage_pct"], 4),
            "mean_bead_area_px": round(res["mean_bead_area_px"], 2),
            "area_estimate": round(res["area_estimate"], 2),
            "bead_area_ratio": round(res["bead_area_ratio"], 3),
            "scale_used": round(scale, 6), "scale_warning": res["scale_warning"],
            "rejected_objects": res["rejected"],
            "time_s": round(dt, 3),
            "status": "ok",
        }

    def done(i, row):
        rows[i] = row
        if on_row is not None:
            on_row(row)

    n = max(1, int(workers or default_workers())) if pipelined else 1
    pool = ThreadPoolExecutor if pipelined else _Inline
    cv2_threads = cv2.getNumThreads()
    if pipelined:  # the stages are the parallelism; OpenCV's own pool would oversubscribe
        cv2.setNumThreads(1)
    try:
        with pool(n, thread_name_prefix="mb-load", initializer=_lower_priority,
                  initargs=(WORKER_NICE,)) as loader, \
                pool(n, thread_name_prefix="mb-finish", initializer=_lower_priority,
                     initargs=(WORKER_NICE,)) as finisher:
            _schedule(files, loader, load, forward, finisher, finish, done, ahead=n)
    finally:
        cv2.setNumThreads(cv2_threads)
    return rows


def default_workers() -> int:
    """Load and finish threads each: half the CPUs this process may use, 1 to 8 (1 on a
    2-core machine, where the network needs both cores). On an H100 node with 16 CPUs,
    figures on, 4 workers gave 0.42 s/frame and 8 gave 0.24 s/frame. CPUs as
    :func:`runtime.usable_cpus` counts them (affinity, ``NCPUS``, ``OMP_NUM_THREADS``)."""
    return max(1, min(8, runtime.usable_cpus() // 2))


def _schedule(files, loader, load, forward, finisher, finish, done, ahead: int = 1) -> None:
    """Run ``load`` on ``loader`` ``ahead`` frames ahead, ``forward`` here, ``finish`` on
    ``finisher`` (at most ``ahead + 1`` frames queued or running); ``done(i, row)`` in
    input order."""
    loads: list = []  # read futures of the frames not yet taken, in input order
    finishing: list = []

    def drain(keep: int):
        while len(finishing) > keep:
            i, fut = finishing.pop(0)
            done(i, fut.result())

    n_read = 0

    def read_up_to(last: int):  # submit reads of frames up to index ``last``
        nonlocal n_read
        while n_read <= min(last, len(files) - 1):
            loads.append(loader.submit(load, files[n_read]))
            n_read += 1

    try:
        for i, path in enumerate(files):
            read_up_to(i + ahead)  # the next frames are read while this one is in the network
            fut = loads.pop(0)
            seconds = 0.0
            try:
                image, x, seconds = fut.result()
                t = time.perf_counter()
                prob_small = forward(image, x)
                seconds += time.perf_counter() - t
            except FRAME_ERRORS as exc:
                drain(0)  # keep rows and log lines in input order
                done(i, _error_row(path, exc, seconds))
                continue
            del x
            drain(ahead)
            finishing.append((i, finisher.submit(finish, path, image, prob_small, seconds)))
    except KeyboardInterrupt:
        drain(0)  # frames already past the network are finished and reported (Ctrl-C)
        raise
    drain(0)


def fit_dilution_series(dilutions, counts) -> dict:
    """Least-squares fit of log10(count) = a + b log10(dilution) over images with count > 0.

    ``counts`` may be densities (beads per megapixel), as ``write_dilution_outputs`` gives.

    A perfect dilution series has slope b = -1 (half the beads per doubling). Returns
    ``slope``, ``intercept``, ``r2``, ``n`` (images used) and ``skipped``: "" when fitted,
    else why no line was fitted (fewer than two images with beads, or one dilution only:
    a line through one dilution has no slope), with NaN numbers.
    """
    d = np.asarray(dilutions, float)
    c = np.asarray(counts, float)
    ok = (d > 0) & (c > 0)
    levels = np.unique(d[ok])
    skipped = ""
    if levels.size == 1:
        skipped = (f"every image with beads is at one dilution ({levels[0]:g}x); a slope "
                   "needs at least two dilutions")
    elif levels.size == 0:
        skipped = "no image with beads and a dilution in its name"
    if skipped:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"),
                "n": int(ok.sum()), "skipped": skipped}
    x, y = np.log10(d[ok]), np.log10(c[ok])
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": float(b), "intercept": float(a), "r2": r2, "n": int(ok.sum()),
            "skipped": ""}


def dilution_fit_text(fit: dict) -> str:
    """One line on a :func:`fit_dilution_series` result, for the log and the summary."""
    if fit.get("skipped"):
        return f"dilution series: no fit ({fit['skipped']})"
    return (f"dilution series: log-log slope {fit['slope']:.3f} (ideal -1), "
            f"R² {fit['r2']:.3f} over {fit['n']} images")


def write_dilution_outputs(out_dir: Path, rows: list[dict]) -> dict | None:
    """``dilution_counts.csv`` and a log-log plot of bead density (beads per megapixel of
    frame, as ``quantify_assay.py`` without ``--um_per_px``) with the fitted slope, if names
    carry a dilution. Density, not beads per image: frames of one series may differ in size.
    """
    pts = [(r["dilution"], r["beads"] / (r["width"] * r["height"] / 1e6), r["beads"],
            r["width"] * r["height"] / 1e6, r["file"]) for r in rows
           if r["status"] == "ok" and r.get("dilution") and r["width"] * r["height"] > 0]
    if not pts:
        return None
    fit = fit_dilution_series([p[0] for p in pts], [p[1] for p in pts])
    with open(out_dir / "dilution_counts.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "dilution", "beads", "area_mp", "beads_per_mp"])
        for d, dens, c, mp, f in sorted(pts):
            w.writerow([f, d, c, f"{mp:.6g}", f"{dens:.6g}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    d = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    floor = 0.5 / max(p[3] for p in pts)  # an image without beads, drawn at half a bead
    ax.scatter(d, np.maximum(y, floor), color="tab:blue", zorder=3, label="frames")
    if math.isfinite(fit["slope"]):
        xs = np.geomspace(d.min(), d.max(), 50)
        ax.plot(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), color="tab:red",
                label=f"fit: slope {fit['slope']:.2f}, R² {fit['r2']:.3f}")
        ref = 10 ** (fit["intercept"] + fit["slope"] * np.log10(d.min()))
        ax.plot(xs, ref * d.min() / xs, "k--", lw=0.8, label="ideal slope -1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dilution (x)")
    ax.set_ylabel("bead density (beads per megapixel)")
    ax.set_title("Bead density across the dilution series"
                 + ("\n(no line fitted: see prediction_summary.txt)" if fit["skipped"]
                    else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dilution_counts.png", dpi=110)
    plt.close(fig)
    return fit


def write_summaries(out_dir: Path, rows: list[dict], meta: dict, fit: dict | None) -> None:
    with open(out_dir / "prediction_summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [
        "Microbead prediction summary",
        "============================",
        f"model:      {meta['model']}",
        f"chosen as:  {meta['note']}",
        f"threshold:  {meta['threshold']}",
        f"scale:      {meta['scale']:.4g} model px per frame px; tile {meta['tile_size']} px, "
        f"overlap {meta['overlap']} px, TTA {'on' if meta['tta'] else 'off'}",
        *([f"INTERRUPTED: {meta['interrupted']}"] if meta.get("interrupted") else []),
        f"images:     {len(ok)} ok, {len(rows) - len(ok)} failed"
        + (f"; {meta['wall_s']:.1f} s wall ({meta['wall_s'] / max(1, len(rows)):.2f} s/image; "
           "per-image times below overlap)" if "wall_s" in meta else ""),
        "",
        f"{'file':<48} {'size':>11} {'beads':>6} {'area est':>8} {'cover %':>8} {'time s':>7}",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"{r['file'][:48]:<48} {r['width']:>5}x{r['height']:<5} {r['beads']:>6} "
                f"{r['area_estimate']:>8.1f} {r['coverage_pct']:>8.2f} {r['time_s']:>7.2f}")
        else:
            lines.append(f"{r['file'][:48]:<48} FAILED: {r['status']}")
    if ok:
        lines += ["", f"total beads: {sum(r['beads'] for r in ok)}; mean per image "
                      f"{np.mean([r['beads'] for r in ok]):.1f}"]
    if fit:
        lines.append(dilution_fit_text(fit))
    (out_dir / "prediction_summary.txt").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    add = functools.partial(cli.add_option, p)
    add("model", required=True, help="model file (.hdf5/.keras) or run folder")
    add("input_dir", required=True, help="folder of images to predict")
    add("output_dir", required=True, help="folder for the outputs (created)")
    add("threshold", type=cli.ranged(float, 0, 1, lo_open=True, hi_open=True), default=None,
        help="probability cut, 0 < t < 1 (default: the run's config.json)")
    add("tile_size", type=cli.ranged(int, MIN_TILE), default=2048,
        help="max tile edge in model pixels, a multiple of the network's pad multiple "
             "(config.json, 16 at depth 4) (a 3840x2160 frame at the usual 0.5 scale is "
             "one tile; lower it if the GPU runs out of memory)")
    add("overlap", type=cli.ranged(int, 0), default=None,
        help="minimum tile overlap in model pixels (default: the network's receptive field, "
             "208 px at depth 4, so tiled equals whole-frame prediction; tiling.default_overlap)")
    add("batch_size", type=cli.ranged(int, 1), default=1,
        help="tiles per forward pass (bounds memory)")
    add("tta", action="store_true", help="flip/rotation test-time augmentation (8x slower)")
    add("save_prob", action="store_true", help="also write prob/<stem>_prob.tif (float32)")
    add("no_figures", action="store_true", help="skip overlays and comparison images")
    add("roi", action="store_true",
        help="also write rois/<stem>_rois.zip, an ImageJ ROI set of the bead outlines for "
             "Fiji's ROI Manager (needs: pip install roifile)")
    add("geojson", action="store_true",
        help="also write geojson/<stem>.geojson, the beads as QuPath detections")
    add("ome_tiff", action="store_true",
        help="also write ome/<stem>.ome.tif: the frame and its bead labels as two channels")
    cli.add_overwrite(p)
    add("workers", type=cli.ranged(int, 1), default=None,
        help="threads reading and as many writing frames (default: CPUs/2, 1 to 8)")
    add("auto_scale", action="store_true",
        help="when a frame's beads are not the training beads' size (scale_warning), "
             "rescale it to match and predict again")
    add("no_pipeline", action="store_true",
        help="run read, forward pass and writing one after the other (default: overlapped)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = [runtime.add_log_handler()]
    runtime.configure_threads()
    try:
        return _checked_run(args, handlers)
    except KeyboardInterrupt:  # before the frames started (their loop reports its own)
        log.error("interrupted before any frame was predicted")
        return EXIT_INTERRUPTED
    finally:
        runtime.remove_log_handlers(handlers)


def stem_clashes(files) -> list[str]:
    """One line per output stem that two or more inputs share (``a.png`` and ``a.tif``):
    their outputs (``masks/a_mask.png`` ...) would overwrite each other."""
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(Path(f).stem, []).append(Path(f))
    return [f"{', '.join(str(p) for p in group)}: one stem {stem!r}, one set of output files; "
            "rename all but one" for stem, group in sorted(by_stem.items()) if len(group) > 1]


def _checked_run(args, handlers: list) -> int:
    """Usage checks (nothing written), the output-folder policy, the log file, the run."""
    if args.roi:
        import bead_exports

        try:
            bead_exports.require_roifile()
        except ImportError as exc:
            return cli.fatal(log, "%s", exc)
    out_dir = Path(args.output_dir)
    # Frames are read from --input_dir, never written there; the run folder of --model may
    # hold a predictions folder, but the output folder must not hold the model.
    where = {"protected": [args.input_dir], "inputs": [args.model]}
    try:  # the cheap refusal first; claim_output_dir below repeats it, then cleans
        cli.check_output_dir(out_dir, overwrite=args.overwrite, log_name=LOG_NAME, **where)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    try:
        files = mio.list_images(args.input_dir)
    except FileNotFoundError as exc:
        return cli.fatal(log, "%s", exc)
    if not files:
        return cli.fatal(log, "%s: no images found (%s)", args.input_dir,
                         ", ".join(mio.IMAGE_EXTENSIONS))
    clashes = stem_clashes(files)
    if clashes:  # before any work: one frame's outputs would silently replace the other's
        log.error("%d input name clash(es), nothing predicted:\n  %s", len(clashes),
                  "\n  ".join(clashes))
        return cli.EXIT_PARTIAL
    try:
        model_path, cfg_path, note = resolve_model(args.model)
        cfg = read_run_config(cfg_path)
    except SystemExit as exc:
        return cli.fatal(log, "%s", str(exc).removeprefix("error: "))
    pad = int(cfg["preprocessing"].get("pad_multiple", 16))
    if args.tile_size % pad or args.tile_size < pad:
        return cli.fatal(log, "--tile_size %d: must be a multiple of %d, the network's pad "
                         "multiple (%s); e.g. %d", args.tile_size, pad, cfg_path,
                         max(pad, args.tile_size // pad * pad))
    try:
        claim = cli.claim_output_dir(out_dir, OUTPUT_FILES, script="predict_microscope",
                                     overwrite=args.overwrite, log_name=LOG_NAME, **where)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    with claim:
        handlers.append(runtime.add_log_handler(out_dir / LOG_NAME))
        claim.report(log)
        if claim.removed:
            log.info("--overwrite: removed %d file(s) of the previous prediction in %s",
                     len(claim.removed), out_dir)
        return _run(args, files, model_path, cfg, note, out_dir)


def _run(args, files, model_path, cfg, note, out_dir: Path) -> int:
    from tqdm import tqdm

    import models

    cfg = mcfg.for_model(cfg, mcfg.model_name_of(model_path))
    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    pad = int(pre.get("pad_multiple", 16))
    tile = args.tile_size  # a multiple of pad (checked in _checked_run)
    threshold = float(post["threshold"] if args.threshold is None else args.threshold)
    log.info("model: %s", note)
    log.info("preprocessing from config: scale %.4g (pixel_scale %.4g), %d channel(s), %s; "
             "threshold %.3f; median bead area %.1f px (model scale)", pre["scale"],
             pre["pixel_scale"], pre["channels"], pre["normalization"], threshold,
             post["median_bead_area_px"])
    log.info("object filter: %s", bead_filter.describe(post.get("object_filter")))
    if post.get("predicted_bead_area_px"):
        log.info("scale check against the model's own beads on its validation tiles: %.1f px "
                 "(model scale)", post["predicted_bead_area_px"])
    try:
        model = models.load_model(model_path)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return cli.fatal(log, "%s", msg if str(model_path) in msg else f"{model_path}: {msg}")
    log.info("%s", models.device_line())
    predict_fn = tta_predict_fn(make_keras_predict_fn(model), args.tta)
    depth = network_depth(model, pad)
    overlap, overlap_source = resolve_overlap(args.overlap, depth)
    log.info("tiles of at most %d px, overlap %d px (%s)", tile, overlap, overlap_source)
    if overlap > tile - pad:
        log.warning("--tile_size %d leaves room for an overlap of only %d px (< %d): frames "
                    "larger than one tile are not predicted exactly as a whole; use "
                    "--tile_size >= %d", tile, tile - pad, overlap, 2 * overlap + pad)
    meta = {"model": str(model_path), "note": note, "threshold": threshold,
            "scale": float(pre["scale"]), "tile_size": tile, "overlap": overlap,
            "overlap_source": overlap_source, "network_depth": depth, "tta": args.tta}
    (out_dir / "prediction_config.json").write_text(json.dumps(
        {**meta, "input_dir": str(Path(args.input_dir).resolve()), "run_config": cfg},
        indent=2))
    subdirs = ["masks", "labels"] + ([] if args.no_figures else ["overlays", "comparisons"])
    subdirs += ["prob"] if args.save_prob else []
    for sub in subdirs:
        (out_dir / sub).mkdir(exist_ok=True)

    bar = tqdm(total=len(files), desc="predicting", unit="img")
    finished: list[dict] = []

    def on_row(row):
        finished.append(row)
        bar.update(1)
        if row["status"] == "ok":
            bar.set_postfix(beads=row["beads"])

    t0 = time.perf_counter()
    try:
        rows = predict_files(files, predict_fn, cfg, out_dir, tile_size=tile,
                             overlap=overlap, batch_size=args.batch_size,
                             threshold=threshold, save_prob=args.save_prob,
                             figures=not args.no_figures, pipelined=not args.no_pipeline,
                             workers=args.workers, on_row=on_row,
                             exports=frozenset(k for k in ("roi", "geojson", "ome_tiff")
                                               if getattr(args, k)),
                             auto_scale=args.auto_scale)
    except KeyboardInterrupt:
        bar.close()
        # What finished is kept and summarised; the frames not reached are named as such.
        meta["wall_s"] = time.perf_counter() - t0
        meta["n_images"] = len(finished)
        meta["interrupted"] = f"interrupted after {len(finished)} of {len(files)} frames"
        log.error("%s; the summary lists the finished frames only", meta["interrupted"])
        write_summaries(out_dir, finished, meta, write_dilution_outputs(out_dir, finished))
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    meta["wall_s"] = wall
    meta["n_images"] = len(rows)
    fit = write_dilution_outputs(out_dir, rows)
    write_summaries(out_dir, rows, meta, fit)
    failed = [r for r in rows if r["status"] != "ok"]
    if fit:
        log.info("%s", dilution_fit_text(fit))
    if failed:
        log.error("%d of %d image(s) failed:\n  %s", len(failed), len(rows),
                  "\n  ".join(r["status"] for r in failed))
        return 1
    log.info("done: %d image(s) in %.1f s (%.2f s/image) -> %s", len(rows), wall,
             wall / max(1, len(rows)), out_dir)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hides cuInit E0000 without a GPU
    sys.exit(main())

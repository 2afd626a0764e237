"""The prediction core: a run's model and config, preprocessing, tiled inference, one frame.

Purpose
    Everything that turns one native-resolution frame into bead masks, labels and counts,
    shared by ``predict_microscope.py`` (the CLI), ``export_model.py`` and the benchmarks.
    Preprocessing is rebuilt from the run's ``config.json`` (scale relative to the training
    tiles, channels, normalization, threshold, median bead area), never from re-typed
    flags, so training and prediction cannot drift. The frame is normalised once, as a
    whole, at the training tiles' scale; overlapping tiles are predicted in batches and
    their *probabilities* blended (``tiling.predict_tiled``); the threshold is applied once,
    after blending. Touching beads are split (``microbead_metrics.label_beads``) and the
    run's object filter (``bead_filter``) drops objects unlike any confirmed bead.

Contents
    * a run: :func:`resolve_model`, :func:`read_run_config` (errors:
      :class:`ModelNotFoundError`, :class:`RunConfigError`);
    * a frame: :func:`check_size`, :func:`check_usable` (:class:`UnusableImageError`),
      :func:`preprocess_frame`, :func:`make_keras_predict_fn`, :func:`tta_predict_fn`,
      :func:`network_depth`, :func:`resolve_overlap`, :func:`finish_frame`,
      :func:`predict_frame`;
    * the scale check: :func:`reference_bead_area`, :func:`bead_area_ratio`,
      :func:`scale_warning` and :func:`auto_scale_factor`, the one decision on rescaling a
      frame (``--auto_scale``).

Errors are exceptions naming the file and the fix; only entry points turn them into exit
codes. Nothing happens at import; TensorFlow / Keras are never imported here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

import bead_filter
import microbead_config as mcfg
import microbead_io as mio
import tiling

# A frame whose typical bead is this much smaller / larger (area, at model scale) than the
# model's own beads on its validation tiles is probably at another pixel scale: counts are
# then unreliable. Correct real frames span 0.46-1.65 (leave-one-frame-out on the users' 49
# tiles: one frame's beads are half the usual area, clumps lift crowded tiles); a frame at
# 2x or 0.5x the training scale gives ~4 or ~0.25 (area goes with the square of the scale).
SCALE_RATIO_RANGE = (0.4, 2.0)
# Fewer components than this give no scale verdict: a blank frame's few specks are no
# sample of the bead size (the demo's blank frames were flagged "0.32x" with 5-6 specks).
MIN_BEADS_FOR_SCALE = 20
#: Default largest tile edge (model px) and tiles per forward pass of the CLI (and the
#: benchmarks). A 3840x2160 frame at model scale 1 is 6 tiles of 1128x1344 (2048: 4 of
#: 1128x1968): on the demo's frames the same masks, labels and counts, about 250 MB less
#: memory and 2 % more time per forward pass (median 2.49 against 2.44 s, interleaved, 2
#: CPU cores); the pipelined predictor was no slower (1.37x against 1.39-1.40x).
DEFAULT_TILE_SIZE = 1536
DEFAULT_BATCH_SIZE = 1
#: Threads splitting one frame's clumps (``microbead_metrics.label_beads``; same labels
#: with any number). Two: a dense frame's split is most of what is left to do after a
#: folder's last forward pass, and on a 2-core machine both cores are free then.
SPLIT_THREADS = 2
#: Bounds of the factor :func:`auto_scale_factor` applies to a frame's model scale.
AUTO_SCALE_LIMITS = (0.25, 4.0)


class PredictionError(Exception):
    """A run or frame that cannot be predicted; the message names the file and the fix."""


class ModelNotFoundError(PredictionError):
    """``--model`` names no usable model file, run folder or config.json."""


class RunConfigError(PredictionError):
    """A run's ``config.json`` is unreadable or invalid (the message names the keys)."""


class UnusableImageError(PredictionError, ValueError):
    """A frame that reads fine but holds nothing to segment; the message names the file."""


# ----------------------------------------------------------------------------- config / model

def read_run_config(path: Path) -> dict:
    """A run's ``config.json``, validated by :func:`microbead_config.read_run_config`
    (unknown or missing keys are an error).

    Raises
    ------
    RunConfigError
        The file is unreadable or invalid; the message names the file and the keys.
    """
    try:
        return mcfg.read_run_config(path)
    except mcfg.ConfigError as exc:
        raise RunConfigError(str(exc)) from None


def resolve_model(model_arg: str) -> tuple[Path, Path, str]:
    """Model file, its config.json and a note on how it was chosen.

    A run folder resolves to the model with the highest ``best_val_jacard`` in its
    ``training_summary.csv`` (k-fold runs: the best fold).

    Raises
    ------
    ModelNotFoundError
        No summary / finished model in a run folder, no model file, or no ``config.json``
        beside it; the message names the path and what to do.
    """
    p = Path(model_arg)
    if p.is_dir():
        summary = p / mcfg.SUMMARY_FILE
        if not summary.is_file():
            raise ModelNotFoundError(f"{summary}: not found; pass a model file instead")
        rows = [r for r in mcfg.read_summary(summary) if r.get("best_val_jacard")]
        if not rows:
            raise ModelNotFoundError(f"{summary}: no finished model listed; pass a model file "
                                     "instead")
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
        raise ModelNotFoundError(f"{model_path}: model file not found")
    cfg = model_path.parent / mcfg.CONFIG_FILE
    if not cfg.is_file():
        raise ModelNotFoundError(
            f"{cfg}: not found next to {model_path.name}. Prediction rebuilds "
            "preprocessing (scale, channels, normalization, threshold) from it; copy the "
            "run's config.json next to the model."
        )
    return model_path, cfg, note


# ----------------------------------------------------------------------------- one frame


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


def preprocess_frame(image: np.ndarray, pre: dict, threads: int = 1) -> np.ndarray:
    """Native frame ``(H, W, C)`` -> normalised model-scale input, exactly as in training.

    Flat-field runs (the default): resize the frame to model scale (``scale`` model px per
    frame px), then normalise with the stored window and levels, exactly as each training
    tile was; the normalisation is local, so a tile cut from the frame gets the same values.
    Percentile runs (older): resize to the stored-tile scale (area), normalise once for the
    whole frame, resize to model scale, as those runs were trained.
    ``threads`` > 1 normalises a local method in row strips side by side
    (``microbead_io.preprocess_image``: the same values), for a frame that nothing else is
    waiting on.
    """
    pixel_scale = float(pre["pixel_scale"])
    scale = float(pre["scale"])
    norm = pre.get("normalization") or mio.DEFAULT_NORMALIZATION
    if norm.get("method", "percentile") != "percentile":
        # Local (crop-invariant) methods run at model scale, as on the training tiles.
        return mio.preprocess_image(image, norm, scale=None if math.isclose(scale, 1.0)
                                    else scale, threads=threads)
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


def needs_colour(cfg: dict) -> bool:
    """Whether the model's object filter has a colour bound (then :func:`finish_frame`
    wants the frame in RGB: ``colour``)."""
    return "min_colour" in (cfg["postprocessing"].get("object_filter") or {})


def colour_at(rgb: np.ndarray | None, shape) -> np.ndarray | None:
    """The native RGB frame at the model-scale ``shape`` ``(h, w)`` (area resize), for the
    object filter's colour evidence; None for None or a frame without three channels."""
    if rgb is None or rgb.ndim != 3 or rgb.shape[-1] != 3:
        return None
    return rgb if rgb.shape[:2] == tuple(shape) else mio.resize_image(rgb, tuple(shape))


class FilteredBeads(NamedTuple):
    """:func:`filtered_beads`' result, at model scale."""

    labels: np.ndarray  #: int32 bead ids 1..N after the object filter
    mask: np.ndarray  #: uint8 {0, 1}: the threshold mask, less the rejected objects
    rejected: int  #: objects the filter dropped
    component_areas: np.ndarray  #: int64 areas of ``mask``'s 8-connected components


def filtered_beads(prob_small: np.ndarray, post: dict, threshold: float,
                   image_small: np.ndarray | None = None, colour: np.ndarray | None = None
                   ) -> FilteredBeads:
    """Model-scale bead labels after the object filter (:class:`FilteredBeads`).

    The split (``microbead_metrics.label_beads``) and the run's object filter, as
    :func:`finish_frame` and :func:`auto_scale_factor` both need them: the scale check and
    the ``--auto_scale`` decision judge the same objects the counts are made of.
    ``colour`` is the native RGB frame (resized here), used only by a colour bound. The
    mask's component areas (the scale check's statistic) come from the split's own
    component pass (``microbead_metrics.kept_component_areas``), not from another.
    """
    import microbead_metrics

    mask_small = microbead_metrics.above_threshold(prob_small, threshold).astype(np.uint8)
    labels_small, comps = microbead_metrics.label_beads_and_components(
        mask_small, median_area=float(post["median_bead_area_px"]), prob=prob_small,
        threads=SPLIT_THREADS)
    rule = post.get("object_filter")
    if not rule:
        return FilteredBeads(labels_small, mask_small, 0, comps.areas)
    img = None if image_small is None else np.asarray(image_small, np.float32)
    if img is not None and img.ndim == 3:
        # One channel is its own mean (the same values, without a pass over the frame).
        img = img[..., 0] if img.shape[-1] == 1 else img.mean(axis=-1)
    rgb = colour_at(colour, prob_small.shape) if "min_colour" in rule else None
    feats = bead_filter.object_features(labels_small, prob_small, img, colour=rgb)
    keep = bead_filter.accepted(feats, rule)
    rejected = int((~keep & (feats["area_px"] > 0)).sum())
    if not rejected:
        return FilteredBeads(labels_small, mask_small, 0, comps.areas)
    areas = microbead_metrics.kept_component_areas(comps, labels_small, keep)
    labels_small = bead_filter.apply_filter(labels_small, keep)
    return FilteredBeads(labels_small, (labels_small > 0).astype(np.uint8), rejected, areas)


def finish_frame(prob_small: np.ndarray, native_shape, cfg: dict,
                 threshold: float | None = None, image_small: np.ndarray | None = None,
                 colour: np.ndarray | None = None) -> dict:
    """Threshold, bead instances and counts from model-scale probabilities.

    Parameters
    ----------
    prob_small : float32 ``(h, w)`` blended probabilities at model scale
    native_shape : the frame's ``(H, W, ...)``; outputs are at this resolution
    cfg : the run's config dict (with ``microbead_config.for_model`` applied, so that
        ``postprocessing.object_filter`` / ``predicted_bead_area_px`` are the model's own)
    image_small : float ``(h, w[, C])`` the normalised network input; needed when the
        object filter bounds contrast (without it those bounds are not applied)
    colour : float ``(H, W, 3)`` the native frame in RGB; needed when the filter has a
        colour bound (:func:`needs_colour`; without it that bound is not applied)

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
    native = prob_small.shape == (h, w)  # model scale 1: nothing to carry over
    prob = prob_small if native else mio.resize_image(prob_small, (h, w))
    scale = float(pre["scale"])
    area_native = float(post.get("median_bead_area_native_px")
                        or post["median_bead_area_px"] / scale ** 2)
    # Beads are split at model scale, where the network saw them and where the median bead
    # area was measured (4x fewer pixels than a 2x-downscaled frame's native grid: splitting
    # dense frames at native scale cost more than the forward pass). The ids are then carried
    # to native resolution and clipped to the native mask's outline.
    labels_small, mask_small, rejected, areas = filtered_beads(prob_small, post, thr,
                                                                image_small, colour)
    if native:
        # The split's labels are the label image: ids 1..N (label_beads, apply_filter), each
        # inside the mask, which is the (filtered) model-scale mask.
        mask, labels, n = mask_small, labels_small, int(labels_small.max())
    else:
        mask = microbead_metrics.above_threshold(prob, thr).astype(np.uint8)
        if rejected:
            # The native mask follows: a rejected object is not bead at any resolution.
            mask &= mio.resize_mask(mask_small, (h, w)).astype(np.uint8)
        labels = mio.resize_labels(labels_small, (h, w))
        labels[mask == 0] = 0
        # A bead smaller than a native pixel's reach can vanish when clipped to the native
        # outline: renumber what is left, so the count is the number of ids in the label
        # file.
        present = np.bincount(labels.ravel(), minlength=int(labels_small.max()) + 1) > 0
        present[0] = False
        n = int(present.sum())
        if n < present.size - 1:
            lut = np.zeros(present.size, labels.dtype)
            lut[present] = np.arange(1, n + 1, dtype=labels.dtype)
            labels = lut[labels]
    ratio = bead_area_ratio(areas, reference_bead_area(post))
    # At scale 1 the native mask is the model-scale mask: its components are counted.
    n_comp = int(areas.size) if native else microbead_metrics.count_components(mask)
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


def bead_area_ratio(component_areas: np.ndarray, median_area: float) -> float:
    """Median 8-connected component area of a model-scale mask / the training median area.

    ``component_areas``: the mask's (``microbead_metrics.component_areas``; the finisher
    has them from :func:`filtered_beads`). Components, not split beads: the split is itself
    guided by the training area, so it would hide a scale error. On dense frames clumps
    pull the median up a little; single beads still dominate the components. NaN with
    fewer than :data:`MIN_BEADS_FOR_SCALE` components or no training area.
    """
    areas = np.asarray(component_areas)
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


def auto_scale_factor(prob_small: np.ndarray, cfg: dict, threshold: float | None = None,
                      image_small: np.ndarray | None = None,
                      colour: np.ndarray | None = None) -> float | None:
    """The one ``--auto_scale`` decision: by what factor to rescale a frame, or None.

    ``prob_small`` is the frame's first prediction at the run's model scale. When its
    beads are not the training beads' size (:func:`scale_warning` of
    :func:`bead_area_ratio` against :func:`reference_bead_area`), the factor that brings
    them to that size, ``ratio ** -0.5`` clipped to :data:`AUTO_SCALE_LIMITS`; else None
    (keep the frame at the run's scale). The ratio is measured on the beads the object
    filter keeps (:func:`filtered_beads`, with ``image_small`` and ``colour`` as in
    :func:`finish_frame`): the same objects as the reported ratio and the counts, so
    smudges the filter drops cannot move the decision.
    """
    post = cfg["postprocessing"]
    thr = float(post["threshold"] if threshold is None else threshold)
    areas = filtered_beads(prob_small, post, thr, image_small, colour).component_areas
    ratio = bead_area_ratio(areas, reference_bead_area(post))
    if not scale_warning(ratio):
        return None
    return float(np.clip(ratio ** -0.5, *AUTO_SCALE_LIMITS))


def config_at_scale(cfg: dict, scale: float) -> dict:
    """``cfg`` for a frame predicted at model ``scale`` (``--auto_scale``): the scale and
    the native median bead area follow; ``cfg`` itself when ``scale`` is the run's."""
    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    if scale == float(pre["scale"]):
        return cfg
    return {**cfg, "preprocessing": {**pre, "scale": scale},
            "postprocessing": {**post, "median_bead_area_native_px":
                               float(post["median_bead_area_px"]) / scale ** 2}}


def predict_frame(image: np.ndarray, predict_fn, cfg: dict, *, tile_size: int, overlap: int,
                  batch_size: int, threshold: float | None = None, progress=None,
                  colour: np.ndarray | None = None) -> dict:
    """Probability, mask, bead labels and counts for one native-resolution frame.

    ``image``: float32 ``(H, W, C)`` in its stored value range (``microbead_io.read_image``);
    ``predict_fn``: ``(B, t, t, C) -> (B, t, t[, 1])`` probabilities. The three stages
    (:func:`preprocess_frame`, ``tiling.predict_tiled``, :func:`finish_frame`) run one
    after the other; ``prediction_pipeline.predict_files`` runs the same stages overlapped
    across frames.
    ``colour``: the frame in RGB for a colour bound (default: ``image`` itself when it has
    three channels). Returns :func:`finish_frame`'s dict.
    """
    if colour is None and image.ndim == 3 and image.shape[-1] == 3:
        colour = image
    x = preprocess_frame(image, cfg["preprocessing"])
    prob_small = tiling.predict_tiled(
        x, predict_fn, tile_size=tile_size, overlap=overlap, batch_size=batch_size,
        pad_multiple=int(cfg["preprocessing"].get("pad_multiple", 16)), progress=progress,
    )
    return finish_frame(prob_small, image.shape, cfg, threshold, image_small=x, colour=colour)


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



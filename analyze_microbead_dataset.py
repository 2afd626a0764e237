"""Check a microbead dataset and summarise it before anyone spends GPU hours on it.

What it does, in order:

1. **Integrity check** (every file read through ``microbead_io``): image/mask pairing,
   unpaired and unreadable files, mask value sets (0/255, 0/1, anti-aliased ...), image/mask
   size mismatches, duplicate images (identical decoded pixels), empty and nearly full masks,
   images whose contrast looks inverted relative to their mask, blank images. One row per
   problem in ``integrity_problems.csv`` and a table in the report.
2. **Statistics** per image and overall, on the masks *as training sees them*: each mask is
   binarized and resized to ``--image_size`` (default: the stored tile size, as training) with
   ``microbead_io.resize_mask`` and each image resized, then flat-field normalised with the
   spec the trainer computes for the same tiles (``microbead_io.flatfield_spec``). Objects per image
   (8-connected components) and a touching-bead-aware bead count
   (``microbead_metrics.count_beads``), positive-pixel ratio, object areas and equivalent
   diameters, brightness, contrast, focus, partial-mask suspects, per-dilution groups.
3. **Recommended training configuration** (``recommended_config.json``, loadable by
   ``train_microbead_optimized.py --config``) with the evidence behind each value in
   ``recommended_config_evidence.json`` and in the report.
4. **Label quality** (``label_quality``, at native resolution): each mask against its own
   image's darkness map: offset masks (best shift within +-6 px, with the gain), masks that
   mark almost none of their image's beads (with the image they match best: the mask of
   another tile?), bead-sized dark blobs left out, objects merging several beads; and the
   agreement of neighbouring grid tiles' masks on the pixels they share: the
   label-consistency ceiling. Per-file rows in ``integrity_problems.csv``,
   ``label_quality.csv``, ``overlap_pairs.csv``, ``label_quality.png``, a report section and
   ``summary.json`` keys ``label_quality`` and ``label_consistency_ceiling``.
   ``--write_fixed DIR`` writes a corrected copy of the dataset (offset masks shifted back,
   every other file copied byte for byte); the data folder is never written to.

Inputs
------
``DATA/images/<stem>.png|tif|...`` and ``DATA/masks/<stem>[_mask].png|tif``; paired by
``microbead_io.pair_files``. ``DATA/dataset.json`` (optional) is read for ``pixel_scale``.
Full frames under ``DATA/large/`` are not analysed (they are not training tiles).

Outputs (in ``--output_dir``; never inside ``--data_dir``)
----------------------------------------------------------
``summary.json``, ``per_image.csv``, ``per_dilution.csv``, ``integrity_problems.csv``,
``sample_images.png``, ``distribution_analysis.png``, ``MICROBEAD_ANALYSIS_RESULTS.md``,
``recommended_config.json``, ``recommended_config_evidence.json``, ``label_quality.csv``,
``overlap_pairs.csv``, ``label_quality.png``, ``analysis.log`` and
``analysis_manifest.json``. An existing non-empty output folder is refused unless
``--overwrite``, which replaces only these files (anything else in it is left alone) and
still refuses a folder holding files of these names without this script's manifest.

Exit status
-----------
0: analysed. 1: some files could not be analysed (unreadable, unpaired, size mismatch: the
other files are still analysed and the failures listed), or ``--strict`` and any integrity
problem at all. 2: nothing to analyse, or a bad data/output folder.

Example
-------
    python analyze_microbead_dataset.py --data_dir dataset_microscope \\
        --output_dir dataset_analysis --image_size 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

import cli
import label_quality as lq
import microbead_config as mcfg
import microbead_io as mio
import microbead_metrics as mm
import runtime
from tiling import receptive_field  # one formula: also sets predict's default tile overlap

log = logging.getLogger("microbead.analyze")

SCRIPT_NAME = "analyze_microbead_dataset.py"

# --------------------------------------------------------------------------- constants

#: A mask with more than this fraction of foreground pixels is reported as nearly full.
NEARLY_FULL_RATIO = 0.9
#: Inverted-contrast margin, in normalised intensity units (image mapped to [0, 1]).
POLARITY_MARGIN = 0.02
#: Images with beads needed before the dataset's own polarity overrides the dark-rim prior.
POLARITY_CONSENSUS_MIN = 5
#: Partial-mask rule: an image is a suspect when it has at least this many unlabelled
#: bead-like candidates ...
PARTIAL_MIN_UNLABELLED = 2
#: ... and they are at least this fraction of all bead-like candidates in the image
#: (labelled or not: the detector's own recall cancels out of the ratio).
PARTIAL_MIN_FRACTION = 0.25
#: Candidate thresholds as fractions of the median response / ring score measured at the
#: centres of labelled single beads (calibration on the dataset itself).
CANDIDATE_RESPONSE_FRACTION = 0.5
CANDIDATE_RING_FRACTION = 0.5

#: Recommendation rules (evidence in the report).
MIN_BEAD_DIAMETER_PX = 8.0
ASSUMED_DEPTH = 4  # models.build_unet default: four 2x2 poolings
MIN_STEPS_PER_EPOCH = 50
DEFAULT_VAL_FRACTION = mcfg.TRAINING_DEFAULTS["val_fraction"]  # the trainer's default
DICE_ONLY_MAX_FOREGROUND = 0.02
DICE_ONLY_MAX_EMPTY_FRACTION = 0.05
MAX_DENSITY_BINS = mm.DENSITY_MAX_BINS
MIN_IMAGES_PER_BIN = mm.DENSITY_MIN_PER_BIN

MANIFEST = "analysis_manifest.json"
LOG_FILE = "analysis.log"
REPORT = "MICROBEAD_ANALYSIS_RESULTS.md"
OUTPUT_FILES = (
    "summary.json", "per_image.csv", "per_dilution.csv", "integrity_problems.csv",
    "sample_images.png", "distribution_analysis.png", REPORT, "recommended_config.json",
    "recommended_config_evidence.json", "label_quality.csv", "overlap_pairs.csv",
    "label_quality.png", LOG_FILE, MANIFEST,
)

# Problem codes (column ``problem`` of integrity_problems.csv).
UNPAIRED_IMAGE = "unpaired_image"
UNPAIRED_MASK = "unpaired_mask"
DUPLICATE_STEM = "duplicate_stem"
UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_MASK = "unreadable_mask"
SIZE_MISMATCH = "size_mismatch"
MASK_0_1 = "mask_0_1"
MASK_ANTIALIASED = "mask_antialiased"
MASK_ENCODING = "mask_encoding"
EMPTY_MASK = "empty_mask"
NEARLY_FULL_MASK = "nearly_full_mask"
DUPLICATE_IMAGE = "duplicate_image"
INVERTED = "inverted_contrast"
BLANK_IMAGE = "blank_image"
MASK_OFFSET = "mask_offset"
MASK_MISMATCH = "mask_image_mismatch"
MISSED_BEADS = "missed_beads"
MERGED_BEADS = "merged_beads"
SKIPPED_FILE = "skipped_file"

PER_IMAGE_COLUMNS = (
    "file", "mask_file", "dilution", "native_width", "native_height", "mask_encoding",
    "n_objects", "n_beads", "positive_ratio", "mean_object_area_px", "median_object_area_px",
    "mean_equiv_diameter_px", "brightness", "contrast", "focus", "polarity",
    "n_bead_candidates", "n_unlabelled_candidates", "unlabelled_fraction",
    "partial_mask_suspect", "problems",
)


class OutputDirError(Exception):
    """The output folder cannot be used (inside the data folder, or holds foreign files)."""


# --------------------------------------------------------------------------- records


@dataclass
class Problem:
    """One integrity finding.

    ``severity`` is ``"error"`` when the file could not be analysed at all (unreadable,
    unpaired, size mismatch) and ``"warning"`` when it was analysed but looks wrong.
    """

    file: str
    problem: str
    detail: str
    severity: str = "warning"


@dataclass
class ImageRecord:
    """What one readable, size-consistent pair contributes (filled in two passes)."""

    image_path: Path
    mask_path: Path
    name: str
    native_shape: tuple[int, int]
    mask_encoding: str
    image_hash: str
    brightness: float
    contrast: float
    mask: np.ndarray  # uint8 (S, S) {0, 1} at the analysis size
    stats: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- small helpers


def _finite(x) -> float | None:
    """float, or None for NaN/inf (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0); NaN for no values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def _strip_path(msg: str, path: Path) -> str:
    """Error message without its leading ``path: `` (the table already names the file)."""
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + 0.5 * r


def _full_scale(raw: np.ndarray) -> float:
    """Full-scale value of the storage type (255, 65535, ...; floats: 1 or their max)."""
    if np.issubdtype(raw.dtype, np.integer):
        return float(np.iinfo(raw.dtype).max)
    top = float(np.nanmax(raw)) if raw.size else 1.0
    return 1.0 if top <= 1.0 else top


# --------------------------------------------------------------------------- integrity


def describe_mask_levels(raw: np.ndarray) -> tuple[str, str | None, str]:
    """Classify the value set of a raw mask.

    Parameters
    ----------
    raw : ndarray ``(H, W)`` or ``(H, W, C)``
        Mask as stored (``microbead_io._read_raw``), any dtype.

    Returns
    -------
    encoding : str
        ``"0/255"``, ``"0/1"``, ``"0/65535"``, ``"empty"``, ``"constant V"``,
        ``"instance labels (N ids)"`` (read as foreground = non-zero, no problem),
        ``"anti-aliased (N levels)"`` or ``"A/B"``; the rule is ``microbead_io.mask_rule``.
    problem : str or None
        Problem code when the encoding is not the project's two-level 0/255 (or 0/65535).
        Empty and constant masks return None here: the empty / nearly-full checks cover them.
    detail : str
        One-line explanation for the problem table ("" when no problem).
    """
    levels = mio.mask_levels(raw)
    suffix = " (multi-channel)" if raw.ndim == 3 else ""
    if levels.size > 2 and mio.mask_rule(raw) == mio.MASK_RULE_LABELS:
        # Read as foreground = non-zero (microbead_io.mask_rule): a valid mask, no problem.
        return f"instance labels ({levels.size - 1} ids)", None, ""
    if levels.size > 2:
        lo, hi = levels[0], levels[-1]
        return (
            f"anti-aliased ({levels.size} levels)",
            MASK_ANTIALIASED,
            f"{levels.size} grey levels from {lo:g} to {hi:g}{suffix} (resampled or "
            f"anti-aliased); training binarizes it at half max ({float(hi) / 2:g})",
        )
    if levels.size == 1:
        v = levels[0]
        return ("empty" if v == 0 else f"constant {v:g}"), None, ""
    lo, hi = levels
    if lo != 0:
        return (
            f"{lo:g}/{hi:g}",
            MASK_ENCODING,
            f"values {{{lo:g}, {hi:g}}}{suffix}: background is not 0; training binarizes at "
            f"half max, so check which level is foreground",
        )
    if hi in (255, 65535):
        return f"0/{hi:g}", None, ""
    if hi == 1:
        return (
            "0/1",
            MASK_0_1,
            f"values {{0, 1}}{suffix}: looks black in viewers; read correctly, but the "
            "project stores masks as 0/255",
        )
    return f"0/{hi:g}", MASK_ENCODING, f"values {{0, {hi:g}}}{suffix}: unusual foreground value"


def image_hash(raw: np.ndarray) -> str:
    """SHA-1 of the decoded pixels (shape, dtype and bytes): equal for identical content.

    A PNG and a TIFF holding the same pixels hash equal; re-encoded (lossy) copies do not.
    """
    h = hashlib.sha1()
    h.update(repr((raw.shape, str(raw.dtype))).encode())
    h.update(np.ascontiguousarray(raw).tobytes())
    return h.hexdigest()


def mask_polarity(image01: np.ndarray, mask: np.ndarray, ring_width: int) -> float:
    """Mean intensity in a ring around the mask minus the mean intensity inside it.

    Beads in these brightfield images are dark rims on a brighter background, so for a
    correct image/mask pair the value is positive; an image whose grey levels are inverted
    relative to its mask (or a mask of the background) gives a negative value.

    Parameters
    ----------
    image01 : float ``(H, W)``
        Normalised image in [0, 1].
    mask : ``(H, W)`` {0, 1}
        Binary mask, same shape.
    ring_width : int
        Width in pixels of the ring: the hole-filled mask dilated by a disc of this radius,
        minus the filled mask.

    Returns
    -------
    float
        NaN when the mask or the ring is empty.
    """
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return float("nan")
    filled = ndi.binary_fill_holes(m)
    ring = ndi.binary_dilation(filled, structure=_disk(max(1, int(ring_width)))) & ~filled
    if not ring.any():
        return float("nan")
    img = np.asarray(image01, dtype=np.float64)
    return float(img[ring].mean() - img[m].mean())


# --------------------------------------------------------------------------- statistics


def object_areas(mask: np.ndarray) -> np.ndarray:
    """Pixel areas of the 8-connected components of a binary mask, int64 ``(N,)``.

    An empty mask gives an empty array.
    """
    lab, n = ndi.label(np.asarray(mask) > 0, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)


def equivalent_diameter(area) -> np.ndarray:
    """Diameter of the disc with the same area: ``2 * sqrt(area / pi)`` (pixels)."""
    return 2.0 * np.sqrt(np.asarray(area, dtype=np.float64) / np.pi)


def focus_measure(image01: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the normalised image (higher = sharper).

    Computed on the normalised image so that exposure does not change it; comparable
    between images of one dataset at one analysis size, not across sizes.
    """
    x = np.asarray(image01, dtype=np.float32)
    if x.size == 0:
        return float("nan")
    return float(cv2.Laplacian(x, cv2.CV_32F, ksize=1).var())


def _annulus_kernel(r_in: float, r_out: float) -> np.ndarray:
    R = int(math.ceil(r_out))
    yy, xx = np.mgrid[-R : R + 1, -R : R + 1]
    rho = np.hypot(yy, xx)
    k = ((rho >= r_in) & (rho <= r_out)).astype(np.float32)
    return k / max(k.sum(), 1.0)


def bead_response_maps(image01: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Band-pass "bead-likeness" and ring-score maps at the bead scale.

    ``dark = 1 - image`` (beads are dark rims). The response is a difference of Gaussians
    of ``dark`` with sigmas ``0.7 r`` and ``2 r``: at ``0.7 r`` a ring of radius ``r``
    blurs into one blob peaking at its centre, ``2 r`` removes the slowly varying
    background. The ring score is the mean of ``dark`` on the annulus ``[0.6 r, 1.2 r]``
    minus its mean on the central disc ``rho <= 0.4 r``: positive for a dark ring with a
    lighter centre, about zero or negative for filled dark debris.

    Parameters
    ----------
    image01 : float ``(H, W)`` in [0, 1]
    radius : float
        Median bead radius in pixels at this image size (> 0).

    Returns
    -------
    response, ring_score : float32 ``(H, W)``
    """
    dark = 1.0 - np.asarray(image01, dtype=np.float32)
    r = max(float(radius), 1.0)
    s1, s2 = max(0.7 * r, 0.8), 2.0 * r
    response = cv2.GaussianBlur(dark, (0, 0), s1, borderType=cv2.BORDER_REFLECT) - (
        cv2.GaussianBlur(dark, (0, 0), s2, borderType=cv2.BORDER_REFLECT)
    )
    ring = cv2.filter2D(dark, cv2.CV_32F, _annulus_kernel(0.6 * r, 1.2 * r),
                        borderType=cv2.BORDER_REFLECT)
    centre = cv2.filter2D(dark, cv2.CV_32F, _annulus_kernel(0.0, max(0.4 * r, 1.0)),
                          borderType=cv2.BORDER_REFLECT)
    return response, ring - centre


def bead_candidates(
    image01: np.ndarray, mask: np.ndarray, radius: float
) -> dict[str, np.ndarray]:
    """Bead-like blobs in the image and the same measures at the labelled beads' centres.

    Candidates are local maxima of the response of :func:`bead_response_maps` within a
    ``(2r+1)`` window, with a positive response, at least ``r`` from the image border (a
    bead cut by the border is not assessed). A candidate is *labelled* when its centre lies
    in the hole-filled mask dilated by ``r / 2``.

    Returns
    -------
    dict of ndarrays
        ``response``, ``ring`` (float, per candidate), ``labelled`` (bool, per candidate),
        ``y``, ``x`` (int, per candidate), and ``bead_response``, ``bead_ring`` (float, at
        the centroids of labelled single beads: components of 0.5-1.5 median areas away
        from the border; used for calibration).
    """
    r = max(float(radius), 1.0)
    response, ring = bead_response_maps(image01, r)
    h, w = response.shape
    size = 2 * int(round(r)) + 1
    peaks = (response == ndi.maximum_filter(response, size=size, mode="nearest")) & (
        response > 0
    )
    b = int(math.ceil(r))
    peaks[:b, :] = peaks[h - b :, :] = False
    peaks[:, :b] = peaks[:, w - b :] = False
    ys, xs = np.nonzero(peaks)
    m = np.asarray(mask) > 0
    covered = ndi.binary_dilation(
        ndi.binary_fill_holes(m), structure=_disk(max(1, int(round(0.5 * r))))
    )
    # Calibration points: centroids of single, interior labelled beads.
    lab, n = ndi.label(m, structure=np.ones((3, 3), dtype=bool))
    by, bx = np.zeros(0, int), np.zeros(0, int)
    if n:
        areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        med = math.pi * r * r
        idx = np.flatnonzero((areas >= 0.5 * med) & (areas <= 1.5 * med)) + 1
        if idx.size:
            cy, cx = np.array(ndi.center_of_mass(m, lab, idx)).reshape(-1, 2).T
            by, bx = np.rint(cy).astype(int), np.rint(cx).astype(int)
            keep = (by >= b) & (by < h - b) & (bx >= b) & (bx < w - b)
            by, bx = by[keep], bx[keep]
    return {
        "y": ys, "x": xs,
        "response": response[ys, xs].astype(np.float64),
        "ring": ring[ys, xs].astype(np.float64),
        "labelled": covered[ys, xs],
        "bead_response": response[by, bx].astype(np.float64),
        "bead_ring": ring[by, bx].astype(np.float64),
    }


def calibrate_candidates(bead_response, bead_ring) -> dict:
    """Candidate thresholds from the labelled beads themselves.

    ``response >= 0.5 * median(response at bead centres)`` and, when the labelled beads are
    ring-like (median ring score > 0), ``ring >= 0.5 * median(ring score at bead centres)``.

    Returns
    -------
    dict
        ``response_threshold``, ``ring_threshold`` (``-inf`` when the ring criterion is off),
        ``n_calibration_beads``, ``median_bead_response``, ``median_bead_ring``. Thresholds
        are NaN when no labelled bead is available (partial-mask check then not assessed).
    """
    resp = np.asarray(bead_response, dtype=np.float64)
    ring = np.asarray(bead_ring, dtype=np.float64)
    if resp.size == 0:
        nan = float("nan")
        return {"response_threshold": nan, "ring_threshold": nan, "n_calibration_beads": 0,
                "median_bead_response": nan, "median_bead_ring": nan}
    med_r, med_g = float(np.median(resp)), float(np.median(ring))
    return {
        "response_threshold": CANDIDATE_RESPONSE_FRACTION * max(med_r, 0.0),
        "ring_threshold": CANDIDATE_RING_FRACTION * med_g if med_g > 0 else -math.inf,
        "n_calibration_beads": int(resp.size),
        "median_bead_response": med_r,
        "median_bead_ring": med_g,
    }


def unlabelled_candidates(cands: dict, calib: dict) -> np.ndarray:
    """Boolean ``(K,)``: candidates passing the calibrated thresholds and not in the mask."""
    thr = calib["response_threshold"]
    if not cands or not math.isfinite(thr):
        return np.zeros(0, dtype=bool)
    ok = (cands["response"] >= thr) & (cands["ring"] >= calib["ring_threshold"])
    return ok & ~cands["labelled"]


def is_partial_suspect(n_unlabelled: int, n_candidates: int) -> tuple[bool, float]:
    """Partial-mask rule: ``n_unlabelled >= 2`` and ``n_unlabelled / n_candidates >= 0.25``.

    ``n_candidates`` counts every bead-like candidate passing the thresholds, labelled or
    not. Comparing candidates with candidates (not with the mask's bead count) cancels the
    detector's recall, which drops in dense images where touching rings merge into one
    response peak. Returns ``(suspect, fraction)``; fraction is 0 without candidates.
    """
    frac = n_unlabelled / n_candidates if n_candidates else 0.0
    return bool(n_unlabelled >= PARTIAL_MIN_UNLABELLED and frac >= PARTIAL_MIN_FRACTION), frac


def objects_histogram(counts) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of objects per image that keeps every image (no bin dropped, no range cut).

    Unit-width bins centred on integers when the range spans at most 60 counts, otherwise
    30 equal bins from ``min - 0.5`` to ``max + 0.5``.

    Returns
    -------
    edges : float64 ``(B + 1,)``, hist : int64 ``(B,)``
        ``hist.sum() == len(counts)``; both empty for no counts.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    lo, hi = math.floor(c.min()), math.ceil(c.max())
    if hi - lo <= 60:
        edges = np.arange(lo, hi + 2, dtype=np.float64) - 0.5
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, 31)
    hist, _ = np.histogram(c, bins=edges)
    return edges, hist.astype(np.int64)


# --------------------------------------------------------------------------- recommendation


def _round_to(x: float, multiple: int, how: str) -> int:
    f = {"up": math.ceil, "down": math.floor, "nearest": round}[how]
    return max(multiple, int(f(x / multiple)) * multiple)


def recommend_config(stats: dict, *, val_fraction: float = DEFAULT_VAL_FRACTION
                     ) -> tuple[dict, dict]:
    """Training configuration and the evidence for each value.

    Parameters
    ----------
    stats : dict
        Needs ``dataset_size`` (int), ``native_size`` (int, median native tile width),
        ``analysis_image_size`` (int), ``median_bead_diameter_px`` (at the analysis size),
        ``mean_positive_ratio``, ``empty_mask_fraction`` and ``objects_per_image`` (list).
    val_fraction : float
        Validation fraction the batch-size rule assumes (written into the config too).

    Returns
    -------
    config : dict
        Keys from :data:`microbead_config.CONFIG_FILE_KEYS` only (what the trainer's
        ``--config`` accepts).
    evidence : dict
        Per key: ``value``, ``rule`` and the measured ``evidence`` it rests on.
    """
    config, evidence = _recommend_image_size(stats)
    for part_config, part_evidence in (
        _recommend_loss(stats),
        _recommend_batch(int(stats["dataset_size"]), val_fraction, config["image_size"]),
        _recommend_density_bins(stats),
    ):
        config.update(part_config)
        evidence.update(part_evidence)
    unknown = set(config) - mcfg.CONFIG_FILE_KEYS
    if unknown:  # a programming error here would only surface as a failed training job
        raise AssertionError(f"config keys not accepted by the trainer: {sorted(unknown)}")
    return config, evidence


def _recommend_image_size(stats: dict) -> tuple[dict, dict]:
    """``image_size`` (and the ``depth`` it assumes) from the median bead diameter."""
    multiple = 2 ** ASSUMED_DEPTH
    rf = receptive_field(ASSUMED_DEPTH)
    max_diam = rf / 4.0
    native = int(stats.get("native_size") or stats["analysis_image_size"])
    d_an = stats.get("median_bead_diameter_px")
    if d_an is None or not math.isfinite(d_an) or d_an <= 0:
        size = _round_to(native, multiple, "nearest")
        d_nat = float("nan")
        why = "no bead in any mask: kept the native tile size"
    else:
        d_nat = float(d_an) * native / float(stats["analysis_image_size"])
        if d_nat < MIN_BEAD_DIAMETER_PX:
            # Never upsample past the stored tiles: interpolation adds no detail, only cost.
            size = _round_to(native, multiple, "down")
            d256 = d_nat * 256.0 / native
            why = (f"beads are {d_nat:.1f} px at the stored size (< {MIN_BEAD_DIAMETER_PX:g}) "
                   f"and would be {d256:.1f} px at 256: train at the stored size, never "
                   f"upsampled (costs {(size / 256.0) ** 2:.1f}x a 256-px input per tile)")
        elif d_nat > max_diam:
            size = _round_to(native * max_diam / d_nat, multiple, "down")
            why = f"beads are {d_nat:.1f} px at native size (> RF/4 = {max_diam:g}): shrink"
        else:
            size = _round_to(native, multiple, "nearest")
            why = (f"beads are {d_nat:.1f} px at native size, within "
                   f"[{MIN_BEAD_DIAMETER_PX:g}, {max_diam:g}]: keep the native size")
    d_at = d_nat * size / native if math.isfinite(d_nat) else float("nan")
    smallest = (
        _round_to(native * MIN_BEAD_DIAMETER_PX / d_nat, multiple, "up")
        if math.isfinite(d_nat) else None
    )
    config = {"image_size": int(size), "depth": ASSUMED_DEPTH}
    evidence = {
        "image_size": {
            "value": int(size),
            "rule": (f"median bead diameter at the input size in [{MIN_BEAD_DIAMETER_PX:g}, "
                     f"RF/4] px; keep the stored tile size when it already is, or when beads "
                     f"are smaller (never upsample past it); multiple of 2^depth = {multiple}"),
            "evidence": {
                "native_tile_size": native, "median_bead_diameter_native_px": d_nat,
                "median_bead_diameter_at_recommended_size_px": d_at,
                "receptive_field_px": rf, "assumed_depth": ASSUMED_DEPTH,
                "smallest_size_keeping_min_diameter": smallest, "decision": why,
            },
        },
        "depth": {
            "value": ASSUMED_DEPTH,
            "rule": "the depth the receptive-field calculation assumes (models.py default)",
            "evidence": {"receptive_field_px": rf},
        },
    }
    return config, evidence


def smaller_input_note(smallest, size: int) -> str:
    """The sentence on a faster, smaller input size: offered only when there is one."""
    if smallest is None:
        return ""
    if smallest < size:
        return (f"Smallest input size still giving {MIN_BEAD_DIAMETER_PX:g} px beads: "
                f"{smallest} (a faster, lower-resolution option).")
    return (f"No smaller input size keeps beads at {MIN_BEAD_DIAMETER_PX:g} px or more "
            f"(it would take {smallest} px, above the {size} px recommended), so there is "
            "no faster, lower-resolution option.")


def _recommend_loss(stats: dict) -> tuple[dict, dict]:
    """``loss``: plain Dice only for extreme imbalance without empty masks."""
    f = stats.get("mean_positive_ratio")
    empty = float(stats.get("empty_mask_fraction") or 0.0)
    if f is not None and math.isfinite(f) and f < DICE_ONLY_MAX_FOREGROUND and (
        empty <= DICE_ONLY_MAX_EMPTY_FRACTION
    ):
        loss, why = "dice", "extreme imbalance and (almost) no empty masks"
    else:
        loss, why = "bce_dice", "default compound loss"
    return {"loss": loss}, {"loss": {
        "value": loss,
        "rule": (f"'dice' only if mean foreground ratio < {DICE_ONLY_MAX_FOREGROUND} and empty "
                 f"masks <= {DICE_ONLY_MAX_EMPTY_FRACTION:.0%}; otherwise 'bce_dice'"),
        "evidence": {"mean_positive_ratio": f, "empty_mask_fraction": empty, "decision": why},
    }}


def _recommend_batch(n: int, val_fraction: float, size: int) -> tuple[dict, dict]:
    """``batch_size``, ``steps_per_epoch`` and the ``val_fraction`` they assume."""
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_train = max(n - n_val, 1)
    cap = max(1, int(16 * (256 / size) ** 2))
    limit = max(1, min(n_train // 4, cap))
    batch = 2 ** int(math.floor(math.log2(limit)))
    steps = max(MIN_STEPS_PER_EPOCH, math.ceil(n_train / batch))
    config = {"batch_size": int(batch), "steps_per_epoch": int(steps),
              "val_fraction": float(val_fraction)}
    evidence = {
        "batch_size": {
            "value": int(batch),
            "rule": ("largest power of two <= n_train / 4 (several optimizer steps per pass "
                     "over the data) and <= 16 * (256 / image_size)^2 (memory)"),
            "evidence": {"dataset_size": n, "n_val": n_val, "n_train": n_train,
                         "memory_cap": cap},
        },
        "steps_per_epoch": {
            "value": int(steps),
            "rule": (f"max({MIN_STEPS_PER_EPOCH}, ceil(n_train / batch_size)): an epoch is at "
                     f"least {MIN_STEPS_PER_EPOCH} optimizer steps whatever the dataset size "
                     "(nnU-Net uses a fixed 250)"),
            "evidence": {"n_train": n_train, "batches_per_pass": math.ceil(n_train / batch)},
        },
        "val_fraction": {
            "value": float(val_fraction),
            "rule": "the validation fraction the batch-size rule assumed",
            "evidence": {"n_val": n_val},
        },
    }
    return config, evidence


def _recommend_density_bins(stats: dict) -> tuple[dict, dict]:
    """``density_bins``: quantile strata of objects per image for the stratified split."""
    counts = [int(c) for c in stats.get("objects_per_image", [])]
    edges = mm.density_edges(counts, min_per_bin=MIN_IMAGES_PER_BIN, max_bins=MAX_DENSITY_BINS)
    per_bin = np.histogram(counts, bins=edges)[0].tolist() if len(edges) >= 2 else []
    return {"density_bins": edges}, {"density_bins": {
        "value": edges,
        "rule": (f"quantile bins of objects per image (8-connected components at the analysis "
                 f"size), at most {MAX_DENSITY_BINS}, merged until every stratum has >= "
                 f"{MIN_IMAGES_PER_BIN} images; half-integer edges, stratum i = counts in "
                 "(edges[i], edges[i+1])"),
        "evidence": {"images_per_stratum": per_bin, "n_images": len(counts)},
    }}


# --------------------------------------------------------------------------- analysis passes


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def inspect_pair(image_path: Path, mask_path: Path, image_size: int, root: Path
                 ) -> tuple[ImageRecord | None, list[Problem]]:
    """Integrity pass for one pair: read both, check values and sizes, keep the mask.

    Returns ``(record, problems)``; ``record`` is None when the pair cannot be analysed
    (unreadable file or size mismatch), with an ``error`` problem saying why.
    """
    problems: list[Problem] = []
    img_name, mask_name = _rel(image_path, root), _rel(mask_path, root)
    raw_img = raw_mask = None
    try:
        raw_img = mio._read_raw(Path(image_path))
    except mio.ImageReadError as exc:
        problems.append(Problem(img_name, UNREADABLE_IMAGE, _strip_path(str(exc), image_path),
                                "error"))
    try:
        raw_mask = mio._read_raw(Path(mask_path))
    except mio.ImageReadError as exc:
        problems.append(Problem(mask_name, UNREADABLE_MASK, _strip_path(str(exc), mask_path),
                                "error"))
    if raw_img is None or raw_mask is None:
        return None, problems
    if raw_img.shape[:2] != raw_mask.shape[:2]:
        problems.append(Problem(
            img_name, SIZE_MISMATCH,
            f"image is {raw_img.shape[1]}x{raw_img.shape[0]} but mask {mask_name} is "
            f"{raw_mask.shape[1]}x{raw_mask.shape[0]}", "error"))
        return None, problems

    encoding, code, detail = describe_mask_levels(raw_mask)
    if code:
        problems.append(Problem(mask_name, code, detail))
    binary = mio.binarize_mask(raw_mask)
    ratio = float(binary.mean())
    if not binary.any():
        problems.append(Problem(mask_name, EMPTY_MASK, "no foreground pixel"))
    elif ratio > NEARLY_FULL_RATIO:
        problems.append(Problem(mask_name, NEARLY_FULL_MASK,
                                f"{ratio:.1%} foreground (> {NEARLY_FULL_RATIO:.0%}): "
                                "inverted or wrong mask?"))
    gray = mio.to_channels(raw_img, 1)[..., 0]
    scale = _full_scale(raw_img)
    brightness = float(gray.mean()) / scale
    contrast = float(gray.std()) / scale
    if float(gray.max() - gray.min()) == 0.0:
        problems.append(Problem(img_name, BLANK_IMAGE, f"constant image (value {gray.flat[0]:g})"))
    rec = ImageRecord(
        image_path=Path(image_path), mask_path=Path(mask_path), name=Path(image_path).name,
        native_shape=tuple(int(v) for v in raw_img.shape[:2]), mask_encoding=encoding,
        image_hash=image_hash(raw_img), brightness=brightness, contrast=contrast,
        mask=mio.resize_mask(binary, image_size),
    )
    return rec, problems


def stored_size(pairs) -> int:
    """Stored size (the smaller side) of the first readable image of ``pairs``: the size
    training uses when ``--image_size`` is left at 0; 256 when none is readable."""
    for image_path, _ in pairs:
        try:
            return int(min(mio.read_image(image_path, 1).shape[:2]))
        except (OSError, ValueError):  # unreadable: the integrity check names it
            continue
    return 256


def _analysis_image(path: Path, image_size: int, norm: dict | None) -> np.ndarray:
    """The image as the trainer prepares it, ``(S, S)`` float32: read raw, resized to the
    input size, then normalised with ``norm`` (the trainer's flat-field spec; ``RAW`` keeps
    the stored values, ``None`` is per-image percentiles)."""
    img = mio.resize_image(mio.apply_normalization(mio.read_image(path, 1), mio.RAW),
                           image_size)
    if img.ndim == 2:
        img = img[..., None]
    return mio.apply_normalization(img, norm)[..., 0]


def image_statistics(image01: np.ndarray, mask: np.ndarray, *, median_area: float,
                     bead_radius: float) -> tuple[dict, dict]:
    """Per-image statistics at the analysis size.

    Parameters
    ----------
    image01 : float32 ``(S, S)`` in [0, 1]
    mask : uint8 ``(S, S)`` {0, 1}
    median_area : float
        Dataset median single-bead area (pixels at this size); <= 0 or NaN: unknown.
    bead_radius : float
        ``sqrt(median_area / pi)``; NaN disables the candidate search.

    Returns
    -------
    stats : dict
        ``n_objects``, ``n_beads``, ``positive_ratio``, ``areas`` (int64 array),
        ``mean_object_area_px``, ``median_object_area_px``, ``mean_equiv_diameter_px``,
        ``focus``, ``polarity``.
    candidates : dict
        From :func:`bead_candidates` (empty when the bead size is unknown).
    """
    areas = object_areas(mask)
    known = math.isfinite(median_area) and median_area > 0
    beads = mm.count_beads(mask, median_area=median_area if known else None)
    diam = equivalent_diameter(areas)
    nan = float("nan")
    stats = {
        "n_objects": int(areas.size),
        "n_beads": int(beads["n_beads"]),
        "positive_ratio": float(np.count_nonzero(mask)) / mask.size,
        "areas": areas,
        "mean_object_area_px": float(areas.mean()) if areas.size else nan,
        "median_object_area_px": float(np.median(areas)) if areas.size else nan,
        "mean_equiv_diameter_px": float(diam.mean()) if areas.size else nan,
        "focus": focus_measure(image01),
        "polarity": mask_polarity(
            image01, mask, max(2, int(round(0.5 * bead_radius))) if known else 2
        ),
    }
    cands = bead_candidates(image01, mask, bead_radius) if known else {}
    return stats, cands


@dataclass
class Analysis:
    """Everything :func:`analyze_dataset` found; the writers only format it."""

    data_dir: Path
    image_size: int
    records: list[ImageRecord]
    problems: list[Problem]
    summary: dict
    config: dict
    evidence: dict
    calibration: dict
    n_images: int = 0
    n_masks: int = 0
    labels: dict = field(default_factory=dict)  # label_checks(); "fixed" after --write_fixed
    #: The normalisation the statistics used: the trainer's flat-field spec for this data.
    normalization: dict | None = None


def _pixel_scale(data_dir: Path) -> float | None:
    p = data_dir / "dataset.json"
    if not p.is_file():
        return None
    try:
        return _finite(json.loads(p.read_text()).get("pixel_scale"))
    except (ValueError, AttributeError, TypeError, OSError):
        log.warning("%s: not readable JSON; pixel_scale not recorded", p)
        return None


def skipped_problems(root: Path, folders) -> list[Problem]:
    """One :data:`SKIPPED_FILE` warning per entry of ``folders`` that is not an image
    (``microbead_io.skipped_entries``): listed in integrity_problems.csv, the report and the
    log like every problem, never ignored silently."""
    out = []
    for folder in folders:
        for p in mio.skipped_entries(folder):
            what = ("folder (sub-folders are not searched)" if p.is_dir() else
                    f"not an image ({p.suffix or 'no extension'}; supported: "
                    f"{', '.join(mio.IMAGE_EXTENSIONS)})")
            out.append(Problem(_rel(p, root), SKIPPED_FILE, f"skipped: {what}"))
    return out


def pairing_problems(pairing: mio.Pairing, root: Path) -> list[Problem]:
    """Unpaired images and masks (errors: not analysed) and duplicated stems."""
    problems = [Problem(_rel(p, root), UNPAIRED_IMAGE, f"no mask with stem '{mio.stem_key(p)}'",
                        "error") for p in pairing.unpaired_images]
    problems += [Problem(_rel(p, root), UNPAIRED_MASK, f"no image with stem '{mio.stem_key(p)}'",
                         "error") for p in pairing.unpaired_masks]
    problems += [Problem(k, DUPLICATE_STEM, "more than one file with this stem in one folder; "
                         "only the first is analysed") for k in pairing.duplicates]
    return problems


def inspect_pairs(pairs, image_size: int, root: Path, problems: list[Problem],
                  progress: bool) -> list[ImageRecord]:
    """Pass 1, integrity: one record per usable pair (only the resized mask kept in memory);
    unusable pairs and duplicate images are appended to ``problems``."""
    from tqdm import tqdm

    records: list[ImageRecord] = []
    for ip, mp in tqdm(pairs, desc="integrity", unit="img", disable=not progress):
        rec, probs = inspect_pair(ip, mp, image_size, root)
        problems += probs
        if rec is not None:
            records.append(rec)
    by_hash: dict[str, ImageRecord] = {}
    for rec in records:
        first = by_hash.setdefault(rec.image_hash, rec)
        if first is not rec:
            problems.append(Problem(_rel(rec.image_path, root), DUPLICATE_IMAGE,
                                    f"identical pixels to {_rel(first.image_path, root)}"))
    return records


def flag_inverted_contrast(records: list[ImageRecord], root: Path,
                           problems: list[Problem]) -> set[str]:
    """Names of the images whose mask polarity contradicts the dataset's (a problem each).

    The dark-rim prior (polarity > 0) holds unless the dataset itself says otherwise: at
    least ``POLARITY_CONSENSUS_MIN`` finite polarities with a median beyond the margin.
    """
    pol = np.array([r.stats["polarity"] for r in records], dtype=np.float64)
    finite = pol[np.isfinite(pol)]
    expected = 1.0
    if finite.size >= POLARITY_CONSENSUS_MIN and abs(float(np.median(finite))) > POLARITY_MARGIN:
        expected = float(np.sign(np.median(finite)))
    inverted = set()
    for rec in records:
        p = rec.stats["polarity"]
        if math.isfinite(p) and p * expected < -POLARITY_MARGIN:
            inverted.add(rec.name)
            side = "brighter" if expected > 0 else "darker"
            problems.append(Problem(
                _rel(rec.image_path, root), INVERTED,
                f"inside the mask is {side} than the ring around it (polarity {p:+.3f}, "
                f"dataset median {float(np.median(finite)) if finite.size else float('nan'):+.3f})"
                "; inverted image or a mask of the background?"))
    return inverted


def flag_partial_masks(records: list[ImageRecord], inverted: set[str]) -> dict:
    """Bead candidates left out of each mask; sets the ``n_bead_candidates``,
    ``n_unlabelled_candidates``, ``unlabelled_fraction`` and ``partial_mask_suspect`` stats.

    Thresholds are calibrated on the labelled beads of the non-inverted images; returns the
    calibration.
    """
    ok = [r for r in records if r.candidates and r.name not in inverted]
    calib = calibrate_candidates(
        np.concatenate([r.candidates["bead_response"] for r in ok]) if ok else [],
        np.concatenate([r.candidates["bead_ring"] for r in ok]) if ok else [],
    )
    for rec in records:
        s = rec.stats
        if rec.name in inverted or not rec.candidates or not math.isfinite(
            calib["response_threshold"]
        ):
            s.update(n_bead_candidates=None, n_unlabelled_candidates=None,
                     unlabelled_fraction=None, partial_mask_suspect=False)
            continue
        unl = unlabelled_candidates(rec.candidates, calib)
        passing = (rec.candidates["response"] >= calib["response_threshold"]) & (
            rec.candidates["ring"] >= calib["ring_threshold"])
        suspect, frac = is_partial_suspect(int(unl.sum()), int(passing.sum()))
        rec.candidates["unlabelled"] = unl
        s.update(n_bead_candidates=int(passing.sum()), n_unlabelled_candidates=int(unl.sum()),
                 unlabelled_fraction=frac, partial_mask_suspect=suspect)
    return calib


def attach_problems(records: list[ImageRecord], problems: list[Problem]) -> None:
    """Sort ``problems`` (errors first, then by file: the table reads as a to-do list) and
    give each record the codes of its image and mask."""
    problems.sort(key=lambda p: (p.severity != "error", p.file, p.problem))
    problem_by_file: dict[str, list[str]] = {}
    for p in problems:
        problem_by_file.setdefault(Path(p.file).stem, []).append(p.problem)
    for rec in records:
        rec.problems = sorted(set(problem_by_file.get(rec.image_path.stem, [])
                                  + problem_by_file.get(rec.mask_path.stem, [])))


def analyze_dataset(data_dir, *, image_size: int = 0, progress: bool = True,
                    val_fraction: float = DEFAULT_VAL_FRACTION) -> Analysis:
    """Integrity check, statistics and recommendation for ``data_dir/{images,masks}``.

    Parameters
    ----------
    data_dir : path
        Folder with ``images/`` and ``masks/``.
    image_size : int
        Analysis size (pixels); masks/images are resized to ``(image_size, image_size)``
        the way training resizes them. 0 (default): the stored size of the first tile, which
        is what training uses by default.
    progress : bool
        tqdm bars over the images.

    Raises
    ------
    FileNotFoundError
        If ``images/`` or ``masks/`` is missing (the message names the folder).
    """
    from tqdm import tqdm

    root = Path(data_dir)
    image_dir, mask_dir = root / "images", root / "masks"
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: folder not found (expected {root}/images and "
                                    f"{root}/masks)")
    n_images, n_masks = len(mio.list_images(image_dir)), len(mio.list_images(mask_dir))
    pairing = mio.pair_files(image_dir, mask_dir)
    problems = pairing_problems(pairing, root) + skipped_problems(root, (image_dir, mask_dir))
    if not image_size:
        image_size = stored_size(pairing.pairs)
    records = inspect_pairs(pairing.pairs, image_size, root, problems, progress)
    median_area = float(mm.estimate_bead_area(r.mask for r in records)) if records else 0.0
    radius = math.sqrt(median_area / math.pi) if median_area > 0 else float("nan")
    # The trainer's normalisation (flat-field: background division, one dataset-level
    # scale), computed the same way from the same tiles at the same size.
    norm = mio.flatfield_spec([_analysis_image(r.image_path, image_size, mio.RAW)[..., None]
                               for r in records], median_area) if records else None

    # Pass 2: statistics on the training-preprocessed image and mask.
    for rec in tqdm(records, desc="statistics", unit="img", disable=not progress):
        img = _analysis_image(rec.image_path, image_size, norm)
        rec.stats, rec.candidates = image_statistics(
            img, rec.mask, median_area=median_area, bead_radius=radius
        )
        # The inverted-contrast check is a property of the stored image, with a margin set
        # in per-image percentile units: a mask of another tile's beads sits at polarity ~0
        # and must be left to the mismatch check, not cross the margin by a change of scale.
        rec.stats["polarity"] = mask_polarity(
            _analysis_image(rec.image_path, image_size, None), rec.mask,
            max(2, int(round(0.5 * radius))) if math.isfinite(radius) else 2)
    inverted = flag_inverted_contrast(records, root, problems)
    calib = flag_partial_masks(records, inverted)
    labels = label_checks(records, root, problems, skip=inverted, image_size=image_size,
                          median_area=median_area, progress=progress) if records else {}
    attach_problems(records, problems)

    summary = build_summary(records, problems, image_size=image_size, median_area=median_area,
                            n_images=n_images, n_masks=n_masks, n_pairs=len(pairing.pairs))
    summary["pixel_scale"] = _pixel_scale(root)
    summary["partial_mask_calibration"] = calib
    summary["label_quality"] = labels.get("summary")
    summary["label_consistency_ceiling"] = (labels["summary"]["label_consistency_ceiling"]
                                            if labels else None)
    if records:
        config, evidence = recommend_config(summary, val_fraction=val_fraction)
    else:
        config, evidence = {}, {}
    return Analysis(root, image_size, records, problems, summary, config, evidence, calib,
                    n_images, n_masks, labels=labels, normalization=norm)


def build_summary(records: list[ImageRecord], problems: list[Problem], *, image_size: int,
                  median_area: float, n_images: int, n_masks: int, n_pairs: int) -> dict:
    """Dataset-level numbers (the keys users already read, plus the new ones)."""
    st = [r.stats for r in records]
    n = len(records)
    pos_m, pos_s = _mean_std([s["positive_ratio"] for s in st])
    obj_m, obj_s = _mean_std([s["n_objects"] for s in st])
    bead_m, bead_s = _mean_std([s["n_beads"] for s in st])
    bri_m, bri_s = _mean_std([r.brightness for r in records])
    con_m, con_s = _mean_std([r.contrast for r in records])
    foc_m, foc_s = _mean_std([s["focus"] for s in st])
    areas = np.concatenate([s["areas"] for s in st]) if st else np.zeros(0)
    diam = equivalent_diameter(areas)
    suspects = [r.name for r in records if r.stats.get("partial_mask_suspect")]
    widths = [r.native_shape[1] for r in records]
    heights = [r.native_shape[0] for r in records]
    sizes = Counter(f"{w}x{h}" for w, h in zip(widths, heights))
    encodings = Counter(r.mask_encoding for r in records)
    two_level = {k: v for k, v in encodings.items() if k in ("0/255", "0/1", "0/65535")}
    overall = next(iter(two_level)) if len(two_level) == 1 else ("mixed" if two_level else "none")
    empty = sum(1 for s in st if s["n_objects"] == 0)
    edges, hist = objects_histogram([s["n_objects"] for s in st])
    bead_diam = float(equivalent_diameter(median_area)) if median_area > 0 else float("nan")
    summary = {
        # --- keys users already read
        "dataset_size": n,
        "mean_positive_ratio": pos_m,
        "std_positive_ratio": pos_s,
        "mean_objects_per_image": obj_m,
        "std_objects_per_image": obj_s,
        "mean_object_size": float(areas.mean()) if areas.size else float("nan"),
        "partial_mask_suspects": len(suspects),
        "partial_mask_ratio": len(suspects) / n if n else float("nan"),
        "mean_brightness": bri_m,
        "std_brightness": bri_s,
        # --- new
        "analysis_image_size": int(image_size),
        "native_sizes": dict(sizes),
        "native_size": int(np.median(widths)) if widths else None,
        "n_image_files": n_images,
        "n_mask_files": n_masks,
        "n_pairs": n_pairs,
        "n_integrity_problems": len(problems),
        "integrity_problem_counts": dict(Counter(p.problem for p in problems)),
        "n_files_not_analysed": sum(1 for p in problems if p.severity == "error"),
        "mask_encodings": dict(encodings),
        "mask_encoding_overall": overall,
        "mean_beads_per_image": bead_m,
        "std_beads_per_image": bead_s,
        "total_objects": int(sum(s["n_objects"] for s in st)),
        "total_beads": int(sum(s["n_beads"] for s in st)),
        "median_object_size": float(np.median(areas)) if areas.size else float("nan"),
        "mean_equiv_diameter_px": float(diam.mean()) if diam.size else float("nan"),
        "median_bead_area_px": median_area if median_area > 0 else float("nan"),
        "median_bead_diameter_px": bead_diam,
        "mean_contrast": con_m,
        "std_contrast": con_s,
        "mean_focus": foc_m,
        "std_focus": foc_s,
        "empty_masks": empty,
        "empty_mask_fraction": empty / n if n else float("nan"),
        "partial_mask_suspect_files": suspects,
        "objects_per_image": [s["n_objects"] for s in st],
        "objects_per_image_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "per_dilution": per_dilution(records),
        "source_frames": source_frames(records),
    }
    return summary


def source_frames(records: list[ImageRecord]) -> dict:
    """Tiles grouped by source frame (``microbead_io.frame_group``), as the trainer splits.

    Returns ``n_groups``, ``n_grid_tiles`` (names ending ``_grid_rR_cC``), the largest group
    size and ``groups`` (frame key -> tile names). Tiles of one frame share pixels where
    columns overlap, so they must never straddle a train/validation split.
    """
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(mio.frame_group(r.name), []).append(r.name)
    return {
        "n_groups": len(groups),
        "n_grid_tiles": sum(1 for r in records if mio.grid_cell(r.name)),
        "largest_group": max((len(v) for v in groups.values()), default=0),
        "groups": {k: sorted(v) for k, v in sorted(groups.items())},
    }


def per_dilution(records: list[ImageRecord]) -> dict:
    """Group statistics by the ``NNNx_`` dilution token of the file name.

    Returns ``{}`` when no file name carries one; files without a token go to ``"none"``.
    """
    groups: dict[str, list[ImageRecord]] = {}
    for r in records:
        d = mio.parse_dilution(r.name)
        groups.setdefault("none" if d is None else str(d), []).append(r)
    if set(groups) <= {"none"}:
        return {}
    out = {}
    for key in sorted(groups, key=lambda k: (k == "none", int(k) if k.isdigit() else 0)):
        g = groups[key]
        obj_m, obj_s = _mean_std([r.stats["n_objects"] for r in g])
        bead_m, bead_s = _mean_std([r.stats["n_beads"] for r in g])
        pos_m, _ = _mean_std([r.stats["positive_ratio"] for r in g])
        bri_m, _ = _mean_std([r.brightness for r in g])
        out[key] = {
            "n_images": len(g), "mean_objects_per_image": obj_m, "std_objects_per_image": obj_s,
            "mean_beads_per_image": bead_m, "std_beads_per_image": bead_s,
            "mean_positive_ratio": pos_m, "mean_brightness": bri_m,
            "partial_mask_suspects": sum(bool(r.stats.get("partial_mask_suspect")) for r in g),
        }
    return out


# --------------------------------------------------------------------------- label checks


def _offset_text(dy: int, dx: int) -> str:
    return f"dy={dy:+d}, dx={dx:+d}"


def label_checks(records: list[ImageRecord], root: Path, problems: list[Problem], *,
                 skip: set[str], image_size: int, median_area: float,
                 progress: bool = False) -> dict:
    """Masks against their own images, at native resolution (``label_quality``).

    Per pair: registration (offset and gain), bead evidence, missed and merged beads. Over the
    dataset: mismatched masks (evidence far below the median at any shift) with the image
    each matches best, and the masks' agreement on pixels neighbouring grid tiles share (the
    label-consistency ceiling). Appends one :class:`Problem` per finding to ``problems``.

    Parameters
    ----------
    skip : set of str
        Record names not assessed (inverted images): their darkness map means nothing.
    image_size, median_area
        Analysis size and the single-bead area there; scaled to each tile's native size for
        the darkness map's background window.

    Returns
    -------
    dict
        ``rows`` (name -> per-file numbers), ``pairs`` (overlap rows), ``summary``
        (``summary.json["label_quality"]``), ``ceiling`` (pooled dict or None).
    """
    from tqdm import tqdm

    rows: dict[str, dict] = {}
    regs: dict[str, lq.Registration] = {}
    diameters: dict[str, float | None] = {}
    assessed: list[ImageRecord] = []
    for rec in tqdm(records, desc="labels", unit="img", disable=not progress):
        row = {"file": rec.name, "mask_file": rec.mask_path.name, "assessed": False,
               "note": ""}
        rows[rec.name] = row
        if rec.name in skip:
            row["note"] = "inverted image"
            continue
        try:
            img = mio.read_image(rec.image_path, 1)[..., 0]
            mask = mio.read_mask(rec.mask_path, warn=False)
        except mio.ImageReadError as exc:  # changed since the integrity pass
            row["note"] = str(exc)
            continue
        ratio = float(np.count_nonzero(mask)) / mask.size
        if ratio == 0 or ratio > NEARLY_FULL_RATIO or rec.contrast == 0:
            row["note"] = "empty mask" if ratio == 0 else (
                "nearly full mask" if ratio > NEARLY_FULL_RATIO else "blank image")
            continue
        scale = rec.native_shape[1] / float(image_size)
        diam = (2.0 * math.sqrt(median_area / math.pi) * scale
                if math.isfinite(median_area) and median_area > 0 else None)
        dark = lq.darkness_map(img, bead_diameter=diam)
        diameters[rec.name] = diam
        # Registered on bead centres (solid and ring beads); shapes judged on darkness.
        reg = lq.register_mask(mask, lq.centre_response(dark, bead_diameter=diam))
        fixed = lq.shift_mask(mask, -reg.dy, -reg.dx) if reg.is_offset() else mask
        shape = lq.shape_check(dark, fixed)
        regs[rec.name] = reg
        assessed.append(rec)
        row.update(
            assessed=True, mask_px=reg.n_mask_px, offset_dy=reg.dy, offset_dx=reg.dx,
            dark_score_unshifted=reg.score_unshifted, dark_score=reg.score,
            offset_gain=reg.gain, evidence=reg.evidence, mask_offset=reg.is_offset(),
            offset_at_search_limit=reg.at_search_edge and reg.is_offset(), mismatch=False,
            best_match="", best_match_evidence=None,
            **{k: v for k, v in shape.items() if k.startswith("n_")},
            missed_yx=shape["missed_yx"])

    # Mismatch: evidence far below the dataset's, at the best shift.
    median, threshold = lq.mismatch_threshold([regs[r.name].evidence for r in assessed])
    flagged = [r for r in assessed if math.isfinite(threshold)
               and regs[r.name].evidence < threshold]
    if flagged:
        masks = {r.name: mio.read_mask(r.mask_path, warn=False) for r in flagged}
        best: dict[str, tuple[str, lq.Registration]] = {}
        for cand in tqdm(assessed, desc="mask sources", unit="img", disable=not progress):
            dark = None
            for r in flagged:
                if r is cand or masks[r.name].shape != tuple(cand.native_shape):
                    continue
                if dark is None:
                    dark = lq.centre_map(mio.read_image(cand.image_path, 1)[..., 0],
                                         bead_diameter=diameters[cand.name])
                reg = lq.register_mask(masks[r.name], dark)
                if r.name not in best or reg.evidence > best[r.name][1].evidence:
                    best[r.name] = (_rel(cand.image_path, root), reg)
        for r in flagged:
            own, row = regs[r.name], rows[r.name]
            row["mismatch"] = True
            row["mask_offset"] = False  # an offset of a mask of nothing means nothing
            match = best.get(r.name)
            detail = (f"the mask marks almost none of its image's beads: bead evidence "
                      f"{own.evidence:.1f} at its best shift vs dataset median {median:.1f} "
                      f"(threshold {threshold:.1f}); ")
            if match and match[1].evidence >= lq.MATCH_FRACTION * median \
                    and match[1].evidence > own.evidence:
                row["best_match"], row["best_match_evidence"] = match[0], match[1].evidence
                detail += (f"it matches {match[0]} (evidence {match[1].evidence:.1f}, offset "
                           f"{_offset_text(*match[1].offset)}): the mask of another tile?")
            else:
                detail += "no image in the dataset matches it"
            problems.append(Problem(_rel(r.mask_path, root), MASK_MISMATCH, detail))

    for r in assessed:
        row, reg = rows[r.name], regs[r.name]
        if row["mismatch"]:
            continue
        if row["mask_offset"]:
            edge = (f" (at the search limit +-{reg.max_shift} px: may be larger)"
                    if reg.at_search_edge else "")
            problems.append(Problem(
                _rel(r.mask_path, root), MASK_OFFSET,
                f"mask sits {_offset_text(reg.dy, reg.dx)} px from its image's beads{edge}; "
                f"undoing it raises the mean bead-centre darkness under the mask from "
                f"{reg.score_unshifted:.1f} to {reg.score:.1f} ({reg.gain:+.0%}); "
                "--write_fixed shifts it back"))
        missed, merged = lq.shape_flags(row)
        row["missed_beads"], row["merged_beads"] = missed, merged
        if missed:
            problems.append(Problem(
                _rel(r.mask_path, root), MISSED_BEADS,
                f"{row['n_missed']} of {row['n_image_beads']} bead-sized dark blobs in the "
                "image are not in the mask"))
        if merged:
            problems.append(Problem(
                _rel(r.mask_path, root), MERGED_BEADS,
                f"{row['n_merged_objects']} mask objects each cover 2 or more of the image's "
                "beads that the touching-bead split cannot separate "
                f"({row['n_beads_in_merged']} of {row['n_image_beads']} beads; "
                f"{row['n_beads_lost']} lost to every count made from this mask)"))

    # Overlap consistency between grid neighbours that share pixels.
    names = [r.name for r in records]
    ovs = lq.find_grid_overlaps(names, lambda i: mio.read_image(records[i].image_path, 1))
    pairs = lq.overlap_agreement(
        ovs, lambda i: mio.read_mask(records[i].mask_path, warn=False), names=names)
    ceiling = lq.pooled_agreement(pairs)
    after = None
    moved = {r.name for r in assessed if rows[r.name]["mask_offset"]}
    if ceiling and any(p["first"] in moved or p["second"] in moved for p in pairs):
        def fixed_mask(i):
            m = mio.read_mask(records[i].mask_path, warn=False)
            reg = regs.get(records[i].name)
            return lq.shift_mask(m, -reg.dy, -reg.dx) if records[i].name in moved else m
        after = lq.pooled_agreement(lq.overlap_agreement(ovs, fixed_mask, names=names))
    for p in pairs:
        for key in ("first", "second"):
            row = rows[p[key]]
            row.setdefault("overlap_jaccards", []).append(p["jaccard"])

    offsets = [rows[r.name] for r in assessed if rows[r.name]["mask_offset"]]
    summary = {
        "n_assessed": len(assessed),
        "max_shift_px": lq.MAX_SHIFT,
        "offset_rule": f"|offset| >= {lq.MIN_OFFSET_PX} px and gain >= "
                       f"{lq.MIN_OFFSET_GAIN:.0%}",
        "n_offset": len(offsets),
        "offset_files": [{"file": o["file"], "dy": o["offset_dy"], "dx": o["offset_dx"],
                          "gain": o["offset_gain"]} for o in offsets],
        "evidence_median": median,
        "mismatch_threshold": threshold,
        "mismatch_files": [{"file": rows[r.name]["file"], "evidence": regs[r.name].evidence,
                            "best_match": rows[r.name]["best_match"] or None}
                           for r in flagged],
        "missed_beads_files": [n for n, r in rows.items() if r.get("missed_beads")],
        "merged_beads_files": [n for n, r in rows.items() if r.get("merged_beads")],
        "n_grid_neighbours_by_name": len(lq.grid_neighbours(names)),
        "overlap": ({k: v for k, v in ceiling.items()} if ceiling else None),
        "overlap_after_offset_fix": after,
        "label_consistency_ceiling": ceiling["pooled_jaccard"] if ceiling else None,
    }
    return {"rows": rows, "pairs": pairs, "summary": summary, "ceiling": ceiling,
            "after": after}


LABEL_COLUMNS = (
    "file", "mask_file", "assessed", "note", "mask_px", "offset_dy", "offset_dx",
    "dark_score_unshifted", "dark_score", "offset_gain", "mask_offset",
    "offset_at_search_limit", "evidence", "mismatch", "best_match", "best_match_evidence",
    "n_image_beads", "n_missed", "missed_beads", "n_mask_objects", "n_merged_objects",
    "n_beads_in_merged", "n_beads_lost", "merged_beads", "n_overlap_pairs",
    "mean_overlap_jaccard",
)
OVERLAP_COLUMNS = (
    "first", "second", "side", "width", "image_correlation", "image_max_abs_diff",
    "images_identical", "intersection", "union", "jaccard",
)


def _cell(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool | np.bool_):
        return int(v)
    return f"{v:.6g}" if isinstance(v, float | np.floating) else v


def label_rows(analysis: Analysis) -> list[list]:
    """Rows of ``label_quality.csv`` in :data:`LABEL_COLUMNS` order."""
    out = []
    for r in analysis.labels.get("rows", {}).values():
        r = dict(r)
        js = r.pop("overlap_jaccards", [])
        r["n_overlap_pairs"] = len(js)
        js = [j for j in js if math.isfinite(j)]
        r["mean_overlap_jaccard"] = float(np.mean(js)) if js else None
        out.append([_cell(r.get(c)) for c in LABEL_COLUMNS])
    return out


def render_label_section(analysis: Analysis) -> list[str]:
    """Markdown lines of the label-quality section (numbers from ``analysis.labels``)."""
    lab = analysis.labels
    if not lab:
        return []
    s, rows = lab["summary"], lab["rows"]
    out = ["## 5. Label quality: masks against their images\n"]
    out.append(
        f"{s['n_assessed']} of {len(rows)} masks assessed at native resolution (inverted "
        "images, empty or nearly full masks and blank images are not). *Bead evidence* is a "
        "darkness map: 1 - luminance / local background (grey closing over 8 bead diameters, "
        "smoothed: `microbead_io.flatfield_ratio`), minus the tile's median, clipped at 0; a "
        "ratio, so sparse and dense, 8- and 16-bit tiles share one scale. A mask's *dark "
        "score* is 100 x the mean under it of that darkness averaged over a gaussian of half "
        "a bead diameter (`label_quality.centre_map`: it peaks at the centre of solid and of "
        "ring beads alike); its *evidence* is that minus the tile's mean "
        "(about 0 for a mask placed at random). Per-file numbers: `label_quality.csv`; "
        "figure: `label_quality.png`.\n")
    out.append(f"**Registration.** Every integer shift within +-{s['max_shift_px']} px is "
               "scored; the best one (centre of the near-best plateau) gives the mask's offset "
               "from its beads and the gain of undoing it. Reported: "
               f"{s['offset_rule']}. **{s['n_offset']} offset mask(s).**\n")
    offs = [rows[o["file"]] for o in s["offset_files"]]
    if offs:
        out.append(_table(["file", "offset dy, dx (px)", "dark score as stored", "shifted back",
                           "gain"],
                          [[r["file"], f"{r['offset_dy']:+d}, {r['offset_dx']:+d}"
                            + (" (search limit)" if r["offset_at_search_limit"] else ""),
                            _fmt(r["dark_score_unshifted"]), _fmt(r["dark_score"]),
                            f"{r['offset_gain']:+.0%}"] for r in offs]))
        out.append("")
    out.append(f"**Mask-image mismatch.** Median evidence {_fmt(s['evidence_median'])}; a mask "
               f"below {lq.MISMATCH_FRACTION:g} x the median (threshold "
               f"{_fmt(s['mismatch_threshold'])}) at its best shift does not mark its own "
               "image's beads; it is then scored against every other image of its size, and "
               f"the best is named when it reaches {lq.MATCH_FRACTION:g} x the median. "
               f"**{len(s['mismatch_files'])} mismatched mask(s).**\n")
    if s["mismatch_files"]:
        out.append(_table(["file", "evidence", "matches image", "evidence there"],
                          [[m["file"], _fmt(m["evidence"]), m["best_match"] or "none",
                            _fmt(rows[m["file"]]["best_match_evidence"])]
                           for m in s["mismatch_files"]]))
        out.append("")
    ov = s["overlap"]
    text = (f"**Overlap consistency.** {s['n_grid_neighbours_by_name']} neighbour pair(s) by "
            "grid name (`..._grid_r<R>_c<C>`, same frame, adjacent row or column); a pair "
            "shares pixels when a border strip of one equals the opposite border strip of the "
            "other (widths 1-128 px, high-passed strips correlating >= "
            f"{lq.MIN_OVERLAP_CORR:g}).")
    if ov:
        text += (
            f" **{ov['n_pairs']} pair(s) share pixels** ({ov['n_identical']} bit-identical); "
            f"on those strips the two masks agree at **pooled Jaccard "
            f"{_fmt(ov['pooled_jaccard'])}** (median per pair {_fmt(ov['median_pair_jaccard'])}"
            f", {ov['n_pairs_with_beads']} pairs with beads). This is the *label-consistency "
            "ceiling* (`summary.json` `label_consistency_ceiling`): the labels agree with "
            "themselves only that well on identical pixels, so a perfect model cannot score "
            "much higher against them.")
        if lab.get("after"):
            text += (f" With the offsets undone: pooled Jaccard "
                     f"{_fmt(lab['after']['pooled_jaccard'])}.")
        out.append(text + "\n")
        out.append(_table(["first", "second", "side", "overlap px", "pixels identical",
                           "mask Jaccard"],
                          [[p["first"], p["second"], p["side"], p["width"],
                            "yes" if p["images_identical"] else
                            f"no (r = {p['image_correlation']:.4f})", _fmt(p["jaccard"])]
                           for p in lab["pairs"][:40]]))
        if len(lab["pairs"]) > 40:
            out.append(f"\n({len(lab['pairs']) - 40} more in `overlap_pairs.csv`.)")
        out.append("")
    else:
        out.append(text + " No two tiles share pixels: no ceiling can be measured.\n")
    miss, merg = s["missed_beads_files"], s["merged_beads_files"]
    out.append("**Missed and merged beads.** Dark blobs = darkness >= half the median "
               "darkness under the (offset-corrected) mask, holes filled, touching beads split "
               "by the watershed of `microbead_metrics.label_beads`. A blob of 0.4-2.5 "
               "single-bead areas that the mask, dilated by 2 px, does not touch is *missed*. A "
               "binary mask cannot separate touching beads and need not (training and counting "
               "split its objects with the same `label_beads`), so a mask object is *merged* "
               "only when it covers more image beads than that split finds in it: those beads "
               "are lost to every count made from the mask. Reported when at least "
               f"{lq.MIN_FLAGGED_BEADS} beads make at least {lq.MIN_FLAGGED_FRACTION:.0%} of "
               f"the tile's blobs: **{len(miss)} file(s) with missed beads, {len(merg)} with "
               "merged beads** (rows `missed_beads`, `merged_beads` in the problem table). "
               "Dark debris of bead size counts as a missed bead.\n")
    fixed = lab.get("fixed")
    if fixed:
        out.append(f"**Corrected copy** (`--write_fixed`): `{fixed['dir']}`. "
                   f"{len(fixed['changed'])} mask(s) shifted back by their offset (pixels "
                   "moved past the border are lost, the strip left behind is background); "
                   "every other file copied byte for byte; the input folder was not touched."
                   + (f" Not copied: {', '.join(fixed['not_copied'])}."
                      if fixed["not_copied"] else "") + "\n")
        if fixed["changed"]:
            out.append(_table(["mask", "shifted by dy, dx (px)"],
                              [[c["file"], f"{c['shift_dy']:+d}, {c['shift_dx']:+d}"]
                               for c in fixed["changed"]]))
            out.append("")
    out.append("![label quality](label_quality.png)\n")
    return out


def plot_label_quality(analysis: Analysis, path: Path) -> None:
    """Offsets, bead evidence per mask, overlap agreement, and the largest offset on its
    image (mask as stored red, shifted back green)."""
    plt = _pyplot()
    lab = analysis.labels or {"rows": {}, "pairs": [], "summary": {}}
    rows = [r for r in lab["rows"].values() if r.get("assessed")]
    s = lab["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    a1, a2, a3, a4 = axes.ravel()
    if rows:
        dx = np.array([r["offset_dx"] for r in rows], float)
        dy = np.array([r["offset_dy"] for r in rows], float)
        flag = np.array([bool(r["mask_offset"]) for r in rows])
        bad = np.array([bool(r["mismatch"]) for r in rows])
        jit = np.random.default_rng(0).uniform(-0.15, 0.15, (2, len(rows)))
        a1.scatter((dx + jit[0])[~bad], (dy + jit[1])[~bad], s=14,
                   c=np.where(flag, "tab:red", "tab:blue")[~bad])
        a1.scatter([], [], s=14, color="tab:blue", label="mask on its beads")
        a1.scatter([], [], s=14, color="tab:red", label="offset mask (numbered)")
        if bad.any():
            a1.scatter(dx[bad], dy[bad], marker="x", color="grey", label="mismatched mask")
        a1.legend(fontsize=8, loc="lower left")
        # Numbered points, names in a list beside: names keep their dilution and never
        # overlap, however many masks share an offset.
        listed = [r for r in rows if r["mask_offset"]]
        for k, r in enumerate(listed, start=1):
            a1.annotate(str(k), (r["offset_dx"], r["offset_dy"]), xytext=(4, 4 + 7 * (k % 2)),
                        textcoords="offset points", fontsize=9, color="tab:red")
        if listed:
            a1.text(1.02, 1.0, "offset masks\n" + "\n".join(
                f"{k}  {short_tile_name(r['file'])}  "
                f"{_offset_text(r['offset_dy'], r['offset_dx'])}"
                for k, r in enumerate(listed, start=1)), transform=a1.transAxes, va="top",
                fontsize=9, family="monospace")
        m = lq.MIN_OFFSET_PX - 0.5
        a1.add_patch(plt.Rectangle((-m, -m), 2 * m, 2 * m, fill=False, ls=":", color="grey"))
        lim = s.get("max_shift_px", lq.MAX_SHIFT) + 0.5
        a1.set(xlim=(-lim, lim), ylim=(lim, -lim))
        ev = sorted((r["evidence"], r["file"], r["mismatch"]) for r in rows)
        a2.bar(range(len(ev)), [e[0] for e in ev],
               color=["tab:red" if e[2] else "tab:green" for e in ev])
        a2.bar([0], [0], color="tab:green", label="mask")
        if any(e[2] for e in ev):
            a2.bar([0], [0], color="tab:red", label="mismatched mask")
        if s.get("evidence_median") is not None and math.isfinite(s["evidence_median"]):
            a2.axhline(s["evidence_median"], color="k", ls="--", lw=1, label="median")
        if s.get("mismatch_threshold") is not None and math.isfinite(s["mismatch_threshold"]):
            a2.axhline(s["mismatch_threshold"], color="tab:red", ls=":", lw=1,
                       label="mismatch threshold")
        a2.legend(fontsize=7)
    a1.set(title="Mask offset from its beads (native px)", xlabel="dx", ylabel="dy")
    a2.set(title="Bead evidence per mask (sorted)", xlabel="masks", ylabel="evidence")
    js = [p["jaccard"] for p in lab["pairs"] if math.isfinite(p["jaccard"])]
    if js:
        a3.hist(js, bins=np.linspace(0, 1, 21), color="tab:purple", edgecolor="white")
        c = s["label_consistency_ceiling"]
        a3.axvline(c, color="k", ls="--", label=f"pooled {c:.2f} (ceiling)")
        a3.legend(fontsize=7)
    else:
        a3.text(0.5, 0.5, "no tiles share pixels", ha="center", va="center",
                transform=a3.transAxes)
    a3.set(title="Mask agreement on shared strips", xlabel="Jaccard per neighbour pair",
           ylabel="pairs")
    a4.axis("off")
    offs = [r for r in rows if r["mask_offset"]]
    if offs:
        r = max(offs, key=lambda r: r["offset_gain"])
        rec = next(x for x in analysis.records if x.name == r["file"])
        img = mio.normalize_image(mio.read_image(rec.image_path, 1)[..., 0])
        m = mio.read_mask(rec.mask_path, warn=False).astype(bool)
        f = lq.shift_mask(m, -r["offset_dy"], -r["offset_dx"])
        cy, cx = (int(v) for v in np.argwhere(m).mean(axis=0))
        h = min(64, img.shape[0] // 2, img.shape[1] // 2)
        y0 = int(np.clip(cy - h, 0, img.shape[0] - 2 * h))
        x0 = int(np.clip(cx - h, 0, img.shape[1] - 2 * h))
        win = (slice(y0, y0 + 2 * h), slice(x0, x0 + 2 * h))
        rgb = np.repeat(img[win][..., None], 3, axis=-1)
        for mm_, colour in ((m[win], (1.0, 0.1, 0.1)), (f[win], (0.1, 0.9, 0.1))):
            edge = mm_ & ~ndi.binary_erosion(mm_, structure=np.ones((3, 3), bool))
            rgb[edge] = colour
        a4.imshow(rgb, interpolation="nearest")
        a4.set_title(f"{short_tile_name(r['file'])}: offset "
                     f"{_offset_text(r['offset_dy'], r['offset_dx'])}\nmask as stored red, "
                     "shifted back green", fontsize=10)
    else:
        a4.text(0.5, 0.5, "no offset mask", ha="center", va="center", transform=a4.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_tile_name(name: str) -> str:
    """``"640x r1 c1"`` for ``640x_2025-05-16_00-59-00_002_grid_r1_c1.png``: the dilution
    and grid position a figure label needs; other names: the stem, cut to 28 characters."""
    stem = Path(name).stem
    m = re.match(r"^(?:(\d+(?:\.\d+)?x)_)?.*?_grid_r(\d+)_c(\d+)$", stem)
    if m:
        return " ".join(x for x in (m.group(1), f"r{m.group(2)}", f"c{m.group(3)}") if x)
    return stem if len(stem) <= 28 else stem[:13] + "..." + stem[-12:]


def fixed_dir_problem(fixed: Path, data_dir: Path, output_dir: Path) -> str | None:
    """None if ``--write_fixed`` may write to ``fixed``, else a one-line reason."""
    f, d, o = fixed.resolve(), data_dir.resolve(), output_dir.resolve()
    if f == d or d in f.parents or f in d.parents:
        return (f"{fixed}: --write_fixed folder overlaps the data folder {data_dir}; the input "
                "is never written to, choose another folder")
    if f == o or o in f.parents or f in o.parents:
        return f"{fixed}: --write_fixed folder overlaps --output_dir {output_dir}"
    if f.exists() and (not f.is_dir() or any(f.iterdir())):
        return f"{fixed}: --write_fixed folder exists and is not empty"
    return None


def write_fixed_copy(analysis: Analysis, dest: Path) -> dict:
    """Corrected copy of the dataset: offset masks shifted back, everything else copied.

    ``images/``, ``masks/`` and the data folder's top-level files are copied byte for byte
    (other sub-folders, such as ``large/``, are not copied and are listed); each mask
    reported as offset is then rewritten, moved by minus its offset, with its stored dtype,
    foreground value and file format. ``dest/label_fixes.csv`` lists the changes. The input
    folder is only read.

    Returns
    -------
    dict
        ``dir``, ``changed`` (list of ``{file, shift_dy, shift_dx}``), ``not_copied``.
    """
    import shutil

    src = analysis.data_dir
    dest.mkdir(parents=True, exist_ok=True)
    not_copied = []
    for p in sorted(src.iterdir()):
        if p.is_dir() and p.name in ("images", "masks"):
            shutil.copytree(p, dest / p.name)
        elif p.is_file():
            shutil.copy2(p, dest / p.name)
        else:
            not_copied.append(p.name + ("/" if p.is_dir() else ""))
    changed = []
    for rec in analysis.records:
        row = analysis.labels.get("rows", {}).get(rec.name, {})
        if not row.get("mask_offset"):
            continue
        raw = mio._read_raw(rec.mask_path)
        sy, sx = -int(row["offset_dy"]), -int(row["offset_dx"])
        target = dest / rec.mask_path.relative_to(src)
        mio.write_image(target, lq.shift_mask(raw, sy, sx))
        changed.append({"file": _rel(rec.mask_path, src), "shift_dy": sy, "shift_dx": sx})
    _write_csv(dest / "label_fixes.csv", ["file", "change", "shift_dy", "shift_dx"],
               [[c["file"], "mask shifted back by its offset", c["shift_dy"], c["shift_dx"]]
                for c in changed])
    for c in changed:
        log.info("%s: mask shifted by dy=%+d, dx=%+d in %s", c["file"], c["shift_dy"],
                 c["shift_dx"], dest)
    return {"dir": str(dest), "changed": changed, "not_copied": not_copied}


# --------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_samples(records: list[ImageRecord], k: int = 8) -> list[ImageRecord]:
    """Up to ``k`` records evenly spread over the density range (sorted by beads, then
    positive ratio), always including the sparsest and the densest."""
    if not records:
        return []
    order = sorted(records, key=lambda r: (r.stats["n_beads"], r.stats["positive_ratio"],
                                           r.name))
    idx = np.unique(np.rint(np.linspace(0, len(order) - 1, min(k, len(order)))).astype(int))
    return [order[i] for i in idx]


def plot_samples(analysis: Analysis, path: Path, k: int = 8) -> list[str]:
    """Overlay figure: mask outline (red) and unlabelled bead-like candidates (yellow)."""
    plt = _pyplot()
    chosen = pick_samples(analysis.records, k)
    if not chosen:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no analysable image", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return []
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.1 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), chosen):
        img = np.clip(_analysis_image(rec.image_path, analysis.image_size,
                                      analysis.normalization), 0.0, 1.0)
        m = rec.mask.astype(bool)
        edge = m & ~ndi.binary_erosion(m, structure=np.ones((3, 3), bool))
        rgb = np.repeat(img[..., None], 3, axis=-1)
        rgb[edge] = (1.0, 0.1, 0.1)
        ax.imshow(rgb, interpolation="nearest")
        c = rec.candidates
        if c and "unlabelled" in c and c["unlabelled"].any():
            r = math.sqrt(analysis.summary["median_bead_area_px"] / math.pi)
            for y, x in zip(c["y"][c["unlabelled"]], c["x"][c["unlabelled"]]):
                ax.add_patch(plt.Circle((x, y), r * 1.2, fill=False, color="yellow", lw=1.2))
        name = rec.name if len(rec.name) <= 34 else rec.name[:15] + "..." + rec.name[-16:]
        flag = " [partial?]" if rec.stats.get("partial_mask_suspect") else ""
        ax.set_title(f"{name}\nobjects {rec.stats['n_objects']}, beads {rec.stats['n_beads']}, "
                     f"fg {rec.stats['positive_ratio']:.1%}{flag}", fontsize=8)
    fig.suptitle("Samples across the density range (red: mask outline, yellow: bead-like "
                 "blobs not in the mask)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (4.1 * rows + 0.4)), h_pad=1.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [r.name for r in chosen]


def plot_distributions(analysis: Analysis, path: Path) -> None:
    """Six panels: positive ratio, objects/beads per image (every image), object size,
    brightness vs contrast, beads vs objects, focus."""
    plt = _pyplot()
    recs = analysis.records
    s = analysis.summary
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (a1, a2, a3), (a4, a5, a6) = axes
    pos = [r.stats["positive_ratio"] for r in recs]
    objs = [r.stats["n_objects"] for r in recs]
    beads = [r.stats["n_beads"] for r in recs]
    a1.hist(pos, bins=min(20, max(1, len(pos))), color="tab:blue", edgecolor="white")
    a1.set(title="Positive pixel ratio", xlabel="foreground fraction", ylabel="images")
    edges = np.asarray(s["objects_per_image_histogram"]["edges"])
    if edges.size:
        a2.hist(objs, bins=edges, color="tab:green", alpha=0.7, label="8-connected objects")
        b_edges = objects_histogram(beads)[0]
        a2.hist(beads, bins=b_edges, histtype="step", color="black", lw=1.5,
                label="beads (touching split)")
        a2.legend(fontsize=8)
    a2.set(title=f"Objects per image (all {len(objs)} images)", xlabel="count",
           ylabel="images")
    areas = np.concatenate([r.stats["areas"] for r in recs]) if recs else np.zeros(0)
    if areas.size:
        a3.hist(equivalent_diameter(areas), bins=40, color="tab:orange", edgecolor="white")
        if math.isfinite(s["median_bead_diameter_px"]):
            a3.axvline(s["median_bead_diameter_px"], color="k", ls="--",
                       label=f"single bead {s['median_bead_diameter_px']:.1f} px")
            a3.legend(fontsize=8)
    a3.set(title="Object size", xlabel=f"equivalent diameter (px at {analysis.image_size})",
           ylabel="objects")
    sc = a4.scatter([r.brightness for r in recs], [r.contrast for r in recs], c=beads,
                    cmap="viridis", s=18)
    if recs:
        fig.colorbar(sc, ax=a4, label="beads")
    a4.set(title="Brightness vs contrast (stored range)", xlabel="mean / full scale",
           ylabel="std / full scale")
    a5.scatter(objs, beads, s=14, color="tab:purple")
    top = max(objs + beads + [1])
    a5.plot([0, top], [0, top], "k:", lw=1)
    a5.set(title="Touching beads split vs components", xlabel="objects (components)",
           ylabel="beads")
    a6.hist([r.stats["focus"] for r in recs], bins=min(20, max(1, len(recs))), color="tab:gray",
            edgecolor="white")
    a6.set(title="Focus (variance of Laplacian)", xlabel="focus", ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- writers


def _write_csv(path: Path, header, rows) -> None:
    """Positional rows under ``header``, through :func:`microbead_io.atomic_write_csv`."""
    header = list(header)
    mio.atomic_write_csv(path, [dict(zip(header, r)) for r in rows], header)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def per_image_rows(analysis: Analysis) -> list[list]:
    """Rows of ``per_image.csv`` in :data:`PER_IMAGE_COLUMNS` order."""
    rows = []
    for r in analysis.records:
        s = r.stats
        d = mio.parse_dilution(r.name)
        vals = [
            r.name, r.mask_path.name, "" if d is None else d, r.native_shape[1],
            r.native_shape[0], r.mask_encoding, s["n_objects"], s["n_beads"],
            s["positive_ratio"], s["mean_object_area_px"], s["median_object_area_px"],
            s["mean_equiv_diameter_px"], r.brightness, r.contrast, s["focus"], s["polarity"],
            s["n_bead_candidates"], s["n_unlabelled_candidates"], s["unlabelled_fraction"],
            int(bool(s["partial_mask_suspect"])), ";".join(r.problems),
        ]
        rows.append(["" if v is None or (isinstance(v, float) and not math.isfinite(v))
                     else (f"{v:.6g}" if isinstance(v, float) else v) for v in vals])
    return rows


def _table(header, rows) -> str:
    def esc(v):
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(analysis: Analysis, *, samples: list[str], runtime_s: float,
                  command: str) -> str:
    """Markdown report; every number is formatted from ``analysis`` (nothing typed in)."""
    out = _report_header(analysis, runtime_s=runtime_s, command=command)
    out += _report_integrity(analysis)
    out += _report_statistics(analysis, samples)
    out += _report_partial_masks(analysis)
    out += _report_recommendation(analysis)
    out += render_label_section(analysis)
    add = out.append
    add("## Files\n")
    add("`summary.json`, `per_image.csv`, `per_dilution.csv`, `integrity_problems.csv`, "
        "`distribution_analysis.png`, `sample_images.png`, `recommended_config.json`, "
        "`recommended_config_evidence.json`, `label_quality.csv`, `overlap_pairs.csv`, "
        "`label_quality.png`, `analysis.log`.\n")
    return "\n".join(out)


def _report_header(analysis: Analysis, *, runtime_s: float, command: str) -> list[str]:
    """Title, dataset, command and how the statistics were computed."""
    s = analysis.summary
    n = s["dataset_size"]
    out: list[str] = []
    add = out.append
    add("# Microbead dataset analysis\n")
    add(f"Dataset `{analysis.data_dir}`: {s['n_image_files']} image files, "
        f"{s['n_mask_files']} mask files, {s['n_pairs']} pairs, **{n} pairs analysed**. "
        f"Generated by `{command}` in {runtime_s:.1f} s.\n")
    norm = analysis.normalization or {}
    how = (f"flat-field normalised like the trainer's default (divided by its local background, "
           f"a grey closing over {norm['window']} px, i.e. 8 bead diameters; the ratio mapped "
           f"{_fmt(norm['low'])} -> 0 and {_fmt(norm['high'])} -> 1 with one scale for the whole "
           "dataset)" if norm.get("method") == "flatfield" else "percentile-normalised")
    add(f"All statistics are computed on the data **as training sees it**: each mask binarized "
        f"and resized to {analysis.image_size}x{analysis.image_size} with "
        f"`microbead_io.resize_mask` (nearest neighbour, re-binarized), each image resized "
        f"and {how}. Sizes in px are at {analysis.image_size} px"
        + (" (the stored tile size, which training uses by default)"
           if analysis.image_size in {int(k.split("x")[0]) for k in s["native_sizes"]} else "")
        + ". Native sizes: "
        + ", ".join(f"{k} ({v} images)" for k, v in s["native_sizes"].items())
        + (f"; pixel scale from dataset.json: {_fmt(s['pixel_scale'])}" if s["pixel_scale"]
           else "") + ".\n")
    return out


def _report_integrity(analysis: Analysis) -> list[str]:
    """Section 1: mask encodings, the problem table and what was checked."""
    s = analysis.summary
    out: list[str] = []
    add = out.append
    add("## 1. Integrity check\n")
    enc = ", ".join(f"{k}: {v}" for k, v in s["mask_encodings"].items()) or "none"
    add(f"Mask encoding overall: **{s['mask_encoding_overall']}** ({enc}).\n")
    if analysis.problems:
        add(f"**{len(analysis.problems)} problem(s)**; `error` = file not analysed, "
            "`warning` = analysed but suspicious. `--strict` exits non-zero on any row.\n")
        add(_table(["file", "problem", "severity", "detail"],
                   [[p.file, p.problem, p.severity, p.detail] for p in analysis.problems]))
        add("")
    else:
        add("No problem found.\n")
    add("Checks: pairing by stem (`microbead_io.pair_files`); every file decoded; mask value "
        "set (two-level 0/255 expected; 0/1 and grey-level/anti-aliased masks reported); image "
        "and mask sizes equal; duplicate images by SHA-1 of the decoded pixels; empty masks and "
        f"masks with more than {NEARLY_FULL_RATIO:.0%} foreground; inverted contrast (below); "
        "constant (blank) images.\n")
    add(f"*Inverted contrast.* Beads are darker than their background, so for each image "
        f"the polarity = mean intensity (percentile-normalised per image for this check) in a "
        f"ring around the mask (hole-filled mask "
        f"dilated by half a bead radius, minus the mask) - mean intensity inside the mask is "
        f"positive. The expected sign is the dataset median's when at least "
        f"{POLARITY_CONSENSUS_MIN} images have beads (else the dark-bead prior); an image is "
        f"reported when its polarity has the opposite sign by more than {POLARITY_MARGIN} "
        f"(normalised units). Median polarity: "
        f"{_fmt(_median([r.stats['polarity'] for r in analysis.records]))}.\n")
    return out


def _report_statistics(analysis: Analysis, samples: list[str]) -> list[str]:
    """Section 2: the statistics table, per-dilution and source-frame tables, figures."""
    s = analysis.summary
    n = s["dataset_size"]
    out: list[str] = []
    add = out.append
    add("## 2. Statistics\n")
    rows = [
        ["images analysed (`dataset_size`)", _fmt(n)],
        ["objects per image (8-connected), mean ± std",
         f"{_fmt(s['mean_objects_per_image'])} ± {_fmt(s['std_objects_per_image'])}"],
        ["beads per image (touching beads split), mean ± std",
         f"{_fmt(s['mean_beads_per_image'])} ± {_fmt(s['std_beads_per_image'])}"],
        ["total objects / total beads", f"{s['total_objects']} / {s['total_beads']}"],
        ["positive pixel ratio, mean ± std",
         f"{_fmt(s['mean_positive_ratio'])} ± {_fmt(s['std_positive_ratio'])}"],
        ["empty masks", f"{s['empty_masks']} ({_fmt(s['empty_mask_fraction'])})"],
        ["object area px, mean / median (`mean_object_size`)",
         f"{_fmt(s['mean_object_size'])} / {_fmt(s['median_object_size'])}"],
        ["single-bead area px (median) / diameter px",
         f"{_fmt(s['median_bead_area_px'])} / {_fmt(s['median_bead_diameter_px'])}"],
        ["equivalent diameter of objects px, mean", _fmt(s["mean_equiv_diameter_px"])],
        ["brightness (mean / full scale), mean ± std",
         f"{_fmt(s['mean_brightness'])} ± {_fmt(s['std_brightness'])}"],
        ["contrast (std / full scale), mean ± std",
         f"{_fmt(s['mean_contrast'])} ± {_fmt(s['std_contrast'])}"],
        ["focus (variance of Laplacian), mean ± std",
         f"{_fmt(s['mean_focus'])} ± {_fmt(s['std_focus'])}"],
        ["partial-mask suspects",
         f"{s['partial_mask_suspects']} ({_fmt(s['partial_mask_ratio'])})"],
    ]
    add(_table(["quantity", f"value (at {analysis.image_size} px)"], rows))
    add("")
    add("Definitions: objects are 8-connected components of the resized mask; beads come from "
        "`microbead_metrics.count_beads` (components larger than 1.5 single-bead areas split by "
        "a distance-transform watershed, fragments below a quarter bead dropped), with the "
        "single-bead area = median area of compact interior components over the whole dataset "
        "(`estimate_bead_area`). Brightness and contrast are the mean and standard deviation of "
        "the *stored* image divided by its full scale (255, 65535), because normalisation "
        "removes them from what the network sees. Means and stds are over images (population "
        "std); object areas are pooled over all objects. Per-image values: `per_image.csv`.\n")
    if s["per_dilution"]:
        add("### Per dilution\n")
        add(_table(["dilution", "images", "objects/image", "beads/image", "positive ratio",
                    "brightness", "partial suspects"],
                   [[f"{k}x" if k != "none" else "none", v["n_images"],
                     f"{_fmt(v['mean_objects_per_image'])} ± {_fmt(v['std_objects_per_image'])}",
                     f"{_fmt(v['mean_beads_per_image'])} ± {_fmt(v['std_beads_per_image'])}",
                     _fmt(v["mean_positive_ratio"]), _fmt(v["mean_brightness"]),
                     v["partial_mask_suspects"]] for k, v in s["per_dilution"].items()]))
        add("")
    sf = s.get("source_frames") or {}
    if sf.get("n_groups"):
        add("### Source frames\n")
        add(f"{n} tiles come from **{sf['n_groups']} source frame(s)** (largest: "
            f"{sf['largest_group']} tiles; {sf['n_grid_tiles']} named `…_grid_rR_cC`). Tiles of "
            "one frame can share pixels (the users' grid columns overlap by 37 px), so the "
            "trainer keeps each frame on one side of the train/validation split "
            "(`--group_pattern` for other naming schemes). Groups are listed in "
            "`summary.json` (`source_frames`).\n")
    add("### Figures\n")
    add("![distributions](distribution_analysis.png)\n")
    add(f"Objects-per-image histogram: {len(s['objects_per_image_histogram']['counts'])} bins "
        f"holding {sum(s['objects_per_image_histogram']['counts'])} of {n} images (none "
        "dropped).\n")
    add("![samples](sample_images.png)\n")
    add("Samples (spread over the density range): " + ", ".join(f"`{x}`" for x in samples)
        + ".\n")
    return out


def _report_partial_masks(analysis: Analysis) -> list[str]:
    """Section 3: the partial-mask method, its calibration and the suspects."""
    s, cal = analysis.summary, analysis.calibration
    out: list[str] = []
    add = out.append
    add("## 3. Partial-mask suspects\n")
    ring = math.isfinite(cal.get("ring_threshold", math.nan))
    add(f"Method: at the median bead radius r = {_fmt(_radius(s))} px, a difference of "
        "Gaussians (sigma 0.7 r and 2 r) of the darkness (1 - normalised image) peaks at the "
        "centre of each dark bead; local maxima at least r from the border are candidates. "
        + (("A ring score (mean darkness on the annulus 0.6-1.2 r minus the central disc "
            "<= 0.4 r) separates ring beads from filled debris. Both thresholds are calibrated "
            f"on the labelled beads themselves: {CANDIDATE_RESPONSE_FRACTION:g} x the median "
            f"response and {CANDIDATE_RING_FRACTION:g} x the median ring score at the centroids "
            f"of {cal['n_calibration_beads']} labelled single beads (thresholds "
            f"{_fmt(cal['response_threshold'])} and {_fmt(cal['ring_threshold'])}). ")
           if ring else
           ("The labelled beads are solid (their median ring score is not positive), so no "
            "ring criterion applies. The response threshold is calibrated on the labelled "
            f"beads themselves: {CANDIDATE_RESPONSE_FRACTION:g} x the median response at the "
            f"centroids of {cal['n_calibration_beads']} labelled single beads "
            f"({_fmt(cal['response_threshold'])}). "))
        + "A candidate "
        "whose centre is outside the hole-filled mask dilated by r/2 is *unlabelled*; an image "
        f"is a suspect when it has >= {PARTIAL_MIN_UNLABELLED} unlabelled candidates making "
        f">= {PARTIAL_MIN_FRACTION:.0%} of all its candidates (candidates against candidates, "
        "so the detector's lower recall in dense, touching clusters cancels out). Inverted "
        "images are not assessed. The check finds missing beads; it cannot see beads the "
        "detector misses, and " + ("debris that looks like a ring" if ring else
                                   "dark debris of bead size") + " would count.\n")
    sus = [r for r in analysis.records if r.stats.get("partial_mask_suspect")]
    if sus:
        add(_table(["file", "beads in mask", "candidates", "unlabelled candidates", "fraction"],
                   [[r.name, r.stats["n_beads"], r.stats["n_bead_candidates"],
                     r.stats["n_unlabelled_candidates"],
                     _fmt(r.stats["unlabelled_fraction"])] for r in sus]))
        add("")
    else:
        add("No suspect.\n")
    return out


def _report_recommendation(analysis: Analysis) -> list[str]:
    """Section 4: the recommended config and the evidence for each value."""
    cfg, ev = analysis.config, analysis.evidence
    out: list[str] = []
    add = out.append
    add("## 4. Recommended training configuration\n")
    if cfg:
        add("`recommended_config.json` (use with `python train_microbead_optimized.py --config "
            "recommended_config.json`; evidence also in `recommended_config_evidence.json`):\n")
        add("```json\n" + json.dumps(cfg, indent=2) + "\n```\n")
        e = ev["image_size"]["evidence"]
        add(f"- **image_size = {cfg['image_size']}, depth = {cfg['depth']}.** The U-Nets in "
            f"`models.py` with depth {e['assumed_depth']} (two 3x3 convolutions per level, 2x2 "
            f"pooling) have a theoretical receptive field of {e['receptive_field_px']} px; the "
            "effective one is much smaller (Luo et al. 2016). A bead should span >= "
            f"{MIN_BEAD_DIAMETER_PX:g} px so it survives the first pooling steps, and at "
            f"most RF/4 = {e['receptive_field_px'] / 4:g} px so a bead plus its surroundings fit "
            f"in the field. Measured median bead diameter: "
            f"{_fmt(e['median_bead_diameter_native_px'])} px at the native tile size "
            f"{e['native_tile_size']}, {_fmt(e['median_bead_diameter_at_recommended_size_px'])} "
            f"px at the recommended size ({e['decision']}). "
            + smaller_input_note(e['smallest_size_keeping_min_diameter'], cfg['image_size']))
        e = ev["loss"]["evidence"]
        add(f"- **loss = {cfg['loss']}.** Rule: {ev['loss']['rule']}. Measured foreground ratio "
            f"{_fmt(e['mean_positive_ratio'])}, empty masks {_fmt(e['empty_mask_fraction'])}. "
            "Pixel-wise BCE is averaged over pixels, so with a small foreground its gradient is "
            "dominated by background; Dice is a ratio over the foreground and insensitive to "
            "it (Milletari et al. 2016) but degenerate on empty masks; BCE + Dice is the "
            "robust default across 23 datasets in nnU-Net (Isensee et al. 2021).")
        e = ev["batch_size"]["evidence"]
        add(f"- **batch_size = {cfg['batch_size']}, val_fraction = {cfg['val_fraction']:g}.** "
            f"{e['dataset_size']} images -> {e['n_train']} for training; rule: "
            f"{ev['batch_size']['rule']} (memory cap {e['memory_cap']}).")
        e = ev["steps_per_epoch"]["evidence"]
        add(f"- **steps_per_epoch = {cfg['steps_per_epoch']}.** One pass over the training set "
            f"is {e['batches_per_pass']} batches; rule: {ev['steps_per_epoch']['rule']}. "
            "Early stopping and learning-rate schedules count epochs, so fixed-length epochs "
            "make them behave the same on small and large datasets.")
        e = ev["density_bins"]["evidence"]
        add(f"- **density_bins = {cfg['density_bins']}.** Images per stratum: "
            f"{e['images_per_stratum']}. Rule: {ev['density_bins']['rule']}. Stratifying the "
            "train/validation split by density keeps dense and sparse tiles on both sides.")
        add("- Not recommended here: learning rate, epochs, patience. Nothing measured in the "
            "dataset supports a value for them (in particular the learning rate does not need "
            "to scale with objects per image), so the trainer's defaults apply.\n")
    else:
        add("No recommendation: no image could be analysed.\n")
    return out


def _median(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(np.median(v)) if v.size else float("nan")


def _radius(summary: dict) -> float:
    a = summary.get("median_bead_area_px")
    return math.sqrt(a / math.pi) if a is not None and math.isfinite(a) and a > 0 else float(
        "nan")


def check_output_dir(output_dir: Path, data_dir: Path, *,
                     overwrite: bool = False) -> cli.OutputClaim:
    """Apply the output-folder policy (``cli.claim_output_dir``); create and lock the folder.

    Refused: a folder inside the data folder; an existing non-empty folder without
    ``overwrite``; and, even with ``overwrite``, one holding files named like this script's
    outputs but no manifest of this script (they are someone else's results). ``overwrite``
    removes this script's files only; anything else in the folder is left alone. Returns
    the claim (release it when the run ends).

    Raises
    ------
    OutputDirError
        One-line message naming the folder or the clashing files; nothing was changed.
    """
    out = Path(output_dir)
    if out.is_dir() and overwrite and not _has_own_manifest(out):
        clashes = [f for f in OUTPUT_FILES if (out / f).exists() and f != LOG_FILE]
        if clashes:
            raise OutputDirError(
                f"{output_dir}: holds {', '.join(clashes)} not written by {SCRIPT_NAME} (no "
                f"{MANIFEST}); choose another --output_dir or remove them")
    try:
        return cli.claim_output_dir(out, OUTPUT_FILES, script=SCRIPT_NAME,
                                    overwrite=overwrite, protected=[data_dir],
                                    log_name=LOG_FILE)
    except cli.OutputDirError as exc:
        raise OutputDirError(str(exc)) from None


def _has_own_manifest(out: Path) -> bool:
    try:
        return json.loads((out / MANIFEST).read_text()).get("generator") == SCRIPT_NAME
    except (ValueError, OSError, AttributeError):
        return False


def write_outputs(analysis: Analysis, out: Path, *, t0: float, command: str) -> dict:
    """Write every output file; returns the summary as written."""
    out.mkdir(parents=True, exist_ok=True)
    mio.atomic_write_json(out / MANIFEST, {"generator": SCRIPT_NAME,
                                           "files": list(OUTPUT_FILES)})
    _write_csv(out / "integrity_problems.csv", ["file", "problem", "detail", "severity"],
               [[p.file, p.problem, p.detail, p.severity] for p in analysis.problems])
    _write_csv(out / "per_image.csv", PER_IMAGE_COLUMNS, per_image_rows(analysis))
    dil = analysis.summary["per_dilution"]
    cols = ["dilution", "n_images", "mean_objects_per_image", "std_objects_per_image",
            "mean_beads_per_image", "std_beads_per_image", "mean_positive_ratio",
            "mean_brightness", "partial_mask_suspects"]
    _write_csv(out / "per_dilution.csv", cols,
               [[k] + [mio.json_ready(v[c]) for c in cols[1:]] for k, v in dil.items()])
    plot_distributions(analysis, out / "distribution_analysis.png")
    samples = plot_samples(analysis, out / "sample_images.png")
    _write_csv(out / "label_quality.csv", LABEL_COLUMNS, label_rows(analysis))
    _write_csv(out / "overlap_pairs.csv", OVERLAP_COLUMNS,
               [[_cell(p[c]) for c in OVERLAP_COLUMNS] for p in analysis.labels.get("pairs", [])])
    plot_label_quality(analysis, out / "label_quality.png")
    summary = dict(analysis.summary)
    summary.pop("objects_per_image", None)  # per image: per_image.csv
    summary["sample_images"] = samples
    summary["runtime_s"] = round(time.perf_counter() - t0, 3)
    mio.atomic_write_json(out / "summary.json", summary)
    mio.atomic_write_json(out / "recommended_config.json", analysis.config)
    mio.atomic_write_json(out / "recommended_config_evidence.json", analysis.evidence)
    mio.atomic_write_text(out / REPORT, render_report(analysis, samples=samples,
                                                      runtime_s=summary["runtime_s"],
                                                      command=command))
    return summary


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (every underscore flag also accepts its hyphenated spelling)."""
    p = argparse.ArgumentParser(
        description="Integrity check, statistics and a recommended training config for a "
                    "microbead dataset (DATA/images + DATA/masks). Runs without TensorFlow.",
        formatter_class=cli.HelpFormatter)
    cli.add_option(p, "data_dir", default="dataset_microscope", type=Path,
                   help="dataset folder with images/ and masks/")
    cli.add_option(p, "output_dir", default="dataset_analysis", type=Path,
                   help="results folder, never inside --data_dir")
    cli.add_option(p, "image_size", default=0, type=int,
                   help="size masks/images are resized to, as in training; 0 = the stored "
                        "tile size (what training uses by default)")
    cli.add_option(p, "val_fraction", default=DEFAULT_VAL_FRACTION, type=float,
                   help="validation fraction the batch-size recommendation assumes")
    cli.add_option(p, "strict", action="store_true",
                   help="exit 1 if the integrity check finds any problem, warnings included")
    cli.add_option(p, "no_progress", action="store_true", help="no progress bars")
    cli.add_option(p, "write_fixed", type=Path, default=None, metavar="DIR",
                   help="write a corrected copy of the dataset to DIR (new or empty, outside "
                        "--data_dir): offset masks shifted back, every other file copied "
                        "unchanged (default: off)")
    cli.add_overwrite(p)
    args = p.parse_args(argv)
    if args.image_size and args.image_size < 16:
        p.error(f"--image_size must be 0 (stored size) or >= 16, got {args.image_size}")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    return args


def _quiet_opencv() -> int | None:
    """Silence OpenCV's native decoder chatter (we report each unreadable file in one line);
    returns the previous level, None where this OpenCV build has no logging API."""
    try:
        from cv2.utils import logging as cvlog

        previous = cvlog.getLogLevel()
        cvlog.setLogLevel(cvlog.LOG_LEVEL_SILENT)
        return previous
    except (ImportError, AttributeError):
        return None


def main(argv=None) -> int:
    """Run the analysis; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    cv_level = _quiet_opencv()
    handlers = [runtime.add_log_handler()]
    runtime.configure_threads()
    command = "python " + " ".join([SCRIPT_NAME, *(sys.argv[1:] if argv is None else argv)])
    claim = None
    try:
        if not args.data_dir.is_dir():  # a typo creates no output folder
            return cli.fatal(log, "%s: data folder not found", args.data_dir)
        if args.write_fixed is not None:
            reason = fixed_dir_problem(args.write_fixed, args.data_dir, args.output_dir)
            if reason:
                return cli.fatal(log, "%s", reason)
        try:
            claim = check_output_dir(args.output_dir, args.data_dir, overwrite=args.overwrite)
        except OutputDirError as exc:
            return cli.fatal(log, "%s", exc)
        handlers.append(runtime.add_log_handler(args.output_dir / LOG_FILE, mode="w"))
        claim.report(log)
        log.info("analysing %s at %s -> %s", args.data_dir,
                 f"{args.image_size} px" if args.image_size else "the stored tile size",
                 args.output_dir)
        try:
            analysis = analyze_dataset(args.data_dir, image_size=args.image_size,
                                       progress=not args.no_progress,
                                       val_fraction=args.val_fraction)
        except (FileNotFoundError, mio.PairingError) as exc:
            return cli.fatal(log, "%s", exc)
        if args.write_fixed is not None and analysis.records:
            analysis.labels["fixed"] = write_fixed_copy(analysis, args.write_fixed)
            analysis.summary["label_quality"]["fixed"] = analysis.labels["fixed"]
        summary = write_outputs(analysis, args.output_dir, t0=t0, command=command)
        for p in analysis.problems:
            (log.error if p.severity == "error" else log.warning)(
                "%s: %s: %s", p.file, p.problem, p.detail)
        n_err = sum(p.severity == "error" for p in analysis.problems)
        log.info("%d pairs analysed in %.1f s; %d integrity problem(s) (%d file(s) not "
                 "analysed); mask encoding %s; %d partial-mask suspect(s); report %s",
                 summary["dataset_size"], summary["runtime_s"], len(analysis.problems), n_err,
                 summary["mask_encoding_overall"], summary["partial_mask_suspects"],
                 args.output_dir / REPORT)
        if not analysis.records:
            return cli.fatal(log, "%s: no image/mask pair could be analysed", args.data_dir)
        if n_err or (args.strict and analysis.problems):
            return 1
        return 0
    finally:
        if claim is not None:  # the manifest of what was written; the lock goes
            claim.release()
        runtime.remove_log_handlers(handlers)
        if cv_level is not None:
            from cv2.utils import logging as cvlog

            cvlog.setLogLevel(cv_level)


if __name__ == "__main__":
    sys.exit(main())

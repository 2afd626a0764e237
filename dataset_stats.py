"""Statistics of a microbead dataset as training sees it, and the analysis that collects them.

:func:`analyze_dataset` runs the whole analysis of ``analyze_microbead_dataset.py``: the
integrity pass (``dataset_integrity``), per-image statistics on the training-preprocessed
image and mask (objects, beads, positive ratio, areas, brightness, contrast, focus), the
partial-mask check (bead-like blobs left out of a mask, thresholds calibrated on the labelled
beads), the label audit (``label_audit``), the dataset summary and the recommended config
(``config_recommendation``). It returns an :class:`Analysis`; the writers
(``analysis_report``, ``analysis_figures``, the script) only format it.

Example
-------
>>> analysis = analyze_dataset("dataset_microscope", progress=False)   # doctest: +SKIP
>>> analysis.summary["mean_beads_per_image"]                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

import label_audit
import microbead_io as mio
import microbead_metrics as mm
from config_recommendation import DEFAULT_VAL_FRACTION, recommend_config
from dataset_integrity import (
    ImageRecord,
    Problem,
    attach_problems,
    flag_inverted_contrast,
    inspect_pairs,
    mask_polarity,
    pairing_problems,
    skipped_problems,
)
from label_quality import disk

log = logging.getLogger("microbead.analyze")

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

PER_IMAGE_COLUMNS = (
    "file", "mask_file", "dilution", "native_width", "native_height", "mask_encoding",
    "n_objects", "n_beads", "positive_ratio", "mean_object_area_px", "median_object_area_px",
    "mean_equiv_diameter_px", "brightness", "contrast", "focus", "polarity",
    "n_bead_candidates", "n_unlabelled_candidates", "unlabelled_fraction",
    "partial_mask_suspect", "problems",
)


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


# --------------------------------------------------------------------------- per-image statistics


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
        ndi.binary_fill_holes(m), structure=disk(max(1, int(round(0.5 * r))))
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


def stored_size(pairs) -> int:
    """Stored size (the smaller side) of the first readable image of ``pairs``: the size
    training uses when ``--image_size`` is left at 0; 256 when none is readable."""
    for image_path, _ in pairs:
        try:
            return int(min(mio.read_image(image_path, 1).shape[:2]))
        except (OSError, ValueError):  # unreadable: the integrity check names it
            continue
    return 256


def analysis_image(path: Path, image_size: int, norm: dict | None) -> np.ndarray:
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


# --------------------------------------------------------------------------- the analysis


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
    norm = mio.flatfield_spec([analysis_image(r.image_path, image_size, mio.RAW)[..., None]
                               for r in records], median_area) if records else None

    # Pass 2: statistics on the training-preprocessed image and mask.
    for rec in tqdm(records, desc="statistics", unit="img", disable=not progress):
        img = analysis_image(rec.image_path, image_size, norm)
        rec.stats, rec.candidates = image_statistics(
            img, rec.mask, median_area=median_area, bead_radius=radius
        )
        # The inverted-contrast check is a property of the stored image, with a margin set
        # in per-image percentile units: a mask of another tile's beads sits at polarity ~0
        # and must be left to the mismatch check, not cross the margin by a change of scale.
        rec.stats["polarity"] = mask_polarity(
            analysis_image(rec.image_path, image_size, None), rec.mask,
            max(2, int(round(0.5 * radius))) if math.isfinite(radius) else 2)
    inverted = flag_inverted_contrast(records, root, problems)
    calib = flag_partial_masks(records, inverted)
    labels = label_audit.label_checks(records, root, problems, skip=inverted, image_size=image_size,
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

"""NumPy pixel and object metrics, and the touching-bead instance split, for microbead masks.

One implementation shared by ``analyze_microbead_dataset.py``, ``predict_microscope.py`` and
``evaluate_predictions.py``: the bead count a user sees in the analysis, in the predictor's
summary and in the evaluation report comes from :func:`label_beads` everywhere.

Conventions
-----------
* Binary masks: ``(H, W)`` arrays. bool / integer arrays are foreground where non-zero;
  floating arrays (probabilities) are foreground where ``> threshold`` (default 0.5).
* The threshold rule is one rule for the whole project: a pixel is bead when its
  probability is *strictly above* the threshold (:func:`above_threshold`). The Keras metrics
  (``models.jacard_coef`` ...), the trainer's validation scores and counts, the predictor's
  masks and labels and the evaluation all use it; it is Keras' own (``BinaryIoU``) and
  StarDist's (``prob > prob_thresh``) convention. A probability of exactly 0.5 is the
  network's undecided value (logit 0) and counts as background at threshold 0.5.
* Label images: integer ``(H, W)``; 0 background, any positive id an instance (ids need not
  be consecutive).

Empty-input rules (one rule everywhere)
---------------------------------------
* Pixel metrics: truth and prediction both empty -> every score is 1; exactly one empty ->
  Jaccard, Dice, precision and recall are 0. Precision with no predicted pixels is 1 if the
  truth is empty, else 0; recall with no true pixels is 1 if the prediction is empty, else 0.
* Object metrics: no true and no predicted objects -> precision = recall = F1 = panoptic
  quality = 1, count error 0. Mean matched IoU is NaN when nothing is matched (undefined, not 0).

Pure NumPy / SciPy / scikit-image / OpenCV; no TensorFlow.

Example
-------
>>> labels = label_beads(mask)                       # doctest: +SKIP
>>> m = match_instances(true_labels, labels)         # doctest: +SKIP
>>> m["tp"], m["fp"], m["fn"], m["f1"]               # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

#: IoU thresholds reported by default (0.50, 0.55, ..., 0.95), as in COCO / StarDist.
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

# Components smaller than this are never used to estimate the single-bead area (noise).
_MIN_ESTIMATE_PIXELS = 4
# Filled-contour solidity above which a component is taken as one compact bead when
# estimating the bead area; two touching equal discs have solidity 2*pi/(pi+4) ~ 0.88.
_COMPACT_SOLIDITY = 0.92
# Seeds of the split are at least this many bead radii apart (touching beads: 2 radii).
_SEED_SPACING_RADII = 0.7


# --------------------------------------------------------------------------- helpers


def above_threshold(prob, threshold: float) -> np.ndarray:
    """The project's threshold rule: bool ``prob > threshold`` (same shape as ``prob``)."""
    return np.asarray(prob) > threshold


def as_binary(x, threshold: float = 0.5) -> np.ndarray:
    """Boolean foreground of a mask or probability map.

    Parameters
    ----------
    x : array_like ``(H, W)``
        bool / integer (foreground = non-zero) or floating (foreground = ``> threshold``).
    threshold : float
        Used only for floating input.

    Returns
    -------
    bool ndarray, same shape.
    """
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return above_threshold(a, threshold)
    return a != 0


# --------------------------------------------------------------------------- pixel metrics


def pixel_counts(pred, truth, *, threshold: float = 0.5) -> dict[str, int]:
    """Pixel confusion counts of a predicted against a true mask.

    Parameters
    ----------
    pred, truth : array_like ``(H, W)``
        Masks (see :func:`as_binary`); shapes must match.

    Returns
    -------
    dict with int ``tp``, ``fp``, ``fn``, ``tn``.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    p = as_binary(pred, threshold)
    t = as_binary(truth, threshold)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != truth shape {t.shape}")
    n = int(p.size)
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    tp = int(np.count_nonzero(p & t))
    return {"tp": tp, "fp": n_p - tp, "fn": n_t - tp, "tn": n - n_p - n_t + tp}


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int = 0) -> dict[str, float]:
    """Jaccard, Dice, precision, recall, accuracy from pixel counts (empty rules applied).

    Used both per image and pooled (summed counts over a folder).

    Returns
    -------
    dict of float in [0, 1]: ``jaccard``, ``dice``, ``precision``, ``recall``, ``accuracy``.
    """
    n_true = tp + fn
    n_pred = tp + fp
    union = tp + fp + fn
    total = tp + fp + fn + tn
    return {
        "jaccard": tp / union if union else 1.0,
        "dice": 2 * tp / (n_true + n_pred) if union else 1.0,
        "precision": tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0),
        "recall": tp / n_true if n_true else (1.0 if n_pred == 0 else 0.0),
        "accuracy": (tp + tn) / total if total else 1.0,
    }


def pixel_metrics(pred, truth, *, threshold: float = 0.5) -> dict[str, float]:
    """Per-image pixel metrics of a predicted against a true binary mask.

    Parameters
    ----------
    pred, truth : array_like ``(H, W)``
        Masks (bool/int: non-zero is foreground; float: ``> threshold``).

    Returns
    -------
    dict
        ``jaccard`` (IoU), ``dice``, ``precision``, ``recall``, ``accuracy`` (floats in
        [0, 1]) and the int counts ``tp``, ``fp``, ``fn``, ``tn``. Both masks empty -> all
        scores 1; exactly one empty -> Jaccard, Dice, precision, recall 0.
    """
    counts = pixel_counts(pred, truth, threshold=threshold)
    out: dict = metrics_from_counts(**counts)
    out.update(counts)
    return out


# --------------------------------------------------------------------------- bead area


def count_components(mask) -> int:
    """Number of 8-connected foreground components of a binary mask ``(H, W)``.

    The raw object count (touching beads count once): the density measure the trainer
    stratifies by and the predictor reports beside its bead count. Empty mask -> 0.
    """
    m = as_binary(mask).astype(np.uint8, copy=False)
    return int(cv2.connectedComponents(m, connectivity=8)[0] - 1)


def component_areas(mask) -> np.ndarray:
    """Pixel areas (int64) of the 8-connected foreground components of a binary mask.

    The statistic of the scale check: ``prediction.bead_area_ratio`` takes the median
    of a frame's, the trainer the median of its validation predictions' as the reference, so
    both sides are measured alike. Empty mask -> empty array.
    """
    m = as_binary(mask).astype(np.uint8, copy=False)
    _, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    return stats[1:, cv2.CC_STAT_AREA].astype(np.int64)


def _component_stats(mask: np.ndarray):
    """8-connected components: (labels int32, areas, touches_border, compact) per component."""
    m = mask.astype(np.uint8, copy=False)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8, ltype=cv2.CV_32S)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    x, y = stats[1:, cv2.CC_STAT_LEFT], stats[1:, cv2.CC_STAT_TOP]
    w, h = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    H, W = m.shape
    border = (x == 0) | (y == 0) | (x + w >= W) | (y + h >= H)
    return n - 1, lab, stats, areas, border


def _compactness(mask: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """Per-component solidity of the outer contour (holes filled, so rings count as discs)."""
    solidity = np.zeros(n, dtype=np.float64)
    if n == 0:
        return solidity
    contours, _ = cv2.findContours(
        mask.astype(np.uint8, copy=False), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    for c in contours:
        x0, y0 = c[0, 0]
        k = int(lab[y0, x0]) - 1
        if k < 0:
            continue
        hull_area = cv2.contourArea(cv2.convexHull(c))
        if hull_area > 0:
            solidity[k] = cv2.contourArea(c) / hull_area
    return solidity


def _bead_area_candidates(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Areas of one mask's components and flags (interior, compact), noise excluded."""
    m = as_binary(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    n, lab, _, areas, border = _component_stats(m)
    solidity = _compactness(m, lab, n)
    keep = areas >= _MIN_ESTIMATE_PIXELS
    return areas[keep], ~border[keep], solidity[keep] >= _COMPACT_SOLIDITY


def estimate_bead_area(masks) -> float:
    """Median pixel area of a single bead, from one mask or many.

    The median of 8-connected component areas, restricted (when at least 3 such components
    exist) to compact components that do not touch the image border: clumps of touching
    beads (solidity below ~0.92) and beads cut by a tile edge would bias it. Falls back to
    all compact components, then all components of at least 4 pixels.

    Parameters
    ----------
    masks : array_like ``(H, W)``, ``(N, H, W)`` or an iterable of ``(H, W)`` masks
        Binary masks (see :func:`as_binary`). A generator is consumed once, so a folder can be
        streamed without holding every mask in memory.

    Returns
    -------
    float
        Median area in pixels; 0.0 when no mask has any foreground component (callers then
        treat the area as unknown).
    """
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    areas, interior, compact = [], [], []
    for m in masks:
        a, i, c = _bead_area_candidates(np.asarray(m))
        areas.append(a)
        interior.append(i)
        compact.append(c)
    if not areas:
        return 0.0
    a = np.concatenate(areas)
    if a.size == 0:
        return 0.0
    i = np.concatenate(interior)
    c = np.concatenate(compact)
    for sel in (i & c, c):
        if np.count_nonzero(sel) >= 3:
            return float(np.median(a[sel]))
    return float(np.median(a))


# --------------------------------------------------------------------------- instance split


def _find_seeds(elev: np.ndarray, min_distance: int) -> np.ndarray:
    """Local maxima of ``elev`` (> 0) at least ``min_distance`` apart (Chebyshev), highest
    first: int ``(k, 2)`` row/col. Equivalent to ``skimage.feature.peak_local_max`` with
    ``min_distance`` (plateaus give one seed), without its per-call overhead."""
    size = 2 * min_distance + 1
    local_max = cv2.dilate(elev, np.ones((size, size), np.uint8),
                           borderType=cv2.BORDER_CONSTANT, borderValue=0)
    ys, xs = np.nonzero((elev >= local_max) & (elev > 0))
    if len(ys) <= 1:
        return np.stack([ys, xs], axis=1)
    order = np.argsort(-elev[ys, xs], kind="stable")
    pts = np.stack([ys[order], xs[order]], axis=1)
    # Only equal maxima (plateaus) can be closer than min_distance after the max filter;
    # greedy suppression over the close pairs, highest first (linear in the candidates, so a
    # huge all-foreground blob with a long ridge stays cheap).
    pairs = cKDTree(pts).query_pairs(r=min_distance - 0.5, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return pts
    a = np.concatenate([pairs[:, 0], pairs[:, 1]])
    b = np.concatenate([pairs[:, 1], pairs[:, 0]])
    srt = np.argsort(a, kind="stable")
    a, b = a[srt], b[srt]
    starts = np.searchsorted(a, np.arange(len(pts) + 1))
    suppressed = np.zeros(len(pts), dtype=bool)
    keep: list[int] = []
    for i in range(len(pts)):
        if not suppressed[i]:
            keep.append(i)
            suppressed[b[starts[i]:starts[i + 1]]] = True
    return pts[keep]


def _split_components(
    comps: Sequence[np.ndarray], radius: float, min_area: float,
    probs: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Watershed split of component crops: one int32 label crop (0 background, pieces 1..k,
    k >= 1, on the crop's pixels) per crop.

    ``comps`` are boolean crops of one component each (no padding needed), ``probs``
    matching probability crops or None. Per crop: holes filled, distance transform (times
    the probability, whose low values at a contact line deepen the valley between touching
    beads), seeds at distance maxima ``_SEED_SPACING_RADII`` radii apart, watershed, pieces
    below ``min_area`` merged into a neighbour; a crop with one seed stays whole.

    The crops are packed on one canvas, each surrounded by ``min_distance + 1`` pixels of
    background, so that hole filling, the distance transform, the seed maximum filter and
    the watershed, each run once over the canvas, see what they would see on each crop
    alone (no filter window reaches a neighbouring crop, and the 8-connected flood cannot
    cross the gap). Seed ids are numbered crop by crop, in each crop's own highest-first
    order, so a crop's pieces are numbered as if it were split alone. A dense frame has
    thousands of clumps: one pass instead of one Python-level call per clump took the
    split of a dense 3840x2160 frame (1525 clumps at model scale) from 0.58 s to 0.29 s.
    """
    from skimage.segmentation import watershed

    if not comps:
        return []
    min_distance = max(1, int(round(_SEED_SPACING_RADII * radius)))
    gap = min_distance + 1
    width = max(1024, max(c.shape[1] for c in comps) + 2 * gap)
    # Shelf packing, tallest crops first (a shelf is as tall as its tallest crop: in input
    # order one large clump per shelf made the canvas of a dense frame larger than the
    # frame). Where a crop lands does not change its pieces (see above).
    places = [(0, 0)] * len(comps)
    x, y, shelf_h = gap, gap, 0
    for i in sorted(range(len(comps)), key=lambda k: -comps[k].shape[0]):
        h, w = comps[i].shape
        if x + w + gap > width:
            x, y, shelf_h = gap, y + shelf_h + gap, 0
        places[i] = (y, x)
        x += w + gap
        shelf_h = max(shelf_h, h)
    canvas = np.zeros((y + shelf_h + gap, width), dtype=np.uint8)
    owner = np.full(canvas.shape, -1, dtype=np.int32)  # crop index of each bbox pixel
    pcanvas = None if probs is None else np.zeros(canvas.shape, dtype=np.float32)
    for i, (c, (y0, x0)) in enumerate(zip(comps, places)):
        h, w = c.shape
        canvas[y0:y0 + h, x0:x0 + w] = c
        owner[y0:y0 + h, x0:x0 + w] = i
        if pcanvas is not None:
            pcanvas[y0:y0 + h, x0:x0 + w] = probs[i]
    comp_all = canvas > 0
    # Holes filled: ring-shaped beads give one distance peak at the ring centre, not a
    # ridge. Background is 4-connected where the foreground is 8-connected.
    _, bg = cv2.connectedComponents(1 - canvas, connectivity=4)
    filled = comp_all | ((bg > 0) & (bg != bg[0, 0]))
    elev = cv2.distanceTransform(filled.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if pcanvas is not None:
        elev = elev * np.clip(pcanvas, 0.0, 1.0)
    seeds = _find_seeds(elev, min_distance)  # highest first; plateau pairs never span crops
    seed_owner = owner[seeds[:, 0], seeds[:, 1]] if len(seeds) else np.zeros(0, np.int32)
    seeds = seeds[np.argsort(seed_owner, kind="stable")]  # crop by crop, order kept inside
    seed_owner = np.sort(seed_owner, kind="stable")
    n_seeds = np.bincount(seed_owner, minlength=len(comps))
    markers = np.zeros(canvas.shape, dtype=np.int32)
    if len(seeds):
        markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1, dtype=np.int32)
    ws = watershed(-elev, markers, mask=filled, connectivity=2)
    ws[~comp_all] = 0
    areas = np.bincount(ws.ravel(), minlength=len(seeds) + 1)
    present = areas > 0
    present[0] = False
    small = present & (areas < min_area)
    # Consecutive ids per crop (what _merge_small_regions returns when nothing merges): an
    # id's rank among the present ids, minus the present ids of the crops before its own.
    rank = np.cumsum(present)
    first_rank = rank[np.searchsorted(seed_owner, np.arange(len(comps)))]  # rank[0] == 0
    crop_of_id = np.concatenate([[0], seed_owner]).astype(np.int64)  # id 0 is not present
    lut = np.where(present, rank - first_rank[crop_of_id], 0).astype(np.int32)
    crops_with_small = set(seed_owner[small[1:]].tolist())
    out = []
    for i, (c, (y0, x0)) in enumerate(zip(comps, places)):
        h, w = c.shape
        sub = ws[y0:y0 + h, x0:x0 + w]
        if n_seeds[i] <= 1:
            out.append(c.astype(np.int32))
        elif i in crops_with_small:
            out.append(_merge_small_regions(sub.copy(), min_area))
        else:
            out.append(lut[sub])
    return out


#: Fewest clumps per group before :func:`_split_in_groups` uses another thread (thread
#: start-up and a second canvas cost more than a few hundred small clumps take).
MIN_CLUMPS_PER_THREAD = 256


def _split_in_groups(comps, radius, min_area, probs, threads: int) -> list[np.ndarray]:
    """:func:`_split_components` of ``comps`` in up to ``threads`` contiguous groups of about
    equal pixel count, each on its own canvas and thread, results in input order.

    A crop's pieces depend only on the crop (each canvas keeps every crop apart), except
    where two of its seeds are exactly equally high, where the watershed's heap breaks the
    tie by its layout. On masks of the demo's 160x frame (~39k beads) two threads took
    ``label_beads`` from 1.53-1.56 to 0.85-1.02 s of wall time, labels identical; sparser
    frames have too few clumps to gain.
    """
    k = max(1, min(int(threads), len(comps) // MIN_CLUMPS_PER_THREAD))
    if k == 1:
        return _split_components(comps, radius, min_area, probs)
    from concurrent.futures import ThreadPoolExecutor

    size = np.cumsum([c.size for c in comps])
    cuts = [0, *np.searchsorted(size, size[-1] * np.arange(1, k) / k).tolist(), len(comps)]
    groups = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    with ThreadPoolExecutor(len(groups), thread_name_prefix="mb-split") as pool:
        jobs = [pool.submit(_split_components, comps[a:b], radius, min_area,
                            None if probs is None else probs[a:b]) for a, b in groups]
        return [sub for job in jobs for sub in job.result()]


def _merge_small_regions(ws: np.ndarray, min_area: float) -> np.ndarray:
    """Merge watershed regions below ``min_area`` into the neighbour sharing most border;
    consecutive ids 1..k. A small region with no labelled neighbour is kept."""
    kernel = np.ones((3, 3), np.uint8)
    isolated: set[int] = set()
    while True:
        areas = np.bincount(ws.ravel())
        areas[0] = 0
        ids = np.flatnonzero(areas)
        small = [r for r in ids[np.argsort(areas[ids], kind="stable")]
                 if areas[r] < min_area and r not in isolated]
        if len(ids) <= 1 or not small:
            break
        r = int(small[0])
        region = (ws == r).astype(np.uint8)
        ring = (cv2.dilate(region, kernel) > 0) & (region == 0)
        neigh = ws[ring]
        neigh = neigh[neigh > 0]
        if neigh.size == 0:
            isolated.add(r)
            continue
        ws[region > 0] = np.bincount(neigh).argmax()
    ids = np.unique(ws[ws > 0])
    lut = np.zeros(int(ws.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[ws]


class BeadComponents(NamedTuple):
    """The 8-connected components :func:`label_beads_and_components` split, one entry each
    (cv2 order): what the finisher needs to know the components of a filtered mask without
    another pass over the frame (:func:`kept_component_areas`)."""

    areas: np.ndarray  #: int64 pixel area of each component of the mask
    boxes: np.ndarray  #: int ``(n, 4)`` bounding box ``x, y, w, h``
    first_id: np.ndarray  #: int64 first bead id it became (ids ``first .. first + n - 1``)
    n_ids: np.ndarray  #: int64 beads it became: 0 for noise dropped whole, 1 unsplit


def _no_components() -> BeadComponents:
    z = np.zeros(0, np.int64)
    return BeadComponents(z, np.zeros((0, 4), np.int64), z, z)


def label_beads(
    mask,
    *,
    median_area: float | None = None,
    prob=None,
    min_area_fraction: float = 0.25,
    split_threshold: float = 1.5,
    threads: int = 1,
) -> np.ndarray:
    """Instance labels of beads in a binary mask, splitting touching beads.

    8-connected components; components larger than ``split_threshold * median_area`` are
    split by a distance-transform watershed on their bounding-box crop, seeded by distance
    maxima at least ``0.7`` bead radius apart (``radius = sqrt(median_area / pi)``; two
    touching equal beads have centres 2 radii apart). Watershed pieces smaller than
    ``min_area_fraction * median_area`` are merged into their neighbour; whole components
    that small are dropped as noise. A bead no larger than ``split_threshold`` bead areas is
    never split.

    Parameters
    ----------
    mask : array_like ``(H, W)``
        Binary mask (bool / int non-zero, or float ``> 0.5``).
    median_area : float or None
        Area of one bead in pixels (e.g. :func:`estimate_bead_area` over the training masks).
        None, 0 or non-finite: estimated from ``mask`` itself.
    prob : array_like ``(H, W)`` float in [0, 1] or None
        Optional probability map; multiplied into the distance transform so that the
        lower-probability contact line between touching beads separates them.
    min_area_fraction : float
        Fragments below this fraction of ``median_area`` are dropped (components) or merged
        (watershed pieces).
    split_threshold : float
        Only components larger than this many bead areas are split.
    threads : int
        Split the clumps in up to this many groups at once (the watershed releases the
        GIL): each clump's pieces do not depend on its group, so the labels are the same
        (see :func:`_split_in_groups`).

    Returns
    -------
    int32 ndarray ``(H, W)``
        0 background, beads 1..N consecutive (components in raster order of their first
        pixel; the pieces of a split component take consecutive ids). An empty mask gives
        all zeros.

    Notes
    -----
    Cost is one connected-component pass over the frame plus a watershed per large
    component on its crop, so a 3840x2160 frame with thousands of beads takes about a second.
    """
    return label_beads_and_components(
        mask, median_area=median_area, prob=prob, min_area_fraction=min_area_fraction,
        split_threshold=split_threshold, threads=threads)[0]


def label_beads_and_components(
    mask,
    *,
    median_area: float | None = None,
    prob=None,
    min_area_fraction: float = 0.25,
    split_threshold: float = 1.5,
    threads: int = 1,
) -> tuple[np.ndarray, BeadComponents]:
    """:func:`label_beads` (same arguments, same labels) and the mask's components it split
    (:class:`BeadComponents`), from its one connected-component pass."""
    m = as_binary(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    out = np.zeros(m.shape, dtype=np.int32)
    if not m.any():
        return out, _no_components()
    n, lab, stats, areas, _ = _component_stats(m)
    bbox = stats[1:, :4].astype(np.int64)
    if median_area is None or not math.isfinite(median_area) or median_area <= 0:
        median_area = estimate_bead_area(m)
    if median_area <= 0:
        # No usable estimate: plain components (cv2 ids are already 1..n).
        ones = np.ones(n, np.int64)
        return lab, BeadComponents(areas, bbox, np.arange(1, n + 1, dtype=np.int64), ones)
    p = None
    if prob is not None:
        p = np.asarray(prob, dtype=np.float32)
        if p.shape != m.shape:
            raise ValueError(f"prob shape {p.shape} != mask shape {m.shape}")
    min_area = min_area_fraction * median_area
    radius = math.sqrt(median_area / math.pi)
    keep = areas >= min_area
    big = keep & (areas > split_threshold * median_area)

    n_ids = keep.astype(np.int64)  # beads contributed by each component
    big_ids = np.flatnonzero(big)
    boxes, crops, pcrops = [], [], []
    for k in big_ids:
        c = k + 1
        x, y = stats[c, cv2.CC_STAT_LEFT], stats[c, cv2.CC_STAT_TOP]
        w, h = stats[c, cv2.CC_STAT_WIDTH], stats[c, cv2.CC_STAT_HEIGHT]
        sy, sx = slice(y, y + h), slice(x, x + w)
        boxes.append((sy, sx))
        crops.append(lab[sy, sx] == c)
        if p is not None:
            pcrops.append(p[sy, sx])
    subs = _split_in_groups(crops, radius, min_area, pcrops if p is not None else None,
                            threads)
    pieces: dict[int, tuple[slice, slice, np.ndarray]] = {}
    for k, (sy, sx), sub in zip(big_ids, boxes, subs):
        pieces[int(k)] = (sy, sx, sub)
        n_ids[k] = int(sub.max())

    first = np.concatenate([[0], np.cumsum(n_ids)])[:-1] + 1  # first new id of each component
    lut = np.zeros(n + 1, dtype=np.int32)
    normal = keep & ~big
    lut[1:][normal] = first[normal]
    out = lut[lab]
    for k, (sy, sx, sub) in pieces.items():
        view = out[sy, sx]
        sel = sub > 0
        view[sel] = sub[sel] + (first[k] - 1)
    return out, BeadComponents(areas, bbox, first.astype(np.int64), n_ids)


def kept_component_areas(comps: BeadComponents, labels: np.ndarray,
                         keep: np.ndarray) -> np.ndarray:
    """Pixel areas (int64) of the 8-connected components of the mask of the kept beads.

    ``labels`` and ``comps`` are :func:`label_beads_and_components`' output, ``keep`` one
    bool per bead id ``1..N``. The result is :func:`component_areas` of
    ``isin(labels, kept ids)`` as a multiset (components in another order): a component
    whose beads are all kept keeps its area, one with none kept (or dropped as noise) is
    gone, and only a component with some beads kept is labelled again, on its own box.
    Different components never touch, so what is kept of one cannot join another. This
    spares the finisher a connected-component pass over the filtered frame.
    """
    keep = np.asarray(keep, bool)
    if comps.areas.size == 0:
        return np.zeros(0, np.int64)
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    start = comps.first_id - 1  # ids first .. first + n_ids - 1 (none when n_ids is 0)
    n_kept = kept_before[start + comps.n_ids] - kept_before[start]
    parts = [comps.areas[(comps.n_ids > 0) & (n_kept == comps.n_ids)]]
    lut = np.concatenate([[False], keep])
    for k in np.flatnonzero((n_kept > 0) & (n_kept < comps.n_ids)):
        x, y, w, h = comps.boxes[k]
        crop = labels[y:y + h, x:x + w]
        first, last = comps.first_id[k], comps.first_id[k] + comps.n_ids[k]
        sub = (crop >= first) & (crop < last) & lut[crop]
        parts.append(component_areas(sub))
    return np.concatenate(parts).astype(np.int64)


def count_beads(mask, median_area: float | None = None) -> dict:
    """Bead count of a binary mask through :func:`label_beads`.

    Returns
    -------
    dict
        ``n_components`` (int, raw 8-connected components, noise included), ``n_beads``
        (int, after dropping fragments and splitting touching beads) and ``area_estimate``
        (float, the single-bead area used; estimated from ``mask`` when not given, 0.0 for an
        empty mask).
    """
    m = as_binary(mask)
    n, _, _, _, _ = _component_stats(m)
    if median_area is None or not math.isfinite(median_area) or median_area <= 0:
        median_area = estimate_bead_area(m)
    labels = label_beads(m, median_area=median_area)
    return {
        "n_components": int(n),
        "n_beads": int(labels.max()),
        "area_estimate": float(median_area),
    }


# --------------------------------------------------------------------------- object matching


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to 0..N (order of original ids); returns (dense labels, original ids (N,))."""
    lab = np.asarray(labels)
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"label image must be an integer array, got dtype {lab.dtype}")
    if lab.size == 0:
        return np.zeros(lab.shape, np.int64), np.zeros(0, np.int64)
    if lab.dtype == np.uint64:
        lab = lab.astype(np.int64)  # bincount refuses uint64
    if lab.min() < 0:
        raise ValueError("label image has negative ids")
    mx = int(lab.max())
    if mx <= 4 * lab.size + 65536:
        present = np.bincount(lab.ravel(), minlength=mx + 1)
        ids = np.flatnonzero(present[1:]) + 1
        if len(ids) == mx:  # already 1..N (label_beads output): no remapping pass
            return lab, ids
        lut = np.zeros(mx + 1, dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return lut[lab], ids
    ids, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(lab.shape)
    if ids[0] == 0:
        return inv, ids[1:]
    return inv + 1, ids


def instance_iou(true_labels, pred_labels):
    """Sparse IoU between true and predicted instances (pairs that overlap only).

    Overlaps come from one ``bincount`` over paired pixel ids, never a loop over object
    pairs, so a frame with thousands of beads costs a few passes over its pixels.

    Parameters
    ----------
    true_labels, pred_labels : integer ndarray ``(H, W)``
        Label images (0 background; ids need not be consecutive).

    Returns
    -------
    true_idx, pred_idx : int64 ndarray ``(K,)``
        Indices into ``true_ids`` / ``pred_ids`` of each overlapping pair.
    iou : float64 ndarray ``(K,)``
        IoU of each pair, in (0, 1].
    true_ids, pred_ids : int64 ndarray ``(Nt,)``, ``(Np,)``
        Original ids of the instances present.
    """
    t, true_ids = _dense_ids(true_labels)
    p, pred_ids = _dense_ids(pred_labels)
    if t.shape != p.shape:
        raise ValueError(f"truth labels shape {t.shape} != prediction labels shape {p.shape}")
    nt, npr = len(true_ids), len(pred_ids)
    t = t.ravel()
    p = p.ravel()
    area_t = np.bincount(t, minlength=nt + 1)[1:]
    area_p = np.bincount(p, minlength=npr + 1)[1:]
    both = (t > 0) & (p > 0)
    key = (t[both].astype(np.int64) - 1) * npr + (p[both].astype(np.int64) - 1)
    if nt * npr <= 30_000_000:
        counts = np.bincount(key, minlength=nt * npr)
        key = np.flatnonzero(counts)
        inter = counts[key]
    else:
        key, inter = np.unique(key, return_counts=True)
    ti, pi = np.divmod(key, max(npr, 1))
    union = area_t[ti] + area_p[pi] - inter
    iou = inter / union
    return ti.astype(np.int64), pi.astype(np.int64), iou.astype(np.float64), true_ids, pred_ids


def _assign(ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """One-to-one matching among pairs with ``iou >= threshold``: bool ``(K,)`` of chosen pairs.

    Maximises the number of matches, then the summed IoU (Hungarian assignment). The
    candidate graph is split into connected components and only the ambiguous ones (more than
    one edge) are solved, which keeps thousands of beads cheap. For thresholds above 0.5 every
    component is a single pair (IoU > 0.5 admits at most one partner).
    """
    chosen = np.zeros(len(iou), dtype=bool)
    cand = np.flatnonzero(iou >= threshold)
    if cand.size == 0:
        return chosen
    ct, cp = ti[cand], pi[cand]
    # Bipartite graph: true nodes 0..nt-1, predicted nodes nt..nt+np-1 (only those present).
    ut, t_node = np.unique(ct, return_inverse=True)
    up, p_node = np.unique(cp, return_inverse=True)
    nt = len(ut)
    n_nodes = nt + len(up)
    graph = coo_matrix(
        (np.ones(len(cand)), (t_node, p_node + nt)), shape=(n_nodes, n_nodes)
    )
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[t_node]
    edges_per_comp = np.bincount(edge_comp)
    single = edges_per_comp[edge_comp] == 1
    chosen[cand[single]] = True
    for c in np.flatnonzero(edges_per_comp > 1):
        e = np.flatnonzero(edge_comp == c)
        rows, r_inv = np.unique(t_node[e], return_inverse=True)
        cols, c_inv = np.unique(p_node[e], return_inverse=True)
        # Each match is worth 1 plus less than 1/(n+1) of IoU in total: more matches first,
        # then higher IoU.
        scale = 1.0 / (min(len(rows), len(cols)) + 1)
        w = np.zeros((len(rows), len(cols)))
        w[r_inv, c_inv] = 1.0 + scale * iou[cand[e]]
        r, cc = linear_sum_assignment(w, maximize=True)
        lut = {(a, b): k for k, a, b in zip(cand[e], r_inv, c_inv)}
        for a, b in zip(r, cc):
            if w[a, b] > 0:
                chosen[lut[(a, b)]] = True
    return chosen


def object_scores(tp: int, fp: int, fn: int, sum_iou: float) -> dict[str, float]:
    """Precision, recall, F1, mean matched IoU and panoptic quality from match counts.

    Used per image and pooled over a folder. No true and no predicted objects -> precision
    = recall = F1 = PQ = 1; mean matched IoU is NaN when ``tp == 0``.
    """
    n_pred, n_true = tp + fp, tp + fn
    denom = tp + 0.5 * fp + 0.5 * fn
    return {
        "precision": tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0),
        "recall": tp / n_true if n_true else (1.0 if n_pred == 0 else 0.0),
        "f1": tp / denom if denom else 1.0,
        "mean_matched_iou": sum_iou / tp if tp else float("nan"),
        "panoptic_quality": sum_iou / denom if denom else 1.0,
    }


def count_error(n_true: int, n_pred: int) -> dict[str, float]:
    """Count error: ``signed = pred - true``, ``absolute``, ``relative = |err| / max(true, 1)``."""
    err = int(n_pred) - int(n_true)
    return {
        "count_error": float(err),
        "abs_count_error": float(abs(err)),
        "rel_count_error": abs(err) / max(int(n_true), 1),
    }


def match_instances(true_labels, pred_labels, *, iou_threshold: float = 0.5) -> dict:
    """One-to-one matching of predicted to true instances at an IoU threshold.

    Hungarian assignment over overlapping pairs (see :func:`instance_iou`); a pair counts as
    a match when its IoU is ``>= iou_threshold``.

    Parameters
    ----------
    true_labels, pred_labels : integer ndarray ``(H, W)``
        Label images of the same shape.
    iou_threshold : float in (0, 1]

    Returns
    -------
    dict
        ``n_true``, ``n_pred``, ``tp``, ``fp``, ``fn`` (int); ``precision``, ``recall``,
        ``f1``, ``mean_matched_iou``, ``panoptic_quality`` (see :func:`object_scores`);
        ``sum_matched_iou``; ``matched_true``, ``matched_pred`` (original ids, int64
        ``(tp,)``) and ``matched_iou`` (float64 ``(tp,)``); count errors
        (:func:`count_error`).
    """
    return object_metrics(true_labels, pred_labels, (iou_threshold,), keep_pairs=True)[
        float(iou_threshold)
    ]


def object_metrics(
    true_labels,
    pred_labels,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    *,
    keep_pairs: bool = False,
) -> dict[float, dict]:
    """:func:`match_instances` at several IoU thresholds, sharing one overlap computation.

    Returns
    -------
    dict mapping each threshold (float) to the dict :func:`match_instances` returns
    (without the ``matched_*`` arrays unless ``keep_pairs``).
    """
    ti, pi, iou, true_ids, pred_ids = instance_iou(true_labels, pred_labels)
    nt, npr = len(true_ids), len(pred_ids)
    out: dict[float, dict] = {}
    for thr in thresholds:
        chosen = _assign(ti, pi, iou, float(thr))
        tp = int(np.count_nonzero(chosen))
        sum_iou = float(iou[chosen].sum())
        res: dict = {"n_true": nt, "n_pred": npr, "tp": tp, "fp": npr - tp, "fn": nt - tp}
        res.update(object_scores(tp, npr - tp, nt - tp, sum_iou))
        res["sum_matched_iou"] = sum_iou
        res.update(count_error(nt, npr))
        if keep_pairs:
            res["matched_true"] = true_ids[ti[chosen]]
            res["matched_pred"] = pred_ids[pi[chosen]]
            res["matched_iou"] = iou[chosen]
        out[float(thr)] = res
    return out


def r2_identity(y_true: Iterable[float], y_pred: Iterable[float]) -> float:
    """Coefficient of determination of ``y_pred`` as an estimate of ``y_true`` (about y = x).

    ``1 - sum((pred - true)^2) / sum((true - mean(true))^2)``; not the R^2 of a fitted line,
    so a biased counter scores low even when perfectly correlated. NaN for fewer than 2
    values or constant truth.
    """
    t = np.asarray(list(y_true), dtype=np.float64)
    p = np.asarray(list(y_pred), dtype=np.float64)
    if t.size < 2:
        return float("nan")
    ss_tot = float(((t - t.mean()) ** 2).sum())
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(((p - t) ** 2).sum()) / ss_tot


# --------------------------------------------------------------------------- density bins
#
# One meaning of "density bin edges" everywhere (the trainer's and the evaluation's
# ``--density_bins``, the analysis' recommended ``density_bins``): increasing object-count
# edges ``e_1 < ... < e_k`` cut counts into ``k + 1`` bins, upper edge inclusive:
# ``c <= e_1``, ``e_1 < c <= e_2``, ..., ``c > e_k`` (``np.digitize(..., right=True)``).

DENSITY_MAX_BINS = 5
DENSITY_MIN_PER_BIN = 2


def density_bin_ids(counts, edges) -> np.ndarray:
    """Bin of each count: 0 for ``c <= e_1``, ``i`` for ``e_i < c <= e_(i+1)``, ``k`` above.

    Parameters
    ----------
    counts : array_like, shape (N,)
        Objects per image.
    edges : sequence of float
        Bin edges (sorted here).

    Returns
    -------
    int64 ``(N,)`` in ``0..len(edges)``; empty for no counts.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    e = np.sort(np.asarray(list(edges), dtype=np.float64))
    return np.digitize(c, e, right=True).astype(np.int64)


def density_bin_names(edges) -> list[str]:
    """Names of the ``len(edges) + 1`` bins as integer count ranges.

    ``(0, 10, 50, 150)`` -> ``["0", "1-10", "11-50", "51-150", ">150"]``; fractional edges
    name the counts they hold (``(2.5, 7.5)`` -> ``["0-2", "3-7", ">7"]``). A bin that
    holds no integer count is named by its interval, e.g. ``"(2.2, 2.7]"``.
    """
    e = sorted(float(x) for x in edges)
    names, low, prev = [], 0, None
    for x in e:
        high = math.floor(x)
        if high < low:
            names.append(f"(-inf, {x:g}]" if prev is None else f"({prev:g}, {x:g}]")
        else:
            names.append(str(low) if low == high else f"{low}-{high}")
        low, prev = max(low, high + 1), x
    names.append(f">{math.floor(e[-1])}" if e else "all")
    return names


def density_bin_name(count: float, edges) -> str:
    """Name (see :func:`density_bin_names`) of the bin that holds ``count``."""
    return density_bin_names(edges)[int(density_bin_ids([count], edges)[0])]


def _merge_sparse_bins(c: np.ndarray, edges: list[float], min_per_bin: int) -> list[float]:
    """Drop edges until every bin of ``edges`` (all of ``c`` inside the outer two) holds
    ``>= min_per_bin`` counts or one bin is left; a sparse bin joins its smaller neighbour
    (the lower one on a tie)."""
    edges = list(edges)
    while len(edges) > 2:
        per_bin = np.bincount(density_bin_ids(c, edges[1:-1]), minlength=len(edges) - 1)
        if per_bin.min() >= min_per_bin:
            break
        i = int(np.argmin(per_bin))
        if i == 0:
            del edges[1]
        elif i == len(per_bin) - 1:
            del edges[-2]
        elif per_bin[i - 1] <= per_bin[i + 1]:
            del edges[i]
        else:
            del edges[i + 1]
    return edges


def density_edges(counts, *, min_per_bin: int = DENSITY_MIN_PER_BIN,
                  max_bins: int = DENSITY_MAX_BINS) -> list[float]:
    """Stratification edges over objects per image, every stratum holding >= ``min_per_bin``.

    Quantile bins (at most ``max_bins``, at most ``n // min_per_bin``); while a bin holds
    fewer than ``min_per_bin`` images it is merged with its smaller neighbour. Edges are
    half-integers (``k + 0.5``) so that no integer count sits on an edge: ``np.digitize``,
    ``np.histogram`` and ``pandas.cut`` (either closed side) then agree on the strata.

    Parameters
    ----------
    counts : array_like of int
        Objects per image.

    Returns
    -------
    list of float
        Increasing edges ``[min - 0.5, ..., max + 0.5]`` (at least two); stratum ``i`` holds
        counts in ``(edges[i], edges[i + 1])``, so ``np.histogram(counts, edges)`` gives the
        stratum sizes. Under the edge meaning above the bins below the first and above the
        last edge are empty. Empty list for no counts. With fewer than ``2 * min_per_bin``
        images there is one stratum.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 0:
        return []
    lo, hi = float(c.min()) - 0.5, float(c.max()) + 0.5
    k = max(1, min(int(max_bins), c.size // max(1, int(min_per_bin))))
    inner: list[float] = []
    if k > 1:
        q = np.quantile(c, np.linspace(0.0, 1.0, k + 1)[1:-1])
        inner = [float(e) for e in np.unique(np.floor(q) + 0.5) if lo < e < hi]
    return _merge_sparse_bins(c, [lo, *inner, hi], min_per_bin)


def density_strata(counts, edges=None, *, min_per_stratum: int = DENSITY_MIN_PER_BIN,
                   max_bins: int = DENSITY_MAX_BINS) -> np.ndarray:
    """Density stratum of each image (for stratified train/validation splits).

    Parameters
    ----------
    counts : array_like of int, shape (N,)
        Objects per image.
    edges : sequence of float or None
        Bin edges in the meaning above (e.g. ``recommended_config.json``'s
        ``density_bins`` or the trainer's ``--density_bins``); None -> :func:`density_edges`.
    min_per_stratum : int
        Sparse bins are merged into their smaller neighbour until every stratum holds at
        least this many images (a dataset smaller than that gets one stratum).

    Returns
    -------
    int64 ``(N,)`` of consecutive stratum ids ``0..S-1``, ordered by density.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 0:
        return np.zeros(0, np.int64)
    if edges is None:
        edges = density_edges(c, min_per_bin=min_per_stratum, max_bins=max_bins)
    merged = _merge_sparse_bins(c, [-math.inf, *sorted(float(e) for e in edges), math.inf],
                                min_per_stratum)
    _, ids = np.unique(density_bin_ids(c, merged[1:-1]), return_inverse=True)
    return ids.astype(np.int64)

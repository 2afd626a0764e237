"""Which predicted objects count as beads: per-object evidence, calibration, filtering.

A network trained on the users' labels also marks faint out-of-focus smudges and noise in
the dark, vignetted parts of a frame: small, low-contrast objects that the labels never
mark. On a blank or a sparse frame they decide the limit of detection. This module measures
per predicted object how much it looks like the beads the network found *and* the labels
confirm, and drops the objects that look like none of them.

* :func:`object_features`: area, mean / max probability, and the contrast of the object
  against a ring of background around it in the normalised input the network saw, absolute
  and in units of that ring's own noise (a local signal-to-noise ratio: dividing by a dark
  background amplifies noise, so the same absolute darkness is weaker evidence there),
  and, given the frame in colour, the shift of its chromaticity against that ring: the
  users' beads are dyed blue-purple, while debris, smudges and noise are grey;
* :func:`match_centres`: one-to-one matching of object centres within a distance;
* :func:`calibrate`: from the validation tiles' predicted objects that match a labelled
  bead, lower limits at half the value 99 % of them exceed (recall cost bounded by
  construction; no unmatched object is used, since the labels miss faint beads);
* :func:`apply_filter`: the labels with rejected objects removed, renumbered 1..n.

The rule is stored per model in ``config.json`` (``postprocessing.per_model``) by the
trainer and applied by ``prediction.finish_frame``. Pure NumPy / SciPy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: Features a rule may bound from below (``min_<feature>``). ``colour`` is the object's
#: chromaticity shift against its ring, projected on the confirmed beads' own direction
#: (:func:`colour_values`); it needs the frame in colour.
FEATURES = ("area_px", "mean_prob", "contrast", "snr", "colour")
#: Features a calibrated rule bounds by default. Mean probability is left out: on the users'
#: tiles (leave-one-frame-out) objects the labels miss had the same probabilities as
#: confirmed beads, and bounding it cost recall on every frame.
CALIBRATED = ("area_px", "contrast", "snr", "colour")
#: The bound is ``MARGIN`` x the ``DEFAULT_QUANTILE`` quantile of the confirmed beads: frames
#: differ (on the users' 320x frame beads were half the area and ~15 % lower in contrast than
#: on the validation tiles), so a bound at the quantile itself rejected a fifth of that
#: frame's real beads; faint smudges and corner noise sit far below half of it.
DEFAULT_QUANTILE = 0.01
MARGIN = 0.5
#: Fewer matched validation objects than this: no rule (too little to calibrate on).
MIN_MATCHED = 30
#: Matching radius, in bead radii (6 px for the users' ~8-px beads at native scale).
MATCH_RADII = 1.5
#: Ring around an object: from ``RING_GAP`` to ``RING_GAP + RING_WIDTH`` px (model scale).
RING_GAP, RING_WIDTH = 2, 3


def object_features(labels: np.ndarray, prob: np.ndarray, image: np.ndarray | None,
                    colour: np.ndarray | None = None) -> dict:
    """Per-object evidence for labels ``1..n``.

    Parameters
    ----------
    labels : int ``(H, W)``; 0 background, objects ``1..n`` (ids without pixels get area 0)
    prob : float ``(H, W)`` probabilities in [0, 1]
    image : float ``(H, W)`` normalised network input (beads dark, background ~ bright), or
        None (then ``contrast`` and ``snr`` are NaN)
    colour : float ``(H, W, 3)`` the frame in RGB at the same scale (any positive value
        range: only chromaticity is used), or None (then ``chroma_shift`` is NaN)

    Returns
    -------
    dict of float arrays of length ``n``: ``area_px``, ``mean_prob``, ``max_prob``,
    ``contrast`` (ring mean minus object mean: positive for dark objects), ``snr``
    (contrast / ring standard deviation), ``cy``, ``cx`` (centroids), and
    ``chroma_shift`` ``(n, 3)``: mean chromaticity ``rgb / (r + g + b)`` inside minus in the
    ring (dyed beads shift towards their dye's colour; grey debris, smudges and noise do
    not).
    """
    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    # Every sum runs over the object pixels only, in raster order: the same additions in the
    # same order as over the whole frame (whose other pixels only fed bin 0), a few % of
    # the pixels on a sparse frame and no frame-sized float64 / index arrays.
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    ids = flat[fg]
    area = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    safe = np.maximum(area, 1.0)
    p = np.asarray(prob).ravel()[fg].astype(np.float64)  # object pixels only
    out = {
        "area_px": area,
        "mean_prob": np.bincount(ids, weights=p, minlength=n + 1)[1:] / safe,
        "max_prob": _object_max(ids, p, n),
    }
    rows, cols = np.divmod(fg, labels.shape[1])
    out["cy"] = np.bincount(ids, weights=rows, minlength=n + 1)[1:] / safe
    out["cx"] = np.bincount(ids, weights=cols, minlength=n + 1)[1:] / safe
    out["chroma_shift"] = np.full((n, 3), np.nan)
    if (image is None and colour is None) or n == 0:
        out["contrast"] = np.full(n, np.nan)
        out["snr"] = np.full(n, np.nan)
        return out
    near = _max_filter(labels > 0, 2 * RING_GAP + 1)
    owner = _max_filter(labels, 2 * (RING_GAP + RING_WIDTH) + 1).ravel()
    ring = np.flatnonzero(~near.ravel() & (owner > 0))
    rid = owner[ring]
    cnt = np.bincount(rid, minlength=n + 1)[1:].astype(np.float64)
    if colour is not None:
        out["chroma_shift"] = _chroma_shift(labels.shape, colour, fg, ids, safe, ring, rid,
                                            cnt, n)
    if image is None:
        out["contrast"] = np.full(n, np.nan)
        out["snr"] = np.full(n, np.nan)
        return out
    img = np.asarray(image)
    if img.shape != labels.shape:
        raise ValueError(f"image shape {img.shape} != labels shape {labels.shape}")
    img = img.ravel()
    inside = np.bincount(ids, weights=img[fg].astype(np.float64), minlength=n + 1)[1:] / safe
    vals = img[ring].astype(np.float64)
    s1 = np.bincount(rid, weights=vals, minlength=n + 1)[1:]
    s2 = np.bincount(rid, weights=vals ** 2, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        sd = np.sqrt(np.maximum(s2 / cnt - mean ** 2, 0.0))
        contrast = mean - inside
        # The ring's spread includes real structure (a neighbour's edge); floor it at a small
        # fraction of the normalised range so a perfectly flat ring cannot divide by ~0.
        snr = contrast / np.maximum(sd, 0.01)
    # An object whose ring is entirely other objects (a bead inside a clump) has no
    # background to compare with: it keeps its evidence (infinite), rules cannot reject it.
    contrast[cnt == 0] = np.inf
    snr[cnt == 0] = np.inf
    out["contrast"], out["snr"] = contrast, snr
    return out


def _chroma_shift(shape, colour, fg, ids, safe, ring, rid, cnt, n) -> np.ndarray:
    """``(n, 3)`` mean chromaticity inside each object (pixels ``fg``, ids ``ids``) minus in
    its ring (pixels ``ring``, owners ``rid``); NaN where an object has no ring."""
    rgb = np.asarray(colour)
    if rgb.shape != tuple(shape) + (3,):
        raise ValueError(f"colour shape {rgb.shape} != labels shape {tuple(shape)} + (3,)")
    rgb = rgb.reshape(-1, 3)

    def chroma(px):
        v = rgb[px].astype(np.float64)
        return v / np.maximum(v.sum(axis=1, keepdims=True), 1e-9)

    inner, outer = chroma(fg), chroma(ring)
    shift = np.empty((n, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in range(3):
            inside = np.bincount(ids, weights=inner[:, c], minlength=n + 1)[1:] / safe
            around = np.bincount(rid, weights=outer[:, c], minlength=n + 1)[1:] / cnt
            shift[:, c] = inside - around
    shift[cnt == 0] = np.nan
    return shift


def colour_values(features: dict, direction) -> np.ndarray:
    """Each object's chromaticity shift projected on the unit vector ``direction`` (the
    confirmed beads' median shift): how far it moves towards the beads' colour. NaN without
    colour."""
    u = np.asarray(direction, float)
    return np.asarray(features.get("chroma_shift", np.full((len(features["area_px"]), 3),
                                                             np.nan)), float) @ u


def _object_max(ids: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per object ``1..n``: the largest of its ``values`` (``ids`` > 0, one per pixel);
    0 for an id without pixels (as ``scipy.ndimage.maximum`` gives)."""
    if n == 0:
        return np.zeros(0)
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, ids, values)
    out = out[1:]
    out[np.isneginf(out)] = 0.0
    return out


def _max_filter(a: np.ndarray, size: int) -> np.ndarray:
    """``scipy.ndimage.maximum_filter(a, size)`` (its default ``reflect`` border) for a
    bool or non-negative integer image, by OpenCV's dilation: a reflected pixel lies inside
    the window anyway, so both are the maximum over the window's pixels in the image.
    Integers pass through uint16 below 2**16 ids, float32 below 2**24 (both exact); larger
    ids take SciPy's filter."""
    import cv2

    kernel = np.ones((size, size), np.uint8)
    if a.dtype == bool:
        return cv2.dilate(a.view(np.uint8), kernel).view(bool)
    top = int(a.max(initial=0))
    if top >= 2 ** 24 or a.min(initial=0) < 0:
        return ndimage.maximum_filter(a, size=size)
    via = np.uint16 if top < 2 ** 16 else np.float32  # half the bytes to move
    return cv2.dilate(a.astype(via), kernel).astype(a.dtype)


def match_centres(truth: np.ndarray, pred: np.ndarray, max_dist: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches of ``(N, 2)`` and ``(M, 2)`` centres within ``max_dist`` (minimum
    total distance within each cluster of candidate pairs). Returns boolean arrays
    ``(truth_matched, pred_matched)``."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    truth = np.asarray(truth, float).reshape(-1, 2)
    pred = np.asarray(pred, float).reshape(-1, 2)
    tm, pm = np.zeros(len(truth), bool), np.zeros(len(pred), bool)
    if len(truth) == 0 or len(pred) == 0:
        return tm, pm
    hits = cKDTree(pred).query_ball_point(truth, r=max_dist)
    ti = np.repeat(np.arange(len(truth)), [len(h) for h in hits])
    if ti.size == 0:
        return tm, pm
    pj = np.concatenate([np.asarray(h, int) for h in hits])
    nt = len(truth)
    graph = coo_matrix((np.ones(ti.size), (ti, nt + pj)), shape=(nt + len(pred),) * 2)
    _, comp = connected_components(graph, directed=False)
    dist = np.linalg.norm(truth[ti] - pred[pj], axis=1)
    order = np.argsort(comp[ti], kind="stable")
    ti, pj, dist, cid = ti[order], pj[order], dist[order], comp[ti][order]
    bounds = np.flatnonzero(np.diff(cid)) + 1
    for sl in np.split(np.arange(ti.size), bounds):
        ut, ui = np.unique(ti[sl], return_inverse=True)
        up, uj = np.unique(pj[sl], return_inverse=True)
        cost = np.full((ut.size, up.size), 1e9)
        cost[ui, uj] = dist[sl]
        r, k = linear_sum_assignment(cost)
        ok = cost[r, k] <= max_dist
        tm[ut[r[ok]]] = True
        pm[up[k[ok]]] = True
    return tm, pm


def component_centres(mask: np.ndarray) -> np.ndarray:
    """``(N, 2)`` (row, col) centroids of the 8-connected components of a binary mask."""
    import cv2

    n, _, _, cent = cv2.connectedComponentsWithStats(
        (np.asarray(mask) > 0).astype(np.uint8), connectivity=8)
    return cent[1:, ::-1].astype(float) if n > 1 else np.zeros((0, 2))


def match_radius(median_area_px: float) -> float:
    """Centre-matching radius for beads of ``median_area_px`` (:data:`MATCH_RADII` radii)."""
    r = math.sqrt(max(float(median_area_px), 1.0) / math.pi)
    return max(2.0, MATCH_RADII * r)


def calibrate(features: dict, matched: np.ndarray, *, quantile: float = DEFAULT_QUANTILE,
              margin: float = MARGIN, features_used=CALIBRATED) -> dict | None:
    """Lower bounds ``margin`` x the ``quantile`` quantile of the matched objects, per
    feature: with ``margin=1`` each bound keeps all but ``quantile`` of them.

    Parameters
    ----------
    features : :func:`object_features` of the validation objects (concatenated)
    matched : bool, which of them match a labelled bead (:func:`match_centres`)

    Returns
    -------
    dict ``{"min_<feature>": value, ..., "quantile": q, "n_matched": m}`` or None with
    fewer than :data:`MIN_MATCHED` matched objects. Infinite / NaN values (no background
    ring, no image) are left out of a bound's estimate.
    """
    matched = np.asarray(matched, bool)
    if int(matched.sum()) < MIN_MATCHED:
        return None
    rule: dict = {"quantile": float(quantile), "margin": float(margin),
                  "n_matched": int(matched.sum())}
    for key in features_used:
        if key == "colour":
            rule.update(_calibrate_colour(features, matched, quantile, margin))
            continue
        v = np.asarray(features[key], float)[matched]
        v = v[np.isfinite(v)]
        if v.size >= MIN_MATCHED:
            rule[f"min_{key}"] = float(margin * np.quantile(v, quantile))
    return rule


def _calibrate_colour(features: dict, matched: np.ndarray, quantile: float, margin: float
                      ) -> dict:
    """The colour bound, only where the confirmed beads have a colour: their median
    chromaticity shift gives the direction, and the bound is set like the others on the
    projections; none when the ``quantile`` projection is not positive (grey beads, or
    frames without colour), so colour never rejects beads that have none."""
    shift = np.asarray(features.get("chroma_shift", np.zeros((0, 3))), float)
    if shift.ndim != 2 or shift.shape[0] != matched.size:
        return {}
    s = shift[matched]
    s = s[np.isfinite(s).all(axis=1)]
    if len(s) < MIN_MATCHED:
        return {}
    med = np.median(s, axis=0)
    norm = float(np.linalg.norm(med))
    if norm == 0.0:
        return {}
    u = med / norm
    q = float(np.quantile(s @ u, quantile))
    if not q > 0:
        return {}
    return {"min_colour": float(margin * q), "colour_direction": [float(v) for v in u]}


def accepted(features: dict, rule: dict | None) -> np.ndarray:
    """Boolean per object: meets every ``min_<feature>`` bound of ``rule`` (None: all)."""
    n = len(features["area_px"])
    keep = np.ones(n, bool)
    if not rule:
        return keep
    for key in FEATURES:
        bound = rule.get(f"min_{key}")
        if bound is None:
            continue
        if key == "colour":
            v = colour_values(features, rule["colour_direction"])
        else:
            v = np.asarray(features[key], float)
        keep &= ~(v < bound)  # NaN (no image, no colour) never rejects
    return keep


def apply_filter(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``labels`` with the objects whose ``keep`` is False set to 0; ids renumbered 1..n in
    their old order."""
    keep = np.asarray(keep, bool)
    lut = np.zeros(keep.size + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[np.asarray(labels)]


def describe(rule: dict | None) -> str:
    """One line for logs and reports."""
    if not rule:
        return "no object filter (every predicted bead counts)"
    parts = [f"{k[4:]} >= {rule[k]:.3g}" for k in (f"min_{f}" for f in FEATURES) if k in rule]
    return (f"beads kept when {', '.join(parts)} (each bound is "
            f"{rule.get('margin', 1.0):g} x the value {100 * (1 - rule['quantile']):.0f} % of "
            f"the {rule['n_matched']} validation beads the labels confirm exceed)")

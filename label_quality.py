"""Label-quality checks for microbead masks, and a model of how the users' masks are degraded.

The users' masks come from a classical blob detector: they are smaller than the beads, touching
beads are one blob, faint beads are missing, some tiles are offset from their beads by 2-4 px
and one mask belongs to another tile. None of that shows in an integrity check of the files;
it shows only against the image. Every check here compares a mask with its image's *darkness
map* (bead evidence) or with the mask of a neighbouring tile over pixels both tiles share.

Checks (all per file, at native resolution)
-------------------------------------------
* **Registration** (:func:`register_mask`): the integer shift within +-``max_shift`` px that
  best lays the mask on the bead centres (:func:`centre_map`: darkness averaged over a
  bead-sized gaussian, which peaks at the centre of solid and of ring beads alike); its
  *offset* ``(dy, dx)`` is where the mask sits relative to its beads, the *gain* how much
  undoing it raises the mean response under the mask.
* **Mask-image mismatch** (:func:`mismatch_threshold`, :func:`best_matching_images`): a mask
  whose bead evidence, even at its best shift, is far below the dataset's, and the image it
  matches best.
* **Overlap consistency** (:func:`find_grid_overlaps`, :func:`overlap_agreement`,
  :func:`consistency_ceiling`): neighbouring grid tiles (``..._grid_r<R>_c<C>``) that share a
  border strip of identical pixels, and the Jaccard of their two masks on that strip. Pooled
  over pairs it is the *label-consistency ceiling*: the labels agree with themselves only that
  well, so no model can score much higher against them.
* **Missed and merged beads** (:func:`shape_check`): dark blobs the mask does not touch, and
  mask objects covering several separate dark blobs.

Label noise
-----------
:func:`degrade_mask` turns exact instance labels into a mask degraded the way the users' are
(shrunk, touching beads merged, a few faint beads dropped, some tiles offset), so a model can
be trained and tested on noisy masks while the exact labels stay available.

Conventions: images ``(H, W)`` or ``(H, W, C)`` in any value range (RGB, luminance taken);
masks ``(H, W)``, foreground non-zero; shifts and offsets are ``(dy, dx)`` in pixels, +y down,
+x right. Pure NumPy / SciPy / OpenCV; no TensorFlow.

Example
-------
>>> reg = register(image, mask)                                 # doctest: +SKIP
>>> reg.offset, reg.gain, reg.is_offset()                       # doctest: +SKIP
((2, -3), 0.21, True)
>>> consistency_ceiling_from_files(image_paths, mask_paths)     # doctest: +SKIP
{'pooled_jaccard': 0.47, 'n_pairs': 41, ...}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

import microbead_io as mio
import microbead_metrics as mm

#: Registration search radius in native pixels (offsets seen in the users' data: 2-4 px).
MAX_SHIFT = 6
#: A mask is reported as offset when its offset is at least this (Chebyshev, px) ...
MIN_OFFSET_PX = 2
#: ... and undoing it raises the mean bead-centre response (:func:`centre_map`) under the
#: mask by at least this fraction. 0.05 on raw darkness before; the smoother centre map
#: halves the gains (the users' offset tiles: 0.08-0.24 -> 0.04-0.15), so 0.035 names
#: the same users' tiles as before (and no other).
MIN_OFFSET_GAIN = 0.035
#: A mask is a mismatch when its bead evidence (at its best shift) is below this fraction of
#: the dataset median (needs at least MIN_MISMATCH_IMAGES assessed masks).
MISMATCH_FRACTION = 0.3
MIN_MISMATCH_IMAGES = 3
#: Another image "matches" a mismatched mask when the mask's evidence on it reaches this
#: fraction of the dataset median.
MATCH_FRACTION = 0.5
#: Overlap search: widths 1..MAX_OVERLAP px; a width is accepted when the two strips, high-
#: passed, correlate at least MIN_OVERLAP_CORR: 1.0 for identical pixels, ~0.99 after per-tile
#: normalisation, 0.89 for a sparse tile stored once as 16-bit TIFF and once as 8-bit PNG;
#: unrelated strips correlate ~0 (+-0.05 over one 512-px column).
MAX_OVERLAP = 128
MIN_OVERLAP_CORR = 0.85
#: Bead diameter (native px) assumed when none is given or measurable.
DEFAULT_BEAD_DIAMETER = 8.0
#: Registration map: the darkness map smoothed with a gaussian of sigma = this x the bead
#: diameter (:func:`centre_response`). Measured on ring beads with shrunk masks (36 tiles
#: of 128 px, 6 planted 2-4 px offsets, 8 seeds): raw darkness flags 14-16 of the 30
#: unshifted tiles; 0.4 flags 3-6, 0.5 up to 3, 0.55 at most 1 and names 6 of 6 planted
#: offsets in 7 seeds (5 in one); 0.6 flags none but misses one of the users' offset tiles.
CENTRE_SIGMA_FRACTION = 0.55
#: Missed / merged rules, like the partial-mask rule of the analysis: at least 2 ...
MIN_FLAGGED_BEADS = 2
#: ... making at least this fraction of the dark blobs of the image.
MIN_FLAGGED_FRACTION = 0.25

# --------------------------------------------------------------------------- darkness map


def luminance(image) -> np.ndarray:
    """float32 ``(H, W)`` luminance of an ``(H, W)`` or ``(H, W, C)`` image (value range kept)."""
    x = np.asarray(image)
    if x.ndim == 3:
        if x.shape[-1] == 1:
            return x[..., 0].astype(np.float32)
        return mio.to_channels(x, 1)[..., 0]
    if x.ndim != 2:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {x.shape}")
    return x.astype(np.float32, copy=False)


def darkness_map(image, *, bead_diameter: float | None = None) -> np.ndarray:
    """Bead evidence: the fraction by which each pixel is darker than its local background.

    ``1 - luminance / background`` (:func:`microbead_io.flatfield_ratio`: grey closing over
    :func:`microbead_io.flatfield_window` = 8 bead diameters, then smoothing, so beads are
    filled with the surrounding grey and uneven illumination cancels), minus its tile median
    (the noise floor of the bare background), clipped at 0. A ratio, not a per-tile stretch:
    a bead that darkens the light by 60 % scores 0.6 in a sparse tile and in a dense one, in
    8-bit and 16-bit files alike, and a percentile stretch cannot saturate it (which would
    flatten the score a shift is judged by).

    Parameters
    ----------
    image : array ``(H, W)`` or ``(H, W, C)``, any value range (bright background)
    bead_diameter : float or None
        Bead diameter in pixels of this image; None: :data:`DEFAULT_BEAD_DIAMETER`.

    Returns
    -------
    float32 ``(H, W)``, >= 0 (beads typically 0.3-0.8, background ~0). A constant image
    gives all zeros.
    """
    x = luminance(image)
    d = bead_diameter if bead_diameter and math.isfinite(bead_diameter) and bead_diameter > 0 \
        else DEFAULT_BEAD_DIAMETER
    dark = 1.0 - mio.flatfield_ratio(x, mio.flatfield_window(d))
    dark -= np.float32(np.median(dark[::2, ::2]))  # a quarter of the pixels: same floor
    np.maximum(dark, 0.0, out=dark)
    return dark.astype(np.float32, copy=False)


def centre_response(darkness, *, bead_diameter: float | None = None) -> np.ndarray:
    """Bead-centre response: a darkness map averaged over a bead-sized gaussian.

    Registration needs a map whose maximum lies at each bead's centre. Raw darkness has
    that for solid beads only: a ring bead (dark rim, lighter core: defocused brightfield
    beads) is darkest on its rim, so a shrunk mask scores higher half on the rim than
    centred on the core. Averaged with a gaussian of sigma
    :data:`CENTRE_SIGMA_FRACTION` x ``bead_diameter`` (wider than ``rim radius / sqrt 2``,
    where a blurred ring's centre turns from a dip into the peak) both peak at their centre;
    the values stay fractions of darkness (a solid bead scores a little lower than raw).

    Parameters
    ----------
    darkness : float ``(H, W)``
        :func:`darkness_map`.
    bead_diameter : float or None
        Bead diameter in pixels; None: :data:`DEFAULT_BEAD_DIAMETER`. Masks shrunk by
        1-2 px give a diameter ~25 % low, still inside the working range.

    Returns
    -------
    float32 ``(H, W)``, >= 0.
    """
    d = bead_diameter if bead_diameter and math.isfinite(bead_diameter) and bead_diameter > 0 \
        else DEFAULT_BEAD_DIAMETER
    sigma = CENTRE_SIGMA_FRACTION * float(d)
    return cv2.GaussianBlur(np.asarray(darkness, np.float32), (0, 0), sigmaX=sigma,
                            sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def centre_map(image, *, bead_diameter: float | None = None) -> np.ndarray:
    """:func:`centre_response` of ``darkness_map(image)``: the map masks are registered to."""
    return centre_response(darkness_map(image, bead_diameter=bead_diameter),
                           bead_diameter=bead_diameter)


def shift_mask(mask, dy: int, dx: int) -> np.ndarray:
    """Move a mask by ``(dy, dx)`` px (content at ``p`` goes to ``p + (dy, dx)``), zero fill.

    Returns the same dtype and shape; pixels moved past the border are lost.
    """
    m = np.asarray(mask)
    out = np.zeros_like(m)
    h, w = m.shape[:2]
    dy, dx = int(dy), int(dx)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[dst_y, dst_x] = m[src_y, src_x]
    return out


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register_mask`.

    Attributes
    ----------
    dy, dx : int
        Offset of the mask relative to the beads: mask content sits at bead position
        ``+ (dy, dx)``. Undo with ``shift_mask(mask, -dy, -dx)``.
    score : float
        100 x mean darkness under the mask with the offset undone (percent by which the
        masked pixels are darker than their background); NaN for an empty mask.
    score_unshifted : float
        The same for the mask as stored.
    gain : float
        ``score / score_unshifted - 1``; NaN when the unshifted score is 0 or undefined.
    background : float
        100 x mean darkness over the whole image: what a mask placed at random scores.
    n_mask_px : int
        Foreground pixels of the mask.
    max_shift : int
        Search radius used.
    """

    dy: int
    dx: int
    score: float
    score_unshifted: float
    gain: float
    background: float
    n_mask_px: int
    max_shift: int = MAX_SHIFT

    @property
    def offset(self) -> tuple[int, int]:
        return self.dy, self.dx

    @property
    def magnitude(self) -> int:
        """Chebyshev length of the offset, px."""
        return max(abs(self.dy), abs(self.dx))

    @property
    def evidence(self) -> float:
        """Bead evidence at the best shift: ``score - background`` (~0 for a mask of nothing)."""
        return self.score - self.background

    @property
    def at_search_edge(self) -> bool:
        """The best shift lies on the search border: the true offset may be larger."""
        return self.magnitude >= self.max_shift

    def is_offset(self, min_px: int = MIN_OFFSET_PX, min_gain: float = MIN_OFFSET_GAIN) -> bool:
        """Offset of at least ``min_px`` px whose undoing gains at least ``min_gain``."""
        return bool(self.magnitude >= min_px and math.isfinite(self.gain)
                    and self.gain >= min_gain)


def shift_scores(mask, darkness, *, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """Mean darkness under the mask moved by every ``(sy, sx)`` in ``[-max_shift, max_shift]``.

    Pixels moved outside the image do not count (mean over the pixels still inside).

    Returns
    -------
    float64 ``(2 max_shift + 1, 2 max_shift + 1)``; entry ``[sy + max_shift, sx + max_shift]``;
    NaN where no mask pixel stays inside (all NaN for an empty mask).
    """
    m = np.asarray(mask) != 0
    d = np.asarray(darkness, dtype=np.float32)
    if m.shape != d.shape:
        raise ValueError(f"mask shape {m.shape} != darkness shape {d.shape}")
    p = int(max_shift)
    n = 2 * p + 1
    if not m.any():
        return np.full((n, n), np.nan)
    # Cross-correlation of the zero-padded darkness map with the mask (OpenCV picks a DFT
    # for a template this large), divided by the mask pixels still inside the image (a
    # summed-area table). 4x faster than gathering the mask pixels for each shift.
    dp = cv2.copyMakeBorder(d, p, p, p, p, cv2.BORDER_CONSTANT, value=0)
    num = cv2.matchTemplate(dp, m.astype(np.float32), cv2.TM_CCORR).astype(np.float64)
    num[np.abs(num) <= 1e-6 * float(np.abs(num).max())] = 0.0  # DFT round-off, not signal
    sat = cv2.integral(m.astype(np.uint8)).astype(np.int64)
    h, w = m.shape
    y0 = np.maximum(0, -np.arange(-p, p + 1))  # rows of the mask still inside after sy
    y1 = h - np.maximum(0, np.arange(-p, p + 1))
    x0, x1 = y0, w - np.maximum(0, np.arange(-p, p + 1))
    cnt = (sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, num / cnt, np.nan)


def register_mask(mask, darkness, *, max_shift: int = MAX_SHIFT,
                  plateau: float = 0.01) -> Registration:
    """Best integer alignment of a mask with a bead map: :func:`centre_map` (what
    :func:`register` and the dataset analysis use) or a raw :func:`darkness_map`.

    Every shift in ``[-max_shift, max_shift]^2`` is scored by the mean darkness under the
    moved mask (:func:`shift_scores`). A shrunk mask can slide inside a flat-bottomed bead
    without losing score, so the best shift is the centre of the plateau of shifts within
    ``plateau`` (relative) of the maximum, snapped to the plateau shift nearest to it.

    Parameters
    ----------
    mask : ``(H, W)``, foreground non-zero
    darkness : float ``(H, W)``
    max_shift : int
        Search radius, px (the cost is ``(2 max_shift + 1)^2`` gathers of the mask pixels).

    Returns
    -------
    Registration
        ``offset = -best shift``. An empty mask gives offset (0, 0) and NaN scores.
    """
    d = np.asarray(darkness, dtype=np.float32)
    scores = shift_scores(mask, d, max_shift=max_shift)
    p = int(max_shift)
    background = 100.0 * float(d.mean()) if d.size else float("nan")
    n_px = int(np.count_nonzero(np.asarray(mask)))
    if not np.isfinite(scores).any():
        nan = float("nan")
        return Registration(0, 0, nan, nan, nan, background, n_px, p)
    best = float(np.nanmax(scores))
    near = np.argwhere(np.nan_to_num(scores, nan=-np.inf) >= best * (1.0 - plateau)) - p
    centre = near.mean(axis=0)
    sy, sx = (int(v) for v in near[np.argmin(((near - centre) ** 2).sum(axis=1))])
    score = 100.0 * float(scores[sy + p, sx + p])
    unshifted = 100.0 * float(scores[p, p])
    gain = score / unshifted - 1.0 if unshifted > 0 else float("nan")
    return Registration(-sy, -sx, score, unshifted, gain, background, n_px, p)


def register(image, mask, *, bead_diameter: float | None = None,
             max_shift: int = MAX_SHIFT) -> Registration:
    """:func:`register_mask` of ``mask`` against ``centre_map(image)`` (solid and ring beads).

    ``image`` and ``mask`` at the same (native) resolution; see :class:`Registration`.
    """
    return register_mask(mask, centre_map(image, bead_diameter=bead_diameter),
                         max_shift=max_shift)


# --------------------------------------------------------------------------- mismatch


def mismatch_threshold(evidence: Sequence[float], *, fraction: float = MISMATCH_FRACTION,
                       min_images: int = MIN_MISMATCH_IMAGES) -> tuple[float, float]:
    """``(median, threshold)`` of per-mask bead evidence (:attr:`Registration.evidence`).

    A mask with evidence below ``threshold = fraction * median`` does not mark its own image's
    beads at any shift. NaN values are ignored; with fewer than ``min_images`` finite values
    or a non-positive median the threshold is NaN (nothing can be flagged).
    """
    v = np.asarray([e for e in evidence if e is not None and math.isfinite(e)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(v))
    if v.size < min_images or med <= 0:
        return med, float("nan")
    return med, fraction * med


def best_matching_images(masks: Mapping, candidates, *, max_shift: int = MAX_SHIFT,
                         ) -> dict:
    """For each mask, the image whose bead map it fits best: one pass over the images.

    Parameters
    ----------
    masks : mapping of name -> ``(H, W)`` mask
        The masks to place (typically the mismatched ones).
    candidates : iterable of ``(name, darkness)``
        Bead maps (:func:`centre_map` or :func:`darkness_map`) of the candidate images; a
        mask is scored against every map of its shape except the one with its own name. A
        generator is consumed once, so each map can be computed (or read) only when needed.

    Returns
    -------
    dict
        name -> ``(candidate name, registration)`` with the highest finite
        :attr:`Registration.evidence` (the first candidate wins a tie); masks no candidate
        fits are left out.
    """
    ms = {key: np.asarray(m) for key, m in masks.items()}
    best: dict = {}
    for name, dark in candidates:
        for key, m in ms.items():
            if key == name or np.shape(dark) != m.shape:
                continue
            reg = register_mask(m, dark, max_shift=max_shift)
            if math.isfinite(reg.evidence) and (
                key not in best or reg.evidence > best[key][1].evidence
            ):
                best[key] = (name, reg)
    return best


def best_matching_image(mask, candidates, *, max_shift: int = MAX_SHIFT,
                        ) -> tuple[str | None, Registration | None]:
    """The image whose darkness map the mask fits best (:func:`best_matching_images` of one
    mask).

    Parameters
    ----------
    mask : ``(H, W)``
    candidates : iterable of ``(name, darkness)``
        Darkness maps (:func:`darkness_map`); ones of another shape are skipped. A generator
        is consumed once, so a folder can be streamed.

    Returns
    -------
    ``(name, registration)`` with the highest :attr:`Registration.evidence`, or
    ``(None, None)`` when no candidate has the mask's shape.
    """
    key = object()  # equal to no candidate name
    return best_matching_images({key: mask}, candidates, max_shift=max_shift).get(
        key, (None, None))


# --------------------------------------------------------------------------- shape


def disk(radius: int) -> np.ndarray:
    """Boolean disc footprint of ``radius`` px, ``(2r+1, 2r+1)``: ``y^2 + x^2 <= r^2 + r/2``."""
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + 0.5 * r


def shape_check(darkness, mask, *, threshold: float | None = None,
                bead_area: float | None = None, mask_area: float | None = None,
                tolerance_px: int = 2, size_range: tuple[float, float] = (0.4, 2.5)) -> dict:
    """Beads the mask leaves out and mask objects that merge several beads.

    Dark blobs: the darkness map (Gaussian sigma 1) at or above ``threshold``, holes filled,
    split into beads with :func:`microbead_metrics.label_beads` (the touching-bead watershed).
    A bead of ``size_range`` single-bead areas (debris of other sizes is ignored) that the
    mask, dilated by ``tolerance_px`` (masks are shrunk), does not touch is *missed*.

    A binary mask cannot separate touching beads, and need not: training and counting split
    its objects with the same ``label_beads``. So a mask object is *merged* only when it
    covers (at least 15 % and 2 px of each) more image beads than that split finds in it:
    the beads it joins are lost to every count made from the mask.

    Parameters
    ----------
    darkness : float ``(H, W)`` (:func:`darkness_map`)
    mask : ``(H, W)``
        Use the registered mask (offset undone), or every bead of an offset tile looks missed.
    threshold : float or None
        Darkness of a bead pixel; None: half the median darkness under the mask.
    bead_area : float or None
        Single-bead area of the dark blobs, px; None: estimated from them.
    mask_area : float or None
        Single-bead area for the mask's own split (the dataset's, as training uses); None:
        estimated from this mask.

    Returns
    -------
    dict
        ``n_image_beads`` (beads of single-bead size), ``n_missed``, ``n_mask_objects``,
        ``n_merged_objects``, ``n_beads_in_merged`` (image beads covered by merged objects),
        ``n_beads_lost`` (those beads minus the pieces the split finds), ``threshold``,
        ``bead_area``, and ``missed_yx`` (int ``(k, 2)`` centroids of the missed beads). Counts
        are 0 for an empty mask or image.
    """
    d = np.asarray(darkness, dtype=np.float32)
    m = np.asarray(mask) != 0
    out = {"n_image_beads": 0, "n_missed": 0, "n_mask_objects": 0, "n_merged_objects": 0,
           "n_beads_in_merged": 0, "n_beads_lost": 0, "threshold": float("nan"),
           "bead_area": float("nan"),
           "missed_yx": np.zeros((0, 2), int)}
    if not m.any():
        return out
    if threshold is None:
        threshold = 0.5 * float(np.median(d[m]))
    out["threshold"] = float(threshold)
    if not threshold > 0:
        return out
    blobs = ndi.binary_fill_holes(cv2.GaussianBlur(d, (0, 0), 1.0) >= threshold)
    if bead_area is None or not bead_area > 0:
        bead_area = mm.estimate_bead_area(blobs)
    if not bead_area > 0:
        return out
    out["bead_area"] = float(bead_area)
    beads = mm.label_beads(blobs, median_area=bead_area)
    n = int(beads.max())
    mlab, n_obj = ndi.label(m, structure=np.ones((3, 3), bool))
    out["n_mask_objects"] = int(n_obj)
    if n == 0:
        return out
    area = np.bincount(beads.ravel(), minlength=n + 1)
    single = (area >= size_range[0] * bead_area) & (area <= size_range[1] * bead_area)
    single[0] = False
    near = (cv2.dilate(m.astype(np.uint8), disk(tolerance_px).astype(np.uint8)) > 0
            if tolerance_px > 0 else m)
    touched = np.bincount(beads[near], minlength=n + 1) > 0
    missed = single & ~touched
    out["n_image_beads"] = int(single.sum())
    out["n_missed"] = int(missed.sum())
    if missed.any():
        ids = np.flatnonzero(missed)
        out["missed_yx"] = np.rint(np.array(ndi.center_of_mass(
            np.ones_like(beads), beads, ids)).reshape(-1, 2)).astype(int)
    both = m & (beads > 0)
    pair = mlab[both].astype(np.int64) * (n + 1) + beads[both]
    keys, counts = np.unique(pair, return_counts=True)
    obj, bead = keys // (n + 1), keys % (n + 1)
    ok = counts >= np.maximum(2, 0.15 * area[bead])
    per_obj = np.bincount(obj[ok], minlength=n_obj + 1)
    cand = np.flatnonzero(per_obj >= 2)
    if cand.size == 0:
        return out
    # Pieces the mask's own touching-bead split finds in each object.
    pieces = mm.label_beads(m, median_area=mask_area)
    sel = pieces > 0
    ob = mlab[sel].astype(np.int64) * (int(pieces.max()) + 1) + pieces[sel]
    per_obj_pieces = np.bincount(np.unique(ob) // (int(pieces.max()) + 1), minlength=n_obj + 1)
    lost = per_obj[cand] - per_obj_pieces[cand]
    merged = lost > 0
    out["n_merged_objects"] = int(merged.sum())
    out["n_beads_in_merged"] = int(per_obj[cand][merged].sum())
    out["n_beads_lost"] = int(lost[merged].sum())
    return out


def shape_flags(shape: dict, *, min_beads: int = MIN_FLAGGED_BEADS,
                min_fraction: float = MIN_FLAGGED_FRACTION) -> tuple[bool, bool]:
    """``(missed, merged)`` per-file rules on a :func:`shape_check` result.

    Missed: ``n_missed >= min_beads`` and ``n_missed / n_image_beads >= min_fraction``.
    Merged: ``n_merged_objects >= min_beads`` and the beads in them are at least
    ``min_fraction`` of ``n_image_beads``.
    """
    n = max(int(shape.get("n_image_beads", 0)), 1)
    missed = shape["n_missed"] >= min_beads and shape["n_missed"] / n >= min_fraction
    merged = (shape["n_merged_objects"] >= min_beads
              and shape["n_beads_in_merged"] / n >= min_fraction)
    return bool(missed), bool(merged)


# --------------------------------------------------------------------------- overlaps


def parse_grid_name(name: str | Path) -> tuple[str, int, int] | None:
    """``(frame, row, col)`` of a grid tile name (:func:`microbead_io.grid_cell`); None for a
    name without the ``_grid_r<R>_c<C>`` ending."""
    return mio.grid_cell(name)


def grid_neighbours(names: Sequence[str]) -> list[tuple[int, int, str]]:
    """Index pairs of tiles that are grid neighbours by name.

    Returns ``(i, j, side)`` with ``side == "right"`` (``j`` is in the same row, next column)
    or ``"below"`` (same column, next row), sorted by ``(i, j)``. Names without the grid
    suffix take part in no pair.
    """
    where: dict[tuple[str, int, int], int] = {}
    for i, n in enumerate(names):
        g = parse_grid_name(n)
        if g is not None:
            where.setdefault(g, i)
    pairs = []
    for (group, r, c), i in where.items():
        for key, side in (((group, r, c + 1), "right"), ((group, r + 1, c), "below")):
            j = where.get(key)
            if j is not None:
                pairs.append((i, j, side))
    return sorted(pairs)


def _oriented(a: np.ndarray, side: str) -> np.ndarray:
    """View with the shared edge along columns: ``below`` pairs are transposed."""
    return a if side == "right" else a.T


def _zcols(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) - a.mean(axis=0)
    s = np.sqrt((a * a).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return a / s


@dataclass(frozen=True)
class Overlap:
    """Two grid tiles that share a strip of pixels.

    ``side == "right"``: the last ``width`` columns of ``first`` are the first ``width``
    columns of ``second``; ``"below"``: the same for rows. ``correlation`` (Pearson) and
    ``max_abs_diff`` (in the images' stored units) compare the two strips' pixels;
    ``identical`` when the difference is at most ``tolerance``.
    """

    first: int
    second: int
    side: str
    width: int
    correlation: float
    max_abs_diff: float
    identical: bool


def _highpass(a: np.ndarray) -> np.ndarray:
    """Strip minus its Gaussian blur (sigma 3 px) along the shared edge: removes the
    illumination gradient, which makes any two columns of a tile correlate."""
    a = a.astype(np.float32)
    return a - ndi.gaussian_filter1d(a, 3.0, axis=0, mode="reflect")


def find_overlap(a, b, *, side: str = "right", max_width: int = MAX_OVERLAP,
                 min_corr: float = MIN_OVERLAP_CORR, tolerance: float = 0.0,
                 ) -> tuple[int, float, float, bool] | None:
    """Width of the strip ``a`` and ``b`` share along their common edge, if any.

    Widths ``w`` in ``1..max_width`` (less than the tile) where the ``w`` pixels of ``a``
    at the edge equal the ``w`` pixels of ``b`` at its opposite edge. Pixels are compared
    high-passed along the edge (:func:`_highpass`), so a smooth illumination gradient shared
    by all columns cannot fake a match. Candidates come from the first column (row) of ``b``
    against each column of ``a`` near the edge; each is verified on the whole strip and
    accepted when the Pearson correlation is at least ``min_corr``; the best-correlated
    (then widest) wins. Correlation, not equality, keeps the test valid after per-tile
    normalisation or 16-bit storage.

    Parameters
    ----------
    a, b : ``(H, W)`` or ``(H, W, C)``
        ``side="right"``: ``b`` is right of ``a`` (equal heights); ``"below"``: under it.
    tolerance : float
        Largest absolute pixel difference (stored units) still called identical.

    Returns
    -------
    ``(width, correlation, max_abs_diff, identical)`` or None (no such strip, featureless
    strips, or edge lengths differ).
    """
    if side not in ("right", "below"):
        raise ValueError(f"side must be 'right' or 'below', got {side!r}")
    A, B = _oriented(luminance(a), side), _oriented(luminance(b), side)
    if A.shape[0] != B.shape[0] or A.shape[0] < 8:
        return None
    k = int(min(max_width, A.shape[1] - 1, B.shape[1] - 1))
    if k < 1:
        return None
    ha, hb = _highpass(A[:, A.shape[1] - k :]), _highpass(B[:, :k])  # ha col j <-> width k-j
    zb = _zcols(hb[:, :1])[:, 0]
    if not np.isfinite(zb).all():
        return None
    corr0 = np.nan_to_num(_zcols(ha).T @ zb, nan=-1.0)
    cands = np.flatnonzero(corr0 >= min_corr)
    best = None
    for j in cands[np.argsort(-corr0[cands], kind="stable")][:8]:
        w = int(k - j)
        sa, sb = ha[:, j:], hb[:, :w]
        if sa.std() == 0 or sb.std() == 0:
            continue
        c = float(np.corrcoef(sa.ravel(), sb.ravel())[0, 1])
        if c >= min_corr and (best is None or (round(c, 6), w) > (round(best[1], 6), best[0])):
            diff = float(np.abs(A[:, A.shape[1] - w :].astype(np.float64)
                                - B[:, :w].astype(np.float64)).max())
            best = (w, c, diff, diff <= tolerance)
    return best


def _cached(load: Callable[[int], np.ndarray], size: int = 16) -> Callable[[int], np.ndarray]:
    """``load`` with a small first-in-first-out cache: pairs come sorted by their first tile,
    so a tile's right and lower neighbours are asked for again within about one grid row."""
    cache: dict[int, np.ndarray] = {}

    def get(i):
        if i not in cache:
            if len(cache) >= size:
                cache.pop(next(iter(cache)))
            cache[i] = load(i)
        return cache[i]

    return get


def find_grid_overlaps(names: Sequence[str], load_image: Callable[[int], np.ndarray], *,
                       max_width: int = MAX_OVERLAP, min_corr: float = MIN_OVERLAP_CORR,
                       tolerance: float = 0.0) -> list[Overlap]:
    """Overlaps between grid neighbours by name (:func:`grid_neighbours`).

    ``load_image(i)`` returns image ``i``; only tiles with a grid neighbour by name are loaded,
    in practice each once (a 16-image cache).
    """
    out = []
    get = _cached(lambda i: luminance(load_image(i)))
    for i, j, side in grid_neighbours(names):
        hit = find_overlap(get(i), get(j), side=side, max_width=max_width, min_corr=min_corr,
                           tolerance=tolerance)
        if hit is not None:
            out.append(Overlap(i, j, side, *hit))
    return out


def strip_masks(overlap: Overlap, mask_first, mask_second) -> tuple[np.ndarray, np.ndarray]:
    """The two masks' bool views of the shared strip (same shape)."""
    a = _oriented(np.asarray(mask_first) != 0, overlap.side)
    b = _oriented(np.asarray(mask_second) != 0, overlap.side)
    w = overlap.width
    return a[:, a.shape[1] - w :], b[:, :w]


def overlap_agreement(overlaps: Sequence[Overlap], load_mask: Callable[[int], np.ndarray],
                      names: Sequence[str] | None = None) -> list[dict]:
    """Mask agreement on each shared strip.

    Returns
    -------
    list of dict, one per overlap: ``first``, ``second`` (names when given, else indices),
    ``side``, ``width``, ``image_correlation``, ``image_max_abs_diff``, ``images_identical``,
    ``intersection``, ``union`` (px), ``jaccard`` (NaN when neither mask marks the strip).
    """
    rows = []
    load_mask = _cached(load_mask)
    for ov in overlaps:
        a, b = strip_masks(ov, load_mask(ov.first), load_mask(ov.second))
        if a.shape != b.shape or a.shape[1] != ov.width:
            continue  # a mask whose size differs from its image's: not comparable
        inter, union = int(np.count_nonzero(a & b)), int(np.count_nonzero(a | b))
        rows.append({
            "first": names[ov.first] if names is not None else ov.first,
            "second": names[ov.second] if names is not None else ov.second,
            "side": ov.side, "width": ov.width, "image_correlation": ov.correlation,
            "image_max_abs_diff": ov.max_abs_diff, "images_identical": ov.identical,
            "intersection": inter, "union": union,
            "jaccard": inter / union if union else float("nan"),
        })
    return rows


def pooled_agreement(rows: Sequence[dict]) -> dict | None:
    """Label-consistency ceiling from :func:`overlap_agreement` rows.

    Returns
    -------
    dict or None
        ``pooled_jaccard`` (sum of intersections / sum of unions over all strips: the
        ceiling), ``median_pair_jaccard`` and ``mean_pair_jaccard`` (over strips where a mask
        marks something), ``n_pairs``, ``n_pairs_with_beads``, ``n_identical``,
        ``overlap_px``. None when there is no pair or no strip holds any mask pixel.
    """
    if not rows:
        return None
    union = sum(r["union"] for r in rows)
    if union == 0:
        return None
    per = [r["jaccard"] for r in rows if r["union"] > 0]
    return {
        "pooled_jaccard": sum(r["intersection"] for r in rows) / union,
        "median_pair_jaccard": float(np.median(per)),
        "mean_pair_jaccard": float(np.mean(per)),
        "n_pairs": len(rows),
        "n_pairs_with_beads": len(per),
        "n_identical": sum(bool(r["images_identical"]) for r in rows),
        "overlap_px": int(sum(r["width"] for r in rows)),
    }


def _loader(source) -> Callable[[int], np.ndarray]:
    """``source`` as ``index -> array``: a callable is used as it is, a sequence indexed."""
    return source if callable(source) else (lambda i: source[i])


def consistency_ceiling(images, masks, names: Sequence[str], *,
                        max_width: int = MAX_OVERLAP, min_corr: float = MIN_OVERLAP_CORR,
                        overlaps: Sequence[Overlap] | None = None) -> dict | None:
    """Label-consistency ceiling: pooled mask Jaccard over the strips neighbouring tiles share.

    Parameters
    ----------
    images : ``(N, H, W[, C])`` array, sequence of arrays, or callable ``index -> image``
        Any value range; per-tile normalised images work (strips are compared by
        correlation). Give native-resolution tiles: after resizing, a 37-px overlap becomes a
        fractional one whose strips no longer line up, and the pair is (rightly) not found.
        Not read when ``overlaps`` is given (None is then accepted).
    masks : ``(N, H, W)``, sequence or callable ``index -> mask``, same order and resolution
    names : sequence of str
        File names (``..._grid_r<R>_c<C>``); only name-neighbours are compared, so the cost is
        one strip search per neighbour pair (milliseconds).
    overlaps : sequence of :class:`Overlap`, optional
        The strips of :func:`find_grid_overlaps` when the caller already has them (not
        searched again).

    Returns
    -------
    :func:`pooled_agreement` dict plus ``pairs`` (the per-pair rows), or None when no two
    tiles share pixels (no grid names, no neighbours, nothing marked in the strips).
    """
    if overlaps is None:
        overlaps = find_grid_overlaps(names, _loader(images), max_width=max_width,
                                      min_corr=min_corr)
    rows = overlap_agreement(overlaps, _loader(masks), names=[str(n) for n in names])
    pooled = pooled_agreement(rows)
    if pooled is not None:
        pooled["pairs"] = rows
    return pooled


def _safe(load: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    """``load`` returning an empty array for a file that cannot be read (no pair then)."""
    def f(i):
        try:
            return load(i)
        except (mio.ImageReadError, OSError):
            return np.zeros((0, 0), np.float32)
    return f


def grid_overlaps_from_files(image_paths: Sequence, *, max_width: int = MAX_OVERLAP,
                             min_corr: float = MIN_OVERLAP_CORR) -> list[Overlap]:
    """:func:`find_grid_overlaps` of image files read at native resolution via
    ``microbead_io`` (names are the file names); unreadable files take part in no pair."""
    names = [Path(p).name for p in image_paths]
    return find_grid_overlaps(names, _safe(lambda i: mio.read_image(image_paths[i], 1)[..., 0]),
                              max_width=max_width, min_corr=min_corr)


def consistency_ceiling_from_files(image_paths: Sequence, mask_paths: Sequence, *,
                                   max_width: int = MAX_OVERLAP,
                                   min_corr: float = MIN_OVERLAP_CORR,
                                   overlaps: Sequence[Overlap] | None = None) -> dict | None:
    """:func:`consistency_ceiling` of files read at native resolution via ``microbead_io``.

    Only tiles with a grid neighbour by name are read (each about twice). Pairs where a file
    cannot be read are skipped. Names are the image file names. ``overlaps``: the strips of
    :func:`grid_overlaps_from_files` when the caller already has them (not found again).
    """
    if overlaps is None:
        overlaps = grid_overlaps_from_files(image_paths, max_width=max_width,
                                            min_corr=min_corr)
    return consistency_ceiling(None, _safe(lambda i: mio.read_mask(mask_paths[i], warn=False)),
                               [Path(p).name for p in image_paths], overlaps=overlaps)


# --------------------------------------------------------------------------- label noise


def _touching_pairs(labels: np.ndarray, gap: int) -> np.ndarray:
    """Unique ``(a, b)`` id pairs (a < b) at most ``gap`` background px apart (8-neighbour
    steps), int ``(k, 2)``."""
    lab = np.asarray(labels)
    h, w = lab.shape
    r = int(gap) + 1
    found = []
    for dy in range(0, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx <= 0) or max(abs(dy), abs(dx)) > r:
                continue
            a = lab[: h - dy, max(0, -dx) : w - max(0, dx)]
            b = lab[dy:, max(0, dx) : w - max(0, -dx)]
            sel = (a > 0) & (b > 0) & (a != b)
            if sel.any():
                found.append(np.stack([np.minimum(a[sel], b[sel]), np.maximum(a[sel], b[sel])],
                                      axis=1))
    if not found:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def _per_instance_erosion(lab: np.ndarray, radius: int) -> np.ndarray:
    """Labels eroded by a disc of ``radius`` separately per instance; a bead eroded away
    keeps its deepest pixel (a shrunk bead is still in the mask)."""
    if radius <= 0:
        return lab.copy()
    fp = disk(radius).astype(np.uint8)
    f = lab.astype(np.float32)  # ids < 2^24 are exact; OpenCV's morphology is ~10x ndimage's
    lo = cv2.erode(f, fp, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    hi = cv2.dilate(f, fp, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    out = np.where((lo == hi) & (lab > 0), lab, 0)
    ids = np.unique(lab[lab > 0])
    gone = np.setdiff1d(ids, np.unique(out[out > 0]))
    if gone.size:
        big = np.iinfo(lab.dtype).max
        other = (ndi.maximum_filter(lab, size=3) != lab) | (
            ndi.minimum_filter(np.where(lab > 0, lab, big), size=3) != lab)
        depth = ndi.distance_transform_edt((lab > 0) & ~other)
        for y, x in ndi.maximum_position(depth, lab, gone):
            out[y, x] = lab[y, x]
    return out


def degrade_mask(labels, rng: np.random.Generator, *, image=None,
                 shrink_px: int | tuple[int, int] = 1, merge_prob: float = 0.8,
                 touch_gap_px: int = 1, drop_fraction: float = 0.05,
                 offset_prob: float = 0.12, offset_px: tuple[int, int] = (1, 2),
                 bridge_width: int | None = None) -> tuple[np.ndarray, dict]:
    """Degrade exact instance labels into a mask like the users' blob-detector masks.

    In order: drop a few beads (the faintest, when ``image`` is given); shrink every bead by
    a per-instance erosion (a bead never vanishes: its deepest pixel stays); join touching
    beads into one blob with a bridge along the line between their centres; offset the whole
    mask. Parameters are in pixels of ``labels``' resolution (the generator's 256-px tiles:
    offsets of 1-2 px there are the users' 2-4 native px).

    Parameters
    ----------
    labels : int ``(H, W)``
        0 background, 1..N beads (ids need not be consecutive). Not modified.
    rng : numpy.random.Generator
        All randomness comes from it (seeded -> reproducible).
    image : ``(H, W)`` or ``(H, W, C)`` or None
        The tile; when given, dropped beads are drawn from the fainter half (lowest mean
        darkness, :func:`darkness_map`), else uniformly.
    shrink_px : int or (low, high)
        Erosion radius; a pair draws a radius per call, inclusive.
    merge_prob : float
        Probability that a touching pair (at most ``touch_gap_px`` background pixels apart)
        is joined.
    drop_fraction : float
        Expected fraction of beads dropped (binomial count).
    offset_prob : float
        Probability that the mask is offset; then ``(dy, dx)`` is uniform with Chebyshev
        length in ``offset_px`` (inclusive).
    bridge_width : int or None
        Bridge thickness, px; None: about the eroded bead radius (at least 1).

    Returns
    -------
    mask : uint8 ``(H, W)`` in {0, 1}
    info : dict
        ``shift`` ``(dy, dx)`` (the mask's offset from its beads, as
        :class:`Registration` reports it; (0, 0) when not offset), ``dy``, ``dx``,
        ``offset`` (bool), ``shrink_px``, ``n_beads``, ``n_dropped``, ``dropped_ids``,
        ``n_touching_pairs``, ``n_merged`` (pairs joined).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {lab.shape}")
    lab = lab.astype(np.int64)
    ids = np.unique(lab[lab > 0])
    n = int(ids.size)
    info: dict = {"n_beads": n, "n_dropped": 0, "dropped_ids": [], "n_touching_pairs": 0,
                  "n_merged": 0}

    # 1. drop a few (faint) beads
    n_drop = int(rng.binomial(n, float(drop_fraction))) if n and drop_fraction > 0 else 0
    dropped = np.zeros(0, np.int64)
    if n_drop:
        pool = ids
        if image is not None:
            dark = darkness_map(image)
            if dark.shape != lab.shape:
                raise ValueError(f"image shape {dark.shape} != labels shape {lab.shape}")
            mean_dark = ndi.mean(dark, lab, ids)
            pool = ids[np.argsort(mean_dark, kind="stable")][: max(n_drop, (n + 1) // 2)]
        dropped = np.sort(rng.choice(pool, size=n_drop, replace=False))
        lab = np.where(np.isin(lab, dropped), 0, lab)
    info.update(n_dropped=int(dropped.size), dropped_ids=[int(i) for i in dropped])

    # 2. which touching pairs merge (decided on the unshrunk beads)
    pairs = _touching_pairs(lab, touch_gap_px)
    info["n_touching_pairs"] = int(len(pairs))
    merge = pairs[rng.random(len(pairs)) < merge_prob] if len(pairs) else pairs

    # 3. shrink
    r = shrink_px if isinstance(shrink_px, int | np.integer) else int(
        rng.integers(int(shrink_px[0]), int(shrink_px[1]) + 1))
    info["shrink_px"] = int(r)
    eroded = _per_instance_erosion(lab, int(r))
    mask = (eroded > 0).astype(np.uint8)

    # 4. bridges between merged pairs, along the line joining their centres
    if len(merge):
        present = np.unique(lab[lab > 0])
        cy, cx = (np.asarray(v) for v in zip(*ndi.center_of_mass(lab > 0, lab, present)))
        where = {int(i): k for k, i in enumerate(present)}
        if bridge_width is None:
            areas = np.bincount(eroded.ravel())[1:]
            areas = areas[areas > 0]
            rad = math.sqrt(float(np.median(areas)) / math.pi) if areas.size else 1.0
            bridge_width = max(1, int(round(rad)))
        # Bridges stay on bead pixels or within touch_gap_px of one (the gap being closed).
        near = cv2.dilate((lab > 0).astype(np.uint8), np.ones((3, 3), np.uint8),
                          iterations=int(touch_gap_px)) if touch_gap_px > 0 else (lab > 0)
        for a, b in merge:
            ka, kb = where[int(a)], where[int(b)]
            y0 = max(0, int(min(cy[ka], cy[kb])) - bridge_width - 2)
            x0 = max(0, int(min(cx[ka], cx[kb])) - bridge_width - 2)
            ys = slice(y0, int(max(cy[ka], cy[kb])) + bridge_width + 3)
            xs = slice(x0, int(max(cx[ka], cx[kb])) + bridge_width + 3)
            line = np.zeros(mask[ys, xs].shape, np.uint8)
            cv2.line(line, (int(round(cx[ka])) - x0, int(round(cy[ka])) - y0),
                     (int(round(cx[kb])) - x0, int(round(cy[kb])) - y0), 1,
                     thickness=int(bridge_width))
            mask[ys, xs] |= line & near[ys, xs].astype(np.uint8)
        info["n_merged"] = int(len(merge))

    # 5. offset
    dy = dx = 0
    if offset_prob > 0 and rng.random() < offset_prob:
        lo, hi = int(offset_px[0]), int(offset_px[1])
        while True:
            dy, dx = (int(v) for v in rng.integers(-hi, hi + 1, size=2))
            if lo <= max(abs(dy), abs(dx)) <= hi and (dy or dx):
                break
        mask = shift_mask(mask, dy, dx)
    info.update(shift=(dy, dx), dy=dy, dx=dx, offset=bool(dy or dx))
    return mask, info

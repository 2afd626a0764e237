"""Bead and debris geometry of the synthetic data, and the exact masks drawn from it.

Geometry comes first (bead centres and radii in native microscope-frame pixels, debris
fully specified), so rendering (:mod:`synthetic_render`) and ground truth share it: masks
and instance labels are drawn directly at output scale from the same discs (filled,
exactly binary, never resampled). Pure functions of their arguments and random generator;
used by :mod:`synthetic_scenes` and ``make_synthetic_dataset.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

log = logging.getLogger("microbead.synthetic")

NATIVE_TILE = 512  # native frame pixels covered by one grid tile
REFERENCE_SCALE = 0.5  # users' tiles: 256 px per 512 native px
FRAME_SHAPE = (2160, 3840)  # (H, W) of a full microscope frame
# Touching beads may overlap by up to this much (native px): they touch, they do not overlap.
TOUCH_TOLERANCE = 0.5


# --------------------------------------------------------------------------- geometry


@dataclass
class BeadLayout:
    """Bead geometry in native (microscope frame) pixel coordinates.

    Attributes
    ----------
    y, x : float64 ``(N,)``
        Centres; pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``, its centre is ``i + 0.5``.
    r : float64 ``(N,)``
        Radii (outer edge of the dark rim = edge of the filled mask disc).
    group : int64 ``(N,)``
        Cluster id for beads placed touching others (pairs, clusters of 3-5), -1 if free.
    """

    y: np.ndarray
    x: np.ndarray
    r: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return int(self.y.size)

    @classmethod
    def empty(cls) -> BeadLayout:
        z = np.zeros(0, np.float64)
        return cls(z, z.copy(), z.copy(), np.zeros(0, np.int64))

    def subset(self, keep: np.ndarray) -> BeadLayout:
        return BeadLayout(self.y[keep], self.x[keep], self.r[keep], self.group[keep])


@dataclass
class Debris:
    """Unlabelled debris, fully specified so rendering draws no random numbers for it.

    ``kind`` is ``"blob"`` (union of soft ellipses; ``parts`` rows are
    ``(dy, dx, semi_a, semi_b, angle)``), ``"speck"`` (gaussian; ``parts`` = ``[[sigma]]``),
    ``"smudge"`` (elongated gaussian; ``parts`` = ``[[sigma_a, sigma_b, angle]]``) or
    ``"fibre"`` (polyline; ``parts`` rows are ``(dy, dx)`` vertices, ``width`` its
    thickness). ``darkness`` is the drop in transmission (0..1) before blur.
    """

    kind: str
    y: float
    x: float
    darkness: float
    extent: float
    parts: np.ndarray
    width: float = 1.0


@dataclass
class _Placer:
    """Non-overlap bookkeeping for bead placement.

    Placed beads are hashed into square cells of ``cell`` px (at least the largest possible
    centre distance of two conflicting beads), so a test looks at the 3x3 neighbouring cells
    only: a 3840x2160 frame at 160x (~40,000 beads) places in seconds.
    """

    shape: tuple[int, int]
    capacity: int
    cell: float = 32.0
    y: np.ndarray = field(init=False)
    x: np.ndarray = field(init=False)
    r: np.ndarray = field(init=False)
    g: np.ndarray = field(init=False)
    k: int = 0

    def __post_init__(self):
        self.y = np.zeros(self.capacity)
        self.x = np.zeros(self.capacity)
        self.r = np.zeros(self.capacity)
        self.g = np.full(self.capacity, -1, np.int64)
        self._cells: dict[tuple[int, int], list[int]] = {}

    def _near(self, y: float, x: float) -> list[int]:
        cy, cx = int(y // self.cell), int(x // self.cell)
        out: list[int] = []
        for a in (cy - 1, cy, cy + 1):
            for b in (cx - 1, cx, cx + 1):
                out.extend(self._cells.get((a, b), ()))
        return out

    def fits(self, y: float, x: float, r: float, gap: float) -> bool:
        h, w = self.shape
        if not (0.0 <= y < h and 0.0 <= x < w):
            return False
        idx = self._near(y, x)
        if not idx:
            return True
        dy = self.y[idx] - y
        dx = self.x[idx] - x
        lim = self.r[idx] + r + gap
        return not bool(np.any(dy * dy + dx * dx < lim * lim))

    def add(self, y: float, x: float, r: float, group: int = -1) -> None:
        k = self.k
        self.y[k], self.x[k], self.r[k], self.g[k] = y, x, r, group
        self._cells.setdefault((int(y // self.cell), int(x // self.cell)), []).append(k)
        self.k += 1

    def layout(self) -> BeadLayout:
        k = self.k
        return BeadLayout(self.y[:k].copy(), self.x[:k].copy(), self.r[:k].copy(),
                          self.g[:k].copy())


def default_cluster_fraction(n: int, shape, dense: float = 270.0, top: float = 0.33) -> float:
    """Fraction of beads placed in touching groups: ~8 % when sparse, ``top`` at ``dense``
    beads per 512x512 native tile (270 and 33 % for rings; the microscope style's 1300 and
    45 %: clumps at 160x-320x)."""
    area_tiles = shape[0] * shape[1] / float(NATIVE_TILE * NATIVE_TILE)
    density = n / max(area_tiles, 1e-9) / dense
    return float(0.08 + (top - 0.08) * min(density, 1.0))


def _group_sizes(rng: np.random.Generator, n_clustered: int) -> list[int]:
    sizes: list[int] = []
    left = n_clustered
    while left >= 2:
        s = int(rng.choice([2, 3, 4, 5], p=[0.6, 0.2, 0.12, 0.08]))
        s = min(s, left)
        if left - s == 1:  # never leave a lonely bead for a "group"
            s = left if s < 5 else s - 1
        sizes.append(s)
        left -= s
    return sizes


def sample_beads(
    rng: np.random.Generator,
    shape,
    n: int,
    *,
    radius: float = 9.4,
    radius_sd: float = 0.5,
    cluster_fraction: float | None = None,
    min_gap: float = -TOUCH_TOLERANCE,
    max_tries: int = 200,
) -> BeadLayout:
    """Sample non-overlapping bead discs, some as touching pairs and clusters of 3-5.

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : (H, W)
        Field in native pixels; every centre lies inside it (beads may be cut by the border).
    n : int
        Beads wanted (>= 0). Fewer are returned, with a warning, only if the field is too
        crowded to place them.
    radius, radius_sd : float
        Radius distribution ``N(radius, radius_sd)`` in native px, clipped to +-3 sd and >= 1.
    cluster_fraction : float or None
        Fraction of beads placed touching another bead of their group; None -> density
        dependent (:func:`default_cluster_fraction`).
    min_gap : float
        Minimum edge-to-edge distance between beads that are not attached on purpose
        (native px); the default ``-0.5`` lets beads touch but never overlap by more than
        half a pixel. Use a positive gap for a layout in which no two beads touch.
    max_tries : int
        Rejection-sampling attempts per bead.

    Returns
    -------
    BeadLayout
        ``len(layout) <= n``; empty for ``n == 0``.
    """
    shape = (int(shape[0]), int(shape[1]))
    n = int(n)
    if n <= 0:
        return BeadLayout.empty()
    radii = rng.normal(radius, radius_sd, size=n)
    radii = np.clip(radii, max(1.0, radius - 3 * radius_sd), radius + 3 * radius_sd)
    if cluster_fraction is None:
        cluster_fraction = default_cluster_fraction(n, shape)
    n_clustered = int(round(float(np.clip(cluster_fraction, 0.0, 1.0)) * n))
    sizes = _group_sizes(rng, n_clustered)
    # Two beads conflict only if their centres are closer than 2 * max radius + gap.
    placer = _Placer(shape, n, cell=float(2 * radii.max() + max(float(min_gap), 0.0) + 1.0))
    h, w = shape
    gap_attached = -TOUCH_TOLERANCE
    gap_free = max(float(min_gap), gap_attached)
    bead = 0
    failed = 0

    def place_free(r: float, group: int = -1) -> bool:
        for _ in range(max_tries):
            y, x = rng.uniform(0, h), rng.uniform(0, w)
            if placer.fits(y, x, r, gap_free):
                placer.add(y, x, r, group)
                return True
        return False

    for gid, size in enumerate(sizes):
        first = placer.k
        if not place_free(radii[bead], gid):
            failed += size
            bead += size
            continue
        bead += 1
        for _ in range(size - 1):
            r = radii[bead]
            bead += 1
            ok = False
            for _ in range(max_tries // 4):
                m = int(rng.integers(first, placer.k))
                theta = rng.uniform(0, 2 * np.pi)
                d = placer.r[m] + r - rng.uniform(0, TOUCH_TOLERANCE)
                y = placer.y[m] + d * np.sin(theta)
                x = placer.x[m] + d * np.cos(theta)
                # Attached on purpose: only the touch tolerance applies, also to the others.
                if placer.fits(y, x, r, gap_attached):
                    placer.add(y, x, r, gid)
                    ok = True
                    break
            if not ok and not place_free(r):
                failed += 1
    while bead < n:
        if not place_free(radii[bead]):
            failed += 1
        bead += 1
    if failed:
        log.warning("could only place %d of %d beads in a %dx%d field", placer.k, n, w, h)
    return placer.layout()


def sample_debris(
    rng: np.random.Generator,
    shape,
    n: int,
    *,
    beads: BeadLayout | None = None,
    radius: float = 9.4,
    clearance: float = 3.0,
    max_tries: int = 30,
) -> list[Debris]:
    """Sample unlabelled debris: irregular dark blobs, small specks and a few fibres.

    None has a bright core, so a network must learn "ring", not "dark". Debris is kept
    ``clearance`` native px away from every bead so it never touches a labelled disc.

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : (H, W)
        Field in native pixels.
    n : int
        Particles wanted; fewer if no free spot is found (crowded field).
    beads : BeadLayout or None
        Beads to stay clear of.
    radius : float
        Typical bead radius (native px); debris sizes scale with it.

    Returns
    -------
    list of Debris (empty for ``n <= 0``).
    """
    h, w = int(shape[0]), int(shape[1])
    out: list[Debris] = []
    s = radius / 9.4
    for _ in range(max(0, int(n))):
        u = rng.random()
        kind = "blob" if u < 0.5 else ("speck" if u < 0.85 else "fibre")
        if kind == "blob":
            k = int(rng.integers(2, 6))
            size = rng.uniform(2.0, 7.0) * s
            parts = np.column_stack([
                rng.normal(0, 0.6 * size, k), rng.normal(0, 0.6 * size, k),
                size * rng.uniform(0.5, 1.0, k), size * rng.uniform(0.3, 0.8, k),
                rng.uniform(0, np.pi, k),
            ])
            extent = float(np.max(np.hypot(parts[:, 0], parts[:, 1]) + parts[:, 2])) + 1.0
            darkness = rng.uniform(0.15, 0.4)
            width = 1.0
        elif kind == "speck":
            sigma = rng.uniform(0.7, 2.0) * s
            parts = np.array([[sigma]])
            extent = 3.0 * sigma + 1.0
            darkness = rng.uniform(0.2, 0.45)
            width = 1.0
        else:
            k = int(rng.integers(4, 9))
            step = rng.uniform(5.0, 14.0) * s
            ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, k))
            pts = np.column_stack([np.cumsum(step * np.sin(ang)), np.cumsum(step * np.cos(ang))])
            pts = np.vstack([[0.0, 0.0], pts])
            pts -= pts.mean(axis=0)
            parts = pts
            width = float(rng.uniform(1.0, 2.5) * s)
            extent = float(np.max(np.hypot(pts[:, 0], pts[:, 1]))) + width + 1.0
            darkness = rng.uniform(0.12, 0.3)
        for _ in range(max_tries):
            y, x = rng.uniform(0, h), rng.uniform(0, w)
            if beads is None or len(beads) == 0:
                break
            d2 = (beads.y - y) ** 2 + (beads.x - x) ** 2
            if not np.any(d2 < (beads.r + extent + clearance) ** 2):
                break
        else:
            continue
        out.append(Debris(kind, float(y), float(x), float(darkness), float(extent), parts,
                          float(width)))
    return out


# --------------------------------------------------------------------------- masks


def patch_offsets(cy, cx, half: int):
    """Integer top-left corners and centre offsets of ``(2*half+1)``-px patches per bead.

    Returns ``iy0, ix0`` (int64 ``(N,)``) and ``dy`` ``(N, P, 1)``, ``dx`` ``(N, 1, P)``
    float32: distances from each patch pixel centre to the bead centre.
    """
    iy0 = np.floor(cy).astype(np.int64) - half
    ix0 = np.floor(cx).astype(np.int64) - half
    k = np.arange(2 * half + 1, dtype=np.float64) + 0.5
    dy = (iy0[:, None] + k[None, :] - cy[:, None]).astype(np.float32)[:, :, None]
    dx = (ix0[:, None] + k[None, :] - cx[:, None]).astype(np.float32)[:, None, :]
    return iy0, ix0, dy, dx


def render_masks(beads: BeadLayout, shape, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Filled bead discs drawn directly at output scale.

    Pixel ``(i, j)`` belongs to bead ``k`` if its centre lies inside the disc
    ``(y_k, x_k, r_k) * scale``; where two discs share a pixel (touching beads overlap by
    at most half a native px) it goes to the bead it is relatively deeper inside.

    Parameters
    ----------
    beads : BeadLayout
        Native-pixel geometry.
    shape : (H, W)
        Output shape.
    scale : float
        Output pixels per native pixel (0.5 for 256-px tiles of 512-px windows).

    Returns
    -------
    mask : uint8 ``(H, W)`` in {0, 1}
    labels : int32 ``(H, W)``; 0 background, bead ``k`` (0-based) -> ``k + 1``. A bead too
        small to cover any pixel centre is absent (callers check and relabel).
    """
    h, w = int(shape[0]), int(shape[1])
    labels = np.zeros((h, w), np.int32)
    n = len(beads)
    if n == 0:
        return labels.astype(np.uint8), labels
    r = (beads.r * scale).astype(np.float32)
    half = int(math.ceil(float(r.max()))) + 1
    iy0, ix0, dy, dx = patch_offsets(beads.y * scale, beads.x * scale, half)
    q = (dy * dy + dx * dx) / (r * r)[:, None, None]  # (N, P, P); <= 1 inside the disc
    p = 2 * half + 1
    best = np.full((h + 2 * p, w + 2 * p), np.inf, np.float32)
    lab = np.zeros((h + 2 * p, w + 2 * p), np.int32)
    for k, (y, x) in enumerate(zip((iy0 + p).tolist(), (ix0 + p).tolist())):
        b = best[y : y + p, x : x + p]
        take = (q[k] <= 1.0) & (q[k] < b)
        b[take] = q[k][take]
        lab[y : y + p, x : x + p][take] = k + 1
    labels = np.ascontiguousarray(lab[p : p + h, p : p + w])
    return (labels > 0).astype(np.uint8), labels


def touching_count(labels: np.ndarray) -> int:
    """Beads whose 8-connected mask component holds more than one instance.

    These are the beads a plain connected-component count cannot separate.
    """
    lab = np.asarray(labels)
    if lab.size == 0 or lab.max() == 0:
        return 0
    fg = lab > 0
    comp, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    # A disc is connected, so each instance lies in exactly one component.
    comp_of = np.zeros(int(lab.max()) + 1, np.int64)
    comp_of[lab[fg]] = comp[fg]
    present = np.bincount(lab[fg], minlength=comp_of.size) > 0
    per_comp = np.bincount(comp_of[present])
    return int(per_comp[per_comp > 1].sum())


def relabel_present(beads: BeadLayout, labels: np.ndarray):
    """Drop beads that cover no output pixel so labels are 1..N and match the geometry."""
    present = np.bincount(labels.ravel(), minlength=len(beads) + 1) > 0
    present[0] = False
    if present[1:].all():
        return beads, labels
    lut = np.zeros(len(beads) + 1, np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1)
    return beads.subset(present[1:]), lut[labels]


def crop_truth(beads: BeadLayout, y0: float, x0: float, native: int, size: int):
    """Exact mask and labels of the ``native``-px square at ``(y0, x0)``, drawn at ``size``.

    Only beads whose disc reaches the square are drawn; ids are 1..N in bead order. Returns
    ``(mask, labels, beads_in_tile)`` with the beads in tile coordinates (native px).
    """
    near = ((beads.y + beads.r > y0) & (beads.y - beads.r < y0 + native)
            & (beads.x + beads.r > x0) & (beads.x - beads.r < x0 + native))
    sub = beads.subset(near)
    local = BeadLayout(sub.y - y0, sub.x - x0, sub.r, sub.group)
    mask, labels = render_masks(local, (size, size), size / native)
    local, labels = relabel_present(local, labels)
    return mask, labels, local

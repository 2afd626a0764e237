"""Synthetic brightfield microbead dataset in the users' layout (the project's default data).

Mimics the users' data: 256x256 grid tiles cut from 3840x2160 brightfield frames of a bead
dilution series and downscaled 2x (a tile covers 512x512 native pixels). Beads are rings (dark
rim, brighter core) of radius ~9.4 native px (~4.7 px, ~69 px area at tile scale), 3-270 per
tile depending on the dilution in the file name, with touching pairs and small clusters,
unlabelled debris (dark blobs, specks, fibres), uneven illumination, defocus and shot noise.

Geometry comes first (bead centres and radii in native pixels), then the image is rendered at
native scale and area-downscaled to the tile size, while masks and instance labels are drawn
directly at output scale from the same geometry (filled discs, exactly binary, never resampled).

Inputs
------
Only the command line (seed, number of tiles, tile size, bead radius, density).

Outputs (``DIR`` = ``--output_dir``, old spelling ``--out``)
------------------------------------------------------------
* ``DIR/images/<stem>.png`` (8-bit) or ``.tif`` (16-bit, every ``--tiff_every``-th tile)
* ``DIR/masks/<stem>.png``      filled bead discs, 0/255
* ``DIR/labels/<stem>.tif``     uint16 instance ids 1..N
* ``DIR/counts.csv``            file, stem, dilution, n_beads, requested_beads, n_touching,
  positive_ratio, n_debris
* ``DIR/dataset.json``          parameters, pixel scale, summary numbers, list of files written
* ``DIR/make_synthetic_dataset.log``
* with ``--large N``: ``DIR/large/{images,masks,labels}/<stem>.png|tif`` full frames at native
  scale (``--large_size``, default 3840x2160), ``DIR/large/counts.csv`` and
  ``DIR/large/samples.csv`` (the assay's sample sheet); ``--blank_frames N`` adds N blank
  frames there (``blank_...``, no bead; concentration 0, ``blank`` true in the sheet).

Stems look like ``640x_2025-05-16_00-59-00_002_grid_r1_c1`` (tiles) and
``640x_2025-05-16_01-02-03_101`` (large frames).

Example
-------
    python make_synthetic_dataset.py --output_dir data/synthetic --n 73 --size 256 --seed 0 \\
        --large 2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

import cli
import microbead_io as mio
import runtime

log = logging.getLogger("microbead.synthetic")

GENERATOR = "make_synthetic_dataset.py"
STYLES = ("microscope", "rings")
DILUTIONS = (160, 320, 640, 1280, 2560, 5120, 10240)
NATIVE_TILE = 512  # native frame pixels covered by one grid tile
REFERENCE_SCALE = 0.5  # users' tiles: 256 px per 512 native px
FRAME_SHAPE = (2160, 3840)  # (H, W) of a full microscope frame
GRID_ROWS, GRID_COLS = FRAME_SHAPE[0] // NATIVE_TILE, FRAME_SHAPE[1] // NATIVE_TILE
DATE = "2025-05-16"
# Geometric tile allocation over the dilution series, dense end first. 0.82 makes the
# requested mean ~109 beads/tile with the defaults (111 for n=73), like the users' data.
ALLOCATION_RATIO = 0.82
MIN_BEADS = 3
# Touching beads may overlap by up to this much (native px): they touch, they do not overlap.
TOUCH_TOLERANCE = 0.5
LOG_NAME = "make_synthetic_dataset.log"
SAMPLE_SHEET = "samples.csv"  # large/: the assay's sample sheet (blanks marked)
COUNT_FIELDS = (
    "file", "stem", "dilution", "n_beads", "requested_beads", "n_touching", "positive_ratio",
    "n_debris",
)


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


# --------------------------------------------------------------------------- appearance


def sample_appearance(rng: np.random.Generator, frame_shape=FRAME_SHAPE) -> dict:
    """Per-frame imaging parameters (shared by every tile cut from one frame).

    Returns a dict: ``background`` (~0.45-0.65 transmission), illumination polynomial
    ``illum_coef`` (6 terms on frame coordinates in [-1, 1], scaled so the field deviates by
    at most ``illum_amp`` = 5-15 %), faint out-of-focus ``blotches`` (frame y, x, sigma,
    amplitude), ``defocus_sigma`` (0.6-1.6 native px), ``photons`` (per unit intensity, shot
    noise), ``read_noise``, bead contrast (``rim_depth`` ~0.3, ``core_gain``, ``halo_gain``)
    and an oblique-illumination shading (``shade_amp``, ``shade_angle``).
    """
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    coef = rng.normal(0, 1, 6)
    coef[0] = 0.0
    gy, gx = np.meshgrid(np.linspace(-1, 1, 33), np.linspace(-1, 1, 33), indexing="ij")
    poly = _poly(coef, gy, gx)
    amp = rng.uniform(0.05, 0.15)
    coef *= amp / max(float(np.abs(poly).max()), 1e-9)
    nb = int(rng.integers(0, 5))
    blotches = np.column_stack([
        rng.uniform(0, fh, nb), rng.uniform(0, fw, nb),
        rng.uniform(15, 60, nb), rng.uniform(-0.03, 0.03, nb),
    ]) if nb else np.zeros((0, 4))
    return {
        "frame_shape": (fh, fw),
        "background": float(rng.uniform(0.45, 0.65)),
        "illum_coef": coef,
        "illum_amp": float(amp),
        "blotches": blotches,
        "defocus_sigma": float(rng.uniform(0.6, 1.6)),
        "photons": float(np.exp(rng.uniform(np.log(300), np.log(3000)))),
        "read_noise": float(rng.uniform(0.002, 0.008)),
        "rim_depth": float(rng.uniform(0.26, 0.34)),
        "core_gain": float(rng.uniform(0.04, 0.12)),
        "halo_gain": float(rng.uniform(0.0, 0.04)),
        "inner_fraction": float(rng.uniform(0.45, 0.6)),
        "shade_amp": float(rng.uniform(0.0, 0.25)),
        "shade_angle": float(rng.uniform(0, 2 * np.pi)),
    }


def _poly(c, v, u):
    return c[0] + c[1] * u + c[2] * v + c[3] * u * u + c[4] * u * v + c[5] * v * v


def illumination_field(appearance: dict, shape, origin=(0, 0)) -> np.ndarray:
    """Smooth multiplicative illumination (mean ~1) for a window of the frame.

    ``shape`` is the window ``(H, W)`` in native px, ``origin`` its top-left corner in frame
    coordinates, so tiles cut from one frame share one continuous field. float32 ``(H, W)``.
    """
    h, w = int(shape[0]), int(shape[1])
    # The field is smooth on a scale of >= 15 px: evaluate every 8 px, then interpolate.
    step = 8
    gh, gw = h // step + 3, w // step + 3
    ys = origin[0] + (np.arange(gh, dtype=np.float64) - 0.5) * step
    xs = origin[1] + (np.arange(gw, dtype=np.float64) - 0.5) * step
    coarse = illumination_at(appearance, ys[:, None], xs[None, :])
    # Node j sits at coordinate (j - 0.5) * step, so pixel i (centre i + 0.5) is at grid
    # position (i + 0.5) / step + 0.5. cv2.resize by `step` samples output pixel i' at
    # (i' + 0.5) / step - 0.5: the same, with i' = i + step. Bilinear between nodes.
    up = cv2.resize(coarse.astype(np.float32), (gw * step, gh * step),
                    interpolation=cv2.INTER_LINEAR)
    field_ = up[step : step + h, step : step + w]
    return np.asarray(field_, dtype=np.float32)


def illumination_at(appearance: dict, ys, xs) -> np.ndarray:
    """The illumination of :func:`illumination_field` at frame coordinates ``(ys, xs)``.

    ``ys`` and ``xs`` broadcast against each other (a column and a row give the grid the
    field is interpolated from; two 1-D arrays give single points). float64.
    """
    fh, fw = appearance["frame_shape"]
    ys, xs = np.asarray(ys, np.float64), np.asarray(xs, np.float64)
    out = 1.0 + _poly(appearance["illum_coef"], 2 * ys / fh - 1, 2 * xs / fw - 1)
    for by, bx, sig, amp in appearance["blotches"]:
        gy = np.exp(-0.5 * ((ys - by) / sig) ** 2)
        gx = np.exp(-0.5 * ((xs - bx) / sig) ** 2)
        if gy.max() > 1e-3 and gx.max() > 1e-3:
            out = out + amp * gy * gx
    return out


def _window(cy: float, cx: float, reach: float, shape):
    h, w = shape
    y0, y1 = max(0, int(math.floor(cy - reach))), min(h, int(math.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(math.floor(cx - reach))), min(w, int(math.ceil(cx + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - np.float32(cy))[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - np.float32(cx))[None, :]
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def _patch_offsets(cy, cx, half: int):
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


def _bead_patches(rng, beads: BeadLayout, ap: dict, half: int, chunk: int = 1024):
    """Contrast patches ``(N, P, P)`` float32 of every bead, vectorised in chunks."""
    n = len(beads)
    # Per-bead variation: slightly different rims, cores and inner radii.
    rim = (ap["rim_depth"] * rng.uniform(0.85, 1.15, n)).astype(np.float32)
    core = (ap["core_gain"] * rng.uniform(0.7, 1.3, n)).astype(np.float32)
    inner = np.clip(ap["inner_fraction"] + rng.normal(0, 0.03, n), 0.35, 0.7)
    halo = np.float32(ap["halo_gain"])
    shade_amp, phi = ap["shade_amp"], ap["shade_angle"]
    cphi = np.float32(shade_amp * np.cos(phi))
    sphi = np.float32(shade_amp * np.sin(phi))
    iy0, ix0, dy_all, dx_all = _patch_offsets(beads.y, beads.x, half)
    patches = np.empty((n, 2 * half + 1, 2 * half + 1), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        dy, dx = dy_all[a:b], dx_all[a:b]
        r = beads.r[a:b].astype(np.float32)[:, None, None]
        r_in = r * inner[a:b].astype(np.float32)[:, None, None]
        d = np.sqrt(dy * dy + dx * dx)
        # Pixel-coverage antialiasing of the disc edges (the defocus blur smooths the rest).
        outer = np.clip(r - d + 0.5, 0.0, 1.0)
        inn = np.clip(r_in - d + 0.5, 0.0, 1.0)
        # Oblique illumination: one side of every rim a little darker.
        shade = 1.0 + (dx * cphi + dy * sphi) / np.maximum(d, np.float32(1e-3))
        val = -rim[a:b, None, None] * (outer - inn) * shade
        val += core[a:b, None, None] * inn * np.sqrt(np.clip(1.0 - (d / r_in) ** 2, 0.0, 1.0))
        if halo > 0:
            val += halo * (1.0 - outer) * np.exp(-(((d - r - 1.0) / 1.5) ** 2))
        patches[a:b] = val
    return iy0, ix0, patches


def _add_beads(contrast, rng, beads: BeadLayout, ap: dict) -> None:
    if len(beads) == 0:
        return
    half = int(math.ceil(float(beads.r.max()) + 4.0))
    iy0, ix0, patches = _bead_patches(rng, beads, ap, half)
    # Add into a padded canvas so border beads need no clipping per patch.
    h, w = contrast.shape
    p = 2 * half + 1
    canvas = np.zeros((h + 2 * p, w + 2 * p), np.float32)
    for y, x, patch in zip((iy0 + p).tolist(), (ix0 + p).tolist(), patches):
        canvas[y : y + p, x : x + p] += patch
    contrast += canvas[p : p + h, p : p + w]


def _add_debris(contrast, debris: list[Debris]) -> None:
    for item in debris:
        win = _window(item.y, item.x, item.extent + 2.0, contrast.shape)
        if win is None:
            continue
        sl, dy, dx = win
        if item.kind == "blob":
            occ = np.zeros(np.broadcast_shapes(dy.shape, dx.shape), np.float32)
            for oy, ox, a, b, ang in item.parts:
                c, s = math.cos(ang), math.sin(ang)
                py, px = dy - oy, dx - ox
                ua = (px * c + py * s) / a
                ub = (-px * s + py * c) / b
                q = np.sqrt(ua * ua + ub * ub)
                occ = np.maximum(occ, np.clip((1.0 - q) * min(a, b) + 0.5, 0.0, 1.0))
            contrast[sl] -= item.darkness * occ
        elif item.kind == "speck":
            sig = float(item.parts[0, 0])
            contrast[sl] -= item.darkness * np.exp(-0.5 * (dy * dy + dx * dx) / sig**2)
        elif item.kind == "smudge":
            sa, sb, ang = (float(v) for v in item.parts[0])
            c, s = math.cos(ang), math.sin(ang)
            ua, ub = (dx * c + dy * s) / sa, (-dx * s + dy * c) / sb
            contrast[sl] -= item.darkness * np.exp(-0.5 * (ua * ua + ub * ub))
        else:
            patch = np.zeros((sl[0].stop - sl[0].start, sl[1].stop - sl[1].start), np.float32)
            # cv2 draws at 1/16 px precision; vertices relative to the patch corner.
            pts = item.parts + np.array([item.y - sl[0].start, item.x - sl[1].start])
            pts = np.round(pts[:, ::-1] * 16).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(patch, [pts], False, 1.0, thickness=max(1, round(item.width)),
                          lineType=cv2.LINE_8, shift=4)
            contrast[sl] -= item.darkness * patch


def render_brightfield(
    rng: np.random.Generator,
    beads: BeadLayout,
    shape,
    *,
    appearance: dict | None = None,
    debris: list[Debris] | None = None,
    origin=(0, 0),
    noise: bool = True,
) -> np.ndarray:
    """Render a brightfield image of beads (and debris) at native scale.

    Transmission ``background + contrast`` (beads: dark rim annulus, brighter core, faint
    halo, oblique shading; debris: dark, no core) times a smooth illumination field,
    gaussian defocus blur, shot noise (Poisson variance, drawn in its normal
    approximation) and gaussian read noise.

    Parameters
    ----------
    rng : numpy.random.Generator
        Used for per-bead variation and noise (and the appearance if not given).
    beads : BeadLayout
        Native-pixel geometry relative to this window.
    shape : (H, W)
        Window size in native pixels.
    appearance : dict or None
        From :func:`sample_appearance`; None samples one.
    debris : list of Debris or None
    origin : (y, x)
        Window position in the frame (for the illumination field).
    noise : bool
        False gives the noise-free expected image (for tests).

    Returns
    -------
    float32 ``(H, W)`` in ``[0, 1]``.
    """
    ap = sample_appearance(rng) if appearance is None else appearance
    shape = (int(shape[0]), int(shape[1]))
    contrast = np.zeros(shape, np.float32)
    _add_beads(contrast, rng, beads, ap)
    if debris:
        _add_debris(contrast, debris)
    trans = np.maximum(np.float32(ap["background"]) + contrast, np.float32(0.02))
    sig = ap["defocus_sigma"]
    trans = cv2.GaussianBlur(trans, (0, 0), sigmaX=sig, sigmaY=sig,
                             borderType=cv2.BORDER_REFLECT)
    img = trans * illumination_field(ap, shape, origin)
    np.clip(img, 0.0, 1.0, out=img)
    if noise:
        # Shot noise with Poisson variance (mean / photons) plus read noise, drawn as one
        # normal: every pixel collects >= ~30 photons, where Poisson is practically normal,
        # and this is 4x faster than rng.poisson on a full frame.
        var = img / np.float32(ap["photons"]) + np.float32(ap["read_noise"] ** 2)
        img = img + np.sqrt(var) * rng.standard_normal(shape, dtype=np.float32)
        np.clip(img, 0.0, 1.0, out=img)
    return img.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- microscope style

# The users' real tiles, measured (issue "Real brightfield tiles"): mean RGB inside the masks
# ~(81, 75, 93) on a grey background ~(107, 108, 105); beads 7-9 px across at native scale;
# illumination varies 12 % (median) and up to 32 % across a 512-px tile; slightly blurred.
# Pixel noise (sd of neighbour differences / sqrt 2, bead-free pixels, issue 22): 0.5-2.1
# grey levels per channel, higher in darker tiles (sd x mean level ~ 95-175 grey levels^2:
# 2.0 at level 73, 1.2-1.6 at 110-145).
MICRO_BACKGROUND_RGB = np.array([107.0, 108.0, 105.0]) / 255.0
MICRO_BEAD_RGB = np.array([81.0, 75.0, 93.0]) / 255.0
MICRO_RADIUS = 4.0  # native px (7-9 px across with the sd below)
MICRO_RADIUS_SD = 0.35
MICRO_BEADS_AT_160X = 1300.0  # per 512x512 native tile
MICRO_DENSE_CLUSTER_FRACTION = 0.45
# The users' 8x4 grid on a 3840x2160 frame: column stride 475 (neighbours overlap by 37 px),
# rows at 0, 549, 1099, 1648 (they do not touch).
MICRO_GRID_COLS, MICRO_GRID_ROWS = 8, 4
MICRO_COL_STRIDE = 475
MICRO_ROW_STARTS = tuple(int(round(r * (FRAME_SHAPE[0] - NATIVE_TILE) / 3)) for r in range(4))


def micro_tile_origin(row: int, col: int) -> tuple[int, int]:
    """Top-left corner (y, x) in frame px of grid cell ``(row, col)`` of the users' grid."""
    return MICRO_ROW_STARTS[row], col * MICRO_COL_STRIDE


def sample_microscope_appearance(rng: np.random.Generator, frame_shape=FRAME_SHAPE) -> dict:
    """Per-frame imaging parameters of the microscope style (shared by the frame's tiles).

    Keys: ``background_rgb`` and ``bead_ratio`` (per-channel bead transmission relative to
    the background, from the measured colours, jittered a few %), ``blur_sigma``
    (0.8-1.3 px), ``noise_sd`` (0.6-1.6 grey levels at the background level, more where
    the image is darker: sd x level constant), ``mottle_sd`` (0.5-1.1 % of the
    background: the faint blotchy texture of the users' background, sigma ~3 px, whose
    darker spots pass for specks where the light is dim), and an illumination field for
    :func:`illumination_field`: a gentle frame-wide polynomial plus 5-9 broad lobes
    (sigma 180-420 px), so a 512-px window varies by ~12 % (median; 90th percentile 24 %).
    """
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    coef = rng.normal(0, 1, 6)
    coef[0] = 0.0
    gy, gx = np.meshgrid(np.linspace(-1, 1, 33), np.linspace(-1, 1, 33), indexing="ij")
    amp = rng.uniform(0.04, 0.12)
    coef *= amp / max(float(np.abs(_poly(coef, gy, gx)).max()), 1e-9)
    nb = int(rng.integers(5, 10))
    lobes = np.column_stack([
        rng.uniform(-0.1 * fh, 1.1 * fh, nb), rng.uniform(-0.1 * fw, 1.1 * fw, nb),
        rng.uniform(180, 420, nb), rng.choice([-1, 1], nb) * rng.uniform(0.12, 0.3, nb),
    ])
    bg = MICRO_BACKGROUND_RGB * rng.uniform(0.92, 1.05) * rng.uniform(0.98, 1.02, 3)
    # The measured colour is the mean inside shrunk masks (bead centres); with blur and
    # anti-aliased edges a solid disc needs ~1.2x that depth at its centre to match it.
    depth = (1.0 - MICRO_BEAD_RGB / MICRO_BACKGROUND_RGB) * 1.2 * rng.uniform(0.95, 1.05, 3)
    ratio = np.clip(1.0 - depth, 0.0, 1.0)
    return {
        "frame_shape": (fh, fw),
        "background_rgb": bg,
        "bead_ratio": ratio,
        "illum_coef": coef,
        "illum_amp": float(amp),
        "blotches": lobes,
        "blur_sigma": float(rng.uniform(0.8, 1.3)),
        "noise_sd": float(rng.uniform(0.6, 1.6)) / 255.0,
        # Drawn last: the frame's other parameters stay what they were before it existed.
        "mottle_sd": float(rng.uniform(0.005, 0.011)),
    }


def _occupancy(rng, beads: BeadLayout, shape) -> np.ndarray:
    """Anti-aliased bead coverage in [0, 1], each bead's own density 0.88-1.05 (clipped)."""
    h, w = int(shape[0]), int(shape[1])
    occ = np.zeros((h, w), np.float32)
    n = len(beads)
    if n == 0:
        return occ
    depth = rng.uniform(0.88, 1.05, n).astype(np.float32)
    half = int(math.ceil(float(beads.r.max()) + 1.0))
    iy0, ix0, dy, dx = _patch_offsets(beads.y, beads.x, half)
    p = 2 * half + 1
    canvas = np.zeros((h + 2 * p, w + 2 * p), np.float32)
    for a in range(0, n, 4096):
        b = min(n, a + 4096)
        d = np.sqrt(dy[a:b] * dy[a:b] + dx[a:b] * dx[a:b])
        patches = np.clip(beads.r[a:b, None, None].astype(np.float32) - d + 0.5, 0.0, 1.0)
        patches *= depth[a:b, None, None]
        for y, x, patch in zip((iy0[a:b] + p).tolist(), (ix0[a:b] + p).tolist(), patches):
            canvas[y : y + p, x : x + p] += patch
    np.clip(canvas[p : p + h, p : p + w], 0.0, 1.0, out=occ)
    return occ


def render_microscope(
    rng: np.random.Generator,
    beads: BeadLayout,
    shape,
    *,
    appearance: dict,
    debris: list[Debris] | None = None,
    origin=(0, 0),
    noise: bool = True,
) -> np.ndarray:
    """Render the microscope style: solid dark blue-purple beads on grey, RGB, native scale.

    Per channel ``c``: ``background_c * (1 - (1 - bead_ratio_c) * coverage + debris)``
    (debris is grey, unlike the beads), a slight gaussian blur, times the frame's smooth
    illumination field at ``origin`` (tiles of one frame share it), plus gaussian noise.
    Returns float32 ``(H, W, 3)`` RGB in ``[0, 1]``.
    """
    shape = (int(shape[0]), int(shape[1]))
    ap = appearance
    occ = _occupancy(rng, beads, shape)
    grey = np.zeros(shape, np.float32)
    if debris:
        _add_debris(grey, debris)
    if ap.get("mottle_sd"):
        # Blurred white noise at sigma 3 px has sd 1 / (2 sqrt(pi) 3); rescale to mottle_sd.
        mottle = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), 3.0,
                                  borderType=cv2.BORDER_REFLECT)
        grey += np.float32(ap["mottle_sd"] * 2.0 * math.sqrt(math.pi) * 3.0) * mottle
    illum = illumination_field(ap, shape, origin)
    img = np.empty(shape + (3,), np.float32)
    sig = ap["blur_sigma"]
    for c in range(3):
        t = np.float32(ap["background_rgb"][c]) * (
            1.0 - np.float32(1.0 - ap["bead_ratio"][c]) * occ + grey)
        t = cv2.GaussianBlur(t, (0, 0), sigmaX=sig, sigmaY=sig, borderType=cv2.BORDER_REFLECT)
        img[..., c] = t * illum
    if noise:
        # noise_sd holds at the frame's background level; the users' frames are noisier
        # where they are darker (sd x level ~ constant), which is where models found beads
        # in noise. Capped at 3x so a near-black pixel does not explode.
        level = np.float32(np.mean(ap["background_rgb"])) / np.maximum(
            img.mean(axis=2, keepdims=True), np.float32(1e-3))
        sd = np.float32(ap["noise_sd"]) * np.minimum(level, np.float32(3.0))
        img += sd * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, 0.0, 1.0, out=img)
    return img


def illumination_variation(field_: np.ndarray) -> float:
    """Relative variation ``(max - min) / mean`` of an illumination window (0.12 = 12 %)."""
    f = np.asarray(field_, np.float64)
    return float((f.max() - f.min()) / max(f.mean(), 1e-12))


# Faint out-of-focus smudges and specks, as in the darker, vignetted parts of the users'
# frames (issue 22): smudges 10-40 px across (gaussian sigma 3-10 px), 2-6 % darker than
# the background (beads: ~30 %); specks ~2-3 px, 3-8 %. Per 512x512 native px: smudge
# candidates kept with a probability that grows where the light is dim, specks anywhere.
SMUDGES_PER_TILE = 14.0
SPECKS_PER_TILE = 8.0
SMUDGE_SIGMA = (3.0, 10.0)
SMUDGE_DEPTH = (0.02, 0.06)
SPECK_SIGMA = (0.7, 1.4)
SPECK_DEPTH = (0.03, 0.08)


def sample_smudges(rng: np.random.Generator, shape, *, appearance: dict, origin=(0, 0),
                   beads: BeadLayout | None = None, clearance: float = 2.0) -> list[Debris]:
    """Faint, blurred smudges (dense where the light is dim) and faint specks; never beads.

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : (H, W)
        Window in native px at ``origin`` (frame coordinates) of the frame of ``appearance``
        (:func:`sample_microscope_appearance`), whose illumination decides where smudges go:
        a candidate is kept with probability ``clip((1.02 - light) / 0.15, 0.1, 1)``, where
        ``light`` is relative to the frame's median.
    beads : BeadLayout or None
        Smudges and specks keep ``clearance`` px plus their own reach (1.5 sigma) off every
        bead, so the exact labels stay exact.

    Returns
    -------
    list of Debris, kinds ``"smudge"`` and ``"speck"``; darkness is the drop in transmission.
    """
    h, w = int(shape[0]), int(shape[1])
    tiles = h * w / NATIVE_TILE**2
    n_smudge = int(rng.poisson(SMUDGES_PER_TILE * tiles))
    n_speck = int(rng.poisson(SPECKS_PER_TILE * tiles))
    if n_smudge + n_speck == 0:
        return []
    ys, xs = rng.uniform(0, h, n_smudge + n_speck), rng.uniform(0, w, n_smudge + n_speck)
    fh, fw = appearance["frame_shape"]
    grid = np.linspace(0.0, 1.0, 17)
    typical = float(np.median(illumination_at(appearance, grid[:, None] * fh,
                                              grid[None, :] * fw)))
    light = illumination_at(appearance, ys + origin[0], xs + origin[1]) / typical
    keep = rng.random(ys.size) < np.clip((1.02 - light) / 0.15, 0.1, 1.0)
    keep[n_smudge:] = True
    sig_a = np.concatenate([rng.uniform(*SMUDGE_SIGMA, n_smudge), rng.uniform(*SPECK_SIGMA,
                                                                             n_speck)])
    sig_b = sig_a * np.concatenate([rng.uniform(0.5, 1.0, n_smudge), np.ones(n_speck)])
    angle = rng.uniform(0, np.pi, ys.size)
    depth = np.concatenate([rng.uniform(*SMUDGE_DEPTH, n_smudge),
                            rng.uniform(*SPECK_DEPTH, n_speck)])
    if beads is not None and len(beads):
        for i in np.flatnonzero(keep):
            d2 = (beads.y - ys[i]) ** 2 + (beads.x - xs[i]) ** 2
            keep[i] = not np.any(d2 < (beads.r + 1.5 * sig_a[i] + clearance) ** 2)
    out = []
    for i in np.flatnonzero(keep):
        kind = "smudge" if i < n_smudge else "speck"
        parts = (np.array([[sig_a[i], sig_b[i], angle[i]]]) if kind == "smudge"
                 else np.array([[sig_a[i]]]))
        out.append(Debris(kind, float(ys[i]), float(xs[i]), float(depth[i]),
                          float(3.0 * sig_a[i] + 1.0), parts))
    return out


def _micro_scene(rng, ap: dict, window_shape, origin, n_beads: int, *, radius: float,
                 beads_at_160x: float) -> tuple[np.ndarray, BeadLayout, int]:
    """Geometry + native render of one window of a frame (microscope style)."""
    frac = default_cluster_fraction(n_beads, window_shape, dense=beads_at_160x,
                                    top=MICRO_DENSE_CLUSTER_FRACTION)
    beads = sample_beads(rng, window_shape, n_beads, radius=radius,
                         radius_sd=MICRO_RADIUS_SD * radius / MICRO_RADIUS,
                         cluster_fraction=frac)
    n_debris = int(rng.poisson(0.02 * len(beads) + 2.0 * window_shape[0] * window_shape[1]
                               / NATIVE_TILE**2))
    debris = sample_debris(rng, window_shape, n_debris, beads=beads, radius=radius)
    for d in debris:
        d.darkness *= 0.5  # faint grey particles, less dark than the beads
    debris += sample_smudges(rng, window_shape, appearance=ap, origin=origin, beads=beads)
    img = render_microscope(rng, beads, window_shape, appearance=ap, debris=debris,
                            origin=origin)
    return img, beads, len(debris)


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
    local, labels = _relabel_present(local, labels)
    return mask, labels, local


# --------------------------------------------------------------------------- masks


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
    iy0, ix0, dy, dx = _patch_offsets(beads.y * scale, beads.x * scale, half)
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


def _relabel_present(beads: BeadLayout, labels: np.ndarray):
    """Drop beads that cover no output pixel so labels are 1..N and match the geometry."""
    present = np.bincount(labels.ravel(), minlength=len(beads) + 1) > 0
    present[0] = False
    if present[1:].all():
        return beads, labels
    lut = np.zeros(len(beads) + 1, np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1)
    return beads.subset(present[1:]), lut[labels]


# --------------------------------------------------------------------------- plan


def expected_beads(dilution: float, beads_at_160x: float = 270.0) -> float:
    """Requested beads per 512x512 native tile: ``max(3, beads_at_160x * 160 / dilution)``."""
    return max(float(MIN_BEADS), beads_at_160x * 160.0 / float(dilution))


def allocate_tiles(n: int, ratio: float = ALLOCATION_RATIO) -> list[int]:
    """Tiles per dilution (order of :data:`DILUTIONS`), geometric weights ``ratio**k``.

    Largest-remainder rounding, so the counts sum to ``n`` and favour the dense end.
    """
    w = ratio ** np.arange(len(DILUTIONS))
    x = n * w / w.sum()
    a = np.floor(x).astype(int)
    rest = n - int(a.sum())
    a[np.argsort(-(x - a), kind="stable")[:rest]] += 1
    return [int(v) for v in a]


def _stamp(seconds: int) -> str:
    seconds %= 24 * 3600
    return f"{seconds // 3600:02d}-{seconds % 3600 // 60:02d}-{seconds % 60:02d}"


def plan_tiles(rng: np.random.Generator, n: int, beads_at_160x: float = 270.0) -> list[dict]:
    """Which tiles to make: dilution, frame, grid cell, time stamp, stem, requested beads.

    Tiles are grouped into frames (2-4 grid cells of one 3840x2160 frame) with plausible
    increasing acquisition times. Returns one dict per tile, dense dilutions first.
    """
    tiles = []
    t = 50 * 60 + int(rng.integers(0, 60))
    frame_id = 0
    for dil, m in zip(DILUTIONS, allocate_tiles(n)):
        left, number = m, 0
        while left > 0:
            k = min(left, int(rng.integers(2, 5)))
            number += 1
            t += int(rng.integers(20, 90))
            cells = rng.choice(GRID_ROWS * GRID_COLS, size=k, replace=False)
            for cell in sorted(int(c) for c in cells):
                r, c = divmod(cell, GRID_COLS)
                stem = f"{dil}x_{DATE}_{_stamp(t)}_{number:03d}_grid_r{r}_c{c}"
                tiles.append({
                    "stem": stem, "dilution": dil, "frame": frame_id, "row": r, "col": c,
                    "requested": expected_beads(dil, beads_at_160x),
                })
            frame_id += 1
            left -= k
        t += int(rng.integers(120, 300))
    return tiles


def plan_micro_windows(rng: np.random.Generator, n: int, beads_at_160x: float) -> list[dict]:
    """Which tiles to cut, microscope style: runs of neighbouring grid cells of frame rows.

    Like the users' data (73 tiles from 14 frame rows of 11 frames), each frame gives one or
    two rows and each row a run of 2-7 neighbouring columns of the 8x4 grid, so neighbours
    share their 37-px overlap. Returns one dict per row window: ``dilution``, ``frame``,
    ``prefix`` (the frame's stem), ``row``, ``cols``, ``requested`` (beads per 512x512).
    """
    windows = []
    t = 50 * 60 + int(rng.integers(0, 60))
    frame_id = 0
    for dil, m in zip(DILUTIONS, allocate_tiles(n)):
        left, number = m, 0
        while left > 0:
            number += 1
            t += int(rng.integers(20, 90))
            prefix = f"{dil}x_{DATE}_{_stamp(t)}_{number:03d}"
            n_rows = 2 if left >= 6 and rng.random() < 0.3 else 1
            rows = sorted(int(r) for r in rng.choice(MICRO_GRID_ROWS, n_rows, replace=False))
            for row in rows:
                k = min(left, int(rng.integers(2, 8)))
                if left - k == 1:
                    k = left if k < 7 else k - 1
                c0 = int(rng.integers(0, MICRO_GRID_COLS - k + 1))
                windows.append({"dilution": dil, "frame": frame_id, "prefix": prefix,
                                "row": row, "cols": list(range(c0, c0 + k)),
                                "requested": expected_beads(dil, beads_at_160x)})
                left -= k
                if left <= 0:
                    break
            frame_id += 1
        t += int(rng.integers(120, 300))
    return windows


def large_dilutions(n: int) -> list[int]:
    """Dilutions for ``n`` full frames: 640x/2560x for two, spread over the series for more."""
    if n <= 0:
        return []
    idx = np.linspace(2, 4, n) if n <= 3 else np.linspace(0, len(DILUTIONS) - 1, n)
    return [DILUTIONS[int(round(i))] for i in idx]


# --------------------------------------------------------------------------- scenes


def make_scene(
    rng: np.random.Generator,
    native_shape,
    out_shape,
    n_beads: int,
    *,
    appearance: dict,
    origin=(0, 0),
    radius_native: float = 9.4,
    debris_fraction: float | None = None,
) -> dict:
    """One image with its ground truth: geometry -> native render -> output-scale masks.

    Returns a dict with ``image`` (float32 ``out_shape`` in [0, 1]), ``mask`` (uint8 {0,1}),
    ``labels`` (int32 1..N), ``beads`` (BeadLayout, native px), ``n_debris``,
    ``n_touching``.
    """
    native_shape = (int(native_shape[0]), int(native_shape[1]))
    out_shape = (int(out_shape[0]), int(out_shape[1]))
    scale = out_shape[0] / native_shape[0]
    beads = sample_beads(rng, native_shape, n_beads, radius=radius_native,
                         radius_sd=0.5 * radius_native / 9.4)
    frac = rng.uniform(0.05, 0.25) if debris_fraction is None else debris_fraction
    n_debris = int(rng.poisson(frac * len(beads) + 3.0))
    debris = sample_debris(rng, native_shape, n_debris, beads=beads, radius=radius_native)
    img = render_brightfield(rng, beads, native_shape, appearance=appearance, debris=debris,
                             origin=origin)
    if out_shape != native_shape:
        img = np.clip(mio.resize_image(img, out_shape), 0.0, 1.0)
    mask, labels = render_masks(beads, out_shape, scale)
    beads, labels = _relabel_present(beads, labels)
    return {
        "image": img, "mask": mask, "labels": labels, "beads": beads,
        "n_debris": len(debris), "n_touching": touching_count(labels),
    }


def _quantize(img: np.ndarray, bits: int) -> np.ndarray:
    top = 65535 if bits == 16 else 255
    dtype = np.uint16 if bits == 16 else np.uint8
    return np.round(np.clip(img, 0.0, 1.0) * top).astype(dtype)


# --------------------------------------------------------------------------- output folder


class GenerationError(RuntimeError):
    """Writing the dataset failed part-way (an OSError); already logged, file named."""


def _dataset_paths(out: Path) -> list[Path]:
    return [out / "counts.csv", out / "dataset.json", out / "large" / "counts.csv",
            out / "large" / SAMPLE_SHEET] + [
        out / sub for sub in ("images", "masks", "labels", "large/images", "large/masks",
                              "large/labels")
    ]


def prepare_out_dir(out: Path, overwrite: bool = False) -> None:
    """Make sure writing a dataset into ``out`` cannot destroy anything.

    A missing or empty folder is fine. A non-empty one is refused unless ``overwrite``; then
    only the files listed in a previous ``dataset.json`` of this generator are deleted, and
    the call still refuses if any other file sits where the dataset goes.

    Raises
    ------
    FileExistsError
        One line naming the folder or the file in the way.
    """
    out = Path(out)
    try:
        cli.check_output_dir(out, overwrite=overwrite, log_name=LOG_NAME)
    except cli.OutputDirError as exc:
        raise FileExistsError(str(exc)) from None
    if not out.exists() or not any(out.iterdir()):
        return
    root = out.resolve()
    ours: set[Path] = set()
    manifest = out / "dataset.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and meta.get("generator") == GENERATOR:
            for rel in list(meta.get("files", [])) + ["dataset.json"]:
                p = (out / rel).resolve()
                if root in p.parents and p.is_file():
                    ours.add(p)
    # Check everything before deleting anything, so a refusal leaves the folder as it was.
    for p in _dataset_paths(out):
        if p.is_file() and p.resolve() not in ours:
            raise FileExistsError(f"{p}: not written by {GENERATOR}; refusing to overwrite it")
        if p.is_dir():
            other = next((q for q in sorted(p.iterdir())
                          if q.is_file() and q.resolve() not in ours), None)
            if other is not None:
                raise FileExistsError(
                    f"{other}: not written by {GENERATOR}; refusing to mix it into a new "
                    "dataset (move it or choose an empty folder)"
                )
    for p in sorted(ours):
        p.unlink()


def _write_counts(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COUNT_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COUNT_FIELDS})


def _progress(it, **kw):
    from tqdm import tqdm

    return tqdm(it, disable=None, leave=False, **kw)


# --------------------------------------------------------------------------- main API


def generate_dataset(
    out_dir,
    *,
    n: int = 73,
    size: int | None = None,
    seed: int = 0,
    large: int = 0,
    large_size=(3840, 2160),
    radius: float | None = None,
    beads_at_160x: float | None = None,
    tiff_every: int = 5,
    overwrite: bool = False,
    log_file: bool = True,
    style: str = "microscope",
    label_noise: bool = False,
    blank_frames: int = 0,
) -> dict:
    """Write a synthetic dataset in the users' layout and return its summary.

    Parameters
    ----------
    out_dir : path
        Output folder; must be missing or empty unless ``overwrite`` (see
        :func:`prepare_out_dir`: only a previous dataset of this generator is replaced).
    n : int
        Number of tiles (>= 1), spread over the dilution series (:func:`allocate_tiles`).
    size : int or None
        Tile edge in pixels; a tile always covers 512x512 native px, so
        ``pixel_scale = size / 512``. None: 512 (microscope) or 256 (rings).
    seed : int
        Everything is a function of the seed; tiles and large frames use separate
        streams, so adding ``large`` does not change the tiles.
    large : int
        Number of full frames (native scale, 8-bit PNG) to write under ``large/``.
    blank_frames : int
        Number of blank (0-bead) full frames to add under ``large/`` (:func:`blank_frame`;
        ``blank_...`` stems, dilution ``blank`` in ``counts.csv``, concentration 0 and
        ``blank`` true in ``large/samples.csv``), for an assay's limit of blank.
    large_size : (W, H)
        Size of those frames.
    radius : float or None
        Mean bead radius in px of a 256-px tile (0.5 px per native px); native radius =
        ``radius / 0.5``. None: 2.0 (microscope: 4 native px, beads 7-9 px across) or 4.7
        (rings).
    beads_at_160x : float or None
        Expected beads per 512x512 native tile at 160x; other dilutions scale as
        ``160 / dilution``. None: 1300 (microscope) or 270 (rings).
    tiff_every : int
        Every ``tiff_every``-th tile is a 16-bit TIFF (0 = none).
    log_file : bool
        Also log to ``out_dir/make_synthetic_dataset.log``.
    style : {"microscope", "rings"}
        ``microscope``: the users' real tiles (solid dark blue-purple beads on grey, RGB,
        native 512-px tiles cut from frame rows on the 8x4 grid with 37-px column overlaps,
        uneven light). ``rings``: the project's first style (grey ring beads, 256-px tiles).
    label_noise : bool
        Write training masks degraded like the users' (:func:`noisy_mask`: shrunk, touching
        beads merged, faint beads dropped, some tiles offset); ``labels/``, ``counts.csv``
        and the large frames stay exact.

    Returns
    -------
    dict
        The content of ``dataset.json``.

    Raises
    ------
    ValueError
        Bad parameters. FileExistsError: see :func:`prepare_out_dir`. GenerationError: a
        write failed part-way (logged, also to the dataset's log file).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    micro = style == "microscope"
    size = int(size if size is not None else (NATIVE_TILE if micro else 256))
    radius = float(radius if radius is not None else
                   (MICRO_RADIUS * REFERENCE_SCALE if micro else 4.7))
    if beads_at_160x is None:
        beads_at_160x = MICRO_BEADS_AT_160X if micro else 270.0
    n, large, blank_frames = int(n), int(large), int(blank_frames)
    lw, lh = (int(v) for v in large_size)
    if n < 1 or size < 8 or large < 0 or blank_frames < 0 or lw < 16 or lh < 16:
        raise ValueError(
            f"need n >= 1, size >= 8, large >= 0, blank_frames >= 0, large_size >= 16x16; "
            f"got n={n}, size={size}, large={large}, blank_frames={blank_frames}, "
            f"large_size={lw}x{lh}"
        )
    if not (radius > 0 and beads_at_160x > 0):
        raise ValueError(f"radius and beads_at_160x must be > 0, got {radius}, {beads_at_160x}")
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)  # refuses a folder another live run holds
    out.mkdir(parents=True, exist_ok=True)
    try:
        notes = cli.lock_output_dir(out, GENERATOR)
    except cli.OutputDirError as exc:
        raise FileExistsError(str(exc)) from None
    handler = runtime.add_log_handler(out / LOG_NAME, mode="w") if log_file else None
    for note in notes:
        log.warning("%s", note)
    try:
        return _generate(out, n=n, size=size, seed=int(seed), large=large, large_wh=(lw, lh),
                         radius=float(radius), beads_at_160x=float(beads_at_160x),
                         tiff_every=int(tiff_every), log_file=log_file, style=style,
                         label_noise=bool(label_noise), blank_frames=blank_frames)
    except OSError as exc:
        log.error("%s: writing the dataset failed: %s", out, exc)  # into its log file too
        raise GenerationError(str(exc)) from exc
    finally:
        cli.unlock_output_dir(out)
        runtime.remove_log_handlers([handler])


def _write_truth(out: Path, sub: str, stem: str, name: str, image: np.ndarray, bits: int,
                 mask: np.ndarray, labels: np.ndarray) -> list[str]:
    """Image, exact mask and instance labels of one tile or frame; returns relative paths."""
    base = out / sub if sub else out
    mio.write_image(base / "images" / name, _quantize(image, bits))
    mio.write_mask(base / "masks" / f"{stem}.png", mask)
    mio.write_labels(base / "labels" / f"{stem}.tif", labels)
    pre = f"{sub}/" if sub else ""
    return [f"{pre}images/{name}", f"{pre}masks/{stem}.png", f"{pre}labels/{stem}.tif"]


def _count_row(name, stem, dilution, n_beads, requested, labels, mask, n_debris) -> dict:
    return {
        "file": name, "stem": stem, "dilution": dilution, "n_beads": int(n_beads),
        "requested_beads": round(float(requested), 6), "n_touching": touching_count(labels),
        "positive_ratio": round(float(mask.mean()), 6), "n_debris": int(n_debris),
    }


def _inside_areas(beads: BeadLayout, labels: np.ndarray, native: float) -> np.ndarray:
    """Mask areas of the beads lying wholly inside the tile (for the median bead area)."""
    inside = ((beads.y - beads.r >= 0) & (beads.x - beads.r >= 0)
              & (beads.y + beads.r <= native) & (beads.x + beads.r <= native))
    area = np.bincount(labels.ravel(), minlength=len(beads) + 1)[1:]
    return area[inside]


def noisy_mask(labels: np.ndarray, image: np.ndarray, rng: np.random.Generator,
               scale: float) -> tuple[np.ndarray, dict]:
    """A mask degraded like the users' blob-detector masks, from exact ``labels``.

    ``label_quality.degrade_mask`` with the users' measured faults converted to this tile's
    pixels (``scale`` = tile px per native px): beads shrunk by 1-2 native px, touching
    beads merged, ~5 % of the faintest beads dropped, and 12 % of the tiles offset by
    2-4 native px. The instance labels stay exact.
    """
    import label_quality

    lo = max(1, int(round(2 * scale)))
    shrink = (max(1, int(round(1 * scale))), max(1, int(round(2 * scale))))
    return label_quality.degrade_mask(labels, rng, image=image, shrink_px=shrink,
                                      offset_px=(lo, max(lo, int(round(4 * scale)))))


def _label_noise_record(stem: str, info: dict) -> dict:
    return {"stem": stem, "dy": int(info["dy"]), "dx": int(info["dx"]),
            "n_dropped": int(info["n_dropped"]), "n_merged": int(info["n_merged"]),
            "shrink_px": int(info["shrink_px"])}


def _micro_tiles(out: Path, *, n, size, seed, radius_native, beads_at_160x, tiff_every,
                 label_noise=False, noise_log=None):
    """Microscope style: render each planned frame row window once, cut its grid tiles."""
    windows = plan_micro_windows(np.random.default_rng([seed, 0]), n, beads_at_160x)
    frames: dict[int, dict] = {}
    rows, areas, files = [], [], []
    i = 0
    for wi, win in enumerate(_progress(windows, desc="frame rows", unit="row")):
        fid = win["frame"]
        if fid not in frames:
            frames[fid] = sample_microscope_appearance(np.random.default_rng([seed, 1, fid]))
        rng = np.random.default_rng([seed, 2, wi])
        y0, x0 = micro_tile_origin(win["row"], win["cols"][0])
        shape = (NATIVE_TILE, (len(win["cols"]) - 1) * MICRO_COL_STRIDE + NATIVE_TILE)
        want = win["requested"] * shape[0] * shape[1] / NATIVE_TILE**2
        n_beads = max(MIN_BEADS, int(rng.poisson(want)))
        img, beads, n_debris = _micro_scene(rng, frames[fid], shape, (y0, x0), n_beads,
                                            radius=radius_native, beads_at_160x=beads_at_160x)
        for col in win["cols"]:
            tx = (col - win["cols"][0]) * MICRO_COL_STRIDE
            tile = img[:, tx : tx + NATIVE_TILE]
            if size != NATIVE_TILE:
                tile = np.clip(mio.resize_image(tile, (size, size)), 0.0, 1.0)
            mask, labels, local = crop_truth(beads, 0.0, float(tx), NATIVE_TILE, size)
            stem = f"{win['prefix']}_grid_r{win['row']}_c{col}"
            exact = mask
            if label_noise:
                mask, info = noisy_mask(labels, tile, np.random.default_rng([seed, 4, i]),
                                        size / NATIVE_TILE)
                noise_log.append(_label_noise_record(stem, info))
            tiff = tiff_every > 0 and i % tiff_every == tiff_every // 2
            name = stem + (".tif" if tiff else ".png")
            files += _write_truth(out, "", stem, name, tile, 16 if tiff else 8, mask, labels)
            areas.append(_inside_areas(local, labels, NATIVE_TILE))
            share = n_debris * NATIVE_TILE / shape[1]
            rows.append(_count_row(name, stem, win["dilution"], len(local), win["requested"],
                                   labels, exact, round(share)))
            i += 1
    return rows, areas, files


def _ring_tiles(out: Path, rows: list, areas: list, *, n, size, seed, radius_native,
                beads_at_160x, tiff_every, label_noise=False, noise_log=None) -> list[str]:
    """Rings style: each tile rendered on its own 512x512 native window, then downscaled."""
    tiles = plan_tiles(np.random.default_rng([seed, 0]), n, beads_at_160x)
    frames: dict[int, dict] = {}
    files: list[str] = []
    for i, tile in enumerate(_progress(tiles, desc="tiles", unit="tile")):
        fid = tile["frame"]
        if fid not in frames:
            frames[fid] = sample_appearance(np.random.default_rng([seed, 1, fid]))
        rng = np.random.default_rng([seed, 2, i])
        n_beads = max(MIN_BEADS, int(rng.poisson(tile["requested"])))
        origin = (tile["row"] * NATIVE_TILE, tile["col"] * NATIVE_TILE)
        scene = make_scene(rng, (NATIVE_TILE, NATIVE_TILE), (size, size), n_beads,
                           appearance=frames[fid], origin=origin, radius_native=radius_native)
        tiff = tiff_every > 0 and i % tiff_every == tiff_every // 2
        name = tile["stem"] + (".tif" if tiff else ".png")
        mask = scene["mask"]
        if label_noise:
            mask, info = noisy_mask(scene["labels"], scene["image"],
                                    np.random.default_rng([seed, 4, i]), size / NATIVE_TILE)
            noise_log.append(_label_noise_record(tile["stem"], info))
        files += _write_truth(out, "", tile["stem"], name, scene["image"], 16 if tiff else 8,
                              mask, scene["labels"])
        areas.append(_inside_areas(scene["beads"], scene["labels"], NATIVE_TILE))
        rows.append(_count_row(name, tile["stem"], tile["dilution"], len(scene["beads"]),
                               tile["requested"], scene["labels"], scene["mask"],
                               scene["n_debris"]))
    return files


def _micro_frame(rng, frame_shape, dilution, radius_native, beads_at_160x):
    """One full microscope-style frame; ``dilution`` None renders a blank (no beads)."""
    ap = sample_microscope_appearance(rng, frame_shape)
    if dilution is None:
        requested, n_beads = 0.0, 0
    else:
        requested = expected_beads(dilution, beads_at_160x) * frame_shape[0] \
            * frame_shape[1] / NATIVE_TILE**2
        n_beads = max(MIN_BEADS, int(rng.poisson(requested)))
    img, beads, n_debris = _micro_scene(rng, ap, frame_shape, (0, 0), n_beads,
                                        radius=radius_native, beads_at_160x=beads_at_160x)
    mask, labels = render_masks(beads, frame_shape, 1.0)
    beads, labels = _relabel_present(beads, labels)
    return {"image": img, "mask": mask, "labels": labels, "beads": beads,
            "n_debris": n_debris, "requested": requested}


def blank_frame(seed: int, index: int = 0, frame_shape=FRAME_SHAPE, *,
                radius_native: float = MICRO_RADIUS, style: str = "microscope") -> dict:
    """A blank (0-bead) full frame at native scale: debris, smudges, specks, no bead.

    The same function writes ``--blank_frames`` and feeds ``benchmarks/bench_blanks.py``;
    frame ``index`` of ``seed`` is always the same image. Returns the scene dict of a large
    frame: ``image`` float32 ``(H, W, 3)`` (microscope) or ``(H, W)`` (rings) in [0, 1],
    all-zero ``mask`` and ``labels``, ``beads`` (empty), ``n_debris`` (debris, smudges and
    specks), ``requested`` 0.
    """
    rng = np.random.default_rng([int(seed), 5, int(index)])
    shape = (int(frame_shape[0]), int(frame_shape[1]))
    if style == "microscope":
        return _micro_frame(rng, shape, None, radius_native, MICRO_BEADS_AT_160X)
    scene = make_scene(rng, shape, shape, 0, appearance=sample_appearance(rng, shape),
                       radius_native=radius_native)
    scene["requested"] = 0.0
    return scene


def _write_tiles(out: Path, *, style, n, size, seed, radius_native, beads_at_160x,
                 tiff_every, label_noise) -> dict:
    """Every training tile of ``style``: ``rows`` (counts.csv), ``areas`` (bead areas of
    wholly inside beads), ``files`` written, ``noise_log`` (``--label_noise`` per tile)."""
    noise_log: list[dict] = []
    kw = dict(n=n, size=size, seed=seed, radius_native=radius_native,
              beads_at_160x=beads_at_160x, tiff_every=tiff_every, label_noise=label_noise,
              noise_log=noise_log)
    if style == "microscope":
        rows, areas, files = _micro_tiles(out, **kw)
    else:
        rows, areas = [], []
        files = _ring_tiles(out, rows, areas, **kw)
    return {"rows": rows, "areas": areas, "files": files, "noise_log": noise_log}


def _write_large_frames(out: Path, *, style, large, large_wh, seed, radius_native,
                        beads_at_160x, blank_frames=0) -> tuple[list[dict], list[str]]:
    """``large`` full frames at native scale under ``large/``, one dilution each, then
    ``blank_frames`` blank ones (dilution ``blank``); returns their counts.csv rows and the
    files written (with ``large/samples.csv``, the assay's sample sheet)."""
    rows: list[dict] = []
    files: list[str] = []
    t = 3600 + 2 * 60 + 3
    lw, lh = large_wh
    frame_shape = (lh, lw)
    for j, dil in enumerate(_progress(large_dilutions(large), desc="frames", unit="frame")):
        rng = np.random.default_rng([seed, 3, j])
        if style == "microscope":
            scene = _micro_frame(rng, frame_shape, dil, radius_native, beads_at_160x)
        else:
            ap = sample_appearance(rng, frame_shape)
            requested = expected_beads(dil, beads_at_160x) * lh * lw / NATIVE_TILE**2
            n_beads = max(MIN_BEADS, int(rng.poisson(requested)))
            scene = make_scene(rng, frame_shape, frame_shape, n_beads, appearance=ap,
                               radius_native=radius_native)
            scene["requested"] = requested
        stem = f"{dil}x_{DATE}_{_stamp(t)}_{101 + j:03d}"
        t += int(rng.integers(60, 240))
        files += _write_truth(out, "large", stem, f"{stem}.png", scene["image"], 8,
                              scene["mask"], scene["labels"])
        rows.append(_count_row(f"{stem}.png", stem, dil, len(scene["beads"]),
                               scene["requested"], scene["labels"], scene["mask"],
                               scene["n_debris"]))
        log.info("large frame %s: %d beads (%dx%d)", stem, len(scene["beads"]), lw, lh)
    for j in range(int(blank_frames)):
        scene = blank_frame(seed, j, frame_shape, radius_native=radius_native, style=style)
        stem = f"blank_{DATE}_{_stamp(t)}_{201 + j:03d}"
        t += 120
        files += _write_truth(out, "large", stem, f"{stem}.png", scene["image"], 8,
                              scene["mask"], scene["labels"])
        rows.append(_count_row(f"{stem}.png", stem, "blank", 0, 0.0, scene["labels"],
                               scene["mask"], scene["n_debris"]))
        log.info("blank frame %s: %d debris, smudges and specks (%dx%d)", stem,
                 scene["n_debris"], lw, lh)
    _write_counts(out / "large" / "counts.csv", rows)
    _write_sample_sheet(out / "large" / SAMPLE_SHEET, rows)
    return rows, files + ["large/counts.csv", f"large/{SAMPLE_SHEET}"]


def _write_sample_sheet(path: Path, rows: list[dict]) -> None:
    """The large frames' concentrations for ``quantify_assay.py --samples``: 1/dilution,
    and 0 with ``blank`` true for blank frames (their LoB comes from these)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "concentration", "unit", "blank"])
        for r in rows:
            blank = r["dilution"] == "blank"
            w.writerow([r["file"], 0 if blank else repr(1.0 / r["dilution"]),
                        "" if blank else "1/dilution", "true" if blank else "false"])


def _grid_layout(style: str) -> dict:
    """The frame grid the tiles are cut on (``dataset.json["grid"]``)."""
    if style == "microscope":
        return {"cols": MICRO_GRID_COLS, "rows": MICRO_GRID_ROWS,
                "col_stride_px": MICRO_COL_STRIDE, "row_starts_px": list(MICRO_ROW_STARTS),
                "column_overlap_px": NATIVE_TILE - MICRO_COL_STRIDE}
    return {"cols": GRID_COLS, "rows": GRID_ROWS, "col_stride_px": NATIVE_TILE,
            "row_starts_px": [r * NATIVE_TILE for r in range(GRID_ROWS)],
            "column_overlap_px": 0}


def _dataset_summary(*, style, seed, n, size, pixel_scale, radius_native, beads_at_160x,
                     tiff_every, tiles: dict, large: int, large_wh, large_rows: list[dict],
                     label_noise: bool, timings: dict, files: list[str]) -> dict:
    """The content of ``dataset.json``: parameters, summary numbers, versions, files."""
    rows, noise_log = tiles["rows"], tiles["noise_log"]
    all_areas = np.concatenate(tiles["areas"]) if tiles["areas"] else np.zeros(0)
    return {
        "generator": GENERATOR,
        "style": style,
        # Training masks degraded like the users' (labels/ and large/ stay exact).
        "label_noise": ({"enabled": True, "tiles": noise_log,
                         "n_offset": sum(1 for r in noise_log if r["dy"] or r["dx"])}
                        if label_noise else {"enabled": False}),
        "seed": seed,
        "n": n,
        "size": size,
        "pixel_scale": pixel_scale,
        "native_tile_px": NATIVE_TILE,
        "frame_size": list(FRAME_SHAPE[::-1]),
        "grid": _grid_layout(style),
        "bead_radius_px": radius_native * pixel_scale,
        "bead_radius_native_px": radius_native,
        "median_bead_area_px": float(np.median(all_areas)) if all_areas.size else None,
        "beads_at_160x": beads_at_160x,
        "dilutions": list(DILUTIONS),
        "tiles_per_dilution": {str(d): sum(1 for r in rows if r["dilution"] == d)
                               for d in DILUTIONS},
        "requested_mean_beads": float(np.mean([r["requested_beads"] for r in rows])),
        "mean_beads": float(np.mean([r["n_beads"] for r in rows])),
        "min_beads": int(min(r["n_beads"] for r in rows)),
        "max_beads": int(max(r["n_beads"] for r in rows)),
        "mean_positive_ratio": float(np.mean([r["positive_ratio"] for r in rows])),
        "touching_fraction": float(sum(r["n_touching"] for r in rows)
                                   / max(1, sum(r["n_beads"] for r in rows))),
        "n_tiff16": sum(1 for r in rows if r["file"].endswith(".tif")),
        "tiff_every": tiff_every,
        "large": {
            "n": large, "n_blank": sum(1 for r in large_rows if r["dilution"] == "blank"),
            "size": list(large_wh), "pixel_scale": 1.0,
            "dilutions": [r["dilution"] for r in large_rows],
            "n_beads": [r["n_beads"] for r in large_rows],
        },
        # Wall clock, and CPU time of this process (meaningful on a shared machine).
        "timings_s": timings,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "opencv": cv2.__version__},
        "files": sorted(files + ["dataset.json"]),
    }


def _generate(out: Path, *, n, size, seed, large, large_wh, radius, beads_at_160x, tiff_every,
              log_file, style="microscope", label_noise=False, blank_frames=0) -> dict:
    t_start, c_start = time.perf_counter(), time.process_time()
    pixel_scale = size / NATIVE_TILE
    radius_native = radius / REFERENCE_SCALE
    files: list[str] = [LOG_NAME] if log_file else []
    log.info("writing %d tiles of %dx%d px (pixel_scale %.4g, bead radius %.3g px) to %s",
             n, size, size, pixel_scale, radius_native * pixel_scale, out)
    if radius_native * pixel_scale < 0.75:
        # A disc of radius < 1/sqrt(2) px can miss every pixel centre and vanish.
        log.warning("beads are %.2f px in radius at --size %d: some cover no pixel and are "
                    "dropped from masks and counts; use a larger --size",
                    radius_native * pixel_scale, size)

    t0 = time.perf_counter()
    tiles = _write_tiles(out, style=style, n=n, size=size, seed=seed,
                         radius_native=radius_native, beads_at_160x=beads_at_160x,
                         tiff_every=tiff_every, label_noise=label_noise)
    t_tiles = time.perf_counter() - t0
    _write_counts(out / "counts.csv", tiles["rows"])
    files += tiles["files"] + ["counts.csv"]

    large_rows: list[dict] = []
    t0 = time.perf_counter()
    if large or blank_frames:
        large_rows, large_files = _write_large_frames(
            out, style=style, large=large, large_wh=large_wh, seed=seed,
            radius_native=radius_native, beads_at_160x=beads_at_160x,
            blank_frames=blank_frames)
        files += large_files
    t_large = time.perf_counter() - t0

    timings = {"tiles": round(t_tiles, 3), "large": round(t_large, 3),
               "total": round(time.perf_counter() - t_start, 3),
               "cpu_total": round(time.process_time() - c_start, 3)}
    summary = _dataset_summary(
        style=style, seed=seed, n=n, size=size, pixel_scale=pixel_scale,
        radius_native=radius_native, beads_at_160x=beads_at_160x, tiff_every=tiff_every,
        tiles=tiles, large=large, large_wh=large_wh, large_rows=large_rows,
        label_noise=label_noise, timings=timings, files=files)
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "%d tiles in %.2f s: requested mean %.1f beads/tile, realised %.1f (%d-%d), "
        "positive ratio %.2f %%, median bead area %.1f px, %d 16-bit TIFFs",
        n, t_tiles, summary["requested_mean_beads"], summary["mean_beads"],
        summary["min_beads"], summary["max_beads"], 100 * summary["mean_positive_ratio"],
        summary["median_bead_area_px"] or 0.0, summary["n_tiff16"],
    )
    if large or blank_frames:
        log.info("%d large frames (%d blank) in %.2f s (%.2f s/frame)", large + blank_frames,
                 blank_frames, t_large, t_large / (large + blank_frames))
    return summary


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write a synthetic brightfield microbead dataset (images, masks, labels, "
        "counts) in the users' layout.",
        formatter_class=cli.HelpFormatter,
    )
    cli.add_option(p, "output_dir", "--out", "--out_dir", "--out-dir", required=True,
                   help="output folder (missing or empty; --out is the old spelling)")
    p.add_argument("--n", type=int, default=73, help="number of tiles")
    p.add_argument("--style", choices=STYLES, default="microscope",
                   help="microscope: the users' real tiles (solid dark blue-purple beads, RGB, "
                        "native 512-px grid tiles with 37-px column overlaps, uneven light); "
                        "rings: the first synthetic style (ring beads, 256-px tiles)")
    p.add_argument("--size", type=int, default=None,
                   help="tile edge in px, covering 512 native px (default: 512 microscope, "
                        "256 rings)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--large", type=int, default=0, help="also write N full frames")
    p.add_argument("--blank_frames", "--blank-frames", type=int, default=0,
                   help="also write N blank (0-bead) full frames with debris (microscope "
                        "style: and faint smudges, specks, mottle) as large/blank_*, "
                        "concentration 0 in large/samples.csv")
    p.add_argument("--large_size", "--large-size", type=int, nargs=2, default=[3840, 2160],
                   metavar=("W", "H"), help="size of the full frames")
    p.add_argument("--radius", type=float, default=None,
                   help="mean bead radius in px of a 256-px tile, native radius = 2x "
                        "(default: 2.0 microscope, 4.7 rings)")
    p.add_argument("--beads_at_160x", "--beads-at-160x", type=float, default=None,
                   help="expected beads per 512x512 native px at 160x dilution (default: "
                        "1300 microscope, 270 rings)")
    p.add_argument("--tiff_every", "--tiff-every", type=int, default=5,
                   help="every N-th tile is a 16-bit TIFF (0: none)")
    p.add_argument("--label_noise", "--label-noise", action="store_true",
                   help="degrade the training masks like the users' blob-detector masks "
                        "(shrunk, merged, some dropped, some tiles offset); labels/ stay exact")
    cli.add_overwrite(p, help="replace a dataset this generator wrote in --output_dir before "
                               "(only the files its dataset.json lists; anything else is kept, "
                               "and a foreign file where the dataset goes is refused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = runtime.add_log_handler()
    runtime.configure_threads()
    try:
        generate_dataset(
            args.output_dir, n=args.n, size=args.size, seed=args.seed, large=args.large,
            large_size=tuple(args.large_size), radius=args.radius,
            beads_at_160x=args.beads_at_160x, tiff_every=args.tiff_every,
            overwrite=args.overwrite, style=args.style, label_noise=args.label_noise,
            blank_frames=args.blank_frames,
        )
    except GenerationError:
        return cli.EXIT_FATAL  # logged, to the dataset's log file too
    except (FileExistsError, ValueError, OSError) as exc:
        return cli.fatal(log, "%s", str(exc).splitlines()[0] if str(exc) else
                         type(exc).__name__)
    finally:
        runtime.remove_log_handlers([handler])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthetic scenes: what to make (the plan over the dilution series) and one image with
its exact ground truth (geometry -> native render -> output-scale masks).

The plan names tiles like the users' data (``640x_2025-05-16_00-59-00_002_grid_r1_c1``),
spread geometrically over :data:`DILUTIONS`, dense end first. A scene is a rings-style tile
(:func:`make_scene`), a microscope-style frame window (:func:`micro_scene`), a full frame
(:func:`micro_frame`) or a blank frame with debris only (:func:`blank_frame`);
:func:`noisy_mask` degrades a mask like the users' blob-detector masks. Pure functions of
their arguments and random generator; ``make_synthetic_dataset.py`` writes the files.
"""

from __future__ import annotations

import numpy as np

import microbead_io as mio
from synthetic_beads import (
    FRAME_SHAPE,
    NATIVE_TILE,
    BeadLayout,
    default_cluster_fraction,
    relabel_present,
    render_masks,
    sample_beads,
    sample_debris,
    touching_count,
)
from synthetic_render import (
    MICRO_BEADS_AT_160X,
    MICRO_DENSE_CLUSTER_FRACTION,
    MICRO_GRID_COLS,
    MICRO_GRID_ROWS,
    MICRO_RADIUS,
    MICRO_RADIUS_SD,
    render_brightfield,
    render_microscope,
    sample_appearance,
    sample_microscope_appearance,
    sample_smudges,
)

DILUTIONS = (160, 320, 640, 1280, 2560, 5120, 10240)
GRID_ROWS, GRID_COLS = FRAME_SHAPE[0] // NATIVE_TILE, FRAME_SHAPE[1] // NATIVE_TILE
DATE = "2025-05-16"
# Geometric tile allocation over the dilution series, dense end first. 0.82 makes the
# requested mean ~109 beads/tile with the defaults (111 for n=73), like the users' data.
ALLOCATION_RATIO = 0.82
MIN_BEADS = 3


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


def time_stamp(seconds: int) -> str:
    """``HH-MM-SS`` of ``seconds`` after midnight (wrapping at 24 h), as in the stems."""
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
                stem = f"{dil}x_{DATE}_{time_stamp(t)}_{number:03d}_grid_r{r}_c{c}"
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
            prefix = f"{dil}x_{DATE}_{time_stamp(t)}_{number:03d}"
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
    beads, labels = relabel_present(beads, labels)
    return {
        "image": img, "mask": mask, "labels": labels, "beads": beads,
        "n_debris": len(debris), "n_touching": touching_count(labels),
    }


def micro_scene(rng, ap: dict, window_shape, origin, n_beads: int, *, radius: float,
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


def micro_frame(rng, frame_shape, dilution, radius_native, beads_at_160x):
    """One full microscope-style frame; ``dilution`` None renders a blank (no beads)."""
    ap = sample_microscope_appearance(rng, frame_shape)
    if dilution is None:
        requested, n_beads = 0.0, 0
    else:
        requested = expected_beads(dilution, beads_at_160x) * frame_shape[0] \
            * frame_shape[1] / NATIVE_TILE**2
        n_beads = max(MIN_BEADS, int(rng.poisson(requested)))
    img, beads, n_debris = micro_scene(rng, ap, frame_shape, (0, 0), n_beads,
                                        radius=radius_native, beads_at_160x=beads_at_160x)
    mask, labels = render_masks(beads, frame_shape, 1.0)
    beads, labels = relabel_present(beads, labels)
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
        return micro_frame(rng, shape, None, radius_native, MICRO_BEADS_AT_160X)
    scene = make_scene(rng, shape, shape, 0, appearance=sample_appearance(rng, shape),
                       radius_native=radius_native)
    scene["requested"] = 0.0
    return scene


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

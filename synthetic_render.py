"""Rendering of the synthetic brightfield images from bead and debris geometry.

Two styles: ``rings`` (:func:`render_brightfield`: grey ring beads, dark rim and brighter
core, defocus, shot noise) and ``microscope`` (:func:`render_microscope`: the users' real
tiles, solid dark blue-purple beads on grey, RGB), each with its per-frame imaging
parameters (:func:`sample_appearance`, :func:`sample_microscope_appearance`) and a smooth
illumination field shared by every window of one frame. Faint smudges and specks
(:func:`sample_smudges`) are placed where the microscope frames are dim. Everything is
rendered at native scale; pure functions of their arguments and random generator.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synthetic_beads import FRAME_SHAPE, NATIVE_TILE, BeadLayout, Debris, patch_offsets

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
    iy0, ix0, dy_all, dx_all = patch_offsets(beads.y, beads.x, half)
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
    iy0, ix0, dy, dx = patch_offsets(beads.y, beads.x, half)
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

"""Tiled inference: cover a large frame with overlapping tiles and blend the outputs.

Purpose
    A microscope frame (e.g. 2048 x 2048 at model scale) is larger than a network input and
    than GPU memory allows at once. :func:`plan_tiles` lays out tiles on the network's pooling
    grid, :func:`predict_tiled` runs a prediction function over them in fixed-size batches
    and blends the overlaps with raised-cosine weights (per tile, the outer product of a
    row and a column :func:`blend_ramp`), so the result equals a whole-image prediction
    wherever half the overlap covers the network's receptive field. Used by
    ``prediction.py`` (and through it ``predict_microscope.py`` and the benchmarks).

Inputs / outputs
    NumPy arrays only: images ``(H, W, C)`` or ``(H, W)`` float32, probabilities ``(H, W)``
    float32. Nothing here imports TensorFlow or reads files.

Example
    >>> prob = predict_tiled(image, predict_fn, tile_size=1024, overlap=128)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with >= ``overlap``.

    Starts are multiples of ``align`` (the network's downsampling factor ``2**depth``, so
    every tile sees the same pooling grid as the whole image; ``length - tile`` must then be
    a multiple of ``align`` too, which :func:`predict_tiled` ensures by padding). The last
    tile ends at ``length``: every pixel is covered and no tile leaves the image.
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    if (length - tile) % align or tile % align:
        raise ValueError(f"length - tile ({length - tile}) and tile must be multiples of {align}")
    stride = max(align, (tile - overlap) // align * align)
    n = int(np.ceil((length - tile) / stride)) + 1
    return [min(i * stride, length - tile) for i in range(n)]


def blend_ramp(tile: int, overlap: int, *, taper_start: bool = True,
               taper_end: bool = True) -> np.ndarray:
    """1-D blending weight of length ``tile`` (float64, in (0, 1]).

    ~0 (1e-6) on the outer ``overlap // 2`` pixels of each tapered end, then a raised-cosine
    ramp over the next ``overlap - overlap // 2`` pixels, 1 inside. The outer pixels of a
    tile are where the network's zero padding distorts its output; a neighbouring tile
    covers them with its interior (tiles overlap by >= ``overlap``), so blended probabilities
    equal a whole-image prediction. An end that lies on the image border is not tapered:
    there the tile sees exactly what the whole image sees.
    """
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        dead = overlap // 2
        n_ramp = overlap - dead
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n_ramp) + 0.5) / n_ramp)
        edge = np.concatenate([np.zeros(dead), ramp])
        if taper_start:
            w[:overlap] = np.minimum(w[:overlap], edge)
        if taper_end:
            w[tile - overlap :] = np.minimum(w[tile - overlap :], edge[::-1])
    return np.maximum(w, 1e-6)


def receptive_field(depth: int = 4) -> int:
    """Theoretical receptive field (pixels) of the ``models.py`` U-Nets of ``depth`` levels.

    Two 3x3 convolutions per level, 2x2 max-pooling, nearest up-sampling:
    ``1 + 5 (2^d - 1) + 4 * 2^d + 4 (2^d - 1)`` (encoder, bottleneck, decoder); 44 for
    d=2, 96 for d=3, 200 for d=4. The attention gates and residual shortcuts (1x1
    convolutions) do not widen it. Used by the analysis (bead size vs. what the network
    sees) and by :func:`default_overlap`.
    """
    p = 2 ** int(depth)
    return 1 + 5 * (p - 1) + 4 * p + 4 * (p - 1)


def default_overlap(depth: int) -> int:
    """Tile overlap (px) at which :func:`predict_tiled` equals a whole-image prediction.

    A tile's outer ``overlap // 2`` pixels get ~zero weight (:func:`blend_ramp`), so every
    pixel that counts must lie at least half a receptive field from the tile edge, where the
    network's zero padding cannot reach it: ``overlap // 2 >= receptive_field // 2``. The
    receptive field, rounded up to a multiple of ``2**depth`` (the tile grid): 44 px at
    depth 2, 96 at 3, 208 at 4.
    """
    step = 2 ** int(depth)
    return int(np.ceil(receptive_field(depth) / step)) * step


@dataclass
class TilePlan:
    """Where :func:`predict_tiled` puts its tiles for one image."""

    tile_h: int
    tile_w: int
    pad_h: int  # rows of reflect padding added at the bottom
    pad_w: int  # columns added at the right
    ys: list[int]
    xs: list[int]
    overlap_h: int
    overlap_w: int

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)


def plan_tiles(shape, tile_size: int = 256, overlap: int = 32, pad_multiple: int = 16) -> TilePlan:
    """Tile layout for an image of ``shape`` ``(H, W, ...)``.

    Each side is padded up to a multiple of ``pad_multiple`` (the network's downsampling
    factor). A side that fits in ``tile_size`` is one tile; a longer side is split into the
    fewest tiles of at most ``tile_size`` that overlap by >= ``overlap``, with the tile
    length balanced so little is computed twice (1080 px with tile 1024 / overlap 64 -> two
    tiles of 576, not two of 1024). Starts are multiples of ``pad_multiple``.
    """
    if tile_size % pad_multiple:
        raise ValueError(f"tile_size {tile_size} must be a multiple of {pad_multiple}")

    def side(n):
        padded = int(np.ceil(n / pad_multiple) * pad_multiple)
        if padded <= tile_size:
            return padded, padded - n, [0], 0
        ov = min(overlap, tile_size - pad_multiple)
        k = int(np.ceil((padded - ov) / (tile_size - ov)))
        t = int(np.ceil((padded + (k - 1) * ov) / k / pad_multiple) * pad_multiple)
        t = min(t, tile_size)
        return t, padded - n, tile_starts(padded, t, ov, pad_multiple), ov

    th, ph, ys, ovh = side(int(shape[0]))
    tw, pw, xs, ovw = side(int(shape[1]))
    return TilePlan(th, tw, ph, pw, ys, xs, ovh, ovw)


def predict_tiled(
    image: np.ndarray,
    predict_fn,
    *,
    tile_size: int = 256,
    overlap: int = 32,
    batch_size: int = 8,
    pad_multiple: int = 16,
    progress=None,
) -> np.ndarray:
    """Run ``predict_fn`` over overlapping tiles of a large image and blend the outputs.

    Parameters
    ----------
    image : float32 ``(H, W, C)`` or ``(H, W)``
        Already normalised (once, for the whole frame).
    predict_fn : callable
        ``(B, th, tw, C) float32 -> (B, th, tw) or (B, th, tw, 1)`` probabilities.
    tile_size, overlap : int
        Tile edge and minimum overlap in pixels (``tile_size`` must be a multiple of
        ``pad_multiple``). Sides smaller than one tile are reflect-padded up to the next
        multiple of ``pad_multiple`` and the padding is cropped off the result.
    batch_size : int
        Tiles per call; memory is bounded by this, not by the image size.
    progress : callable or None
        Called with the number of tiles done after each batch.

    Returns
    -------
    float32 ``(H, W)`` probabilities, blended with per-tile weights (the outer product of
    the row and column :func:`blend_ramp`, tapered only at ends inside the image) before
    any threshold is applied.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    h, w = x.shape[:2]
    plan = plan_tiles(x.shape, tile_size, overlap, pad_multiple)
    if plan.pad_h or plan.pad_w:
        mode = "reflect" if (plan.pad_h < h and plan.pad_w < w) else "symmetric"
        x = np.pad(x, ((0, plan.pad_h), (0, plan.pad_w), (0, 0)), mode=mode)
    th, tw = plan.tile_h, plan.tile_w
    H, W = x.shape[:2]

    def ramp(start, t, length, ov):
        return blend_ramp(t, ov, taper_start=start > 0, taper_end=start + t < length)

    coords = [(y, xx) for y in plan.ys for xx in plan.xs]
    # Every call gets the same number of tiles (the last batch is filled up with zero tiles
    # whose output is dropped), so a compiled/traced network sees one shape per tile layout;
    # a frame of fewer tiles than batch_size sends only its own tiles.
    per_call = max(1, min(batch_size, len(coords)))
    if len(coords) == 1:  # one tile: no blending, nothing computed twice
        out = np.asarray(predict_fn(x[None, :th, :tw]), dtype=np.float32)
        if progress is not None:
            progress(1)
        return np.array(out.reshape(th, tw)[:h, :w])
    # Blending. A pixel inside one tile only has weight 1 there (tapers lie where the
    # neighbour covers), so its blend is that tile's probability, copied. Only the cells of
    # the tile grid covered by several tiles are blended: the weighted sum in tile order,
    # the same float32 operations as blending every tile's whole window, on ~10 % of the
    # pixels (a 3840x2160 frame in 6 tiles: 0.16 s less on the network's thread).
    row_cells = _cells(plan.ys, th, H)
    col_cells = _cells(plan.xs, tw, W)
    out = np.empty((H, W), np.float32)
    wsum = {}  # (row cell, col cell) of several tiles -> its weight sum so far
    for i in range(0, len(coords), per_call):
        chunk = coords[i : i + per_call]
        batch = np.stack([x[y : y + th, xx : xx + tw] for y, xx in chunk])
        if len(chunk) < per_call:
            batch = np.concatenate(
                [batch, np.zeros((per_call - len(chunk),) + batch.shape[1:], batch.dtype)])
        out_b = np.asarray(predict_fn(batch), dtype=np.float32)[: len(chunk)]
        if out_b.ndim == 4:
            out_b = out_b[..., 0]
        for (y, xx), p in zip(chunk, out_b):
            ramp_y = ramp(y, th, H, plan.overlap_h)
            ramp_x = ramp(xx, tw, W, plan.overlap_w)
            for ri in _cells_of(row_cells, y, th):
                r0, r1, nr = row_cells[ri]
                for ci in _cells_of(col_cells, xx, tw):
                    c0, c1, nc = col_cells[ci]
                    tile_part = p[r0 - y : r1 - y, c0 - xx : c1 - xx]
                    if nr == 1 and nc == 1:
                        out[r0:r1, c0:c1] = tile_part
                        continue
                    window = np.outer(ramp_y[r0 - y : r1 - y],
                                      ramp_x[c0 - xx : c1 - xx]).astype(np.float32)
                    if (ri, ci) in wsum:
                        out[r0:r1, c0:c1] += tile_part * window
                        wsum[ri, ci] += window
                    else:
                        out[r0:r1, c0:c1] = tile_part * window
                        wsum[ri, ci] = window
        if progress is not None:
            progress(len(chunk))
    for (ri, ci), ws in wsum.items():
        (r0, r1, _), (c0, c1, _) = row_cells[ri], col_cells[ci]
        out[r0:r1, c0:c1] /= np.maximum(ws, 1e-12)
    return out[:h, :w]


def _cells_of(cells, start: int, tile: int) -> range:
    """Indices of the ``cells`` (:func:`_cells`) a tile of ``tile`` px at ``start`` spans:
    its start and end are cell edges."""
    first = next(i for i, c in enumerate(cells) if c[0] == start)
    last = next(i for i in range(first, len(cells)) if cells[i][1] == start + tile)
    return range(first, last + 1)


def _cells(starts: list[int], tile: int, length: int) -> list[tuple[int, int, int]]:
    """``[0, length)`` cut at every tile start and end: ``(start, end, n_tiles)`` runs
    covered by the same tiles (tiles of ``tile`` px starting at ``starts``)."""
    edges = sorted({0, length, *starts, *(s + tile for s in starts)})
    return [(a, b, sum(s <= a and b <= s + tile for s in starts))
            for a, b in zip(edges[:-1], edges[1:]) if b > a]

"""Per-bead outputs for Fiji, QuPath and napari, from a bead label image.

Purpose
    Turn one frame's instance label image (``labels/<stem>_labels.tif``, ids 1..N at native
    frame resolution) into what microscopists check counts with: a per-bead table, an ImageJ
    ROI set (Fiji's ROI Manager), a QuPath GeoJSON of detections and an OME-TIFF holding the
    image and the labels as two channels. Every output comes from exactly that label image:
    one row / ROI / feature per id present in it, in the same order (ascending id).

Coordinates
    Continuous frame-pixel coordinates with the origin at the top-left *corner* of the
    top-left pixel (the ImageJ and QuPath convention): pixel (row ``r``, column ``c``) covers
    ``[c, c+1] x [r, r+1]`` and its centre is ``(c + 0.5, r + 0.5)``. Outlines trace pixel
    edges (as ImageJ's wand and particle analyzer do), so a filled outline is exactly the
    bead's pixels, also for beads of 1-9 px; contour-through-pixel-centre tracers (OpenCV,
    ``skimage.measure.find_contours``) lose half a pixel all round, most of a 3-px bead.
    napari places pixel centres at integers: subtract 0.5 from the table's centroids there.

Outputs (``write_bead_outputs``)
    ``beads/<stem>_beads.csv`` (always), ``rois/<stem>_rois.zip`` (ImageJ ROI set, needs the
    ``roifile`` package), ``geojson/<stem>.geojson`` (QuPath detections),
    ``ome/<stem>.ome.tif`` (image channel(s) + label channel).

Nothing here imports TensorFlow; ``roifile`` is imported only when an ROI set is written.

Example
-------
>>> labels = mio.read_labels("pred/labels/a_labels.tif")               # doctest: +SKIP
>>> outlines = trace_outlines(labels)                                   # doctest: +SKIP
>>> write_roi_zip("a_rois.zip", outlines)                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np

import microbead_io as mio

#: Columns of ``beads/<stem>_beads.csv``, in order.
BEAD_COLUMNS = (
    "bead_id", "centroid_x", "centroid_y", "area_px", "equivalent_diameter_px",
    "circularity", "mean_intensity", "touching", "prob_mass",
)
#: QuPath class of every detection, and its display colour (the overlays' yellow).
BEAD_CLASS = {"name": "Bead", "color": [255, 220, 0]}
ROIFILE_HINT = "the ImageJ ROI set (--roi) needs the roifile package: pip install roifile"
# Deterministic GeoJSON feature ids: the same frame gives the same file, byte for byte.
_UUID_NAMESPACE = uuid.UUID("5f0e4f2c-6a51-4c34-9d7e-2b7c1f6b8a10")
# Zip entries get a fixed time so the same beads give the same ROI set, byte for byte.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

# Edge directions in image coordinates (y down): east, south, west, north. Walking an edge,
# the bead lies on the right; turning right is (d + 1) % 4.
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


# ----------------------------------------------------------------------------- outlines


def _edge_rings(labels: np.ndarray, fg=None, same=None) -> _EdgeRings | None:
    """The rings of :func:`trace_outlines` as flat arrays (:class:`_EdgeRings`); None for an
    image without beads. Every exposed pixel side is a directed edge (bead on its right);
    each edge is linked to the same bead's edge leaving its end corner, and the cycles are
    the rings. ``fg``: :func:`_foreground` of ``labels``, if already computed; ``same``:
    :func:`_same_neighbours` of it, if already computed.

    Edges are numbered side by side (tops, rights, bottoms, lefts; pixels in raster order
    within a side). The successor is local (see the loop below), so no edge lookup by key
    is needed; the rings, each walked from its smallest-key edge, come out of one
    depth-first traversal in C (:func:`_walk_rings`).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
    h, w = lab.shape
    pf, idx, own, r, c = _foreground(lab) if fg is None else fg
    pw = w + 2
    n_fg = idx.size
    if same is None:
        same = _same_neighbours(pf, idx, own, pw)
    # Side s of pixel p (0 top, 1 right, 2 bottom, 3 left) is the edge leaving corner
    # (c + cx, r + cy) in direction d = s (east, south, west, north: _DX, _DY), bead on its
    # right; it is exposed where the pixel beyond it, p + out[s], is not the bead's. Its
    # key (y * (W + 1) + x) * 4 + d orders edges as (pf index of corner pixel) * 4 + d does.
    step = (1, pw, -1, -pw)     # p + step[s]: the next pixel along the edge
    out = (-pw, 1, pw, -1)      # p + out[s]: the pixel on the edge's left
    corner = (0, 1, pw + 1, pw)  # p + corner[s]: the pf pixel at the edge's start corner
    # Numbers fit int32 (what the traversal takes) unless there are > 2^29 bead pixels.
    itype = np.int32 if 4 * n_fg < 2 ** 31 else np.int64
    pmap = np.empty(pf.size, itype)  # pf index -> foreground index (bead pixels only)
    pmap[idx] = np.arange(n_fg, dtype=itype)
    pos, keys, nxt = [], [], []
    for s in range(4):
        k = np.flatnonzero(~same[out[s]])
        p = idx[k]
        keys.append((p + corner[s]) * 4 + s)  # rising within a side: 4 sorted runs
        # Successor: right turn (same pixel, side s + 1) unless the next pixel along is the
        # bead's; then straight on (that pixel, side s) unless the pixel diagonally beyond
        # is the bead's too; then left turn (that pixel, side s - 1). Right before straight
        # before left keeps pixels that touch only at a corner apart (ImageJ's wand).
        right = ~same[step[s]][k]
        straight = ~right & ~same[step[s] + out[s]][k]
        q = np.where(right, p, p + np.where(straight, step[s], step[s] + out[s]))
        turn = np.where(right, (s + 1) % 4, np.where(straight, s, (s + 3) % 4)).astype(itype)
        nxt.append(pmap[q] * 4 + turn)
        pos.append(k)
    counts = [v.size for v in pos]
    n = sum(counts)
    if n == 0:
        return None
    eid = np.empty(4 * n_fg, itype)  # side id (fg index * 4 + side) -> edge number
    for s, (k, start) in enumerate(zip(pos, np.cumsum([0] + counts[:-1]).tolist())):
        eid[k * 4 + s] = np.arange(start, start + k.size, dtype=itype)
    succ = eid[np.concatenate(nxt)]
    key = np.concatenate(keys)
    d = np.repeat(np.arange(4, dtype=np.int8), counts)
    # Corners only: an edge whose direction differs from its predecessor's starts a corner.
    pred_d = np.empty_like(d)
    pred_d[succ] = d
    is_corner = pred_d != d
    # A ring starts at its smallest-key edge, which has a smaller key than the edges before
    # and after it: only such edges go to the walk, smallest key first.
    pred_key = np.empty_like(key)
    pred_key[succ] = key
    cand = np.flatnonzero((key < pred_key) & (key < key[succ]))
    by_key = cand[np.argsort(key[cand], kind="stable")]  # merges 4 sorted runs
    first, order = _walk_rings(succ, by_key)
    keep = is_corner[order]
    n_v = np.add.reduceat(keep, first, dtype=np.int64)  # corners per ring
    fg_start = np.concatenate(pos)[order[first]]
    return _EdgeRings(key[order[keep]] >> 2, pw, n_v, own[fg_start].astype(np.int64))


class _EdgeRings:
    """Every ring of a label image as flat arrays (what :func:`trace_outlines` returns as
    a dict): corner vertices ring after ring (rings ordered by their first edge's key, so
    by top-left corner; vertices in walking order from it) as ``pf`` indices ``v`` of the
    padded image of width ``pw`` (vertex ``(x, y)`` at ``(y + 1) pw + x + 1``; ``x``, ``y``
    on demand), ring ``i`` at ``starts[i]:stops[i]``, of bead ``label[i]``."""

    def __init__(self, v, pw, n_vertices, label):
        self.v, self.pw = v, pw
        self.stops = np.cumsum(n_vertices, dtype=np.int64)
        self.starts = self.stops - n_vertices
        self.label = label
        self._xy = None

    def xy(self, a: int = 0, b: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vertex coordinates ``x``, ``y`` (int64) of vertices ``a:b``."""
        if a == 0 and b is None:
            if self._xy is None:
                y, x = np.divmod(self.v, self.pw)
                self._xy = x - 1, y - 1
            return self._xy
        y, x = np.divmod(self.v[a:b], self.pw)
        return x - 1, y - 1


def _walk_rings(succ: np.ndarray, by_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycles of the successor permutation ``succ``, without a Python loop over edges.

    ``by_key``: edges, smallest key first, among them every ring's smallest-key edge.
    Returns ``order``: all edges, ring after ring (rings by their smallest-key edge, which
    starts them), each ring in walking order from its start, and ``first``: where each ring
    starts in ``order``.

    One depth-first traversal (scipy, in C) of a graph of ``n + m`` nodes: edge ``e`` links
    to ``succ[e]``; root node ``n + j`` links to edge ``by_key[j]``, then to root
    ``n + j + 1``. From root ``n`` the traversal enters each ring at its smallest-key edge
    (every edge with a smaller key lies on a ring walked already) and follows it until the
    successor is the visited start, then backs up to the root chain. Depth-first order
    visits a node's links in stored order; the tests check the result against an
    independent ring tracer.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import depth_first_order

    n, m = succ.size, by_key.size
    indices = np.empty(n + 2 * m, np.int32)
    indices[:n] = succ
    indices[n::2] = by_key
    indices[n + 1::2] = np.arange(n + 1, n + m + 1)
    indices[-1] = n  # the last root links back to the first (visited): the end
    indptr = np.concatenate([np.arange(n + 1), n + 2 * np.arange(1, m + 1)]).astype(np.int32)
    graph = csr_matrix((np.ones(indices.size), indices, indptr), shape=(n + m, n + m))
    nodes = depth_first_order(graph, n, directed=True, return_predecessors=False)
    if nodes.size != n + m:  # cannot happen: every ring has its smallest edge in by_key
        raise AssertionError("ring walk did not reach every edge")
    real = nodes < n
    order = nodes[real]
    entered = np.flatnonzero(real[1:] & ~real[:-1]) + 1  # an edge right after a root
    first = entered - (nodes[entered - 1] - n + 1)  # less the roots (visited in order)
    if (succ[order[np.append(first[1:], n) - 1]] != order[first]).any():
        raise AssertionError("open outline: edge linking failed")
    return first, order


def trace_outlines(labels: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Pixel-edge outlines of every bead in a label image.

    Each bead's boundary is the set of pixel sides between it and anything else (background,
    another bead, the image border), linked into closed rings. Where two of the bead's pixels
    touch only at a corner the ring turns right, so they are outlined separately (the bead's
    pixels are 4-connected within a ring), exactly as ImageJ's wand traces.

    Parameters
    ----------
    labels : integer array ``(H, W)``
        0 background, bead ids > 0 (gaps allowed).

    Returns
    -------
    dict ``{bead_id: [ring, ...]}`` in ascending id order. A ring is an int32 ``(n, 2)`` array
    of ``(x, y)`` pixel-corner vertices (only where the direction changes; not closed:
    the last vertex connects back to the first), starting at its top-left vertex. Outer rings
    have a positive signed area (:func:`ring_area`), holes a negative one; outer rings come
    first, the largest first. Filling the rings with the even-odd rule (or the non-zero rule)
    at pixel centres gives the bead's pixels exactly. An all-zero image gives ``{}``.
    """
    er = _edge_rings(labels)
    if er is None:
        return {}
    xy = np.stack(er.xy(), axis=1).astype(np.int32)
    outlines: dict[int, list[np.ndarray]] = {}
    for lab_id, a, b in zip(er.label.tolist(), er.starts.tolist(), er.stops.tolist()):
        outlines.setdefault(lab_id, []).append(xy[a:b])
    for rings in outlines.values():
        if len(rings) > 1:
            rings.sort(key=lambda ring: -ring_area(ring))
    return dict(sorted(outlines.items()))


def _foreground(lab: np.ndarray):
    """Zero-padded flat labels, flat indices of its bead pixels, their ids, rows and columns.

    Neighbours of bead pixel ``i`` are ``pf[i +- 1]`` and ``pf[i +- (W + 2)]``: per-bead work
    touches only bead pixels (a few % of a frame), never the whole frame.
    """
    pf = np.pad(lab, 1).reshape(-1)
    idx = np.flatnonzero(pf != 0)  # faster than on the labels themselves
    r, c = np.divmod(idx, lab.shape[1] + 2)
    return pf, idx, pf[idx], r - 1, c - 1


def _same_neighbours(pf: np.ndarray, idx: np.ndarray, own: np.ndarray, pw: int,
                     other: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Per flat offset to one of the 8 neighbours: whether that neighbour of each bead pixel
    (:func:`_foreground`) is the same bead. With ``other``, also ORs into it where the
    neighbour is another bead (``touching``)."""
    same = {}
    base = idx - (pw + 1)  # >= 0: bead pixels lie inside the padding
    for offset in (-pw - 1, -pw, -pw + 1, -1, 1, pw - 1, pw, pw + 1):
        nb = pf[pw + 1 + offset:][base]  # pf[idx + offset] without the index sum
        same[offset] = nb == own
        if other is not None:
            other |= ~same[offset] & (nb > 0)
    return same


def ring_area(ring: np.ndarray) -> float:
    """Signed area of a ring of ``(x, y)`` vertices (shoelace): > 0 outer, < 0 hole."""
    xy = np.asarray(ring, np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def traced_perimeter(ring: np.ndarray) -> float:
    """Perimeter of a pixel-edge ring as ImageJ measures a traced ROI (px).

    ImageJ's ``PolygonRoi.getTracedPerimeter``: the boundary length, less ``2 - sqrt(2)``
    for every non-adjacent corner (a 1-px bead: ``4 - 2 (2 - sqrt(2))``), so a digital disc's
    staircase counts roughly as its true circumference.
    """
    pts = np.asarray(ring).tolist()  # plain Python: rings are short, numpy calls cost more
    n = len(pts)
    if n < 4:
        return 0.0
    sides = [abs(pts[(i + 1) % n][0] - pts[i][0]) + abs(pts[(i + 1) % n][1] - pts[i][1])
             for i in range(n)]  # sides[i]: vertex i -> i + 1
    n_corners = 0
    corner = False
    side1 = sides[-1]
    for i in range(n):  # sequential by nature: whether a corner counts depends on the last
        if side1 > 1 or not corner:
            corner = True
            n_corners += 1
        else:
            corner = False
        side1 = sides[i]
    return float(sum(sides)) - n_corners * (2.0 - math.sqrt(2.0))


def _ring_perimeters(er: _EdgeRings) -> np.ndarray:
    """:func:`traced_perimeter` of every ring of ``er`` at once (float64, one per ring,
    equal to the loop's value bit for bit: the same integers into the same expression).

    ``traced_perimeter`` counts vertex 0, every vertex whose incoming side is longer than
    1 px, and within each run of later vertices with 1-px incoming sides every second one
    (its loop alternates there): ``floor(run / 2)`` of a run.
    """
    starts, stops = er.starts, er.stops
    v, pw = er.v, er.pw
    # Side i: vertex i -> i + 1 (the last: -> the first). Sides are axis-parallel and
    # shorter than pw - 1 across, so a step of |dv| < pw is |dv| px across, else |dv| / pw
    # px down.
    side = np.empty(v.size, np.int64)
    side[:-1] = np.abs(v[1:] - v[:-1])
    side[stops - 1] = np.abs(v[starts] - v[stops - 1])
    side = np.where(side < pw, side, side // pw)
    total = np.add.reduceat(side, starts)
    # The side into vertex i > 0 of a ring is side i - 1; vertex 0 is counted apart.
    long_in = np.zeros(v.size, bool)
    long_in[1:] = side[:-1] > 1
    long_in[starts] = False
    short = np.zeros(v.size, bool)
    short[1:] = side[:-1] == 1
    short[starts] = False
    # Runs of consecutive short vertices (a first vertex or a long one ends a run).
    edge = np.diff(short.view(np.int8), prepend=0, append=0)
    run_start, run_stop = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    halves = np.zeros(v.size, np.int64)
    halves[run_start] = (run_stop - run_start) // 2
    n_corners = 1 + np.add.reduceat(long_in.view(np.int8), starts, dtype=np.int64) \
        + np.add.reduceat(halves, starts)
    perim = total.astype(np.float64) - n_corners.astype(np.float64) * (2.0 - math.sqrt(2.0))
    return np.where(stops - starts < 4, 0.0, perim)


def _bead_perimeters(er: _EdgeRings | None, ids: np.ndarray) -> np.ndarray:
    """Per bead id in ``ids``: the sum of its rings' traced perimeters, rings in
    :func:`trace_outlines` order (as ``sum(traced_perimeter(r) for r in rings)``)."""
    out = np.zeros(ids.size, np.float64)
    if er is None or ids.size == 0:
        return out
    per_ring = _ring_perimeters(er)
    pos = np.searchsorted(ids, er.label)
    counts = np.bincount(pos, minlength=ids.size)
    single = counts[pos] == 1
    out[pos[single]] = per_ring[single]
    for k in np.flatnonzero(counts > 1).tolist():  # a bead of several rings: rare
        rings = [(np.stack(er.xy(a, b), axis=1).astype(np.int32), p)
                 for a, b, p in zip(er.starts[pos == k], er.stops[pos == k],
                                    per_ring[pos == k])]
        rings.sort(key=lambda rp: -ring_area(rp[0]))
        out[k] = sum(p for _, p in rings)
    return out


def _polygons(rings: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Group one bead's rings into polygons ``[outer, hole, ...]`` (GeoJSON's layout).

    A hole belongs to the smallest outer ring that contains the centre of the bead pixel on
    its inner side (pixel centres never lie on a pixel-edge ring, so the test is exact).
    """
    outers = [r for r in rings if ring_area(r) > 0]
    polys = [[r] for r in outers]
    for hole in (r for r in rings if ring_area(r) <= 0):
        # First edge goes from vertex 0 to vertex 1 with the bead on its right.
        (x0, y0), (x1, y1) = hole[0], hole[1 % len(hole)]
        dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
        px, py = x0 + 0.5 * dx - 0.5 * dy, y0 + 0.5 * dy + 0.5 * dx  # right of the edge
        inside = [i for i, o in enumerate(outers) if _contains(o, px, py)]
        best = min(inside, key=lambda i: ring_area(outers[i])) if inside else 0
        polys[best].append(hole)
    return polys


def _contains(ring: np.ndarray, px: float, py: float) -> bool:
    """Even-odd ray test of point ``(px, py)`` against a closed ring."""
    x, y = ring[:, 0].astype(float), ring[:, 1].astype(float)
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    crosses = (y > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x + (py - y) * (x2 - x) / (y2 - y)
    return bool(np.count_nonzero(crosses & (px < xc)) % 2)


# ----------------------------------------------------------------------------- table


def bead_table(labels: np.ndarray, image: np.ndarray | None = None,
               prob: np.ndarray | None = None,
               outlines: dict[int, list[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Per-bead measurements, one entry per id present in ``labels`` (ascending).

    Parameters
    ----------
    labels : integer ``(H, W)``, 0 background
    image : ``(H, W)`` or ``(H, W, C)`` in its stored value range, or None
        ``mean_intensity`` is the mean over the bead's pixels (and channels); NaN without.
    prob : float ``(H, W)`` probabilities at the same resolution, or None
        ``prob_mass`` is their sum over the bead's pixels (an area in px weighted by
        confidence); NaN without.
    outlines : :func:`trace_outlines` of ``labels``, if already computed

    Returns
    -------
    dict of :data:`BEAD_COLUMNS` -> 1-D arrays of equal length. ``centroid_x``/``_y`` are in
    frame pixels, pixel centres at ``+0.5`` (see the module docstring); ``circularity`` is
    ImageJ's ``4 pi area / perimeter^2`` with its traced perimeter, capped at 1;
    ``touching`` is 1 where a pixel of another bead lies in the bead's 8-neighbourhood.
    An image without beads gives empty arrays.
    """
    lab = np.asarray(labels)
    h, w = lab.shape
    pf, idx, own, r, c = _foreground(lab)
    fg = r * w + c  # flat index in the unpadded frame
    ids_px = own.astype(np.int64)
    n_max = int(ids_px.max()) + 1 if ids_px.size else 1
    area = np.bincount(ids_px, minlength=n_max)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    a = area[ids].astype(np.float64)

    def per_bead(values):
        return np.bincount(ids_px, weights=values, minlength=n_max)[ids]

    cx = per_bead(c + 0.5) / np.maximum(a, 1)
    cy = per_bead(r + 0.5) / np.maximum(a, 1)
    if image is not None:
        img = np.asarray(image)
        img = img.reshape(h * w, -1)
        # One channel: the value itself (what a mean over one value gives, bit for bit).
        img = img[fg, 0].astype(np.float64) if img.shape[1] == 1 \
            else img[fg].astype(np.float64).mean(axis=1)
        mean_int = per_bead(img) / np.maximum(a, 1)
    else:
        mean_int = np.full(ids.size, np.nan)
    if prob is not None:
        prob_mass = per_bead(np.asarray(prob).reshape(-1)[fg].astype(np.float64))
    else:
        prob_mass = np.full(ids.size, np.nan)
    # Touching: another bead's pixel among the 8 neighbours.
    pw = w + 2
    other = np.zeros(idx.size, bool)
    same = _same_neighbours(pf, idx, own, pw, other)
    touching = np.bincount(ids_px[other], minlength=n_max)[ids] > 0
    if outlines is None:
        perim = _bead_perimeters(_edge_rings(lab, (pf, idx, own, r, c), same), ids)
    else:
        perim = np.array([sum(traced_perimeter(ring) for ring in outlines[int(i)])
                          for i in ids], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(perim > 0, np.minimum(1.0, 4 * np.pi * a / perim ** 2), 0.0)
    return {
        "bead_id": ids.astype(np.int64),
        "centroid_x": cx,
        "centroid_y": cy,
        "area_px": a.astype(np.int64),
        "equivalent_diameter_px": np.sqrt(4.0 * a / np.pi),
        "circularity": circ,
        "mean_intensity": mean_int,
        "touching": touching.astype(np.int64),
        "prob_mass": prob_mass,
    }


def _digits(mag: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """ASCII bytes of ``str(int)`` of ``-mag`` where ``neg`` else ``mag`` (non-negative
    int64 below ``10^18``), one row per value, right-aligned with 0 (no byte) before."""
    nd = np.ones(mag.size, np.int64)  # number of digits
    t = 10
    while t <= 10 ** 18 and (mag >= t).any():
        nd += mag >= t
        t *= 10
    width = int(nd.max(initial=1)) + bool(neg.any())
    field = np.zeros((mag.size, width), np.uint8)
    m = mag.copy()
    for j in range(int(nd.max(initial=1))):
        field[:, width - 1 - j] = np.where(j < nd, 48 + m % 10, 0)
        m //= 10
    rows = np.flatnonzero(neg)
    field[rows, width - 1 - nd[rows]] = 45  # "-"
    return field


def _patch(field: np.ndarray, rows: np.ndarray, cells: list[str]) -> np.ndarray:
    """``field`` with rows ``rows`` replaced by the bytes of ``cells`` (widened if need be)."""
    if rows.size == 0:
        return field
    raw = np.array([s.encode("ascii") for s in cells])
    width = max(field.shape[1], raw.itemsize)
    if width > field.shape[1]:
        field = np.concatenate([np.zeros((field.shape[0], width - field.shape[1]), np.uint8),
                                field], axis=1)
    field[rows] = 0
    field[rows, :raw.itemsize] = raw.view(np.uint8).reshape(rows.size, raw.itemsize)
    return field


def _fixed_cells(values: np.ndarray, digits: int) -> np.ndarray:
    """``format(float(v), f".{digits}f")`` of every value (NaN: an empty cell) as ASCII
    bytes, one row per value (0: no byte), byte for byte: integer arithmetic on
    ``|v| 10^digits`` rounded, and Python's own formatting for the few values whose rounding
    the float product cannot decide (within ``1e-9`` of a half), for infinities and for
    values beyond ``2^50 / 10^digits``."""
    v = np.asarray(values, np.float64).reshape(-1)
    nan = np.isnan(v)
    x = np.abs(v) * 10.0 ** digits
    with np.errstate(invalid="ignore"):
        ok = x < 2.0 ** 50  # False for NaN and inf
        risky = ~nan & (~ok | (np.abs(x - np.floor(x) - 0.5) <= 1e-9 * (1.0 + x)))
    n = np.rint(np.where(ok, x, 0.0)).astype(np.int64)
    unit = 10 ** digits
    frac = np.empty((v.size, digits), np.uint8)
    f = n % unit
    for j in range(digits):
        frac[:, digits - 1 - j] = 48 + f % 10
        f //= 10
    field = np.concatenate([_digits(n // unit, np.signbit(v)),  # also "-0.000"
                            np.full((v.size, 1), 46, np.uint8), frac], axis=1)
    field[nan] = 0
    fix = np.flatnonzero(risky)
    return _patch(field, fix, [format(f, f".{digits}f") for f in v[fix].tolist()])


def _int_cells(values: np.ndarray) -> np.ndarray:
    """``str(int(v))`` of every value as ASCII bytes, one row per value (0: no byte)."""
    v = np.asarray(values).reshape(-1)
    if v.dtype.kind in "iub":
        wide = v.astype(np.int64) if v.dtype.kind != "u" else v
        small = np.abs(wide.astype(np.float64)) < 1e18
        if small.all():
            wide = wide.astype(np.int64)
            return _digits(np.abs(wide), wide < 0)
    cells = [str(int(x)) for x in v.tolist()]
    return _patch(np.zeros((v.size, 1), np.uint8), np.arange(v.size), cells)


def write_bead_csv(path: str | os.PathLike, table: dict[str, np.ndarray]) -> None:
    """Write :func:`bead_table` as CSV (header :data:`BEAD_COLUMNS`; NaN as an empty cell)."""
    digits = {"centroid_x": 3, "centroid_y": 3, "equivalent_diameter_px": 3,
              "circularity": 4, "mean_intensity": 4, "prob_mass": 3}
    # Cells as format(v, ".3f") / str(int(v)) write them (numbers and empty cells need no
    # quoting), built column by column as byte matrices: one row per bead, the cells and
    # the commas side by side, 0 where a cell is shorter than its column; dropping the 0s
    # leaves the rows joined by commas, each ending in a newline.
    parts = []
    for k in BEAD_COLUMNS:
        values = np.asarray(table[k])
        parts.append(_fixed_cells(values, digits[k]) if k in digits else _int_cells(values))
        parts.append(np.full((parts[-1].shape[0], 1), 44, np.uint8))  # ","
    parts[-1][:] = 10  # "\n"
    body = np.concatenate(parts, axis=1).reshape(-1)
    text = ",".join(BEAD_COLUMNS) + "\n" + body[body != 0].tobytes().decode("ascii")
    mio.atomic_write_text(path, text)


# ----------------------------------------------------------------------------- ImageJ ROIs


def require_roifile():
    """The ``roifile`` module, or ImportError naming ``pip install roifile``."""
    try:
        import roifile
    except ImportError:
        raise ImportError(ROIFILE_HINT) from None
    return roifile


def imagej_rois(outlines: dict[int, list[np.ndarray]]) -> list:
    """One ``roifile.ImagejRoi`` per bead, named ``bead-<id>`` (zero-padded).

    A single ring becomes a *traced* polygon ROI (the type ImageJ's wand and particle
    analyzer make, measured with the same perimeter); a bead with a hole or of several
    parts becomes a composite ROI (ImageJ ``ShapeRoi``, even-odd filled) holding all its
    rings in frame coordinates.
    """
    roifile = require_roifile()
    width = max(4, len(str(max(outlines, default=0))))
    rois = []
    for bead_id, rings in outlines.items():
        name = f"bead-{bead_id:0{width}d}"
        if len(rings) == 1:
            roi = roifile.ImagejRoi.frompoints(rings[0].astype(np.int32), name=name)
            roi.roitype = roifile.ROI_TYPE.TRACED
        else:
            path = []
            for ring in rings:  # java.awt.geom.PathIterator: MOVETO 0, LINETO 1, CLOSE 4
                path += [0, *map(float, ring[0])]
                for px, py in ring[1:]:
                    path += [1, float(px), float(py)]
                path.append(4)
            allxy = np.concatenate(rings)
            roi = roifile.ImagejRoi()
            roi.roitype = roifile.ROI_TYPE.RECT
            roi.name = name
            roi.multi_coordinates = np.array(path, np.float32)
            roi.shape_roi_size = len(path)
            roi.left, roi.top = (int(v) for v in allxy.min(axis=0))
            roi.right, roi.bottom = (int(v) for v in allxy.max(axis=0))
        rois.append(roi)
    return rois


def write_roi_zip(path: str | os.PathLike, outlines: dict[int, list[np.ndarray]]) -> None:
    """ImageJ ROI set (``.zip`` of ``<name>.roi``) for Fiji's ROI Manager (atomic write).

    Coordinates are the frame's pixels: open the set on the original frame. An image without
    beads gives an empty zip.
    """
    rois = imagej_rois(outlines)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for roi in rois:
                info = zipfile.ZipInfo(f"{roi.name}.roi", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, roi.tobytes())

    mio.atomic_write(Path(path), write)


# ----------------------------------------------------------------------------- QuPath GeoJSON


def _closed(ring: np.ndarray) -> list[list[int]]:
    pts = ring.tolist()
    return pts + [pts[0]]


def geojson_features(outlines: dict[int, list[np.ndarray]], table: dict[str, np.ndarray],
                     *, frame: str = "") -> dict:
    """QuPath-importable ``FeatureCollection``: one detection per bead.

    Geometry: a ``Polygon`` (outer ring, then holes) or, for a bead of several parts, a
    ``MultiPolygon``, in frame pixels (pixel-corner coordinates, rings closed, outer rings
    counter-clockwise in the numbers as RFC 7946 asks). Properties: ``objectType``
    ``"detection"``, ``classification`` :data:`BEAD_CLASS`, ``name`` and ``measurements``
    (the :func:`bead_table` columns; NaN ones left out). Feature ids are UUIDs derived from
    ``frame`` and the bead id, so a re-run writes the same file.
    """
    ids = [int(i) for i in table["bead_id"]]
    if ids != list(outlines):
        raise ValueError("table and outlines list different beads")
    features = []
    for row, bead_id in enumerate(ids):
        polys = [[_closed(r) for r in poly] for poly in _polygons(outlines[bead_id])]
        geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                    else {"type": "MultiPolygon", "coordinates": polys})
        measurements = {}
        for k in BEAD_COLUMNS:
            v = float(table[k][row])
            if not math.isnan(v):
                measurements[k] = round(v, 4)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{frame}/{bead_id}")),
            "geometry": geometry,
            "properties": {
                "objectType": "detection",
                "name": f"bead {bead_id}",
                "classification": dict(BEAD_CLASS),
                "measurements": measurements,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, collection: dict) -> None:
    """Write a GeoJSON object compactly, one feature per line (atomic)."""
    lines = ",\n".join(json.dumps(f, separators=(",", ":")) for f in collection["features"])
    text = '{"type":"FeatureCollection","features":[\n' + lines + "\n]}\n"
    mio.atomic_write_text(path, text)


# ----------------------------------------------------------------------------- OME-TIFF


def write_ome_tiff(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray) -> None:
    """OME-TIFF ``(C + 1, H, W)``: the frame's channel(s), then the bead labels.

    uint16 when the frame holds integers in 0..65535 and there are fewer than 65536 beads
    (8- and 16-bit frames: lossless), else float32. Channel names ``image`` (or
    ``image_0``...) and ``labels``; zlib-compressed. Opens as a two-channel image in Fiji
    (Bio-Formats) and napari.
    """
    import tifffile

    img = np.asarray(image)
    img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    lab = np.asarray(labels)[None]
    exact16 = (np.all(img == np.round(img)) and img.min(initial=0) >= 0
               and img.max(initial=0) <= 65535 and lab.max(initial=0) <= 65535)
    dtype = np.uint16 if exact16 else np.float32
    data = np.concatenate([img.astype(dtype), lab.astype(dtype)])
    names = ["image"] if img.shape[0] == 1 else [f"image_{i}" for i in range(img.shape[0])]
    meta = {"axes": "CYX", "Channel": {"Name": names + ["labels"]}}
    mio.atomic_write(Path(path), lambda t: tifffile.imwrite(
        t, data, ome=True, photometric="minisblack", metadata=meta, compression="zlib",
        compressionargs={"level": 1}))


# ----------------------------------------------------------------------------- one frame


def write_bead_outputs(out_dir: str | os.PathLike, stem: str, labels: np.ndarray,
                       image: np.ndarray | None = None, prob: np.ndarray | None = None, *,
                       roi: bool = False, geojson: bool = False,
                       ome_tiff: bool = False) -> dict[str, np.ndarray]:
    """One frame's per-bead files under ``out_dir``; returns the :func:`bead_table`.

    ``beads/<stem>_beads.csv`` always; ``rois/<stem>_rois.zip`` with ``roi``,
    ``geojson/<stem>.geojson`` with ``geojson``, ``ome/<stem>.ome.tif`` with ``ome_tiff``.
    ``labels`` is the frame's label image as written to ``labels/`` (native resolution),
    ``image`` the frame as read, ``prob`` the native-resolution probabilities.
    """
    out = Path(out_dir)
    outlines = trace_outlines(labels) if roi or geojson else None
    table = bead_table(labels, image, prob)  # perimeters from the flat rings: no dict
    write_bead_csv(out / "beads" / f"{stem}_beads.csv", table)
    if roi:
        write_roi_zip(out / "rois" / f"{stem}_rois.zip", outlines)
    if geojson:
        write_geojson(out / "geojson" / f"{stem}.geojson",
                      geojson_features(outlines, table, frame=stem))
    if ome_tiff and image is not None:
        write_ome_tiff(out / "ome" / f"{stem}.ome.tif", image, labels)
    return table

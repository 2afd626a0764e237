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


def _edge_rings(labels: np.ndarray) -> _EdgeRings | None:
    """The rings of :func:`trace_outlines` as flat arrays (:class:`_EdgeRings`); None for an
    image without beads. Every exposed pixel side is a directed edge (bead on its right);
    each edge is linked to the same bead's edge leaving its end corner, and the cycles are
    the rings."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
    h, w = lab.shape
    pf, idx, own, r, c = _foreground(lab)
    pw = w + 2
    # One directed edge per exposed pixel side: (start corner, direction), bead on the right.
    sides = (
        (-pw, 0, 0, 0),  # top side: (c, r) -> east
        (1, 1, 0, 1),    # right side: (c + 1, r) -> south
        (pw, 1, 1, 2),   # bottom side: (c + 1, r + 1) -> west
        (-1, 0, 1, 3),   # left side: (c, r + 1) -> north
    )
    xs, ys, ds, ls = [], [], [], []
    for offset, ox, oy, d in sides:
        m = pf[idx + offset] != own
        xs.append(c[m] + ox)
        ys.append(r[m] + oy)
        ds.append(np.full(int(m.sum()), d))
        ls.append(own[m])
    x, y, d, lab_e = (np.concatenate(a).astype(np.int64) for a in (xs, ys, ds, ls))
    if x.size == 0:
        return None
    # A (corner, direction) pair names one edge; sorted keys give lookups by searchsorted.
    key = (y * (w + 1) + x) * 4 + d
    order = np.argsort(key, kind="stable")
    key, x, y, d, lab_e = key[order], x[order], y[order], d[order], lab_e[order]
    ex, ey = x + _DX[d], y + _DY[d]
    succ = np.full(key.size, -1, np.int64)
    # Successor: the same bead's edge leaving the end corner, preferring a right turn, then
    # straight on, then left. Two of a bead's edges leave one corner only where its pixels
    # touch diagonally; the right turn keeps those pixels apart.
    for turn in (1, 0, 3):
        todo = succ < 0
        cand = (ey[todo] * (w + 1) + ex[todo]) * 4 + (d[todo] + turn) % 4
        i = np.minimum(np.searchsorted(key, cand), key.size - 1)
        ok = (key[i] == cand) & (lab_e[i] == lab_e[todo])
        idx = np.flatnonzero(todo)[ok]
        succ[idx] = i[ok]
    if (succ < 0).any():  # cannot happen for a label image; guards the invariants above
        raise AssertionError("open outline: edge linking failed")
    # Corners only: an edge whose direction differs from its predecessor's starts a corner.
    pred_d = np.empty_like(d)
    pred_d[succ] = d
    corner = pred_d != d
    ring_of, order = _walk_rings(succ)
    keep = corner[order]
    vx, vy, vring = x[order][keep], y[order][keep], ring_of[order][keep]
    return _EdgeRings(vx, vy, vring, lab_e)


class _EdgeRings:
    """Every ring of a label image as flat arrays (what :func:`trace_outlines` returns as
    a dict): corner vertices ``x``, ``y`` ring after ring (rings ordered by their first
    edge's key, so by top-left corner; vertices in walking order from it) and ``ring``, the
    index of that first edge; ``edge_label`` gives a ring's bead id."""

    def __init__(self, x, y, ring, edge_label):
        self.x, self.y, self.ring = x, y, ring
        bounds = np.flatnonzero(np.diff(ring)) + 1 if ring.size else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], bounds]).astype(np.int64) if ring.size else bounds
        self.stops = np.concatenate([bounds, [ring.size]]).astype(np.int64) \
            if ring.size else bounds
        self.label = edge_label[ring[self.starts]] if ring.size else np.zeros(0, np.int64)


def _walk_rings(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycles of the successor permutation ``succ``, without a Python loop over edges.

    Returns ``ring_of`` (per edge: the smallest edge index of its cycle, where a walk in
    index order starts that ring) and ``order``: all edges, ring after ring (ascending
    start), each ring in walking order from its start. Pointer doubling: ``log2`` of the
    longest ring passes over the edges.
    """
    n = succ.size
    ring_of = np.arange(n)
    jump = succ.copy()
    while True:  # min over i, succ(i), ..., succ^(2^k - 1)(i); stable once 2^k >= ring length
        nxt = np.minimum(ring_of, ring_of[jump])
        if np.array_equal(nxt, ring_of):
            break
        ring_of = nxt
        jump = jump[jump]
    # Steps from each edge to the last edge of its ring (the one whose successor is the
    # start), by list ranking on the ring cut open there.
    last = succ == ring_of
    nxt = np.where(last, np.arange(n), succ)
    to_end = (~last).astype(np.int64)
    while True:
        nn = nxt[nxt]
        if np.array_equal(nn, nxt):
            break
        to_end = to_end + to_end[nxt]
        nxt = nn
    order = np.lexsort((-to_end, ring_of))
    return ring_of, order


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
    xy = np.stack([er.x, er.y], axis=1).astype(np.int32)
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
    idx = np.flatnonzero(pf)
    r, c = np.divmod(idx, lab.shape[1] + 2)
    return pf, idx, pf[idx], r - 1, c - 1


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
    equal to the loop's value bit for bit).

    ``traced_perimeter`` counts vertex 0, every vertex whose incoming side is longer than
    1 px, and within each run of later vertices with 1-px incoming sides every second one
    (its loop alternates there): ``floor(run / 2)`` of a run.
    """
    n_rings = er.starts.size
    x, y = er.x.astype(np.int64), er.y.astype(np.int64)
    nxt = np.arange(1, x.size + 1)
    nxt[er.stops - 1] = er.starts  # the last vertex connects back to the first
    side = np.abs(x[nxt] - x) + np.abs(y[nxt] - y)  # side i: vertex i -> i + 1
    ring_idx = np.repeat(np.arange(n_rings), er.stops - er.starts)
    total = np.bincount(ring_idx, weights=side, minlength=n_rings)
    prev = np.arange(-1, x.size - 1)
    prev[er.starts] = er.stops - 1
    long_in = side[prev] > 1  # the side into each vertex
    first = np.zeros(x.size, bool)
    first[er.starts] = True
    n_corners = np.bincount(ring_idx, weights=(long_in & ~first), minlength=n_rings) + 1
    short = ~long_in & ~first
    # Runs of consecutive short vertices (a first vertex or a long one ends a run).
    run_start = short & ~np.concatenate([[False], short[:-1]])
    run_id = np.cumsum(run_start) - 1
    run_len = np.bincount(run_id[short], minlength=int(run_start.sum()))
    run_ring = ring_idx[run_start]
    n_corners += np.bincount(run_ring, weights=run_len // 2, minlength=n_rings)
    n_vert = er.stops - er.starts
    perim = total - n_corners * (2.0 - math.sqrt(2.0))
    return np.where(n_vert < 4, 0.0, perim)


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
        rings = [(np.stack([er.x[a:b], er.y[a:b]], axis=1).astype(np.int32), p)
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
        img = img.reshape(h * w, -1)[fg].astype(np.float64).mean(axis=1)
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
    for offset in (-pw - 1, -pw, -pw + 1, -1, 1, pw - 1, pw, pw + 1):
        nb = pf[idx + offset]
        other |= (nb != own) & (nb > 0)
    touching = per_bead(other.astype(np.float64)) > 0
    if outlines is None:
        perim = _bead_perimeters(_edge_rings(lab), ids)
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


def write_bead_csv(path: str | os.PathLike, table: dict[str, np.ndarray]) -> None:
    """Write :func:`bead_table` as CSV (header :data:`BEAD_COLUMNS`; NaN as an empty cell)."""
    digits = {"centroid_x": 3, "centroid_y": 3, "equivalent_diameter_px": 3,
              "circularity": 4, "mean_intensity": 4, "prob_mass": 3}
    # Column by column (what csv.writer wrote row by row, ~5x faster on 40k beads): numbers
    # and empty cells need no quoting, so a row is its cells joined by commas.
    cols = []
    for k in BEAD_COLUMNS:
        values = np.asarray(table[k]).tolist()
        if k in digits:
            spec = f".{digits[k]}f"
            cols.append(["" if v != v else format(float(v), spec) for v in values])
        else:
            cols.append([str(int(v)) for v in values])
    lines = [",".join(BEAD_COLUMNS)] + [",".join(row) for row in zip(*cols)]
    mio.atomic_write_text(path, "\n".join(lines) + "\n")


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

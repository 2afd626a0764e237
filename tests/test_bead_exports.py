"""bead_exports.py: per-bead table, ImageJ ROI set, QuPath GeoJSON, OME-TIFF; predict flags."""

import csv
import json
import math
import sys

import numpy as np
import pytest
from skimage.draw import polygon2mask

import bead_exports as be
import microbead_io as mio
import predict_microscope as pm
import prediction_pipeline
from synthetic_beads import render_masks, sample_beads

roifile = pytest.importorskip("roifile")


def _fill(rings, shape):
    """Even-odd fill of pixel-corner rings ``(x, y)`` at pixel centres (skimage, not ours)."""
    m = np.zeros(shape, bool)
    for ring in rings:
        xy = np.asarray(ring, float)
        if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
            xy = xy[:-1]
        m ^= polygon2mask(shape, xy[:, ::-1] - 0.5)  # (row, col) with centres at integers
    return m


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


def _awkward_labels():
    """Beads of 1-9 px across, a ring with a hole, a bead in two parts, diagonal pixels,
    beads touching each other and the image border."""
    lab = np.zeros((40, 48), np.int32)
    yy, xx = np.mgrid[:40, :48]
    for i, (d, cy, cx) in enumerate([(1, 3, 3), (2, 3, 8), (3, 4, 14), (4, 4, 21), (5, 5, 29),
                                     (6, 5, 38), (7, 14, 5), (8, 14, 16), (9, 15, 28)]):
        r = d / 2
        disc = (yy + 0.5 - (cy + 0.5 if d % 2 else cy)) ** 2 + \
            (xx + 0.5 - (cx + 0.5 if d % 2 else cx)) ** 2 <= r * r + 0.25
        lab[disc] = i + 1
    lab[22:29, 2:9] = 10
    lab[24:27, 4:7] = 0          # hole
    lab[25, 5] = 11              # an island bead inside the hole
    lab[22, 14:17] = 12          # two parts of one bead
    lab[26, 14:17] = 12
    lab[30, 30] = lab[31, 31] = lab[32, 32] = 13  # diagonal staircase
    lab[34:40, 40:48] = 14       # touches the border and bead 15
    lab[34:40, 38:40] = 15
    return lab


def test_pixel_edge_outlines_fill_back_to_every_bead_exactly():
    lab = _awkward_labels()
    outlines = be.trace_outlines(lab)
    ids = sorted(int(i) for i in np.unique(lab) if i)
    assert list(outlines) == ids
    for i in ids:
        assert np.array_equal(_fill(outlines[i], lab.shape), lab == i), i
    assert len(outlines[10]) == 2 and be.ring_area(outlines[10][1]) < 0  # outer + hole
    assert len(outlines[12]) == 2 and all(be.ring_area(r) > 0 for r in outlines[12])
    assert len(outlines[13]) == 3  # diagonal pixels are outlined apart, as ImageJ's wand does
    assert be.trace_outlines(np.zeros((5, 5), np.uint16)) == {}


def test_random_label_images_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(30):
        lab = rng.integers(0, 4, (11, 13)) * (rng.random((11, 13)) < 0.6)
        outlines = be.trace_outlines(lab)
        for i, rings in outlines.items():
            assert np.array_equal(_fill(rings, lab.shape), lab == i)


def test_bead_table_by_hand():
    lab = np.zeros((10, 12), np.uint16)
    lab[1:4, 1:4] = 3          # 3x3 square, alone
    lab[6, 9] = 5              # single pixel, alone
    lab[6:8, 2:4] = 7          # 2x2 square touching bead 8 diagonally
    lab[8, 4] = 8
    image = np.arange(120, dtype=np.float32).reshape(10, 12, 1)
    prob = np.full((10, 12), 0.5, np.float32)
    t = be.bead_table(lab, image, prob)
    assert t["bead_id"].tolist() == [3, 5, 7, 8]
    assert t["area_px"].tolist() == [9, 1, 4, 1]
    assert t["centroid_x"][0] == pytest.approx(2.5) and t["centroid_y"][0] == pytest.approx(2.5)
    assert (t["centroid_x"][1], t["centroid_y"][1]) == (9.5, 6.5)  # pixel centre
    assert t["equivalent_diameter_px"][0] == pytest.approx(math.sqrt(36 / math.pi))
    assert t["touching"].tolist() == [0, 0, 1, 1]
    assert t["prob_mass"].tolist() == pytest.approx([4.5, 0.5, 2.0, 0.5])
    assert t["mean_intensity"][0] == pytest.approx(image[1:4, 1:4].mean())
    # ImageJ: a 1x1 ROI has perimeter 4 - 2 (2 - sqrt 2); circularity capped at 1.
    assert be.traced_perimeter(np.array([[0, 0], [1, 0], [1, 1], [0, 1]])) == pytest.approx(
        4 - 2 * (2 - math.sqrt(2)))
    assert t["circularity"][1] == 1.0
    p3 = 12 - 4 * (2 - math.sqrt(2))  # 3x3 square: 4 non-adjacent corners
    assert t["circularity"][0] == pytest.approx(min(1.0, 4 * math.pi * 9 / p3 ** 2))
    empty = be.bead_table(np.zeros((4, 4), np.uint8))
    assert all(v.size == 0 for v in empty.values())


def _predicted_frame(tmp_path, exports, pipelined=True, name="640x_frame_001.png"):
    """A tiny frame through the real prediction path (identity "network" at half scale)."""
    rng = np.random.default_rng(1)
    shape = (96, 128)
    beads = sample_beads(rng, shape, 14, radius=4.5, cluster_fraction=0.4)
    mask, _ = render_masks(beads, shape)
    inp = tmp_path / "in"
    inp.mkdir(exist_ok=True)
    mio.write_image(inp / name, (mask * 180 + 30 + rng.integers(0, 20, shape)).astype(np.uint8))
    cfg = {"preprocessing": {"channels": 1, "pixel_scale": 0.5, "scale": 0.5,
                             "normalization": dict(mio.DEFAULT_NORMALIZATION),
                             "pad_multiple": 4},
           "postprocessing": {"threshold": 0.5, "median_bead_area_px": np.pi * 2.25 ** 2}}
    out = tmp_path / ("pipe" if pipelined else "seq")
    rows = prediction_pipeline.predict_files(
        [inp / name], lambda b: b[..., 0], cfg, out, tile_size=64, overlap=16, batch_size=2,
        figures=False, pipelined=pipelined, exports=frozenset(exports))
    assert rows[0]["status"] == "ok", rows[0]["status"]
    return out, inp / name


def test_roi_set_from_a_predicted_frame_matches_its_label_image(tmp_path):
    out, frame = _predicted_frame(tmp_path, {"roi", "geojson", "ome_tiff"})
    stem = frame.stem
    labels = mio.read_labels(out / "labels" / f"{stem}_labels.tif")
    ids = [int(i) for i in np.unique(labels) if i]
    assert len(ids) > 5
    rois = roifile.roiread(out / "rois" / f"{stem}_rois.zip")
    assert len(rois) == len(ids)
    for roi, bead_id in zip(rois, ids):
        assert roi.name == f"bead-{bead_id:04d}"
        filled = _fill(roi.coordinates(multi=True), labels.shape)
        assert _iou(filled, labels == bead_id) >= 0.95, bead_id
    # The table lists the same beads, in frame pixels.
    with open(out / "beads" / f"{stem}_beads.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == be.BEAD_COLUMNS
    assert [int(r["bead_id"]) for r in rows] == ids
    for r in rows:
        px = labels == int(r["bead_id"])
        assert int(r["area_px"]) == px.sum()
        rr, cc = np.nonzero(px)
        assert float(r["centroid_x"]) == pytest.approx(cc.mean() + 0.5, abs=1e-3)
        assert float(r["centroid_y"]) == pytest.approx(rr.mean() + 0.5, abs=1e-3)
        assert float(r["prob_mass"]) > 0 and r["touching"] in ("0", "1")
    assert any(r["touching"] == "1" for r in rows)  # the frame has clumps
    # OME-TIFF: the frame and the labels as two channels.
    import tifffile

    with tifffile.TiffFile(out / "ome" / f"{stem}.ome.tif") as tif:
        assert tif.is_ome
        data = tif.asarray()
    assert data.shape == (2,) + labels.shape
    np.testing.assert_array_equal(data[1], labels)
    np.testing.assert_array_equal(data[0], mio.read_image(frame)[..., 0])


def test_geojson_is_a_feature_collection_of_beads_in_frame_pixels(tmp_path):
    out, frame = _predicted_frame(tmp_path, {"geojson"})
    labels = mio.read_labels(out / "labels" / f"{frame.stem}_labels.tif")
    ids = [int(i) for i in np.unique(labels) if i]
    fc = json.loads((out / "geojson" / f"{frame.stem}.geojson").read_text())
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == len(ids)
    h, w = labels.shape
    for f, bead_id in zip(fc["features"], ids):
        assert f["type"] == "Feature" and f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == "Bead"
        assert f["properties"]["measurements"]["bead_id"] == bead_id
        geom = f["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        rings = [ring for poly in polys for ring in poly]
        for ring in rings:
            assert ring[0] == ring[-1] and len(ring) >= 5  # closed, RFC 7946
            xy = np.array(ring)
            assert xy.min() >= 0 and xy[:, 0].max() <= w and xy[:, 1].max() <= h
        for poly in polys:  # outer rings counter-clockwise in the numbers, holes clockwise
            assert be.ring_area(np.array(poly[0][:-1])) > 0
            assert all(be.ring_area(np.array(r[:-1])) < 0 for r in poly[1:])
        assert _iou(_fill(rings, labels.shape), labels == bead_id) >= 0.95
    # No beads: an empty collection, an empty ROI set, a header-only table.
    be.write_bead_outputs(tmp_path / "none", "empty", np.zeros((8, 8), np.uint16),
                          roi=True, geojson=True)
    assert json.loads((tmp_path / "none/geojson/empty.geojson").read_text())["features"] == []
    assert roifile.roiread(tmp_path / "none/rois/empty_rois.zip") == []
    assert (tmp_path / "none/beads/empty_beads.csv").read_text().strip() == ",".join(
        be.BEAD_COLUMNS)


def test_composite_beads_round_trip_through_roifile(tmp_path):
    lab = _awkward_labels()
    outlines = be.trace_outlines(lab)
    be.write_roi_zip(tmp_path / "r.zip", outlines)
    rois = roifile.roiread(tmp_path / "r.zip")
    assert [r.name for r in rois] == [f"bead-{i:04d}" for i in outlines]
    for roi, (bead_id, rings) in zip(rois, outlines.items()):
        assert (roi.roitype == roifile.ROI_TYPE.TRACED) == (len(rings) == 1)
        assert np.array_equal(_fill(roi.coordinates(multi=True), lab.shape), lab == bead_id)
    fc = be.geojson_features(outlines, be.bead_table(lab, outlines=outlines))
    by_id = {f["properties"]["measurements"]["bead_id"]: f["geometry"] for f in fc["features"]}
    assert by_id[10]["type"] == "Polygon" and len(by_id[10]["coordinates"]) == 2  # with hole
    assert by_id[12]["type"] == "MultiPolygon"


def test_outputs_are_identical_pipelined_or_not(tmp_path):
    a, frame = _predicted_frame(tmp_path, {"roi", "geojson"}, pipelined=True)
    b, _ = _predicted_frame(tmp_path, {"roi", "geojson"}, pipelined=False)
    for sub, suffix in (("beads", "_beads.csv"), ("rois", "_rois.zip"), ("geojson", ".geojson")):
        name = f"{frame.stem}{suffix}"
        assert (a / sub / name).read_bytes() == (b / sub / name).read_bytes(), name


def test_roi_flag_without_roifile_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "roifile", None)  # import roifile -> ImportError
    with pytest.raises(ImportError, match="pip install roifile"):
        be.require_roifile()
    rc = pm.main(["--model", str(tmp_path / "no_model"), "--input_dir", str(tmp_path),
                  "--output_dir", str(tmp_path / "out"), "--roi"])
    assert rc == 2
    assert "pip install roifile" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flat_ring_perimeters_equal_the_traced_loop_bit_for_bit():
    """bead_table's vectorised perimeters (no outline dict) against traced_perimeter over
    trace_outlines, on images with holes, diagonal touches and beads of several rings."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        lab = ((rng.random((48, 64)) < 0.55) * rng.integers(1, 7, (48, 64))).astype(np.int32)
        fast = be.bead_table(lab)
        slow = be.bead_table(lab, outlines=be.trace_outlines(lab))
        for key in be.BEAD_COLUMNS:
            np.testing.assert_array_equal(fast[key], slow[key])
        outlines = be.trace_outlines(lab)
        assert any(len(r) > 1 for r in outlines.values())  # the several-ring path is used
        expect = [sum(be.traced_perimeter(r) for r in outlines[i]) for i in outlines]
        assert be._bead_perimeters(be._edge_rings(lab), np.array(list(outlines))).tolist() \
            == expect


def test_bead_csv_cells_as_csv_writer_wrote_them(tmp_path):
    table = {k: np.array([1.0, 2.0]) for k in be.BEAD_COLUMNS}
    table["mean_intensity"] = np.array([np.nan, 0.123456])
    table["centroid_x"] = np.array([1.0005, -2.5])
    be.write_bead_csv(tmp_path / "b.csv", table)
    with open(tmp_path / "b.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(be.BEAD_COLUMNS)
    assert rows[1][:3] == ["1", "1.000", "1.000"] and rows[1][6] == ""
    assert rows[2][1] == "-2.500" and rows[2][6] == "0.1235"
    assert (tmp_path / "b.csv").read_bytes().count(b"\r") == 0


def _reference_outlines(lab):
    """trace_outlines by a plain-Python tracer (dicts, one edge at a time): every exposed
    pixel side is an edge (corner, direction) with the bead on its right; from its end
    corner take the bead's edge turning right, else straight on, else left; rings start at
    their smallest (row, column, direction) edge; keep the vertices where the direction
    changes; a bead's rings sorted by decreasing signed area (stable)."""
    h, w = lab.shape
    moves = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # east, south, west, north

    def at(y, x):
        return int(lab[y, x]) if 0 <= y < h and 0 <= x < w else 0

    edges = {}
    for y in range(h):
        for x in range(w):
            v = int(lab[y, x])
            if not v:
                continue
            if at(y - 1, x) != v:
                edges[(y, x, 0)] = v
            if at(y, x + 1) != v:
                edges[(y, x + 1, 1)] = v
            if at(y + 1, x) != v:
                edges[(y + 1, x + 1, 2)] = v
            if at(y, x - 1) != v:
                edges[(y + 1, x, 3)] = v
    seen, out = set(), {}
    for start in sorted(edges):
        if start in seen:
            continue
        ring, e = [], start
        while e not in seen:
            seen.add(e)
            ring.append(e)
            y, x, d = e
            ny, nx = y + moves[d][1], x + moves[d][0]
            e = next(c for c in ((ny, nx, (d + t) % 4) for t in (1, 0, 3))
                     if edges.get(c) == edges[start])
        assert e == start
        verts = [(x, y) for i, (y, x, d) in enumerate(ring) if ring[i - 1][2] != d]
        out.setdefault(edges[start], []).append(np.array(verts, np.int32))
    for rings in out.values():
        rings.sort(key=lambda r: -be.ring_area(r))
    return dict(sorted(out.items()))


def test_ring_tracing_against_a_plain_python_tracer():
    """The vectorised ring construction (local successor rule, one depth-first walk) gives
    the same rings, starts and vertex order as an edge-by-edge tracer, on images with holes,
    diagonal touches, border beads, 1-px beads and gaps in the ids."""
    rng = np.random.default_rng(7)
    images = [_awkward_labels(), np.zeros((3, 4), np.int32), np.full((5, 6), 9, np.uint16),
              np.eye(6, dtype=np.uint8) * 3 + np.eye(6, k=1, dtype=np.uint8) * 5]
    for shape, p, ids in [((9, 11), 0.5, 3), ((14, 10), 0.7, 2), ((16, 17), 0.6, 6),
                          ((1, 12), 0.5, 2), ((12, 1), 0.5, 2)] * 6:
        lab = (rng.random(shape) < p) * rng.choice([1, 2, 7, 40, 65535][:ids + 1], shape)
        images.append(lab.astype(np.int64))
    for lab in images:
        got, want = be.trace_outlines(lab), _reference_outlines(lab)
        assert list(got) == list(want)
        for i in want:
            assert len(got[i]) == len(want[i]) and all(
                g.dtype == np.int32 and np.array_equal(g, r) for g, r in zip(got[i], want[i]))
        expect = [sum(be.traced_perimeter(r) for r in want[i]) for i in want]
        assert be._bead_perimeters(be._edge_rings(lab), np.array(list(want), np.int64)) \
            .tolist() == expect


def test_bead_csv_cells_equal_python_format():
    """The vectorised cells against str(int(v)) and format(v, '.3f') / '.4f' on halfway cases,
    negative zero, tiny negatives, huge values, infinities and NaN (an empty cell)."""
    rng = np.random.default_rng(3)
    special = [0.0, -0.0, 0.0005, 0.0015, 0.0025, 2.5e-4, -2.5e-4, 1.0005, 2.675, 0.00005,
               0.00015, -0.0004, -0.0005, 0.9995, 9.9995, 0.99995, 123456.7895, 1e15, -1e15,
               1.2345e17, 2.0 ** 50 / 1000, 2.0 ** 50 / 999, 1e300, -1e-300, 5e-324,
               np.inf, -np.inf, np.nan, 4503599627370.4995]
    values = np.array(special + (rng.integers(0, 20000, 3000) / 8000).tolist()
                      + (rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 12, 3000)).tolist()
                      + (np.arange(-5000, 5000) / 2000).tolist())
    for digits in (3, 4):
        want = ["" if v != v else format(v, f".{digits}f") for v in values.tolist()]
        cells = be._fixed_cells(values, digits)
        assert [bytes(row[row != 0]).decode() for row in cells] == want
    ints = np.array([0, 7, -7, 10, -10, 99, 100, -1000, 2 ** 62, -(2 ** 62), 10 ** 17])
    for v in (ints, ints.astype(float), np.array([True, False]), np.arange(256, dtype=np.uint8)):
        assert [bytes(row[row != 0]).decode() for row in be._int_cells(v)] == \
            [str(int(x)) for x in v.tolist()]

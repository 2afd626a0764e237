"""Tests for make_synthetic_dataset.py and the synthetic_* modules: densities, exact masks,
counts == labels, layout."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_synthetic_dataset as msd  # noqa: E402  (the command line: main)
import microbead_io as mio  # noqa: E402
import synthetic_beads as sb  # noqa: E402
import synthetic_dataset as sd  # noqa: E402
import synthetic_render as sr  # noqa: E402
import synthetic_scenes as ss  # noqa: E402

EIGHT = np.ones((3, 3), bool)
STEM_RE = re.compile(r"^(\d+)x_2025-05-16_\d\d-\d\d-\d\d_\d{3}_grid_r\d_c\d$")
LARGE_RE = re.compile(r"^(\d+)x_2025-05-16_\d\d-\d\d-\d\d_\d{3}$")


def read_counts(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def touching_ids(labels: np.ndarray) -> set[int]:
    """Ids 8-adjacent to a different id (computed independently of the generator)."""
    out: set[int] = set()
    h, w = labels.shape
    pad = np.pad(labels, 1)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            nb = pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            hit = (labels > 0) & (nb > 0) & (nb != labels)
            out.update(np.unique(labels[hit]).tolist())
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "ds"
    summary = sd.generate_dataset(out, n=14, size=128, seed=0, large=2, large_size=(512, 384),
                                   style="rings")
    return out, summary


# --------------------------------------------------------------------------- densities


def test_allocation_favours_dense_end_and_gives_users_mean():
    alloc = ss.allocate_tiles(73)
    assert sum(alloc) == 73 and len(alloc) == len(ss.DILUTIONS)
    assert all(a >= b for a, b in zip(alloc, alloc[1:]))
    assert min(alloc) >= 1
    requested = [ss.expected_beads(d) for d in ss.DILUTIONS]
    assert requested[0] == 270 and requested[-1] == pytest.approx(270 / 64)
    mean = sum(a * e for a, e in zip(alloc, requested)) / 73
    assert abs(mean - 109) / 109 < 0.05  # users' mean is 109 beads/tile
    assert ss.expected_beads(10240, beads_at_160x=20) == 3  # floor of 3


@pytest.mark.parametrize("beads_at_160x", [270.0, 135.0])
def test_requested_density_comes_out(tmp_path, beads_at_160x):
    # 42 tiles request ~4500 (270) or ~2300 (135) beads in total. The realised total is
    # Poisson around that (sd = sqrt(total): 1.5 % / 2.1 %), so +-10 % is >= 4.7 sd and
    # cannot fail by chance for this fixed seed; it fails if placement loses beads or the
    # density formula drifts. Per dilution only groups asking >= 1000 beads are checked
    # (sd <= 3.2 %, 10 % >= 3 sd); sparse groups are too noisy for a 10 % test.
    summary = sd.generate_dataset(tmp_path / "d", n=42, size=64, seed=0, style="rings",
                                   beads_at_160x=beads_at_160x, log_file=False)
    rows = read_counts(tmp_path / "d" / "counts.csv")
    requested = np.array([float(r["requested_beads"]) for r in rows])
    realised = np.array([int(r["n_beads"]) for r in rows])
    assert requested.mean() == pytest.approx(summary["requested_mean_beads"])
    assert abs(realised.mean() - requested.mean()) / requested.mean() < 0.10
    dil = np.array([int(r["dilution"]) for r in rows])
    for d in ss.DILUTIONS:
        sel = dil == d
        assert requested[sel] == pytest.approx(max(3.0, beads_at_160x * 160 / d))
        if requested[sel].sum() >= 1000:
            assert abs(realised[sel].sum() / requested[sel].sum() - 1) < 0.10
    assert realised.min() >= 3


def test_densest_tile_places_every_bead():
    # Placement must not silently drop beads at 160x (270 beads, ~28 % cover).
    rng = np.random.default_rng(0)
    beads = sb.sample_beads(rng, (512, 512), 300)
    assert len(beads) == 300
    d = np.hypot(beads.y[:, None] - beads.y, beads.x[:, None] - beads.x)
    rsum = beads.r[:, None] + beads.r
    off = ~np.eye(len(beads), dtype=bool)
    assert np.all(d[off] >= rsum[off] - sb.TOUCH_TOLERANCE - 1e-9)  # touch, never overlap
    assert np.all((beads.y >= 0) & (beads.y < 512) & (beads.x >= 0) & (beads.x < 512))


def test_default_positive_ratio_near_users(tmp_path):
    # Users' tiles: ~11.5 % foreground at 109 beads/tile of ~69 px. Size 128 keeps this
    # fast; the expected pixel count of a randomly placed disc equals its area at any scale.
    summary = sd.generate_dataset(tmp_path / "d", size=128, seed=0, log_file=False, style="rings")
    assert summary["n"] == 73
    assert 0.10 <= summary["mean_positive_ratio"] <= 0.13  # got 0.1144 (seed 0)
    assert 100 <= summary["mean_beads"] <= 120
    # Median single-bead area at 128 px: pi * (4.7 * 128 / 256) ** 2 = 17.3 px.
    assert summary["median_bead_area_px"] == pytest.approx(math.pi * 2.35**2, rel=0.2)


# --------------------------------------------------------------------------- files and truth


def test_layout_and_names(small):
    out, summary = small
    rows = read_counts(out / "counts.csv")
    assert len(rows) == 14
    pairing = mio.pair_files(out / "images", out / "masks", strict=True)
    assert len(pairing.pairs) == 14
    loaded = mio.load_pairs(pairing.pairs)  # the trainer's loader reads PNGs and TIFFs alike
    assert loaded.failures == [] and loaded.images.shape == (14, 128, 128, 1)
    assert np.isfinite(loaded.images).all() and set(np.unique(loaded.masks)) == {0, 1}
    stems = {r["stem"] for r in rows}
    assert {p.stem for p in (out / "labels").iterdir()} == stems
    assert {ss.DILUTIONS[0], ss.DILUTIONS[-1]} <= {int(r["dilution"]) for r in rows}
    for r in rows:
        m = STEM_RE.match(r["stem"])
        assert m, r["stem"]
        assert mio.parse_dilution(r["file"]) == int(r["dilution"]) == int(m.group(1))
        assert int(r["dilution"]) in ss.DILUTIONS
        assert r["file"].startswith(r["stem"] + ".")
    assert summary["pixel_scale"] == 128 / 512
    assert summary["bead_radius_px"] == pytest.approx(4.7 * 128 / 256)
    assert json.loads((out / "dataset.json").read_text())["generator"] == sd.GENERATOR
    assert (out / sd.LOG_NAME).is_file()


def test_some_images_are_16bit_tiffs(small):
    out, summary = small
    tifs = sorted((out / "images").glob("*.tif"))
    pngs = sorted((out / "images").glob("*.png"))
    assert len(tifs) == summary["n_tiff16"] >= 14 // 5
    assert len(tifs) + len(pngs) == 14
    for t in tifs:
        arr = tifffile.imread(t)
        assert arr.dtype == np.uint16 and arr.shape == (128, 128)
        assert arr.max() > 255  # uses the 16-bit range, not 8-bit values in a 16-bit file
    arr = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert arr.dtype == np.uint8 and arr.shape == (128, 128)


def test_masks_exactly_0_255_and_labels_match(small):
    out, _ = small
    rows = read_counts(out / "counts.csv")
    for r in rows:
        raw = cv2.imread(str(out / "masks" / f"{r['stem']}.png"), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint8 and raw.ndim == 2
        assert set(np.unique(raw).tolist()) == {0, 255}
        labels = mio.read_labels(out / "labels" / f"{r['stem']}.tif")
        ids = np.unique(labels[labels > 0])
        n = int(r["n_beads"])
        assert ids.tolist() == list(range(1, n + 1))  # count == distinct ids, consecutive
        np.testing.assert_array_equal(labels > 0, raw == 255)
        assert float(r["positive_ratio"]) == pytest.approx((raw == 255).mean(), abs=1e-6)
        assert int(r["n_touching"]) == len(touching_ids(labels))


def test_touching_pairs_exist(small):
    out, _ = small
    rows = read_counts(out / "counts.csv")
    total = sum(int(r["n_touching"]) for r in rows)
    assert total >= 2
    dense = max(rows, key=lambda r: int(r["n_beads"]))
    labels = mio.read_labels(out / "labels" / f"{dense['stem']}.tif")
    assert len(touching_ids(labels)) >= 2  # at least one pair of different ids adjacent
    # ... so a plain connected-component count undercounts this tile.
    _, n_comp = ndimage.label(labels > 0, structure=EIGHT)
    assert n_comp < int(dense["n_beads"])


def test_clusters_touch_but_do_not_overlap():
    rng = np.random.default_rng(3)
    beads = sb.sample_beads(rng, (512, 512), 60, cluster_fraction=1.0)
    assert len(beads) == 60 and np.all(beads.group >= 0)
    d = np.hypot(beads.y[:, None] - beads.y, beads.x[:, None] - beads.x)
    rsum = beads.r[:, None] + beads.r
    np.fill_diagonal(d, np.inf)
    assert np.all(d >= rsum - sb.TOUCH_TOLERANCE - 1e-9)
    same = beads.group[:, None] == beads.group
    touching = (d <= rsum + 1e-9) & same
    assert np.all(touching.any(axis=1))  # every clustered bead touches a group mate


def test_isolated_beads_count_equals_connected_components():
    rng = np.random.default_rng(1)
    scale = 0.25
    # Edges >= 1.5 output px apart: pixel centres of two discs are then > sqrt(2) apart,
    # so no two discs can be 8-adjacent and components == beads.
    beads = sb.sample_beads(rng, (512, 512), 60, cluster_fraction=0.0, min_gap=1.5 / scale)
    assert len(beads) == 60
    mask, labels = sb.render_masks(beads, (128, 128), scale)
    _, n_comp = ndimage.label(mask, structure=EIGHT)
    assert n_comp == 60 == labels.max() == len(np.unique(labels)) - 1
    assert sb.touching_count(labels) == 0
    assert set(np.unique(mask).tolist()) == {0, 1}


def test_mask_disc_area_matches_radius():
    beads = sb.BeadLayout(np.array([100.3]), np.array([200.7]), np.array([9.4]),
                           np.array([-1]))
    mask, labels = sb.render_masks(beads, (256, 256), 0.5)
    # Lattice points in a disc of radius 4.7 px: close to pi r^2 = 69.4.
    assert abs(int(mask.sum()) - math.pi * 4.7**2) <= 6
    ys, xs = np.nonzero(labels == 1)
    assert abs(ys.mean() + 0.5 - 50.15) < 0.3 and abs(xs.mean() + 0.5 - 100.35) < 0.3


def test_debris_darkens_image_but_is_not_in_mask():
    shape = (256, 256)
    beads = sb.sample_beads(np.random.default_rng(2), shape, 25)
    debris = sb.sample_debris(np.random.default_rng(3), shape, 30, beads=beads)
    assert len(debris) >= 20
    assert {d.kind for d in debris} >= {"blob", "speck"}
    ap = sr.sample_appearance(np.random.default_rng(4))
    # Same rng seed for both renders: debris geometry is fixed up front, so the only
    # difference between the two images is the debris itself.
    with_d = sr.render_brightfield(np.random.default_rng(5), beads, shape, appearance=ap,
                                    debris=debris, noise=False)
    without = sr.render_brightfield(np.random.default_rng(5), beads, shape, appearance=ap,
                                     noise=False)
    diff = with_d - without
    assert diff.max() <= 1e-6  # debris never brightens: no bright core, not a ring
    dark = diff < -0.05
    assert dark.sum() > 50
    mask, _ = sb.render_masks(beads, shape, 1.0)
    assert not np.any(mask[dark])


def test_beads_are_rings_dark_rim_bright_core():
    shape = (256, 256)
    beads = sb.sample_beads(np.random.default_rng(0), shape, 20, cluster_fraction=0.0,
                             min_gap=10.0)
    ap = sr.sample_appearance(np.random.default_rng(1))
    img = sr.render_brightfield(np.random.default_rng(2), beads, shape, appearance=ap,
                                 noise=False)
    mask, _ = sb.render_masks(beads, shape, 1.0)
    grown = ndimage.binary_dilation(mask, iterations=4)
    background = float(np.median(img[~grown]))
    inner = ((beads.y > 12) & (beads.y < 244) & (beads.x > 12) & (beads.x < 244))
    cy, cx, r = beads.y[inner], beads.x[inner], beads.r[inner]
    centre = img[cy.astype(int), cx.astype(int)]
    rim = img[(cy + 0.8 * r).astype(int), cx.astype(int)]
    assert np.all(centre > rim + 0.1)
    assert np.mean(rim) < background - 0.12  # dark rim
    assert np.mean(centre) > background  # slightly brighter core


def test_render_values_in_unit_range():
    rng = np.random.default_rng(0)
    beads = sb.sample_beads(rng, (128, 96), 15)
    img = sr.render_brightfield(rng, beads, (128, 96))
    assert img.dtype == np.float32 and img.shape == (128, 96)
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.01
    assert len(sb.sample_beads(rng, (64, 64), 0)) == 0


# --------------------------------------------------------------------------- large frames


def test_large_frames(small):
    out, summary = small
    rows = read_counts(out / "large" / "counts.csv")
    assert [int(r["dilution"]) for r in rows] == [640, 2560]
    for r in rows:
        assert LARGE_RE.match(r["stem"]) and mio.parse_dilution(r["stem"]) == int(r["dilution"])
        img = cv2.imread(str(out / "large" / "images" / r["file"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (384, 512) and img.dtype == np.uint8
        raw = cv2.imread(str(out / "large" / "masks" / f"{r['stem']}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(raw).tolist()) <= {0, 255}
        labels = mio.read_labels(out / "large" / "labels" / f"{r['stem']}.tif")
        np.testing.assert_array_equal(labels > 0, raw == 255)
        assert labels.max() == int(r["n_beads"]) == len(np.unique(labels)) - 1
        # Density per native area equals the tiles': 512 x 384 is 0.75 of a 512^2 tile.
        assert float(r["requested_beads"]) == pytest.approx(
            0.75 * 270 * 160 / int(r["dilution"]), rel=1e-4)
    assert summary["large"]["dilutions"] == [640, 2560]
    assert ss.large_dilutions(1) == [640] and ss.large_dilutions(7) == list(ss.DILUTIONS)


# --------------------------------------------------------------------------- determinism, CLI


def _files(root: Path) -> dict[str, bytes]:
    skip = {"dataset.json", sd.LOG_NAME}
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.mark.parametrize("style", sd.STYLES)
def test_deterministic_for_a_seed(tmp_path, style):
    kw = {"n": 6, "size": 64, "large": 1, "large_size": (128, 96), "log_file": False,
          "style": style}
    s1 = sd.generate_dataset(tmp_path / "a", seed=7, **kw)
    s2 = sd.generate_dataset(tmp_path / "b", seed=7, **kw)
    f1, f2 = _files(tmp_path / "a"), _files(tmp_path / "b")
    # tiles, one large frame, counts.csv, large/counts.csv and large/samples.csv
    assert len(f1) == 6 * 3 + 3 * 1 + 3 and f1 == f2  # identical bytes
    s1.pop("timings_s"), s2.pop("timings_s")
    assert s1 == s2
    sd.generate_dataset(tmp_path / "c", seed=8, **kw)
    assert _files(tmp_path / "c") != f1


def test_cli_hyphen_aliases(tmp_path):
    out = tmp_path / "cli"
    rc = msd.main(["--out-dir", str(out), "--n", "7", "--size", "64", "--large", "1",
                   "--large-size", "128", "96", "--beads-at-160x", "100", "--tiff-every", "0"])
    assert rc == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["beads_at_160x"] == 100 and meta["n_tiff16"] == 0
    assert not list((out / "images").glob("*.tif"))
    assert len(list((out / "large" / "images").glob("*.png"))) == 1
    assert all((out / f).is_file() for f in meta["files"])


def test_bad_arguments_exit_nonzero(tmp_path, caplog):
    assert msd.main(["--out", str(tmp_path / "x"), "--n", "0"]) == 2
    assert "n >= 1" in caplog.text


def test_refuses_non_empty_folder(tmp_path, caplog):
    out = tmp_path / "user"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert msd.main(["--out", str(out), "--n", "3", "--size", "32"]) == 2
    assert str(out) in caplog.text and "not empty" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(FileExistsError, match="not empty"):
        sd.generate_dataset(out, n=3, size=32)


def test_overwrite_replaces_only_own_dataset(tmp_path, caplog):
    out = tmp_path / "ds"
    assert msd.main(["--out", str(out), "--n", "9", "--size", "64"]) == 0
    (out / "notes.txt").write_text("keep me")
    assert msd.main(["--out", str(out), "--n", "4", "--size", "64", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 4  # no stale tiles from the first run
    assert len(list((out / "labels").iterdir())) == 4
    assert (out / "notes.txt").read_text() == "keep me"
    # A file the generator did not write, where the dataset goes: refused even with
    # --overwrite, and kept.
    foreign = out / "images" / "my_tile.png"
    foreign.write_bytes(b"not ours")
    assert msd.main(["--out", str(out), "--n", "4", "--size", "64", "--overwrite"]) == 2
    assert foreign.read_bytes() == b"not ours"
    assert len(list((out / "images").iterdir())) == 5  # refusal deleted nothing
    assert (out / "dataset.json").is_file()
    assert "my_tile.png" in caplog.text


# --------------------------------------------------------------------------- microscope style


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "ds"
    summary = sd.generate_dataset(out, n=12, seed=3, large=1, large_size=(640, 512),
                                   log_file=False)
    return out, summary


def test_microscope_style_is_the_default_and_native_scale(micro):
    out, summary = micro
    assert summary["style"] == "microscope" and summary["size"] == 512
    assert summary["pixel_scale"] == 1.0
    assert summary["grid"]["column_overlap_px"] == 37
    img = mio._read_raw(next((out / "images").glob("*.png")))
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8  # RGB like the users' tiles
    for f in (out / "images").iterdir():
        assert mio.grid_cell(f) is not None, f.name


def test_neighbouring_columns_share_exactly_37_px(micro):
    out, _ = micro
    cells = {}
    for f in (out / "images").iterdir():
        frame, r, c = mio.grid_cell(f)
        cells[(frame, r, c)] = f
    pairs = [(cells[k], cells[(k[0], k[1], k[2] + 1)]) for k in cells
             if (k[0], k[1], k[2] + 1) in cells]
    assert pairs, "the plan cuts runs of neighbouring columns"
    for left, right in pairs:
        a = mio._read_raw(left).astype(np.int64)
        b = mio._read_raw(right).astype(np.int64)
        if a.max() > 255:  # a 16-bit copy of the same 8-bit-scaled pixels
            a //= 257
        if b.max() > 255:
            b //= 257
        assert np.abs(a[:, -37:] - b[:, :37]).max() <= 1
        assert not np.array_equal(a[:, -38:-37], b[:, 0:1])  # and not 38
        ma = mio.read_mask(out / "masks" / f"{mio.stem_key(left)}.png")
        mb = mio.read_mask(out / "masks" / f"{mio.stem_key(right)}.png")
        assert np.array_equal(ma[:, -37:], mb[:, :37])


def test_microscope_beads_are_solid_dark_blue_purple(micro):
    out, _ = micro
    core_rgb, bg_rgb = [], []
    for f in sorted((out / "images").glob("*.png"))[:6]:
        img = mio._read_raw(f).astype(np.float64)
        mask = mio.read_mask(out / "masks" / f.name)
        core = ndimage.binary_erosion(mask, iterations=2)
        if core.sum() < 20:
            continue
        # Solid, not rings: a bead's centre is darker than its rim.
        rim = mask.astype(bool) & ~core
        assert img[core].mean() < img[rim].mean() - 5
        core_rgb.append(img[core].mean(0))
        bg_rgb.append(img[ndimage.binary_dilation(mask, iterations=4) == 0].mean(0))
    core, bg = np.mean(core_rgb, 0), np.mean(bg_rgb, 0)
    # Measured on the users' tiles: beads ~(81, 75, 93) RGB on grey ~(107, 108, 105).
    assert np.all(np.abs(bg - [107, 108, 105]) < 8), bg
    assert np.all(np.abs(core - [81, 75, 93]) < 10), core
    assert core[1] < core[0] < core[2]  # blue-purple: green darkest, blue lightest


def test_microscope_illumination_varies_like_the_microscope():
    rng = np.random.default_rng(1)
    var = []
    for k in range(60):
        ap = sr.sample_microscope_appearance(np.random.default_rng(k))
        origin = sr.micro_tile_origin(int(rng.integers(0, 4)), int(rng.integers(0, 8)))
        var.append(sr.illumination_variation(sr.illumination_field(ap, (512, 512), origin)))
    # Users' tiles: 12 % median, up to 32 % across a tile.
    assert 0.08 < np.median(var) < 0.18
    assert np.percentile(var, 90) > 0.18


def test_microscope_labels_match_masks_and_counts(micro):
    out, _ = micro
    rows = {r["stem"]: r for r in read_counts(out / "counts.csv")}
    for stem, row in rows.items():
        lab = tifffile.imread(out / "labels" / f"{stem}.tif")
        mask = mio.read_mask(out / "masks" / f"{stem}.png")
        assert np.array_equal(lab > 0, mask > 0)
        assert int(row["n_beads"]) == len(np.unique(lab)) - 1 == lab.max()
    large = read_counts(out / "large" / "counts.csv")
    lab = tifffile.imread(out / "large" / "labels" / f"{large[0]['stem']}.tif")
    assert lab.shape == (512, 640) and lab.max() == int(large[0]["n_beads"])


def test_microscope_tiles_group_by_frame(micro):
    out, _ = micro
    groups = {mio.frame_group(f) for f in (out / "images").iterdir()}
    assert 1 < len(groups) < 12  # several tiles per frame
    assert all("_grid_" not in g for g in groups)


def test_dense_frame_places_quickly():
    # A 1920x1080 window at the 160x density (~10,000 beads) places in well under a minute
    # thanks to the cell hash (the brute-force placer was quadratic).
    rng = np.random.default_rng(0)
    beads = sb.sample_beads(rng, (1080, 1920), 10000, radius=4.0, radius_sd=0.35,
                             cluster_fraction=0.45)
    assert len(beads) >= 9900
    d = np.hypot(beads.y[:, None][:400] - beads.y[None, :], beads.x[:, None][:400]
                 - beads.x[None, :])
    lim = beads.r[:400, None] + beads.r[None, :] - sb.TOUCH_TOLERANCE - 1e-9
    np.fill_diagonal(d[:, :400], np.inf)
    assert not np.any(d < lim)


# --------------------------------------------------------------------------- blanks, smudges


def _residual(img: np.ndarray) -> np.ndarray:
    """Luminance relative to its smooth background (0 = background, -0.05 = 5 % darker)."""
    lum = img.mean(axis=2) if img.ndim == 3 else img
    lum = lum.astype(np.float32)
    bg = cv2.GaussianBlur(lum, (0, 0), 40)
    return cv2.GaussianBlur(lum, (0, 0), 1.5) / bg - 1.0


def test_blank_frames_hold_no_bead_but_faint_smudges(tmp_path):
    out = tmp_path / "ds"
    sd.generate_dataset(out, n=1, size=64, seed=0, large_size=(640, 512), blank_frames=2,
                         log_file=False)
    rows = read_counts(out / "large" / "counts.csv")
    assert [r["dilution"] for r in rows] == ["blank", "blank"]
    with open(out / "large" / "samples.csv", newline="") as fh:
        sheet = {r["file"]: r for r in csv.DictReader(fh)}
    for r in rows:
        assert r["n_beads"] == "0"
        assert float(sheet[r["file"]]["concentration"]) == 0.0
        assert sheet[r["file"]]["blank"] == "true"
        assert not mio.read_mask(out / "large" / "masks" / f"{r['stem']}.png").any()
        assert not tifffile.imread(out / "large" / "labels" / f"{r['stem']}.tif").any()
        img = mio._read_raw(out / "large" / "images" / r["file"]).astype(np.float32)
        res = _residual(img)
        # Non-flat: dark blobs of >= 20 px, 2 % or more below the background around them...
        blobs, n = ndimage.label(res < -0.02)
        sizes = np.bincount(blobs.ravel())[1:]
        assert np.sum(sizes >= 20) >= 3, sizes
        # ...none of them as dark as a bead (~30 % below the background).
        assert res.min() > -0.25
    # The other frames' stream is untouched: the same seed gives the same blank frame.
    again = ss.blank_frame(0, 1, (512, 640))
    first = mio._read_raw(out / "large" / "images" / rows[1]["file"]).astype(np.float32)
    assert np.abs(np.round(again["image"] * 255) - first).max() <= 1


def test_smudges_are_fainter_larger_and_blurrier_than_beads():
    shape = (384, 384)
    ap = sr.sample_microscope_appearance(np.random.default_rng(7), frame_shape=shape)
    beads = sb.sample_beads(np.random.default_rng(8), shape, 20, radius=sr.MICRO_RADIUS,
                             radius_sd=sr.MICRO_RADIUS_SD)
    smudges = [d for d in sr.sample_smudges(np.random.default_rng(9), shape, appearance=ap,
                                             beads=beads) if d.kind == "smudge"]
    assert len(smudges) >= 3
    flat = dict(ap, mottle_sd=0.0)
    # Noise-free renders, with and without the smudges: the difference is the smudges alone.
    base = sr.render_microscope(np.random.default_rng(1), beads, shape, appearance=flat,
                                 noise=False).mean(axis=2)
    with_s = sr.render_microscope(np.random.default_rng(1), beads, shape, appearance=flat,
                                   debris=smudges, noise=False).mean(axis=2)
    bg = np.median(base)
    bead_drop = (bg - base) / bg
    smudge_drop = (base - with_s) / bg
    assert smudge_drop.min() > -1e-6  # smudges only darken
    mask, _ = sb.render_masks(beads, shape, 1.0)
    assert not np.any(mask[smudge_drop > 0.01])  # and never sit on a labelled bead

    def describe(drop):
        lab, n = ndimage.label(drop > 0.5 * drop.max())
        peak = np.array(ndimage.maximum(drop, lab, range(1, n + 1)))
        area = np.bincount(lab.ravel())[1:]
        gy, gx = np.gradient(drop)
        # Steepest edge relative to the object's own depth: low = blurred.
        edge = np.array(ndimage.maximum(np.hypot(gy, gx), lab, range(1, n + 1))) / peak
        return peak, area, edge

    bead_peak, bead_area, bead_edge = describe(bead_drop)
    sm_peak, sm_area, sm_edge = describe(smudge_drop)
    assert np.median(bead_peak) > 0.2
    assert sm_peak.max() < np.median(bead_peak) / 3  # fainter
    assert np.median(sm_area) > 1.5 * np.median(bead_area)  # larger (half-depth area)
    assert np.median(sm_edge) < 0.5 * np.median(bead_edge)  # blurrier


def test_smudges_gather_where_the_light_is_dim():
    # The vignetted parts of real frames hold most smudges; specks fall anywhere.
    ap = sr.sample_microscope_appearance(np.random.default_rng(3))
    found = sr.sample_smudges(np.random.default_rng(4), sb.FRAME_SHAPE, appearance=ap)
    light = sr.illumination_field(ap, sb.FRAME_SHAPE)
    dim = light < np.percentile(light, 25)

    def share_in_dim(kind):
        pts = [(int(d.y), int(d.x)) for d in found if d.kind == kind]
        assert len(pts) >= 50
        return float(np.mean([dim[p] for p in pts]))

    assert share_in_dim("smudge") > 0.4  # the dimmest quarter holds far more than a quarter
    assert 0.1 < share_in_dim("speck") < 0.4

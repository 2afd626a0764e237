"""The image I/O module: every trap of the old pipeline, tested by name."""

import logging

import cv2
import numpy as np
import pytest
import tifffile

import microbead_io as mio


def _asym_image(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w)) * 200 + 20).astype(np.uint8)
    img[5:12, 3:30] = 250  # asymmetric bright bar
    return img


def test_grayscale_rgb_rgba_read_as_same_luminance(tmp_path):
    g = _asym_image()
    rgb = np.stack([g, g, g], axis=-1)
    rgba = np.dstack([rgb, np.full_like(g, 255)])
    cv2.imwrite(str(tmp_path / "g.png"), g)
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    ref = mio.read_image(tmp_path / "g.png")
    assert ref.dtype == np.float32 and ref.shape == (40, 56, 1)
    for name in ("rgb.png", "rgba.png", "rgb.tif"):
        out = mio.read_image(tmp_path / name)
        assert out.shape == (40, 56, 1)
        np.testing.assert_allclose(out, ref, atol=0.51)


def test_channel_order_is_rgb_for_png_and_tif(tmp_path):
    # A pure-red image must have R in channel 0 whichever reader decoded it
    # (the old pipeline mixed OpenCV's BGR with RGB).
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    cv2.imwrite(str(tmp_path / "red.png"), cv2.cvtColor(red, cv2.COLOR_RGB2BGR))
    tifffile.imwrite(tmp_path / "red.tif", red)
    for name in ("red.png", "red.tif"):
        out = mio.read_image(tmp_path / name, channels=3)
        assert out[..., 0].mean() == 200 and out[..., 2].mean() == 0
        lum = mio.read_image(tmp_path / name, channels=1)
        np.testing.assert_allclose(lum, 0.299 * 200, rtol=1e-5)


def test_normalization_identical_for_8bit_and_16bit_copies(tmp_path):
    g = _asym_image()
    cv2.imwrite(str(tmp_path / "a8.png"), g)
    tifffile.imwrite(tmp_path / "a16.tif", g.astype(np.uint16) * 257)
    n8 = mio.normalize_image(mio.read_image(tmp_path / "a8.png"))
    n16 = mio.normalize_image(mio.read_image(tmp_path / "a16.tif"))
    np.testing.assert_allclose(n8, n16, atol=1e-6)
    assert n8.min() == 0.0 and n8.max() == 1.0


def test_normalization_of_constant_image_is_zero_not_nan():
    out = mio.normalize_image(np.full((4, 4, 1), 7.0, np.float32))
    assert np.all(out == 0) and out.dtype == np.float32


@pytest.mark.parametrize(
    "raw",
    [
        np.array([[0, 1], [1, 0]], np.uint8),
        np.array([[0, 255], [255, 0]], np.uint8),
        np.array([[0, 65535], [65535, 0]], np.uint16),
        np.dstack([np.array([[0, 255], [255, 0]], np.uint8)] * 3),
    ],
    ids=["0-1", "0-255", "0-65535", "3-channel"],
)
def test_mask_encodings_binarize_to_zero_one(raw):
    out = mio.binarize_mask(raw)
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])
    assert out.dtype == np.uint8


def test_antialiased_mask_binarizes_at_half_max_and_warns_naming_file(tmp_path, caplog):
    m = np.array([[0, 30, 127, 128, 200, 255]], np.uint8)
    path = tmp_path / "aa_mask.png"
    cv2.imwrite(str(path), m)
    with caplog.at_level(logging.WARNING, logger="microbead.io"):
        out = mio.read_mask(path)
    np.testing.assert_array_equal(out, [[0, 0, 0, 1, 1, 1]])
    assert "aa_mask.png" in caplog.text and "grey levels" in caplog.text


def test_resize_mask_stays_binary():
    rng = np.random.default_rng(0)
    m = (rng.random((97, 131)) > 0.7).astype(np.uint8) * 255
    for size in [(256, 256), (50, 61), 33]:
        out = mio.resize_mask(m, size)
        assert set(np.unique(out)) <= {0, 1}
        assert out.dtype == np.uint8


def test_resize_image_uses_area_when_shrinking():
    # A 1-pixel checkerboard averages to its mean under area interpolation; nearest or
    # linear sampling would alias to 0 or 1.
    chk = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[..., None]
    out = mio.resize_image(chk, 32)
    assert out.shape == (32, 32, 1)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_pairing_tolerates_suffixes_and_extensions(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((4, 4), np.uint8)
    for name in ("a.png", "b.tif", "c.jpg"):
        mio.write_image(tmp_path / "images" / name, img)
    for name in ("a_mask.png", "b-mask.png", "c.bmp"):
        mio.write_image(tmp_path / "masks" / name, img)
    res = mio.pair_files(tmp_path / "images", tmp_path / "masks")
    assert res.ok
    assert [(i.name, m.name) for i, m in res.pairs] == [
        ("a.png", "a_mask.png"),
        ("b.tif", "b-mask.png"),
        ("c.jpg", "c.bmp"),
    ]


def test_missing_mask_is_reported_by_name_never_shifted(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, name in enumerate(["a", "b", "c"]):
        mio.write_image(tmp_path / "images" / f"{name}.png", np.full((4, 4), i, np.uint8))
    for name in ["a", "c", "z"]:
        mio.write_image(tmp_path / "masks" / f"{name}.png", np.zeros((4, 4), np.uint8))
    res = mio.pair_files(tmp_path / "images", tmp_path / "masks")
    # b has no mask: c must still pair with c (the old loader paired b with c's mask).
    assert [(i.stem, m.stem) for i, m in res.pairs] == [("a", "a"), ("c", "c")]
    assert [p.name for p in res.unpaired_images] == ["b.png"]
    assert [p.name for p in res.unpaired_masks] == ["z.png"]
    with pytest.raises(mio.PairingError, match=r"b\.png: image has no mask"):
        mio.pair_files(tmp_path / "images", tmp_path / "masks", strict=True)


def test_corrupt_file_error_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "broken_tile.png"
    bad.write_bytes(b"this is not a png")
    badtif = tmp_path / "broken.tif"
    badtif.write_bytes(b"II*\x00garbage")
    for p in (bad, badtif, tmp_path / "missing.png"):
        with pytest.raises(mio.ImageReadError) as ei:
            mio.read_image(p)
        msg = str(ei.value)
        assert p.name in msg and "\n" not in msg


def test_size_mismatch_names_both_files(tmp_path):
    mio.write_image(tmp_path / "img.png", np.zeros((10, 12), np.uint8))
    mio.write_mask(tmp_path / "img_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(mio.SizeMismatchError) as ei:
        mio.load_pair(tmp_path / "img.png", tmp_path / "img_mask.png")
    assert "img.png" in str(ei.value) and "img_mask.png" in str(ei.value)


def test_load_pairs_skips_bad_files_and_keeps_the_rest(tmp_path):
    good = np.zeros((16, 16), np.uint8)
    good[4:8, 4:8] = 255
    mio.write_image(tmp_path / "ok.png", good)
    mio.write_mask(tmp_path / "ok_mask.png", good)
    (tmp_path / "bad.png").write_bytes(b"junk")
    mio.write_mask(tmp_path / "bad_mask.png", good)
    res = mio.load_pairs(
        [
            (tmp_path / "bad.png", tmp_path / "bad_mask.png"),
            (tmp_path / "ok.png", tmp_path / "ok_mask.png"),
        ],
        image_size=8,
    )
    assert res.files == ["ok.png"] and res.images.shape == (1, 8, 8, 1)
    assert len(res.failures) == 1 and "bad.png" in res.failures[0]
    assert set(np.unique(res.masks)) == {0, 1}


def test_write_mask_is_0_255_and_roundtrips(tmp_path):
    m = np.zeros((5, 7), np.uint8)
    m[1:3, 2:6] = 1
    mio.write_mask(tmp_path / "m.png", m)
    raw = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(mio.read_mask(tmp_path / "m.png"), m)
    lab = np.arange(35, dtype=np.int32).reshape(5, 7) * 100
    mio.write_labels(tmp_path / "l.tif", lab)
    np.testing.assert_array_equal(mio.read_labels(tmp_path / "l.tif"), lab)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("640x_2025-05-16_00-59-00_002_grid_r1_c1.tif", 640),
        ("10240x_2025-05-16_01-00-00_007.png", 10240),
        ("sample_160x_grid.png", 160),
        ("tile_r1_c1.png", None),
        ("img_3x3.png", None),
    ],
)
def test_parse_dilution(name, expected):
    assert mio.parse_dilution(name) == expected


def test_tile_starts_cover_everything_with_requested_overlap():
    for length, tile, ov in [(2160, 256, 32), (1080, 256, 64), (300, 256, 32), (256, 256, 32)]:
        starts = mio.tile_starts(length, tile, ov)
        assert starts[0] == 0 and starts[-1] == length - tile
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all()
        gaps = np.diff(starts)
        assert np.all(tile - gaps >= ov)


def _local_fn(batch):
    # A purely local "network": 3x3 box filter of the first channel. Any seam or
    # normalisation-per-tile bug would show up as a difference from the whole-image result.
    out = np.empty(batch.shape[:3], np.float32)
    for i, b in enumerate(batch):
        out[i] = cv2.blur(b[..., 0], (3, 3), borderType=cv2.BORDER_REFLECT_101)
    return out


@pytest.mark.parametrize("shape", [(300, 517), (64, 64), (40, 90), (256, 256)])
def test_tiled_prediction_equals_whole_image(shape):
    rng = np.random.default_rng(1)
    img = rng.random(shape + (1,)).astype(np.float32)
    whole = _local_fn(img[None])[0]
    tiled = mio.predict_tiled(img, _local_fn, tile_size=64, overlap=16, batch_size=3)
    assert tiled.shape == shape
    # Tile borders differ only where the 3x3 filter saw padding; the blend window gives those
    # pixels ~no weight wherever another tile covers them, but image borders still see padding.
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-3)


def test_every_call_gets_the_same_batch_and_one_tile_is_not_padded():
    img = np.random.default_rng(2).random((150, 230, 1)).astype(np.float32)
    seen = []

    def fn(batch):
        seen.append(batch.shape)
        return _local_fn(batch)

    plan = mio.plan_tiles(img.shape, 64, 16, 16)
    assert plan.n_tiles % 4  # the last batch is short
    tiled = mio.predict_tiled(img, fn, tile_size=64, overlap=16, batch_size=4)
    assert {s[0] for s in seen} == {4}  # zero tiles fill the last batch: one traced shape
    assert len(seen) == -(-plan.n_tiles // 4)
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(tiled[inner], _local_fn(img[None])[0][inner], atol=1e-3)
    seen.clear()
    whole = mio.predict_tiled(img, fn, tile_size=256, overlap=16, batch_size=4)
    assert seen == [(1, 160, 240, 1)]  # one tile: one tile computed, not batch_size
    np.testing.assert_allclose(whole, _local_fn(np.pad(img, ((0, 10), (0, 10), (0, 0)),
                                                       mode="reflect")[None])[0][:150, :230])


def test_blend_window_positive_and_symmetric():
    w = mio.blend_window(64, 16)
    assert w.shape == (64, 64) and w.min() > 0 and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])


def test_unique_path_never_overwrites(tmp_path):
    p = tmp_path / "run"
    assert mio.unique_path(p) == p
    p.mkdir()
    assert mio.unique_path(p) == tmp_path / "run_2"

"""The image I/O module: every trap of the old pipeline, tested by name."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import microbead_io as mio
import runtime


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


def _discs(n, size, seed, value=None, radius=(3, 6)):
    """``(size, size)`` int32 image of ``n`` random discs, value ``i`` (labels) or ``value``."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, (cx, cy), int(rng.integers(radius[0], radius[1] + 1)),
                   int(i if value is None else value), -1)
    return img


def test_label_image_used_as_mask_keeps_every_bead(tmp_path, caplog):
    # *_labels.tif pairs as a mask; cut at half its maximum, ids 1..149 of 300 would vanish.
    lab = _discs(300, 512, seed=0).astype(np.uint16)
    assert np.unique(lab).size - 1 > 250  # some discs are covered by later ones
    path = tmp_path / "frame_labels.tif"
    tifffile.imwrite(path, lab)
    assert mio.stem_key(path) == "frame"
    with caplog.at_level(logging.INFO, logger="microbead.io"):
        mask, rule = mio.read_mask(path, return_rule=True)
    assert rule == mio.MASK_RULE_LABELS
    np.testing.assert_array_equal(mask, lab > 0)
    assert "frame_labels.tif" in caplog.text and "instance-label" in caplog.text
    # Few ids too (3 beads: id 1 is below half of 3), and a float32 label image (Fiji).
    few = np.zeros((40, 40), np.uint8)
    few[2:10, 2:10], few[20:28, 5:13], few[25:35, 25:35] = 1, 2, 3
    np.testing.assert_array_equal(mio.binarize_mask(few), few > 0)
    np.testing.assert_array_equal(mio.binarize_mask(lab.astype(np.float32)), lab > 0)


def test_antialiased_png_mask_is_still_cut_at_half_max(tmp_path):
    # A 0/255 mask drawn at 4x and shrunk with INTER_AREA: 8-bit greyscale ramps on every
    # bead edge; the ramps' low values must stay background (not read as label ids).
    big = _discs(60, 1024, seed=1, value=255, radius=(12, 24)).astype(np.uint8)
    aa = cv2.resize(big, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.unique(aa).size > 10
    path = tmp_path / "aa_mask.png"
    cv2.imwrite(str(path), aa)
    mask, rule = mio.read_mask(path, return_rule=True)
    assert rule == mio.MASK_RULE_HALF_MAX
    np.testing.assert_array_equal(mask, aa >= 127.5)
    # Smoothly upsampled (ramps several pixels wide) and JPEG-compressed masks likewise.
    small = _discs(60, 256, seed=2, value=255, radius=(2, 3)).astype(np.uint8)
    up = cv2.resize(small, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    assert mio.mask_rule(up) == mio.MASK_RULE_HALF_MAX
    jpeg = cv2.imdecode(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], 0)
    assert mio.mask_rule(jpeg) == mio.MASK_RULE_HALF_MAX
    for two_level in (small, small // 255, small.astype(np.uint16) * 257):
        assert mio.mask_rule(two_level) == mio.MASK_RULE_TWO_LEVEL
        np.testing.assert_array_equal(mio.binarize_mask(two_level), small > 0)


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


def test_unique_path_never_overwrites(tmp_path):
    p = tmp_path / "run"
    assert mio.unique_path(p) == p
    p.mkdir()
    assert mio.unique_path(p) == tmp_path / "run_2"


def test_usable_cpus_respects_ncpus_omp_and_affinity(monkeypatch):
    monkeypatch.delenv("NCPUS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    affinity = len(os.sched_getaffinity(0))
    assert runtime.usable_cpus() == affinity
    monkeypatch.setenv("NCPUS", "1")
    assert runtime.usable_cpus() == 1
    monkeypatch.setenv("NCPUS", "")  # empty / junk / 0: ignored
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert runtime.usable_cpus() == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.usable_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(affinity + 64))  # never more than the affinity
    assert runtime.usable_cpus() == affinity


def test_importing_modules_changes_nothing_and_entry_points_bound_opencv_threads():
    # A fresh interpreter: importing a library module leaves OpenCV's pool alone (no side
    # effect at import); runtime.configure_threads, which entry points call, bounds it by
    # NCPUS so a shared PBS node is not oversubscribed.
    env = {**os.environ, "NCPUS": "1"}
    env.pop("OMP_NUM_THREADS", None)
    code = ("import cv2; n0 = cv2.getNumThreads(); import microbead_io, tiling, runtime; "
            "n1 = cv2.getNumThreads(); runtime.configure_threads(); "
            "print(n0, n1, cv2.getNumThreads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(mio.__file__).parent,
                         env=env, capture_output=True, text=True, check=True)
    n0, n1, n2 = map(int, out.stdout.split())
    assert n1 == n0
    assert n2 == 1


def test_atomic_write_under_threads_never_flips_the_umask(tmp_path, monkeypatch):
    # The umask is process-wide: reading it with os.umask(0) + os.umask(old) while other
    # threads create files can leave files (and the process) world-writable. 8 threads x 25
    # files, as predict's finisher threads write; os.umask is spied on and slowed down so a
    # flip, if any, overlaps other threads' writes.
    import threading
    import time as _time

    calls = []
    real_umask = os.umask

    def spy(mask):
        calls.append(mask)
        old = real_umask(mask)
        _time.sleep(0.001)
        return old

    old = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", spy)
        start = threading.Barrier(8)
        errors = []

        def work(t):
            try:
                start.wait()
                for i in range(25):
                    kind = i % 4
                    p = tmp_path / f"t{t}_{i}"
                    if kind == 0:
                        mio.atomic_write_text(p.with_suffix(".txt"), "x")
                    elif kind == 1:
                        mio.atomic_write_json(p.with_suffix(".json"), {"v": float("nan")})
                    elif kind == 2:
                        mio.atomic_write_csv(p.with_suffix(".csv"), [{"a": 1}], ["a"])
                    else:
                        mio.write_mask(p.with_suffix(".png"), np.eye(4, dtype=np.uint8))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        monkeypatch.setattr(os, "umask", real_umask)
        assert not errors
        assert calls == []  # never read or changed
        assert real_umask(0o027) == 0o027  # the process umask is what it was
        files = sorted(tmp_path.iterdir())
        assert len(files) == 200  # and no temporary file left behind
        modes = {f.name: f.stat().st_mode & 0o777 for f in files}
        assert set(modes.values()) == {0o640}, {k: oct(v) for k, v in modes.items()
                                                if v != 0o640}
        assert (tmp_path / "t0_1.json").read_text() == '{\n  "v": null\n}\n'
    finally:
        real_umask(old)


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("old")

    def broken(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        mio.atomic_write(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.csv"]


def _lit_frame(rng, h, w, channels=1):
    """Grey field with a lamp fall-off and dark specks (float32, 8-bit range)."""
    img = rng.normal(180.0, 6.0, (h, w, channels)).astype(np.float32)
    img *= np.linspace(0.6, 1.1, w, dtype=np.float32)[None, :, None]
    ys, xs = rng.integers(0, h, 40), rng.integers(0, w, 40)
    img[ys, xs] *= 0.4
    return img


@pytest.mark.parametrize("window", [15, 33])
def test_normalising_in_row_strips_gives_the_same_values(window):
    # The strips get flatfield_reach rows of context: each keeps exactly the rows the whole
    # frame would give it, whatever the strip count or frame height.
    rng = np.random.default_rng(window)
    spec = {"method": "flatfield", "window": window, "low": 0.6, "high": 1.02}
    reach = mio.normalization_reach(spec)
    for h, w, threads in [(401, 120, 2), (517, 90, 3), (300, 64, 4)]:
        img = _lit_frame(rng, h, w)
        whole = mio.apply_normalization(img, spec)
        got = mio.map_row_strips(lambda rows: mio.apply_normalization(rows, spec), img,
                                 reach, threads)
        assert got.shape == whole.shape and got.tobytes() == whole.tobytes()
    # Less context than the closing and the blur reach does change values at the cuts.
    short = mio.map_row_strips(lambda rows: mio.apply_normalization(rows, spec), img,
                               reach // 4, 2)
    assert not np.array_equal(short, whole)


def test_normalization_reach_per_method():
    assert mio.normalization_reach({"method": "flatfield", "window": 65,
                                    "low": 0.6, "high": 1.0}) == 64 + 65
    assert mio.normalization_reach({"method": "none"}) == 0
    assert mio.normalization_reach(mio.DEFAULT_NORMALIZATION) is None  # per-image percentiles


def test_a_frame_too_short_for_strips_is_done_whole():
    calls = []
    img = np.zeros((50, 8), np.float32)
    mio.map_row_strips(lambda rows: calls.append(rows.shape) or rows, img, 20, 4)
    assert calls == [(50, 8)]

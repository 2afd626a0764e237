"""The properties the users' real tiles need (issue: real brightfield tiles).

Native-resolution 512-px grid tiles of 3840x2160 frames, uneven illumination, neighbouring
columns overlapping by 37 px. Each test names the property: crop-invariant normalisation,
the same mask for a tile predicted alone and inside its frame, frame-grouped splits, a pixel
scale that is never guessed, and a warning for frames at another scale.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import label_quality as lq
import microbead_io as mio
import microbead_metrics as mm
import prediction as pm
import synthetic_beads as sb
import synthetic_dataset as sd
import synthetic_render as sr
import tiling
import train_microbead_optimized as tmo
import training_data
import training_split


def _micro_window(shape=(512, 987), n=160, seed=0, origin=(549, 950)):
    """A microscope-style RGB window (two neighbouring grid tiles wide) and its beads."""
    rng = np.random.default_rng(seed)
    ap = sr.sample_microscope_appearance(np.random.default_rng(seed + 100))
    beads = sb.sample_beads(rng, shape, n, radius=sr.MICRO_RADIUS, radius_sd=0.35)
    img = sr.render_microscope(rng, beads, shape, appearance=ap, origin=origin) * 255.0
    return mio.to_channels(img, 1), beads


FLAT = {"method": "flatfield", "window": 33, "low": 0.6, "high": 1.02}


def test_flatfield_normalise_then_crop_equals_crop_then_normalise():
    frame, _ = _micro_window()
    whole = mio.apply_normalization(frame, FLAT)
    y0, x0 = 0, 475  # the right-hand grid tile of the window
    tile = mio.apply_normalization(frame[y0:y0 + 512, x0:x0 + 512], FLAT)
    band = 33 + 3 * math.ceil(33 / 4)  # closing window + 3 sigma of the smoothing
    inner = (slice(band, 512 - band), slice(band, 512 - band))
    diff = np.abs(tile - whole[y0:y0 + 512, x0:x0 + 512])
    assert diff[inner].max() <= 1e-3
    # The per-image percentile method is what broke this on the users' tiles.
    pct = mio.apply_normalization(frame[y0:y0 + 512, x0:x0 + 512], mio.DEFAULT_NORMALIZATION)
    pct_whole = mio.apply_normalization(frame, mio.DEFAULT_NORMALIZATION)
    assert np.abs(pct - pct_whole[y0:y0 + 512, x0:x0 + 512])[inner].max() > 1e-3


def test_flatfield_evens_out_uneven_illumination():
    frame, beads = _micro_window(n=60)
    norm = mio.apply_normalization(frame, FLAT)[..., 0]
    mask, _ = sb.render_masks(beads, frame.shape[:2])
    far = np.ones_like(mask, bool)
    far[np.nonzero(np.lib.stride_tricks.sliding_window_view(
        np.pad(mask, 6), (13, 13)).max(axis=(2, 3)))] = False
    raw_bg = frame[..., 0][far]
    # Raw background varies by several % across the window; after division it is flat.
    assert np.ptp(np.percentile(raw_bg, [5, 95])) / raw_bg.mean() > 0.03
    bg = norm[far]
    assert np.percentile(bg, 95) - np.percentile(bg, 5) < 0.1
    assert np.median(norm[mask > 0]) < np.median(bg) - 0.4  # beads stay dark


def test_flatfield_spec_is_validated():
    with pytest.raises(ValueError, match="window"):
        mio.apply_normalization(np.ones((8, 8, 1), np.float32), {"method": "flatfield",
                                                                  "low": 0, "high": 1})
    with pytest.raises(ValueError, match="unknown normalization method"):
        mio.apply_normalization(np.ones((8, 8, 1), np.float32), {"method": "zscore"})


@pytest.fixture(scope="module")
def tiny_unet():
    import keras

    import models

    keras.utils.set_random_seed(0)
    return models.build_model("unet", (None, None, 1), filters=4, depth=3, dropout=0.0,
                              batch_norm=True)


def _cfg(window, scale=1.0):
    return {
        "preprocessing": {"channels": 1, "scale": scale, "pixel_scale": 1.0,
                          "normalization": {**FLAT, "window": window}, "pad_multiple": 8},
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 50.0},
    }


def test_tile_alone_and_inside_its_frame_give_the_same_mask(tiny_unet):
    # The tile starts on the network's pooling grid (480 = 60 x 2^3): an untrained net is
    # not shift-equivariant, so this isolates what preprocessing and tiling must guarantee.
    # At the users' own offsets (475, 549) a trained model agrees at IoU ~0.99 (measured in
    # benchmarks/bench_real_tiles.py).
    frame, _ = _micro_window(shape=(512, 992), n=200)
    cfg = _cfg(33)
    fn = pm.make_keras_predict_fn(tiny_unet)
    x_frame = pm.preprocess_frame(frame, cfg["preprocessing"])
    prob_frame = tiling.predict_tiled(x_frame, fn, tile_size=2048, overlap=64, batch_size=1,
                                      pad_multiple=8)
    x0 = 480
    tile = frame[:, x0:x0 + 512]
    prob_tile = tiling.predict_tiled(pm.preprocess_frame(tile, cfg["preprocessing"]), fn,
                                     tile_size=2048, overlap=64, batch_size=1, pad_multiple=8)
    # An untrained net: threshold at the frame's median probability so the mask is far from
    # trivial (half the pixels), then compare the tile's interior.
    thr = float(np.median(prob_frame))
    a = prob_tile >= thr
    b = prob_frame[:, x0:x0 + 512] >= thr
    band = 33 + 3 * 9 + 32  # normalisation band + a depth-3 network's reach
    inner = (slice(band, 512 - band), slice(band, 512 - band))
    assert 0.2 < b[inner].mean() < 0.8
    iou = (a[inner] & b[inner]).sum() / (a[inner] | b[inner]).sum()
    assert iou >= 0.98
    assert np.abs(prob_tile - prob_frame[:, x0:x0 + 512])[inner].max() < 1e-3


# --------------------------------------------------------------------------- splits


def _grid_names(n_frames=9, tiles=4, seed=0):
    rng = np.random.default_rng(seed)
    names, counts = [], []
    for f in range(n_frames):
        dil = [160, 640, 2560][f % 3]
        for c in range(tiles):
            names.append(f"{dil}x_2025-05-16_00-5{f}-00_{f:03d}_grid_r1_c{c}.png")
            counts.append(int(rng.poisson(1300 * 160 / dil)))
    return names, np.array(counts)


def test_no_frame_on_both_sides_of_the_split_or_any_fold():
    names, counts = _grid_names()
    groups = [mio.frame_group(n) for n in names]
    assert len(set(groups)) == 9
    strata = mm.density_strata(counts)
    for seed in range(5):
        tr, va = training_split.stratified_split(strata, 0.15, seed, groups=groups)
        assert va.size and tr.size and np.intersect1d(tr, va).size == 0
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
        assert len(tr) + len(va) == len(names)
    folds = training_split.stratified_kfold(strata, 3, 0, groups=groups)
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(len(names)))
    for tr, va in folds:
        assert not {groups[i] for i in tr} & {groups[i] for i in va}


def test_frame_group_rules():
    assert mio.frame_group("640x_2025_003_grid_r1_c4.png") == "640x_2025_003"
    assert mio.frame_group("640x_2025_003_grid_r1_c4_mask.png") == "640x_2025_003"
    assert mio.frame_group("plain_name.tif") == "plain_name"
    assert mio.frame_group("wellA_site3_t1.png", r"^(well\w)_") == "wellA"
    assert mio.frame_group("other.png", r"^(well\w)_") == "other"
    assert mio.grid_cell("x_grid_r2_c7.png") == ("x", 2, 7)


def test_one_frame_cannot_be_split_and_says_why():
    names, counts = _grid_names(n_frames=1)
    with pytest.raises(ValueError, match="group"):
        training_split.stratified_split(mm.density_strata(counts), 0.15, 0,
                             groups=[mio.frame_group(n) for n in names])


# --------------------------------------------------------------------------- scale


def _dataset(root, names, meta=None):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    img = np.full((32, 32), 100, np.uint8)
    for n in names:
        mio.write_image(root / "images" / n, img)
        mio.write_mask(root / "masks" / n, (img > 200).astype(np.uint8))
    if meta is not None:
        (root / "dataset.json").write_text(json.dumps(meta))
    return [n for n in names]


def test_native_grid_tiles_resolve_scale_one_and_say_why(tmp_path):
    names = _dataset(tmp_path, [f"160x_a_001_grid_r0_c{c}.png" for c in range(3)])
    value, source = training_data.resolve_pixel_scale(tmp_path, None, names)
    assert value == 1.0 and "grid" in source


def test_no_clue_stops_with_an_error_naming_the_flag(tmp_path):
    names = _dataset(tmp_path, ["a.png", "b.png"])
    with pytest.raises(training_data.ScaleError, match="--pixel_scale"):
        training_data.resolve_pixel_scale(tmp_path, None, names)


def test_flag_and_dataset_json_win_over_names(tmp_path):
    names = _dataset(tmp_path, ["x_grid_r0_c0.png"], meta={"pixel_scale": 0.5})
    assert training_data.resolve_pixel_scale(tmp_path, None, names) == (0.5, str(tmp_path /
                                                                       "dataset.json"))
    assert training_data.resolve_pixel_scale(tmp_path, 0.25, names) == (0.25, "--pixel_scale")


def test_frame_two_times_off_scale_gets_scale_warning():
    rng = np.random.default_rng(0)
    beads = sb.sample_beads(rng, (400, 600), 120, radius=4.0, radius_sd=0.3, min_gap=2.0)
    mask, _ = sb.render_masks(beads, (400, 600))
    area = float(np.median(np.bincount(sb.render_masks(beads, (400, 600))[1].ravel())[1:]))
    # A perfect "network" (probability = mask): at the training scale, no warning.
    res = pm.finish_frame(mask.astype(np.float32), mask.shape, {
        "preprocessing": {"scale": 1.0}, "postprocessing": {"threshold": 0.5,
                                                            "median_bead_area_px": area}})
    assert res["scale_warning"] == "" and 0.8 < res["bead_area_ratio"] < 1.2
    # The same beads seen 2x smaller (a frame at another scale): warned, with the fix.
    half = mio.resize_mask(mask, (200, 300)).astype(np.float32)
    res = pm.finish_frame(half, half.shape, {
        "preprocessing": {"scale": 1.0}, "postprocessing": {"threshold": 0.5,
                                                            "median_bead_area_px": area}})
    assert res["bead_area_ratio"] < 0.4
    assert "another pixel scale" in res["scale_warning"]
    assert "--auto_scale" in res["scale_warning"]


# --------------------------------------------------------------------------- trainer


def test_trainer_on_native_grid_tiles_without_dataset_json(tmp_path):
    data = tmp_path / "data"
    sd.generate_dataset(data, n=8, seed=1, log_file=False, label_noise=True)
    (data / "dataset.json").unlink()  # as the users' folders: no metadata
    rc = tmo.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "runs"),
                   "--models", "unet", "--filters", "4", "--depth", "2", "--epochs", "1",
                   "--steps_per_epoch", "2", "--batch_size", "2", "--image_size", "64",
                   "--val_fraction", "0.3", "--run_dir_file", str(tmp_path / "run.txt")])
    assert rc == 0
    run = (tmp_path / "run.txt").read_text().strip()
    cfg = json.loads((tmp_path / "runs" / run.split("/")[-1] / "config.json").read_text())
    pre = cfg["preprocessing"]
    assert pre["pixel_scale"] == 1.0 and "grid" in pre["pixel_scale_source"]
    assert pre["scale"] == pytest.approx(64 / 512)
    assert pre["normalization"]["method"] == "flatfield"
    assert pre["normalization"]["low"] < pre["normalization"]["high"]
    split = json.loads((tmp_path / "runs" / run.split("/")[-1] / "split.json").read_text())
    # Few frames: validation tiles come from inside the frames, cut to windows that share
    # no pixel with a training neighbour (37 px at 512 = 5 px at 64; 64 - 5 -> 56 on the
    # 4-px pooling grid). Whole-frame validation is still there on request.
    assert split["mode"] == "tiles" and split["val"]
    assert [w[3] - w[2] for w in split["val_windows"]] == [56] * len(split["val"])
    # Noisy masks of neighbouring tiles disagree on their shared 37 px: the ceiling is
    # measured, stored and printed next to val Jaccard.
    ceiling = cfg["data"]["label_consistency_ceiling"]
    assert ceiling and 0 < ceiling["pooled_jaccard"] < 1 and ceiling["n_pairs"] >= 1
    summary = (tmp_path / "runs" / run.split("/")[-1] / "training_summary.csv").read_text()
    header, row = summary.splitlines()[:2]
    col = header.split(",").index("label_ceiling")
    assert float(row.split(",")[col]) == pytest.approx(ceiling["pooled_jaccard"], abs=1e-4)
    # The model's own calibration (object filter, predicted bead size) travels in config.json.
    calib = json.loads((tmp_path / "runs" / run.split("/")[-1] / "calibration_unet.json")
                       .read_text())
    assert set(calib) >= {"object_filter", "predicted_bead_area_px", "validation"}
    assert cfg["postprocessing"]["per_model"]["unet"]["object_filter"] == calib["object_filter"]
    vc = (tmp_path / "runs" / run.split("/")[-1] / "validation_counts.csv").read_text()
    assert vc.splitlines()[0] == "model,file,n_true,n_pred,area_px"
    assert len(vc.splitlines()) == 1 + len(split["val"])


def test_label_noise_degrades_masks_but_keeps_exact_labels(tmp_path):
    summary = sd.generate_dataset(tmp_path / "d", n=10, seed=2, log_file=False,
                                   label_noise=True)
    assert summary["label_noise"]["enabled"] and len(summary["label_noise"]["tiles"]) == 10
    shrunk = 0
    for f in (tmp_path / "d" / "masks").iterdir():
        mask = mio.read_mask(f)
        labels = mio.read_labels(tmp_path / "d" / "labels" / f"{f.stem}.tif")
        rec = next(r for r in summary["label_noise"]["tiles"] if r["stem"] == f.stem)
        if not (rec["dy"] or rec["dx"]):
            # shrunk or dropped; outside the beads only the bridges that merge touching ones
            assert (mask & (labels == 0)).sum() <= 0.1 * max(1, mask.sum())
        shrunk += int(mask.sum() < (labels > 0).sum())
    assert shrunk == 10


# --------------------------------------------------------------------------- validation split


def test_within_frame_validation_spans_every_frame_and_the_density_range():
    # Seven frames of seven tiles each, one density per frame (the shared set's shape).
    names, counts = [], []
    for f, dil in enumerate([160, 320, 640, 1280, 2560, 5120, 10240]):
        for c in range(7):
            names.append(f"{dil}x_2025-05-16_00-5{f}-00_grid_r1_c{c}.png")
            counts.append(int(1300 * 160 / dil) + c)
    groups = [mio.frame_group(n) for n in names]
    strata = mm.density_strata(np.array(counts))
    assert training_split.choose_val_split("auto", names, groups)[0] == "tiles"
    tr, va = training_split.within_frame_split(strata, groups, 0.15, seed=3)
    assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == len(names)
    assert sorted({groups[i] for i in va}) == sorted(set(groups))  # every frame, once
    assert min(counts[i] for i in va) < 30 and max(counts[i] for i in va) > 1000
    # Fewer tiles than frames in the quota: spread over the density order, both ends kept.
    tr, va = training_split.within_frame_split(strata, groups, 3 / 49, seed=0)
    dil = sorted(mio.parse_dilution(names[i]) for i in va)
    assert len(va) == 3 and dil[0] == 160 and dil[-1] == 10240
    # Many frames, or names without grid cells: whole frames validate, as before.
    many = [f"f{i}" for i in range(25)]
    assert training_split.choose_val_split("auto", names, many)[0] == "frames"
    assert training_split.choose_val_split("auto", ["a.png", "b.png"], ["a", "b"])[0] == "frames"
    assert training_split.choose_val_split("frames", names, groups)[0] == "frames"


def test_validation_windows_share_no_pixel_with_training_tiles(tmp_path):
    # Two rows of five 48-px tiles cut from one random frame; columns overlap by 11 px.
    rng = np.random.default_rng(0)
    tile, stride, row_y = 48, 37, (0, 80)
    frame = rng.integers(0, 255, (140, stride * 4 + tile)).astype(np.uint8)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    pairs, where = [], []
    for r, y in enumerate(row_y):
        for c in range(5):
            name = f"320x_a_grid_r{r}_c{c}.png"
            x = c * stride
            mio.write_image(tmp_path / "images" / name, frame[y:y + tile, x:x + tile])
            mio.write_mask(tmp_path / "masks" / name, np.zeros((tile, tile), np.uint8))
            pairs.append((tmp_path / "images" / name, tmp_path / "masks" / name))
            where.append((y, x))
    overlaps = lq.grid_overlaps_from_files([i for i, _ in pairs])
    assert sorted((o.first, o.second, o.side, o.width) for o in overlaps) == [
        (r * 5 + c, r * 5 + c + 1, "right", tile - stride) for r in range(2) for c in range(4)]
    ov = [(o.first, o.second, o.side, o.width) for o in overlaps]
    for val in ([2], [0, 7], [3, 4]):
        train = np.setdiff1d(np.arange(10), val)
        wins = training_split.validation_windows(ov, train, np.array(val), (tile, tile), 4)
        assert len({(y1 - y0, x1 - x0) for y0, y1, x0, x1 in wins}) == 1  # one size
        for v, (y0, y1, x0, x1) in zip(val, wins):
            assert (y1 - y0) % 4 == 0 and (x1 - x0) % 4 == 0 and x1 > x0
            fy, fx = where[v]
            cols = set(range(fx + x0, fx + x1))
            for t in train:
                ty, tx = where[t]
                if ty == fy:  # same row: no frame column may be in both
                    assert not cols & set(range(tx, tx + tile)), (val, v, t)
    # The middle tile of a row loses both shared strips: 48 - 2 * 11 = 26 -> 24 px.
    wins = training_split.validation_windows(ov, np.setdiff1d(np.arange(10), [2]), np.array([2]),
                                  (tile, tile), 4)
    assert wins[0][3] - wins[0][2] == 24

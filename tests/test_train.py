"""Tests of train_microbead_optimized.py and its modules (training_data, training_split,
training_loop, training_outputs): augmentation, split, BatchNorm momentum, end-to-end runs.

Everything is tiny and seeded: one synthetic dataset of 12 tiles of 64x64 px (beads of radius
2 px) is generated once per module; end-to-end runs train a 4-filter depth-2 U-Net for a few
dozen steps. The traps tested by name:

* the mask follows its image through every augmentation (asymmetric pattern whose pixels equal
  the mask), no augmented image is flat / all-zero / mostly saturated, masks stay {0, 1};
* the split is stratified by object density, reproducible, and never leaves validation empty;
* steps per epoch are decoupled from the dataset size and BatchNorm's momentum matches them,
  so inference-mode validation agrees with batch statistics at the end of a short run;
* the best ``.hdf5`` reloads and reproduces the logged best validation Jaccard;
* ``--resume`` continues after the last epoch; an interrupted k-fold run resumes too.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import microbead_config as mcfg
import microbead_io as mio
import microbead_metrics as mm
import train_microbead_optimized as tmo
import training_data
import training_loop
import training_outputs
import training_split
from synthetic_dataset import generate_dataset

N_TILES, TILE = 12, 64
# Tiny U-Net, learning rate high enough to learn something in 30 steps. Runs that only check
# plumbing add --depth 1 (graph tracing, not the steps, dominates their time).
TINY = ["--models", "unet", "--filters", "4", "--depth", "2", "--image_size", str(TILE),
        "--batch_size", "4", "--lr", "1e-2", "--loss", "bce_dice", "--verbose", "0"]
RUN_NAME = re.compile(r"^microbead_training_\d{8}_\d{6}$")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    # radius 8 at 256 px -> 2 px beads at 64 px (the default 4.7 would give 1.2 px dots).
    generate_dataset(out, n=N_TILES, size=TILE, seed=0, radius=8.0, log_file=False, style="rings")
    return out


@pytest.fixture(scope="module")
def small_dataset(dataset, tmp_path_factory) -> Path:
    """The first 6 pairs of ``dataset`` (1 validation image at val_fraction 0.15)."""
    out = tmp_path_factory.mktemp("data6") / "ds6"
    pairs = mio.pair_files(dataset / "images", dataset / "masks").pairs[:6]
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True)
    for ip, mp in pairs:
        shutil.copy(ip, out / "images" / ip.name)
        shutil.copy(mp, out / "masks" / mp.name)
    shutil.copy(dataset / "dataset.json", out / "dataset.json")
    return out


@pytest.fixture(scope="module")
def main_run(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    run_file = out / "run_dir.txt"
    rc = tmo.main(["--data_dir", str(dataset), "--output_dir", str(out), *TINY,
                   "--epochs", "2", "--steps_per_epoch", "15", "--run_dir_file", str(run_file)])
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 1
    return {"rc": rc, "run_dir": runs[0], "out": out, "run_file": run_file}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


# --------------------------------------------------------------------------- augmentation


def asymmetric_pattern(size: int = 64) -> np.ndarray:
    """L-shape with unequal arms plus a dot: no flip or 90-degree rotation maps it onto itself."""
    m = np.zeros((size, size), np.float32)
    m[10:50, 12:20] = 1  # long vertical arm
    m[42:50, 20:36] = 1  # short horizontal foot
    m[14:19, 44:49] = 1  # dot
    return m


def dihedral(m: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(v, k) for v in (m, m[:, ::-1]) for k in range(4)]


def iou(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_augment(n: int, seed: int, image=None, mask=None, **kw):
    m = asymmetric_pattern() if mask is None else mask
    img = m[..., None] if image is None else image
    rng = np.random.default_rng(seed)
    return [training_data.augment_pair(img, m[..., None], rng, **kw) for _ in range(n)]


def assert_mask_follows(outs, min_iou=0.97, require_foreground=True):
    for img, msk in outs:
        assert img.dtype == np.float32 and msk.dtype == np.float32
        assert img.shape == msk.shape
        assert set(np.unique(msk)) <= {0.0, 1.0}
        if require_foreground:
            assert msk.sum() > 0
        assert iou(img[..., 0], msk[..., 0]) >= min_iou


def test_flips_and_rot90_keep_mask_on_image():
    outs = run_augment(40, 0, rotation=0.0, intensity=False)
    assert_mask_follows(outs)
    variants = dihedral(asymmetric_pattern())
    seen = set()
    for img, msk in outs:
        # Exact: without interpolation the output is one of the 8 dihedral images, and the
        # image got the very same transform as the mask.
        match = [k for k, v in enumerate(variants) if np.array_equal(msk[..., 0], v)]
        assert len(match) == 1
        assert np.array_equal(img[..., 0], variants[match[0]])
        seen.add(match[0])
    assert len(seen) >= 6  # flips and rotations really happen


def test_rotation_keeps_mask_on_image():
    outs = run_augment(30, 1, rotation=15.0, intensity=False)
    assert_mask_follows(outs)
    variants = dihedral(asymmetric_pattern())
    rotated = sum(not any(np.array_equal(m[..., 0], v) for v in variants) for _, m in outs)
    assert rotated >= 20  # a random non-zero angle moved pixels in most samples
    ref = asymmetric_pattern().sum()
    for _, m in outs:  # bilinear + re-threshold keeps the object size (reflect padding aside)
        assert 0.8 * ref <= m.sum() <= 1.3 * ref


def test_patch_crop_keeps_mask_on_image():
    from numpy.lib.stride_tricks import sliding_window_view

    outs = run_augment(20, 2, patch_size=32, rotation=0.0, intensity=False)
    assert_mask_follows(outs, require_foreground=False)
    assert sum(m.sum() > 0 for _, m in outs) >= 10
    windows = [sliding_window_view(v, (32, 32)) for v in dihedral(asymmetric_pattern())]
    origins = set()
    for img, msk in outs:
        assert img.shape == msk.shape == (32, 32, 1)
        assert np.array_equal(img[..., 0], msk[..., 0])
        hits = [(k, i, j) for k, w in enumerate(windows)
                for i, j in zip(*np.nonzero((w == msk[..., 0]).all(axis=(-1, -2))))]
        assert hits, "crop is not a window of a flipped/rotated mask"
        origins.add(hits[0])
    assert len(origins) >= 10  # random positions, not a fixed corner


def test_elastic_keeps_mask_on_image():
    outs = run_augment(20, 3, rotation=0.0, elastic=True, intensity=False)
    assert_mask_follows(outs)
    variants = dihedral(asymmetric_pattern())
    warped = sum(not any(np.array_equal(m[..., 0], v) for v in variants) for _, m in outs)
    assert warped >= 15
    # Loose: the warp is +-6 px on an 8x8 grid whatever the size, strong on a 64 px tile
    # (areas 0.5x-1.8x measured).
    ref = asymmetric_pattern().sum()
    for _, m in outs:
        assert 0.3 * ref <= m.sum() <= 2.5 * ref


def test_all_augmentations_together_keep_mask_on_image():
    # Contrast/brightness move the 0.5 crossing of the interpolated edge pixels, so the image
    # thresholded at 0.5 loses a little at the borders (0.95 measured); a mask that did not
    # follow (flipped, rotated or cropped elsewhere) scores far lower on this pattern.
    outs = run_augment(20, 4, patch_size=48, rotation=15.0, elastic=True, intensity=True)
    assert_mask_follows(outs, min_iou=0.85, require_foreground=False)
    assert all(i.shape == (48, 48, 1) for i, _ in outs)


def augment_in_pipeline(img, mask, n: int, seed: int, **kw) -> list:
    """``n`` augmentations through the trainer's own batch stream (``make_datasets``)."""
    import argparse

    args = argparse.Namespace(batch_size=1, patch_size=kw.get("patch_size", 0),
                              rotation=kw.get("rotation", 15.0),
                              intensity_aug=kw.get("intensity", True),
                              elastic=kw.get("elastic", False))
    train, _ = training_data.make_datasets(img[None], mask[None], [0], [0], args, seed,
                                           workers=1)
    return [(a[0], b[0]) for a, b in (train[i] for i in range(n))]


@pytest.mark.parametrize("dilution", ["160x", "5120x"])  # dense; sparse and bright (mean 0.92)
def test_intensity_augmentation_never_blanks_an_image(dataset, dilution):
    ip = sorted((dataset / "images").glob(f"{dilution}_*"))[0]
    mp = dataset / "masks" / f"{ip.stem}.png"
    img, m = mio.load_pair(ip, mp, image_size=TILE, normalization=mio.DEFAULT_NORMALIZATION)
    outs = augment_in_pipeline(img, m, 100, 0)
    for a, b in outs:
        assert a.shape == (TILE, TILE, 1) and a.dtype == np.float32
        assert a.std() > 0.02 and a.max() > 0
        assert np.mean((a <= 0) | (a >= 1)) < 0.5  # not mostly saturated
        assert 0.0 <= a.min() and a.max() <= 1.0
        assert set(np.unique(b)) <= {0.0, 1.0}
    # The intensity augmentation is active (brightness alone spreads the means by ~0.05),
    # not always rejected by its fallback: compare with geometry only.
    geo = augment_in_pipeline(img, m, 100, 0, intensity=False)
    sd_with = np.std([a.mean() for a, _ in outs])
    sd_without = np.std([a.mean() for a, _ in geo])
    assert sd_with > 0.01 and sd_with > 5 * sd_without


# --------------------------------------------------------------------------- split


def test_stratified_split_counts_and_proportions():
    strata = np.repeat([0, 1, 2, 3], [20, 10, 6, 4])
    train, val = training_split.stratified_split(strata, 0.25, seed=0)
    assert len(val) == 10 and len(train) == 30
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(40))
    # quotas 5, 2.5, 1.5, 1 -> floors 5, 2, 1, 1; the one left goes to the larger of the two
    # strata with remainder 0.5.
    assert np.bincount(strata[val], minlength=4).tolist() == [5, 3, 1, 1]

    balanced = np.repeat(np.arange(4), 10)
    _, v = training_split.stratified_split(balanced, 0.2, seed=3)
    assert np.bincount(balanced[v]).tolist() == [2, 2, 2, 2]


def test_stratified_split_reproducible_and_seed_dependent():
    strata = np.repeat(np.arange(4), 10)
    a = training_split.stratified_split(strata, 0.2, seed=42)
    b = training_split.stratified_split(strata, 0.2, seed=42)
    c = training_split.stratified_split(strata, 0.2, seed=7)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_stratified_split_six_images_has_validation():
    strata = mm.density_strata([3, 8, 20, 25, 60, 90])
    train, val = training_split.stratified_split(strata, 0.15, seed=42)
    assert len(val) == 1 and len(train) == 5  # round(0.9) = 1, never 0
    _, val2 = training_split.stratified_split([0, 0], 0.15, seed=0)
    assert len(val2) == 1
    with pytest.raises(ValueError, match="at least 2"):
        training_split.stratified_split([0], 0.15, seed=0)


def test_stratified_split_stratum_with_one_image_still_gives_validation():
    # Each one-image stratum had to keep its image for training: the validation set was
    # empty. Such a stratum now joins its density neighbour.
    for strata, frac, n_val in (([0, 1], 0.5, 1), ([0, 1, 2], 0.3, 1),
                                ([0, 1, 1, 1, 2], 0.2, 1), ([0, 0, 0, 1, 2, 2, 2], 0.3, 2)):
        for seed in range(5):
            train, val = training_split.stratified_split(strata, frac, seed=seed)
            assert len(val) == n_val and len(train) == len(strata) - n_val, (strata, seed)
            assert np.array_equal(np.sort(np.concatenate([train, val])),
                                  np.arange(len(strata)))
    # Strata without a single-image one split exactly as before (same seed, same indices).
    strata = np.repeat([0, 1, 2, 3], [20, 10, 6, 4])
    assert np.bincount(strata[training_split.stratified_split(strata, 0.25, seed=0)[1]],
                       minlength=4).tolist() == [5, 3, 1, 1]


def test_stratified_kfold_partitions_every_index():
    strata = np.repeat([0, 1, 2], [7, 5, 8])
    folds = training_split.stratified_kfold(strata, 3, seed=0)
    assert len(folds) == 3
    vals = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(vals), np.arange(20))  # each index validates exactly once
    for tr, va in folds:
        assert np.intersect1d(tr, va).size == 0
        assert np.array_equal(np.union1d(tr, va), np.arange(20))
    for s in range(3):  # every stratum spread evenly over the folds
        per_fold = [np.sum(strata[v] == s) for _, v in folds]
        assert max(per_fold) - min(per_fold) <= 1
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        training_split.stratified_kfold(strata, 1, seed=0)
    with pytest.raises(ValueError):
        training_split.stratified_kfold(strata, 21, seed=0)


# --------------------------------------------------------------------------- steps / BatchNorm


def test_auto_steps_per_epoch():
    assert training_loop.auto_steps_per_epoch(62, 32) == 50  # one pass would be 2 steps (old: 1)
    assert training_loop.auto_steps_per_epoch(62, 32) >= 50
    assert training_loop.auto_steps_per_epoch(10_000, 32) == 313  # at least one full pass
    assert training_loop.auto_steps_per_epoch(0, 32) == 50
    assert training_loop.auto_steps_per_epoch(62, 0) == 62


def test_auto_bn_momentum():
    assert training_loop.auto_bn_momentum(25) == pytest.approx(0.8)
    assert training_loop.auto_bn_momentum(50) == pytest.approx(0.9)
    assert training_loop.auto_bn_momentum(250) == pytest.approx(0.98)
    assert training_loop.auto_bn_momentum(1) == pytest.approx(0.8)  # clipped
    assert training_loop.auto_bn_momentum(0) == pytest.approx(0.8)
    assert training_loop.auto_bn_momentum(100_000) == pytest.approx(0.99)
    # Within one epoch the initial moving statistics (mean 0, var 1) have decayed to < 1 %;
    # with Keras' default 0.99 they would still weigh 60 % after 50 steps (the trap).
    for steps in (25, 50, 100, 250, 1000):
        assert training_loop.auto_bn_momentum(steps) ** steps < 0.01


def test_auto_bn_momentum_lets_a_real_batchnorm_catch_up_in_one_epoch():
    """The trap, measured on a Keras layer (not on the formula): after 50 training steps
    on inputs of mean 5, Keras' default momentum leaves the moving mean near 2 (the initial
    0 still weighs 0.99**50 = 60 %); the auto momentum for 50 steps/epoch reaches 5."""
    import keras

    x = np.full((4, 2, 2, 1), 5.0, np.float32)

    def moving_mean_after(momentum: float, steps: int) -> float:
        bn = keras.layers.BatchNormalization(momentum=momentum)
        for _ in range(steps):
            bn(x, training=True)
        return float(keras.ops.convert_to_numpy(bn.moving_mean)[0])

    assert moving_mean_after(training_loop.auto_bn_momentum(50), 50) > 5.0 * 0.99
    assert moving_mean_after(0.99, 50) == pytest.approx(5.0 * (1 - 0.99 ** 50), rel=1e-3)


def test_batchstat_jaccard_exposes_stale_moving_statistics():
    """A model right with batch statistics, wrong with the initial moving statistics."""
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.BatchNormalization(momentum=0.99)(inp)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid",
                              kernel_initializer=keras.initializers.Constant(50.0),
                              bias_initializer=keras.initializers.Constant(1.0))(x)
    model = keras.Model(inp, out)
    y = np.zeros((2, 8, 8, 1), np.float32)
    y[:, :, :4] = 1  # left half foreground
    # Moving statistics (0, 1): background maps to sigmoid(1) > 0.5 -> all foreground, IoU 1/2.
    infer = training_outputs.per_image_jaccard(model.predict(y, verbose=0), y, 0.5)
    assert infer.tolist() == pytest.approx([0.5, 0.5])
    # Batch statistics: mean 0.5, sd 0.5 -> BN gives -1 / +1 -> sigmoid(50 x + 1) is exact.
    assert training_loop.batchstat_jaccard(model, y, y, 0.5) == pytest.approx(1.0)


def test_batchstat_jaccard_runs_the_validation_set_in_training_size_chunks():
    """Memory: never the whole validation set as one training=True batch."""
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.BatchNormalization()(inp)
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))
    rng = np.random.default_rng(0)
    xs = rng.random((7, 8, 8, 1)).astype(np.float32)
    ys = (rng.random((7, 8, 8, 1)) > 0.5).astype(np.float32)
    calls = []

    def spy(batch, training):
        calls.append((len(batch), training))
        return model(batch, training=training)

    value = training_loop.batchstat_jaccard(spy, xs, ys, 0.5, batch_size=3)
    assert calls == [(3, True), (2, True), (2, True)]  # ceil(7 / 3) near-equal chunks
    # Each chunk normalised by its own statistics, per-image scores averaged over all 7.
    expected = np.mean(np.concatenate([
        training_outputs.per_image_jaccard(
            keras.ops.convert_to_numpy(model(xs[i], training=True)), ys[i], 0.5)
        for i in (slice(0, 3), slice(3, 5), slice(5, 7))]))
    assert value == pytest.approx(expected)
    calls.clear()  # batch_size >= N: the one-batch value, in one call
    one = training_outputs.per_image_jaccard(
        keras.ops.convert_to_numpy(model(xs, training=True)), ys, 0.5)
    assert training_loop.batchstat_jaccard(spy, xs, ys, 0.5, batch_size=32) == \
        pytest.approx(one.mean())
    assert calls == [(7, True)]


def test_per_image_jaccard_hand_values():
    pred = np.zeros((3, 4, 4), np.float32)
    truth = np.zeros((3, 4, 4), np.float32)
    pred[0, :2] = 1  # 8 px
    truth[0, 1:3] = 1  # 8 px, overlap 4 -> 4 / 12
    truth[2, 0, 0] = 1  # image 1 both empty -> 1; image 2 prediction empty -> 0
    assert training_outputs.per_image_jaccard(pred, truth).tolist() == \
        pytest.approx([1 / 3, 1.0, 0.0])


# --------------------------------------------------------------------------- options


def test_preset_then_explicit_flag_wins():
    a = tmo.parse_args(["--preset", "cpu"])
    assert (a.filters, a.depth, a.batch_size, a.patch_size) == (8, 3, 16, 128)
    b = tmo.parse_args(["--preset", "cpu", "--filters", "4", "--batch-size", "2"])
    assert (b.filters, b.batch_size, b.depth) == (4, 2, 3)
    c = tmo.parse_args([])
    assert (c.filters, c.batch_size, c.lr) == (64, 32, 1e-4)  # the seed's recipe


def test_config_file_between_preset_and_flags(tmp_path):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"filters": 12, "epochs": 7, "density_bins": [5, 20]}))
    a = tmo.parse_args(["--preset", "cpu", "--config", str(cfg)])
    assert (a.filters, a.epochs, a.depth, a.density_bins) == (12, 7, 3, [5, 20])
    b = tmo.parse_args(["--preset", "cpu", "--config", str(cfg), "--filters", "4"])
    assert (b.filters, b.epochs) == (4, 7)


def test_cpu_estimate_from_a_measured_step():
    tr = training_outputs
    # 10 steps of 2 s, plus 3 validation tiles 4x a crop's pixels at 1/3 of a step per
    # pixel-batch: 3 * 2 * 4 / (3 * 2) = 4 s, plus the per-epoch overhead; 5 epochs.
    one = tr.estimate_training_seconds(2.0, steps=10, epochs=5, models=["unet"], batch=2,
                                        train_px=64 * 64, val_px=128 * 128, n_val=3)
    assert one == pytest.approx(5 * (20 + 4 + tr.EPOCH_OVERHEAD_S))
    three = tr.estimate_training_seconds(2.0, steps=10, epochs=5, models=list(tr.MODEL_COST),
                                          batch=2, train_px=64 * 64, val_px=128 * 128, n_val=3,
                                          folds=2)
    assert three == pytest.approx(one * sum(tr.MODEL_COST.values()) * 2)
    # The preset's constants scale with the cores.
    p1 = tr.preset_cpu_seconds(models=["unet"], n_val=7, val_px=512 * 512, cores=1)
    p2 = tr.preset_cpu_seconds(models=["unet"], n_val=7, val_px=512 * 512, cores=2)
    overhead = tmo.PRESETS["cpu"]["epochs"] * tr.EPOCH_OVERHEAD_S
    assert p1 - overhead == pytest.approx(2 * (p2 - overhead))
    assert tr.format_duration(40) == "40 s" and tr.format_duration(720) == "12 min"
    assert tr.format_duration(26.4 * 3600) == "26.4 h"
    assert tr.cpu_notice(26.4 * 3600, 720) == ("no GPU found; this configuration needs about "
                                                "26.4 h here; `--preset cpu` takes about 12 min")
    assert tr.cpu_notice(720, None) == ("no GPU found; this configuration (--preset cpu) "
                                         "needs about 12 min here")


def test_config_values_that_replace_preset_values_are_named():
    preset = tmo.PRESETS["cpu"]
    rec = {"depth": 4, "batch_size": 4, "steps_per_epoch": 50, "loss": "bce_dice",
           "image_size": 512}
    assert tmo.config_overrides(preset, rec, set()) == [
        "batch_size 16 -> 4", "depth 3 -> 4", "steps_per_epoch 25 -> 50"]
    assert tmo.config_overrides(preset, rec, {"depth"}) == [
        "batch_size 16 -> 4", "steps_per_epoch 25 -> 50"]


def test_config_unknown_key_names_key_and_file(tmp_path, caplog):
    cfg = tmp_path / "bad_config.json"
    cfg.write_text(json.dumps({"filters": 8, "learning_rate": 0.1}))
    out = tmp_path / "out"
    assert tmo.main(["--config", str(cfg), "--output_dir", str(out)]) == 2
    msg = caplog.text
    assert "learning_rate" in msg and str(cfg) in msg
    assert not out.exists()  # rejected before any run folder is made


def test_bad_options_rejected():
    with pytest.raises(SystemExit):
        tmo.parse_args(["--models", "unet,vgg"])
    with pytest.raises(SystemExit):
        tmo.parse_args(["--image_size", "60", "--depth", "3"])
    with pytest.raises(SystemExit):
        tmo.parse_args(["--image_size", "64", "--patch_size", "128", "--depth", "2"])


def test_explicit_options():
    given = tmo.explicit_options(["--resume", "x", "--epochs", "5", "--batch-size", "2"])
    assert given == {"resume", "epochs", "batch_size"}


def test_missing_data_folder_names_it(tmp_path, caplog):
    assert tmo.main(["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]) == 2
    assert str(tmp_path / "nope" / "images") in caplog.text
    # A typo'd dataset is refused before any run folder exists (issue 24): none is left.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("microbead_training_")]


# --------------------------------------------------------------------------- end to end


def test_run_writes_every_output(main_run, dataset):
    assert main_run["rc"] == 0
    run = main_run["run_dir"]
    assert RUN_NAME.match(run.name), run.name
    for name in ("best_unet_model.hdf5", "best_unet_model.keras", "final_unet_model.hdf5",
                 "final_unet_model.keras", "unet_history.csv", "training_summary.csv",
                 "config.json", "split.json", "training_console.log",
                 "validation_snapshot_unet.png", "checkpoints/last_unet.keras"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert main_run["run_file"].read_text().strip() == str(run.resolve())

    cols, hist = read_csv(run / "unet_history.csv")
    assert cols == list(mcfg.HISTORY_COLUMNS)
    assert [int(r["epoch"]) for r in hist] == [1, 2]
    assert all(0 <= float(r["val_jacard_coef"]) <= 1 for r in hist)

    cols, rows = read_csv(run / "training_summary.csv")
    assert cols == list(training_outputs.SUMMARY_COLUMNS)
    assert [r["model"] for r in rows] == ["unet"]
    assert int(rows[0]["epochs_run"]) == 2
    best = max(float(r["val_jacard_coef"]) for r in hist)
    assert float(rows[0]["best_val_jacard"]) == pytest.approx(best, abs=1e-6)

    split = json.loads((run / "split.json").read_text())
    files = sorted(p.name for p in (dataset / "images").iterdir())
    assert sorted(split["train"] + split["val"]) == files
    assert not set(split["train"]) & set(split["val"])
    assert len(split["val"]) == round(N_TILES * 0.15) == 2

    log_text = (run / "training_console.log").read_text()
    assert "unet epoch 2" in log_text and "best val Jaccard" in log_text
    # One plain device line, and on a machine without a GPU the estimate of the whole run.
    assert "running on CPU" in log_text or "running on GPU: " in log_text
    if "running on CPU" in log_text:
        assert re.search(r"no GPU found; this configuration needs about \d+ (s|min|h)\b.*"
                         r"`--preset cpu` takes about \d+ (s|min)", log_text), log_text
        assert "s per training step measured on unet: 15 steps x 2 epochs x 1 model(s)" \
            in log_text


def test_config_has_what_prediction_needs(main_run, dataset):
    path = main_run["run_dir"] / "config.json"
    cfg = json.loads(path.read_text())
    # The schema owner accepts what the trainer wrote, unchanged (no key unknown or missing).
    assert cfg["format_version"] == mcfg.FORMAT_VERSION == 2
    assert mcfg.read_run_config(path) == cfg
    meta = json.loads((dataset / "dataset.json").read_text())
    pre, post, env = cfg["preprocessing"], cfg["postprocessing"], cfg["environment"]
    # stored tiles are 64 px, trained at 64 px: scale = pixel_scale = 64 / 512.
    assert pre["pixel_scale"] == pytest.approx(TILE / 512)
    assert pre["scale"] == pytest.approx(TILE / 512)
    assert pre["input_size"] == [TILE, TILE] and pre["channels"] == 1
    norm = pre["normalization"]  # flat-field: window from the bead size, dataset levels
    assert norm["method"] == "flatfield" and norm["window"] % 2 == 1
    assert 0 < norm["low"] < 1 < norm["high"] < 1.2
    assert pre["pixel_scale_source"].endswith("dataset.json")
    assert "input size from --image_size" in pre["scale_source"]
    assert post["threshold"] == 0.5
    assert 0.5 * meta["median_bead_area_px"] <= post["median_bead_area_px"] <= \
        2 * meta["median_bead_area_px"]
    for key in ("python", "numpy", "tensorflow", "keras", "git_commit", "hostname"):
        assert key in env
    assert cfg["models"]["unet"]["filters"] == 4 and cfg["models"]["unet"]["depth"] == 2
    tr = cfg["training"]
    assert tr["epochs"] == 2 and tr["steps_per_epoch_used"] == 15
    assert training_loop.auto_bn_momentum(15) == pytest.approx(0.8)  # 1 - 5/15 clipped to 0.8
    assert tr["bn_momentum_used"] == pytest.approx(0.8)


def test_best_hdf5_reproduces_logged_val_jaccard(main_run, dataset):
    import microbead_metrics as mm
    import models

    run = main_run["run_dir"]
    cfg = json.loads((run / "config.json").read_text())
    split = json.loads((run / "split.json").read_text())
    _, rows = read_csv(run / "training_summary.csv")
    pairs = mio.pair_files(dataset / "images", dataset / "masks").pairs
    val_pairs = [(i, m) for i, m in pairs if i.name in set(split["val"])]
    assert len(val_pairs) == len(split["val"])
    pre = cfg["preprocessing"]
    loaded = mio.load_pairs(val_pairs, image_size=pre["input_size"][0],
                            channels=pre["channels"], normalization=pre["normalization"])
    model = models.load_model(run / "best_unet_model.hdf5")
    bn = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert bn and all(layer.momentum == pytest.approx(0.8) for layer in bn)
    prob = model.predict(loaded.images, verbose=0)[..., 0]
    scores = [mm.pixel_metrics(p, t, threshold=cfg["postprocessing"]["threshold"])["jaccard"]
              for p, t in zip(prob, loaded.masks)]
    assert float(np.mean(scores)) == pytest.approx(float(rows[0]["best_val_jacard"]), abs=1e-3)


def test_short_run_inference_agrees_with_batch_statistics(main_run):
    """The BatchNorm trap: inference-mode val Jaccard must not collapse below batch stats."""
    _, rows = read_csv(main_run["run_dir"] / "training_summary.csv")
    split = json.loads((main_run["run_dir"] / "split.json").read_text())
    assert split["val"]
    infer = float(rows[0]["best_val_jacard_reloaded"])
    batch = float(rows[0]["val_jacard_batchstats"])
    assert infer >= batch - 0.1
    # ...and the agreement is not two trivial models agreeing: 30 steps learned something
    # beyond "all background" (IoU 0) and clearly above "all foreground" (IoU = coverage,
    # at most ~0.6 on these tiles).
    assert infer > 0.3 and batch > 0.2


def test_second_run_same_second_gets_new_folder(main_run, dataset, monkeypatch):
    run = main_run["run_dir"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    monkeypatch.setattr(tmo, "run_folder_name", lambda now=None: run.name)
    used = []

    def fake_run(args, run_dir, resuming):  # the folder main made, not the training
        used.append(run_dir)
        return 2  # failed before writing anything: the new folder goes again

    monkeypatch.setattr(tmo, "_run", fake_run)
    assert tmo.main(["--data_dir", str(dataset), "--output_dir", str(main_run["out"])]) == 2
    twin = run.with_name(run.name + "_2")
    assert used == [twin] and not twin.exists()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_resume_continues_after_last_epoch(main_run, tmp_path):
    import models

    src = main_run["run_dir"]
    run = tmp_path / src.name
    shutil.copytree(src, run)
    # Make it look interrupted during epoch 3 of 3: no final model, no summary row.
    for p in run.glob("final_*"):
        p.unlink()
    (run / "training_summary.csv").unlink()
    _, old_hist = read_csv(run / "unet_history.csv")

    assert tmo.main(["--resume", str(run), "--epochs", "3"]) == 0
    _, hist = read_csv(run / "unet_history.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2, 3]
    assert hist[:2] == old_hist  # epochs 1-2 kept, not retrained
    assert "resuming after epoch 2" in (run / "training_console.log").read_text()
    _, rows = read_csv(run / "training_summary.csv")
    assert int(rows[0]["epochs_run"]) == 3
    assert (run / "final_unet_model.hdf5").is_file()
    # Optimizer state carried over: 3 epochs x 15 steps in total, not 15 from a restart.
    final = models.load_model(run / "final_unet_model.keras", compile=True)
    assert int(final.optimizer.iterations.numpy()) == 3 * 15
    # ...and it is still the configured Adam at lr 1e-2 (Keras' HDF5 writer used to drop the
    # optimizer from later .keras checkpoints: resume then ran RMSprop at 1e-3).
    assert type(final.optimizer).__name__ == "Adam"
    assert float(hist[2]["learning_rate"]) == pytest.approx(float(hist[1]["learning_rate"]))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["epochs"] == 3 and cfg["training"]["filters"] == 4
    # A finished model is not retrained on a second resume.
    assert tmo.main(["--resume", str(run), "--epochs", "3"]) == 0
    _, hist2 = read_csv(run / "unet_history.csv")
    assert hist2 == hist


def test_six_images_never_zero_validation_steps(small_dataset, tmp_path):
    # batch 8 > 5 training and > 1 validation images: the old floor(n / batch) gave 0 steps.
    args = ["--data_dir", str(small_dataset), "--output_dir", str(tmp_path), *TINY,
            "--depth", "1", "--batch_size", "8", "--epochs", "1", "--steps_per_epoch", "2"]
    assert tmo.main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 5
    _, hist = read_csv(run / "unet_history.csv")
    assert len(hist) == 1 and math.isfinite(float(hist[0]["val_jacard_coef"]))
    assert math.isfinite(float(hist[0]["val_loss"]))


def test_tiles_smaller_than_the_preset_patch_train_with_default_flags(small_dataset, tmp_path,
                                                                      caplog):
    # --preset cpu crops 128-px patches; these tiles are 64 px. Only run-length flags are added.
    caplog.set_level("INFO")
    args = ["--data_dir", str(small_dataset), "--output_dir", str(tmp_path), "--preset", "cpu",
            "--models", "unet", "--filters", "4", "--epochs", "1", "--steps_per_epoch", "2",
            "--verbose", "0"]
    assert tmo.main(args) == 0, caplog.text
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    cfg = json.loads((run / "config.json").read_text())
    # The largest multiple of 2**3 that fits a 64-px tile, recorded as the size used.
    assert cfg["training"]["patch_size"] == TILE
    assert cfg["preprocessing"]["input_size"] == [TILE, TILE]
    assert "patch size 64 instead of 128" in (run / "training_console.log").read_text()


def test_explicit_patch_size_larger_than_the_tiles_is_an_error(small_dataset, tmp_path, caplog):
    args = ["--data_dir", str(small_dataset), "--output_dir", str(tmp_path), "--preset", "cpu",
            "--patch_size", "128", "--verbose", "0"]
    assert tmo.main(args) == 2
    assert "--patch_size 128" in caplog.text and "64" in caplog.text


def test_fit_patch_size():
    assert training_data.fit_patch_size(128, 64, 3) == 64
    assert training_data.fit_patch_size(128, 72, 3) == 72
    assert training_data.fit_patch_size(120, 256, 4) == 112
    assert training_data.fit_patch_size(48, 64, 4) == 48
    assert training_data.fit_patch_size(0, 32, 3) == 0


class SimulatedKill(Exception):
    pass


def test_kfold_writes_folds_and_resumes_after_interruption(small_dataset, tmp_path,
                                                            monkeypatch):
    real = training_loop.train_one_model
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise SimulatedKill("job killed during fold 2")
        return real(*a, **k)

    monkeypatch.setattr(training_loop, "train_one_model", interrupted)
    args = ["--data_dir", str(small_dataset), "--output_dir", str(tmp_path), *TINY,
            "--depth", "1", "--kfold", "2", "--epochs", "1", "--steps_per_epoch", "2"]
    with pytest.raises(SimulatedKill):
        tmo.main(args)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run / "config.json").is_file()  # resumable before the last fold finished
    assert (run / "fold_01" / "final_unet_model.hdf5").is_file()
    assert not (run / "fold_02" / "final_unet_model.hdf5").exists()

    monkeypatch.setattr(training_loop, "train_one_model", real)
    assert tmo.main(["--resume", str(run)]) == 0
    assert "unet: already finished" in (run / "training_console.log").read_text()
    vals = []
    for k in (1, 2):
        fold = run / f"fold_{k:02d}"
        for name in ("best_unet_model.hdf5", "unet_history.csv", "training_summary.csv",
                     "split.json", "config.json"):
            assert (fold / name).is_file(), (fold, name)
        vals.append(json.loads((fold / "split.json").read_text())["val"])
    assert sorted(vals[0] + vals[1]) == sorted(p.name for p in (small_dataset / "images").iterdir())
    assert not set(vals[0]) & set(vals[1])

    cols, rows = read_csv(run / "training_summary.csv")
    assert cols == ["fold", *training_outputs.SUMMARY_COLUMNS]
    assert [int(r["fold"]) for r in rows] == [1, 2]
    _, ksum = read_csv(run / "kfold_summary.csv")
    assert ksum[0]["model"] == "unet" and int(ksum[0]["folds"]) == 2
    per_fold = [float(r["best_val_jacard"]) for r in rows]
    assert float(ksum[0]["mean_best_val_jacard"]) == pytest.approx(np.mean(per_fold), abs=1e-5)
    assert float(ksum[0]["sd_best_val_jacard"]) == pytest.approx(np.std(per_fold, ddof=1),
                                                                 abs=1e-5)


def test_val_batches_split_evenly_over_replicas():
    # Frame-grouped splits give odd validation sizes; a last batch of 1 on 2 replicas, or of
    # 3 split 2/1, crashed MirroredStrategy. Every batch must split into equal shares.
    for replicas in (2, 3, 4):
        for n_val in range(1, 40):
            for batch in (1, 2, 4, 8, 16, 32):
                b, pad = training_data.val_layout(n_val, batch, replicas)
                total = n_val + pad
                assert b % replicas == 0 and total % replicas == 0 and pad < replicas
                assert b <= max(replicas, batch) and (total % b) % replicas == 0
    assert training_data.val_layout(5, 4, replicas=1) == (4, 0)  # one replica: as before
    assert training_data.val_layout(3, 4, replicas=2) == (4, 1)

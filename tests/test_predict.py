"""predict_microscope.py: seamless tiling, preprocessing from config, counts, outputs."""

import csv
import json

import numpy as np
import pytest

import frame_outputs
import microbead_io as mio
import microbead_metrics
import predict_microscope as pm
import prediction
import prediction_pipeline
import runtime
import tiling
from synthetic_beads import render_masks, sample_beads

keras = pytest.importorskip("keras")
models = pytest.importorskip("models")


def _config(scale=0.5, pixel_scale=0.5, area=69.0, threshold=0.5, pad=4):
    return {
        "format_version": 1,
        "models": {"unet": {"architecture": "unet"}},
        "preprocessing": {
            "channels": 1, "input_size": [64, 64], "stored_tile_size": [64, 64],
            "pixel_scale": pixel_scale, "scale": scale,
            "normalization": dict(mio.DEFAULT_NORMALIZATION), "pad_multiple": pad,
        },
        "postprocessing": {"threshold": threshold, "median_bead_area_px": area},
    }


@pytest.fixture(scope="module")
def tiny_unet():
    keras.utils.set_random_seed(0)
    m = models.build_unet((None, None, 1), filters=4, depth=2, dropout=0.0)
    # Non-trivial BatchNorm statistics so inference is not an identity.
    rng = np.random.default_rng(0)
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
    return m


def test_tiled_prediction_equals_whole_image_with_a_real_unet(tiny_unet):
    rng = np.random.default_rng(1)
    img = rng.random((152, 236, 1)).astype(np.float32)  # divisible by 2**depth: no padding
    whole = np.asarray(tiny_unet.predict_on_batch(img[None]))[0, ..., 0]
    fn = prediction.make_keras_predict_fn(tiny_unet)
    tiled = tiling.predict_tiled(img, fn, tile_size=64, overlap=48, batch_size=3,
                                 pad_multiple=4)
    assert tiled.shape == (152, 236)
    # The blended tiles reproduce the fully convolutional whole-image probabilities.
    assert np.max(np.abs(tiled - whole)) < 1e-3
    mask_iou = np.logical_and(tiled >= 0.5, whole >= 0.5).sum() / max(
        1, np.logical_or(tiled >= 0.5, whole >= 0.5).sum())
    assert mask_iou >= 0.999


def test_tiled_equals_whole_image_at_depth_4_with_the_default_overlap():
    # At the real depth (4) the receptive field is 200 px: the old default overlap of 64 px
    # leaves tile-edge (zero padding) effects in the blend. Without --overlap, predict
    # derives it from the model's depth, and tiled prediction equals the whole image.
    keras.utils.set_random_seed(1)
    m = models.build_unet((None, None, 1), filters=4, depth=4, dropout=0.0)
    rng = np.random.default_rng(3)
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
    args = pm.parse_args(["--model", "m.hdf5", "--input_dir", "in", "--output_dir", "out"])
    assert args.overlap is None
    overlap, source = prediction.resolve_overlap(args.overlap, prediction.network_depth(m, 16))
    assert overlap == tiling.default_overlap(4) == 208 and "receptive field" in source
    assert prediction.resolve_overlap(64, 4) == (64, "--overlap")
    img = rng.random((384, 384, 1)).astype(np.float32)
    fn = prediction.make_keras_predict_fn(m)
    whole = fn(img[None])[0, ..., 0]
    assert tiling.plan_tiles(img.shape, 320, overlap, 16).n_tiles == 4
    tiled = tiling.predict_tiled(img, fn, tile_size=320, overlap=overlap, batch_size=4,
                                 pad_multiple=16)
    assert np.max(np.abs(tiled - whole)) < 1e-3
    old = tiling.predict_tiled(img, fn, tile_size=320, overlap=64, batch_size=4,
                               pad_multiple=16)
    assert np.max(np.abs(old - whole)) > 1e-3  # the trap the derived default avoids


def test_shifting_by_half_a_tile_gives_the_same_mask_in_the_overlap(tiny_unet):
    rng = np.random.default_rng(2)
    big = rng.random((128, 224, 1)).astype(np.float32)
    fn = prediction.make_keras_predict_fn(tiny_unet)
    a = tiling.predict_tiled(big[:, :192], fn, tile_size=64, overlap=32, pad_multiple=4)
    b = tiling.predict_tiled(big[:, 32:], fn, tile_size=64, overlap=32, pad_multiple=4)
    inner = (slice(16, -16), slice(32 + 16, 192 - 16))
    inner_b = (slice(16, -16), slice(16, 192 - 32 - 16))
    np.testing.assert_array_equal(a[inner] >= 0.5, b[inner_b] >= 0.5)
    assert np.max(np.abs(a[inner] - b[inner_b])) < 1e-3


def test_preprocess_frame_matches_the_training_loader_and_scale(tmp_path):
    # The same pixels must reach the network at prediction as in training. The reference
    # is the training loader reading the stored tile (not the calls preprocess_frame makes):
    # the frame is that tile upsampled 2x by pixel repetition, so the frame -> tile area
    # downscale is exact and any difference is a preprocessing drift.
    rng = np.random.default_rng(3)
    tile = (rng.random((100, 150)) * 4000).astype(np.uint16)
    mio.write_image(tmp_path / "t.tif", tile)
    mio.write_mask(tmp_path / "t_mask.png", np.zeros((100, 150), np.uint8))
    x_train, _ = mio.load_pair(tmp_path / "t.tif", tmp_path / "t_mask.png",
                               normalization=mio.DEFAULT_NORMALIZATION)
    frame = np.kron(tile.astype(np.float32), np.ones((2, 2), np.float32))[..., None]
    pre = _config()["preprocessing"]  # pixel_scale = scale = 0.5: the stored tile's scale
    x = prediction.preprocess_frame(frame, pre)
    assert x.shape == x_train.shape == (100, 150, 1)
    np.testing.assert_allclose(x, x_train, atol=1e-5)
    assert x.min() == 0.0 and x.max() == 1.0  # percentile levels map to 0 and 1
    # A model trained at another input size than the stored tiles: one more resize.
    pre2 = dict(pre, scale=0.25)
    assert prediction.preprocess_frame(frame, pre2).shape == (50, 75, 1)


def _disc_frame(shape=(384, 512), n=40, seed=0):
    """Native-resolution frame whose beads are bright discs (image encodes the mask)."""
    rng = np.random.default_rng(seed)
    beads = sample_beads(rng, shape, n, radius=9.4, cluster_fraction=0.3)
    mask, labels = render_masks(beads, shape)
    return mask, labels


def test_predict_frame_counts_touching_beads_at_native_scale():
    mask, labels = _disc_frame()
    image = (mask.astype(np.float32) * 200 + 20)[..., None]
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    # "Network": the normalised image itself is the probability (model scale = half size).
    res = prediction.predict_frame(image, lambda b: b[..., 0], cfg, tile_size=64, overlap=16,
                           batch_size=4)
    assert res["mask"].shape == mask.shape and res["labels"].shape == mask.shape
    iou = np.logical_and(res["mask"], mask).sum() / np.logical_or(res["mask"], mask).sum()
    assert iou > 0.9
    true_n = int(labels.max())
    n_touching_components = true_n - (
        __import__("cv2").connectedComponents(mask, connectivity=8)[0] - 1)
    assert n_touching_components > 0  # the frame really has touching beads
    assert abs(res["beads"] - true_n) <= max(1, 0.05 * true_n)
    assert res["area_estimate"] == pytest.approx(true_n, rel=0.15)


def test_threshold_flag_overrides_config():
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64, 1)
    cfg = _config(scale=1.0, pixel_scale=1.0, pad=4)
    lo = prediction.predict_frame(image, lambda b: b[..., 0], cfg, tile_size=64, overlap=0,
                          batch_size=1, threshold=0.25)
    hi = prediction.predict_frame(image, lambda b: b[..., 0], cfg, tile_size=64, overlap=0,
                          batch_size=1)
    assert lo["coverage_pct"] > hi["coverage_pct"] + 20


def test_tta_of_an_equivariant_function_is_unchanged():
    rng = np.random.default_rng(4)
    batch = rng.random((2, 32, 32, 1)).astype(np.float32)
    ident = prediction.tta_predict_fn(lambda b: b[..., 0] * 0.5, True)
    np.testing.assert_allclose(ident(batch), batch[..., 0] * 0.5, atol=1e-6)


def test_fit_dilution_series_recovers_slope():
    d = np.array([160, 320, 640, 1280, 2560])
    fit = pm.fit_dilution_series(d, 43200 / d)
    assert fit["slope"] == pytest.approx(-1.0, abs=1e-9) and fit["r2"] == pytest.approx(1.0)
    assert np.isnan(pm.fit_dilution_series([640], [10])["slope"])


def test_single_dilution_is_not_fitted_and_the_summary_says_why(tmp_path):
    rows = [{"file": f"640x_{i}.png", "dilution": 640, "beads": b, "status": "ok",
             "width": 8, "height": 8, "area_estimate": 1.0, "coverage_pct": 1.0,
             "time_s": 0.1} for i, b in enumerate((10, 12, 9))]
    fit = pm.write_dilution_outputs(tmp_path, rows)
    assert "one dilution (640x)" in fit["skipped"] and fit["n"] == 3
    meta = {"model": "m", "note": "n", "threshold": 0.5, "scale": 1.0, "tile_size": 64,
            "overlap": 16, "tta": False}
    pm.write_summaries(tmp_path, rows, meta, fit)
    text = (tmp_path / "prediction_summary.txt").read_text()
    assert "dilution series: no fit (every image with beads is at one dilution" in text
    assert "nan" not in text.lower()
    two = pm.fit_dilution_series([160, 320], [20, 10])
    assert two["skipped"] == "" and two["slope"] == pytest.approx(-1.0)


def test_dilution_plot_compares_density_not_beads_per_image(tmp_path):
    # An ideal series, but the 320x frame is twice as large: per image it would look flat.
    rows = [{"file": f, "dilution": d, "beads": b, "status": "ok", "width": w, "height": 1000}
            for f, d, b, w in (("160x_a.png", 160, 2000, 1000), ("320x_a.png", 320, 2000, 2000),
                               ("640x_a.png", 640, 500, 1000))]
    fit = pm.write_dilution_outputs(tmp_path, rows)
    assert fit["slope"] == pytest.approx(-1.0) and fit["r2"] == pytest.approx(1.0)
    with open(tmp_path / "dilution_counts.csv", newline="") as fh:
        got = {r["file"]: float(r["beads_per_mp"]) for r in csv.DictReader(fh)}
    assert got == {"160x_a.png": 2000.0, "320x_a.png": 1000.0, "640x_a.png": 500.0}


@pytest.mark.parametrize("kind", ["constant", "all_nan", "some_nan"])
def test_constant_or_nan_frame_is_unusable_not_ok_with_zero_beads(tmp_path, kind):
    files = _frames(tmp_path / "in", 2)
    bad = tmp_path / "in" / f"{kind}_frame.tif"
    img = np.full((90, 130), 77.0, np.float32)
    if kind != "constant":
        img[: (90 if kind == "all_nan" else 3)] = np.nan
        img[50, 50] = 10.0
    __import__("tifffile").imwrite(bad, img)
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    rows = prediction_pipeline.predict_files([bad, *files], lambda b: b[..., 0], cfg,
                                             _out(tmp_path / "o"), tile_size=64, overlap=16,
                                             batch_size=2)
    status = rows[0]["status"]
    assert bad.name in status and "unusable image" in status
    assert ("constant" if kind == "constant" else "NaN") in status
    assert "beads" not in rows[0] and all(r["status"] == "ok" for r in rows[1:])


def _write_run(tmp_path, tiny_model, cfg=None):
    run = tmp_path / "run"
    run.mkdir()
    models.save_model(tiny_model, run / "best_unet_model.hdf5")
    (run / "config.json").write_text(json.dumps(cfg or _config(pad=4)))
    with open(run / "training_summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "best_epoch", "best_val_jacard"])
        w.writerow(["attention_unet", 3, 0.5])
        w.writerow(["unet", 2, 0.8])
    return run


def test_main_writes_every_output_and_reports_bad_files(tmp_path, tiny_unet):
    run = _write_run(tmp_path, tiny_unet)
    inp = tmp_path / "frames"
    inp.mkdir()
    rng = np.random.default_rng(5)
    for name in ("640x_2025-05-16_01-02-03_101.png", "2560x_2025-05-16_01-03-15_102.tif"):
        mio.write_image(inp / name, (rng.random((90, 130)) * 255).astype(np.uint8))
    (inp / "160x_broken_frame.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    rc = pm.main(["--model", str(run), "--input_dir", str(inp), "--output-dir", str(out),
                  "--tile_size", "64", "--overlap", "16", "--save_prob"])
    assert rc == 1  # one image failed
    with open(out / "prediction_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == pm.SUMMARY_COLUMNS
    status = {r["file"]: r["status"] for r in rows}
    assert status["640x_2025-05-16_01-02-03_101.png"] == "ok"
    assert "160x_broken_frame.png" in status["160x_broken_frame.png"]
    for stem in ("640x_2025-05-16_01-02-03_101", "2560x_2025-05-16_01-03-15_102"):
        m = mio._read_raw(out / "masks" / f"{stem}_mask.png")
        assert m.shape == (90, 130) and set(np.unique(m)) <= {0, 255}
        for sub, suffix in (("labels", "_labels.tif"), ("overlays", "_overlay.png"),
                            ("comparisons", "_comparison.png"), ("prob", "_prob.tif")):
            assert (out / sub / f"{stem}{suffix}").stat().st_size > 0
    for name in ("prediction_summary.txt", "prediction.log", "prediction_config.json",
                 "dilution_counts.csv", "dilution_counts.png"):
        assert (out / name).stat().st_size > 0
    log_text = (out / "prediction.log").read_text()
    assert "unet chosen from" in log_text  # the run folder resolved to its best model
    # Never write into a non-empty folder by accident.
    assert pm.main(["--model", str(run), "--input_dir", str(inp), "--output_dir",
                    str(out)]) == 2


def test_missing_config_and_unknown_keys_are_errors(tmp_path, tiny_unet, capsys):
    run = _write_run(tmp_path, tiny_unet)
    (run / "config.json").unlink()
    inp = tmp_path / "in"
    inp.mkdir()
    mio.write_image(inp / "a.png", np.zeros((8, 8), np.uint8))
    assert pm.main(["--model", str(run / "best_unet_model.hdf5"), "--input_dir", str(inp),
                    "--output_dir", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    cfg = _config()
    cfg["preprocessing"]["resize_mode"] = "bicubic"
    (run / "config.json").write_text(json.dumps(cfg))
    assert pm.main(["--model", str(run), "--input_dir", str(inp),
                    "--output_dir", str(tmp_path / "o2")]) == 2
    assert "resize_mode" in capsys.readouterr().err


def _frames(folder, n, shape=(90, 130), bad=()):
    folder.mkdir()
    rng = np.random.default_rng(7)
    files = []
    for i in range(n):
        p = folder / f"{160 * 2 ** i}x_2025-05-16_01-02-0{i}_10{i}.png"
        if i in bad:
            p.write_bytes(b"not an image")
        else:
            mask, _ = _disc_frame(shape, n=12, seed=i)
            mio.write_image(p, (mask * 180 + 30 + rng.integers(0, 20, shape)).astype(np.uint8))
        files.append(p)
    return files


def _out(folder):
    for sub in ("masks", "labels", "overlays", "comparisons"):
        (folder / sub).mkdir(parents=True)
    return folder


def _strip(rows):
    # NaN (no scale verdict on a frame with few beads) compares unequal to itself.
    return [{k: "nan" if isinstance(v, float) and v != v else v for k, v in r.items()
             if k != "time_s"} for r in rows]


def test_pipelined_and_sequential_give_the_same_rows_and_files(tmp_path):
    files = _frames(tmp_path / "in", 5, bad=(2,))
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    kw = dict(tile_size=64, overlap=16, batch_size=2)
    fn = lambda b: b[..., 0]  # noqa: E731 - the normalised image is the "probability"
    seq = prediction_pipeline.predict_files(files, fn, cfg, _out(tmp_path / "seq"),
                                            pipelined=False, **kw)
    seen = []
    par = prediction_pipeline.predict_files(files, fn, cfg, _out(tmp_path / "par"),
                                            pipelined=True, workers=3, on_row=seen.append, **kw)
    assert _strip(par) == _strip(seq)
    assert [r["file"] for r in par] == [f.name for f in files]  # input order, bad one too
    assert [r["file"] for r in seen] == [f.name for f in files]  # progress in order
    assert files[2].name in par[2]["status"]
    assert all(r["status"] == "ok" for i, r in enumerate(par) if i != 2)
    assert all(r["beads"] > 5 for i, r in enumerate(par) if i != 2)
    for f in (tmp_path / "seq").rglob("*.*"):
        twin = tmp_path / "par" / f.relative_to(tmp_path / "seq")
        assert twin.read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("workers", [1, 2])
def test_pipeline_reads_at_most_workers_frames_ahead(tmp_path, monkeypatch, workers):
    files = _frames(tmp_path / "in", 6)
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    reads, ahead = [], []
    real_read = mio.read_image

    def counting_read(path, channels=1):
        reads.append(path)
        return real_read(path, channels=channels)

    def slow_fn(batch):
        ahead.append(len(reads))
        __import__("time").sleep(0.02)  # the network is the slow stage
        return batch[..., 0]

    monkeypatch.setattr(mio, "read_image", counting_read)
    n_tiles = tiling.plan_tiles((45, 65, 1), 64, 16, 4).n_tiles  # model scale: half size
    calls_per_frame = -(-n_tiles // min(8, n_tiles))
    rows = prediction_pipeline.predict_files(files, slow_fn, cfg, _out(tmp_path / "o"),
                                             tile_size=64, overlap=16, batch_size=8,
                                             workers=workers)
    assert all(r["status"] == "ok" for r in rows)
    assert len(ahead) == calls_per_frame * len(files)
    # While frame i is in the network at most frame i + workers has been read: memory is
    # bounded by the queue, not by the number of images.
    for call, n_read in enumerate(ahead):
        assert n_read <= call // calls_per_frame + 1 + workers
    assert max(ahead) == len(files)  # and reading did run ahead of the network


def test_the_last_frame_is_finished_beside_the_frames_before(tmp_path, monkeypatch, caplog):
    # One finisher more than loaders, and the last frame's finishing is submitted as soon as
    # it leaves the network: frame 0's outputs wait here until frame 2's have started, which
    # with one finisher (or the last frame queued behind frame 0) never happens. Frame 1 is
    # then finished before frame 0: log lines must still come in input order.
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="microbead.predict")

    files = _frames(tmp_path / "in", 3)
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    last_started, waited = threading.Event(), []
    real_write = prediction_pipeline.write_outputs

    def write_outputs(out_dir, stem, *args, **kwargs):
        if stem == files[2].stem:
            last_started.set()
        if stem == files[0].stem:
            waited.append(last_started.wait(timeout=20))
        return real_write(out_dir, stem, *args, **kwargs)

    monkeypatch.setattr(prediction_pipeline, "write_outputs", write_outputs)
    rows = prediction_pipeline.predict_files(files, lambda b: b[..., 0], cfg,
                                             _out(tmp_path / "o"), tile_size=64, overlap=16,
                                             batch_size=2, workers=1, figures=False)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert waited == [True]
    logged = [r.getMessage().split(":")[0] for r in caplog.records if "beads" in r.getMessage()]
    assert logged == [f.name for f in files]


def test_at_model_scale_one_the_label_image_is_the_filtered_split():
    # Scale 1 skips the carry-over to native resolution: the labels must still be the ids
    # 1..N inside the mask, the count their number, the mask the filtered split's.
    mask, _ = _disc_frame((160, 192), n=14, seed=3)
    prob = mask.astype(np.float32) * 0.9
    prob[2:12, 2:12] = 0.8  # a 100-px smudge: a component, below the filter's area bound
    cfg = _config(scale=1.0, pixel_scale=1.0, area=np.pi * 9.4 ** 2)
    cfg["postprocessing"]["object_filter"] = {"min_area_px": 150.0, "quantile": 0.01,
                                              "margin": 0.5, "n_matched": 14}
    res = prediction.finish_frame(prob, prob.shape, cfg)
    labels, kept, rejected, areas = prediction.filtered_beads(prob, cfg["postprocessing"], 0.5)
    assert rejected == 1 and res["rejected"] == 1
    # The scale check's component areas are those of the filtered mask (smudge gone).
    assert sorted(areas) == sorted(microbead_metrics.component_areas(kept))
    assert res["n_components"] == areas.size == microbead_metrics.count_components(kept)
    np.testing.assert_array_equal(res["labels"], labels)
    np.testing.assert_array_equal(res["mask"], kept)
    ids = np.unique(res["labels"][res["labels"] > 0])
    assert ids.tolist() == list(range(1, res["beads"] + 1)) and res["beads"] >= 10
    assert not (res["labels"][res["mask"] == 0]).any()
    assert res["mask"][2:12, 2:12].sum() == 0  # the rejected smudge is not in the mask


def test_a_failing_write_fails_that_image_only(tmp_path, monkeypatch):
    files = _frames(tmp_path / "in", 3)
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    real_write = mio.write_labels

    def write_labels(path, labels):
        if "320x" in str(path):
            raise OSError(f"{path}: disk full")
        real_write(path, labels)

    monkeypatch.setattr(mio, "write_labels", write_labels)
    rows = prediction_pipeline.predict_files(files, lambda b: b[..., 0], cfg, _out(tmp_path / "o"),
                            tile_size=64, overlap=16, batch_size=2)
    assert [r["status"] == "ok" for r in rows] == [True, False, True]
    assert "disk full" in rows[1]["status"] and "320x" in rows[1]["status"]


def test_count_equals_the_ids_in_the_written_label_image():
    # Model scale 0.5: a one-pixel bead at 0.6 blurs below the threshold at native size and
    # is lost from the label image; the count must not keep it (issue 15, item 6).
    prob = np.zeros((40, 40), np.float32)
    prob[10, 10] = 0.6
    prob[25:30, 25:30] = 0.9
    cfg = _config(scale=0.5, pixel_scale=0.5, area=20.0)
    res = prediction.finish_frame(prob, (80, 80), cfg)
    ids = np.unique(res["labels"])
    ids = ids[ids > 0]
    assert res["beads"] == ids.size == 1
    assert ids.tolist() == [1]  # renumbered from 1, no gaps


def test_overwrite_removes_the_previous_predictions_files_only(tmp_path, tiny_unet):
    # A rerun with --overwrite on fewer frames must not leave the old frames' masks, which
    # evaluate_predictions.py would pair as fresh predictions; files not predict's stay.
    run = _write_run(tmp_path, tiny_unet)
    inp = tmp_path / "frames"
    inp.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a.png", "b.png"):
        mio.write_image(inp / name, (rng.random((40, 56)) * 255).astype(np.uint8))
    out = tmp_path / "pred"
    base = ["--model", str(run), "--input_dir", str(inp), "--output_dir", str(out),
            "--tile_size", "64"]
    assert pm.main(base + ["--geojson", "--save_prob"]) == 0
    assert (out / "masks" / "b_mask.png").is_file() and (out / "geojson" / "b.geojson").is_file()
    (inp / "b.png").unlink()
    (out / "notes.txt").write_text("mine")
    mio.write_mask(out / "masks" / "hand_drawn.png", np.eye(8, dtype=np.uint8))
    assert pm.main(base) == 2  # refused without --overwrite
    assert pm.main(base + ["--overwrite", "--no_figures"]) == 0
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not {p for p in left if p.split("/")[-1].startswith("b")}, left
    assert {"notes.txt", "masks/hand_drawn.png", "masks/a_mask.png", "labels/a_labels.tif",
            "beads/a_beads.csv", "prediction_summary.csv"} <= left
    assert not any(p.startswith(("overlays/", "comparisons/", "prob/", "geojson/"))
                   for p in left)
    with open(out / "prediction_summary.csv", newline="") as fh:
        assert [r["file"] for r in csv.DictReader(fh)] == ["a.png"]
    used = json.loads((out / "prediction_config.json").read_text())
    assert used["overlap"] == tiling.default_overlap(2) and used["network_depth"] == 2
    assert "receptive field" in used["overlap_source"]


def test_comparison_of_a_wide_strip_is_stacked_titled_and_readable():
    # A grid-row strip of 7 tiles (3362x512): side by side it was 2399x121 px.
    stacked, f = frame_outputs.comparison_layout(512, 3362)
    assert stacked and f == pytest.approx(2400 / 3362)
    # a tile: side by side, full size
    assert frame_outputs.comparison_layout(512, 512) == (False, 1.0)
    gray = np.random.default_rng(0).random((64, 420)).astype(np.float32)
    out = frame_outputs.comparison_image(gray, gray, np.zeros((64, 420, 3), np.uint8),
                                         max_side=300)
    stacked, f = frame_outputs.comparison_layout(64, 420, 300)
    assert stacked and out.shape[1] == round(420 * f)
    assert out.shape[0] == 3 * (round(64 * f) + 30) + 2 * 8  # three titled panels
    assert (out[:30] < 128).any()  # the title's black text


@pytest.mark.parametrize("pipelined", [True, False])
def test_only_the_first_frame_is_normalised_on_every_cpu(tmp_path, monkeypatch, pipelined):
    # Nothing runs beside the first frame's load (the network waits for it), so it is
    # normalised in strips on every usable CPU; later frames load beside the network on one.
    files = _frames(tmp_path / "in", 3)
    cfg = _config(area=np.pi * 4.7 ** 2, pad=4)
    threads, real = [], prediction.preprocess_frame

    def preprocess_frame(image, pre, threads_=1):
        threads.append(threads_)
        return real(image, pre, threads_)

    monkeypatch.setattr(prediction, "preprocess_frame", preprocess_frame)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 3)
    rows = prediction_pipeline.predict_files(files, lambda b: b[..., 0], cfg,
                                             _out(tmp_path / "o"), tile_size=64, overlap=16,
                                             batch_size=2, workers=1, figures=False,
                                             pipelined=pipelined)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert threads == ([3, 1, 1] if pipelined else [1, 1, 1])

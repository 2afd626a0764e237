"""Which predicted objects count as beads (issue: counts a limit of detection can rest on).

Faint smudges and dark-corner noise that a network marks must not become beads; the filter
is calibrated on the beads the labels confirm, and the scale check compares frames with the
model's own beads, not with the (shrunk) label masks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import bead_filter as bf
import microbead_config as mcfg
import microbead_io as mio
import prediction
import synthetic_beads as syn


def _centres(rng, n, shape, *, margin=8, gap=12):
    """``n`` disc centres at least ``margin`` px from the border and ``gap`` px apart."""
    centres = []
    while len(centres) < n:
        c = rng.uniform(margin, np.array(shape) - margin)
        if all(np.hypot(*(c - d)) > gap for d in centres):
            centres.append(c)
    return centres


def _scene(seed=0, n_beads=40, n_faint=6, shape=(160, 200)):
    """Normalised image (beads 0.2, faint blobs 0.93 on 1.0 +- 0.02 noise), a 'probability'
    map that marks both, and the bead-only truth mask."""
    rng = np.random.default_rng(seed)
    img = 1.0 + rng.normal(0, 0.02, shape)
    prob = np.zeros(shape, np.float32)
    truth = np.zeros(shape, np.uint8)
    yy, xx = np.indices(shape)
    centres = _centres(rng, n_beads + n_faint, shape)
    for k, (cy, cx) in enumerate(centres):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        prob[disc] = 0.9
        if k < n_beads:
            img[disc] = 0.2
            truth[disc] = 1
        else:
            img[disc] = 0.93  # a faint smudge: barely darker than the background noise
    return img.astype(np.float32), prob, truth, np.array(centres)


def test_features_contrast_and_snr_tell_beads_from_faint_blobs():
    img, prob, truth, centres = _scene()
    labels = np.zeros(prob.shape, np.int32)
    yy, xx = np.indices(prob.shape)
    for k, (cy, cx) in enumerate(centres, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = k
    f = bf.object_features(labels, prob, img)
    assert f["area_px"].tolist() == np.bincount(labels.ravel())[1:].tolist()
    assert np.allclose(f["mean_prob"], 0.9)
    assert np.allclose(f["contrast"][:40], 0.8, atol=0.02)
    assert np.allclose(f["contrast"][40:], 0.07, atol=0.02)
    assert f["snr"][:40].min() > 10 * f["snr"][40:].max() / 2
    assert np.allclose(f["cy"], centres[:, 0], atol=0.3)
    # No image: the image evidence is unknown (NaN) and never rejects.
    g = bf.object_features(labels, prob, None)
    assert np.isnan(g["contrast"]).all()
    assert bf.accepted(g, {"min_contrast": 0.5}).all()


def test_match_centres_is_one_to_one_within_the_radius():
    truth = np.array([[10.0, 10.0], [10.0, 16.0], [50.0, 50.0]])
    pred = np.array([[10.0, 11.0], [30.0, 30.0], [10.0, 15.0], [10.0, 13.0]])
    tm, pm_ = bf.match_centres(truth, pred, 2.5)
    assert tm.tolist() == [True, True, False]
    assert pm_.tolist() == [True, False, True, False]  # (10, 13) is nobody's nearest free
    assert bf.match_centres(np.zeros((0, 2)), pred, 3)[1].tolist() == [False] * 4


def test_calibrated_filter_keeps_confirmed_beads_and_drops_faint_blobs():
    img, prob, truth, _ = _scene(seed=1)
    cfg = {"preprocessing": {"scale": 1.0},
           "postprocessing": {"threshold": 0.5, "median_bead_area_px": 49.0}}
    # Without a filter the faint blobs are counted as beads.
    plain = prediction.finish_frame(prob, prob.shape, cfg, image_small=img)
    assert plain["beads"] == 46 and plain["rejected"] == 0
    feats = bf.object_features(plain["labels"], prob, img)
    matched = bf.match_centres(bf.component_centres(truth),
                               np.stack([feats["cy"], feats["cx"]], 1), 6.0)[1]
    assert matched.sum() == 40
    # Each bound keeps all but `quantile` of the confirmed beads: the recall cost is bounded
    # by construction (at most one quantile per feature).
    tight = bf.calibrate(feats, matched, margin=1.0)
    assert (~bf.accepted(feats, tight))[matched].mean() <= len(bf.CALIBRATED) * 0.01 + 1 / 40
    rule = bf.calibrate(feats, matched)  # the default: half the 1 % quantile
    assert rule["n_matched"] == 40 and "min_contrast" in rule and "min_snr" in rule
    assert "min_mean_prob" not in rule
    assert rule["min_contrast"] == pytest.approx(
        0.5 * np.quantile(feats["contrast"][matched], 0.01))
    filtered = prediction.finish_frame(prob, prob.shape, {**cfg, "postprocessing": {
        **cfg["postprocessing"], "object_filter": rule}}, image_small=img)
    assert filtered["beads"] == 40 and filtered["rejected"] == 6
    ids = np.unique(filtered["labels"])
    assert ids.tolist() == list(range(41))  # renumbered: the count is the ids in the file
    assert not filtered["mask"][truth == 0].any()  # the blobs left the mask too
    # Too few confirmed beads: no rule rather than a guess.
    assert bf.calibrate(feats, np.arange(46) < 5) is None
    assert "every predicted bead counts" in bf.describe(None)
    assert "contrast >=" in bf.describe(rule)


def _beads_mask(radius, shape=(400, 600), seed=0):
    rng = np.random.default_rng(seed)
    beads = syn.sample_beads(rng, shape, 120, radius=radius, radius_sd=0.3, min_gap=2.0)
    return syn.render_masks(beads, shape)[0]


def test_scale_check_uses_the_models_own_beads_and_still_flags_2x_and_half():
    whole = _beads_mask(4.0)  # what the model segments: whole beads, ~50 px
    labels = syn.render_masks(syn.sample_beads(np.random.default_rng(0), (400, 600), 120,
                                               radius=4.0, radius_sd=0.3, min_gap=2.0),
                              (400, 600))[1]
    whole_area = float(np.median(np.bincount(labels.ravel())[1:]))
    shrunk_area = whole_area / 2.5  # the label masks' beads: shrunk by the users' detector
    post = {"threshold": 0.5, "median_bead_area_px": shrunk_area}
    cfg = {"preprocessing": {"scale": 1.0}, "postprocessing": post}
    prob = whole.astype(np.float32)
    # An older run (no model area stored): a correct frame is flagged, as users saw.
    assert prediction.finish_frame(prob, prob.shape, cfg)["scale_warning"]
    # With the model's own predicted bead area as reference: a correct frame is quiet ...
    ok = {**cfg, "postprocessing": {**post, "predicted_bead_area_px": whole_area}}
    res = prediction.finish_frame(prob, prob.shape, ok)
    assert res["scale_warning"] == "" and 0.8 < res["bead_area_ratio"] < 1.25
    # ... and frames at half and at twice the training scale are still flagged.
    half = mio.resize_mask(whole, (200, 300)).astype(np.float32)
    assert "smaller" in prediction.finish_frame(half, half.shape, ok)["scale_warning"]
    double = mio.resize_mask(whole, (800, 1200)).astype(np.float32)
    assert "larger" in prediction.finish_frame(double, double.shape, ok)["scale_warning"]
    # A blank frame's handful of small specks is no sample of the bead size: no verdict.
    specks = np.zeros((400, 600), np.float32)
    for k in range(6):
        specks[50 + 40 * k:53 + 40 * k, 100:103] = 1.0
    quiet = prediction.finish_frame(specks, specks.shape, ok)
    assert quiet["scale_warning"] == "" and np.isnan(quiet["bead_area_ratio"])


def _config(tmp_path):
    return {
        "format_version": mcfg.FORMAT_VERSION,
        "models": {"unet": {"architecture": "unet", "filters": 4, "depth": 2, "dropout": 0.1,
                            "batch_norm": True}},
        "preprocessing": {"channels": 1, "input_size": [64, 64],
                          "stored_tile_size": [64, 64], "pixel_scale": 1.0,
                          "pixel_scale_source": "test", "scale": 1.0, "scale_source": "test",
                          "channel_mode": "luminance", "normalization": {"method": "percentile"},
                          "pad_multiple": 4},
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 20.0,
                           "median_bead_area_native_px": 20.0},
        "training": dict(mcfg.TRAINING_DEFAULTS),
        "data": {"data_dir": str(tmp_path), "n_images": 2, "skipped": [],
                 "mean_objects_per_image": 1.0, "positive_ratio": 0.1,
                 "label_consistency_ceiling": None},
        "environment": {},
    }


def test_per_model_calibration_round_trips_and_old_runs_still_load(tmp_path):
    cfg = _config(tmp_path)
    rule = {"quantile": 0.01, "n_matched": 50, "min_area_px": 12.0}
    cfg["postprocessing"]["per_model"] = {
        "unet": {"predicted_bead_area_px": 48.0, "object_filter": rule}}
    mcfg.save_run_config(tmp_path / "config.json", cfg)
    back = mcfg.read_run_config(tmp_path / "config.json")
    used = mcfg.for_model(back, mcfg.model_name_of(tmp_path / "best_unet_model.hdf5"))
    assert used["postprocessing"]["object_filter"] == rule
    assert used["postprocessing"]["predicted_bead_area_px"] == 48.0
    assert "object_filter" not in back["postprocessing"]  # the input is not changed
    other = mcfg.for_model(back, "attention_unet")
    assert "object_filter" not in other["postprocessing"]
    assert mcfg.model_name_of("final_attention_resunet_model.keras") == "attention_resunet"
    # A run saved before these keys (and before --val_split) loads and predicts as before.
    old = copy.deepcopy(_config(tmp_path))
    del old["training"]["val_split"]
    mcfg.save_run_config(tmp_path / "old.json", old)
    loaded = mcfg.for_model(mcfg.read_run_config(tmp_path / "old.json"), "unet")
    assert prediction.reference_bead_area(loaded["postprocessing"]) == 20.0
    # An unknown key is still an error.
    bad = copy.deepcopy(old)
    bad["postprocessing"]["object_filtre"] = rule
    with pytest.raises(mcfg.ConfigError, match="object_filtre"):
        mcfg.save_run_config(tmp_path / "bad.json", bad)


def _colour_scene(bead_rgb, debris_rgb, seed=1, n_beads=40, n_debris=8, shape=(160, 200)):
    """RGB frame (grey background ~0.8) with ``n_beads`` discs of ``bead_rgb`` (labelled)
    and ``n_debris`` discs of ``debris_rgb`` (not labelled); labels of all, truth mask."""
    rng = np.random.default_rng(seed)
    rgb = np.full(shape + (3,), 0.8) + rng.normal(0, 0.01, shape + (3,))
    labels = np.zeros(shape, np.int32)
    truth = np.zeros(shape, np.uint8)
    yy, xx = np.indices(shape)
    centres = _centres(rng, n_beads + n_debris, shape)
    for k, (cy, cx) in enumerate(centres, 1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        labels[disc] = k
        rgb[disc] = bead_rgb if k <= n_beads else debris_rgb
        truth[disc] = k <= n_beads
    return rgb.astype(np.float32), labels, truth


def test_colour_bound_drops_grey_debris_as_dark_as_the_dyed_beads():
    # Blue-purple beads and grey debris of the same luminance: contrast cannot tell them
    # apart, the chromaticity shift against the ring can (dye vs no dye).
    rgb, labels, truth = _colour_scene(bead_rgb=(0.30, 0.16, 0.55), debris_rgb=(0.25, 0.25, 0.25))
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    prob = (labels > 0).astype(np.float32) * 0.9
    f = bf.object_features(labels, prob, lum, colour=rgb)
    assert f["chroma_shift"].shape == (48, 3)
    assert np.allclose(f["chroma_shift"].sum(axis=1), 0, atol=1e-9)  # chromaticities sum to 1
    conf = bf.match_centres(bf.component_centres(truth),
                            np.stack([f["cy"], f["cx"]], 1), 3.0)[1]
    assert conf.sum() == 40
    rule = bf.calibrate(f, conf)
    assert rule["colour_direction"][2] > 0.5  # towards blue
    keep = bf.accepted(f, rule)
    assert keep[:40].all() and not keep[40:].any()
    # Without the colour bound the grey debris passes: it is as dark as the beads.
    grey_blind = bf.calibrate(f, conf, features_used=("area_px", "contrast", "snr"))
    assert bf.accepted(f, grey_blind)[40:].all()
    assert "colour" in bf.describe(rule)


def test_no_colour_bound_for_grey_beads_or_without_colour():
    # Undyed (grey) beads have no consistent colour: no bound, nothing rejected by colour.
    rgb, labels, truth = _colour_scene(bead_rgb=(0.2, 0.2, 0.2), debris_rgb=(0.3, 0.2, 0.5))
    prob = (labels > 0).astype(np.float32) * 0.9
    f = bf.object_features(labels, prob, rgb.mean(-1), colour=rgb)
    conf = bf.match_centres(bf.component_centres(truth),
                            np.stack([f["cy"], f["cx"]], 1), 3.0)[1]
    rule = bf.calibrate(f, conf)
    assert "min_colour" not in rule and "colour_direction" not in rule
    # A colour rule meeting a frame given without colour (NaN) rejects nothing by colour.
    blue, labels2, truth2 = _colour_scene(bead_rgb=(0.30, 0.16, 0.55), debris_rgb=(0.25,) * 3)
    prob2 = (labels2 > 0).astype(np.float32) * 0.9
    f2 = bf.object_features(labels2, prob2, blue.mean(-1), colour=blue)
    conf2 = bf.match_centres(bf.component_centres(truth2),
                             np.stack([f2["cy"], f2["cx"]], 1), 3.0)[1]
    rule2 = bf.calibrate(f2, conf2, features_used=("colour",))
    g = bf.object_features(labels2, prob2, blue.mean(-1))
    assert np.isnan(g["chroma_shift"]).all()
    assert bf.accepted(g, rule2).all()
    with pytest.raises(ValueError, match="colour shape"):
        bf.object_features(labels2, prob2, None, colour=blue[..., :2])


def test_training_calibration_uses_the_validation_tiles_colour(tmp_path):
    # The trainer's calibration sees the validation tiles in colour (read from the files at
    # model scale, cut to their windows): grey debris as dark as the beads gets no vote.
    import training_data
    import training_outputs

    rgb, labels, truth = _colour_scene(bead_rgb=(0.30, 0.16, 0.55), debris_rgb=(0.25,) * 3)
    path = tmp_path / "tile.png"
    mio.write_image(path, np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8))
    window = (0, 160, 0, 200)
    colour = training_data.colour_tiles([path], None, [window])
    assert colour.shape == (1, 160, 200, 3)
    assert np.allclose(colour[0] / 255.0, rgb, atol=0.5 / 255 + 1e-6)
    lum = (colour[0] / 255.0) @ np.array([0.299, 0.587, 0.114])
    prob = ((labels > 0) * 0.9).astype(np.float32)[None, ..., None]
    x_val = lum[None, ..., None].astype(np.float32)
    y_val = truth[None, ..., None].astype(np.float32)
    with_colour, kept = training_outputs.calibrate_on_validation(
        prob, x_val, y_val, 0.5, 50.0, colour=colour)
    without, _ = training_outputs.calibrate_on_validation(prob, x_val, y_val, 0.5, 50.0)
    assert "min_colour" in with_colour["object_filter"]
    assert "min_colour" not in without["object_filter"]
    assert with_colour["validation"]["dropped_unmatched"] == 8
    assert without["validation"]["dropped_unmatched"] == 0
    assert with_colour["validation"]["dropped_matched"] == 0
    assert int(kept[0].max()) == 40
    assert training_data.colour_tiles([tmp_path / "missing.png"], 160) is None


def test_prediction_applies_the_colour_bound_and_auto_scale_judges_the_kept_beads():
    # 30 blue beads (r 4, ~49 px) and 40 grey debris discs (r 8, ~200 px) as dark as them.
    # The counts, the reported scale ratio and the --auto_scale decision must all rest on
    # the same objects: the beads the filter keeps.
    shape = (300, 400)
    rng = np.random.default_rng(3)
    rgb = np.full(shape + (3,), 0.8) + rng.normal(0, 0.01, shape + (3,))
    prob = np.zeros(shape, np.float32)
    yy, xx = np.indices(shape)
    centres = _centres(rng, 70, shape, margin=12, gap=22)
    for k, (cy, cx) in enumerate(centres):
        r2 = 16 if k < 30 else 64
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r2
        rgb[disc] = (0.30, 0.16, 0.55) if k < 30 else (0.25, 0.25, 0.25)
        prob[disc] = 0.9
    lum = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.float32)
    rule = {"quantile": 0.01, "margin": 0.5, "n_matched": 30, "min_colour": 0.02,
            "colour_direction": [-0.16, -0.62, 0.77]}
    cfg = {"preprocessing": {"scale": 1.0},
           "postprocessing": {"threshold": 0.5, "median_bead_area_px": 49.0,
                              "predicted_bead_area_px": 49.0, "object_filter": rule}}
    assert prediction.needs_colour(cfg)
    with_colour = prediction.finish_frame(prob, shape, cfg, image_small=lum, colour=rgb)
    assert with_colour["beads"] == 30 and with_colour["rejected"] == 40
    assert with_colour["scale_warning"] == ""
    assert prediction.auto_scale_factor(prob, cfg, image_small=lum, colour=rgb) is None
    # Without the frame's colour the bound cannot apply: the debris counts, the frame looks
    # 4x off-scale, and --auto_scale would shrink it.
    grey_blind = prediction.finish_frame(prob, shape, cfg, image_small=lum)
    assert grey_blind["beads"] == 70 and grey_blind["rejected"] == 0
    assert "larger" in grey_blind["scale_warning"]
    assert prediction.auto_scale_factor(prob, cfg, image_small=lum) < 1.0
    # predict_frame takes the colour from an RGB frame itself.
    res = prediction.predict_frame(
        rgb.astype(np.float32), lambda b: np.repeat(prob[None], len(b), 0)[..., None],
        {**cfg, "preprocessing": {"scale": 1.0, "pixel_scale": 1.0, "pad_multiple": 4,
                                  "normalization": {"method": "none"}}},
        tile_size=400, overlap=0, batch_size=1)
    assert res["beads"] == 30

"""prediction.py (the core) and the bead-filter speed-ups it relies on."""

import numpy as np
import pytest
from scipy import ndimage

import bead_filter
import prediction


def _reference_features(labels, prob, image):
    """object_features as first written: whole-frame sums and SciPy filters."""
    n = int(labels.max(initial=0))
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    safe = np.maximum(area, 1.0)
    p = np.asarray(prob, np.float64).ravel()
    img = np.asarray(image, np.float64)
    yy, xx = np.indices(labels.shape)
    near = ndimage.maximum_filter(labels, size=5) > 0
    owner = ndimage.maximum_filter(labels, size=11)
    rid = np.where(~near & (owner > 0), owner, 0).ravel()
    cnt = np.bincount(rid, minlength=n + 1)[1:].astype(np.float64)
    s1 = np.bincount(rid, weights=img.ravel(), minlength=n + 1)[1:]
    s2 = np.bincount(rid, weights=img.ravel() ** 2, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        contrast = mean - np.bincount(flat, weights=img.ravel(), minlength=n + 1)[1:] / safe
        snr = contrast / np.maximum(np.sqrt(np.maximum(s2 / cnt - mean ** 2, 0.0)), 0.01)
    contrast[cnt == 0] = np.inf
    snr[cnt == 0] = np.inf
    return {"area_px": area,
            "mean_prob": np.bincount(flat, weights=p, minlength=n + 1)[1:] / safe,
            "max_prob": ndimage.maximum(p.reshape(labels.shape), labels, np.arange(1, n + 1)),
            "cy": np.bincount(flat, weights=yy.ravel(), minlength=n + 1)[1:] / safe,
            "cx": np.bincount(flat, weights=xx.ravel(), minlength=n + 1)[1:] / safe,
            "contrast": contrast, "snr": snr}


@pytest.mark.parametrize("seed", range(6))
def test_object_features_equal_the_whole_frame_computation_exactly(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 70, 2)
    labels = ((rng.random((h, w)) < 0.3) * rng.integers(1, 40, (h, w))).astype(np.int32)
    labels[labels == 5] = 0  # an id without pixels
    prob, image = rng.random((h, w)).astype(np.float32), rng.random((h, w)).astype(np.float32)
    got = bead_filter.object_features(labels, prob, image)
    for key, want in _reference_features(labels, prob, image).items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)


@pytest.mark.parametrize("top", [3000, 100_000])  # through uint16 / float32
@pytest.mark.parametrize("size", [5, 11])
def test_max_filter_equals_scipys_reflect_border(size, top):
    rng = np.random.default_rng(size)
    labels = ((rng.random((37, 53)) < 0.2) * rng.integers(1, top, (37, 53))).astype(np.int32)
    assert (labels.max() >= 2 ** 16) == (top > 2 ** 16)
    np.testing.assert_array_equal(bead_filter._max_filter(labels, size),
                                  ndimage.maximum_filter(labels, size=size))
    np.testing.assert_array_equal(bead_filter._max_filter(labels > 0, size),
                                  ndimage.maximum_filter(labels, size=size) > 0)


def _cfg(pred_area=50.0):
    return {"preprocessing": {"scale": 0.5, "pixel_scale": 0.5, "channels": 1},
            "postprocessing": {"threshold": 0.5, "median_bead_area_px": 40.0,
                               "predicted_bead_area_px": pred_area}}


def _discs(area_side: int, n: int = 30) -> np.ndarray:
    prob = np.zeros((40 * 6, 40 * 5), np.float32)
    for k in range(n):
        y, x = divmod(k, 5)
        prob[y * 40 + 5: y * 40 + 5 + area_side, x * 40 + 5: x * 40 + 5 + area_side] = 0.9
    return prob


def test_auto_scale_factor_is_the_one_rescaling_decision():
    assert prediction.auto_scale_factor(_discs(7), _cfg()) is None  # 49 px: right size
    f = prediction.auto_scale_factor(_discs(14), _cfg())  # 4x the area: halve the scale
    assert f == pytest.approx((196 / 50) ** -0.5)
    assert prediction.auto_scale_factor(_discs(14, n=5), _cfg()) is None  # too few beads
    assert prediction.auto_scale_factor(_discs(35), _cfg(1.0)) == 0.25  # clipped


def test_config_at_scale_moves_scale_and_native_bead_area_only():
    cfg = _cfg()
    assert prediction.config_at_scale(cfg, 0.5) is cfg
    moved = prediction.config_at_scale(cfg, 0.25)
    assert moved["preprocessing"]["scale"] == 0.25 and cfg["preprocessing"]["scale"] == 0.5
    assert moved["postprocessing"]["median_bead_area_native_px"] == 40.0 / 0.25 ** 2


def test_resolve_model_errors_are_exceptions_naming_the_file(tmp_path):
    with pytest.raises(prediction.ModelNotFoundError, match="model file not found"):
        prediction.resolve_model(str(tmp_path / "m.hdf5"))
    with pytest.raises(prediction.ModelNotFoundError, match="training_summary.csv"):
        prediction.resolve_model(str(tmp_path))
    (tmp_path / "m.hdf5").write_bytes(b"")
    with pytest.raises(prediction.ModelNotFoundError, match="config.json: not found next to"):
        prediction.resolve_model(str(tmp_path / "m.hdf5"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(prediction.RunConfigError, match="config.json"):
        prediction.read_run_config(tmp_path / "config.json")

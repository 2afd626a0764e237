"""preprocessing_head.py: the in-graph flat-field equals microbead_io's, borders included."""

import numpy as np
import pytest

import microbead_io as mio

keras = pytest.importorskip("keras")
ph = pytest.importorskip("preprocessing_head")
cv2 = pytest.importorskip("cv2")


def _frame(shape=(44, 58), seed=0):
    """RGB uint8 with light falling off across the frame, dark beads, one on the border."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    light = 120 + 90 * np.cos(xx / 40.0) * np.cos(yy / 60.0)
    grey = light + rng.normal(0, 6, shape)
    for cy, cx in ((10, 12), (30, 40), (0, 25), (h - 3, w - 2)):
        grey[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] -= 90
    rgb = np.stack([grey * 0.8, grey * 0.7, grey], -1)  # blue-purple tint, like the users'
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _identity_network(channels=1):
    x = keras.Input((None, None, channels))
    return keras.Model(x, keras.layers.Identity()(x))


@pytest.mark.parametrize("sigma", [3.75, 4.25, 16.25, 40.25])
def test_gaussian_kernel_is_opencvs(sigma):
    k = ph.gaussian_kernel(sigma)
    size = int(round(8 * sigma + 1)) | 1
    ref = cv2.getGaussianKernel(size, sigma, cv2.CV_32F).ravel()
    assert k.shape == ref.shape
    np.testing.assert_allclose(k, ref, atol=1e-7)


@pytest.mark.parametrize("window", [15, 17])
def test_head_equals_numpy_flatfield_including_the_border(window):
    rgb = _frame()
    norm = {"method": "flatfield", "window": window, "low": 0.45, "high": 1.08}
    head = ph.with_preprocessing(_identity_network(), input_channels=3, channels=1,
                                 normalization=norm)
    got = np.asarray(head.predict_on_batch(rgb.astype(np.float32)[None]))[0]
    ref = mio.apply_normalization(mio.to_channels(rgb, 1), norm)
    assert got.shape == ref.shape == (44, 58, 1)
    assert 0.05 < ref.mean() < 0.95  # the comparison is not between two constants
    # Exact up to float rounding everywhere: OpenCV's replicated border never changes a
    # max/min, and the Gaussian's BORDER_REFLECT is gathered explicitly.
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_head_without_luminance_and_16_bit_values():
    grey = mio.to_channels(_frame(), 1) * 257.0  # the same frame stored as 16-bit
    norm = {"method": "flatfield", "window": 15, "low": 0.5, "high": 1.1}
    head = ph.with_preprocessing(_identity_network(), input_channels=1, channels=1,
                                 normalization=norm)
    got = np.asarray(head.predict_on_batch(grey[None]))[0]
    np.testing.assert_allclose(got, mio.apply_normalization(grey, norm), atol=1e-4)
    np.testing.assert_allclose(got, mio.apply_normalization(grey / 257.0, norm), atol=1e-4)


def test_hdf5_reloads_without_custom_objects(tmp_path):
    """bioimageio.core loads keras_hdf5 weights with Keras' legacy loader, no custom objects."""
    h5py = pytest.importorskip("h5py")
    from keras.src.legacy.saving import legacy_h5_format

    norm = {"method": "flatfield", "window": 15, "low": 0.45, "high": 1.08}
    head = ph.with_preprocessing(_identity_network(), input_channels=3, channels=1,
                                 normalization=norm)
    head.save(tmp_path / "head.h5")
    with h5py.File(tmp_path / "head.h5", "r") as fh:
        again = legacy_h5_format.load_model_from_hdf5(fh)
    x = _frame(seed=1).astype(np.float32)[None]
    np.testing.assert_array_equal(np.asarray(again.predict_on_batch(x)),
                                  np.asarray(head.predict_on_batch(x)))


def test_reach_and_refusals():
    geo = ph.flatfield_geometry(15)
    assert (geo["window"], geo["sigma"], geo["radius"]) == (15, 3.75, 15)
    assert geo["reach"] == 14 + 15 == ph.head_reach({"method": "flatfield", "window": 15})
    assert ph.head_reach({"method": "none"}) == 0
    assert ph.is_in_graph({"method": "flatfield"}) and not ph.is_in_graph({"method": "percentile"})
    with pytest.raises(ValueError, match="percentile"):
        ph.with_preprocessing(_identity_network(), input_channels=1, channels=1,
                              normalization={"method": "percentile", "low": 1, "high": 99})
    with pytest.raises(ValueError, match="input_channels=1"):
        ph.with_preprocessing(_identity_network(3), input_channels=1, channels=3,
                              normalization={"method": "none"})


def _real_tiles():
    import os
    from pathlib import Path

    folder = Path(os.environ.get("MICROBEAD_REAL_TILES",
                                 Path(__file__).resolve().parents[2] / "shared" / "real_tiles"))
    images = folder / "images"
    return sorted(images.glob("*.png")) if images.is_dir() else []


@pytest.mark.skipif(not _real_tiles(), reason="the users' real tiles are not here "
                    "(../shared/real_tiles or $MICROBEAD_REAL_TILES)")
def test_head_equals_numpy_flatfield_on_real_tiles():
    """Real RGB tiles, the default window for their ~8 px beads, levels pooled from them."""
    files = _real_tiles()
    rgbs = [mio.read_image(f, channels=3) for f in (files[0], files[-1])]
    window = mio.flatfield_window(8.0)
    low, high = mio.flatfield_levels([mio.to_channels(x, 1) for x in rgbs], window)
    norm = {"method": "flatfield", "window": window, "low": low, "high": high}
    head = ph.with_preprocessing(_identity_network(), input_channels=3, channels=1,
                                 normalization=norm)
    for rgb in rgbs:
        got = np.asarray(head.predict_on_batch(rgb[None]))[0]
        ref = mio.apply_normalization(mio.to_channels(rgb, 1), norm)
        np.testing.assert_allclose(got, ref, atol=1e-4)

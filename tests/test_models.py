"""Tests for models.py: metrics vs a NumPy reference, losses, builders, save/load.

Backend-agnostic: the whole file also runs under ``KERAS_BACKEND=jax`` (or torch). Models are
tiny (4-8 filters) and run eagerly, because tracing a graph costs more than two steps of a toy
model on a 2-core CPU.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers, ops

import models

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["unet", "attention_unet", "attention_resunet"]


# ---------------------------------------------------------------- helpers


def np_overlap(y_true, y_pred):
    """NumPy reference: per-image (jaccard, dice) at threshold 0.5, both-empty -> 1."""
    t = np.asarray(y_true, dtype=float).reshape(len(y_true), -1) > 0.5
    p = np.asarray(y_pred, dtype=float).reshape(len(y_pred), -1) > 0.5
    inter = (t & p).sum(axis=1)
    union = (t | p).sum(axis=1)
    total = t.sum(axis=1) + p.sum(axis=1)
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return jac, dice


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def image(values):
    """A (1, H, W, 1) float32 batch from a nested list."""
    return np.asarray(values, dtype="float32")[None, :, :, None]


def loss_and_grad(fn, y_true, y_pred):
    """Sum of a per-image loss and its gradient w.r.t. y_pred, on the active backend."""
    backend = keras.backend.backend()
    y_true = np.asarray(y_true, "float32")
    y_pred = np.asarray(y_pred, "float32")
    if backend == "tensorflow":
        import tensorflow as tf

        p = tf.Variable(y_pred)
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(fn(tf.constant(y_true), p))
        return float(value), tape.gradient(value, p).numpy()
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(lambda q: jax.numpy.sum(fn(y_true, q)))(y_pred)
        return float(value), np.asarray(grad)
    if backend == "torch":
        import torch

        p = torch.tensor(y_pred, requires_grad=True)
        value = torch.sum(fn(torch.tensor(y_true), p))
        value.backward()
        return float(value.detach()), p.grad.numpy()
    pytest.skip(f"no gradient helper for backend {backend}")


def bead_batch(n=2, size=64, seed=0):
    """Noisy images with bright disks, and the disk masks; (n, size, size, 1) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    x = rng.normal(0.0, 0.1, (n, size, size, 1)).astype("float32")
    y = np.zeros((n, size, size, 1), "float32")
    for i in range(n):
        for cy, cx in rng.integers(8, size - 8, (3, 2)):
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
            y[i, disk, 0] = 1.0
            x[i, disk, 0] += 1.0
    return x, y


# ---------------------------------------------------------------- metrics


def test_jaccard_and_dice_hand_computed():
    # truth {(0,0),(0,1)}, prediction {(0,1),(1,1)}: I = 1, U = 3, |T| + |P| = 4.
    truth = image([[1, 1], [0, 0]])
    pred = image([[0.2, 0.9], [0.5, 0.51]])  # 0.5 itself is background (strict >)
    assert to_np(models.jacard_coef(truth, pred)) == pytest.approx([1 / 3], abs=1e-7)
    assert to_np(models.dice_coef(truth, pred)) == pytest.approx([0.5], abs=1e-7)
    jac_ref, dice_ref = np_overlap(truth, pred)
    assert jac_ref == pytest.approx([1 / 3]) and dice_ref == pytest.approx([0.5])


def test_empty_cases():
    empty, full = image([[0, 0], [0, 0]]), image([[1, 1], [1, 1]])
    low = image([[0.4, 0.1], [0.0, 0.5]])  # all <= 0.5: an empty prediction
    for index, metric in enumerate((models.jacard_coef, models.dice_coef)):
        assert to_np(metric(empty, low)) == pytest.approx([1.0])  # empty / empty
        assert to_np(metric(empty, full)) == pytest.approx([0.0])  # false positives only
        assert to_np(metric(full, empty)) == pytest.approx([0.0])  # missed everything
        for truth, pred in ((empty, low), (empty, full), (full, empty)):
            assert to_np(metric(truth, pred)) == pytest.approx(np_overlap(truth, pred)[index])


def test_sparse_image_is_not_dominated_by_smoothing():
    # One foreground pixel: a smoothing constant of 1 would score a miss as (0+1)/(1+1) = 0.5.
    truth = np.zeros((1, 64, 64, 1), "float32")
    truth[0, 10, 10] = 1
    miss, hit = np.zeros_like(truth), truth.copy()
    miss[0, 40, 40] = 1
    assert to_np(models.jacard_coef(truth, miss)) == pytest.approx([0.0])
    assert to_np(models.jacard_coef(truth, hit)) == pytest.approx([1.0])
    assert to_np(models.dice_coef(truth, np.zeros_like(truth))) == pytest.approx([0.0])


def test_metrics_are_per_image_and_batch_value_is_their_mean():
    dense_t = image([[1, 1], [0, 0]])
    dense_p = image([[0, 1], [0, 1]])  # IoU 1/3, Dice 1/2
    empty = image([[0, 0], [0, 0]])  # both empty: 1
    truth = np.concatenate([dense_t, empty])
    pred = np.concatenate([dense_p, empty])
    jac = to_np(models.jacard_coef(truth, pred))
    assert jac.shape == (2,)
    assert jac == pytest.approx([1 / 3, 1.0])
    assert float(ops.mean(models.jacard_coef(truth, pred))) == pytest.approx(2 / 3)
    assert to_np(models.dice_coef(truth, pred)) == pytest.approx([0.5, 1.0])
    assert jac == pytest.approx(np_overlap(truth, pred)[0])


def test_metrics_match_numpy_reference_on_random_masks():
    rng = np.random.default_rng(0)
    truth = (rng.random((6, 16, 16)) > 0.7).astype("float32")  # (B, H, W) ...
    pred = rng.random((6, 16, 16, 1)).astype("float32") ** 2  # ... vs (B, H, W, 1)
    truth[1] = 0
    pred[1] = 0.1  # both empty
    truth[2] = 0  # empty truth, non-empty prediction
    jac_ref, dice_ref = np_overlap(truth, pred)
    assert jac_ref[1] == 1.0 and jac_ref[2] == 0.0
    np.testing.assert_allclose(to_np(models.jacard_coef(truth, pred)), jac_ref, atol=1e-6)
    np.testing.assert_allclose(to_np(models.dice_coef(truth, pred)), dice_ref, atol=1e-6)


def test_compiled_metric_averages_over_images_not_batches():
    # 3 images in batches of 2 + 1: per-image IoU [1/3, 1, 0] -> epoch value 4/9.
    # A mean of batch means would give ((1/3 + 1) / 2 + 0) / 2 = 1/3.
    truth = np.concatenate([image([[1, 1], [0, 0]]), image([[0, 0], [0, 0]]),
                            image([[0, 0], [0, 0]])])
    pred = np.concatenate([image([[0, 1], [0, 1]]), image([[0, 0], [0, 0]]),
                           image([[1, 0], [0, 0]])])
    inputs = keras.Input((2, 2, 1))
    identity = keras.Model(inputs, layers.Activation("linear")(inputs))
    # Graph mode on purpose: the per-image reshape must cope with a dynamic batch dimension.
    identity.compile(loss=models.dice_loss, metrics=[models.jacard_coef, models.dice_coef])
    result = identity.evaluate(pred, truth, batch_size=2, verbose=0, return_dict=True)
    assert result["jacard_coef"] == pytest.approx(4 / 9, abs=1e-6)
    assert result["dice_coef"] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-6)


# ---------------------------------------------------------------- losses


def test_soft_coefficients_hand_computed():
    truth = np.array([[1.0, 0.0]], "float32")
    pred = np.array([[0.5, 0.5]], "float32")
    # Dice: (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3; Jaccard: (0.5 + 1) / (1 + 1 - 0.5 + 1) = 0.6.
    assert to_np(models.soft_dice_coef(truth, pred)) == pytest.approx([2 / 3])
    assert to_np(models.soft_jaccard_coef(truth, pred)) == pytest.approx([0.6])
    assert to_np(models.soft_dice_coef(truth, pred, smooth=0.0)) == pytest.approx([0.5])
    assert to_np(models.dice_loss(truth, pred)) == pytest.approx([1 / 3])
    # Tversky with alpha = beta = 0.5 is the soft Dice loss (compared unsmoothed).
    tversky = models.tversky_loss(truth, pred, alpha=0.5, beta=0.5, smooth=0.0)
    assert to_np(tversky) == pytest.approx([0.5])
    # BCE: mean(-log 0.5, -log 0.5) = log 2.
    assert to_np(models.bce_loss(truth, pred)) == pytest.approx([np.log(2.0)], rel=1e-5)
    assert to_np(models.bce_dice_loss(truth, pred)) == pytest.approx([np.log(2.0) + 1 / 3],
                                                                     rel=1e-5)
    assert to_np(models.jaccard_loss(truth, pred)) == pytest.approx([0.4])
    # Focal, gamma 2, alpha 0.25: (0.25 + 0.75) * 0.5**2 * log 2 / 2 pixels.
    assert to_np(models.focal_loss(truth, pred)) == pytest.approx([0.125 * np.log(2.0)],
                                                                  rel=1e-5)


@pytest.mark.parametrize("name", sorted(models.LOSSES))
def test_losses_per_image_ordered_and_finite_gradients(name):
    fn = models.get_loss(name)
    rng = np.random.default_rng(0)
    shape = (2, 8, 8, 1)
    zeros, ones = np.zeros(shape, "float32"), np.ones(shape, "float32")
    soft = rng.uniform(0.05, 0.95, shape).astype("float32")
    assert to_np(fn(zeros, soft)).shape == (2,)
    for truth in (zeros, ones):
        for pred in (zeros, ones, soft):  # saturated predictions included
            value, grad = loss_and_grad(fn, truth, pred)
            assert np.isfinite(value), (name, truth.mean(), pred.mean())
            assert np.all(np.isfinite(grad)), (name, truth.mean(), pred.mean())
        _, grad = loss_and_grad(fn, truth, soft)
        assert np.abs(grad).max() > 0  # the loss does push the prediction
        # A perfect prediction costs less than the opposite one.
        assert float(ops.sum(fn(truth, truth))) < float(ops.sum(fn(truth, 1.0 - truth)))


def test_get_loss_names_and_errors():
    assert models.get_loss("dice") is models.dice_loss
    assert models.get_loss("BCE-Dice") is models.bce_dice_loss
    assert models.get_loss("tversky_loss") is models.tversky_loss
    assert models.get_loss(models.focal_loss) is models.focal_loss
    with pytest.raises(ValueError, match="valid names: dice, bce_dice, bce, focal"):
        models.get_loss("hinge")


# ---------------------------------------------------------------- builders


def _conv(k, c_in, c_out):
    return k * k * c_in * c_out + c_out


def expected_params(arch, filters, depth, channels=1):
    """Parameter count derived by hand from the architecture description (BN = 4 per ch)."""
    w = [filters * 2**i for i in range(depth + 1)]
    res = arch == "attention_resunet"

    def block(c_in, c):
        n = _conv(3, c_in, c) + _conv(3, c, c) + 8 * c
        return n + (_conv(1, c_in, c) + 4 * c if res else 0)

    total = block(channels, w[0]) + sum(block(w[i], w[i + 1]) for i in range(depth))
    for i in range(depth):
        total += block(w[i + 1] + w[i], w[i])
        if arch != "unet":  # gating signal + attention gate
            total += _conv(1, w[i + 1], w[i]) + 4 * w[i]
            total += (_conv(2, w[i], w[i]) + _conv(1, w[i], w[i]) + _conv(3, w[i], w[i])
                      + _conv(1, w[i], 1) + _conv(1, w[i], w[i]) + 4 * w[i])
    return total + _conv(1, w[0], 1)


@pytest.mark.parametrize("arch, reference", [("unet", 31.4e6), ("attention_unet", 37e6),
                                             ("attention_resunet", 39e6)])
def test_default_architecture_parameter_counts(arch, reference):
    # The hand count at 64 filters / depth 4 matches the figures users know ...
    assert expected_params(arch, 64, 4) == pytest.approx(reference, rel=0.02)
    # ... and the builders follow it: defaults for U-Net (31 M weights take seconds to
    # initialise), 8 filters at the default depth and input size for the attention nets.
    filters = 64 if arch == "unet" else 8
    model = models.build_model(arch) if arch == "unet" else models.build_model(arch, filters=8)
    assert model.count_params() == expected_params(arch, filters, 4)
    assert model.input_shape == (None, 256, 256, 1)
    assert model.output_shape == (None, 256, 256, 1)
    assert model.name == arch
    assert len([la for la in model.layers if isinstance(la, layers.MaxPooling2D)]) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_build_none_dims_predicts_any_tile_size(arch):
    model = models.build_model(arch, (None, None, 2), filters=4, depth=3, dropout=0.2)
    assert model.count_params() == expected_params(arch, 4, 3, channels=2)
    rng = np.random.default_rng(0)
    for size in (32, 48):
        out = to_np(model(rng.random((1, size, size, 2)).astype("float32"), training=False))
        assert out.shape == (1, size, size, 1)
        assert out.dtype == np.float32
        assert np.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_train_two_steps_reduces_loss(arch):
    keras.utils.set_random_seed(0)
    x, y = bead_batch()
    model = models.build_model(arch, (64, 64, 1), filters=4, depth=2, dropout=0.0,
                               bn_momentum=0.5)
    models.compile_model(model, lr=1e-2, loss="bce_dice", run_eagerly=True)
    # train_on_batch reports the loss of the forward pass before its update.
    first = model.train_on_batch(x, y, return_dict=True)
    second = model.train_on_batch(x, y, return_dict=True)
    assert set(first) >= {"loss", "jacard_coef", "dice_coef"}
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"])
    assert second["loss"] < first["loss"]


def test_builder_options():
    plain = models.build_unet((32, 32, 1), filters=4, depth=2, dropout=0.0, batch_norm=False)
    names = [layer.__class__.__name__ for layer in plain.layers]
    assert "BatchNormalization" not in names and "Dropout" not in names
    assert plain.count_params() == expected_params("unet", 4, 2) - 4 * (2 * 4 + 2 * 8 + 2 * 16
                                                                        + 2 * 8 + 2 * 4)
    bn = models.build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2,
                            bn_momentum=0.9, name="x")
    momenta = {layer.momentum for layer in bn.layers
               if isinstance(layer, layers.BatchNormalization)}
    assert momenta == {0.9}
    assert bn.name == "x"
    assert any(isinstance(layer, layers.Dropout) and layer.rate == 0.3 for layer in bn.layers)


def test_output_is_float32_under_mixed_precision():
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = models.build_attention_unet((32, 32, 1), filters=4, depth=2)
        assert model.get_layer("enc1_conv1").compute_dtype == "float16"
        assert model.get_layer("output").compute_dtype == "float32"
        assert keras.backend.standardize_dtype(model.outputs[0].dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="unet, attention_unet, attention_resunet|valid names"):
        models.build_model("segnet")
    with pytest.raises(ValueError, match="2\\*\\*depth = 16"):
        models.build_unet((100, 96, 1))
    with pytest.raises(ValueError, match="2\\*\\*depth = 4"):
        models.build_unet((None, 6, 1), depth=2)
    with pytest.raises(ValueError, match="dropout"):
        models.build_unet((32, 32, 1), dropout=1.0)


# ---------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_identical_predictions(arch, tmp_path):
    model = models.build_model(arch, (None, None, 1), filters=4, depth=2)
    # Random non-trivial weights, BN moving statistics included (variances kept positive).
    rng = np.random.default_rng(0)
    model.set_weights([np.abs(w) + rng.uniform(0.1, 0.5, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    x, _ = bead_batch(n=2, size=32)
    expected = to_np(model(x, training=False))
    names = ["best_unet_model.hdf5", "best_unet_model.keras"] + (["m.h5"] if arch == "unet"
                                                                 else [])
    for filename in names:
        path = models.save_model(model, tmp_path / "sub" / filename)
        loaded = models.load_model(path)
        np.testing.assert_array_equal(to_np(loaded(x, training=False)), expected)
        assert loaded.count_params() == model.count_params()
    assert sorted(os.listdir(tmp_path / "sub")) == sorted(names)


@pytest.mark.parametrize("ext", [".hdf5", ".keras"])
def test_load_compiled_model_resolves_custom_loss_and_metrics(ext, tmp_path):
    model = models.build_unet((32, 32, 1), filters=4, depth=2)
    models.compile_model(model, loss="tversky", run_eagerly=True)
    x, y = bead_batch(n=2, size=32)
    model.train_on_batch(x, y)
    path = models.save_model(model, tmp_path / f"model{ext}")
    loaded = models.load_model(path, compile=True)
    loaded.compile(optimizer=loaded.optimizer, loss=loaded.loss,
                   metrics=[models.jacard_coef], run_eagerly=True)
    result = loaded.evaluate(x, y, verbose=0, return_dict=True)
    expected = float(ops.mean(models.tversky_loss(y, model(x, training=False))))
    assert result["loss"] == pytest.approx(expected, rel=1e-4)


def _add_unknown_config_key(path):
    """Rewrite a saved model's config as a newer Keras would: an extra key on every Conv2D."""
    def patch(text):
        config = json.loads(text)
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Conv2D":
                layer["config"]["option_from_the_future"] = 1
        return json.dumps(config)

    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        members["config.json"] = patch(members["config.json"]).encode()
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        import h5py

        with h5py.File(path, "r+") as fh:
            raw = fh.attrs["model_config"]
            fh.attrs["model_config"] = patch(raw.decode() if hasattr(raw, "decode") else raw)


@pytest.mark.parametrize("ext", [".hdf5", ".keras"])
def test_load_rebuilds_model_saved_by_newer_keras(ext, tmp_path, caplog):
    # Keras configs are not forward compatible (3.15 files fail in the container's 3.0.5);
    # load_model then rebuilds the architecture from the stored config and loads weights.
    model = models.build_attention_resunet((None, None, 1), filters=4, depth=2, dropout=0.1,
                                           bn_momentum=0.8, name="my_model")
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.uniform(0.1, 0.5, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    path = models.save_model(model, tmp_path / f"best{ext}")
    _add_unknown_config_key(path)
    with pytest.raises(Exception):  # noqa: B017 - the exact type depends on the Keras version
        keras.saving.load_model(path, custom_objects=models.CUSTOM_OBJECTS)
    with caplog.at_level("WARNING", logger="models"):
        loaded = models.load_model(path)
    assert "rebuilt" in caplog.text
    assert loaded.name == "my_model"
    assert loaded.input_shape == (None, None, None, 1)
    assert loaded.get_layer("dec1_dropout").rate == pytest.approx(0.1)
    assert loaded.get_layer("enc1_bn1").momentum == pytest.approx(0.8)
    x, _ = bead_batch(n=1, size=32)
    np.testing.assert_array_equal(to_np(loaded(x, training=False)),
                                  to_np(model(x, training=False)))


def test_load_unreadable_file_names_it(tmp_path):
    path = tmp_path / "broken.hdf5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="broken.hdf5: corrupt model file: not an HDF5 file"):
        models.load_model(path)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # never trained
def test_hdf5_save_keeps_optimizer_for_later_keras_saves(tmp_path):
    # Keras' HDF5 writer used to drop "optimizer" from the live compile config.
    model = models.build_unet((32, 32, 1), filters=4, depth=2)
    models.compile_model(model, lr=3e-4, loss="dice")
    models.save_model(model, tmp_path / "best.hdf5")
    models.save_model(model, tmp_path / "last.keras")
    for name in ("best.hdf5", "last.keras"):
        loaded = models.load_model(tmp_path / name, compile=True)
        assert isinstance(loaded.optimizer, keras.optimizers.Adam), name
        assert float(ops.convert_to_numpy(loaded.optimizer.learning_rate)) == pytest.approx(
            3e-4), name


def test_save_is_atomic(tmp_path, monkeypatch):
    model = models.build_unet((32, 32, 1), filters=4, depth=2)
    target = tmp_path / "best_unet_model.hdf5"
    target.write_bytes(b"previous best model")

    def killed_mid_write(model, filepath, *args, **kwargs):
        with open(filepath, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("walltime")

    monkeypatch.setattr(models.keras.saving, "save_model", killed_mid_write)
    with pytest.raises(RuntimeError, match="walltime"):
        models.save_model(model, target)
    assert target.read_bytes() == b"previous best model"
    assert os.listdir(tmp_path) == ["best_unet_model.hdf5"]  # no temp file left behind


def test_saved_file_mode_follows_umask(tmp_path):
    # The temp-file-and-rename must not leave a private (0600) model on a shared cluster.
    model = models.build_unet((32, 32, 1), filters=4, depth=2)
    old = os.umask(0o022)
    try:
        for name in ("m.hdf5", "m.keras"):
            path = models.save_model(model, tmp_path / name)
            assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_save_load_errors_name_the_file(tmp_path):
    model = models.build_unet((32, 32, 1), filters=4, depth=2)
    with pytest.raises(ValueError, match="model.HDF5"):  # Keras itself is case-sensitive
        models.save_model(model, tmp_path / "model.HDF5")
    with pytest.raises(ValueError, match="model.pb"):
        models.save_model(model, tmp_path / "model.pb")
    with pytest.raises(FileNotFoundError, match="missing.hdf5"):
        models.load_model(tmp_path / "missing.hdf5")
    with pytest.raises(ValueError, match="weights.npz"):
        models.load_model(tmp_path / "weights.npz")


def test_best_model_checkpoint_saves_only_on_improvement(tmp_path):
    model = models.build_unet((32, 32, 1), filters=4, depth=2)
    paths = [tmp_path / "best_unet_model.hdf5", tmp_path / "best_unet_model.keras"]
    ckpt = models.BestModelCheckpoint(paths, monitor="val_jacard_coef", mode="max")
    ckpt.set_model(model)
    ckpt.on_epoch_end(0, {"loss": 1.0})  # monitored key missing: nothing saved
    assert not any(p.exists() for p in paths)
    ckpt.on_epoch_end(1, {"val_jacard_coef": 0.5})
    assert ckpt.best_epoch == 1 and all(p.exists() for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    ckpt.on_epoch_end(2, {"val_jacard_coef": 0.4})
    assert ckpt.best_epoch == 1 and [p.stat().st_mtime_ns for p in paths] == stamps
    ckpt.on_epoch_end(3, {"val_jacard_coef": 0.6})
    assert ckpt.best_epoch == 3 and ckpt.best == pytest.approx(0.6)
    assert models.load_model(paths[0]).count_params() == model.count_params()
    with pytest.raises(ValueError, match="mode"):
        models.BestModelCheckpoint(paths, mode="up")


# ---------------------------------------------------------------- other backends

JAX_SCRIPT = textwrap.dedent("""
    import numpy as np, keras, models
    assert keras.backend.backend() == "jax", keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.random((2, 64, 64, 1)).astype("float32")
    y = (x > 0.7).astype("float32")
    for name in models.MODELS:
        model = models.build_model(name, (None, None, 1), filters=8, depth=2)
        models.compile_model(model, loss="bce_dice")
        logs = model.train_on_batch(x, y, return_dict=True)
        pred = model.predict(x, verbose=0)
        assert pred.shape == (2, 64, 64, 1) and np.isfinite(logs["loss"]), name
        print(name, model.count_params(), "loss %.4f" % logs["loss"])
""")


def _jax_available():
    try:
        import jax  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow  # JAX compiles every eager op per shape: ~2 min on 2 busy cores
@pytest.mark.skipif(not _jax_available(), reason="jax is not installed")
def test_models_build_and_train_under_jax_backend():
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", JAX_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ARCHS


@pytest.mark.parametrize("ext", [".keras", ".hdf5"])
def test_compiled_metrics_use_the_runs_threshold_and_keep_it_when_reloaded(ext, tmp_path):
    # Early stopping, ReduceLROnPlateau and the best-model checkpoint monitor
    # val_jacard_coef: it must score the masks prediction writes (the run's --threshold),
    # not a hard 0.5, and a model reloaded to resume must score the same way.
    truth = image([[1, 1], [0, 0]])
    pred = image([[0.6, 0.8], [0.6, 0.1]])  # > 0.5: 3 pixels (IoU 2/3); > 0.7: 1 (IoU 1/2)
    inputs = keras.Input((2, 2, 1))
    identity = keras.Model(inputs, layers.Conv2D(1, 1, use_bias=False,
                                                 kernel_initializer="ones")(inputs))
    models.compile_model(identity, loss="dice", threshold=0.7)
    result = identity.evaluate(pred, truth, verbose=0, return_dict=True)
    assert result["jacard_coef"] == pytest.approx(1 / 2)
    assert result["dice_coef"] == pytest.approx(2 / 3)
    assert result["pred_fg"] == pytest.approx(1 / 4)
    models.compile_model(identity, loss="dice")  # default 0.5
    assert identity.evaluate(pred, truth, verbose=0, return_dict=True)["jacard_coef"] == (
        pytest.approx(2 / 3))
    models.compile_model(identity, lr=0.0, loss="dice", threshold=0.7)
    identity.train_on_batch(pred, truth)  # builds the optimizer state a resume restores
    path = models.save_model(identity, tmp_path / f"m{ext}")
    loaded = models.load_model(path, compile=True)
    assert loaded.evaluate(pred, truth, verbose=0, return_dict=True)["jacard_coef"] == (
        pytest.approx(1 / 2))


def test_tensorflow_startup_noise_is_dropped_and_errors_kept():
    import os

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR\n"
            "I0000 00:00:1796525951.201091    8413 port.cc:153] oneDNN custom operations are on.\n"
            "W0000 00:00:1796525951.2 8413 cpu_feature_guard.cc:227] optimized\n"
            "To enable the following instructions: AVX2 FMA, in other operations, rebuild\n"
            "E0000 00:00:1796525947.936713    8263 some.cc:1] a real error\n"
            "a Python warning\n")
    assert models.filter_startup_noise(text) == (
        "E0000 00:00:1796525947.936713    8263 some.cc:1] a real error\na Python warning\n")
    # Set before TensorFlow loads (a user's own value wins): hides cuInit E0000 on CPUs.
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") is not None

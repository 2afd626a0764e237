"""Segmentation models, metrics and losses for the microbead pipeline.

Three encoder-decoder architectures for binary (bead / background) segmentation of
single-channel brightfield tiles, the Keras metrics and losses every script scores with, and
the save / load helpers that know the custom objects.

- ``build_unet``: classic U-Net (Ronneberger et al. 2015) with batch norm: per level two
  3x3 conv-BN-ReLU, 2x2 max pooling, nearest-neighbour upsampling + skip concatenation.
- ``build_attention_unet``: U-Net with an additive attention gate (Oktay et al. 2018) on every
  skip connection; the gating signal comes from the coarser level.
- ``build_attention_resunet``: Attention U-Net whose conv blocks are residual blocks with a
  1x1 convolution shortcut.

All three take ``(H, W, C)`` inputs (``H``/``W`` divisible by ``2**depth`` or ``None`` so one
model predicts on any tile size), end in a 1x1 convolution with a float32 sigmoid, and are
returned *uncompiled*. Only ``keras`` and ``keras.ops`` are used (never ``tf.*``) and only
stock Keras layers (no custom ``Layer`` or ``Lambda``), so the models run under the
TensorFlow, JAX and PyTorch backends and load from legacy HDF5 without custom layer code.

Metrics (``jacard_coef``, ``dice_coef``) call a pixel foreground when its probability is
``> threshold`` (default 0.5; the one rule of the project, as in ``microbead_metrics`` and the
predictor; :func:`compile_model` takes the run's threshold) and return one value per image;
losses return one value per image too. Keras averages per-sample values over every image of
an epoch, so the logged epoch value is the exact mean over images.

Inputs: none at import (nothing runs, no file I/O except in ``save_model`` / ``load_model``).
Outputs: ``keras.Model`` objects; ``.keras`` / ``.hdf5`` files through ``save_model``.

Example
-------
>>> import models
>>> model = models.build_model("attention_unet", (256, 256, 1), filters=16)
>>> models.compile_model(model, lr=1e-4, loss="bce_dice")  # doctest: +SKIP
>>> models.save_model(model, "runs/exp1/best_unet_model.hdf5")  # doctest: +SKIP
>>> model = models.load_model("runs/exp1/best_unet_model.hdf5")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager

# TensorFlow's C++ start-up log ("failed call to cuInit ... (303)" on every machine without
# a GPU, oneDNN and CPU-feature notes) alarms users and says nothing they can act on. The
# level must be in the environment before TensorFlow loads; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

#: Lines TensorFlow's native libraries print while loading, before any log level applies.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} \d\d:\d\d:\d\d"  # absl INFO / WARNING lines (E and F lines are kept)
    r"|To enable the following instructions:)")


def filter_startup_noise(text: str) -> str:
    """``text`` without TensorFlow's native start-up INFO/WARNING lines (errors are kept)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not _STARTUP_NOISE.match(line))


@contextmanager
def _native_stderr_filtered():
    """Capture file descriptor 2 while TensorFlow's libraries load, then replay every line
    that is not start-up noise: those lines are written by C++ static initialisers before
    ``TF_CPP_MIN_LOG_LEVEL`` is read, so no setting hides them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        tmp = tempfile.TemporaryFile(mode="w+b")
        os.dup2(tmp.fileno(), 2)
    except (OSError, AttributeError, ValueError):  # no real fd 2: nothing to filter
        yield
        return
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        kept = filter_startup_noise(tmp.read().decode("utf-8", "replace"))
        tmp.close()
        if kept:
            sys.stderr.write(kept)


with _native_stderr_filtered():
    import keras
from keras import layers, ops  # noqa: E402

__all__ = [
    "CUSTOM_OBJECTS",
    "device_line",
    "LOSSES",
    "MODELS",
    "BestModelCheckpoint",
    "attention_gate",
    "bce_dice_loss",
    "bce_loss",
    "build_attention_resunet",
    "build_attention_unet",
    "build_model",
    "build_unet",
    "compile_model",
    "conv_block",
    "dice_coef",
    "dice_loss",
    "focal_loss",
    "gating_signal",
    "get_loss",
    "jacard_coef",
    "pred_fg",
    "jaccard_loss",
    "load_model",
    "res_conv_block",
    "save_model",
    "soft_dice_coef",
    "soft_jaccard_coef",
    "threshold_metrics",
    "tversky_loss",
    "ThresholdedMetric",
]

logger = logging.getLogger(__name__)

_PACKAGE = "microbead"  # namespace of the registered serializable functions
MODEL_EXTENSIONS = (".keras", ".hdf5", ".h5")

# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _batch_norm(x, *, batch_norm: bool, bn_momentum: float, name: str):
    if not batch_norm:
        return x
    return layers.BatchNormalization(momentum=bn_momentum, name=name)(x)


def conv_block(x, filters: int, *, dropout: float = 0.0, batch_norm: bool = True,
               bn_momentum: float = 0.99, name: str = "block"):
    """Two 3x3 conv -> (BN) -> ReLU layers, then optional dropout.

    Parameters
    ----------
    x : KerasTensor
        Input feature map, shape ``(batch, H, W, C_in)``.
    filters : int
        Output channels of both convolutions.
    dropout : float
        Dropout rate applied after the second activation; ``0`` adds no layer.
    batch_norm : bool
        Insert ``BatchNormalization`` between each convolution and its ReLU.
    bn_momentum : float
        Momentum of the moving statistics of every batch-norm layer.
    name : str
        Prefix of the layer names (must be unique in the model).

    Returns
    -------
    KerasTensor
        Shape ``(batch, H, W, filters)``.
    """
    for i in (1, 2):
        # Conv bias is kept (although redundant before BN) so parameter counts match the
        # reference implementations users compare against.
        x = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal",
                          name=f"{name}_conv{i}")(x)
        x = _batch_norm(x, batch_norm=batch_norm, bn_momentum=bn_momentum, name=f"{name}_bn{i}")
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def res_conv_block(x, filters: int, *, dropout: float = 0.0, batch_norm: bool = True,
                   bn_momentum: float = 0.99, name: str = "block"):
    """Residual block: conv-(BN)-ReLU, conv-(BN), dropout, + 1x1-conv shortcut, ReLU.

    The 1x1 shortcut projects the input to ``filters`` channels so the addition is defined
    whatever the input width (Zhang et al. 2018, Deep Residual U-Net).

    Parameters
    ----------
    x : KerasTensor
        Input feature map, shape ``(batch, H, W, C_in)``.
    filters, dropout, batch_norm, bn_momentum, name
        As in :func:`conv_block`.

    Returns
    -------
    KerasTensor
        Shape ``(batch, H, W, filters)``.
    """
    y = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal",
                      name=f"{name}_conv1")(x)
    y = _batch_norm(y, batch_norm=batch_norm, bn_momentum=bn_momentum, name=f"{name}_bn1")
    y = layers.Activation("relu", name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal",
                      name=f"{name}_conv2")(y)
    y = _batch_norm(y, batch_norm=batch_norm, bn_momentum=bn_momentum, name=f"{name}_bn2")
    if dropout > 0:
        y = layers.Dropout(dropout, name=f"{name}_dropout")(y)
    shortcut = layers.Conv2D(filters, 1, padding="same", kernel_initializer="he_normal",
                             name=f"{name}_shortcut")(x)
    shortcut = _batch_norm(shortcut, batch_norm=batch_norm, bn_momentum=bn_momentum,
                           name=f"{name}_shortcut_bn")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_relu2")(y)


def gating_signal(x, filters: int, *, batch_norm: bool = True, bn_momentum: float = 0.99,
                  name: str = "gating"):
    """1x1 conv -> (BN) -> ReLU that turns a coarse feature map into an attention gating signal.

    Parameters
    ----------
    x : KerasTensor
        Coarser-level feature map, shape ``(batch, H/2, W/2, C)``.
    filters : int
        Output channels (the skip connection's width).
    batch_norm, bn_momentum, name
        As in :func:`conv_block`.

    Returns
    -------
    KerasTensor
        Shape ``(batch, H/2, W/2, filters)``.
    """
    x = layers.Conv2D(filters, 1, padding="same", kernel_initializer="he_normal",
                      name=f"{name}_conv")(x)
    x = _batch_norm(x, batch_norm=batch_norm, bn_momentum=bn_momentum, name=f"{name}_bn")
    return layers.Activation("relu", name=f"{name}_relu")(x)


def attention_gate(skip, gating, inter_filters: int, *, batch_norm: bool = True,
                   bn_momentum: float = 0.99, name: str = "att"):
    """Additive attention gate (Oktay et al. 2018) that reweights a skip connection.

    The skip is brought to the gating signal's (coarser) resolution by a 2x2 stride-2
    convolution, added to the projected gating signal, passed through ReLU -> 1x1 conv ->
    sigmoid, and the resulting one-channel attention map is upsampled by 2 (nearest) and
    multiplied (broadcast over channels) with the skip. Every resampling factor is the fixed
    2 of the pooling, so no layer depends on the spatial size and ``None`` dims work.

    Parameters
    ----------
    skip : KerasTensor
        Encoder feature map, shape ``(batch, H, W, C)``, ``H`` and ``W`` even.
    gating : KerasTensor
        Gating signal from the coarser level, shape ``(batch, H/2, W/2, C_g)``.
    inter_filters : int
        Channels of the intermediate (theta / phi) projections.
    batch_norm, bn_momentum, name
        As in :func:`conv_block`.

    Returns
    -------
    KerasTensor
        Gated skip, shape ``(batch, H, W, C)``.
    """
    channels = skip.shape[-1]
    theta_x = layers.Conv2D(inter_filters, 2, strides=2, padding="same",
                            kernel_initializer="he_normal", name=f"{name}_theta_x")(skip)
    phi_g = layers.Conv2D(inter_filters, 1, padding="same", kernel_initializer="he_normal",
                          name=f"{name}_phi_g")(gating)
    # The reference implementation follows phi_g with a stride-1 3x3 Conv2DTranspose; a 3x3
    # Conv2D is the same function class with the same parameter count.
    phi_g = layers.Conv2D(inter_filters, 3, padding="same", kernel_initializer="he_normal",
                          name=f"{name}_phi_g3")(phi_g)
    xg = layers.Add(name=f"{name}_add")([theta_x, phi_g])
    xg = layers.Activation("relu", name=f"{name}_relu")(xg)
    psi = layers.Conv2D(1, 1, padding="same", name=f"{name}_psi")(xg)
    psi = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi)
    # Nearest, as in the reference: Keras' bilinear UpSampling2D needs static spatial sizes
    # under TensorFlow and would break models built with None spatial dims.
    psi = layers.UpSampling2D(2, name=f"{name}_psi_up")(psi)
    y = layers.Multiply(name=f"{name}_multiply")([skip, psi])
    y = layers.Conv2D(channels, 1, padding="same", kernel_initializer="he_normal",
                      name=f"{name}_out")(y)
    return _batch_norm(y, batch_norm=batch_norm, bn_momentum=bn_momentum, name=f"{name}_bn")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _check_config(input_shape, filters, depth, dropout) -> tuple:
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    height, width, channels = input_shape
    if channels is None or int(channels) < 1:
        raise ValueError(f"input channels must be a positive integer, got {channels}")
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if int(filters) < 1:
        raise ValueError(f"filters must be >= 1, got {filters}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    factor = 2 ** int(depth)
    for label, size in (("height", height), ("width", width)):
        if size is not None and (int(size) < factor or int(size) % factor):
            raise ValueError(
                f"input {label} {size} must be a positive multiple of 2**depth = {factor} "
                f"(or None for any multiple)")
    return input_shape


def _build(kind: str, input_shape, *, filters: int, depth: int, dropout: float,
           batch_norm: bool, bn_momentum: float, name: str | None) -> keras.Model:
    input_shape = _check_config(input_shape, filters, depth, dropout)
    block = res_conv_block if kind == "attention_resunet" else conv_block
    attention = kind != "unet"
    opts = {"batch_norm": batch_norm, "bn_momentum": bn_momentum}
    widths = [int(filters) * 2 ** level for level in range(int(depth) + 1)]

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level, width in enumerate(widths[:-1]):
        x = block(x, width, dropout=dropout, name=f"enc{level + 1}", **opts)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = block(x, widths[-1], dropout=dropout, name="bottleneck", **opts)

    for level in reversed(range(int(depth))):
        width, skip, tag = widths[level], skips[level], f"dec{level + 1}"
        if attention:
            gate = gating_signal(x, width, name=f"{tag}_gating", **opts)
            skip = attention_gate(skip, gate, width, name=f"{tag}_att", **opts)
        x = layers.UpSampling2D(2, name=f"{tag}_up")(x)
        x = layers.Concatenate(axis=-1, name=f"{tag}_concat")([x, skip])
        x = block(x, width, dropout=dropout, name=tag, **opts)

    # float32 output keeps the sigmoid and the losses numerically safe under mixed precision.
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name=name or kind)


def build_unet(input_shape: Sequence[int | None] = (256, 256, 1), *, filters: int = 64,
               depth: int = 4, dropout: float = 0.3, batch_norm: bool = True,
               bn_momentum: float = 0.99, name: str | None = None) -> keras.Model:
    """Build an uncompiled U-Net for binary segmentation.

    Parameters
    ----------
    input_shape : tuple of (int or None)
        ``(H, W, C)``. ``H`` and ``W`` must be multiples of ``2**depth`` or ``None``
        (predict on any such size with the same weights).
    filters : int
        Channels of the first level; level ``i`` has ``filters * 2**i`` (64 ... 1024 for the
        defaults).
    depth : int
        Number of 2x2 poolings.
    dropout : float
        Dropout rate at the end of every conv block, in ``[0, 1)``; 0 disables it.
    batch_norm : bool
        Batch normalization after every convolution.
    bn_momentum : float
        Momentum of the batch-norm moving statistics (lower it for short trainings: with 0.99
        the statistics need hundreds of steps to become usable at inference).
    name : str, optional
        Model name (default ``"unet"``).

    Returns
    -------
    keras.Model
        Input ``(batch, H, W, C)`` float, output ``(batch, H, W, 1)`` float32 probabilities
        in ``[0, 1]``. 31.4 M parameters at the defaults with ``C = 1``.

    Raises
    ------
    ValueError
        If a size is not a multiple of ``2**depth`` or a setting is out of range.
    """
    return _build("unet", input_shape, filters=filters, depth=depth, dropout=dropout,
                  batch_norm=batch_norm, bn_momentum=bn_momentum, name=name)


def build_attention_unet(input_shape: Sequence[int | None] = (256, 256, 1), *,
                         filters: int = 64, depth: int = 4, dropout: float = 0.3,
                         batch_norm: bool = True, bn_momentum: float = 0.99,
                         name: str | None = None) -> keras.Model:
    """Build an uncompiled Attention U-Net (U-Net + attention gate on every skip).

    Parameters and return value as in :func:`build_unet` (default name
    ``"attention_unet"``); the gate is described in :func:`attention_gate`.
    37.3 M parameters at the defaults with ``C = 1``.
    """
    return _build("attention_unet", input_shape, filters=filters, depth=depth,
                  dropout=dropout, batch_norm=batch_norm, bn_momentum=bn_momentum, name=name)


def build_attention_resunet(input_shape: Sequence[int | None] = (256, 256, 1), *,
                            filters: int = 64, depth: int = 4, dropout: float = 0.3,
                            batch_norm: bool = True, bn_momentum: float = 0.99,
                            name: str | None = None) -> keras.Model:
    """Build an uncompiled Attention Residual U-Net (residual blocks + attention gates).

    Parameters and return value as in :func:`build_unet` (default name
    ``"attention_resunet"``); blocks are :func:`res_conv_block`.
    39.1 M parameters at the defaults with ``C = 1``.
    """
    return _build("attention_resunet", input_shape, filters=filters, depth=depth,
                  dropout=dropout, batch_norm=batch_norm, bn_momentum=bn_momentum, name=name)


MODELS: dict[str, Callable[..., keras.Model]] = {
    "unet": build_unet,
    "attention_unet": build_attention_unet,
    "attention_resunet": build_attention_resunet,
}


def build_model(name: str, /, input_shape: Sequence[int | None] = (256, 256, 1),
                **kwargs) -> keras.Model:
    """Build a registered architecture by name.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`: ``"unet"``, ``"attention_unet"``, ``"attention_resunet"``.
        Positional-only, so ``name=`` in ``kwargs`` still sets the model's name.
    input_shape : tuple of (int or None)
        ``(H, W, C)``, see :func:`build_unet`.
    **kwargs
        Keyword arguments of the builder (``filters``, ``depth``, ``dropout``, ...).

    Returns
    -------
    keras.Model
        Uncompiled model.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the valid names).
    """
    try:
        builder = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}") from None
    return builder(input_shape, **kwargs)


# --------------------------------------------------------------------------------------------
# Metrics and losses (Keras tensors, any backend)
# --------------------------------------------------------------------------------------------


def _per_image(x):
    """Cast to float32 and flatten to ``(batch, n_pixels)`` so ranks (B,H,W) / (B,H,W,1) mix."""
    x = ops.cast(ops.convert_to_tensor(x), "float32")
    return ops.reshape(x, (ops.shape(x)[0], -1))


#: Truth masks are {0, 1}: 0.5 separates them whatever the prediction threshold is.
_TRUTH_THRESHOLD = 0.5


def _binary(x, threshold=0.5):
    # Foreground is strictly above the threshold, as in keras.metrics.BinaryIoU, StarDist's
    # ``prob > prob_thresh`` and microbead_metrics.as_binary: a probability of exactly 0.5
    # (logit 0, the network undecided) is background at the default threshold.
    return ops.cast(ops.greater(_per_image(x), threshold), "float32")


def _ratio_or_one(numerator, denominator):
    # Exact ratio where the denominator is positive, 1 where both masks are empty; maximum()
    # keeps the untaken branch finite so no NaN can leak through where().
    safe = ops.maximum(denominator, 1.0)
    return ops.where(ops.greater(denominator, 0.0), numerator / safe, ops.ones_like(numerator))


@keras.saving.register_keras_serializable(package=_PACKAGE)
def jacard_coef(y_true, y_pred, threshold=0.5):
    """Per-image Jaccard index (IoU) of masks thresholded at ``threshold``.

    ``|T & P| / |T | P|`` over all non-batch axes of each image, with no smoothing term, so
    a sparse image scores what it really scores. An image where truth and prediction are both
    empty scores 1; empty truth with a non-empty prediction (or the reverse) scores 0.
    The spelling is the one the original scripts used (history key ``val_jacard_coef``).

    Parameters
    ----------
    y_true, y_pred : tensor
        Shape ``(batch, H, W)`` or ``(batch, H, W, 1)`` (ranks may differ), any real dtype;
        truth values ``> 0.5`` and predicted values ``> threshold`` are foreground. The first
        axis is always the batch.
    threshold : float
        Probability threshold of the prediction (the run's ``--threshold``; see
        :func:`compile_model`).

    Returns
    -------
    tensor
        float32, shape ``(batch,)``, values in ``[0, 1]``. ``keras.ops.mean(jacard_coef(t, p))``
        is the batch value; as a compiled metric Keras averages the per-image values over all
        images of the epoch (exact mean over images, not a mean of batch means).
    """
    t, p = _binary(y_true, _TRUTH_THRESHOLD), _binary(y_pred, threshold)
    intersection = ops.sum(t * p, axis=1)
    union = ops.sum(t, axis=1) + ops.sum(p, axis=1) - intersection
    return _ratio_or_one(intersection, union)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def dice_coef(y_true, y_pred, threshold=0.5):
    """Per-image Dice coefficient (F1) of masks thresholded at ``threshold``.

    ``2 |T & P| / (|T| + |P|)``; both empty -> 1, exactly one empty -> 0, no smoothing.
    Shapes, dtypes and averaging as in :func:`jacard_coef`.

    Returns
    -------
    tensor
        float32, shape ``(batch,)``, values in ``[0, 1]``.
    """
    t, p = _binary(y_true, _TRUTH_THRESHOLD), _binary(y_pred, threshold)
    intersection = ops.sum(t * p, axis=1)
    total = ops.sum(t, axis=1) + ops.sum(p, axis=1)
    return _ratio_or_one(2.0 * intersection, total)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def pred_fg(y_true, y_pred, threshold=0.5):
    """Per-image fraction of pixels predicted as bead (``y_pred > threshold``), ``(batch,)``.

    Logged as ``val_pred_fg``: the trainer's collapse detector compares it with the true
    foreground fraction, at no extra forward pass. ``y_true`` is unused.
    """
    del y_true
    return ops.mean(_binary(y_pred, threshold), axis=1)


_THRESHOLDED = {"jacard_coef": jacard_coef, "dice_coef": dice_coef, "pred_fg": pred_fg}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ThresholdedMetric(keras.metrics.Mean):
    """Epoch mean of :func:`jacard_coef`, :func:`dice_coef` or :func:`pred_fg` at a threshold.

    The metric is named after the function, so the history keys stay ``jacard_coef`` /
    ``val_jacard_coef`` whatever the threshold; the threshold is part of the saved config,
    so a compiled model reloaded for resuming scores exactly as before.

    Parameters
    ----------
    metric : {"jacard_coef", "dice_coef", "pred_fg"}
    threshold : float
        Probability above which a predicted pixel is foreground.
    """

    def __init__(self, metric: str = "jacard_coef", threshold: float = 0.5, name=None,
                 dtype=None):
        if metric not in _THRESHOLDED:
            raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(_THRESHOLDED)}")
        super().__init__(name=name or metric, dtype=dtype)
        self.metric = metric
        self.threshold = float(threshold)

    def update_state(self, y_true, y_pred, sample_weight=None):
        values = _THRESHOLDED[self.metric](y_true, y_pred, threshold=self.threshold)
        return super().update_state(values, sample_weight=sample_weight)

    def get_config(self):
        return {**super().get_config(), "metric": self.metric, "threshold": self.threshold}


def threshold_metrics(threshold: float = 0.5) -> list:
    """``[jacard_coef, dice_coef, pred_fg]`` as :class:`ThresholdedMetric` at ``threshold``."""
    return [ThresholdedMetric(name, threshold) for name in _THRESHOLDED]


# The losses use soft (unthresholded) overlaps with smooth = 1, i.e. one pixel. In a loss it
# keeps an empty-truth image defined (soft Dice = 1 / (sum(p) + 1)) with a gradient that
# pushes the prediction to zero; one pixel is negligible against the hundreds of foreground
# pixels of a bead tile. It is kept out of the metrics, where it would inflate sparse images.


@keras.saving.register_keras_serializable(package=_PACKAGE)
def soft_dice_coef(y_true, y_pred, smooth=1.0):
    """Differentiable per-image Dice ``(2 sum(t p) + s) / (sum(t) + sum(p) + s)``.

    Parameters
    ----------
    y_true : tensor
        Ground truth in ``[0, 1]``, shape ``(batch, ...)``.
    y_pred : tensor
        Probabilities in ``[0, 1]``, same number of elements per image.
    smooth : float
        Additive smoothing (pixels); for losses only.

    Returns
    -------
    tensor
        float32, shape ``(batch,)``, in ``(0, 1]``; 1 when both are all-zero.
    """
    t, p = _per_image(y_true), _per_image(y_pred)
    intersection = ops.sum(t * p, axis=1)
    return (2.0 * intersection + smooth) / (ops.sum(t, axis=1) + ops.sum(p, axis=1) + smooth)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def soft_jaccard_coef(y_true, y_pred, smooth=1.0):
    """Differentiable per-image Jaccard ``(sum(t p) + s) / (sum(t) + sum(p) - sum(t p) + s)``.

    Shapes and ``smooth`` as in :func:`soft_dice_coef`. Returns float32 ``(batch,)``.
    """
    t, p = _per_image(y_true), _per_image(y_pred)
    intersection = ops.sum(t * p, axis=1)
    union = ops.sum(t, axis=1) + ops.sum(p, axis=1) - intersection
    return (intersection + smooth) / (union + smooth)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def dice_loss(y_true, y_pred):
    """Per-image soft Dice loss ``1 - soft_dice_coef``; float32 ``(batch,)`` in ``[0, 1)``."""
    return 1.0 - soft_dice_coef(y_true, y_pred)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def jaccard_loss(y_true, y_pred):
    """Per-image soft Jaccard loss ``1 - soft_jaccard_coef``; float32 ``(batch,)``."""
    return 1.0 - soft_jaccard_coef(y_true, y_pred)


def _clipped(y_pred):
    eps = keras.config.epsilon()
    return ops.clip(_per_image(y_pred), eps, 1.0 - eps)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def bce_loss(y_true, y_pred):
    """Per-image mean binary cross-entropy on probabilities.

    Predictions are clipped to ``[eps, 1 - eps]`` (``keras.config.epsilon()``) so saturated
    outputs give finite values and gradients. Returns float32 ``(batch,)``, ``>= 0``.
    """
    t, p = _per_image(y_true), _clipped(y_pred)
    bce = -(t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p))
    return ops.mean(bce, axis=1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def bce_dice_loss(y_true, y_pred):
    """Per-image ``bce_loss + dice_loss``: BCE for pixel calibration, Dice for overlap."""
    return bce_loss(y_true, y_pred) + dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def focal_loss(y_true, y_pred, gamma=2.0, alpha=0.25):
    """Per-image mean binary focal loss (Lin et al. 2017).

    ``-alpha_t (1 - p_t)**gamma log(p_t)`` with ``p_t`` the probability of the true class and
    ``alpha_t = alpha`` on foreground, ``1 - alpha`` on background; down-weights the many easy
    background pixels. Predictions are clipped as in :func:`bce_loss`.

    Returns
    -------
    tensor
        float32, shape ``(batch,)``, ``>= 0``.
    """
    t, p = _per_image(y_true), _clipped(y_pred)
    p_t = t * p + (1.0 - t) * (1.0 - p)
    alpha_t = t * alpha + (1.0 - t) * (1.0 - alpha)
    return ops.mean(-alpha_t * ops.power(1.0 - p_t, gamma) * ops.log(p_t), axis=1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def tversky_loss(y_true, y_pred, alpha=0.7, beta=0.3, smooth=1.0):
    """Per-image Tversky loss ``1 - (TP + s) / (TP + alpha FN + beta FP + s)``.

    ``alpha > beta`` penalises missed foreground more than false alarms (favours recall);
    ``alpha = beta = 0.5`` is the soft Dice loss. Soft counts, ``smooth`` as in
    :func:`soft_dice_coef`. Returns float32 ``(batch,)`` in ``[0, 1)``.
    """
    t, p = _per_image(y_true), _per_image(y_pred)
    tp = ops.sum(t * p, axis=1)
    fn = ops.sum(t * (1.0 - p), axis=1)
    fp = ops.sum((1.0 - t) * p, axis=1)
    return 1.0 - (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)


LOSSES: dict[str, Callable] = {
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "bce": bce_loss,
    "focal": focal_loss,
    "tversky": tversky_loss,
    "jaccard": jaccard_loss,
}


def get_loss(name: str | Callable) -> Callable:
    """Return the per-image loss function registered under ``name``.

    Parameters
    ----------
    name : str or callable
        ``"dice"``, ``"bce_dice"``, ``"bce"``, ``"focal"``, ``"tversky"`` or ``"jaccard"``
        (case-insensitive; hyphens and a ``_loss`` suffix are accepted, e.g.
        ``"bce-dice"``, ``"dice_loss"``). A callable is returned unchanged.

    Returns
    -------
    callable
        ``loss(y_true, y_pred) -> (batch,)`` float32 tensor.

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the valid names).
    """
    if callable(name):
        return name
    key = str(name).strip().lower().replace("-", "_")
    key = key[: -len("_loss")] if key.endswith("_loss") else key
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[key]


CUSTOM_OBJECTS: dict[str, Callable] = {
    fn.__name__: fn
    for fn in (jacard_coef, dice_coef, pred_fg, soft_dice_coef, soft_jaccard_coef,
               *LOSSES.values())
}
CUSTOM_OBJECTS["ThresholdedMetric"] = ThresholdedMetric


def compile_model(model: keras.Model, *, lr: float = 1e-4, loss: str | Callable = "dice",
                  threshold: float = 0.5, **compile_kwargs) -> keras.Model:
    """Compile with Adam, a loss from :func:`get_loss`, metrics ``jacard_coef, dice_coef, pred_fg``.

    Parameters
    ----------
    model : keras.Model
        Model to compile (in place).
    lr : float
        Adam learning rate.
    loss : str or callable
        Loss name for :func:`get_loss`, or a ``loss(y_true, y_pred)`` callable.
    threshold : float
        Probability threshold of the metrics (:func:`threshold_metrics`): the run's
        ``--threshold``, so early stopping, the learning-rate plateau and the best-model
        checkpoint, which all monitor ``val_jacard_coef``, score the masks prediction will
        write.
    **compile_kwargs
        Passed to ``model.compile`` (e.g. ``jit_compile``).

    Returns
    -------
    keras.Model
        The same model, compiled; history keys ``loss``, ``jacard_coef``, ``dice_coef``,
        ``pred_fg`` (and their ``val_`` versions).
    """
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=get_loss(loss),
                  metrics=threshold_metrics(threshold), **compile_kwargs)
    return model


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def _model_extension(path: str) -> str:
    # Case-sensitive, like Keras' own checks: "model.HDF5" would save but not load.
    ext = os.path.splitext(path)[1]
    if ext not in MODEL_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported model file extension {ext!r}; use one of "
            f"{', '.join(MODEL_EXTENSIONS)}")
    return ext


def _check_model_container(path: str, ext: str) -> None:
    """Raise ValueError naming ``path`` when it is not the container its extension says.

    Keras reports a truncated or foreign ``.keras`` file as "File not found" and a broken
    HDF5 file with an h5py traceback; this names the file and what is wrong with it.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: corrupt model file: empty (0 bytes)")
    if ext == ".keras":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: corrupt model file: not a .keras (zip) archive "
                             f"({size} bytes; truncated copy or another format?)")
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt model file: {exc}") from None
        if bad is not None or "config.json" not in names:
            what = f"damaged member {bad}" if bad else "no config.json inside"
            raise ValueError(f"{path}: corrupt model file: .keras archive with {what}")
        return
    import h5py

    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: corrupt model file: not an HDF5 file ({size} bytes; "
                         "truncated copy or another format?)")


class _DropHdf5Deprecation(logging.Filter):
    # HDF5 is saved on purpose (users' best_unet_model.hdf5); Keras' "legacy format" warning
    # would otherwise be logged at every checkpoint.
    def filter(self, record):
        return "saving your model as an HDF5 file" not in record.getMessage()


def save_model(model: keras.Model, path: str | os.PathLike) -> str:
    """Save ``model`` atomically, in the format given by the extension.

    ``.keras`` is the native Keras 3 archive; ``.hdf5`` / ``.h5`` is the legacy HDF5 format
    (the seed's ``best_unet_model.hdf5``). The model is written to a temporary file in the
    destination folder and moved into place with ``os.replace``, so a job killed mid-save
    leaves the previous file intact, never a truncated one. ``.hdf5`` is written through a
    temporary ``.h5`` name because some Keras 3 code paths accept only ``.h5``.

    Parameters
    ----------
    model : keras.Model
        Model to save (compiled or not; the optimizer state is included when compiled).
    path : str or os.PathLike
        Destination ending in ``.keras``, ``.hdf5`` or ``.h5``. Missing parent folders are
        created; an existing file is replaced.

    Returns
    -------
    str
        The destination path.

    Raises
    ------
    ValueError
        If the extension is not supported.
    """
    path = os.fspath(path)
    ext = _model_extension(path)
    suffix = ".keras" if ext == ".keras" else ".h5"
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A unique name created by the saver itself (not mkstemp, whose 0600 mode would survive
    # the rename and hide the model from the rest of a cluster group).
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{uuid.uuid4().hex[:8]}.tmp{suffix}")
    quiet = _DropHdf5Deprecation()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    # Keras' legacy HDF5 writer (<= 3.15, fixed by keras-team/keras#23475) pops "optimizer"
    # from the live compile config: every later .keras save of the same model would then
    # restore with a default RMSprop. Snapshot and restore it.
    compile_config = getattr(model, "_compile_config", None)
    saved_compile = dict(compile_config.config) if compile_config is not None else None
    try:
        keras.saving.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if saved_compile is not None:
            compile_config.config = saved_compile
        absl_logger.removeFilter(quiet)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_model(path: str | os.PathLike, compile: bool = False) -> keras.Model:
    """Load a model saved as ``.keras``, ``.hdf5`` or ``.h5`` with this module's custom objects.

    Keras layer configs are not forward compatible: a file written by a newer Keras (e.g.
    3.15, here) can fail to deserialize in an older one (e.g. 3.0.5 in the TF 2.16
    container) because of config keys the older version does not know. When that happens
    and the file holds one of this module's architectures, the model is rebuilt with
    :func:`build_model` from the settings read off the stored config and the weights are
    loaded with ``model.load_weights``, which works across Keras 3 versions (a warning is
    logged; the training configuration is then not restored).

    Parameters
    ----------
    path : str or os.PathLike
        Model file written by :func:`save_model`, ``model.save`` or the old scripts.
    compile : bool
        Restore the training configuration (loss, metrics, optimizer). Off by default: for
        prediction it is not needed, and it keeps loading independent of training code.

    Returns
    -------
    keras.Model

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message names it).
    ValueError
        If the extension is not supported, or the file cannot be loaded (message names it).
    """
    path = os.fspath(path)
    ext = _model_extension(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: model file not found")
    _check_model_container(path, ext)
    try:
        return keras.saving.load_model(path, custom_objects=CUSTOM_OBJECTS, compile=compile)
    except Exception as err:
        # Deserialization errors come as TypeError, ValueError, KeyError... depending on the
        # Keras version; whatever it was, try the rebuild and report the original error.
        try:
            model = _rebuild_from_saved_config(path)
        except Exception:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: cannot load model with Keras {keras.__version__}: "
                             f"{first_line}") from err
        logger.warning("%s: Keras %s could not deserialize the stored config (%s; saved by "
                       "another Keras version?); rebuilt %r from it and loaded the weights",
                       path, keras.__version__, type(err).__name__, model.name)
        logger.debug("%s: original load error: %s", path, err)
        return model


def _read_saved_config(path: str) -> dict:
    """The model config stored in a ``.keras`` archive or a legacy HDF5 file."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    else:
        import h5py

        with h5py.File(path, "r") as fh:
            raw = fh.attrs["model_config"]
        config = json.loads(raw.decode("utf-8") if hasattr(raw, "decode") else raw)
    return config["config"]


def _rebuild_from_saved_config(path: str) -> keras.Model:
    """Rebuild one of this module's architectures from a stored config and load its weights.

    The builder settings are read off the layers this module names (``enc1_conv1``,
    ``*_att_psi``, ``enc1_shortcut`` ...); anything else raises.
    """
    config = _read_saved_config(path)
    by_name = {layer["config"]["name"]: layer for layer in config["layers"]}
    classes = [layer["class_name"] for layer in config["layers"]]
    inputs = [layer for layer in config["layers"] if layer["class_name"] == "InputLayer"]
    if len(inputs) != 1 or "enc1_conv1" not in by_name or "output" not in by_name:
        raise ValueError("not a model built by models.py")
    input_cfg = inputs[0]["config"]
    batch_shape = input_cfg.get("batch_shape") or input_cfg.get("batch_input_shape")
    if "enc1_shortcut" in by_name:
        arch = "attention_resunet"
    elif any(name.endswith("_att_psi") for name in by_name):
        arch = "attention_unet"
    else:
        arch = "unet"
    bn = [layer["config"] for layer in config["layers"]
          if layer["class_name"] == "BatchNormalization"]
    dropout = [layer["config"]["rate"] for layer in config["layers"]
               if layer["class_name"] == "Dropout"]
    model = build_model(arch, tuple(batch_shape[1:]),
                        filters=int(by_name["enc1_conv1"]["config"]["filters"]),
                        depth=classes.count("MaxPooling2D"),
                        dropout=float(dropout[0]) if dropout else 0.0,
                        batch_norm=bool(bn),
                        bn_momentum=float(bn[0]["momentum"]) if bn else 0.99,
                        name=config.get("name"))
    model.load_weights(path)
    return model


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the model whenever a monitored value improves, to ``.keras`` and/or ``.hdf5``.

    Replaces ``keras.callbacks.ModelCheckpoint``, which in Keras 3 rejects ``.hdf5`` paths;
    every save goes through :func:`save_model`, hence is atomic.

    Parameters
    ----------
    paths : str, os.PathLike or sequence of them
        Destinations, e.g. ``["best_unet_model.hdf5", "best_unet_model.keras"]``.
    monitor : str
        Key of the epoch logs, e.g. ``"val_jacard_coef"`` or ``"val_loss"``.
    mode : {"max", "min"}
        Whether larger or smaller values are better.

    Attributes
    ----------
    best : float
        Best monitored value so far (``-inf`` / ``inf`` before the first save).
    best_epoch : int or None
        0-based epoch of the last save.
    """

    def __init__(self, paths, monitor: str = "val_jacard_coef", mode: str = "max"):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        for p in self.paths:
            _model_extension(p)
        self.monitor = monitor
        self.mode = mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = None
        self._warned = False

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            if not self._warned:
                logger.warning("BestModelCheckpoint: %r not in the epoch logs (%s); not saving",
                               self.monitor, ", ".join(sorted(logs or {})))
                self._warned = True
            return
        value = float(value)
        improved = value > self.best if self.mode == "max" else value < self.best
        if not improved:
            return
        self.best, self.best_epoch = value, epoch
        for p in self.paths:
            save_model(self.model, p)
        logger.info("epoch %d: %s improved to %.5f, saved %s", epoch + 1, self.monitor, value,
                    ", ".join(self.paths))

def device_line() -> str:
    """One plain line for the log: ``"running on CPU (N cores)"`` or ``"running on GPU:
    NAME"`` (several GPUs: their names, comma-separated), for the active Keras backend."""
    names = []
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            for g in tf.config.list_physical_devices("GPU"):
                details = tf.config.experimental.get_device_details(g)
                names.append(details.get("device_name") or g.name)
        elif backend == "jax":
            import jax

            names = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
        elif backend == "torch":
            import torch

            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except (ImportError, RuntimeError, ValueError):
        names = []
    if names:
        return "running on GPU: " + ", ".join(names)
    return f"running on CPU ({os.cpu_count() or 1} cores)"

"""Keras layers that do ``microbead_io``'s normalisation inside a model, for export.

A bioimage.io package is opened by tools (deepImageJ in Fiji, QuPath, bioimageio.core) that
feed the network the raw frame: they cannot run this pipeline's Python preprocessing, and
bioimage.io spec 0.5 has no operation for a flat-field division. :func:`with_preprocessing`
puts that preprocessing in front of a trained network, so the exported model takes the raw
8- or 16-bit frame (at the training pixel scale) and returns the same probability
``predict_microscope.py`` computes.

The head reproduces :func:`microbead_io.flatfield_normalize` (and the BT.601 luminance of
:func:`microbead_io.to_channels`), border handling included:

* grey closing = max filter then min filter over ``window x window``. OpenCV's
  ``BORDER_REPLICATE`` repeats edge pixels, which never changes a max or a min over a
  rectangle that already holds the edge pixel, so it equals a ``"same"`` max-pool (which
  ignores outside pixels). Rectangles are separable: a ``(w, 1)`` pool then a ``(1, w)``
  pool, ``2 w`` comparisons per pixel instead of ``w ** 2``. Min = ``-max(-x)``.
* Gaussian (sigma = window / 4; OpenCV's kernel size and weights for float images) as two
  1-D depthwise convolutions over a ``BORDER_REFLECT`` (= NumPy ``"symmetric"``) padding,
  built by gathering the mirrored rows and columns.
* ratio ``x / background`` (the background floored at 1e-6), then the stored affine map
  to ``[0, 1]`` and clipping.

The head is made only of layers any Keras 3 rebuilds from the saved file without this
module (``MaxPooling2D``, ``Rescaling``, ``DepthwiseConv2D``, ``Conv2D``, ``Concatenate``,
``Multiply``, ``ReLU``) plus ``Lambda`` layers holding a Keras operation object
(``keras.src.ops.numpy.Take`` / ``Reciprocal``), which Keras serialises by class and reloads
in safe mode: bioimageio.core's plain ``load_model_from_hdf5`` needs no custom objects.
Everything is ``keras.ops``, so TensorFlow SavedModel and ONNX export see ordinary ops
(MaxPool, DepthwiseConv2d, Gather, Reciprocal).

Per-image percentile normalisation (older runs) is not put in the graph: a client that
tiles a large frame would compute it per tile. Packages of such runs keep the spec's
``scale_range`` operation, which clients apply to the whole sample.

Example
-------
>>> packaged = with_preprocessing(network, input_channels=3, channels=1,
...                               normalization=cfg["preprocessing"]["normalization"])
...                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers
from keras.src.ops import numpy as knp

#: ITU-R BT.601 luminance weights (as ``microbead_io.to_channels``).
LUMINANCE = (0.299, 0.587, 0.114)
#: Methods the head reproduces in the graph.
IN_GRAPH_METHODS = ("flatfield", "none")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """1-D Gaussian OpenCV's ``GaussianBlur(..., (0, 0), sigma)`` uses on float32 images.

    Size ``round(8 sigma + 1) | 1`` (4 sigma each side), weights ``exp(-d^2 / (2 sigma^2))``
    normalised to sum 1. float32 ``(K,)``.
    """
    size = int(np.rint(8.0 * float(sigma) + 1.0)) | 1
    d = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(d ** 2) / (2.0 * float(sigma) ** 2))
    return (k / k.sum()).astype(np.float32)


def flatfield_geometry(window: int) -> dict:
    """Sizes of the flat-field head for a stored ``window`` (as ``background_estimate``).

    Returns ``window`` (odd, >= 3), ``sigma`` (window / 4), ``radius`` (Gaussian half-width
    in px) and ``reach``: how far (px) an output pixel's value depends on input pixels, the
    closing's ``window - 1`` plus the Gaussian radius. A consumer that tiles must drop that
    much of each tile's normalised input (the package adds it to the output halo).
    """
    w = max(3, int(window) | 1)
    sigma = w / 4.0
    radius = gaussian_kernel(sigma).size // 2
    return {"window": w, "sigma": sigma, "radius": radius, "reach": (w - 1) + radius}


def _frozen(layer):
    layer.trainable = False
    return layer


def _reflect_pad(x, pad: int, axis: int, name: str):
    """``BORDER_REFLECT`` padding of ``pad`` px along ``axis`` (1 = y, 2 = x).

    The mirrored bands are gathered by index (``Take``), so the height/width stay dynamic;
    the axis must be at least ``pad`` px long.
    """
    first = layers.Lambda(knp.Take(axis=axis), arguments={"indices": list(range(pad - 1, -1, -1))},
                          name=f"{name}_mirror_start")(x)
    last = layers.Lambda(knp.Take(axis=axis), arguments={"indices": [-1 - i for i in range(pad)]},
                         name=f"{name}_mirror_end")(x)
    return layers.Concatenate(axis=axis, name=f"{name}_reflect")([first, x, last])


def _affine(x, scale: float, offset: float, channels: int, name: str):
    """``x * scale + offset`` as a frozen 1x1 depthwise convolution with bias.

    (``Rescaling(offset=...)`` adds a rank-0 constant, which tf2onnx's transpose optimiser
    cannot move through the NCHW/NHWC transposes it inserts: it logs a failure and leaves
    them in.)
    """
    layer = _frozen(layers.DepthwiseConv2D(1, use_bias=True, name=name))
    y = layer(x)
    layer.set_weights([np.full((1, 1, channels, 1), scale, np.float32),
                       np.full((channels,), offset, np.float32)])
    return y


def _max_filter(x, w: int, name: str):
    x = _frozen(layers.MaxPooling2D((w, 1), strides=1, padding="same", name=f"{name}_y"))(x)
    return _frozen(layers.MaxPooling2D((1, w), strides=1, padding="same", name=f"{name}_x"))(x)


def _gaussian(x, sigma: float, channels: int, name: str):
    k = gaussian_kernel(sigma)
    r = k.size // 2
    out = _reflect_pad(x, r, 1, f"{name}_y")
    conv_y = _frozen(layers.DepthwiseConv2D((k.size, 1), padding="valid", use_bias=False,
                                            name=f"{name}_y"))
    out = conv_y(out)
    conv_y.set_weights([np.tile(k.reshape(-1, 1, 1, 1), (1, 1, channels, 1))])
    out = _reflect_pad(out, r, 2, f"{name}_x")
    conv_x = _frozen(layers.DepthwiseConv2D((1, k.size), padding="valid", use_bias=False,
                                            name=f"{name}_x"))
    out = conv_x(out)
    conv_x.set_weights([np.tile(k.reshape(1, -1, 1, 1), (1, 1, channels, 1))])
    return out


def flatfield_layers(x, *, window: int, low: float, high: float, channels: int):
    """Symbolic :func:`microbead_io.flatfield_normalize` of ``x`` ``(B, H, W, channels)``.

    Same value ranges and semantics: raw intensities in, ``[0, 1]`` out. H and W must be at
    least the Gaussian radius (:func:`flatfield_geometry`).
    """
    if not high > low:
        raise ValueError(f"flatfield normalization needs high > low, got {low}, {high}")
    geo = flatfield_geometry(window)
    w = geo["window"]
    dilated = _max_filter(x, w, "ff_dilate")
    neg = _frozen(layers.Rescaling(-1.0, name="ff_negate"))(dilated)
    closed = _frozen(layers.Rescaling(-1.0, name="ff_closed"))(_max_filter(neg, w, "ff_erode"))
    background = _gaussian(closed, geo["sigma"], channels, "ff_blur")
    # max(bg, 1e-6) with built-in layers: relu(bg - eps) + eps. Where the background is
    # <= 1e-6 the frame is black around the pixel, so x = 0 and the ratio is 0 as in NumPy.
    eps = 1e-6
    safe = _affine(background, 1.0, -eps, channels, "ff_bg_shift")
    safe = _frozen(layers.ReLU(name="ff_bg_relu"))(safe)
    safe = _affine(safe, 1.0, eps, channels, "ff_bg_floor")
    inv = layers.Lambda(knp.Reciprocal(), name="ff_bg_reciprocal")(safe)
    ratio = layers.Multiply(name="ff_ratio")([x, inv])
    span = float(high) - float(low)
    scaled = _affine(ratio, 1.0 / span, -float(low) / span, channels, "ff_levels")
    return _frozen(layers.ReLU(max_value=1.0, name="ff_clip"))(scaled)


def luminance_layer(x):
    """``(B, H, W, 3)`` RGB -> ``(B, H, W, 1)`` BT.601 luminance (a fixed 1x1 convolution)."""
    conv = _frozen(layers.Conv2D(1, 1, use_bias=False, name="luminance"))
    y = conv(x)
    conv.set_weights([np.asarray(LUMINANCE, np.float32).reshape(1, 1, 3, 1)])
    return y


def with_preprocessing(network: keras.Model, *, input_channels: int, channels: int,
                       normalization: dict, name: str = "microbead_raw_input") -> keras.Model:
    """``raw frame -> probability``: the preprocessing head, then ``network``.

    Parameters
    ----------
    network : keras.Model taking ``(B, h, w, channels)`` normalised input
    input_channels : 3 for RGB frames (luminance computed in the graph when
        ``channels == 1``), else ``channels``
    channels : the channel count the network was trained with (1 or 3)
    normalization : the run's stored dict; ``flatfield`` or ``none`` (see
        :data:`IN_GRAPH_METHODS`)

    Returns
    -------
    keras.Model with input ``(None, None, None, input_channels)`` float32 in the frame's
    stored value range and the network's output.

    Raises
    ------
    ValueError
        For a method the head cannot reproduce, or channel counts that do not fit.
    """
    method = normalization.get("method", "percentile")
    if method not in IN_GRAPH_METHODS:
        raise ValueError(f"normalization {method!r} is not reproduced in the graph "
                         f"(only {', '.join(IN_GRAPH_METHODS)})")
    if channels not in (1, 3) or input_channels not in (channels, 3):
        raise ValueError(f"input_channels={input_channels} cannot feed a network trained "
                         f"with {channels} channel(s)")
    raw = keras.Input((None, None, input_channels), name="input")
    x = luminance_layer(raw) if input_channels == 3 and channels == 1 else raw
    if method == "flatfield":
        x = flatfield_layers(x, window=int(normalization["window"]),
                             low=float(normalization["low"]),
                             high=float(normalization["high"]), channels=channels)
    return keras.Model(raw, network(x), name=name)


def head_reach(normalization: dict) -> int:
    """Border band (px) of the in-graph normalisation (0 when nothing is in the graph)."""
    if normalization.get("method") == "flatfield":
        return int(flatfield_geometry(int(normalization["window"]))["reach"])
    return 0


def min_input_size(normalization: dict) -> int:
    """Smallest height/width the head accepts (the reflected band must fit)."""
    if normalization.get("method") == "flatfield":
        return int(flatfield_geometry(int(normalization["window"]))["radius"])
    return 1


def is_in_graph(normalization: dict) -> bool:
    """True when :func:`with_preprocessing` reproduces ``normalization``."""
    return normalization.get("method", "percentile") in IN_GRAPH_METHODS


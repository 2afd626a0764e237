"""Package a trained microbead model for the bioimage.io model zoo (model spec 0.5).

Purpose
    Share a model trained by ``train_microbead_optimized.py`` with the tools that run
    bioimage.io packages (deepImageJ in Fiji, QuPath, ilastik, napari's bioimage.io plugin,
    ``bioimageio.core``). The packaged model takes the raw 8- or 16-bit frame at the
    training pixel scale: a flat-field normalisation (the default) and, for frames stored as
    RGB, the luminance conversion are layers of the exported graph
    (``preprocessing_head.py``); per-image percentiles (older runs) are declared as the
    spec's ``scale_range`` operation. What the spec cannot express (resampling to the model
    scale, the threshold and bead splitting) is stated in the documentation.
    ``--input_normalized`` instead packages the bare network for input the consumer
    normalises itself. Test tensors are the real model's prediction on a real image.

Inputs
    ``--model``: a run folder (the model with the best validation Jaccard in its
    ``training_summary.csv``) or a ``best_<model>_model.hdf5`` / ``.keras`` file with
    ``config.json`` beside it. ``--test_image``: the image the test tensors are cut from
    (default: the run's first validation tile, found through ``config.json`` and
    ``split.json``); a colour test image makes a luminance model's input RGB.

Outputs (``--output_dir``)
    ``rdf.yaml`` (the description), ``weights.hdf5`` (``keras_hdf5``),
    ``weights_savedmodel.zip`` (``tensorflow_saved_model_bundle``, signature
    ``serving_default`` and endpoint ``serve``, both returning ``{"probability": ...}``),
    ``weights.onnx`` (``onnx``, opset 17, when ``tf2onnx`` is installed),
    ``test_input.npy`` / ``test_output.npy``, ``cover.png``, ``README.md``
    (documentation: input, preprocessing, training data, validation scores), the run's
    ``config.json`` and ``training_summary.csv``, and ``export.log``. With
    ``bioimageio.spec`` installed (``requirements-dev.txt``) the package is validated, and
    with ``bioimageio.core`` each weight format is run on the test tensors
    (``test_model``), before the script returns.

Example
    python export_model.py --model runs/microbead_training_20260101_120000 \
        --output_dir bioimageio_unet --author "Ada Lovelace"
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

import cli
import microbead_io as mio
import runtime

log = logging.getLogger("microbead.export")

#: Model spec version written. 0.5.3 has every field used here and is read by the
#: bioimage.io tools of 2024 onwards; newer ``bioimageio.spec`` releases read it too.
FORMAT_VERSION = "0.5.3"
LOG_NAME = "export.log"
#: The files this script writes (``--overwrite`` removes these, nothing else).
PACKAGE_FILES = (
    "rdf.yaml", "README.md", "weights.hdf5", "weights_savedmodel.zip", "weights.onnx",
    "test_input.npy", "test_output.npy", "cover.png", "config.json", "training_summary.csv",
    LOG_NAME,
)
UNET_CITATION = {
    "text": "Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image "
            "Segmentation. MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}


class ExportError(Exception):
    """The run cannot be packaged as asked; ``str(err)`` says why and what to do."""


# ----------------------------------------------------------------------------- spec 0.5 input


def input_plan(cfg: dict, *, input_normalized: bool = False, rgb_input: bool = False) -> dict:
    """How the package's input relates to a frame, from the run's ``config.json``.

    Parameters
    ----------
    cfg : the run's config dict, as ``microbead_config.read_run_config`` validated it
    input_normalized : declare the input as already normalised by
        ``microbead_io.apply_normalization`` at model scale (any method); the package then
        holds the bare network
    rgb_input : the frames are stored as RGB (the test image is): a luminance model whose
        normalisation is in the graph then takes the 3 channels and converts them itself

    Returns
    -------
    dict with ``mode`` (``"in_graph"``: raw input, the exported graph converts and
    normalises, see ``preprocessing_head.py``; ``"scale_range"``: raw input, the package
    declares per-sample percentiles; ``"normalized"``: the consumer normalises),
    ``normalization`` (the stored dict), ``input_channels``, ``preprocessing`` (spec 0.5
    operations), ``reach`` (px of border band the in-graph normalisation adds to the halo)
    and ``steps`` (sentences: what the consumer must do before feeding the model).

    Raises
    ------
    ExportError
        The method or channel count is unknown.
    """
    import preprocessing_head

    pre = cfg.get("preprocessing") or {}
    norm = dict(pre.get("normalization") or mio.DEFAULT_NORMALIZATION)
    method = norm.get("method", "percentile")
    channels = int(pre.get("channels", 1))
    if channels not in (1, 3):
        raise ExportError(f"preprocessing.channels = {channels}: only 1 or 3 can be packaged")
    if method not in mio.NORMALIZATION_KEYS:
        raise ExportError(f"normalization method {method!r} is unknown to this version "
                          f"(known: {', '.join(mio.NORMALIZATION_KEYS)})")
    in_graph = not input_normalized and preprocessing_head.is_in_graph(norm)
    input_channels = 3 if in_graph and rgb_input else channels
    scale = float(pre.get("scale", 1.0))
    steps = [
        (f"Resample the frame by {scale:.6g} model px per frame px (area interpolation when "
         "shrinking, as microbead_io.resize_image does) before feeding it; resample the "
         "output back by the inverse (bilinear) before thresholding. bioimage.io spec 0.5 "
         "cannot resample, so consumers that feed native frames see beads at the wrong size."
         if not math.isclose(scale, 1.0) else
         "Feed the frame at its native resolution (the model was trained at scale 1)."),
    ]
    if in_graph:
        steps.append(
            "Feed the raw frame in its stored value range (8- or 16-bit, as float32), "
            + ("as 3 channels in R, G, B order; the model converts them to luminance "
               "(0.299 R + 0.587 G + 0.114 B) itself. A grey frame works as 3 equal channels."
               if input_channels == 3 and channels == 1 else
               "as 3 channels in R, G, B order." if channels == 3 else
               "as one grey channel (luminance 0.299 R + 0.587 G + 0.114 B of an RGB frame, "
               "as microbead_io.read_image computes it)."))
    else:
        steps.append(
            "Convert RGB frames to one luminance channel, 0.299 R + 0.587 G + 0.114 B (as "
            "microbead_io.read_image does); keep the stored value range (8- or 16-bit)."
            if channels == 1 else "Feed RGB frames as 3 channels in R, G, B order.")
    plan = {"normalization": norm, "input_channels": input_channels, "preprocessing": [],
            "reach": 0, "steps": steps}
    if input_normalized:
        steps.append(
            "Normalise the resampled frame with microbead_io.apply_normalization(image, "
            f"{json.dumps(norm)}) (at model scale, whole frame at once) before feeding it; "
            "the package declares no normalisation and its test input is normalised so.")
        if method == "percentile":
            pixel_scale = float(pre.get("pixel_scale", scale))
            if not math.isclose(pixel_scale, scale):
                steps[-1] += (f" Training normalised at the stored-tile scale ({pixel_scale:.6g}"
                              " px per frame px) and then resized; prediction."
                              "preprocess_frame reproduces that order exactly.")
        return {**plan, "mode": "normalized"}
    if in_graph:
        plan["reach"] = preprocessing_head.head_reach(norm)
        if method == "flatfield":
            geo = preprocessing_head.flatfield_geometry(int(norm["window"]))
            steps.append(
                "Normalisation is in the model: flat-field, each pixel divided by a background "
                f"estimate (grey closing over {geo['window']} x {geo['window']} px, then a "
                f"Gaussian of sigma {geo['sigma']:g} px), the ratio mapped linearly so "
                f"{float(norm['low']):.6g} -> 0 and {float(norm['high']):.6g} -> 1 and clipped "
                "(microbead_io.flatfield_normalize; levels fixed per dataset, so any crop of "
                f"a frame gets the values the whole frame gives, away from a {plan['reach']} px "
                "border band, which the output halo includes).")
        else:
            steps.append("No normalisation: the model was trained on raw values.")
        return {**plan, "mode": "in_graph"}
    low, high = float(norm.get("low", 1.0)), float(norm.get("high", 99.8))
    if not (0 <= low < 100 and 1 < high <= 100 and low < high):
        raise ExportError(f"percentiles {low}/{high} are outside what spec 0.5 accepts")
    steps.append(
        f"Normalisation is in the package: per-sample percentiles {low:g} and {high:g} over "
        "all pixels and channels, (x - p_low) / (p_high - p_low), clipped to [0, 1].")
    pixel_scale = float(pre.get("pixel_scale", scale))
    if not math.isclose(pixel_scale, scale):
        steps[-1] += (f" Training took the percentiles at the stored-tile scale "
                      f"({pixel_scale:.6g} px per frame px) before resizing to model scale; "
                      "percentiles of the resampled frame differ from those only slightly.")
    return {
        **plan, "mode": "scale_range",
        "preprocessing": [
            {"id": "scale_range", "kwargs": {"axes": ["y", "x", "channel"],
                                             "min_percentile": low, "max_percentile": high}},
            {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}},
        ],
    }


def package_input(image: np.ndarray, cfg: dict, plan: dict) -> np.ndarray:
    """What a consumer feeds the package for a frame: float32 ``(h, w, C)`` at model scale.

    ``image`` is the frame as ``microbead_io.read_image`` gives it with
    ``plan["input_channels"]`` channels. ``normalized`` mode: the frame as prediction
    preprocesses it (``prediction.preprocess_frame``); otherwise the frame resampled
    to model scale in its stored value range.
    """
    import prediction

    pre = cfg["preprocessing"]
    if plan["mode"] == "normalized":
        return prediction.preprocess_frame(image, pre)
    scale = float(pre["scale"])
    if math.isclose(scale, 1.0):
        return np.asarray(image, np.float32)
    return mio.resize_image(image, mio.scaled_shape(image.shape, scale))


def network_input(x: np.ndarray, plan: dict) -> np.ndarray:
    """The spec-declared preprocessing applied to the package input ``x`` (what the
    packaged model sees; in ``in_graph`` mode the model normalises ``x`` itself)."""
    if plan["mode"] == "scale_range":
        norm = plan["normalization"]
        return mio.normalize_image(x, float(norm.get("low", 1.0)), float(norm.get("high", 99.8)))
    return np.asarray(x, np.float32)


def center_crop(x: np.ndarray, max_size: int, multiple: int, min_size: int) -> np.ndarray:
    """Central crop of ``(h, w, ...)`` to at most ``max_size``, a multiple of ``multiple``.

    Raises
    ------
    ExportError
        The image is smaller than ``min_size`` (the smallest input the package declares).
    """
    h, w = x.shape[:2]
    side = [min(n, max_size) // multiple * multiple for n in (h, w)]
    if min(side) < min_size:
        raise ExportError(f"test image is {w}x{h} px at model scale; the package needs at "
                          f"least {min_size}x{min_size} (pass a larger --test_image or a "
                          "smaller --halo)")
    y0, x0 = (h - side[0]) // 2, (w - side[1]) // 2
    return np.ascontiguousarray(x[y0:y0 + side[0], x0:x0 + side[1]])


# ----------------------------------------------------------------------------- run facts


def read_training_row(model_path: Path) -> dict:
    """The ``training_summary.csv`` row of the model file (its folder's summary); {} if none."""
    name = model_arch(model_path)
    summary = model_path.parent / "training_summary.csv"
    if not summary.is_file():
        return {}
    with open(summary, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("model") == name]
    return rows[-1] if rows else {}


def model_arch(model_path: Path) -> str:
    """``unet`` from ``best_unet_model.hdf5``; the file stem otherwise."""
    m = re.fullmatch(r"(?:best|final)_(.+)_model", model_path.stem)
    return m.group(1) if m else model_path.stem


def is_colour(image: np.ndarray) -> bool:
    """True when an ``(H, W, 3)`` image's channels differ anywhere (a grey file read with
    ``channels=3`` repeats one plane)."""
    x = np.asarray(image)
    return x.ndim == 3 and x.shape[-1] >= 3 and not (
        np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]))


def find_test_image(cfg: dict, model_path: Path) -> Path:
    """The run's first validation tile (``split.json`` + ``data.data_dir/images``).

    Raises
    ------
    ExportError
        Naming what was looked for, and ``--test_image`` as the way out.
    """
    data_dir = Path(str((cfg.get("data") or {}).get("data_dir", "")))
    images = data_dir / "images"
    split = model_path.parent / "split.json"
    names = []
    if split.is_file():
        try:
            names = list(json.loads(split.read_text()).get("val") or [])
        except (OSError, json.JSONDecodeError):
            names = []
    for name in names:
        if (images / name).is_file():
            return images / name
    if images.is_dir():
        found = mio.list_images(images)
        if found:
            return found[0]
    raise ExportError(f"no test image: neither the validation tiles of {split} nor any image "
                      f"in {images} could be found; pass --test_image")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- YAML


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        f = float(v)
        if math.isnan(f):
            return ".nan"
        if math.isinf(f):
            return ".inf" if f > 0 else "-.inf"
        return repr(f)
    # A JSON string is a valid YAML double-quoted scalar (same escapes).
    return json.dumps(str(v), ensure_ascii=False)


def _is_flat(v) -> bool:
    if isinstance(v, dict):
        return not v
    if isinstance(v, list | tuple):
        return all(not isinstance(i, dict | list | tuple) for i in v)
    return True


def _inline(v) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_scalar(i) for i in v) + "]"
    return _scalar(v)


def to_yaml(obj, indent: int = 0) -> str:
    """Block-style YAML of nested dicts/lists/scalars (no PyYAML needed on the cluster).

    Strings are written as double-quoted (JSON) scalars, so no value is ever re-typed by a
    YAML reader (``"1.10"`` stays a string, ``"yes"`` is not a boolean).
    """
    pad = "  " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = str(k) if _PLAIN_KEY.match(str(k)) else json.dumps(str(k))
            if _is_flat(v):
                lines.append(f"{pad}{key}: {_inline(v)}")
            else:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(v, indent + 1))
    elif isinstance(obj, list | tuple):
        for item in obj:
            if _is_flat(item):
                lines.append(f"{pad}- {_inline(item)}")
            else:
                sub = to_yaml(item, indent + 1).split("\n")
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
    else:
        lines.append(pad + _scalar(obj))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- package parts


def cover_image(x_display: np.ndarray, prob: np.ndarray, threshold: float,
                height: int = 256) -> np.ndarray:
    """2:1 RGB uint8 cover: test input (gray) | the beads the model finds, outlined."""
    import cv2

    import frame_outputs
    import microbead_metrics

    gray = frame_outputs.display_gray(x_display)
    n, labels = cv2.connectedComponents(
        microbead_metrics.above_threshold(prob, threshold).astype(np.uint8), connectivity=8)
    ov = frame_outputs.overlay_image(gray, labels)
    left = cv2.cvtColor(mio.to_uint8(gray), cv2.COLOR_GRAY2RGB)
    h, w = gray.shape
    f = max(1, int(math.ceil(height / h)))
    size = (w * f, h * f)
    panels = [cv2.resize(p, size, interpolation=cv2.INTER_NEAREST) for p in (left, ov)]
    return np.concatenate(panels, axis=1)


def export_saved_model(model, zip_path: Path, *, channels: int) -> str | None:
    """Zip of a TensorFlow SavedModel of ``model`` for bioimage.io clients.

    One endpoint, ``serve`` (also the ``serving_default`` signature), input ``input``
    ``(batch, y, x, channels)`` float32, returning ``{"probability": output}``: a dict, as
    bioimageio.core's TensorFlow 2 adapter (``TFSMLayer(call_endpoint="serve")``) asserts,
    keyed by the rdf's output id for clients that look outputs up by name (deepImageJ's
    JDLL, QuPath's DJL). Returns None on success, else why it could not be made (the
    package then goes without it).
    """
    import keras
    import tensorflow as tf

    def serve(x):
        return {"probability": model(x, training=False)}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "savedmodel"
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serve", serve, input_signature=[
                tf.TensorSpec((None, None, None, int(channels)), tf.float32, name="input")])
            try:
                archive.write_out(str(folder), verbose=False)
            except TypeError:  # Keras < 3.6: no verbose argument
                archive.write_out(str(folder))
        except Exception as exc:  # the many ways an older TF/Keras cannot export
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"{type(exc).__name__}: {msg}"

        def write(t):
            with zipfile.ZipFile(t, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(folder).as_posix())

        mio.atomic_write(zip_path, write)
    return None


def export_onnx_weights(model, path: Path, *, channels: int) -> str | None:
    """``weights.onnx`` (opset ``onnx_engine.OPSET``) of ``model``; None on success, else
    why not (tf2onnx missing, a conversion error, a file whose ranks are not the model's):
    the package then goes without it, and no file is left behind."""
    import onnx_engine

    def write(tmp):
        try:
            onnx_engine.export_onnx(model, tmp, channels=channels)
        except ValueError as exc:  # the rank check names atomic_write's temporary file
            raise ValueError(str(exc).replace(str(tmp), str(path))) from None

    try:
        mio.atomic_write(path, write)
    except Exception as exc:  # ImportError, and tf2onnx's many conversion errors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{type(exc).__name__}: {msg}"
    return None


def documentation(*, name: str, arch: str, cfg: dict, plan: dict, row: dict, shape: dict,
                  weights: list[tuple[str, str]], saved_model_note: str | None) -> str:
    """The package's README.md: input contract, output, training data, validation."""
    pre, post = cfg.get("preprocessing") or {}, cfg.get("postprocessing") or {}
    data, training = cfg.get("data") or {}, cfg.get("training") or {}
    thr = float(post.get("threshold", 0.5))
    lines = [
        f"# {name}",
        "",
        f"A {arch} (Keras, TensorFlow) that segments microbeads in brightfield frames: one "
        "bead probability per pixel. Trained with the microbead pipeline "
        "(train_microbead_optimized.py); its config.json is attached.",
        "",
        "## Input: what the consumer must reproduce",
        "",
        *[f"- {s}" for s in plan["steps"]],
        f"- Input tensor: float32, axes batch, y, x, channel ({shape['channels']} channel(s)); "
        f"y and x a multiple of {shape['step']} px, at least {shape['min']} px. Output tiles "
        f"lose {shape['halo']} px at each edge when a consumer tiles large inputs.",
    ]
    for key in ("pixel_scale_source", "scale_source", "channel_mode"):
        if key in pre:
            lines.append(f"- {key.replace('_', ' ')}: {pre[key]}")
    lines += [
        "",
        "## Output and what the package cannot express",
        "",
        "- `probability`: bead probability in [0, 1], same size as the input.",
        f"- Threshold: {thr:g} (from training). Beads = connected pixels with probability "
        f"> {thr:g} at model scale, touching beads split by a watershed with a median bead "
        f"area of {float(post.get('median_bead_area_px', float('nan'))):.1f} model px "
        "(microbead_metrics.label_beads), then carried to frame resolution. Neither the "
        "threshold nor the splitting is expressible in spec 0.5: predict_microscope.py does "
        "both (see Use with the microbead pipeline).",
        "",
        "## Training data",
        "",
        training_data_text(cfg),
        "",
        "## Validation",
        "",
    ]
    if row:
        lines += [
            "Measured by the training run on its held-out validation tiles (split.json: tiles "
            "of one source frame never straddle the split), per-image mean at threshold "
            f"{thr:g}, at the epoch the checkpoint was taken ({row.get('best_epoch', '?')}):",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        for key, label in (("best_val_jacard", "Jaccard (IoU), logged"),
                           ("best_val_jacard_reloaded", "Jaccard, reloaded checkpoint"),
                           ("best_val_dice", "Dice"), ("val_jacard_batchstats",
                                                       "Jaccard, batch statistics")):
            if row.get(key) not in (None, ""):
                lines.append(f"| {label} | {float(row[key]):.4f} |")
        lines += ["", "Validate on your own frames: predict_microscope.py, then "
                      "evaluate_predictions.py against hand-made masks (pixel and object "
                      "scores, bead counts)."]
    else:
        lines.append("No training_summary.csv row was found for this model: no scores.")
    lines += [
        "",
        "## Files",
        "",
        *[f"- `{f}`: {what}" for f, what in weights],
        "- `test_input.npy`, `test_output.npy`: a validation tile as the package takes it, "
        "and this model's output for it.",
        "- `config.json`: the training run's configuration (preprocessing, threshold, "
        "versions); `training_summary.csv`: its scores.",
    ]
    if saved_model_note:
        lines.append(f"- No TensorFlow SavedModel: this TensorFlow could not export one "
                     f"({saved_model_note}).")
    scale = float(pre.get("scale", 1.0))
    lines += [
        "",
        "## Use in Fiji (deepImageJ 3) and QuPath",
        "",
        (f"- Resample the frame by {scale:.6g} first (Fiji: Image > Scale..., Average when "
         f"downsizing; QuPath: input resolution = frame pixel size / {scale:.6g})."
         if not math.isclose(scale, 1.0) else
         "- Feed frames at their native resolution (QuPath: full resolution)."),
        "- Fiji: zip this folder's contents; Plugins > DeepImageJ > DeepImageJ Install Model, "
        "Private model, From ZIP file; open the frame, Plugins > DeepImageJ > DeepImageJ Run. "
        "deepImageJ runs the SavedModel or the ONNX weights.",
        "- QuPath (Deep Java Library + Bioimage Model Zoo extensions, TensorFlow engine): "
        "unzip weights_savedmodel.zip into weights_savedmodel/ beside rdf.yaml; Extensions > "
        "Bioimage Model Zoo > Create pixel classifier, select rdf.yaml.",
        f"- Threshold the probability at {thr:g}.",
        "",
        "## Use with the microbead pipeline",
        "",
        "    python predict_microscope.py --model weights.hdf5 --input_dir frames/ "
        "--output_dir predictions/ --roi",
        "",
        "(config.json beside weights.hdf5 carries scale, normalisation and threshold.)",
        "",
        f"Training: {training.get('epochs', '?')} epochs, batch {training.get('batch_size', '?')}"
        f", loss {training.get('loss', '?')}; {data.get('n_images', '?')} tiles.",
    ]
    return "\n".join(lines) + "\n"


def training_data_text(cfg: dict) -> str:
    """One paragraph on the training tiles, from ``config.json``'s ``data`` section."""
    pre, data = cfg.get("preprocessing") or {}, cfg.get("data") or {}
    parts = [f"{data.get('n_images', '?')} brightfield image/mask tiles of microbeads"]
    if "stored_tile_size" in pre:
        parts.append(f"stored at {pre['stored_tile_size'][1]}x{pre['stored_tile_size'][0]} px")
    if "pixel_scale" in pre:
        parts.append(f"{float(pre['pixel_scale']):.4g} tile px per frame px")
    text = ", ".join(parts) + "."
    if data.get("mean_objects_per_image") is not None:
        text += f" {float(data['mean_objects_per_image']):.1f} beads per tile on average"
    if data.get("positive_ratio") is not None:
        text += f", {100 * float(data['positive_ratio']):.2f} % bead pixels"
    text += "."
    if data.get("data_dir"):
        text += f" Source folder at training time: {data['data_dir']}."
    return text


def build_rdf(*, name: str, description: str, authors: list[str], license_id: str,
              plan: dict, cfg: dict, shape: dict, weights: dict, row: dict, arch: str,
              n_params: int, files: dict) -> dict:
    """The ``rdf.yaml`` content (a dict) for model spec :data:`FORMAT_VERSION`."""
    pre, post = cfg.get("preprocessing") or {}, cfg.get("postprocessing") or {}
    training, env = cfg.get("training") or {}, cfg.get("environment") or {}
    channels = int(plan["input_channels"])
    space_in = {"size": {"min": shape["min"], "step": shape["step"]}}
    rdf = {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "authors": [{"name": a} for a in authors],
        "cite": [UNET_CITATION],
        "license": license_id,
        "tags": ["microbeads", "brightfield", "semantic-segmentation", "2d", arch, "keras",
                 "tensorflow", "bead-counting"],
        "documentation": files["documentation"],
        "covers": [files["cover"]],
        "attachments": [{"source": f, "sha256": s} for f, s in files["attachments"]],
        "inputs": [{
            "id": "input",
            "description": ("frame at model scale, normalised (see documentation)"
                            if plan["mode"] == "normalized" else
                            "raw frame at model scale, stored value range (8- or 16-bit "
                            "values as float32); the model normalises it (see documentation)"),
            "axes": [
                {"type": "batch"},
                {"type": "space", "id": "y", **space_in},
                {"type": "space", "id": "x", **space_in},
                {"type": "channel",
                 "channel_names": ["luminance"] if channels == 1 else ["r", "g", "b"]},
            ],
            "test_tensor": {"source": files["test_input"][0], "sha256": files["test_input"][1]},
            "data": ({"type": "float32", "range": [0.0, 1.0]} if plan["mode"] == "normalized"
                     else {"type": "float32"}),
            "preprocessing": plan["preprocessing"],
        }],
        "outputs": [{
            "id": "probability",
            "description": "bead probability per pixel",
            "axes": [
                {"type": "batch"},
                {"type": "space", "id": "y", "halo": shape["halo"],
                 "size": {"tensor_id": "input", "axis_id": "y"}},
                {"type": "space", "id": "x", "halo": shape["halo"],
                 "size": {"tensor_id": "input", "axis_id": "x"}},
                {"type": "channel", "channel_names": ["bead_probability"]},
            ],
            "test_tensor": {"source": files["test_output"][0],
                            "sha256": files["test_output"][1]},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": weights,
        "training_data": {
            "type": "dataset",
            "format_version": "0.3.0",
            "name": "Microbead brightfield tiles",
            "description": training_data_text(cfg),
        },
        "timestamp": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "config": {
            "bioimageio": {
                "architecture_type": arch,
                "model_parameter_count": int(n_params),
                "training": {k: v for k, v in {
                    "training_epochs": training.get("epochs"),
                    "training_batch_size": training.get("batch_size"),
                    "initial_learning_rate": training.get("lr"),
                    "loss_function": training.get("loss"),
                    "optimizer": "Adam",
                }.items() if v is not None},
            },
            "microbead": {
                "scale_model_px_per_frame_px": float(pre.get("scale", 1.0)),
                "pixel_scale_tile_px_per_frame_px": float(pre.get("pixel_scale", 1.0)),
                "normalization": plan["normalization"],
                "input_normalized": plan["mode"] == "normalized",
                "normalization_in_graph": plan["mode"] == "in_graph",
                "input_channels": int(plan["input_channels"]),
                "threshold": float(post.get("threshold", 0.5)),
                "median_bead_area_px": post.get("median_bead_area_px"),
                "validation": {k: float(v) for k, v in row.items()
                               if k.startswith(("best_val", "val_", "final_val")) and v},
                "best_epoch": int(row["best_epoch"]) if row.get("best_epoch") else None,
                "keras_version": env.get("keras"),
                "git_commit": env.get("git_commit"),
            },
        },
    }
    return rdf


# ----------------------------------------------------------------------------- validation


def validate_package(rdf_path: Path) -> tuple[str, list[str]] | None:
    """``(status, problems)`` from ``bioimageio.spec`` with file checks; None if not installed.

    ``status`` is ``"passed"`` or ``"valid-format"`` for a valid package, ``"failed"``
    otherwise; ``problems`` lists errors and warnings as ``location: message``.
    """
    try:
        from bioimageio.spec import load_description
    except ImportError:
        return None
    descr = load_description(str(rdf_path), perform_io_checks=True)
    summary = descr.validation_summary
    problems = []
    for d in summary.details:
        for e in list(d.errors) + list(d.warnings):
            kind = "error" if e in d.errors else "warning"
            loc = ".".join(map(str, e.loc)) or d.name
            problems.append(f"{kind}: {loc}: {e.msg}")
    return summary.status, problems


def client_test(rdf_path: Path, weight_formats) -> dict[str, tuple[str, list[str]]] | None:
    """Run the package as a bioimage.io client does: ``bioimageio.core.test_model`` once
    per weight format. ``{format: (status, failed checks)}``; None if bioimageio.core is
    not installed.

    ``test_model`` loads the weights with the client's own adapter (Keras HDF5 without
    custom objects, the SavedModel's ``serve`` endpoint, ONNX Runtime), runs the test input
    through the declared preprocessing and the model, and compares with the test output.
    """
    try:
        from bioimageio.core import test_model
    except ImportError:
        return None
    out = {}
    cwd = os.getcwd()
    # The TensorFlow adapter unzips the SavedModel into ./bioimageio_unzipped_tf_weights:
    # run in a scratch folder, so nothing lands in (or is reused from) the caller's folder.
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for wf in weight_formats:
                summary = test_model(str(Path(cwd, rdf_path)), weight_format=wf)
                failed = [f"{d.name}: " + ("; ".join(e.msg for e in d.errors) or d.status)
                          for d in summary.details if d.status == "failed"]
                out[wf] = (summary.status, failed)
        finally:
            os.chdir(cwd)
    return out


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    add = functools.partial(cli.add_option, p)
    add("model", required=True, help="run folder or best_<model>_model.hdf5/.keras")
    add("output_dir", required=True, help="package folder (created)")
    add("test_image", default=None,
        help="image for the test tensors (default: the run's first validation tile)")
    add("input_normalized", action="store_true",
        help="package the bare network and declare its input as already normalised by "
             "microbead_io.apply_normalization at model scale (default: the package takes "
             "the raw frame and normalises it itself)")
    add("name", default=None, help="model name (default: 'Microbead <model> segmentation')")
    add("author", action="append", default=None,
        help="author name (repeat for several); the model zoo requires at least one")
    add("license", default="CC-BY-4.0", help="SPDX licence id of the weights")
    add("halo", type=int, default=32,
        help="model px a tiling consumer should drop at tile edges (predict_microscope "
             "blends overlapping tiles instead)")
    add("test_size", type=int, default=256,
        help="max test tensor edge in model px")
    add("no_saved_model", action="store_true", help="skip the TensorFlow SavedModel weights")
    add("no_onnx", action="store_true", help="skip the ONNX weights")
    add("no_client_test", action="store_true",
        help="skip running each weight format with bioimageio.core's test_model")
    cli.add_overwrite(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    import prediction

    handlers = [runtime.add_log_handler()]

    runtime.configure_threads()
    # TensorFlow's SavedModel export logs through the root logger, whose first use installs
    # a stderr handler (logging.basicConfig): every later line then printed twice. A root
    # handler that prints nothing keeps basicConfig from installing one.
    root, placeholder = logging.getLogger(), logging.NullHandler()
    root.addHandler(placeholder)
    try:
        try:  # every check before anything is written
            cli.check_output_dir(out, overwrite=args.overwrite, log_name=LOG_NAME,
                                 inputs=[args.model])
            model_path, cfg_path, note = prediction.resolve_model(args.model)
            cfg = prediction.read_run_config(cfg_path)
            test_image = Path(args.test_image) if args.test_image else \
                find_test_image(cfg, model_path)
            plan = input_plan(cfg, input_normalized=args.input_normalized,
                              rgb_input=is_colour(mio.read_image(test_image, channels=3)))
            claim = cli.claim_output_dir(out, PACKAGE_FILES, script="export_model",
                                         overwrite=args.overwrite, log_name=LOG_NAME,
                                         inputs=[args.model, cfg_path, test_image])
        except (prediction.PredictionError, ExportError, cli.OutputDirError,
                mio.ImageReadError) as exc:
            return cli.fatal(log, "%s", exc)
        with claim:
            handlers.append(runtime.add_log_handler(out / LOG_NAME, mode="w"))
            claim.report(log)
            try:
                return _run(args, out, model_path, cfg_path, cfg, plan, test_image, note)
            except (ExportError, mio.ImageReadError) as exc:
                return cli.fatal(log, "%s", exc)
    except KeyboardInterrupt:
        log.error("interrupted; the package in %s is incomplete", out)
        return 130
    finally:
        root.removeHandler(placeholder)
        runtime.remove_log_handlers(handlers)


def _run(args, out: Path, model_path: Path, cfg_path: Path, cfg: dict, plan: dict,
         test_image: Path, note: str) -> int:
    import keras
    import tensorflow as tf

    import models
    import preprocessing_head

    log.info("model: %s", note)
    log.info("input: %s, %d channel(s)", plan["mode"], plan["input_channels"])
    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    arch = model_arch(model_path)
    step = int(pre.get("pad_multiple", 16))
    # A tiling consumer drops the network's halo plus the in-graph normalisation's border.
    # Rounded up to a multiple of the size step: a client that pads the input by the halo
    # on each side must still land on a size the network accepts.
    halo = max(0, int(args.halo)) + int(plan["reach"])
    halo = -(-halo // step) * step
    min_size = max(step * (2 * halo // step + 1),
                   preprocessing_head.min_input_size(plan["normalization"]))
    shape = {"channels": int(plan["input_channels"]), "step": step, "halo": halo,
             "min": -(-min_size // step) * step}
    try:
        network = models.load_model(model_path)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return cli.fatal(log, "%s", msg if str(model_path) in msg else f"{model_path}: {msg}")
    model = network
    if plan["mode"] == "in_graph":
        model = preprocessing_head.with_preprocessing(
            network, input_channels=plan["input_channels"], channels=int(pre["channels"]),
            normalization=plan["normalization"])

    # Test tensors: a real tile, cut at model scale to a size the package accepts.
    image = mio.read_image(test_image, channels=shape["channels"])
    x_pkg = package_input(image, cfg, plan)
    x_pkg = center_crop(x_pkg, max(args.test_size, shape["min"]), step, shape["min"])
    test_in = x_pkg[None].astype(np.float32)
    x_net = network_input(x_pkg, plan)
    test_out = np.asarray(model.predict_on_batch(x_net[None]), np.float32)
    np.save(out / "test_input.npy", test_in)
    np.save(out / "test_output.npy", test_out)
    log.info("test tensors from %s: input %s, output %s", test_image, test_in.shape,
             test_out.shape)

    # Weights: the checkpoint re-saved without its training configuration, so a consumer's
    # plain keras.models.load_model needs none of this pipeline's custom losses or metrics.
    # (Keras' HDF5 writer, the SavedModel and ONNX exports and the client test log through
    # the root logger too: see the placeholder in main.)
    models.save_model(model, out / "weights.hdf5")
    weights = {"keras_hdf5": {
        "source": "weights.hdf5", "sha256": _sha256(out / "weights.hdf5"),
        "tensorflow_version": tf.__version__,
        "comment": f"saved by Keras {keras.__version__}, TensorFlow {tf.__version__}",
    }}
    weight_files = [("weights.hdf5", f"Keras HDF5 (Keras {keras.__version__}): "
                     "keras.models.load_model(path), no custom objects needed (Keras 3)")]
    saved_note = None if not args.no_saved_model else "skipped with --no_saved_model"
    if not args.no_saved_model:
        saved_note = export_saved_model(model, out / "weights_savedmodel.zip",
                                        channels=shape["channels"])
    if saved_note is None:
        weights["tensorflow_saved_model_bundle"] = {
            "source": "weights_savedmodel.zip",
            "sha256": _sha256(out / "weights_savedmodel.zip"),
            "tensorflow_version": tf.__version__, "parent": "keras_hdf5",
        }
        weight_files.append(("weights_savedmodel.zip", f"TensorFlow {tf.__version__} "
                             "SavedModel, signature serving_default / endpoint serve, input "
                             "'input', output {'probability': ...} (deepImageJ, QuPath)"))
    else:
        log.warning("no TensorFlow SavedModel in the package: %s", saved_note)
    onnx_note = None if not args.no_onnx else "skipped with --no_onnx"
    if not args.no_onnx:
        onnx_note = export_onnx_weights(model, out / "weights.onnx",
                                        channels=shape["channels"])
    if onnx_note is None:
        import onnx_engine

        weights["onnx"] = {"source": "weights.onnx", "sha256": _sha256(out / "weights.onnx"),
                           "opset_version": onnx_engine.OPSET, "parent": "keras_hdf5"}
        weight_files.append(("weights.onnx", f"ONNX, opset {onnx_engine.OPSET} (ONNX "
                             "Runtime: deepImageJ, QuPath with the OnnxRuntime engine)"))
    else:
        log.warning("no ONNX weights in the package: %s", onnx_note)

    # Attachments: the run's config and scores; cover; documentation.
    shutil.copyfile(cfg_path, out / "config.json")
    attachments = ["config.json"]
    summary = model_path.parent / "training_summary.csv"
    if summary.is_file():
        shutil.copyfile(summary, out / "training_summary.csv")
        attachments.append("training_summary.csv")
    thr = float(post["threshold"])
    mio.write_image(out / "cover.png", cover_image(x_pkg, test_out[0, ..., 0], thr))
    row = read_training_row(model_path)
    name = args.name or f"Microbead {arch} segmentation"
    doc = documentation(name=name, arch=arch, cfg=cfg, plan=plan, row=row, shape=shape,
                        weights=weight_files, saved_model_note=saved_note)
    (out / "README.md").write_text(doc)
    jacc = f", validation Jaccard {float(row['best_val_jacard']):.3f}" \
        if row.get("best_val_jacard") else ""
    description = (
        f"{arch} for microbead segmentation in brightfield frames (bead probability per "
        f"pixel{jacc}). Resample frames by {float(pre['scale']):.4g} first; threshold "
        f"{thr:g}; see the documentation for what the consumer must reproduce.")
    rdf = build_rdf(
        name=name, description=description, authors=args.author or [],
        license_id=args.license, plan=plan, cfg=cfg, shape=shape, weights=weights, row=row,
        arch=arch, n_params=model.count_params(), files={
            "documentation": "README.md", "cover": "cover.png",
            "attachments": [(f, _sha256(out / f)) for f in attachments],
            "test_input": ("test_input.npy", _sha256(out / "test_input.npy")),
            "test_output": ("test_output.npy", _sha256(out / "test_output.npy")),
        })
    (out / "rdf.yaml").write_text(
        f"# bioimage.io model description written by export_model.py\n{to_yaml(rdf)}\n")
    if not args.author:
        log.warning("no --author given: the package validates, but the model zoo needs one")

    result = validate_package(out / "rdf.yaml")
    if result is None:
        log.info("bioimageio.spec is not installed: package not validated "
                 "(pip install -r requirements-dev.txt)")
    else:
        status, problems = result
        for p in problems:
            (log.error if p.startswith("error") else log.info)("bioimageio.spec %s", p)
        if status == "failed":
            log.error("bioimageio.spec validation failed for %s", out / "rdf.yaml")
            return 1
        log.info("bioimageio.spec validation: %s", status)
    tested = None if args.no_client_test else client_test(out / "rdf.yaml", list(weights))
    if tested is None:
        log.info("bioimageio.core test_model not run (%s)", "--no_client_test"
                 if args.no_client_test else "pip install -r requirements-dev.txt")
    else:
        for wf, (status, failed) in tested.items():
            log.info("bioimageio.core test_model %s: %s", wf, status)
            for f in failed:
                log.error("bioimageio.core test_model %s: %s", wf, f)
        if any(status != "passed" for status, _ in tested.values()):
            log.error("bioimageio.core test_model failed for %s", out / "rdf.yaml")
            return 1
    log.info("done: %s", out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())

"""ONNX export of a Keras model, and an ONNX Runtime batch predictor.

``export_model.py`` writes the bioimage.io package's ``onnx`` weights with
:func:`export_onnx`; ``benchmarks/bench_predict.py --engine onnxruntime`` times the
prediction pipeline with :func:`make_onnxruntime_predict_fn` in place of Keras (on a 2-core
CPU ONNX Runtime was ~1.5x slower than TensorFlow, so ``predict_microscope.py`` keeps
Keras; see the README's "Prediction speed"). Both use Keras' own ONNX export
(``model.export(format="onnx")``, which on the TensorFlow backend converts through
``tf2onnx``), so the optional packages are ``tf2onnx``, ``onnx`` and ``onnxruntime``
(``requirements-dev.txt``); they are imported only here, when asked for.

The exported graph ends in a same-shape reshape (:func:`pinned_output_model`), and
:func:`export_onnx` checks the written file's input and output ranks against the Keras model
(:func:`check_onnx_ranks`): tf2onnx's optimiser, in some node orders, used to leave the
one-channel output as ``(B, 1, H, W, 1)`` instead of ``(B, H, W, 1)``.

Example
-------
>>> export_onnx(model, "weights.onnx", channels=1)                     # doctest: +SKIP
>>> fn = make_onnxruntime_predict_fn("weights.onnx")                   # doctest: +SKIP
>>> prob = fn(batch)  # (B, h, w, C) float32 -> (B, h, w, 1)           # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

#: ONNX opset written (17: LayerNormalization and the ops deepImageJ's / QuPath's ONNX
#: Runtime builds of 2023 onwards read).
OPSET = 17
INSTALL_HINT = "pip install onnxruntime tf2onnx onnx (see requirements-dev.txt)"


def export_onnx(model, path: str | os.PathLike, *, channels: int, opset: int = OPSET,
                input_name: str = "input") -> Path:
    """Write ``model`` as an ONNX file with one input ``(batch, y, x, channels)`` float32.

    Batch, height and width stay dynamic. The graph is ``model`` followed by a same-shape
    reshape (:func:`pinned_output_model`). Returns the path.

    Raises
    ------
    ImportError
        When ``tf2onnx`` / ``onnx`` are missing (the message says what to install).
    ValueError
        When the written file's input or output ranks are not the Keras model's
        (:func:`check_onnx_ranks`); the file is left at ``path`` for inspection
        (``export_model`` writes through ``microbead_io.atomic_write``, which drops it).
    """
    import keras

    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs tf2onnx and onnx ({exc}); {INSTALL_HINT}") \
            from None
    path = Path(path)
    spec = keras.InputSpec(shape=(None, None, None, int(channels)), dtype="float32",
                           name=input_name)
    pinned = pinned_output_model(model)
    try:
        pinned.export(str(path), format="onnx", input_signature=[spec],
                      opset_version=int(opset), verbose=False)
    except TypeError:  # Keras without the verbose argument
        pinned.export(str(path), format="onnx", input_signature=[spec],
                      opset_version=int(opset))
    check_onnx_ranks(path, model)
    return path


def same_shape(t):
    """``t`` reshaped to its own (dynamic) shape: the values and shape are unchanged."""
    import keras

    return keras.ops.reshape(t, keras.ops.shape(t))


def pinned_output_model(model):
    """``model`` with every output passed through :func:`same_shape`, for tf2onnx.

    Why: tf2onnx runs the NHWC convolutions as NCHW and pushes each Transpose back to NHWC
    down the graph, as far as the graph output. On a one-channel tensor it then replaces that
    Transpose by a Reshape, which its reshape optimiser rewrites as a 5-D Reshape (a leading
    1) followed by a Squeeze, moving the Reshape's *consumers* onto the Squeeze. A graph
    output is not a consumer: when the Transpose is converted only in the optimiser's second
    pass, after the output's Identity was removed, the file's output stays the 5-D Reshape,
    ``(B, 1, H, W, 1)``. Which pass converts it depends on the order the optimiser visits
    nodes (sets of node names and node objects), so it changed from export to export: 5 of
    60 exports of the flat-field package in one process, two full test runs in four. A
    Reshape is an op the transpose optimiser cannot move a Transpose through, so ending the
    graph in one keeps every Transpose off the output, whatever the order (0 of 60). Costs a
    few ops on the 4-element shape and a Reshape, which copies nothing.
    """
    import keras

    if len(model.inputs) != 1:
        raise ValueError(f"ONNX export takes a single-input model, {model.name!r} has "
                         f"{len(model.inputs)}")
    spec = model.inputs[0]
    inp = keras.Input(batch_shape=tuple(spec.shape), dtype=spec.dtype, name=spec.name)
    out = model(inp)
    pin = keras.layers.Lambda(same_shape, name="onnx_pinned_output")
    out = [pin(o) for o in out] if isinstance(out, list | tuple) else pin(out)
    return keras.Model(inp, out, name=f"{model.name}_onnx")


def onnx_ranks(onnx_model) -> tuple[list, list]:
    """Declared ranks of an ONNX model's graph inputs (initialisers excluded) and outputs,
    in order; None where the file declares no shape."""
    def rank(value_info):
        t = value_info.type.tensor_type
        return len(t.shape.dim) if t.HasField("shape") else None

    graph = onnx_model.graph
    weights = {i.name for i in graph.initializer}
    return ([rank(v) for v in graph.input if v.name not in weights],
            [rank(v) for v in graph.output])


def keras_ranks(model) -> tuple[list, list]:
    """Ranks of a Keras model's inputs and outputs, in order."""
    return [len(t.shape) for t in model.inputs], [len(t.shape) for t in model.outputs]


def check_onnx_ranks(path: str | os.PathLike, model) -> None:
    """Raise ``ValueError`` when the ONNX file at ``path`` does not declare the Keras
    ``model``'s input and output ranks (count and order), so a converter's bad file is
    never packaged silently; the message (one line) names the file and both ranks."""
    import onnx

    got, want = onnx_ranks(onnx.load(str(path))), keras_ranks(model)
    if got != want:
        raise ValueError(f"{path}: the ONNX model's input/output ranks {got[0]}/{got[1]} "
                         f"differ from the Keras model's {want[0]}/{want[1]} (the converter "
                         "changed the tensor layout; the file is not usable as it is)")


def onnx_session(source, *, threads: int | None = None):
    """An ONNX Runtime CPU session for an ``.onnx`` file or serialised model bytes.

    ``threads`` (default :func:`runtime.usable_cpus`) bounds the intra-op pool, as
    OpenCV and TensorFlow are bounded on a shared PBS node.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(f"onnxruntime is not installed; {INSTALL_HINT}") from None
    import runtime

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or runtime.usable_cpus())
    opts.inter_op_num_threads = 1
    src = str(source) if isinstance(source, str | os.PathLike) else source
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def keras_to_onnx_session(model, *, channels: int, threads: int | None = None):
    """Convert a Keras model to ONNX (in a temporary folder) and open it with ORT."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", channels=channels)
        data = path.read_bytes()
    return onnx_session(data, threads=threads)


def make_onnxruntime_predict_fn(session):
    """Batch predictor ``(B, h, w, C) float32 -> (B, h, w, 1)`` over an ORT session
    (or an ``.onnx`` path), the counterpart of ``prediction.make_keras_predict_fn``."""
    if isinstance(session, str | os.PathLike):
        session = onnx_session(session)
    name = session.get_inputs()[0].name

    def fn(batch):
        return session.run(None, {name: np.ascontiguousarray(batch, np.float32)})[0]

    return fn

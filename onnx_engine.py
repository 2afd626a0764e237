"""ONNX export of a Keras model, and an ONNX Runtime batch predictor.

``export_model.py`` writes the bioimage.io package's ``onnx`` weights with
:func:`export_onnx`; ``benchmarks/bench_predict.py --engine onnxruntime`` times the
prediction pipeline with :func:`make_onnxruntime_predict_fn` in place of Keras (on a 2-core
CPU ONNX Runtime was ~1.5x slower than TensorFlow, so ``predict_microscope.py`` keeps
Keras; see the README's "Prediction speed"). Both use Keras' own ONNX export
(``model.export(format="onnx")``, which on the TensorFlow backend converts through
``tf2onnx``), so the optional packages are ``tf2onnx``, ``onnx`` and ``onnxruntime``
(``requirements-dev.txt``); they are imported only here, when asked for.

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

    Batch, height and width stay dynamic. Returns the path.

    Raises
    ------
    ImportError
        When ``tf2onnx`` / ``onnx`` are missing (the message says what to install).
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
    try:
        model.export(str(path), format="onnx", input_signature=[spec],
                     opset_version=int(opset), verbose=False)
    except TypeError:  # Keras without the verbose argument
        model.export(str(path), format="onnx", input_signature=[spec],
                     opset_version=int(opset))
    return path


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

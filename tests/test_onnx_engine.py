"""onnx_engine: the ONNX file keeps the Keras model's ranks whatever order tf2onnx's optimiser
visits the graph in, and a file that does not is refused (and left out of the package)."""

import numpy as np
import pytest

import export_model as em
import onnx_engine

keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transpose_optimizer = pytest.importorskip("tf2onnx.optimizer.transpose_optimizer")


def _one_channel_model():
    """RGB in, one-channel sigmoid out, as the packaged U-Net ends: tf2onnx runs the Conv as
    NCHW and its Transpose back to NHWC travels down to the graph output."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3), name="input")
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="head")(inp)
    return keras.Model(inp, out)


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture
def late_output_transpose(monkeypatch):
    """tf2onnx's transpose optimiser turns no Transpose into a Reshape in its first pass.

    5 of 60 exports of the flat-field package met this order by chance (it follows the
    iteration order of sets of node names and node objects): the output Transpose became
    a Reshape only after the output's Identity was removed, and the reshape optimiser's
    Squeeze never reached the graph output, which stayed ``(B, 1, H, W, 1)``. Forcing the
    order makes that happen on every export (``opt_iteration`` counts the optimiser's passes
    over one graph)."""
    cls = transpose_optimizer.TransposeOptimizer
    original = cls.post_optimize_action

    def late(self):
        return original(self) if self.opt_iteration > 0 else None

    monkeypatch.setattr(cls, "post_optimize_action", late)


def test_output_stays_4d_when_tf2onnx_converts_the_output_transpose_late(
        tmp_path, late_output_transpose):
    model = _one_channel_model()
    x = np.random.default_rng(0).uniform(0, 1, (2, 16, 20, 3)).astype(np.float32)
    spec = keras.InputSpec(shape=(None, None, None, 3), dtype="float32", name="input")
    bare = tmp_path / "bare.onnx"  # the export as it was: the model alone
    model.export(str(bare), format="onnx", input_signature=[spec],
                 opset_version=onnx_engine.OPSET, verbose=False)
    if _run(bare, x).ndim == 4:
        pytest.skip("this tf2onnx keeps the output 4-D in that order too")
    path = onnx_engine.export_onnx(model, tmp_path / "model.onnx", channels=3)
    assert onnx_engine.onnx_ranks(onnx.load(str(path))) == ([4], [4])
    y = _run(path, x)
    assert y.shape == (2, 16, 20, 1)
    np.testing.assert_allclose(y, np.asarray(model.predict_on_batch(x)), atol=1e-5)


def _crafted(path, out_dims, *, declare_output_shape=True):
    """An ONNX file with input ``(N, H, W, 3)`` whose output is the input unsqueezed to
    ``out_dims`` dimensions (4: Identity)."""
    from onnx import TensorProto, helper

    dims = ["N", "H", "W", 3]
    extra = out_dims - 4
    if extra:
        axes = helper.make_tensor("axes", TensorProto.INT64, [extra], list(range(extra)))
        nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])]
        init = [axes]
    else:
        nodes, init = [helper.make_node("Identity", ["x"], ["y"])], []
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1] * extra + dims
                                        if declare_output_shape else None)
    graph = helper.make_graph(nodes, "crafted",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [out], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_engine.OPSET)])
    if declare_output_shape:  # the checker wants a declared shape
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_rank_check_passes_the_models_ranks_and_refuses_others(tmp_path):
    inp = keras.Input((None, None, 3))
    keras_model = keras.Model(inp, keras.layers.Identity()(inp))  # ranks 4 in, 4 out
    onnx_engine.check_onnx_ranks(_crafted(tmp_path / "same.onnx", 4), keras_model)
    with pytest.raises(ValueError, match=r"five\.onnx: .*ranks \[4\]/\[5\] differ from the "
                       r"Keras model's \[4\]/\[4\]"):
        onnx_engine.check_onnx_ranks(_crafted(tmp_path / "five.onnx", 5), keras_model)
    with pytest.raises(ValueError, match=r"\[4\]/\[None\]"):  # no declared shape: refused
        onnx_engine.check_onnx_ranks(
            _crafted(tmp_path / "unknown.onnx", 4, declare_output_shape=False), keras_model)


def test_export_refuses_the_5d_file_and_the_package_goes_without_it(
        tmp_path, late_output_transpose, monkeypatch):
    """Without the pinned output (the export as it was) the forced order writes a 5-D file:
    export_onnx raises naming it, and export_model's ONNX step keeps no file, only a note
    (which ``main`` logs as 'no ONNX weights in the package: ...')."""
    monkeypatch.setattr(onnx_engine, "pinned_output_model", lambda model: model)
    model = _one_channel_model()
    with pytest.raises(ValueError, match=r"bare\.onnx: .*\[4\]/\[5\] differ .*\[4\]/\[4\]"):
        onnx_engine.export_onnx(model, tmp_path / "bare.onnx", channels=3)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    note = em.export_onnx_weights(model, pkg / "weights.onnx", channels=3)
    assert note.startswith(f"ValueError: {pkg / 'weights.onnx'}: ") and "[4]/[5]" in note
    assert list(pkg.iterdir()) == []  # neither weights.onnx nor atomic_write's temporary

"""export_model.py: a bioimage.io (spec 0.5) package of a tiny run, validated and re-run."""

import csv
import json
import zipfile

import numpy as np
import pytest

import export_model as em
import microbead_io as mio
import predict_microscope as pm
import prediction
from synthetic_beads import render_masks, sample_beads

keras = pytest.importorskip("keras")
models = pytest.importorskip("models")

FLATFIELD = {"method": "flatfield", "window": 15, "low": 0.4, "high": 1.05}


def _config(data_dir, normalization=None):
    return {
        "format_version": 1,
        "models": {"unet": {"architecture": "unet", "filters": 4, "depth": 2}},
        "preprocessing": {
            "channels": 1, "input_size": [64, 64], "stored_tile_size": [128, 128],
            "pixel_scale": 0.5, "scale": 0.5, "pad_multiple": 4,
            "normalization": dict(normalization or mio.DEFAULT_NORMALIZATION),
        },
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 28.0},
        "training": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "loss": "dice"},
        "data": {"data_dir": str(data_dir), "n_images": 2, "mean_objects_per_image": 9.0,
                 "positive_ratio": 0.12},
        "environment": {"keras": keras.__version__, "git_commit": None},
    }


def _write_run(root, normalization=None, *, size=128, rgb=False):
    """A run folder as training leaves it: model, config.json, split.json, summary.

    Tiles are ``size`` px (the model scale is 0.5), grey or, with ``rgb``, a blue-purple
    tint like the users' frames."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("tile_a.png", "tile_b.png"):
        mask, _ = render_masks(sample_beads(rng, (size, size), 9 * (size // 128) ** 2,
                                            radius=6, cluster_fraction=0.3), (size, size))
        light = np.linspace(150, 220, size)[None, :]  # uneven light, dark beads
        grey = light - mask * 120 + rng.integers(0, 15, (size, size))
        image = np.stack([grey * 0.8, grey * 0.7, grey], -1) if rgb else grey
        mio.write_image(data / "images" / name, image.astype(np.uint8))
    run = root / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    model = models.build_unet((None, None, 1), filters=4, depth=2, dropout=0.0)
    for layer in model.layers:  # non-trivial BatchNorm statistics: inference is not identity
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
    models.compile_model(model)  # as training saves it: with custom losses and metrics
    models.save_model(model, run / "best_unet_model.hdf5")
    (run / "config.json").write_text(json.dumps(_config(data, normalization)))
    (run / "split.json").write_text(json.dumps({"train": ["tile_a.png"], "val": ["tile_b.png"]}))
    with open(run / "training_summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "best_epoch", "best_val_jacard", "best_val_dice",
                    "best_val_jacard_reloaded"])
        w.writerow(["unet", 1, 0.61, 0.74, 0.6])
    return run, data / "images" / "tile_b.png"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, tile = _write_run(root)
    out = root / "pkg"
    rc = em.main(["--model", str(run), "--output-dir", str(out), "--halo", "8",
                  "--author", "Test Author", "--no_client_test"])
    assert rc == 0
    return run, tile, out


def test_package_passes_bioimageio_spec_validation(package):
    pytest.importorskip("bioimageio.spec", reason="bioimageio.spec not installed "
                        "(pip install -r requirements-dev.txt)")
    _, _, out = package
    status, problems = em.validate_package(out / "rdf.yaml")
    assert status in ("valid-format", "passed"), problems
    assert not [p for p in problems if p.startswith("error")]
    assert "validation: valid-format" in (out / "export.log").read_text() or status == "passed"


def test_test_output_is_the_models_prediction_on_the_test_input(package):
    run, tile, out = package
    test_in, test_out = np.load(out / "test_input.npy"), np.load(out / "test_output.npy")
    assert test_in.shape == (1, 64, 64, 1) and test_out.shape == (1, 64, 64, 1)
    # The test input is the validation tile at model scale, in its stored value range.
    raw = mio.read_image(tile)
    np.testing.assert_allclose(test_in[0], mio.resize_image(raw, (64, 64)), atol=1e-4)
    # The package's own preprocessing (scale_range 1/99.8 %, clip) reproduces the pipeline's.
    cfg = json.loads((out / "config.json").read_text())
    x = em.network_input(test_in[0], em.input_plan(cfg))
    np.testing.assert_allclose(x, prediction.preprocess_frame(raw, cfg["preprocessing"]), atol=1e-5)
    # Plain Keras loads the packaged weights (no custom objects) and predicts the test output.
    model = keras.saving.load_model(out / "weights.hdf5")
    np.testing.assert_allclose(np.asarray(model.predict_on_batch(x[None])), test_out,
                               atol=1e-5)
    original = models.load_model(run / "best_unet_model.hdf5")
    np.testing.assert_allclose(np.asarray(original.predict_on_batch(x[None])), test_out,
                               atol=1e-5)


def test_saved_model_weights_give_the_test_output(package, tmp_path):
    tf = pytest.importorskip("tensorflow")
    _, _, out = package
    with zipfile.ZipFile(out / "weights_savedmodel.zip") as zf:
        zf.extractall(tmp_path / "sm")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    cfg = json.loads((out / "config.json").read_text())
    x = em.network_input(np.load(out / "test_input.npy")[0], em.input_plan(cfg))
    y = loaded.signatures["serving_default"](tf.constant(x[None]))
    np.testing.assert_allclose(np.asarray(next(iter(y.values()))),
                               np.load(out / "test_output.npy"), atol=1e-5)


def test_rdf_states_preprocessing_scale_and_scores(package):
    ruyaml = pytest.importorskip("ruyaml")
    _, _, out = package
    rdf = ruyaml.YAML(typ="safe").load((out / "rdf.yaml").read_text())
    assert rdf["format_version"].startswith("0.5.")
    pre = rdf["inputs"][0]["preprocessing"]
    assert [p["id"] for p in pre] == ["scale_range", "clip"]
    assert (pre[0]["kwargs"]["min_percentile"], pre[0]["kwargs"]["max_percentile"]) == (1.0, 99.8)
    expected = {"keras_hdf5", "tensorflow_saved_model_bundle"} | (
        {"onnx"} if _has("tf2onnx") and _has("onnx") else set())
    assert set(rdf["weights"]) == expected
    assert rdf["config"]["microbead"]["scale_model_px_per_frame_px"] == 0.5
    assert rdf["config"]["microbead"]["validation"]["best_val_jacard"] == pytest.approx(0.61)
    assert rdf["covers"] == ["cover.png"] and (out / "cover.png").stat().st_size > 0
    doc = (out / "README.md").read_text()
    assert "Resample the frame by 0.5" in doc and "## Validation" in doc and "0.6100" in doc
    assert "threshold" in doc.lower() and "cannot" in doc


def test_percentile_run_passes_the_client_test_too(package):
    """Older (percentile) runs keep the spec's scale_range and run in the client (the
    SavedModel, the clients' default choice; every format is run on the flat-field package)."""
    pytest.importorskip("bioimageio.core", reason="bioimageio.core not installed")
    _, _, out = package
    tested = em.client_test(out / "rdf.yaml", ["tensorflow_saved_model_bundle"])
    assert tested == {"tensorflow_saved_model_bundle": ("passed", [])}


def test_input_normalized_packages_the_bare_network(tmp_path):
    run, tile = _write_run(tmp_path, FLATFIELD)
    out = tmp_path / "pkg"
    out.mkdir()  # --overwrite replaces the package's files only
    (out / "notes.txt").write_text("user file")
    (out / "rdf.yaml").write_text("someone else's")  # no manifest of export_model lists it
    argv = ["--model", str(run / "best_unet_model.hdf5"), "--output_dir", str(out),
            "--halo", "8", "--input_normalized", "--no_saved_model", "--no_onnx",
            "--no_client_test", "--overwrite"]
    assert em.main(argv) == 2
    assert (out / "rdf.yaml").read_text() == "someone else's"
    (out / "rdf.yaml").unlink()
    assert em.main(argv) == 0
    assert (out / "notes.txt").read_text() == "user file"
    test_in, test_out = np.load(out / "test_input.npy"), np.load(out / "test_output.npy")
    cfg = json.loads((out / "config.json").read_text())
    expected = prediction.preprocess_frame(mio.read_image(tile), cfg["preprocessing"])
    np.testing.assert_allclose(test_in[0], expected, atol=1e-6)  # normalised at model scale
    model = keras.saving.load_model(out / "weights.hdf5")
    np.testing.assert_allclose(np.asarray(model.predict_on_batch(test_in)), test_out, atol=1e-5)
    doc = (out / "README.md").read_text()
    assert "microbead_io.apply_normalization" in doc and '"window": 15' in doc
    if em.validate_package(out / "rdf.yaml") is not None:
        status, problems = em.validate_package(out / "rdf.yaml")
        assert status in ("valid-format", "passed"), problems


# ----------------------------------------------------------------------------- raw input


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def flatfield_package(tmp_path_factory):
    """A default (flat-field) run on RGB tiles, exported with no flags but the test sizes."""
    root = tmp_path_factory.mktemp("export_ff")
    run, tile = _write_run(root, FLATFIELD, size=256, rgb=True)
    out = root / "pkg"
    # With bioimageio.core installed the script runs every weight format through it and
    # returns 1 if any fails (test_bioimageio_core_test_model_passes_every_weight_format).
    rc = em.main(["--model", str(run), "--output_dir", str(out), "--halo", "8",
                  "--author", "Test Author"])
    assert rc == 0
    return run, tile, out


def test_default_flatfield_run_exports_a_raw_input_package(flatfield_package):
    run, tile, out = flatfield_package
    test_in, test_out = np.load(out / "test_input.npy"), np.load(out / "test_output.npy")
    # Raw RGB at model scale (256 px tile, scale 0.5), stored value range.
    assert test_in.shape == (1, 128, 128, 3) and test_out.shape == (1, 128, 128, 1)
    np.testing.assert_allclose(test_in[0],
                               mio.resize_image(mio.read_image(tile, 3), (128, 128)), atol=1e-4)
    assert test_in.max() > 100  # not normalised
    # The package's output is the pipeline's: the network on predict_microscope's input.
    cfg = json.loads((out / "config.json").read_text())
    network = models.load_model(run / "best_unet_model.hdf5")
    x = prediction.preprocess_frame(mio.read_image(tile), cfg["preprocessing"])
    np.testing.assert_allclose(np.asarray(network.predict_on_batch(x[None])), test_out,
                               atol=1e-4)
    ruyaml = pytest.importorskip("ruyaml")
    rdf = ruyaml.YAML(typ="safe").load((out / "rdf.yaml").read_text())
    inp = rdf["inputs"][0]
    assert inp["preprocessing"] == [] and "range" not in inp["data"]
    assert inp["axes"][-1]["channel_names"] == ["r", "g", "b"]
    # halo = network halo + the flat-field's border (closing 14 px + Gaussian radius 15 px),
    # rounded up to the size step (4), so a client padding by the halo keeps a valid size.
    assert rdf["outputs"][0]["axes"][1]["halo"] == 40
    assert rdf["config"]["microbead"]["normalization_in_graph"] is True
    doc = (out / "README.md").read_text()
    assert "raw frame" in doc and "Normalisation is in the model" in doc


def test_bioimageio_core_test_model_passes_every_weight_format(flatfield_package):
    """The export ran bioimageio.core.test_model on each format (em.client_test) and
    returned 0; its log names each format as passed."""
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core not installed "
                               "(pip install -r requirements-dev.txt)")
    for module in ("tf2onnx", "onnxruntime"):
        pytest.importorskip(module)
    _, _, out = flatfield_package
    rdf = core.load_description(str(out / "rdf.yaml"))
    formats = sorted(k for k, v in rdf.weights.model_dump().items() if v)
    assert formats == ["keras_hdf5", "onnx", "tensorflow_saved_model_bundle"]
    log_text = (out / "export.log").read_text()
    for wf in formats:
        assert f"bioimageio.core test_model {wf}: passed" in log_text


def test_raw_tile_through_the_client_gives_predict_microscopes_mask(flatfield_package,
                                                                    tmp_path, monkeypatch):
    """A raw tile the package never saw, fed as a client does, against predict_microscope."""
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core not installed "
                               "(pip install -r requirements-dev.txt)")
    run, _, out = flatfield_package
    tile = run.parent / "data" / "images" / "tile_a.png"
    rc = pm.main(["--model", str(run), "--input_dir", str(tile.parent), "--output_dir",
                  str(tmp_path / "pred"), "--save_prob", "--no_figures"])
    assert rc == 0
    ref = mio.read_image(tmp_path / "pred" / "prob" / "tile_a_prob.tif")[..., 0]
    monkeypatch.chdir(tmp_path)
    raw = mio.resize_image(mio.read_image(tile, 3), (128, 128))  # model scale, raw RGB
    sample = core.predict(model=str(out / "rdf.yaml"), inputs={"input": raw[None]})
    prob = np.asarray(sample.members["probability"].data)[0, ..., 0]
    got = mio.resize_image(prob, ref.shape)  # back to the tile's pixels, as predict does
    # The client pads the input by the halo (40 model px = 80 tile px) and drops that much
    # of the output; predict_microscope feeds the tile as it is. They differ near the border
    # (measured: 0.25 at the edge, 1e-2 at 32 tile px, 4e-7 from 48 tile px on), so compare
    # the pixels the package's halo declares reliable.
    band = 2 * 40
    inner = (slice(band, -band),) * 2
    assert np.abs(got - ref)[inner].max() <= 1e-3
    thr = float(np.median(ref))  # an untrained network: cut at its median, both halves count
    a, b = got[inner] > thr, ref[inner] > thr
    assert 0.2 < a.mean() < 0.8
    assert (a & b).sum() / (a | b).sum() >= 0.99


def test_usage_errors(tmp_path, capsys):
    run, _ = _write_run(tmp_path, {"method": "zscore"})
    assert em.main(["--model", str(run), "--output_dir", str(tmp_path / "o")]) == 2
    assert "zscore" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    assert em.main(["--model", str(run), "--output_dir", str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert em.main(["--model", str(tmp_path / "nothing"), "--output_dir",
                    str(tmp_path / "o")]) == 2


def test_yaml_writer_round_trips():
    ruyaml = pytest.importorskip("ruyaml")
    obj = {"a": "yes", "b": "1.10", "c": [1, 2.5, None, True], "d": {"e": [{"f": "x: y"}]},
           "g": [], "h": {}, "weird key": 'quote " and \n newline', "i": [{"j": [1], "k": {}}]}
    assert ruyaml.YAML(typ="safe").load(em.to_yaml(obj)) == obj

"""Issue 24: nothing lost, every bad input named (README "Command-line contract").

Overwrite removes only what a previous run's manifest lists and never touches a folder that
holds the inputs; a second run into a held folder is refused naming the holder's PID, a
killed run's lock and temporary files do not block; Ctrl-C keeps what finished; bad values,
corrupt models, clashing names and sample sheets are named, with the contract's exit codes.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import subprocess

import numpy as np
import pytest
from test_cli import SCRIPTS, _busy_argv

import cli
import microbead_io as mio
import predict_microscope as pm
import prediction
import prediction_pipeline

keras = pytest.importorskip("keras")
models = pytest.importorskip("models")


# --------------------------------------------------------------------------- fixtures


def _config(pad=4):
    return {
        "format_version": 1,
        "models": {"unet": {"architecture": "unet"}},
        "preprocessing": {
            "channels": 1, "input_size": [64, 64], "stored_tile_size": [64, 64],
            "pixel_scale": 0.5, "scale": 0.5,
            "normalization": dict(mio.DEFAULT_NORMALIZATION), "pad_multiple": pad,
        },
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 20.0},
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder: a tiny depth-2 U-Net and its config.json."""
    run = tmp_path_factory.mktemp("contract") / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    models.save_model(models.build_unet((None, None, 1), filters=4, depth=2, dropout=0.0),
                      run / "best_unet_model.hdf5")
    (run / "config.json").write_text(json.dumps(_config()))
    return run


def _frames(folder, names, shape=(40, 56)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        mio.write_image(folder / name, (rng.random(shape) * 255).astype(np.uint8))
    return folder


def _predict(run_dir, inp, out, *extra):
    return pm.main(["--model", str(run_dir / "best_unet_model.hdf5"), "--input_dir", str(inp),
                    "--output_dir", str(out), "--tile_size", "64", "--no_figures", *extra])


@pytest.fixture
def live_pid():
    """PID of a process that runs for the whole test (another run's holder)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _lock(folder, pid, script="predict_microscope"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / cli.LOCK_NAME).write_text(json.dumps(
        {"pid": pid, "host": __import__("socket").gethostname(), "script": script,
         "started": "2026-01-01 00:00:00"}))


# --------------------------------------------------------------------------- 1. overwrite


def test_overwrite_never_touches_ground_truth(tmp_path, run_dir, caplog):
    data = tmp_path / "X"
    _frames(data / "images", ["a.png", "b.png"])
    truth = {}
    for stem in ("a", "b"):
        mio.write_mask(data / "masks" / f"{stem}_mask.png", np.eye(40, 56, dtype=np.uint8))
        truth[stem] = (data / "masks" / f"{stem}_mask.png").read_bytes()
    # The output folder holds the input folder: refused, with or without --overwrite.
    assert _predict(run_dir, data / "images", data, "--overwrite") == 2
    assert f"{data}: output folder contains the input" in caplog.text
    # Input elsewhere, but the folder holds masks named like predict's: not predict's files.
    assert _predict(run_dir, _frames(tmp_path / "new", ["a.png"]), data, "--overwrite") == 2
    assert "no output_manifest.json of predict_microscope lists" in caplog.text
    assert "a_mask.png" in caplog.text
    for stem, raw in truth.items():
        assert (data / "masks" / f"{stem}_mask.png").read_bytes() == raw
    assert not (data / cli.MANIFEST_NAME).exists() and not (data / cli.LOCK_NAME).exists()


def test_overwrite_removes_what_the_manifest_lists_only(tmp_path, run_dir):
    inp = _frames(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "pred"
    assert _predict(run_dir, inp, out) == 0
    listed = json.loads((out / cli.MANIFEST_NAME).read_text())
    assert listed["script"] == "predict_microscope" and listed["complete"]
    assert "masks/b_mask.png" in listed["files"] and "prediction.log" in listed["files"]
    assert not (out / cli.LOCK_NAME).exists()  # released
    # A file predict would write, put there after the run by someone else, is not removed.
    (inp / "b.png").unlink()
    mio.write_mask(out / "masks" / "c_mask.png", np.eye(8, dtype=np.uint8))
    assert _predict(run_dir, inp, out, "--overwrite") == 2
    assert (out / "masks" / "b_mask.png").is_file()  # a refusal changes nothing
    (out / "masks" / "c_mask.png").unlink()
    assert _predict(run_dir, inp, out, "--overwrite") == 0
    assert not (out / "masks" / "b_mask.png").exists()
    assert json.loads((out / cli.MANIFEST_NAME).read_text())["files"].count(
        "masks/a_mask.png") == 1


def test_another_scripts_folder_is_refused(tmp_path, run_dir, caplog):
    out = tmp_path / "eval"
    out.mkdir()
    (out / cli.MANIFEST_NAME).write_text(json.dumps(
        {"script": "evaluate_predictions", "complete": True, "files": ["summary.json"]}))
    (out / "summary.json").write_text("{}")
    assert _predict(run_dir, _frames(tmp_path / "in", ["a.png"]), out, "--overwrite") == 2
    assert "holds the outputs of evaluate_predictions" in caplog.text
    assert (out / "summary.json").read_text() == "{}"


def test_killed_run_incomplete_manifest_and_temp_files(tmp_path, caplog):
    # A run killed mid-way left an incomplete manifest, its files and a hidden temp file.
    out = tmp_path / "o"
    claim = cli.claim_output_dir(out, ["masks/*_mask.png", "run.log"], script="s",
                                 overwrite=False, log_name="run.log")
    (out / "masks").mkdir()
    (out / "masks" / "a_mask.png").write_text("x")
    (out / "masks" / ".b_mask.4242.0123456789ab.png").write_text("half")
    (out / "notes.txt").write_text("user")
    (out / cli.LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname()[1],
                                                 "script": "s"}))
    del claim  # never released: SIGKILL
    assert not json.loads((out / cli.MANIFEST_NAME).read_text())["complete"]
    again = cli.claim_output_dir(out, ["masks/*_mask.png", "run.log"], script="s",
                                 overwrite=True, log_name="run.log")
    assert [p.name for p in again.removed] == ["a_mask.png"]
    assert not (out / "masks").exists()  # the temp file went too, then the empty folder
    assert (out / "notes.txt").read_text() == "user"
    again.report(logging.getLogger("microbead.test"))
    assert "took over the lock" in caplog.text and "temporary file" in caplog.text
    again.release()
    assert not (out / cli.LOCK_NAME).exists()


# --------------------------------------------------------------------------- 3. locks


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"train_microbead_optimized"}))
def test_a_held_folder_is_refused_naming_the_holder(name, tmp_path, live_pid, caplog):
    held = tmp_path / "held"
    _lock(held, live_pid)
    argv = _busy_argv(name, tmp_path, held)
    assert importlib.import_module(name).main(argv + ["--overwrite"]) == 2
    assert f"PID {live_pid}" in caplog.text and "in use by another run" in caplog.text
    assert sorted(p.name for p in held.iterdir()) == [cli.LOCK_NAME]


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, run_dir, caplog):
    out = tmp_path / "pred"
    dead = _dead_pid()
    _lock(out, dead)
    (out / "masks").mkdir()
    (out / "masks" / ".a_mask.99999.0123456789ab.png").write_text("half")  # SIGKILL leftover
    assert _predict(run_dir, _frames(tmp_path / "in", ["a.png"]), out, "--overwrite") == 0
    assert "took over the lock of a run that is no longer running" in caplog.text
    assert f"PID {dead}" in caplog.text
    assert "took over the lock" in (out / "prediction.log").read_text()
    assert not any(cli.is_temp_file(p) for p in out.rglob(".*"))
    assert not (out / cli.LOCK_NAME).exists()


# --------------------------------------------------------------------------- 2, 4, 5: predict


def test_two_inputs_with_one_stem_exit_1_before_any_work(tmp_path, run_dir, caplog):
    inp = _frames(tmp_path / "in", ["frame.png", "frame.tif", "other.png"])
    out = tmp_path / "pred"
    assert _predict(run_dir, inp, out) == 1
    assert "frame.png" in caplog.text and "frame.tif" in caplog.text
    assert "one stem 'frame'" in caplog.text
    assert not out.exists()


@pytest.mark.parametrize("suffix,what", [(".hdf5", "not an HDF5 file"),
                                         (".keras", "not a .keras (zip) archive")])
def test_corrupt_model_exit_2_named_in_the_log(tmp_path, suffix, what, caplog):
    run = tmp_path / "run"
    run.mkdir()
    model = run / f"best_unet_model{suffix}"
    model.write_bytes(b"\x00garbage, a truncated copy" * 40)
    (run / "config.json").write_text(json.dumps(_config()))
    out = tmp_path / "pred"
    assert pm.main(["--model", str(model), "--input_dir",
                    str(_frames(tmp_path / "in", ["a.png"])), "--output_dir", str(out)]) == 2
    text = (out / "prediction.log").read_text()
    assert f"{model}: corrupt model file: {what}" in text and "File not found" not in text


def test_export_corrupt_model_exit_2_named_in_the_log(tmp_path):
    from test_export_model import _write_run

    import export_model as em

    run, tile = _write_run(tmp_path)
    model = run / "best_unet_model.hdf5"
    model.write_bytes(b"not hdf5")
    out = tmp_path / "pkg"
    assert em.main(["--model", str(model), "--output_dir", str(out), "--no_saved_model"]) == 2
    assert f"{model}: corrupt model file: not an HDF5 file" in (out / em.LOG_NAME).read_text()


def test_export_prints_each_line_once(tmp_path, monkeypatch, capfd):
    from test_export_model import _write_run

    import export_model as em

    def saved_model(model, path, **_):  # TensorFlow's exporter logs through the root logger
        logging.info("exported a SavedModel")
        return "faked in this test"

    run, tile = _write_run(tmp_path)
    monkeypatch.setattr(em, "export_saved_model", saved_model)
    monkeypatch.setattr(em, "validate_package", lambda path: None)  # not this test's subject
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain `python export_model.py`
    assert em.main(["--model", str(run), "--output_dir", str(tmp_path / "pkg"),
                    "--halo", "8", "--test_size", "64", "--no_onnx", "--no_client_test"]) == 0
    err = capfd.readouterr().err
    assert err.count("no TensorFlow SavedModel in the package") == 1, err
    assert err.count("done: ") == 1, err


@pytest.mark.parametrize("flag,value", [("--threshold", "2"), ("--threshold", "-1"),
                                        ("--threshold", "0"), ("--tile_size", "0"),
                                        ("--batch_size", "0"), ("--overlap", "-8")])
def test_predict_values_out_of_range_exit_2_at_parse_time(tmp_path, flag, value, capsys):
    out = tmp_path / "pred"
    with pytest.raises(SystemExit) as exc:
        pm.main(["--model", "m.hdf5", "--input_dir", str(tmp_path), "--output_dir", str(out),
                 flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err
    assert not out.exists()


def test_tile_size_not_a_multiple_of_the_pad_is_an_error(tmp_path, run_dir, caplog):
    out = tmp_path / "pred"
    rc = pm.main(["--model", str(run_dir / "best_unet_model.hdf5"), "--input_dir",
                  str(_frames(tmp_path / "in", ["a.png"])), "--output_dir", str(out),
                  "--tile_size", "66"])
    assert rc == 2 and "--tile_size 66: must be a multiple of 4" in caplog.text
    assert not out.exists()


def test_ctrl_c_keeps_the_finished_frames(tmp_path, run_dir, monkeypatch, caplog):
    inp = _frames(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    real = prediction.make_keras_predict_fn
    calls = []

    def interrupting(model):
        fn = real(model)

        def wrapped(batch):
            calls.append(1)
            if len(calls) == 3:  # one 64-px tile per frame: the third frame
                raise KeyboardInterrupt
            return fn(batch)
        return wrapped

    monkeypatch.setattr(prediction, "make_keras_predict_fn", interrupting)
    out = tmp_path / "pred"
    try:
        rc = _predict(run_dir, inp, out)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert rc == pm.EXIT_INTERRUPTED == 130
    assert "interrupted after 2 of 4 frames" in (out / "prediction.log").read_text()
    with open(out / "prediction_summary.csv", newline="") as fh:
        assert [r["file"] for r in csv.DictReader(fh)] == ["a.png", "b.png"]
    assert "INTERRUPTED" in (out / "prediction_summary.txt").read_text()
    assert json.loads((out / cli.MANIFEST_NAME).read_text())["complete"]
    assert not (out / cli.LOCK_NAME).exists()


def test_a_3x3_image_is_too_small_not_ok_with_zero_beads(tmp_path):
    inp = _frames(tmp_path / "in", ["big.png"])
    _frames(inp, ["tiny.png"], (3, 3))
    out = tmp_path / "o"
    for sub in ("masks", "labels"):
        (out / sub).mkdir(parents=True)
    rows = prediction_pipeline.predict_files(sorted(inp.iterdir()), lambda b: b[..., 0],
                                             _config(), out, tile_size=64, overlap=16,
                                             batch_size=1, figures=False)
    status = {r["file"]: r["status"] for r in rows}
    assert status["big.png"] == "ok"
    assert "tiny.png: too small to analyse: 3x3 px" in status["tiny.png"]


# --------------------------------------------------------------------------- 6. sample sheets


def _assay_inputs(tmp_path, sheet_rows):
    from test_quantify_assay import pm_series, write_csv, write_summary

    pred = write_summary(tmp_path / "pred", pm_series())
    sheet = write_csv(tmp_path / "samples.csv", ["file", "concentration", "unit"], sheet_rows)
    return pred, sheet


def test_sheet_rows_matching_nothing_are_named_exit_1(tmp_path, caplog):
    import quantify_assay as qa

    rows = [[f"{c}pM_r{k}.png", str(c), "pM"] for c in (0, 1, 2, 4, 8) for k in range(3)]
    pred, sheet = _assay_inputs(tmp_path, rows + [["16pM_r0.png", "16", "pM"],
                                                  ["plate9_*", "32", "pM"]])
    out = tmp_path / "assay"
    assert qa.main(["--predictions", str(pred), "--samples", str(sheet), "--output_dir",
                    str(out), "--n_boot", "0"]) == 1
    report = (out / qa.REPORT_NAME).read_text()
    for text in ("line 17: '16pM_r0.png' not found", "line 18: 'plate9_*' matches no file"):
        assert text in caplog.text and text in report
        assert text in (out / qa.LOG_NAME).read_text()


def test_one_file_twice_with_different_concentrations_exit_2(tmp_path, caplog):
    import quantify_assay as qa

    rows = [[f"{c}pM_r{k}.png", str(c), "pM"] for c in (0, 1, 2, 4, 8) for k in range(3)]
    pred, sheet = _assay_inputs(tmp_path, rows + [["1pM_r0.tif", "3", "pM"]])
    assert qa.main(["--predictions", str(pred), "--samples", str(sheet), "--output_dir",
                    str(tmp_path / "assay"), "--n_boot", "0"]) == 2
    assert "'1pM_r0.tif' is listed twice with different concentrations" in caplog.text
    assert "line 5" in caplog.text and "line 17" in caplog.text


# --------------------------------------------------------------------------- 5, 8. trainer


def _dataset(root, names, size=32):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        stem, ext = os.path.splitext(name)
        mio.write_image(root / "images" / name, (rng.random((size, size)) * 255).astype(np.uint8))
        mask = np.zeros((size, size), np.uint8)
        mask[8:14, 8:14] = 1
        mio.write_mask(root / "masks" / f"{stem}_mask.png", mask)
    return root


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch_size", "0"),
                                        ("--lr", "-0.001"), ("--val_fraction", "1"),
                                        ("--threshold", "1.5")])
def test_train_values_out_of_range_exit_2_no_run_folder(tmp_path, flag, value, capsys):
    import train_microbead_optimized as tr

    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        tr.main(["--data_dir", str(_dataset(tmp_path / "d", ["a.png", "b.png"])),
                 "--output_dir", str(out), "--preset", "cpu", flag, value])
    assert exc.value.code == 2 and f"{flag} " in capsys.readouterr().err
    assert not out.exists()


def test_train_empty_images_folder_says_so_and_leaves_no_folder(tmp_path, caplog):
    import train_microbead_optimized as tr

    data = _dataset(tmp_path / "d", [])
    out = tmp_path / "runs"
    assert tr.main(["--data_dir", str(data), "--output_dir", str(out), "--preset", "cpu"]) == 2
    assert f"no images in {data / 'images'}" in caplog.text
    assert "pixel scale" not in caplog.text
    assert not out.exists()


def test_failed_training_run_leaves_no_empty_run_folder(tmp_path, caplog):
    import train_microbead_optimized as tr

    # Five folds of two images: found once the data is loaded, i.e. after the folder exists.
    data = _dataset(tmp_path / "d", ["a.png", "b.png"])
    out = tmp_path / "runs"
    assert tr.main(["--data_dir", str(data), "--output_dir", str(out), "--preset", "cpu",
                    "--pixel_scale", "1", "--kfold", "5"]) == 2
    assert "--kfold must be between 2 and the number of images" in caplog.text
    assert "removed: the run failed before writing anything but its log" in caplog.text
    assert not out.exists()  # neither the run folder nor the --output_dir it made


def test_train_duplicate_stems_say_which_file_is_used(tmp_path, caplog):
    import train_microbead_optimized as tr
    import training_data

    data = _dataset(tmp_path / "d", ["a.png", "b.png", "c.png"])
    mio.write_image(data / "images" / "a.tif", np.full((32, 32), 9, np.uint8))
    args = tr.parse_args(["--data_dir", str(data), "--preset", "cpu", "--pixel_scale", "1",
                          "--normalization", "percentile", "--patch_size", "0"])
    loaded = training_data.load_training_data(args)
    assert [f for f in loaded["files"] if f.startswith("a.")] == ["a.png"]  # the pair used
    assert not [r for r in caplog.records if r.getMessage().startswith("skipped: a:")]
    assert f"skipped: {data / 'images' / 'a.tif'}: same stem as " \
           f"{data / 'images' / 'a.png'}, which is used" in caplog.text


# --------------------------------------------------------------------------- 8. listing


def test_entries_named_like_images_that_are_not_files_are_named(tmp_path, caplog):
    d = _frames(tmp_path / "in", ["a.png"])
    (d / "x.png").mkdir()
    (d / "gone.tif").symlink_to(tmp_path / "missing.tif")
    (d / "loop.png").symlink_to(d / "loop.png")
    assert [p.name for p in mio.list_images(d)] == ["a.png"]
    assert f"{d / 'x.png'}: skipped: a folder" in caplog.text
    assert f"{d / 'gone.tif'}: skipped: broken symbolic link" in caplog.text
    assert f"{d / 'loop.png'}: skipped: symbolic link loop" in caplog.text

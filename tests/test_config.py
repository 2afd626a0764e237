"""microbead_config: the config.json schema, option keys, history reader and run state."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

import microbead_config as mcfg


def _v2(tmp_path) -> dict:
    """A format 2 config as the trainer writes it (values of the right kinds)."""
    return {
        "format_version": 2,
        "models": {"unet": {"architecture": "unet", "filters": 4, "depth": 2, "dropout": 0.3,
                            "batch_norm": True}},
        "preprocessing": {
            "channels": 1, "input_size": [64, 64], "stored_tile_size": [512, 512],
            "pixel_scale": 1.0, "pixel_scale_source": "--pixel_scale", "scale": 0.125,
            "scale_source": "pixel_scale x input size / stored tile size",
            "channel_mode": "luminance (ITU-R BT.601 of RGB)",
            "normalization": {"method": "flatfield", "window": 41, "low": 0.4, "high": 1.05},
            "pad_multiple": 4,
        },
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 3.5,
                           "median_bead_area_native_px": 224.0},
        "training": {**mcfg.TRAINING_DEFAULTS, "models": ["unet"], "preset": None,
                     "config": None, "run_dir_file": None, "steps_per_epoch_used": 50,
                     "bn_momentum_used": 0.9},
        "data": {"data_dir": str(tmp_path), "n_images": 12, "skipped": [],
                 "mean_objects_per_image": 9.5, "positive_ratio": 0.1,
                 "label_consistency_ceiling": None},
        "environment": {"python": "3.11", "git_commit": None, "anything": "free-form"},
    }


def _v1() -> dict:
    """A format 1 file: written before pixel_scale_source / scale_source / channel_mode."""
    return {
        "format_version": 1,
        "models": {"unet": {"architecture": "unet"}},
        "preprocessing": {"channels": 1, "input_size": [64, 64], "stored_tile_size": [64, 64],
                          "pixel_scale": 0.5, "scale": 0.5, "pad_multiple": 4,
                          "normalization": {"method": "percentile", "low": 1.0,
                                            "high": 99.8}},
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 69.0},
    }


def test_v2_round_trip_through_save_and_read(tmp_path):
    cfg = _v2(tmp_path)
    cfg["postprocessing"]["median_bead_area_px"] = np.float64(3.5)  # numpy from the trainer
    path = tmp_path / "config.json"
    mcfg.save_run_config(path, cfg)
    back = mcfg.read_run_config(path)
    assert back == json.loads(path.read_text())
    assert list(back) == list(mcfg.SECTIONS)  # file order
    assert back["postprocessing"]["median_bead_area_px"] == 3.5
    assert back["preprocessing"] == cfg["preprocessing"]
    assert back["environment"]["anything"] == "free-form"
    assert not list(tmp_path.glob(".config*"))  # atomic: no temporary file left


def test_format_1_loads_without_provenance_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_v1()))
    back = mcfg.read_run_config(path)
    assert back == _v1()  # nothing invented for the keys it lacks
    assert "pixel_scale_source" not in back["preprocessing"]


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["preprocessing"].update(flip=True), "'preprocessing.flip'"),
    (lambda c: c["postprocessing"].update(min_size=3), "'postprocessing.min_size'"),
    (lambda c: c["training"].update(learning_rate=1e-3), "'training.learning_rate'"),
    (lambda c: c["models"]["unet"].update(kernel=5), "'models.unet.kernel'"),
    (lambda c: c["data"].update(extra=1), "'data.extra'"),
    (lambda c: c.update(postprocess={}), "'postprocess'"),
])
def test_unknown_key_is_an_error_naming_key_and_file(tmp_path, edit, key):
    cfg = _v2(tmp_path)
    edit(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(mcfg.ConfigError) as exc:
        mcfg.read_run_config(path)
    assert key in str(exc.value) and str(path) in str(exc.value)
    assert "unknown" in str(exc.value)


def test_missing_required_key_is_an_error_by_format(tmp_path):
    path = tmp_path / "config.json"
    v2 = _v2(tmp_path)
    del v2["preprocessing"]["pixel_scale_source"]  # required from format 2 on
    del v2["training"]["seed"]
    path.write_text(json.dumps(v2))
    with pytest.raises(mcfg.ConfigError) as exc:
        mcfg.read_run_config(path)
    msg = str(exc.value)
    assert "missing key 'preprocessing.pixel_scale_source'" in msg
    assert "missing key 'training.seed'" in msg and str(path) in msg
    v1 = _v1()
    del v1["preprocessing"]["scale"]  # what prediction needs is required of format 1 too
    path.write_text(json.dumps(v1))
    with pytest.raises(mcfg.ConfigError, match=r"missing key 'preprocessing.scale'"):
        mcfg.read_run_config(path)


def test_bad_values_and_versions(tmp_path):
    path = tmp_path / "config.json"
    for version in (3, None, True):
        cfg = {**_v1(), "format_version": version}
        path.write_text(json.dumps(cfg))
        with pytest.raises(mcfg.ConfigError, match="format_version"):
            mcfg.read_run_config(path)
    cfg = _v2(tmp_path)
    cfg["preprocessing"]["scale"] = 0
    cfg["postprocessing"]["threshold"] = 1.5
    with pytest.raises(mcfg.ConfigError) as exc:
        mcfg.save_run_config(path, cfg)  # validated before anything is written
    assert "preprocessing.scale = 0" in str(exc.value)
    assert "postprocessing.threshold = 1.5" in str(exc.value)
    path.write_text("{not json")
    with pytest.raises(mcfg.ConfigError, match="cannot read config"):
        mcfg.read_run_config(path)


def test_option_keys_and_what_a_config_file_may_set(tmp_path):
    assert mcfg.CONFIG_FILE_KEYS < mcfg.OPTION_KEYS <= mcfg.TRAINING_KEYS
    assert {"verbose", "logical_cpus"}.isdisjoint(mcfg.CONFIG_FILE_KEYS)
    for preset in mcfg.TRAINING_PRESETS.values():
        assert set(preset) <= mcfg.CONFIG_FILE_KEYS
    path = tmp_path / "opts.json"
    path.write_text(json.dumps({"filters": 8, "verbose": 1}))
    with pytest.raises(mcfg.ConfigError) as exc:
        mcfg.read_options(path)
    assert "'verbose'" in str(exc.value) and str(path) in str(exc.value)


# --------------------------------------------------------------------------- history


def _write_csv(path, header, rows):
    path.write_text("".join(",".join(map(str, r)) + "\n" for r in [header, *rows]))
    return path


def test_history_reader_both_formats_and_resumed_rows(tmp_path):
    trainer = _write_csv(tmp_path / "unet_history.csv", mcfg.HISTORY_COLUMNS, [
        [1, 0.9, 0.1, 0.2, 1.0, 0.05, 0.1, 1e-3, 2.0, 0.1, 0.1],
        [2, 0.8, 0.2, 0.3, 0.9, 0.15, 0.2, 1e-3, 2.0, "", 0.1],
        [2, 0.7, 0.3, 0.4, 0.8, 0.25, 0.3, 1e-3, 2.0, 0.1, 0.1],  # resumed: epoch 2 again
    ])
    rows = mcfg.read_history(trainer)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == 0.7  # the last row of a repeated epoch wins
    assert rows[0]["val_pred_fg"] == 0.1
    keras_log = _write_csv(tmp_path / "unet_log.csv",
                           [" epoch", "loss", "jaccard_coef", "val_loss", "val_jaccard_coef",
                            "lr"], [[0, 0.9, 0.1, 1.0, 0.05, 1e-3], [1, 0.8, 0.2, 0.9, "", 1e-3]])
    old = mcfg.read_history(keras_log, strict=True)
    assert [r["epoch"] for r in old] == [1, 2]  # CSVLogger counts from 0
    assert old[0]["learning_rate"] == 1e-3 and old[0]["val_jacard_coef"] == 0.05
    assert math.isnan(old[1]["val_jacard_coef"])


def test_history_reader_missing_and_broken_files(tmp_path):
    assert mcfg.read_history(tmp_path / "absent.csv") == []  # resuming: no epoch yet
    with pytest.raises(mcfg.HistoryError, match="absent.csv: not found"):
        mcfg.read_history(tmp_path / "absent.csv", strict=True)
    (tmp_path / "empty.csv").write_text("")
    assert mcfg.read_history(tmp_path / "empty.csv") == []
    with pytest.raises(mcfg.HistoryError, match="empty.csv: empty file"):
        mcfg.read_history(tmp_path / "empty.csv", strict=True)
    header = _write_csv(tmp_path / "header.csv", mcfg.HISTORY_COLUMNS, [])
    with pytest.raises(mcfg.HistoryError, match=r"header.csv: no epochs \(header only\)"):
        mcfg.read_history(header, strict=True)
    short = _write_csv(tmp_path / "short.csv", ["epoch", "loss"], [[1, 0.5]])
    with pytest.raises(mcfg.HistoryError, match="short.csv: missing column"):
        mcfg.read_history(short, strict=True)
    bad = _write_csv(tmp_path / "bad.csv", ["epoch", "loss"], [["x", 0.5]])
    with pytest.raises(mcfg.HistoryError, match="bad.csv: non-numeric values in the epoch"):
        mcfg.read_history(bad)


# --------------------------------------------------------------------------- run state


def _summary(folder, models, fold=None):
    folder.mkdir(parents=True, exist_ok=True)
    cols = (["fold"] if fold is not None else []) + ["model", "best_epoch", "best_val_jacard"]
    rows = [([fold] if fold is not None else []) + [m, 1, 0.2] for m in models]
    _write_csv(folder / mcfg.SUMMARY_FILE, cols, rows)


def test_finished_needs_the_summary_row_and_the_final_weights(tmp_path):
    _summary(tmp_path, ["unet", "attention_unet"])
    (tmp_path / mcfg.final_model_file("unet")).write_bytes(b"")
    assert set(mcfg.finished_models(tmp_path)) == {"unet"}
    (tmp_path / mcfg.final_model_file("attention_resunet")).write_bytes(b"")  # no row
    assert set(mcfg.finished_models(tmp_path)) == {"unet"}


def test_run_state_kfold(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert mcfg.run_state(run) == "missing"
    (run / mcfg.CONFIG_FILE).write_text(json.dumps(
        {"training": {"models": "unet,attention_unet", "kfold": 2}}))
    assert mcfg.run_state(run) == "unfinished"
    for k in (1, 2):
        fold = mcfg.fold_dir(run, k)
        _summary(fold, ["unet", "attention_unet"])
        for m in ("unet", "attention_unet"):
            (fold / mcfg.final_model_file(m)).write_bytes(b"")
    # Every fold done, but the run's own summary (written last) is not: resume finishes it.
    assert mcfg.run_state(run) == "unfinished"
    _write_csv(run / mcfg.SUMMARY_FILE, ["fold", "model", "best_epoch", "best_val_jacard"],
               [[k, m, 1, 0.2] for k in (1, 2) for m in ("unet", "attention_unet")])
    assert mcfg.run_state(run) == "finished"
    (mcfg.fold_dir(run, 2) / mcfg.final_model_file("unet")).unlink()
    assert mcfg.run_state(run) == "unfinished"


def test_comparison_only_with_a_run_the_user_names():
    row = {"model": "unet", "best_val_jacard": "0.2854", "best_epoch": "3",
           "label_ceiling": "0.71"}
    (line,) = mcfg.comparison_lines([row])
    assert "best val Jaccard 0.2854 (epoch 3)" in line and "ceiling 0.710" in line
    assert "0.1427" not in line and "previous" not in line
    (line,) = mcfg.comparison_lines([row], {"unet": 0.25}, "run_a")
    assert "run_a: 0.2500 (+0.0354)" in line


def test_fit_warnings_val_above_training_or_above_the_label_ceiling():
    assert mcfg.fit_warnings("unet", 0.80, 0.75, 0.78) == []
    (msg,) = mcfg.fit_warnings("unet", 0.82, 0.61, None, n_val=7)
    assert "0.21 above training (0.610)" in msg and "7 validation" in msg
    (msg,) = mcfg.fit_warnings("unet", 0.82, None, 0.478, val_frames=["10240x_a"])
    assert "above the label-consistency ceiling 0.478" in msg
    assert "validation frame(s): 10240x_a" in msg


def test_config_module_imports_nothing_heavy():
    # hpc_tools runs it with the container's bare Python: standard library only at import.
    import subprocess
    import sys

    code = ("import sys, microbead_config; "
            "print(sorted(m for m in ('numpy', 'cv2', 'tensorflow', 'keras') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("pathlib").Path(mcfg.__file__).parent))
    assert out.stdout.strip() == "[]"


def test_copies_keep_absent_keys_absent():
    # A copied (or pickled, for worker processes) format 1 config stays format 1.
    import pickle

    cfg = mcfg.RunConfig.from_dict(_v1())
    assert copy.deepcopy(cfg).to_dict() == _v1()
    assert pickle.loads(pickle.dumps(cfg)).to_dict() == _v1()

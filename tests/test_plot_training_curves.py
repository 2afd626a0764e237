"""Tests for plot_training_curves.py (and training_history, training_plots, training_report)
on small handmade histories with known statistics."""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import plot_training_curves as ptc  # the command line: main, default_output_dir
import training_history as th
import training_plots as tp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = (th.FIG_CURVES, th.FIG_PERFORMANCE, th.FIG_DETAILED, th.FIG_LR)

# --- handmade histories ----------------------------------------------------------------
# unet: best 0.60 at epoch 7; epoch 11 (0.05) < 0.10 * 0.60 after the best -> collapsed.
UNET = {
    "loss": [0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40, 0.35],
    "jacard_coef": [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90],
    "dice_coef": [0.18, 0.33, 0.46, 0.57, 0.67, 0.75, 0.79, 0.82, 0.86, 0.89, 0.92, 0.95],
    "val_loss": [1.00, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.45, 0.50, 0.55, 0.90, 0.95],
    "val_jacard_coef": [0.05, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.55, 0.50, 0.45, 0.05, 0.04],
    "val_dice_coef": [0.10, 0.18, 0.33, 0.46, 0.57, 0.67, 0.75, 0.71, 0.67, 0.62, 0.10, 0.08],
    "lr": [1e-3] * 6 + [5e-4] * 6,
}
# attention_unet: 0.70 at epochs 5 and 9 (tie -> epoch 5); 0.01 at epoch 1 is below 10 % of
# the best but BEFORE it -> not collapsed.
ATT = {
    "loss": [0.80, 0.70, 0.60, 0.50, 0.45, 0.40, 0.38, 0.36, 0.34, 0.32, 0.30, 0.28],
    "jacard_coef": [0.10, 0.30, 0.45, 0.60, 0.70, 0.72, 0.74, 0.75, 0.76, 0.78, 0.79, 0.80],
    "dice_coef": [0.18, 0.46, 0.62, 0.75, 0.82, 0.84, 0.85, 0.86, 0.86, 0.88, 0.88, 0.89],
    "val_loss": [0.95, 0.70, 0.55, 0.40, 0.30, 0.33, 0.36, 0.31, 0.30, 0.34, 0.35, 0.37],
    "val_jacard_coef": [0.01, 0.20, 0.40, 0.60, 0.70, 0.65, 0.60, 0.68, 0.70, 0.66, 0.64, 0.62],
    "val_dice_coef": [0.02, 0.33, 0.57, 0.75, 0.82, 0.79, 0.75, 0.81, 0.82, 0.80, 0.78, 0.77],
    "lr": [1e-3] * 12,
}
# attention_resunet: one epoch only -> sigma undefined (n/a).
ONE = {
    "loss": [0.90],
    "jacard_coef": [0.20],
    "dice_coef": [0.33],
    "val_loss": [0.95],
    "val_jacard_coef": [0.15],
    "val_dice_coef": [0.26],
    "lr": [1e-3],
}
HISTORIES = {"unet": UNET, "attention_unet": ATT, "attention_resunet": ONE}

# Expected statistics, by hand.
EXPECTED = {
    "unet": dict(best=0.60, epoch=7, final=0.04, gap=0.90 - 0.04, collapsed=True, n=12,
                 sigma=statistics.stdev(UNET["val_loss"][-10:])),
    "attention_unet": dict(best=0.70, epoch=5, final=0.62, gap=0.80 - 0.62, collapsed=False,
                           n=12, sigma=statistics.stdev(ATT["val_loss"][-10:])),
    "attention_resunet": dict(best=0.15, epoch=1, final=0.15, gap=0.20 - 0.15,
                              collapsed=False, n=1, sigma=None),
}


def write_new(folder: Path, model: str, data: dict) -> Path:
    """Trainer format: 1-based epoch, learning_rate, epoch_time_s, plus an extra column."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(data["loss"])
    frame = pd.DataFrame({"epoch": range(1, n + 1)})
    for key, values in data.items():
        frame["learning_rate" if key == "lr" else key] = values
    frame["epoch_time_s"] = 1.5
    frame["some_future_column"] = "x"
    path = folder / f"{model}_history.csv"
    frame.to_csv(path, index=False)
    return path


def write_old(folder: Path, filename: str, data: dict) -> Path:
    """Old Keras CSVLogger format: no epoch column, ``lr``, accuracy columns present."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(data["loss"])
    cols = ["loss", "accuracy", "jacard_coef", "dice_coef", "val_loss", "val_accuracy",
            "val_jacard_coef", "val_dice_coef", "lr"]
    frame = pd.DataFrame({c: data.get(c, [0.9] * n) for c in cols})
    path = folder / filename
    frame.to_csv(path, index=False)
    return path


def make_run(folder: Path, fmt: str) -> Path:
    for model, data in HISTORIES.items():
        if fmt == "new":
            write_new(folder, model, data)
        else:
            write_old(folder, f"{model}_log.csv" if model != "unet" else "unet_history.csv",
                      data)
    return folder


def assert_figures(out: Path, names=FIGURES) -> None:
    for name in names:
        path = out / name
        assert path.is_file(), name
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name


def assert_clean_report(text: str) -> None:
    assert "{" not in text and "}" not in text
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)
    assert not re.search(r"\bNone\b", text)


# --- reading --------------------------------------------------------------------------


def test_both_formats_normalise_to_same_frame(tmp_path):
    new = th.read_history(write_new(tmp_path / "a", "unet", UNET))
    old = th.read_history(write_old(tmp_path / "b", "unet_log.csv", UNET))
    assert list(new.columns[: len(th.HISTORY_COLUMNS)]) == list(th.HISTORY_COLUMNS)
    assert list(old["epoch"]) == list(range(1, 13))
    core = [c for c in th.HISTORY_COLUMNS if c != "epoch_time_s"]
    pd.testing.assert_frame_equal(new[core], old[core])
    assert old["learning_rate"].iloc[-1] == pytest.approx(5e-4)
    assert old["epoch_time_s"].isna().all() and (new["epoch_time_s"] == 1.5).all()
    assert "some_future_column" not in new.columns


def test_zero_based_epoch_and_duplicate_epochs():
    raw = pd.DataFrame({"epoch": [0, 1, 2, 2], "loss": [1, 2, 3, 4], "jacard_coef": [0] * 4,
                        "val_loss": [1] * 4, "val_jacard_coef": [0.1, 0.2, 0.3, 0.4]})
    frame = th.normalize_history_frame(raw)
    assert list(frame["epoch"]) == [1, 2, 3]
    assert frame["loss"].iloc[-1] == 4  # resumed run: the last row of an epoch wins


def test_history_discovery_and_model_names(tmp_path):
    run = tmp_path / "run"
    write_old(run, "unet_log.csv", UNET)
    write_old(run, "my_model.csv", ATT)
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(run / "notes.csv", index=False)
    pd.DataFrame({"model": ["unet"], "best_val_jacard": [0.6]}).to_csv(
        run / "training_summary.csv", index=False)
    names = [p.name for p in th.find_history_files(run)]
    assert names == ["my_model.csv", "unet_log.csv"]
    assert th.model_name_from_path("x/attention_resunet_history.csv") == "attention_resunet"
    histories, errors = th.load_histories([run])
    assert errors == []
    assert [h.model for h in histories] == ["unet", "my_model"]  # known models first


def test_natural_fold_order(tmp_path):
    for name in ("fold_10", "fold_2", "fold_1"):
        write_new(tmp_path / "kf" / name, "unet", ONE)
    labels = [label for label, _, _ in th.discover_runs(tmp_path / "kf")]
    assert labels == ["kf/fold_1", "kf/fold_2", "kf/fold_10"]


def test_model_colors_are_fixed_for_known_and_stable_for_unknown():
    a = tp.model_colors(["zeta", "unet", "alpha"])
    b = tp.model_colors(["alpha", "zeta", "attention_unet", "unet"])
    assert a["unet"] == b["unet"] == tp.MODEL_COLORS["unet"]
    assert a["alpha"] == b["alpha"] == tp.FALLBACK_PALETTE[0]
    assert a["zeta"] == b["zeta"] == tp.FALLBACK_PALETTE[1]


# --- statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["new", "old"])
def test_statistics_known_exactly(tmp_path, fmt):
    run = make_run(tmp_path / "run", fmt)
    histories, errors = th.load_histories([run])
    assert errors == []
    stats = th.statistics_table(histories).set_index("model")
    assert set(stats.index) == set(EXPECTED)
    for model, exp in EXPECTED.items():
        row = stats.loc[model]
        assert row["best_val_jacard"] == pytest.approx(exp["best"])
        assert row["best_epoch"] == exp["epoch"]
        assert row["final_val_jacard"] == pytest.approx(exp["final"])
        assert row["train_val_gap"] == pytest.approx(exp["gap"])
        assert bool(row["collapsed"]) is exp["collapsed"]
        assert row["epochs_run"] == exp["n"]
        if exp["sigma"] is None:
            assert pd.isna(row["val_loss_sigma_last10"])
        else:
            assert row["val_loss_sigma_last10"] == pytest.approx(exp["sigma"], rel=1e-12)


def test_sigma_uses_whole_history_when_shorter_than_window():
    data = {k: v[:4] for k, v in UNET.items()}
    raw = pd.DataFrame(data)
    stats = th.summarize_history(th.normalize_history_frame(raw))
    assert stats["val_loss_sigma_last10"] == pytest.approx(statistics.stdev(UNET["val_loss"][:4]))


# --- end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["new", "old"])
def test_single_run_outputs_and_report(tmp_path, fmt):
    run = make_run(tmp_path / "microbead_training_20240101_120000", fmt)
    assert ptc.main([str(run), "--dpi", "40"]) == 0
    out = run / "training_analysis"
    assert_figures(out)
    assert not (out / th.FIG_RUNS).exists()
    assert (out / th.LOG_FILE).stat().st_size > 0

    stats = pd.read_csv(out / th.TABLE_STATS).set_index("model")
    assert stats.loc["unet", "best_epoch"] == 7
    assert bool(stats.loc["unet", "collapsed"]) is True
    assert stats.loc["attention_unet", "train_val_gap"] == pytest.approx(0.18)

    epochs = pd.read_csv(out / th.TABLE_EPOCHS)
    assert list(epochs["epoch"]) == list(range(1, 13))
    assert epochs["unet_val_jacard_coef"].tolist() == pytest.approx(UNET["val_jacard_coef"])
    # attention_resunet ran one epoch: later epochs are empty, not zero.
    assert epochs["attention_resunet_val_loss"].isna().sum() == 11

    text = (out / th.REPORT).read_text(encoding="utf-8")
    assert_clean_report(text)
    assert "unet: 0.600 (epoch 7)" in text
    assert "attention_unet: 0.700 (epoch 5)" in text
    # Only the user's own numbers: no predecessor's run, no project target.
    for foreign in ("0.1427", "previous", "target"):
        assert foreign not in text
    assert "COLLAPSE: " in text and text.count("COLLAPSE: ") == 1
    assert f"{EXPECTED['unet']['sigma']:.4f}" in text
    assert "n/a" in text  # sigma of the 1-epoch model
    for name in FIGURES:
        assert f"]({name})" in text


class _FrozenDatetime:
    """Stands in for the datetime module so the default folder name is known."""

    class datetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 1, 10, 15, 0)


def test_several_runs_side_by_side_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = make_run(tmp_path / "before", "old")
    after = make_run(tmp_path / "after", "new")
    taken = tmp_path / "training_comparison_20240501_101500"
    taken.mkdir()
    monkeypatch.setattr(ptc, "_dt", _FrozenDatetime)
    assert ptc.main([str(before), str(after), "--dpi", "40"]) == 0
    assert list(taken.iterdir()) == []  # the existing comparison folder is left alone
    out = tmp_path / "training_comparison_20240501_101500_2"
    assert_figures(out, FIGURES + (th.FIG_RUNS,))
    stats = pd.read_csv(out / th.TABLE_STATS)
    assert sorted(stats["run"].unique()) == ["after", "before"]
    assert len(stats) == 6
    epochs = pd.read_csv(out / th.TABLE_EPOCHS)
    assert epochs["before/unet_val_jacard_coef"].tolist() == pytest.approx(
        epochs["after/unet_val_jacard_coef"].tolist())
    text = (out / th.REPORT).read_text(encoding="utf-8")
    assert_clean_report(text)
    assert "before · unet: 0.600 (epoch 7)" in text and "after · unet: 0.600" in text
    old_run = stats[stats["run"] == "before"].set_index("model")
    assert old_run.loc["attention_unet", "best_epoch"] == 5
    assert old_run.loc["attention_unet", "val_loss_sigma_last10"] == pytest.approx(
        EXPECTED["attention_unet"]["sigma"])


def test_default_output_dir_gets_suffix(tmp_path):
    now = dt.datetime(2024, 5, 1, 10, 15, 0)
    first = ptc.default_output_dir(["a", "b"], now=now, cwd=tmp_path)
    assert first.name == "training_comparison_20240501_101500"
    first.mkdir()
    assert ptc.default_output_dir(["a", "b"], now=now, cwd=tmp_path).name == first.name + "_2"
    assert ptc.default_output_dir([tmp_path / "r"]) == tmp_path / "r" / "training_analysis"


def test_kfold_runs_and_mean_sd(tmp_path):
    kf = tmp_path / "kf_run"
    for i, best in enumerate((0.5, 0.6, 0.7), start=1):
        data = {k: v[:4] for k, v in ATT.items()}
        data["val_jacard_coef"] = [0.1, best, 0.3, 0.2]
        write_new(kf / f"fold_{i:02d}", "unet", data)
        write_new(kf / f"fold_{i:02d}", "attention_unet", data)
    out = tmp_path / "analysis"
    assert ptc.main([str(kf), "--output-dir", str(out), "--dpi", "40"]) == 0
    assert_figures(out, FIGURES + (th.FIG_RUNS,))
    stats = pd.read_csv(out / th.TABLE_STATS)
    folds = stats[stats["n_folds"].isna()]
    assert sorted(folds["run"].unique()) == ["kf_run/fold_01", "kf_run/fold_02",
                                             "kf_run/fold_03"]
    agg = stats[stats["run"] == "kf_run/all_folds"].set_index("model")
    assert sorted(agg.index) == ["attention_unet", "unet"]
    assert agg.loc["unet", "best_val_jacard"] == pytest.approx(0.6)
    assert agg.loc["unet", "best_val_jacard_sd"] == pytest.approx(statistics.stdev([.5, .6, .7]))
    assert agg.loc["unet", "n_folds"] == 3
    text = (out / th.REPORT).read_text(encoding="utf-8")
    assert_clean_report(text)
    assert "kf_run/all_folds · unet: 0.600 ± 0.100 over 3 folds" in text


# --- bad input ------------------------------------------------------------------------


def test_bad_history_named_and_others_processed(tmp_path, caplog):
    run = tmp_path / "run"
    write_new(run, "unet", UNET)
    (run / "attention_unet_history.csv").write_text("")
    (run / "attention_resunet_history.csv").write_text("epoch,loss\n1,0.5\n")
    missing = tmp_path / "does_not_exist"
    out = tmp_path / "out"
    # Exit 1: some inputs failed (each named), the others are still processed.
    assert ptc.main([str(run), str(missing), "--output_dir", str(out), "--dpi", "40"]) == 1
    assert_figures(out)
    for bad in ("attention_unet_history.csv", "attention_resunet_history.csv", "does_not_exist"):
        assert bad in caplog.text
    assert "missing column(s) jacard_coef, val_loss, val_jacard_coef" in caplog.text
    stats = pd.read_csv(out / th.TABLE_STATS)
    assert stats["model"].tolist() == ["unet"]
    text = (out / th.REPORT).read_text(encoding="utf-8")
    assert_clean_report(text)
    assert "skipped: " in text and "attention_unet_history.csv: empty file" in text


def test_nothing_plottable_exits_nonzero(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "unet_history.csv").write_text("epoch,loss,jacard_coef,val_loss,val_jacard_coef\n")
    assert ptc.main([str(run)]) == 2
    assert "unet_history.csv: no epochs" in caplog.text
    # Nothing but the log, which holds the fatal message too.
    out = run / "training_analysis"
    assert [p.name for p in out.iterdir()] == [th.LOG_FILE]
    assert "nothing to plot" in (out / th.LOG_FILE).read_text()
    binary = tmp_path / "binary_run"
    binary.mkdir()
    (binary / "unet_history.csv").write_bytes(PNG_MAGIC + bytes([0, 255, 254, 0]))
    assert ptc.main([str(binary)]) == 2
    assert "binary_run/unet_history.csv: cannot read CSV" in caplog.text
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert ptc.main([str(empty)]) == 2
    assert "empty_run: no history CSV" in caplog.text


def test_trainer_summary_disagreement_is_flagged(tmp_path):
    run = tmp_path / "run"
    write_new(run, "unet", UNET)
    write_new(run, "attention_unet", ATT)
    pd.DataFrame({
        "model": ["unet", "attention_unet"],
        "best_epoch": [7, 9],  # attention_unet's first best is epoch 5
        "best_val_jacard": [0.6, 0.7],
        "final_val_jacard": [0.04, 0.62],
        "train_time": [1.0, 1.0],
        "params": [10, 10],
        "epochs_run": [12, 12],
    }).to_csv(run / th.TRAINER_SUMMARY, index=False)
    histories, _ = th.load_histories([run])
    messages = th.cross_check_trainer_summary(histories)
    assert len(messages) == 1
    assert "attention_unet best_epoch is 9 there but 5" in messages[0]
    assert th.TRAINER_SUMMARY in messages[0]


def test_runs_without_tensorflow():
    # A fresh interpreter: importing the script must not pull in TensorFlow or Keras.
    code = (
        "import sys, plot_training_curves, training_history, training_plots, training_report; "
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    root = Path(ptc.__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_compare_only_with_a_named_run_ceiling_and_fit_warnings(tmp_path):
    run = make_run(tmp_path / "run_b", "new")
    # Trainer summary with the data's label ceiling; unet's best val (0.60) is above it.
    pd.DataFrame({"model": ["unet"], "best_epoch": [7], "best_val_jacard": [0.60],
                  "epochs_run": [12], "label_ceiling": [0.478]}).to_csv(
        run / "training_summary.csv", index=False)
    other = tmp_path / "run_a"
    write_new(other, "unet", {**UNET, "val_jacard_coef": [0.1] * 11 + [0.55]})
    out = tmp_path / "out"
    assert ptc.main([str(run), "--compare", str(other), "--output_dir", str(out),
                     "--dpi", "40"]) == 0
    text = (out / th.REPORT).read_text(encoding="utf-8")
    assert "unet: 0.600 (epoch 7); run_a: 0.550 (+0.050)" in text
    assert "label-consistency ceiling of run_b's data: 0.478" in text
    assert "above the label-consistency ceiling 0.478" in text
    assert "- none" not in text
    assert "0.1427" not in text and "target" not in text


def test_validation_far_above_training_is_a_warning(tmp_path):
    run = tmp_path / "run"
    write_new(run, "unet", {**UNET, "jacard_coef": [0.3] * 12})  # val best 0.60 at epoch 7
    out = tmp_path / "out"
    assert ptc.main([str(run), "--output_dir", str(out), "--dpi", "40"]) == 0
    text = (out / th.REPORT).read_text(encoding="utf-8")
    assert "unet: validation Jaccard 0.600 is 0.30 above training (0.300)" in text


def test_report_names_the_validation_tiles_and_their_windows(tmp_path):
    run = make_run(tmp_path / "microbead_training_20240101_120000", "new")
    (run / "split.json").write_text(json.dumps({
        "mode": "tiles", "val": ["320x_a_grid_r3_c4.png", "10240x_b_grid_r3_c1.png"],
        "val_objects": [365, 3], "val_windows": [[0, 512, 40, 472], [0, 512, 37, 469]],
        "val_groups": ["320x_a", "10240x_b"]}))
    assert ptc.main([str(run), "--dpi", "40"]) == 0
    text = (run / "training_analysis" / th.REPORT).read_text(encoding="utf-8")
    assert "2 tile(s) from 2 frame(s), tiles from inside the frames" in text
    # Sparsest first, each with its objects and the window cut from it.
    assert text.index("10240x_b_grid_r3_c1.png: 3 objects, window rows 0-512, cols 37-469") \
        < text.index("320x_a_grid_r3_c4.png: 365 objects")


@pytest.mark.parametrize("value,digits,text", [
    (None, 3, "n/a"), (True, 3, "yes"), (False, 0, "no"), ("x", 3, "n/a"), ("", 3, "n/a"),
    (float("nan"), 3, "n/a"), (float("inf"), 0, "n/a"), (7, 3, "7.000"), (7, 0, "7"),
    (12.0, 0, "12"), (-0.0, 0, "0"), (0.5, 0, "0"), (1.5, 0, "2"), ("0.25", 2, "0.25"),
    (0.123456, 4, "0.1235"), (-0.0125, 3, "-0.013"),
])
def test_fmt_stat_keeps_the_report_format(value, digits, text):
    # The report's number format from before reporting.fmt: ints and numeric strings get
    # the decimals too, other text is n/a, digits=0 writes integer values whole.
    assert th.fmt_stat(value, digits) == text

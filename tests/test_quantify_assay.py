"""quantify_assay.py (concentration rules, CLI contract), assay_stats.py (count error, fits,
detection limits) and assay_report.py (warnings)."""

import csv
import json
import math

import numpy as np
import pytest

import assay_inputs
import assay_report as ar
import assay_stats as stats
import quantify_assay as qa

SUMMARY_FIELDS = ("file", "width", "height", "dilution", "beads", "n_components",
                  "coverage_pct", "mean_bead_area_px", "area_estimate", "time_s", "status",
                  "scale_warning")


def write_summary(folder, items):
    """``prediction_summary.csv`` in ``folder`` from ``(file, beads[, status])`` tuples
    (1000x1000 px images, so beads per megapixel = beads)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / assay_inputs.SUMMARY_NAME, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for name, beads, *status in items:
            w.writerow({"file": name, "width": 1000, "height": 1000, "dilution": "",
                        "beads": beads, "n_components": beads, "coverage_pct": 1.0,
                        "mean_bead_area_px": 50, "area_estimate": beads, "time_s": 0.1,
                        "status": status[0] if status else "ok", "scale_warning": ""})
    return folder


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def pm_series(seed=0, levels=(0, 1, 2, 4, 8), reps=3, a=3.0, b=25.0):
    """Poisson counts around ``a + b c`` beads per image, names ``<c>pM_r<k>.png``."""
    rng = np.random.default_rng(seed)
    return [(f"{c}pM_r{k}.png", int(rng.poisson(a + b * c))) for c in levels
            for k in range(reps)]


# --------------------------------------------------------------------------- concentrations


def test_concentration_from_file_names():
    c = assay_inputs.parse_concentration("160x_2025-05-16_12-00-00_101.png")
    assert (c.value, c.unit, c.blank) == (1 / 160, stats.DILUTION_UNIT, False)
    assert "160x" in c.rule
    c = assay_inputs.parse_concentration("1.5625pM_well3_r1.tif")
    assert (c.value, c.unit, c.blank) == (1.5625, "pM", False)
    c = assay_inputs.parse_concentration("0pM_chipA.tif")
    assert (c.value, c.unit, c.blank) == (0.0, "pM", True) and "blank" in c.rule
    assert assay_inputs.parse_concentration("2µM_x.png").unit == "uM"
    assert assay_inputs.parse_concentration("sample_7.png") is None
    assert assay_inputs.parse_concentration("0x_a.png") is None  # not a dilution


def test_sample_sheet_glob_exact_and_unmatched(tmp_path, caplog):
    sheet = write_csv(tmp_path / "samples.csv", ["file", "concentration", "unit", "replicate",
                                                  "blank"],
                      [["A1_*", "2", "pM", "A1", "false"],
                       ["A1_special.tif", "5", "pM", "", ""],  # exact beats the glob above
                       ["blank_*", "", "pM", "B", "true"],
                       ["C*", "8", "pM", "", ""]])
    rows = assay_inputs.read_sample_sheet(sheet)
    files = ["A1_f1.png", "A1_f2.png", "A1_special.png", "blank_1.png", "C3.png", "zzz.png"]
    assigned, unmatched = assay_inputs.assign_concentrations(files, rows, sheet_path=sheet)
    assert unmatched == ["zzz.png"]
    assert assigned["A1_f1.png"].value == 2 and assigned["A1_f2.png"].replicate == "A1"
    assert assigned["A1_special.png"].value == 5
    assert assigned["blank_1.png"].blank and assigned["blank_1.png"].value == 0
    assert "line 2" in assigned["A1_f1.png"].rule
    assert assay_inputs.check_units(assigned) == "pM"

    # Through main: the sheet is used, its replicate pools images, zzz.png is listed (exit 1).
    pred = write_summary(tmp_path / "pred", [(f, n) for f, n in zip(
        files + ["C4.png", "blank_2.png"], (40, 44, 120, 2, 200, 7, 210, 1))])
    out = tmp_path / "assay"
    assert qa.main(["--predictions", str(pred), "--samples", str(sheet), "--output_dir",
                    str(out), "--n_boot", "0"]) == 1
    res = json.loads((out / qa.RESULTS_NAME).read_text())
    assert res["unmatched"] == ["zzz.png"] and "zzz.png" in caplog.text
    low = next(s for s in res["per_sample"] if s["concentration"] == 2)
    assert (low["n_images"], low["n_replicates"], low["beads"]) == (2, 1, 84)
    with open(out / qa.PER_IMAGE_NAME) as fh:
        assert all("sample sheet line" in r["concentration_rule"] for r in csv.DictReader(fh))


# --------------------------------------------------------------------------- hand-checked


def test_ep17_limits_hand_computed_on_six_numbers():
    blank, low = [2.0, 4.0, 6.0], [10.0, 12.0, 14.0]  # means 4 and 12, both SDs 2
    r = stats.ep17_limits(blank, low)
    assert r["lob"] == pytest.approx(4 + 1.645 * 2)  # 7.29
    assert r["lod"] == pytest.approx(4 + 1.645 * 2 + 1.645 * 2)  # 10.58
    # The same six numbers as replicates (areas of 1): detection_limits finds them.
    x = np.array([0, 0, 0, 1, 1, 1, 2, 2, 4, 4], float)
    y = np.array(blank + low + [20, 21, 40, 41])
    reps = stats.Replicates(x, y, y.copy(), np.ones_like(x), np.zeros_like(x), x == 0,
                         np.ones(x.size, int), np.full(x.size, np.nan),
                         [str(i) for i in range(x.size)])
    d = stats.detection_limits(reps, "linear")
    assert d["lob"] == pytest.approx(7.29) and d["lod_density"] == pytest.approx(10.58)
    assert d["low_concentration"] == 1 and d["lod_method"] == "CLSI EP17"
    assert d["lod_conc_ep17"] == pytest.approx(float(d["fit"].invert(10.58)))


def test_ich_limits_hand_computed():
    # OLS through (0,0) (0,2) (1,2) (1,4): slope 2, residuals +-1, sigma = sqrt(4 / 2).
    r = stats.ich_limits([0, 0, 1, 1], [0, 2, 2, 4])
    assert r["slope"] == pytest.approx(2) and r["sigma"] == pytest.approx(math.sqrt(2))
    assert r["lod"] == pytest.approx(3.3 * math.sqrt(2) / 2)
    assert r["loq"] == pytest.approx(10 * math.sqrt(2) / 2)


def test_dispersion_test_hand_computed():
    chi2, df, p = stats.dispersion_test([10, 20], [1, 1])  # lambda 15: (25 + 25) / 15
    assert (chi2, df) == (pytest.approx(50 / 15), 1)
    assert p == pytest.approx(0.0679, abs=1e-3)
    assert stats.dispersion_test([10, 20], [1, 2])[0] == pytest.approx(0)  # same rate
    assert math.isnan(stats.dispersion_test([5], [1])[2])


def test_four_pl_recovers_noiseless_parameters():
    x = np.array([0, 0.5, 1, 2, 5, 10, 20, 50, 100, 500], float)
    a, b, c, d = 2.0, 1.5, 10.0, 100.0
    y = stats._f_4pl(x, (a, b, math.log10(c), d))
    fit = stats.fit_4pl(x, y, np.ones_like(x))
    assert fit.converged, fit.message
    got = {k: v["value"] for k, v in fit.params().items()}
    for k, v in {"a": a, "b": b, "c": c, "d": d}.items():
        assert got[k] == pytest.approx(v, rel=1e-3), k
    assert fit.r2 == pytest.approx(1.0)
    assert fit.invert(fit.predict([3.0, 40.0])) == pytest.approx([3.0, 40.0], rel=1e-6)
    # Too few concentrations: a failed fit that says why, not an exception.
    bad = stats.fit_4pl([1, 2, 3], [1, 2, 3], [1, 1, 1])
    assert not bad.converged and "4 distinct" in bad.message


def test_slope_ci_covers_the_true_slope_in_90_of_100_seeds():
    """Statistical: Poisson counts around 5 + 20 c beads per image (blanks and 5 levels,
    3 replicates): the weighted fit's own 95 % CI must hold the true slope >= 90 times."""
    conc = np.repeat([0, 1, 2, 4, 8, 16.0], 3)
    area = np.ones_like(conc)
    covered = 0
    for seed in range(100):
        counts = np.random.default_rng(seed).poisson(5 + 20 * conc)
        fit = stats.fit_calibration("linear", conc, counts / area, area)
        lo, hi = fit.params()["slope"]["ci95"]
        covered += lo <= 20 <= hi
    print(f"slope CI coverage {covered}/100")
    assert covered >= 90


# --------------------------------------------------------------------------- counting error


def test_count_error_model_bins_and_scaling():
    t = np.array([10] * 5 + [100] * 5)
    p = np.array([11, 9, 10, 12, 8, 90, 92, 88, 91, 89])  # bias 0 then -10 %
    m = stats.fit_count_error(t, p, np.full(10, 512 * 512), min_per_bin=5)
    assert m.bias == pytest.approx([0.0, -0.10])
    assert m.spread[0] == pytest.approx(np.std([0.1, -0.1, 0, 0.2, -0.2], ddof=1))
    bias, spread, extra = m.at(100, 512 * 512)  # dense bin, one tile: unscaled
    assert bias == pytest.approx(-0.1) and spread == pytest.approx(m.spread[1])
    assert not extra
    _, spread4, extra4 = m.at(4000, 4 * 512 * 512)  # 4 tiles: spread / 2; denser: flagged
    assert spread4 == pytest.approx(m.spread[1] / 2) and extra4
    assert stats.fit_count_error([0, 5], [1, 5], [1, 1]) is None  # one tile with beads
    assert stats.count_sd(0) == 1 and stats.count_sd(100, 0.1) == pytest.approx(math.sqrt(200))


def test_count_error_rows_of_the_predicting_model(tmp_path):
    run = tmp_path / "run"
    (run / "fold_01").mkdir(parents=True)
    write_csv(run / qa.TRAINING_SUMMARY_NAME, ["model", "fold", "best_val_jacard"],
              [["unet", "0", "0.7"], ["attention_unet", "1", "0.9"]])
    rows = [[m, f"t{i}", 50, 50 + (i % 3 - 1) * k, 512 * 512]
            for m, k in (("unet", 5), ("attention_unet", 1)) for i in range(10)]
    pred = tmp_path / "pred"
    pred.mkdir()
    # Missing file: a note naming it, no exception.
    model, note = qa.load_count_error(run, pred)
    assert model is None and "validation_counts.csv not found" in note
    header = ["model", "file", "n_true", "n_pred", "area_px"]
    write_csv(run / "fold_01" / qa.VALIDATION_COUNTS_NAME, header, rows)
    model, note = qa.load_count_error(run, pred)  # best of training_summary: fold 1
    assert model.model == "attention_unet" and "fold_01" in model.source
    write_csv(run / qa.VALIDATION_COUNTS_NAME, header, rows)
    (pred / qa.PRED_CONFIG_NAME).write_text(
        json.dumps({"model": str(run / "best_unet_model.hdf5")}))
    model, note = qa.load_count_error(run, pred)  # named by the predictions
    assert model.model == "unet" and "prediction_config.json" in note
    # 10 tiles of one density: two bins of 5 in file order.
    assert model.spread[0] == pytest.approx(np.std([-0.1, 0, 0.1, -0.1, 0], ddof=1))


# --------------------------------------------------------------------------- CLI


def test_main_end_to_end_writes_every_output(tmp_path):
    items = pm_series()
    pred = write_summary(tmp_path / "pred", items)
    run = tmp_path / "run"
    run.mkdir()
    write_csv(run / qa.TRAINING_SUMMARY_NAME, ["model", "best_val_jacard"], [["unet", "0.8"]])
    rng = np.random.default_rng(1)
    write_csv(run / qa.VALIDATION_COUNTS_NAME, ["model", "file", "n_true", "n_pred", "area_px"],
              [["unet", f"t{i}", n, int(n * rng.normal(1, 0.05)), 512 * 512]
               for i, n in enumerate(rng.integers(1, 60, 20))])
    truth = write_csv(tmp_path / "counts.csv", ["file", "stem", "dilution", "n_beads"],
                      [[f, f[:-4], "", n] for f, n in items])
    out = tmp_path / "assay"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    argv = ["--predictions", str(pred), "--model", str(run), "--truth", str(truth),
            "--output-dir", str(out), "--n-boot", "200", "--um-per-px", "1.0"]
    assert qa.main(argv) == 2  # non-empty folder without --overwrite
    assert qa.main(argv + ["--overwrite"]) == 0
    for name in qa.OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "notes.txt").read_text() == "user file"
    res = json.loads((out / qa.RESULTS_NAME).read_text())
    for key in ("n_images", "unit", "fit", "lob", "lod", "loq", "lod_ci95", "lod_method",
                "per_sample"):
        assert key in res, key
    assert set(res["fit"]) >= {"model", "params", "r2", "aic"}
    assert res["n_images"] == 15 and res["unit"] == "pM"
    assert res["density_unit"] == "beads/mm²"  # 1 µm/px: 1000x1000 px = 1 mm²
    assert res["count_error"]["model"] == "unet"
    assert res["lod_method"].startswith("CLSI EP17") and len(res["lod_ci95"]) == 2
    assert res["lod_ci95"][0] <= res["lod"] <= res["lod_ci95"][1]
    assert res["truth"]["fit"] is not None  # the true curve beside the fitted one
    blank = res["per_sample"][0]
    assert blank["blank"] and blank["n_replicates"] == 3
    assert blank["mean_density"] == pytest.approx(np.mean([n for f, n in items[:3]]))
    report = (out / qa.REPORT_NAME).read_text()
    assert "CLSI EP17" in report and "ICH Q2" in report and "3.3·σ/slope" in report
    assert "## Warnings" in report and isinstance(res["warnings"], list)
    for w in res["warnings"]:
        assert f"- {w}" in report


def test_dilution_names_one_image_each_like_the_demo(tmp_path, caplog):
    """The demo's case: dilution names, one frame each, no blanks, the generator's counts.csv
    as truth and a run without validation_counts.csv. ICH LoD, no bootstrap CI, Poisson-only
    uncertainty (said so), exit 0; densities per megapixel, said in the headings."""
    import demo

    frames = [("640x_a_101.png", 900, 905), ("1280x_a_102.png", 470, 455),
              ("2560x_a_103.png", 230, 226)]
    pred = write_summary(tmp_path / "pred", [(f, n) for f, n, _ in frames])
    truth = write_csv(tmp_path / "counts.csv", ["file", "stem", "dilution", "n_beads"],
                      [[f, f[:-4], f.split("x")[0], t] for f, _, t in frames])
    run = tmp_path / "run"
    run.mkdir()
    write_csv(run / qa.TRAINING_SUMMARY_NAME, ["model", "best_val_jacard"], [["unet", "0.8"]])
    assert assay_inputs.n_concentrations(pred) == 3
    out = tmp_path / "assay"
    assert qa.main(["--predictions", str(pred), "--output_dir", str(out), "--n_boot", "50",
                    "--truth", str(truth), "--model", str(run)]) == 0
    assert "validation_counts.csv not found" in caplog.text
    res = json.loads((out / qa.RESULTS_NAME).read_text())
    assert res["unit"] == stats.DILUTION_UNIT and res["lob"] is None
    assert res["lod_method"].startswith("ICH Q2") and res["lod_ci95"] is None
    assert res["count_error"]["note"].startswith("Poisson only")
    assert res["truth"]["n_images"] == 3 and res["truth"]["fit"]["model"] == res["fit"]["model"]
    report = (out / qa.REPORT_NAME).read_text()
    headings = [ln for ln in report.splitlines() if ln.startswith("## ") and "density" in ln]
    assert len(headings) >= 4 and all("megapixel" in h or "beads/MP" in h for h in headings)
    fake = {"models": {}, "figures": {}, "times_s": {},
            "assay": {"fit_model": res["fit"]["model"], "r2": res["fit"]["r2"],
                      "lod": res["lod"], "unit": res["unit"], "lod_method": res["lod_method"]}}
    assert "LoD" in demo.format_table(fake) and "ICH Q2" in demo.format_table(fake)


@pytest.mark.parametrize("case", ["missing", "two_levels", "mixed_units", "no_counts",
                                  "bad_sheet"])
def test_bad_inputs_exit_2_naming_the_file(tmp_path, caplog, case):
    pred = tmp_path / "pred"
    extra = []
    if case == "missing":
        pred.mkdir()
        named = str(pred / assay_inputs.SUMMARY_NAME)
    elif case == "two_levels":
        write_summary(pred, [("1pM_a.png", 10), ("2pM_a.png", 20), ("0pM_a.png", 1)])
        named = str(pred / assay_inputs.SUMMARY_NAME)
    elif case == "mixed_units":
        write_summary(pred, [("1pM_a.png", 10), ("2pM_a.png", 20), ("160x_a.png", 30),
                             ("320x_b.png", 15)])
        named = str(pred / assay_inputs.SUMMARY_NAME)
    elif case == "no_counts":
        write_summary(pred, [("1pM_a.png", 0), ("2pM_a.png", 0), ("4pM_a.png", 0)])
        named = str(pred / assay_inputs.SUMMARY_NAME)
    else:
        write_summary(pred, pm_series(levels=(1, 2, 4), reps=1))
        sheet = write_csv(tmp_path / "s.csv", ["file", "concentration"], [["*1pM*", "lots"]])
        extra = ["--samples", str(sheet)]
        named = f"{sheet}: line 2"
    out = tmp_path / "assay"
    assert qa.main(["--predictions", str(pred), "--output_dir", str(out)] + extra) == 2
    assert named in caplog.text
    if case == "missing":
        assert not out.exists()  # nothing made for a typo
    else:  # fatal messages also land in the run's log file
        assert named in (out / qa.LOG_NAME).read_text()
    if case == "mixed_units":
        assert "pM" in caplog.text and stats.DILUTION_UNIT in caplog.text


def test_failed_rows_are_listed_and_exit_1(tmp_path):
    pred = write_summary(tmp_path / "pred", pm_series(levels=(1, 2, 4), reps=2)
                         + [("8pM_x.png", 0, "error: unreadable"), ("mystery.png", 50)])
    out = tmp_path / "assay"
    assert qa.main(["--predictions", str(pred / assay_inputs.SUMMARY_NAME),
                    "--output_dir", str(out), "--n_boot", "20", "--fit", "linear"]) == 1
    res = json.loads((out / qa.RESULTS_NAME).read_text())
    assert res["excluded"] == [["8pM_x.png", "status 'error: unreadable'"]]
    assert res["unmatched"] == ["mystery.png"] and res["fit"]["model"] == "linear"
    report = (out / qa.REPORT_NAME).read_text()
    assert "8pM_x.png" in report and "mystery.png" in report


def test_hyphenated_aliases_and_argument_checks():
    a = qa.parse_args(["--predictions", "p", "--output-dir", "o", "--um-per-px", "0.345",
                       "--n-boot", "10", "--low-range", "4"])
    assert (a.output_dir, a.um_per_px, a.n_boot, a.low_range) == ("o", 0.345, 10, 4)
    with pytest.raises(SystemExit):
        qa.parse_args(["--predictions", "p", "--output_dir", "o", "--um_per_px", "0"])


def test_evaluation_table_is_the_assay_truth_without_renaming(tmp_path):
    """evaluate_predictions.py's per_image_metrics.csv (``file`` = the prediction mask,
    ``true_count``) is given to --truth as it is, and every frame finds its true count."""
    import evaluate_predictions as ev
    import microbead_io as mio

    size = 48
    yy, xx = np.mgrid[:size, :size]
    frames = {"640x_a": 4, "1280x_a": 2, "2560x_a": 1}
    (tmp_path / "gt").mkdir()
    pred = tmp_path / "pred"
    (pred / "masks").mkdir(parents=True)
    for name, n in frames.items():
        truth = np.zeros((size, size), np.uint8)
        for k in range(n):
            truth |= ((yy - 8 - 10 * k) ** 2 + (xx - 24) ** 2 <= 9).astype(np.uint8)
        mio.write_mask(tmp_path / "gt" / f"{name}.png", truth)
        mio.write_mask(pred / "masks" / f"{name}_mask.png", truth)
    write_summary(pred, [(f"{name}.png", n) for name, n in frames.items()])
    evaluation = tmp_path / "evaluation"
    assert ev.main(["--pred_dir", str(pred), "--gt_dir", str(tmp_path / "gt"),
                    "--output_dir", str(evaluation), "--no_progress"]) == 0
    out = tmp_path / "assay"
    assert qa.main(["--predictions", str(pred), "--truth",
                    str(evaluation / "per_image_metrics.csv"), "--output_dir", str(out),
                    "--n_boot", "20"]) == 0
    res = json.loads((out / qa.RESULTS_NAME).read_text())
    assert res["truth"]["n_images"] == 3
    with open(out / "per_image.csv", newline="") as fh:
        got = {r["file"]: int(r["n_true"]) for r in csv.DictReader(fh)}
    assert got == {f"{name}.png": n for name, n in frames.items()}


def test_count_error_bin_without_spread_is_never_used_silently():
    # The dense bin's 5 tiles were all counted exactly: its own spread is 0.
    t = np.array([10] * 5 + [100] * 5)
    p = np.array([11, 9, 10, 12, 8] + [100] * 5)
    m = stats.fit_count_error(t, p, np.full(10, 512 * 512), min_per_bin=5)
    pooled = np.std((p - t) / t, ddof=1)
    assert m.spread[1] == pytest.approx(pooled) and m.pooled_spread_bins == (1,)
    (msg,) = m.warnings()
    assert "1 density bin(s)" in msg and "instead of 0" in msg
    assert m.bins()[1]["spread_note"].startswith("pooled")
    # Every tile exact: no spread anywhere, said so.
    exact = stats.fit_count_error(t, t, np.full(10, 512 * 512), min_per_bin=5)
    assert any("no spread" in w and "equals the Poisson CV" in w for w in exact.warnings())
    assert "no model error is known there" in ar.extrapolation_warning(5, m)


def _images(rows):
    """``(concentration, beads)`` -> image rows of 1 MP each for build_replicates."""
    return [{"concentration": c, "blank": c == 0, "replicate": "", "file": f"f{i}.png",
             "beads": n, "area": 1.0, "count_spread_rel": 0.0}
            for i, (c, n) in enumerate(rows)]


def test_lod_above_the_lowest_counted_concentration_is_called_out():
    reps = stats.build_replicates(_images([(1 / 10240, 25), (1 / 5120, 60), (1 / 320, 1000)]))
    assert stats.lowest_counted_concentration(reps) == pytest.approx(1 / 10240)
    msg = ar.lod_warning(0.000215, reps, "1/dilution")
    assert msg.startswith("LoD 0.000215 1/dilution is above 9.766e-05 1/dilution")
    assert ar.lod_warning(1 / 20000, reps, "1/dilution") is None
    # A level with 3 beads per image is not "reliably counted".
    sparse = stats.build_replicates(_images([(1e-4, 3), (1e-3, 40)]))
    assert stats.lowest_counted_concentration(sparse) == pytest.approx(1e-3)


def test_residuals_beyond_two_sd_are_flagged():
    conc = np.array([1.0, 2.0, 4.0, 8.0])
    reps = stats.build_replicates(_images([(c, 100 * c) for c in conc]))
    good = stats.fit_calibration("linear", reps.x, reps.y, reps.area)
    assert ar.residual_flags(reps, good) == []  # exact line: no residual at all
    scattered = stats.build_replicates(_images([(1.0, 100), (2.0, 400), (4.0, 200), (8.0, 900)]))
    fit = stats.fit_calibration("linear", scattered.x, scattered.y, scattered.area)
    flags = ar.residual_flags(scattered, fit)
    assert flags and flags[0].startswith("residual: ")
    assert all("SD from the linear curve" in f for f in flags[1:])

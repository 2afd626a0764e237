"""Tests of evaluate_predictions.py on hand-built folders whose every number is known."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate_predictions as ev
import microbead_io as mio

ROOT = Path(__file__).resolve().parents[1]
S = 64


def disc(cy, cx, r=6):
    yy, xx = np.mgrid[:S, :S]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def hand_built():
    """name -> (truth, prediction); see the expected numbers in the tests."""
    a_t = np.zeros((S, S), np.uint8)
    a_t[5:15, 5:15] = 1  # A, 100 px
    a_t[5:15, 25:35] = 1  # B
    a_t[25:35, 5:15] = 1  # C
    a_p = np.zeros((S, S), np.uint8)
    a_p[5:11, 5:15] = 1  # 60 px inside A: IoU 0.6
    a_p[45:55, 45:55] = 1  # false positive
    pair = disc(32, 20) | disc(32, 32)  # touching pair (centre distance 2 r)
    z = np.zeros((S, S), np.uint8)
    return {
        "a": (a_t, a_p),
        "b": (z, z),
        "640x_2025-05-16_c": (pair, pair.copy()),
        "d": (disc(30, 30), disc(30, 30)),
    }


def write_folder(root: Path, cases, *, truth_ext=".tif"):
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir(parents=True)
    for i, (name, (t, p)) in enumerate(cases.items()):
        mio.write_mask(root / "gt" / f"{name}{truth_ext}", t)
        suffix = "_mask" if i % 2 == 0 else "-mask"  # both spellings pair
        mio.write_mask(root / "pred" / f"{name}{suffix}.png", p)
    return root / "pred", root / "gt"


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {mio.stem_key(r["file"]): r for r in csv.DictReader(fh)}


def run(args) -> int:
    return ev.main([str(a) for a in args] + ["--no_progress"])


def test_hand_built_folder_numbers(tmp_path):
    cases = hand_built()
    pred, gt = write_folder(tmp_path, cases)
    mio.write_mask(pred / "zzz_mask.png", np.zeros((S, S)))  # prediction without truth
    mio.write_mask(gt / "only_truth.png", np.zeros((S, S)))  # truth without prediction
    out = tmp_path / "evaluation"
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out]) == 0

    rows = read_rows(out / "per_image_metrics.csv")
    assert set(rows) == set(cases)
    a = rows["a"]
    assert float(a["jaccard"]) == pytest.approx(60 / 400)
    assert (a["true_count"], a["pred_count"]) == ("3", "2")
    assert (a["obj_tp"], a["obj_fp"], a["obj_fn"]) == ("1", "1", "2")
    assert float(a["obj_precision"]) == pytest.approx(0.5)
    assert float(a["obj_recall"]) == pytest.approx(1 / 3)
    assert float(a["obj_mean_matched_iou"]) == pytest.approx(0.6)
    assert float(a["f1_iou_0.55"]) == pytest.approx(0.4) and float(a["f1_iou_0.65"]) == 0
    assert (a["count_error"], a["abs_count_error"]) == ("-1", "1")
    assert float(a["rel_count_error"]) == pytest.approx(1 / 3)
    b = rows["b"]
    assert float(b["jaccard"]) == 1 and float(b["obj_f1"]) == 1 and b["count_error"] == "0"
    assert b["obj_mean_matched_iou"] == ""  # undefined, not 0
    assert b["density_bin"] == "0" and a["density_bin"] == "1-10"
    c = rows["640x_2025-05-16_c"]
    assert (c["true_count"], c["pred_count"], c["obj_tp"]) == ("2", "2", "2")  # pair split
    assert c["dilution"] == "640" and c["true_instances_from"] == "mask"

    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["median_area"] == 100.0  # compact interior components only
    pair_px = int(cases["640x_2025-05-16_c"][0].sum())
    d_px = int(cases["d"][0].sum())
    tp = 60 + pair_px + d_px
    assert s["pixel"]["pooled"]["jaccard"] == pytest.approx(tp / (tp + 100 + 240))
    assert s["pixel"]["mean_per_image"]["jaccard"] == pytest.approx((0.15 + 3) / 4)
    obj = s["objects"]
    assert (obj["tp"], obj["fp"], obj["fn"]) == (4, 1, 2)
    assert obj["precision"] == pytest.approx(0.8) and obj["recall"] == pytest.approx(4 / 6)
    assert s["counts"]["mae"] == pytest.approx(0.25)
    assert s["counts"]["mean_rel_error"] == pytest.approx((1 / 3) / 4)
    assert [t["iou_threshold"] for t in s["objects_by_threshold"]][0] == 0.5
    assert len(s["objects_by_threshold"]) == 10
    dens = {g["density_bin"]: g for g in s["by_density"]}
    assert dens["0"]["n_images"] == 1 and dens["1-10"]["n_images"] == 3
    assert dens["1-10"]["obj_fn"] == 2
    assert [g["dilution"] for g in s["by_dilution"]] == [640]
    assert s["unpaired_predictions"] == ["zzz_mask.png"]
    assert s["unpaired_truth"] == ["only_truth.png"]
    assert s["worst"][0]["file"] == "a_mask.png"

    report = (out / "evaluation_report.md").read_text()
    assert "zzz_mask.png: prediction has no truth mask" in report
    assert "only_truth.png: truth mask has no prediction" in report
    assert "| 0 | 1 |" in report  # the empty-image bin is its own row
    for f in ev.OUTPUT_FILES:
        assert (out / f).is_file(), f
    # --strict turns unpaired files into a non-zero exit.
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", tmp_path / "strict",
                "--strict", "--no_figures"]) == 1


def test_predictor_layout_and_label_images_are_used(tmp_path):
    cases = {"a": hand_built()["a"], "d": hand_built()["d"]}
    data = tmp_path / "data"
    for sub in ("masks", "labels"):
        (data / sub).mkdir(parents=True)
    pred = tmp_path / "predictions"
    for sub in ("masks", "labels"):
        (pred / sub).mkdir(parents=True)
    for name, (t, p) in cases.items():
        mio.write_mask(data / "masks" / f"{name}.png", t)
        mio.write_mask(pred / "masks" / f"{name}_mask.png", p)
    # Truth labels of "a": square A labelled as two instances (left/right halves), so the
    # label image, not the mask, must give 4 true beads.
    lab = np.zeros((S, S), np.int32)
    lab[5:15, 5:10], lab[5:15, 10:15], lab[5:15, 25:35], lab[25:35, 5:15] = 1, 2, 3, 4
    mio.write_labels(data / "labels" / "a.tif", lab)
    mio.write_labels(data / "labels" / "d.tif", cases["d"][0])
    mio.write_labels(pred / "labels" / "a_labels.tif", cases["a"][1])  # one id for both
    out = tmp_path / "eval"
    assert run(["--pred-dir", pred, "--gt-dir", data / "masks", "--output-dir", out,
                "--no-figures"]) == 0
    rows = read_rows(out / "per_image_metrics.csv")
    assert rows["a"]["true_instances_from"] == "labels"
    assert rows["a"]["true_count"] == "4"
    assert rows["a"]["pred_instances_from"] == "labels" and rows["a"]["pred_count"] == "1"
    assert rows["d"]["pred_instances_from"] == "mask"
    log_text = (out / "evaluate.log").read_text()
    assert "instance labels from sibling folder" in log_text
    assert str(data / "labels") in log_text
    # --no_labels derives everything from the masks again.
    assert run(["--pred_dir", pred, "--gt_dir", data, "--output_dir", tmp_path / "e2",
                "--no_labels", "--no_figures"]) == 0
    rows = read_rows(tmp_path / "e2" / "per_image_metrics.csv")
    assert (rows["a"]["true_count"], rows["a"]["pred_count"]) == ("3", "2")


def test_size_mismatch_names_both_files_and_others_still_evaluated(tmp_path, caplog):
    pred, gt = write_folder(tmp_path, {"d": hand_built()["d"]})
    mio.write_mask(pred / "small_mask.png", np.ones((S, S)))
    mio.write_mask(gt / "small.png", np.ones((S // 2, S // 2)))
    out = tmp_path / "eval"
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out, "--no_figures"]) == 1
    s = json.loads((out / "summary.json").read_text())
    assert len(s["failures"]) == 1
    msg = s["failures"][0]
    assert "small_mask.png" in msg and "small.png" in msg and "\n" not in msg
    assert "64x64" in msg and "32x32" in msg
    assert list(read_rows(out / "per_image_metrics.csv")) == ["d"]
    assert "small_mask.png" in (out / "evaluation_report.md").read_text()
    # Documented alternative: resample the prediction (nearest) to the truth size.
    out2 = tmp_path / "eval2"
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out2, "--no_figures",
                "--resize", "pred_to_truth"]) == 0
    rows = read_rows(out2 / "per_image_metrics.csv")
    assert rows["small"]["resized"] == "True" and float(rows["small"]["jaccard"]) == 1.0


def test_each_image_size_gets_its_own_bead_area(tmp_path):
    cases = {"d": hand_built()["d"]}  # 64x64, bead area 113 px
    pred, gt = write_folder(tmp_path, cases)
    yy, xx = np.mgrid[:128, :128]
    big = np.zeros((128, 128), np.uint8)
    for cy, cx in ((30, 30), (30, 90), (90, 30)):  # r = 12 beads, plus a touching pair
        big |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= 144).astype(np.uint8)
    pair = ((yy - 90) ** 2 + (xx - 70) ** 2 <= 144) | ((yy - 90) ** 2 + (xx - 94) ** 2 <= 144)
    big |= pair.astype(np.uint8)
    mio.write_mask(gt / "frame.png", big)
    mio.write_mask(pred / "frame_mask.png", big)
    out = tmp_path / "eval"
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out, "--no_figures"]) == 0
    s = json.loads((out / "summary.json").read_text())
    disc12 = int(np.sum((yy - 30) ** 2 + (xx - 30) ** 2 <= 144))
    assert s["settings"]["median_area_by_size"] == {"64x64": 113.0, "128x128": float(disc12)}
    # 3 single beads + the pair split in two.
    assert read_rows(out / "per_image_metrics.csv")["frame"]["true_count"] == "5"


def test_corrupt_prediction_is_named_and_skipped(tmp_path):
    pred, gt = write_folder(tmp_path, {"d": hand_built()["d"]})
    (pred / "bad_mask.png").write_bytes(b"not a png at all")
    mio.write_mask(gt / "bad.png", np.ones((S, S)))
    out = tmp_path / "eval"
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out, "--no_figures"]) == 1
    s = json.loads((out / "summary.json").read_text())
    assert len(s["failures"]) == 1 and "bad_mask.png" in s["failures"][0]
    assert s["n_evaluated"] == 1


def test_output_folder_rules(tmp_path, caplog):
    pred, gt = write_folder(tmp_path, {"d": hand_built()["d"]})
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out, "--no_figures"]) == 2
    assert "not empty" in caplog.text and str(out) in caplog.text
    assert not (out / "summary.json").exists()
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out, "--no_figures",
                "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "user data"  # only our files are written
    assert (out / "summary.json").is_file()
    # Never inside the truth folder.
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", gt / "eval",
                "--no_figures"]) == 2
    assert not (gt / "eval").exists()


def test_missing_folder_and_bad_arguments(tmp_path, caplog):
    missing = tmp_path / "nope"
    assert run(["--pred_dir", missing, "--gt_dir", tmp_path, "--output_dir",
                tmp_path / "o"]) == 2
    assert f"{missing}: prediction folder not found" in caplog.text
    assert not (tmp_path / "o").exists()  # a typo creates no output folder
    with pytest.raises(SystemExit):
        ev.parse_args(["--pred_dir", "a", "--gt_dir", "b", "--output_dir", "c",
                       "--iou_threshold", "1.5"])
    a = ev.parse_args(["--pred-dir", "p", "--gt-dir", "g", "--output-dir", "o",
                       "--iou-threshold", "0.7", "--gt-labels-dir", "l"])
    assert (a.pred_dir, a.gt_dir, a.output_dir, a.iou_threshold, a.gt_labels_dir) == (
        "p", "g", "o", 0.7, "l")


def test_random_folder_agrees_with_brute_force(tmp_path):
    """CSV numbers vs a brute-force recomputation (pixel loops, dense all-pairs IoU)."""
    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    labels = {}
    for i in range(4):
        t = np.zeros((S, S), np.int32)
        p = np.zeros((S, S), np.int32)
        for k in range(int(rng.integers(1, 10))):  # 20 px apart: no touching, no split
            cy, cx = 10 + 20 * (k // 3), 10 + 20 * (k % 3)
            t[disc(cy, cx, 5) > 0] = k + 1
            if rng.random() < 0.8:
                dy, dx = rng.integers(-2, 3, 2)
                p[disc(cy + dy, cx + dx, int(rng.integers(3, 6))) > 0] = k + 1
        mio.write_mask(tmp_path / "gt" / f"r{i}.png", t > 0)
        mio.write_mask(tmp_path / "pred" / f"r{i}.png", p > 0)
        labels[f"r{i}"] = (t, p)
    out = tmp_path / "eval"
    assert run(["--pred_dir", tmp_path / "pred", "--gt_dir", tmp_path / "gt",
                "--output_dir", out, "--no_figures", "--iou_threshold", "0.3"]) == 0
    rows = read_rows(out / "per_image_metrics.csv")
    for name, (t, p) in labels.items():
        r = rows[name]
        inter = sum(1 for a, b in zip(t.ravel(), p.ravel()) if a and b)
        union = sum(1 for a, b in zip(t.ravel(), p.ravel()) if a or b)
        assert float(r["jaccard"]) == pytest.approx(inter / union, rel=1e-5)
        ious = np.array([[np.sum((t == i) & (p == j)) / np.sum((t == i) | (p == j))
                          for j in range(1, p.max() + 1) if (p == j).any()]
                         for i in range(1, t.max() + 1)])
        # Well separated objects: at most one candidate per row, so matches = rows with a
        # candidate at IoU >= threshold.
        expected_tp = int(np.sum((ious >= 0.3).any(axis=1))) if ious.size else 0
        assert int(r["obj_tp"]) == expected_tp
        assert int(r["true_count"]) == t.max() and int(r["pred_count"]) == len(np.unique(p)) - 1


def test_runs_without_tensorflow(tmp_path):
    pred, gt = write_folder(tmp_path, {"d": hand_built()["d"]})
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "import evaluate_predictions as ev\n"
        f"sys.exit(ev.main(['--pred_dir', {str(pred)!r}, '--gt_dir', {str(gt)!r}, "
        f"'--output_dir', {str(tmp_path / 'o')!r}, '--no_progress', '--no_figures']))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "summary.json").is_file()


def test_headline_numbers_reach_the_terminal(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    pred, gt = write_folder(tmp_path, hand_built())
    out = tmp_path / "evaluation"
    assert run(["--pred_dir", pred, "--gt_dir", gt, "--output_dir", out]) == 0
    s = json.loads((out / "summary.json").read_text())
    c = s["counts"]
    total = 100 * (c["pred_total"] - c["true_total"]) / c["true_total"]
    assert (f"bead counts: {c['pred_total']} predicted vs {c['true_total']} true "
            f"({total:+.1f} % in total") in caplog.text
    assert f"F1 {s['objects']['f1']:.3f}" in caplog.text
    assert "quantify_assay.py --truth takes as it is" in caplog.text


def test_per_image_csv_cells_and_an_empty_table(tmp_path):
    """Columns in order of first appearance, floats .6g, NaN empty; no rows: an empty file
    (what a run whose every pair failed writes)."""
    ev.write_csv(tmp_path / "t.csv", [{"file": "a", "x": 1 / 3, "y": float("nan")},
                                      {"file": "b", "x": np.float64(2.0), "z": True}])
    assert (tmp_path / "t.csv").read_bytes() == (b"file,x,y,z\r\na,0.333333,,\r\n"
                                                 b"b,2,,True\r\n")
    ev.write_csv(tmp_path / "e.csv", [])
    assert (tmp_path / "e.csv").read_bytes() == b""


def test_report_tables_keep_three_decimals_and_n_a():
    import evaluation_report as er

    text = er._table([{"f": "a.png", "j": 0.5, "n": 3, "m": float("nan"), "o": None}],
                     [("f", "file"), ("j", "IoU"), ("n", "N"), ("m", "M"), ("o", "O")])[0]
    assert text.splitlines() == ["| file | IoU | N | M | O |", "|---|---|---|---|---|",
                                 "| a.png | 0.500 | 3 | n/a | n/a |"]

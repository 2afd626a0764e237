"""The whole chain, script to script through their main()s, on tiny synthetic data.

Runs ``demo.main`` (generate -> analyze -> train -> plot -> predict -> evaluate) and checks
that each stage read what the previous one wrote, not merely that files exist.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

import demo  # noqa: E402
import microbead_io as mio  # noqa: E402


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "demo"
    rc = demo.main([
        "--out", str(out), "--n", "10", "--size", "128", "--large", "2",
        "--large_size", "384", "256", "--blank_frames", "1", "--seed", "3",
        "--train_args", "--filters 4 --depth 2 --epochs 2 --steps_per_epoch 2 --batch_size 4 "
                        "--patch_size 64",
    ])
    assert rc == 0
    return out


def test_every_stage_consumed_the_previous_one(demo_out):
    results = json.loads((demo_out / "demo_results.json").read_text())
    data = demo_out / "dataset_microscope"

    # analysis read the generated dataset
    summary = json.loads((demo_out / "dataset_analysis" / "summary.json").read_text())
    assert summary["dataset_size"] == 10

    # training read the generated tiles and the generator's pixel scale
    run_dir = Path(results["run_dir"])
    assert run_dir.parent == demo_out / "runs" and run_dir.name.startswith("microbead_training_")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["n_images"] == 10
    gen = json.loads((data / "dataset.json").read_text())
    assert cfg["preprocessing"]["pixel_scale"] == pytest.approx(gen["pixel_scale"])
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 10
    with open(run_dir / "training_summary.csv", newline="") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"unet", "attention_unet", "attention_resunet"}
    assert set(results["models"]) == set(rows)

    # plotting read the run's histories
    stats = run_dir / "training_analysis" / "training_summary_statistics.csv"
    with open(stats, newline="") as fh:
        plotted = {r["model"]: r for r in csv.DictReader(fh)}
    for m, r in rows.items():
        assert float(plotted[m]["best_val_jacard"]) == pytest.approx(float(r["best_val_jacard"]),
                                                                     abs=1e-4)

    # prediction used the best model of that run and wrote one mask per frame, at frame size
    pred = demo_out / "predictions"
    best = max(rows.values(), key=lambda r: float(r["best_val_jacard"]))["model"]
    assert f"{best} chosen from" in (pred / "prediction.log").read_text()
    frames = mio.list_images(data / "large" / "images")
    assert len(frames) == 3 and sum(f.name.startswith("blank_") for f in frames) == 1
    for f in frames:
        m = mio.read_mask(pred / "masks" / f"{f.stem}_mask.png")
        assert m.shape == (256, 384)

    # evaluation paired those masks with the generator's truth
    ev = json.loads((demo_out / "evaluation" / "summary.json").read_text())
    assert ev["n_evaluated"] == 3
    with open(data / "large" / "counts.csv", newline="") as fh:
        true_total = sum(int(r["n_beads"]) for r in csv.DictReader(fh))
    assert ev["counts"]["true_total"] == true_total
    with open(pred / "prediction_summary.csv", newline="") as fh:
        pred_total = sum(int(r["beads"]) for r in csv.DictReader(fh) if r["status"] == "ok")
    assert ev["counts"]["pred_total"] == pred_total
    lf = results["large_frames"]
    assert lf["true_beads"] == true_total and lf["predicted_beads"] == pred_total
    assert np.isfinite(lf["f1_at_0.5"])
    # the blank frame's predicted beads are reported as false beads
    with open(pred / "prediction_summary.csv", newline="") as fh:
        blank = [int(r["beads"]) for r in csv.DictReader(fh) if r["file"].startswith("blank_")]
    assert results["blank_frames"] == {"n_images": 1, "false_beads": blank}

    # the per-bead table and the Fiji ROI set describe exactly the written label images
    for f in frames:
        labels = mio.read_labels(pred / "labels" / f"{f.stem}_labels.tif")
        with open(pred / "beads" / f"{f.stem}_beads.csv", newline="") as fh:
            table = list(csv.DictReader(fh))
        assert len(table) == len(np.unique(labels[labels > 0]))
        assert (pred / "rois" / f"{f.stem}_rois.zip").is_file()


def test_rerunning_the_demo_needs_overwrite_and_keeps_foreign_files(tmp_path, monkeypatch,
                                                                    caplog):
    out = tmp_path / "demo"
    ran = []

    def fake_demo(args):  # the first run writes these (listed in its manifest), later ones none
        if not ran:
            (out / "evaluation").mkdir(parents=True)
            (out / "evaluation" / "summary.json").write_text("stale")
            (out / "runs" / "old_run").mkdir(parents=True)
            (out / "runs" / "old_run" / "unet_history.csv").write_text("stale")
        ran.append(args)
        return {"models": {}, "figures": {}, "times_s": {}}

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    assert demo.main(["--out", str(out)]) == 0
    (out / "notes.txt").write_text("keep")
    # Refused without --overwrite (exit 2, the folder named), nothing touched.
    assert demo.main(["--out", str(out)]) == 2
    assert f"{out}: output folder exists and is not empty" in caplog.text
    assert len(ran) == 1 and (out / "evaluation" / "summary.json").read_text() == "stale"
    # --overwrite removes only what a demo wrote; a foreign file stays.
    assert demo.main(["--output-dir", str(out), "--overwrite"]) == 0
    assert len(ran) == 2 and ran[1].output_dir == str(out)
    assert (out / "notes.txt").read_text() == "keep"
    assert not (out / "evaluation").exists() and not (out / "runs").exists()


def test_table_formats_every_model(demo_out):
    results = json.loads((demo_out / "demo_results.json").read_text())
    text = demo.format_table(results)
    for m in ("unet", "attention_unet", "attention_resunet"):
        assert m in text
    assert "median relative bead-count error" in text

"""Smoke test of benchmarks/bench_real_tiles.py: one style, one model, tiny sizes.

Despite its name the benchmark needs no real tiles: it generates synthetic data in the
users' layout, trains through ``train_microbead_optimized.main``, predicts the frames
through ``predict_microscope.main``, scores them with ``evaluate_predictions.main`` and runs
the classical baseline. Here every size is tiny, so an interface change in any of those
breaks this test instead of the next 25-minute benchmark run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_real_tiles as brt  # noqa: E402

TINY_TRAIN = ("--filters 4 --depth 2 --epochs 1 --steps_per_epoch 2 --batch_size 2 "
              "--patch_size 32 --val_split frames")


def test_slope_skips_zero_counts():
    assert brt._slope([160, 1600], [1000, 100]) == pytest.approx(-1.0)
    assert brt._slope([160, 1600, 16000], [1000, 100, 0]) == pytest.approx(-1.0)
    assert brt._slope([160, 1600], [1000, 0]) is None


def test_classical_baseline_finds_dark_discs():
    img = np.full((96, 96, 3), 200.0, np.float32)
    yy, xx = np.indices((96, 96))
    for cy, cx in ((20, 20), (20, 60), (70, 40)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 40.0
    assert brt.classical_labels(img, window=31).max() == 3


@pytest.mark.slow  # one tiny training + prediction + evaluation: ~20 CPU s
def test_tiny_run_scores_every_frame_and_the_baseline(tmp_path, capsys):
    out = tmp_path / "bench_real_tiles.json"
    argv = ["--work", str(tmp_path / "work"), "--styles", "rings", "--models", "unet",
            "--n_tiles", "6", "--n_frames", "2", "--frame_size", "320", "256",
            "--train_args", TINY_TRAIN, "--out", str(out)]
    assert brt.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["usable_cpus"] >= 1 and res["machine"]["backend"]
    st = res["styles"]["rings"]
    assert len(st["frames"]) == 2 and all(n > 0 for n in st["true_beads"])
    m = st["models"]["unet"]
    assert m["predict_rc"] == 0 and len(m["pred_beads"]) == 2
    for key in ("f1_at_0.5", "mean_pixel_jaccard", "val_jaccard_vs_training_masks",
                "val_jaccard_vs_exact_labels", "best_val_jacard"):
        assert 0.0 <= m[key] <= 1.0, key
    assert st["baseline_vs_model"] == "unet"
    assert [b["frame"] for b in st["baseline"]] == st["frames"]
    assert all(0 <= b["unet_found"] <= b["true"] and 0 <= b["classical_found"] <= b["true"]
               for b in st["baseline"])
    assert "wrote" in capsys.readouterr().out

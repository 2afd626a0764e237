"""The real-tile cross-validation benchmark: its scoring by hand, and a one-fold smoke run.

The benchmark itself needs ``../shared/real_tiles``; here it runs on a tiny synthetic folder
laid out the same way (two frames of ``_grid_rR_cC`` tiles whose columns overlap), so an
interface change in the trainer or the predictor cannot break it unnoticed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import microbead_io as mio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_real_cv as bcv  # noqa: E402


def _disc_mask(shape, centres, r=3):
    yy, xx = np.indices(shape)
    m = np.zeros(shape, np.uint8)
    for cy, cx in centres:
        m[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    return m


def test_score_counts_matches_within_the_radius_and_merged_labels():
    truth = _disc_mask((40, 60), [(10, 10), (30, 40)])
    truth[8:13, 10:20] = 1  # the first label merges two beads at (10, 10) and (10, 17)
    pred = np.zeros((40, 60), np.int32)
    pred[_disc_mask((40, 60), [(10, 9)]) > 0] = 1
    pred[_disc_mask((40, 60), [(10, 18)]) > 0] = 2
    pred[_disc_mask((40, 60), [(30, 55)]) > 0] = 3  # 15 px from the second label: no match
    s = bcv.score(truth, pred, 6.0)
    assert (s["n_true"], s["n_pred"], s["tp_true"], s["fp"], s["fn"]) == (2, 3, 1, 2, 1)
    assert s["pred_in_shared_label"] == 1  # two predicted beads inside one label component
    pooled = bcv.summarise([s])
    assert pooled["recall"] == 0.5 and pooled["precision"] == 1 / 3
    assert pooled["count_error_pct"] == 50.0 and pooled["count_error_merged_labels_pct"] == 0.0


def test_blank_tile_removes_beads_and_dark_corner_dims_the_right_side():
    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 120.0, np.float32) + rng.normal(0, 1, (64, 64, 3))
    mask = _disc_mask((64, 64), [(20, 20), (40, 44)], r=4)
    img[mask > 0] = 60.0
    blank = bcv.blank_tile(img, mask)
    assert blank[mask > 0].min() > 100  # inpainted from the background
    dark = bcv.dark_corner(blank, rng)
    assert dark[:, -4:].mean() < 0.5 * dark[:, :4].mean() + 5


def test_rows_are_runs_of_consecutive_columns():
    names = [Path(f"f_grid_r0_c{c}.png") for c in (0, 1, 2, 5, 6)] + [Path("f_grid_r1_c3.png")]
    runs = bcv.row_runs(names)
    assert [[p.name for p in r] for r in runs] == [
        ["f_grid_r0_c0.png", "f_grid_r0_c1.png", "f_grid_r0_c2.png"],
        ["f_grid_r0_c5.png", "f_grid_r0_c6.png"]]


def _tiny_real_tiles(root: Path, rng) -> None:
    """Two frames (dilutions 320x, 5120x), three 64-px grid tiles each, 16-px overlaps."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for dil, n in ((320, 40), (5120, 8)):
        frame = np.full((64, 160), 110.0) + rng.normal(0, 2, (64, 160))
        centres = [(rng.uniform(6, 58), rng.uniform(6, 154)) for _ in range(n)]
        m = _disc_mask((64, 160), centres, r=3)
        frame[m > 0] = 50.0
        for c in range(3):
            x = 48 * c
            name = f"{dil}x_2025-05-16_00-59-00_grid_r0_c{c}.png"
            mio.write_image(root / "images" / name,
                            np.repeat(frame[:, x:x + 64, None], 3, -1).astype(np.uint8))
            mio.write_mask(root / "masks" / name, m[:, x:x + 64])


def test_absent_data_is_a_clean_skip(tmp_path, capsys):
    assert bcv.main(["--data", str(tmp_path / "none"), "--work", str(tmp_path / "w")]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.slow  # trains one fold in a subprocess
def test_one_fold_runs_end_to_end(tmp_path):
    _tiny_real_tiles(tmp_path / "data", np.random.default_rng(1))
    out = tmp_path / "res.json"
    rc = bcv.main(["--data", str(tmp_path / "data"), "--work", str(tmp_path / "w"),
                   "--folds", "5120x", "--output", str(out), "--train_args",
                   "--filters 4 --depth 2 --epochs 1 --steps_per_epoch 2 --batch_size 2 "
                   "--patch_size 32"])
    assert rc == 0
    res = json.loads(out.read_text())
    (name, entry), = res["frames"].items()
    assert name.startswith("5120x") and entry["n_tiles"] == 3
    assert entry["model"]["n_true"] > 0 and set(entry["blanks"]) == {"inpainted",
                                                                       "inpainted_dark"}
    assert len(entry["rows"]) == 1 and len(entry["rows"][0]["tiles"]) == 3
    # The trained fold carries its own calibration, which prediction used.
    run = Path(entry["run"])
    assert (run / "calibration_unet.json").is_file()

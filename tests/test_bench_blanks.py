"""Smoke test of benchmarks/bench_blanks.py: false beads on blank frames, tiny and fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_blanks  # noqa: E402

import microbead_io as mio  # noqa: E402
import models  # noqa: E402


def _run_folder(tmp_path: Path, bias: float) -> Path:
    """An untrained 4-filter U-Net whose output bias is ``bias`` (+big: every pixel is a
    bead; -big: none), saved with the config.json prediction reads."""
    keras.utils.set_random_seed(0)
    m = models.build_unet((None, None, 1), filters=4, depth=2, dropout=0.0)
    last = m.layers[-1]
    kernel, b = last.get_weights()
    last.set_weights([np.zeros_like(kernel), np.full_like(b, bias)])
    run = tmp_path / f"run_{bias:+g}"
    run.mkdir()
    models.save_model(m, run / "best_unet_model.hdf5")
    cfg = {
        "format_version": 1,
        "models": {"unet": {"architecture": "unet"}},
        "preprocessing": {
            "channels": 1, "input_size": [64, 64], "stored_tile_size": [64, 64],
            "pixel_scale": 1.0, "scale": 1.0,
            "normalization": dict(mio.DEFAULT_NORMALIZATION), "pad_multiple": 4,
        },
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 50.0},
    }
    (run / "config.json").write_text(json.dumps(cfg))
    return run / "best_unet_model.hdf5"


def test_quick_blank_benchmark_counts_what_the_model_predicts(tmp_path, capsys):
    out = tmp_path / "bench_blanks.json"
    # A model that predicts nothing: 0 false beads on every frame.
    none = _run_folder(tmp_path, -20.0)
    assert bench_blanks.main(["--model", str(none), "--quick", "--tile_size", "128",
                              "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_frames"] == bench_blanks.QUICK_N and res["quick"]
    assert [r["false_beads"] for r in res["rows"]] == [0] * bench_blanks.QUICK_N
    assert all(r["file"].startswith("blank_") for r in res["rows"])
    assert all((r["width"], r["height"]) == bench_blanks.QUICK_SIZE for r in res["rows"])
    # One that calls everything a bead: the whole frame is foreground, counted as false.
    every = _run_folder(tmp_path, 20.0)
    assert bench_blanks.main(["--model", str(every), "--quick", "--tile_size", "128",
                              "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    w, h = bench_blanks.QUICK_SIZE
    assert all(r["false_pixels"] == w * h and r["false_beads"] >= 1 for r in res["rows"])
    assert res["false_beads_median"] >= 1
    assert "false beads per frame: median" in capsys.readouterr().out

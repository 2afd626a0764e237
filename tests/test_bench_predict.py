"""benchmarks/bench_predict.py: a smoke test on a tiny saved model and tiny frames.

Seconds, not minutes: the benchmark's own code path (warm-up, pure forward passes, both
pipeline modes, the JSON) on two 96x128 frames, with the overlap left to its default (the
benchmark once crashed in ``tiling.plan_tiles`` without ``--overlap``).
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import microbead_io as mio
import tiling

keras = pytest.importorskip("keras")
models = pytest.importorskip("models")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_predict  # noqa: E402


def _run(tmp_path):
    keras.utils.set_random_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    models.save_model(models.build_unet((None, None, 1), filters=4, depth=2, dropout=0.0),
                      run / "best_unet_model.hdf5")
    (run / "config.json").write_text(json.dumps({
        "format_version": 1,
        "models": {"unet": {"architecture": "unet"}},
        "preprocessing": {
            "channels": 1, "input_size": [64, 64], "stored_tile_size": [64, 64],
            "pixel_scale": 1.0, "scale": 1.0,
            "normalization": dict(mio.DEFAULT_NORMALIZATION), "pad_multiple": 4},
        "postprocessing": {"threshold": 0.5, "median_bead_area_px": 40.0},
    }))
    return run


def _frames(folder):
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    names = ("160x_a.png", "640x_b.png")
    for name in names:
        mio.write_image(folder / "images" / name,
                        (rng.random((96, 128)) * 200 + 20).astype(np.uint8))
    with open(folder / "counts.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "n_beads"])
        w.writerows([(n, 10) for n in names])
    return folder


def test_bench_predict_main_writes_sane_json_with_the_default_overlap(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_predict.main(["--model", str(_run(tmp_path) / "best_unet_model.hdf5"), "--frames",
                             str(_frames(tmp_path / "frames")), "--tile_size", "64",
                             "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("model", "forward_s", "modes", "frames", "s_per_frame", "ratio", "overlap",
                "overlap_source", "peak_rss_mb", "machine", "n_frames", "workers"):
        assert key in res, key
    assert res["overlap"] == tiling.default_overlap(2) == 44  # the depth-2 net's default
    assert "receptive field" in res["overlap_source"]
    assert res["n_frames"] == 2 and res["forward_s"] > 0 and res["peak_rss_mb"] > 0
    assert set(res["modes"]) == {"pipelined", "sequential"}
    for mode in res["modes"].values():
        assert mode["s_per_frame"] > 0 and mode["ratio"] > 0
        if mode["pass_peak_rss_mb"] is not None:  # Linux
            assert 0 < mode["rss_at_pass_start_mb"] <= mode["pass_peak_rss_mb"]
            assert 0 < mode["predictor_peak_rss_mb"] <= res["peak_rss_mb"] + 1
            assert mode["pass_peak_rss_mb"] <= res["peak_rss_mb"] + 1
    assert [f["file"] for f in res["frames"]] == ["160x_a.png", "640x_b.png"]
    assert all(f["true_beads"] == 10 and f["beads"] >= 0 for f in res["frames"])
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["backend"] == "tensorflow"
    assert "s/frame" in capsys.readouterr().out


def test_bench_predict_missing_model_is_an_error_not_a_traceback(tmp_path, capsys):
    rc = bench_predict.main(["--model", str(tmp_path / "nothing"), "--frames",
                             str(_frames(tmp_path / "frames")), "--out",
                             str(tmp_path / "b.json")])
    assert rc == 1 and "model file not found" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()

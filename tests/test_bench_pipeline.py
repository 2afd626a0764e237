"""benchmarks/bench_pipeline.py: a smoke test on a tiny dataset (seconds, not a benchmark)."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pipeline  # noqa: E402

from make_synthetic_dataset import generate_dataset  # noqa: E402


def test_bench_pipeline_main_writes_sane_json(tmp_path, capsys):
    data = tmp_path / "ds"
    generate_dataset(data, n=8, size=64, seed=0, radius=8.0, log_file=False, style="rings")
    out = tmp_path / "bench_pipeline.json"
    rc = bench_pipeline.main([
        "--data", str(data), "--out", str(out), "--steps", "2", "--epochs", "2",
        "--rounds", "1", "--train_args",
        "--filters 4 --depth 1 --image_size 64 --patch_size 64 --batch_size 4 --verbose 0"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("pipeline_images_per_s", "bare_fit_images_per_s", "train_on_batch_images_per_s",
                "pipeline_only_images_per_s", "ratio_pipeline_to_bare_fit", "settings",
                "seconds_per_epoch", "machine"):
        assert key in res, key
    assert res["settings"]["steps_per_epoch"] == 2 and res["settings"]["filters"] == 4
    assert all(res[k] > 0 for k in ("pipeline_images_per_s", "bare_fit_images_per_s"))
    assert 0 < res["ratio_pipeline_to_bare_fit"] < 100
    assert len(res["seconds_per_epoch"]["pipeline"]) == 2  # 1 round of 2 measured epochs
    assert res["machine"]["backend"] == "tensorflow" and res["machine"]["cpu_count"] >= 1
    assert "pipeline / bare_fit" in capsys.readouterr().out

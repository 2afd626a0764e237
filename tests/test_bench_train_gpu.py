"""benchmarks/bench_train_gpu.py: a 2-step smoke run through the trainer's own input
pipeline (the augmentation's traps are tested on ``training_data`` itself,
tests/test_training_data.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train_gpu as bench  # noqa: E402

import training_data  # noqa: E402


def test_benchmark_uses_the_trainers_pipeline_and_patches_nothing():
    source = Path(bench.__file__).read_text()
    assert bench.training_data is training_data
    # No re-typed augmentation constants and no assignment into the trainer's modules.
    for needle in ("0.8), math.log(1.25)", "tmo.make_datasets =", "tmo.setup_tensorflow ="):
        assert needle not in source
    assert len(source.splitlines()) < 1000


def test_smoke_run_writes_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main([
        "--archs", "unet", "--sizes", "32", "--precisions", "float32", "--filters", "4",
        "--depth", "2", "--batch_size", "2", "--steps", "2", "--rounds", "1", "--warmup", "1",
        "--pipelines", "in_memory,numpy", "--workers", "1", "--n_tiles", "4",
        "--tile_size", "32", "--large_frames", "0", "--work", str(tmp_path / "work"),
        "--out", str(out),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["environment"]["backend"] == "tensorflow"
    (rec,) = report["throughput"]
    assert rec["flops_per_image"]["train_analytic"] > 0
    for kind in ("in_memory", "numpy"):
        p = rec["pipelines"][kind]
        assert p["images_per_s_median"] > 0 and p["achieved_tflops"] >= 0
    assert rec["pipelines"]["numpy"]["ratio_to_in_memory_median"] > 0
    assert "host_peak_rss_bytes" in rec["memory"]

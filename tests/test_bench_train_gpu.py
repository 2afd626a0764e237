"""benchmarks/bench_train_gpu.py: the NumPy augmentation's traps and a 2-step smoke run."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train_gpu as bench  # noqa: E402


def _asymmetric_pair(size=32):
    mask = np.zeros((size, size), np.float32)
    mask[4:24, 4:9] = 1  # an L: no flip or rotation maps it onto itself
    mask[19:24, 4:20] = 1
    image = 0.2 + 0.6 * mask[..., None]
    return image.astype(np.float32), mask


def test_mask_follows_image_through_every_augmentation():
    image, mask = _asymmetric_pair()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        img, msk = bench.augment_pair_np(image, mask, rng, patch_size=24, rotation=15.0,
                                         intensity=False)
        assert img.shape == (24, 24, 1) and msk.shape == (24, 24, 1)
        assert set(np.unique(msk)) <= {0.0, 1.0}
        bright = img[..., 0] > 0.5
        inter = np.logical_and(bright, msk[..., 0] > 0).sum()
        union = np.logical_or(bright, msk[..., 0] > 0).sum()
        assert union == 0 or inter / union > 0.8, seed


def test_no_augmentation_returns_an_all_zero_image():
    image, mask = _asymmetric_pair()
    for seed in range(50):
        img, _ = bench.augment_pair_np(image, mask, np.random.default_rng(seed))
        assert img.max() > 0 and img.std() > 0.02


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

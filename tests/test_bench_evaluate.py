"""Smoke test of benchmarks/bench_evaluate.py: tiny sizes, seconds; checks the JSON it writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_evaluate  # noqa: E402


def test_bench_evaluate_writes_its_json_with_the_machine(tmp_path):
    out = tmp_path / "bench_evaluate.json"
    assert bench_evaluate.main(["--n_images", "2", "--size", "48", "--n_beads", "12",
                                "--frame_shape", "96", "128", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "evaluate_predictions"
    assert {"node", "cpu", "usable_cpus", "python", "numpy"} <= set(res["machine"])
    tiles = res["tiles"]
    assert tiles["n_images"] == 2 and tiles["size"] == 48 and tiles["exit_codes"] == [0, 0]
    frame = res["frame_128x96"]
    assert frame["shape"] == [96, 128] and frame["exit_codes"] == [0, 0]
    assert frame["true_instances"] > 0 and set(frame["seconds"]) >= {
        "label_beads_truth", "object_metrics_10_thresholds", "main_without_figures"}
    assert all(v >= 0 for v in frame["seconds"].values())

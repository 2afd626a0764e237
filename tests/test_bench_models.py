"""Smoke test of benchmarks/bench_models.py: one tiny architecture, one timed call each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_models  # noqa: E402


def test_tiny_run_writes_one_record_per_model_and_the_machine(tmp_path, capsys):
    out = tmp_path / "bench_models.json"
    rc = bench_models.main(["--models", "unet", "--filters", "4", "--size", "32", "--depth", "2",
                            "--batch_size", "2", "--min_time", "0", "--max_repeats", "1",
                            "--jit_compile", "false", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["settings"]["size"] == 32 and res["settings"]["batch_size"] == 2
    assert res["settings"]["depth"] == 2
    (rec,) = res["results"]
    assert (rec["arch"], rec["filters"]) == ("unet", 4)
    assert rec["params"] > 0
    assert rec["forward_img_s"] > 0 and rec["train_img_s"] > 0
    assert rec["forward_cpu_s_per_img"] >= 0 and rec["train_cpu_s_per_img"] >= 0
    assert len(rec["forward_s"]) == 1 and len(rec["train_s"]) == 1  # --max_repeats 1
    env = res["environment"]  # _common.machine_info(keras_backend=True)
    assert env["usable_cpus"] >= 1 and env["backend"] and env["keras"] and env["python"]
    assert "unet" in capsys.readouterr().out  # the printed table


def test_unknown_model_is_refused(tmp_path):
    assert bench_models.main(["--models", "no_such_net", "--out",
                              str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()

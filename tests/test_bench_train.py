"""Smoke test of benchmarks/bench_train.py: one model, a few steps, on a tiny dataset.

The benchmark drives ``train_microbead_optimized.main`` with ``--preset cpu`` and reads the
run's summary, history, config and split back; a change of any of those breaks this test
rather than the next full benchmark run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train  # noqa: E402

TINY_TRAIN = ("--filters 4 --depth 2 --epochs 1 --steps_per_epoch 2 --batch_size 2 "
              "--patch_size 32 --val_split frames")


@pytest.mark.slow  # one tiny training: ~15 CPU s, mostly Keras tracing the train step
def test_tiny_run_reports_the_trained_model_settings_and_machine(tmp_path, capsys):
    import synthetic_dataset as syn

    data = tmp_path / "data"
    syn.generate_dataset(data, n=6, size=64, seed=0, style="rings", log_file=False)
    out = tmp_path / "bench_train.json"
    rc = bench_train.main(["--models", "unet", "--data", str(data), "--out", str(out),
                           "--output_dir", str(tmp_path / "runs"), "--train_args",
                           TINY_TRAIN])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["dataset"] == {"path": str(data), "generated": False, "synthetic": None}
    assert res["settings"]["preset"] == "cpu" and res["settings"]["filters"] == 4
    (name, r), = res["results"].items()
    assert name == "unet" and r["exit_code"] == 0
    assert r["epochs_run"] == 1 and len(r["val_jaccard_per_epoch"]) == 1
    for key in ("best_val_jaccard", "best_val_jaccard_reloaded_hdf5", "val_jaccard_batchstats",
                "best_val_dice"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["params"] > 0 and r["wall_seconds"] > 0
    assert sum(r["n_train_val"]) == 6 and min(r["n_train_val"]) >= 1
    assert Path(r["run_dir"]).is_dir()  # --output_dir keeps the run
    m = res["machine"]
    assert m["usable_cpus"] >= 1 and "load_average_1min_start" in m and m["backend"]
    assert set(res["targets_met"]) == {"unet", "all_models"}
    assert "unet" in capsys.readouterr().out


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_train.parse_args(["--models", "unet,nope"])
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err

"""Benchmark: train each model with the CPU preset on the synthetic dataset (no timing asserts).

Generates the synthetic dataset (73 tiles of 256x256 px, ``make_synthetic_dataset.
generate_dataset``, seed 0) into a temporary folder unless ``--data`` names one, then runs
``train_microbead_optimized.py --preset cpu ...`` once per model in its own process, exactly
as a user would, and records for each model the best validation Jaccard (inference mode, as
logged and as reproduced by the reloaded ``.hdf5``), the batch-statistics Jaccard, the epoch
of the best model, the fit time and the wall time of the whole trainer process (start-up,
data loading, backend setup, graph tracing, training, reload and snapshot included).

Targets (issue 4): U-Net val Jaccard >= 0.85 within 10 minutes on a 2-core CPU; all three
models >= 0.80. They are reported, never asserted.

Outputs
    A table on stdout and ``benchmarks/results/bench_train.json`` (``--out``): per-model
    results, the settings used (from the run's ``config.json``), machine info
    (``_common.machine_info``, plus the load average at the start and the end) and the
    date. Training run folders go to a temporary folder (removed) unless ``--output_dir``
    is given.

Example
    python benchmarks/bench_train.py --models unet --out /tmp/bench_train.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import load_average, machine_info  # noqa: E402

import microbead_config as mcfg  # noqa: E402
import runtime  # noqa: E402
from reporting import fmt, md_table  # noqa: E402

log = logging.getLogger("microbead.bench_train")

TARGETS = {"unet_val_jaccard": 0.85, "unet_minutes": 10.0, "all_models_val_jaccard": 0.80}


def ensure_dataset(data: str | None, scratch: Path) -> tuple[Path, bool]:
    """Existing ``data`` folder, or a fresh synthetic one (73 tiles, 256 px) in ``scratch``."""
    if data:
        return Path(data), False
    from synthetic_dataset import generate_dataset

    out = scratch / "synthetic_73"
    t0 = time.perf_counter()
    generate_dataset(out, n=73, size=256, seed=0, log_file=False, style="rings")
    log.info("generated %s in %.1f s", out, time.perf_counter() - t0)
    return out, True


def train_model(name: str, data_dir: Path, out_dir: Path, extra=()) -> dict:
    """One ``main()`` call with ``--preset cpu`` for one model; returns its results."""
    run_file = out_dir / f"run_dir_{name}.txt"
    argv = ["--data_dir", str(data_dir), "--preset", "cpu", "--models", name,
            "--output_dir", str(out_dir), "--run_dir_file", str(run_file), "--verbose", "0",
            *extra]
    t0 = time.perf_counter()
    # The trainer is an entry point: run as a user runs it, in its own process.
    rc = subprocess.run([sys.executable, str(ROOT / "train_microbead_optimized.py"), *argv],
                        check=False).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not run_file.is_file():
        raise SystemExit(f"training {name} failed (exit code {rc}): "
                         f"train_microbead_optimized.py {' '.join(argv)}")
    run_dir = Path(run_file.read_text().strip())
    row = next(r for r in mcfg.read_summary(run_dir / mcfg.SUMMARY_FILE)
               if r["model"] == name)
    hist = mcfg.read_history(run_dir / mcfg.history_file(name))
    config = mcfg.read_run_config(run_dir / mcfg.CONFIG_FILE)
    split = json.loads((run_dir / mcfg.SPLIT_FILE).read_text())
    return {
        "exit_code": rc,
        "argv": argv,
        "best_val_jaccard": float(row["best_val_jacard"]),
        "best_val_jaccard_reloaded_hdf5": float(row["best_val_jacard_reloaded"]),
        "val_jaccard_batchstats": float(row["val_jacard_batchstats"]),
        "final_val_jaccard": float(row["final_val_jacard"]),
        "best_val_dice": float(row["best_val_dice"]),
        "best_epoch": int(row["best_epoch"]),
        "epochs_run": int(row["epochs_run"]),
        "params": int(row["params"]),
        "fit_seconds": float(row["train_time"]),
        "wall_seconds": round(wall, 1),
        "val_jaccard_per_epoch": [round(float(r["val_jacard_coef"]), 4) for r in hist],
        "run_dir": str(run_dir),
        "config_training": config["training"],
        "n_train_val": [len(split["train"]), len(split["val"])],
    }


def settings_used(results: dict) -> dict:
    """The training settings shared by the runs (taken from the first run's config.json)."""
    first = next(iter(results.values()))["config_training"]
    keys = ("preset", "filters", "depth", "batch_size", "patch_size", "image_size", "lr",
            "loss", "dropout", "epochs", "patience", "steps_per_epoch_used", "bn_momentum_used",
            "val_fraction", "seed", "rotation", "intensity_aug", "elastic", "mixed_precision")
    return {k: first.get(k) for k in keys}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(mcfg.MODEL_NAMES),
                   help="comma-separated subset of " + ",".join(mcfg.MODEL_NAMES))
    p.add_argument("--out", "--output", dest="out",
                   default=str(ROOT / "benchmarks" / "results" / "bench_train.json"),
                   help="JSON results file")
    p.add_argument("--data", "--data_dir", "--data-dir", dest="data", default=None,
                   help="dataset folder (default: generate the 73-tile synthetic set)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                   help="keep the training run folders here (default: temporary, removed)")
    p.add_argument("--train_args", "--train-args", dest="train_args", default="",
                   help="extra trainer flags after --preset cpu (quoted), e.g. '--epochs 1'; "
                        "the targets are the preset's")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in mcfg.MODEL_NAMES]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {', '.join(mcfg.MODEL_NAMES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.configure_threads()  # OpenCV's pool bounded as the pipeline's entry points do
    with runtime.script_logging():  # stderr, under the "microbead" logger
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    started = _dt.datetime.now().astimezone()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        scratch = Path(tmp)
        data_dir, generated = ensure_dataset(args.data, scratch)
        out_dir = Path(args.output_dir) if args.output_dir else scratch / "runs"
        out_dir.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in args.models:
            log.info("training %s with --preset cpu on %s", name, data_dir)
            results[name] = train_model(name, data_dir, out_dir,
                                        shlex.split(args.train_args))
        settings = settings_used(results)
        for r in results.values():
            r.pop("config_training")
            if not args.output_dir:
                r["run_dir"] = None  # removed with the temporary folder

    unet = results.get("unet")
    report = {
        "benchmark": "train_microbead_optimized --preset cpu",
        "date": started.isoformat(timespec="seconds"),
        "dataset": {"path": None if generated else str(data_dir), "generated": generated,
                    "synthetic": "73 tiles 256x256, seed 0" if generated else None},
        "settings": settings,
        "machine": {**machine_info(keras_backend=True), "load_average_1min_start": load_start,
                    "load_average_1min_end": load_average()},
        "targets": TARGETS,
        "targets_met": {
            "unet": None if unet is None else bool(
                unet["best_val_jaccard"] >= TARGETS["unet_val_jaccard"]
                and unet["wall_seconds"] <= 60 * TARGETS["unet_minutes"]),
            "all_models": bool(all(r["best_val_jaccard"] >= TARGETS["all_models_val_jaccard"]
                                   for r in results.values())),
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(md_table(
        ["model", "val J", "reload", "batchst", "best ep", "fit s", "wall s", "params"],
        [[name, *(fmt(r[k], 4, style="fixed") for k in (
            "best_val_jaccard", "best_val_jaccard_reloaded_hdf5", "val_jaccard_batchstats")),
          r["best_epoch"], fmt(r["fit_seconds"], 1, style="fixed"),
          fmt(r["wall_seconds"], 1, style="fixed"), f"{r['params']:,}"]
         for name, r in results.items()]))
    m = report["machine"]
    print(f"machine: {m['cpu_count']} CPUs ({m['usable_cpus']} usable), {m['platform']}, "
          f"load average {m['load_average_1min_start']} -> {m['load_average_1min_end']}")
    print(f"targets met: {report['targets_met']}   written: {out}")
    return 0 if all(r["exit_code"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

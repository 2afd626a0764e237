"""All project benchmarks in one run, one JSON (the numbers in the README's "Measured").

Steps (each a separate process, so timings and peak memory do not mix):

1. generate the synthetic set: 73 tiles of 256x256 + one 3840x2160 frame per dilution
   (160x ... 10240x) with ground truth;
2. ``bench_train.py``: the three models with ``--preset cpu`` -> val Jaccard and wall time;
3. ``bench_pipeline.py``: full training pipeline vs bare model step (images/s ratio);
4. ``predict_microscope.py`` with the best model on the large frames, then
   ``evaluate_predictions.py`` -> median count error, F1@0.5, and the dilution-series
   linearity (slope and R² of log count vs log dilution, ideal slope -1);
5. ``bench_predict.py`` on the 7 large frames -> s/frame (pipelined and sequential),
   ratio to one forward pass, peak RSS.

Output: ``benchmarks/results/run_all.json`` (``--out``) and a printed summary.
Nothing is asserted.

Example
    python benchmarks/run_all.py --work /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd: list[str], log_path: Path) -> float:
    """Run a command, tee-less: output to a log file; raise with the log's tail on failure."""
    t = time.perf_counter()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}:\n{tail}")
    return time.perf_counter() - t


def commands(work: Path, best_run: str = "") -> dict[str, list[str]]:
    """Each step's command line (script path and arguments; run with ``sys.executable``).

    ``best_run`` is the training run folder the prediction steps use (known after training).
    A test parses every command with its script's ``parse_args``, so a renamed flag fails
    there rather than an hour into a run.
    """
    data = work / "dataset_microscope"
    bench = ROOT / "benchmarks"
    large = data / "large"
    return {
        "generate": ["make_synthetic_dataset.py", "--out", str(data), "--n", "73", "--seed",
                     "0", "--large", "7"],
        "bench_train": [str(bench / "bench_train.py"), "--data", str(data), "--out",
                        str(work / "bench_train.json"), "--output_dir", str(work / "runs")],
        "bench_pipeline": [str(bench / "bench_pipeline.py"), "--data", str(data), "--out",
                           str(work / "bench_pipeline.json")],
        "predict": ["predict_microscope.py", "--model", best_run, "--input_dir",
                    str(large / "images"), "--output_dir", str(work / "predictions")],
        "evaluate": ["evaluate_predictions.py", "--pred_dir", str(work / "predictions"),
                     "--gt_dir", str(large / "masks"), "--gt_labels_dir", str(large / "labels"),
                     "--output_dir", str(work / "evaluation"), "--no_progress"],
        "bench_predict": [str(bench / "bench_predict.py"), "--model", best_run, "--out",
                          str(work / "bench_predict.json"), "--frames", str(large),
                          "--repeats", "2"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/microbead_bench", help="scratch folder (created)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "run_all.json"))
    p.add_argument("--skip_pipeline", action="store_true")
    p.add_argument("--reuse", default=None,
                   help="an earlier run_all work folder: keep its dataset and trained models, "
                        "redo the other steps")
    args = p.parse_args(argv)
    if args.reuse:
        work = Path(args.reuse)
    else:
        work = Path(args.work) / _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
        work.mkdir(parents=True)
    data = work / "dataset_microscope"
    res: dict = {"machine": machine_info(), "work": str(work)}
    cmd = commands(work)

    if not args.reuse:
        res["generate_s"] = round(run([PY, *cmd["generate"]], work / "generate.log"), 1)
        run([PY, *cmd["bench_train"]], work / "bench_train.log")
    res["train"] = json.loads((work / "bench_train.json").read_text())

    if not args.skip_pipeline:
        run([PY, *cmd["bench_pipeline"]], work / "bench_pipeline.log")
        res["pipeline"] = json.loads((work / "bench_pipeline.json").read_text())

    # Best model over the trained ones (each bench_train model has its own run folder).
    models = res["train"]["results"]
    best_name = max(models, key=lambda m: models[m]["best_val_jaccard"])
    best_run = models[best_name]["run_dir"]
    cmd = commands(work, best_run)
    pred, ev = work / "predictions", work / "evaluation"
    for d in (pred, ev):  # a --reuse run redoes these
        if d.exists():
            import shutil

            shutil.rmtree(d)
    t = run([PY, *cmd["predict"]], work / "predict.log")
    run([PY, *cmd["evaluate"]], work / "evaluate.log")
    summary = json.loads((ev / "summary.json").read_text())
    with open(pred / "prediction_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(data / "large" / "counts.csv", newline="") as fh:
        truth = {r["file"]: int(r["n_beads"]) for r in csv.DictReader(fh)}
    sys.path.insert(0, str(ROOT))
    import predict_microscope as pm

    fit_pred = pm.fit_dilution_series([int(r["dilution"]) for r in rows],
                                      [int(r["beads"]) for r in rows])
    fit_true = pm.fit_dilution_series([int(r["dilution"]) for r in rows],
                                      [truth[r["file"]] for r in rows])
    res["large_frames"] = {
        "model": best_name, "run_dir": best_run, "n_frames": len(rows),
        "predict_total_s": round(t, 1),
        "per_frame": [{"file": r["file"], "dilution": int(r["dilution"]),
                       "true": truth[r["file"]], "pred": int(r["beads"]),
                       "time_s": float(r["time_s"])} for r in rows],
        "median_rel_count_error": summary["counts"]["median_rel_error"],
        "mean_rel_count_error": summary["counts"]["mean_rel_error"],
        "f1_at_0.5": summary["objects"]["f1"],
        "mean_pixel_jaccard": summary["pixel"]["mean_per_image"]["jaccard"],
        "dilution_fit_predicted": fit_pred,
        "dilution_fit_truth": fit_true,
    }

    run([PY, *cmd["bench_predict"]], work / "bench_predict.log")
    res["predict"] = json.loads((work / "bench_predict.json").read_text())

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))

    print(f"machine: {res['machine']['cpu']} ({res['machine']['cpu_count']} cores), "
          f"{res['machine']['date']}")
    for m, r in models.items():
        print(f"train {m:<18} val Jaccard {r['best_val_jaccard']:.4f}  wall "
              f"{r['wall_seconds']:.0f} s (fit {r['fit_seconds']:.0f} s)")
    if "pipeline" in res:
        pr = res["pipeline"]
        print(f"pipeline vs bare step: {pr['ratio_pipeline_to_bare_fit']:.3f} (fastest epochs), "
              f"{pr['ratio_pipeline_to_bare_fit_median']:.3f} (medians); CPU overhead "
              f"{pr['cpu_overhead_pct']:.1f} %")
    lf = res["large_frames"]
    print(f"large frames ({lf['n_frames']}, model {best_name}): median count error "
          f"{100 * lf['median_rel_count_error']:.2f} %, F1@0.5 {lf['f1_at_0.5']:.4f}, "
          f"dilution slope {lf['dilution_fit_predicted']['slope']:.3f} "
          f"(truth {lf['dilution_fit_truth']['slope']:.3f}), R² "
          f"{lf['dilution_fit_predicted']['r2']:.4f}")
    pr = res["predict"]
    print(f"3840x2160 predict ({pr['n_frames']} frames): {pr['s_per_frame']:.2f} s/frame, "
          f"{pr['ratio']:.2f}x one forward pass ({pr['forward_s']:.2f} s); sequential "
          f"{pr['modes']['sequential']['ratio']:.2f}x; peak RSS {pr['peak_rss_mb']:.0f} MB")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

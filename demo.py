"""Run the whole microbead pipeline on the embedded synthetic data (``make demo``).

Purpose
    Show, on a CPU in minutes, every step users run on their own data: generate a synthetic
    dataset like theirs (microscope style: 73 native 512-px RGB grid tiles cut from frame
    rows with 37-px column overlaps, solid dark beads, uneven light; + four 3840x2160 frames
    of four dilutions with ground truth), analyze it, train the three models with the CPU
    preset, plot the training curves, predict masks and bead counts on the large frames,
    evaluate them against the truth, calibrate the assay (bead density vs concentration,
    LoD; needs frames of >= 3 dilutions) and print a short results table with the figures.

Inputs
    None (the data is generated). The users' ``dataset_microscope/`` is never touched.

Outputs
    Everything under ``--out`` (default ``demo/``, git-ignored): ``dataset_microscope/``,
    ``dataset_analysis/``, ``runs/microbead_training_*/`` (+ ``training_analysis/``),
    ``predictions/``, ``evaluation/``, ``assay/`` (with >= 3 dilutions),
    ``demo_results.json``. An existing ``--out`` is moved aside to
    ``<out>_previous_<time>``, never overwritten.

Example
    python demo.py --out demo
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("microbead.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo", help="folder for everything the demo writes")
    p.add_argument("--n", type=int, default=73, help="training tiles to generate")
    p.add_argument("--style", choices=("microscope", "rings"), default="microscope",
                   help="synthetic data style (microscope: like the users' real tiles)")
    p.add_argument("--size", type=int, default=None,
                   help="tile size (default: the style's, 512 native px for microscope)")
    p.add_argument("--large", type=int, default=4,
                   help="3840x2160 frames with ground truth (>= 3 dilutions for the assay)")
    p.add_argument("--large_size", "--large-size", dest="large_size", type=int, nargs=2,
                   default=(3840, 2160), metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="unet,attention_unet,attention_resunet")
    p.add_argument("--train_args", "--train-args", dest="train_args", default="",
                   help="extra flags for train_microbead_optimized.py (after --preset cpu)")
    return p.parse_args(argv)


def _step(title: str) -> float:
    log.info("=" * 70)
    log.info("%s", title)
    log.info("=" * 70)
    return time.perf_counter()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise SystemExit(f"demo: {what} failed (exit code {rc}); see the log above")


def prepare_out_dir(out: Path) -> Path | None:
    """Create ``out``; a non-empty one is first renamed ``<out>_previous_<time>`` (returned)."""
    aside = None
    if out.exists() and any(out.iterdir()):
        import microbead_io as mio

        aside = mio.unique_path(
            out.with_name(f"{out.name}_previous_{_dt.datetime.now():%Y%m%d_%H%M%S}"))
        out.rename(aside)
    out.mkdir(parents=True, exist_ok=True)
    return aside


def run_demo(args) -> dict:
    import analyze_microbead_dataset
    import evaluate_predictions
    import make_synthetic_dataset
    import plot_training_curves
    import predict_microscope
    import quantify_assay
    import train_microbead_optimized

    out = Path(args.out)
    aside = prepare_out_dir(out)
    if aside:
        log.info("moved the previous demo output aside to %s", aside)
    data = out / "dataset_microscope"
    times = {}

    t = _step("1/7 generate the synthetic dataset")
    make_synthetic_dataset.generate_dataset(
        data, n=args.n, size=args.size, seed=args.seed, large=args.large,
        large_size=tuple(args.large_size), style=args.style)
    tile_size = json.loads((data / "dataset.json").read_text())["size"]
    times["generate_s"] = time.perf_counter() - t

    t = _step("2/7 analyze the dataset (integrity, statistics, recommended config)")
    _check(analyze_microbead_dataset.main(
        ["--data_dir", str(data), "--output_dir", str(out / "dataset_analysis"),
         "--image_size", str(tile_size), "--no_progress"]), "analysis")
    times["analyze_s"] = time.perf_counter() - t

    t = _step("3/7 train the three models (CPU preset)")
    run_file = out / "run_dir.txt"
    train_argv = ["--data_dir", str(data), "--output_dir", str(out / "runs"),
                  "--models", args.models, "--preset", "cpu",
                  "--run_dir_file", str(run_file)] + args.train_args.split()
    _check(train_microbead_optimized.main(train_argv), "training")
    run_dir = Path(run_file.read_text().strip())
    times["train_s"] = time.perf_counter() - t

    t = _step("4/7 plot the training curves")
    _check(plot_training_curves.main([str(run_dir)]), "plotting")
    times["plot_s"] = time.perf_counter() - t

    large = data / "large"
    pred = out / "predictions"
    evaluation = out / "evaluation"
    assay = out / "assay"
    summary_eval = summary_assay = None
    if args.large:
        t = _step("5/7 predict masks and bead counts on the large frames (best model)")
        _check(predict_microscope.main(
            ["--model", str(run_dir), "--input_dir", str(large / "images"),
             "--output_dir", str(pred), "--roi"]), "prediction")
        times["predict_s"] = time.perf_counter() - t

        t = _step("6/7 evaluate the predictions against the ground truth")
        _check(evaluate_predictions.main(
            ["--pred_dir", str(pred), "--gt_dir", str(large / "masks"),
             "--gt_labels_dir", str(large / "labels"), "--output_dir", str(evaluation),
             "--no_progress"]), "evaluation")
        times["evaluate_s"] = time.perf_counter() - t
        summary_eval = json.loads((evaluation / "summary.json").read_text())

        # A calibration needs >= 3 concentrations; the default 2 frames give 2 dilutions.
        n_dil = quantify_assay.n_concentrations(pred)
        if n_dil >= 3:
            t = _step("7/7 quantify the assay: calibration curve and detection limits")
            _check(quantify_assay.main(
                ["--predictions", str(pred), "--truth", str(large / "counts.csv"),
                 "--model", str(run_dir), "--output_dir", str(assay)]), "assay quantification")
            times["assay_s"] = time.perf_counter() - t
            summary_assay = json.loads((assay / quantify_assay.RESULTS_NAME).read_text())
        else:
            log.info("7/7 assay quantification skipped: the predictions hold %d dilution(s), "
                     "a calibration needs >= 3 (run the demo with --large 3 or more)", n_dil)

    summary_train = train_microbead_optimized.read_summary(run_dir / "training_summary.csv")
    results = {
        "run_dir": str(run_dir),
        "models": {r["model"]: {"best_val_jacard": float(r["best_val_jacard"]),
                                "best_epoch": int(r["best_epoch"]),
                                "train_time_s": float(r["train_time"])}
                   for r in summary_train},
        "times_s": {k: round(v, 1) for k, v in times.items()},
    }
    if summary_eval:
        counts, objects = summary_eval["counts"], summary_eval["objects"]
        results["large_frames"] = {
            "n_images": counts["n_images"],
            "true_beads": counts["true_total"],
            "predicted_beads": counts["pred_total"],
            "median_rel_count_error": counts["median_rel_error"],
            "f1_at_0.5": objects["f1"],
            "mean_jaccard": summary_eval["pixel"]["mean_per_image"]["jaccard"],
        }
    if summary_assay:
        fit = summary_assay["fit"]
        results["assay"] = {
            "n_images": summary_assay["n_images"],
            "unit": summary_assay["unit"],
            "fit_model": fit["model"],
            "r2": fit["r2"],
            "lod": summary_assay["lod"],
            "lod_ci95": summary_assay["lod_ci95"],
            "lod_method": summary_assay["lod_method"],
            "loq": summary_assay["loq"],
            "true_fit": (summary_assay.get("truth") or {}).get("fit"),
        }
    results["figures"] = {
        "dataset": str(out / "dataset_analysis" / "distribution_analysis.png"),
        "training_curves": str(run_dir / "training_analysis" / "training_curves_comparison.png"),
        "performance": str(run_dir / "training_analysis" / "performance_summary.png"),
        "validation_snapshot": str(run_dir / "validation_snapshot_unet.png"),
        "comparisons": str(pred / "comparisons"),
        "dilution_counts": str(pred / "dilution_counts.png"),
        "count_scatter": str(evaluation / "count_scatter.png"),
        "worst_gallery": str(evaluation / "worst_images.png"),
    }
    if summary_assay:
        results["figures"]["calibration"] = str(assay / "calibration.png")
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    lines = ["", "Demo results (synthetic data)", "-----------------------------",
             f"{'model':<20}{'best val Jaccard':>18}{'epoch':>7}{'train s':>9}"]
    for m, r in results["models"].items():
        lines.append(f"{m:<20}{r['best_val_jacard']:>18.4f}{r['best_epoch']:>7}"
                     f"{r['train_time_s']:>9.0f}")
    lf = results.get("large_frames")
    if lf:
        lines += [
            "",
            f"large frames: {lf['n_images']} x 3840x2160, true beads {lf['true_beads']}, "
            f"predicted {lf['predicted_beads']}",
            f"median relative bead-count error: {100 * lf['median_rel_count_error']:.2f} %",
            f"object F1 at IoU 0.5:             {lf['f1_at_0.5']:.4f}",
            f"mean pixel Jaccard:               {lf['mean_jaccard']:.4f}",
        ]
    a = results.get("assay")
    if a:
        lod = "n/a" if a["lod"] is None else f"{a['lod']:.3g} {a['unit']}"
        r2 = "n/a" if a["r2"] is None else f"{a['r2']:.3f}"
        lines.append(f"assay calibration:                {a['fit_model']} fit, R² {r2}, "
                     f"LoD {lod} ({a['lod_method'].split(':')[0]})")
    lines += ["", "Figures:"] + [f"  {k:<20} {v}" for k, v in results["figures"].items()]
    lines += ["", "Step times (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in
                                                 results["times_s"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    results = run_demo(args)
    print(format_table(results))
    print(f"\nTotal: {time.perf_counter() - t0:.0f} s. Everything is under {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

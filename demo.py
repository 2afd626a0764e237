"""Run the whole microbead pipeline on the embedded synthetic data (``make demo``).

Purpose
    Show, on a CPU in minutes, every step users run on their own data: generate a synthetic
    dataset like theirs (microscope style: 73 native 512-px RGB grid tiles cut from frame
    rows with 37-px column overlaps, solid dark beads, uneven light; + four 3840x2160 frames
    of four dilutions and two blank frames, with ground truth), analyze it, train the three
    models with the CPU preset, plot the training curves, predict masks and bead counts on
    the large frames, evaluate them against the truth, calibrate the assay (bead density vs
    concentration, LoB from the blank frames, LoD; needs frames of >= 3 dilutions) and print
    a short results table with the figures.

Inputs
    None (the data is generated). The users' ``dataset_microscope/`` is never touched.

Outputs
    Everything under ``--output_dir`` (default ``demo/``, git-ignored; old spelling
    ``--out``): ``dataset_microscope/``,
    ``dataset_analysis/``, ``runs/microbead_training_*/`` (+ ``training_analysis/``),
    ``predictions/``, ``evaluation/``, ``assay/`` (with >= 3 dilutions),
    ``demo_results.json``, ``demo.log`` (every step's log). An existing non-empty
    ``--output_dir`` is refused unless ``--overwrite``, which removes only what an earlier
    demo wrote there.

Example
    python demo.py --output_dir demo
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import cli

log = logging.getLogger("microbead.demo")


#: What the demo writes into --output_dir (--overwrite removes these, nothing else).
OUTPUT_FILES = ("dataset_microscope/**/*", "dataset_analysis/*", "runs/**/*",
                "predictions/**/*", "evaluation/*", "assay/*", "demo_results.json",
                "run_dir.txt", "demo.log")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    cli.add_option(p, "output_dir", "--out", default="demo",
                   help="folder for everything the demo writes (--out: the old spelling)")
    p.add_argument("--n", type=int, default=73, help="training tiles to generate")
    p.add_argument("--style", choices=("microscope", "rings"), default="microscope",
                   help="synthetic data style (microscope: like the users' real tiles)")
    p.add_argument("--size", type=int, default=None,
                   help="tile size (default: the style's, 512 native px for microscope)")
    p.add_argument("--large", type=int, default=4,
                   help="3840x2160 frames with ground truth (>= 3 dilutions for the assay)")
    cli.add_option(p, "blank_frames", type=int, default=2,
                   help="blank (0-bead) frames of that size with smudges and debris: the "
                        "assay's blanks (limit of blank) and the false beads per blank frame")
    cli.add_option(p, "large_size", type=int, nargs=2, default=(3840, 2160),
                   metavar=("W", "H"), help="size of those frames")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    p.add_argument("--models", default="unet,attention_unet,attention_resunet",
                   help="models to train (comma-separated)")
    cli.add_option(p, "train_args", default="",
                   help="extra flags for train_microbead_optimized.py (after --preset cpu)")
    cli.add_overwrite(p, help="allow an existing non-empty folder; removes only what an "
                              "earlier demo wrote there (its sub-folders' files, "
                              "demo_results.json, demo.log), nothing else")
    return p.parse_args(argv)


def _step(title: str) -> float:
    log.info("=" * 70)
    log.info("%s", title)
    log.info("=" * 70)
    return time.perf_counter()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise SystemExit(f"demo: {what} failed (exit code {rc}); see the log above")


def run_demo(args) -> dict:
    import analyze_microbead_dataset
    import assay_inputs
    import evaluate_predictions
    import microbead_config
    import plot_training_curves
    import predict_microscope
    import quantify_assay
    import synthetic_dataset
    import train_microbead_optimized

    out = Path(args.output_dir)
    data = out / "dataset_microscope"
    times = {}

    t = _step("1/7 generate the synthetic dataset")
    synthetic_dataset.generate_dataset(
        data, n=args.n, size=args.size, seed=args.seed, large=args.large,
        large_size=tuple(args.large_size), style=args.style, blank_frames=args.blank_frames)
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
    if args.large or args.blank_frames:
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

        # The generator's sample sheet marks the blank frames (concentration 0).
        sheet = large / synthetic_dataset.SAMPLE_SHEET
        # A calibration needs >= 3 concentrations; the default 2 frames give 2 dilutions.
        n_dil = assay_inputs.n_concentrations(pred, sheet)
        if n_dil >= 3:
            t = _step("7/7 quantify the assay: calibration curve and detection limits")
            _check(quantify_assay.main(
                ["--predictions", str(pred), "--samples", str(sheet),
                 "--truth", str(large / "counts.csv"),
                 "--model", str(run_dir), "--output_dir", str(assay)]), "assay quantification")
            times["assay_s"] = time.perf_counter() - t
            summary_assay = json.loads((assay / quantify_assay.RESULTS_NAME).read_text())
        else:
            log.info("7/7 assay quantification skipped: the predictions hold %d dilution(s), "
                     "a calibration needs >= 3 (run the demo with --large 3 or more)", n_dil)

    summary_train = microbead_config.read_summary(run_dir / microbead_config.SUMMARY_FILE)
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
    if args.blank_frames and summary_eval:
        with open(pred / "prediction_summary.csv", newline="") as fh:
            false_beads = [int(r["beads"]) for r in csv.DictReader(fh)
                           if r["file"].startswith("blank_") and r.get("status", "ok") == "ok"]
        results["blank_frames"] = {"n_images": len(false_beads), "false_beads": false_beads}
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
            "lob": summary_assay.get("lob"),
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
    bf = results.get("blank_frames")
    if bf and bf["false_beads"]:
        fb = sorted(bf["false_beads"])
        median = (fb[(len(fb) - 1) // 2] + fb[len(fb) // 2]) / 2
        lines.append(f"false beads per blank frame:      median {median:g}, max {fb[-1]} "
                     f"({bf['n_images']} blank frames)")
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
    """Exit 0: every step succeeded; 2: a step failed (named) or an unusable output folder."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hides cuInit E0000 without a GPU
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.output_dir)
    try:
        claim = cli.claim_output_dir(out, OUTPUT_FILES, script="demo",
                                     overwrite=args.overwrite, log_name="demo.log")
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    import runtime

    # Every step logs under "microbead": the demo's log holds the whole chain.
    handlers = [runtime.add_log_handler(out / "demo.log", mode="w")]
    runtime.configure_threads()
    claim.report(log)
    t0 = time.perf_counter()
    try:
        results = run_demo(args)
    except SystemExit as exc:  # a step failed (_check) or refused its input
        if isinstance(exc.code, int):
            return exc.code
        return cli.fatal(log, "%s", exc)
    finally:
        claim.release()
        runtime.remove_log_handlers(handlers)
    print(format_table(results))
    print(f"\nTotal: {time.perf_counter() - t0:.0f} s. Everything is under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

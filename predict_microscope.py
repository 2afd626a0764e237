"""Predict bead masks and bead counts on microscope frames of any size.

Purpose
    Segment new brightfield frames (e.g. 3840x2160) with a model trained by
    ``train_microbead_optimized.py`` and count beads per image. Preprocessing is rebuilt
    from the run's ``config.json`` (scale relative to the training tiles, channels,
    normalization, threshold, median bead area), never from re-typed flags, so training and
    prediction cannot drift. The frame is normalised once, as a whole, at the training tiles'
    scale; overlapping tiles are predicted in batches and their *probabilities* blended with
    a smooth window; the threshold is applied once, after blending, at the original
    resolution. Touching beads are split (``microbead_metrics.label_beads``). This script
    is the entry point (arguments, output folder, summaries, exit codes); the work is done
    by ``prediction.py`` (one frame), ``prediction_pipeline.py`` (many frames, overlapped)
    and ``frame_outputs.py`` (one frame's files).

Inputs
    ``--model``: a ``best_<model>_model.hdf5`` / ``.keras`` file with ``config.json`` beside
    it, or a run folder (then the model with the best validation Jaccard in its
    ``training_summary.csv`` is used). ``--input_dir``: images (.tif/.png/.jpg/.bmp, 8/16-bit,
    gray/RGB).

Outputs (``--output_dir``)
    ``masks/<stem>_mask.png`` (0/255, original size), ``labels/<stem>_labels.tif`` (bead ids),
    ``overlays/<stem>_overlay.png``, ``comparisons/<stem>_comparison.png`` (image |
    probability | outlines), optional ``prob/<stem>_prob.tif``, ``prediction_summary.csv``,
    ``prediction_summary.txt``, ``prediction_config.json``, ``prediction.log`` and, when file
    names carry a dilution (``640x_...``), ``dilution_counts.csv`` + ``dilution_counts.png``.
    Per bead (``bead_exports.py``, from the label image, frame pixels): ``beads/<stem>_beads.csv``
    and, on request, ``rois/<stem>_rois.zip`` (``--roi``, Fiji), ``geojson/<stem>.geojson``
    (``--geojson``, QuPath), ``ome/<stem>.ome.tif`` (``--ome_tiff``, image + labels).

Example
    python predict_microscope.py --model microbead_training_20260101_120000 \
        --input_dir new_frames/ --output_dir predictions/
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import bead_filter
import cli
import microbead_config as mcfg
import microbead_io as mio
import prediction
import prediction_pipeline
import runtime

log = logging.getLogger("microbead.predict")

LOG_NAME = "prediction.log"
#: Every file predict writes in --output_dir (globs). The run's output_manifest.json lists
#: those it wrote, and --overwrite removes those first, nothing else: a stale mask of a frame
#: no longer in --input_dir would otherwise be paired by evaluate_predictions.py as if it
#: were a fresh prediction. A file matching these that no manifest lists is refused.
OUTPUT_FILES = (
    "masks/*_mask.png", "labels/*_labels.tif", "overlays/*_overlay.png",
    "comparisons/*_comparison.png", "prob/*_prob.tif", "beads/*_beads.csv",
    "rois/*_rois.zip", "geojson/*.geojson", "ome/*.ome.tif",
    "prediction_summary.csv", "prediction_summary.txt", "prediction_config.json",
    "dilution_counts.csv", "dilution_counts.png", LOG_NAME,
)

SUMMARY_COLUMNS = (
    "file", "width", "height", "dilution", "beads", "n_components", "coverage_pct",
    "mean_bead_area_px", "area_estimate", "bead_area_ratio", "scale_used", "scale_warning",
    "rejected_objects", "time_s", "status",
)
#: Columns of ``dilution_counts.csv``.
DILUTION_COLUMNS = ("file", "dilution", "beads", "area_mp", "beads_per_mp")
#: Smallest --tile_size accepted at parse time (model px); it must also be a multiple of
#: the run's pad multiple, checked once config.json is read.
MIN_TILE = 16
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


def fit_dilution_series(dilutions, counts) -> dict:
    """Least-squares fit of log10(count) = a + b log10(dilution) over images with count > 0.

    ``counts`` may be densities (beads per megapixel), as ``write_dilution_outputs`` gives.

    A perfect dilution series has slope b = -1 (half the beads per doubling). Returns
    ``slope``, ``intercept``, ``r2``, ``n`` (images used) and ``skipped``: "" when fitted,
    else why no line was fitted (fewer than two images with beads, or one dilution only:
    a line through one dilution has no slope), with NaN numbers.
    """
    d = np.asarray(dilutions, float)
    c = np.asarray(counts, float)
    ok = (d > 0) & (c > 0)
    levels = np.unique(d[ok])
    skipped = ""
    if levels.size == 1:
        skipped = (f"every image with beads is at one dilution ({levels[0]:g}x); a slope "
                   "needs at least two dilutions")
    elif levels.size == 0:
        skipped = "no image with beads and a dilution in its name"
    if skipped:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"),
                "n": int(ok.sum()), "skipped": skipped}
    x, y = np.log10(d[ok]), np.log10(c[ok])
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": float(b), "intercept": float(a), "r2": r2, "n": int(ok.sum()),
            "skipped": ""}


def dilution_fit_text(fit: dict) -> str:
    """One line on a :func:`fit_dilution_series` result, for the log and the summary."""
    if fit.get("skipped"):
        return f"dilution series: no fit ({fit['skipped']})"
    return (f"dilution series: log-log slope {fit['slope']:.3f} (ideal -1), "
            f"R² {fit['r2']:.3f} over {fit['n']} images")


def write_dilution_outputs(out_dir: Path, rows: list[dict]) -> dict | None:
    """``dilution_counts.csv`` and a log-log plot of bead density (beads per megapixel of
    frame, as ``quantify_assay.py`` without ``--um_per_px``) with the fitted slope, if names
    carry a dilution. Density, not beads per image: frames of one series may differ in size.
    """
    pts = [(r["dilution"], r["beads"] / (r["width"] * r["height"] / 1e6), r["beads"],
            r["width"] * r["height"] / 1e6, r["file"]) for r in rows
           if r["status"] == "ok" and r.get("dilution") and r["width"] * r["height"] > 0]
    if not pts:
        return None
    fit = fit_dilution_series([p[0] for p in pts], [p[1] for p in pts])
    mio.atomic_write_csv(out_dir / "dilution_counts.csv", [
        {"file": f, "dilution": d, "beads": c, "area_mp": f"{mp:.6g}",
         "beads_per_mp": f"{dens:.6g}"} for d, dens, c, mp, f in sorted(pts)], DILUTION_COLUMNS)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    d = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    floor = 0.5 / max(p[3] for p in pts)  # an image without beads, drawn at half a bead
    ax.scatter(d, np.maximum(y, floor), color="tab:blue", zorder=3, label="frames")
    if math.isfinite(fit["slope"]):
        xs = np.geomspace(d.min(), d.max(), 50)
        ax.plot(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), color="tab:red",
                label=f"fit: slope {fit['slope']:.2f}, R² {fit['r2']:.3f}")
        ref = 10 ** (fit["intercept"] + fit["slope"] * np.log10(d.min()))
        ax.plot(xs, ref * d.min() / xs, "k--", lw=0.8, label="ideal slope -1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dilution (x)")
    ax.set_ylabel("bead density (beads per megapixel)")
    ax.set_title("Bead density across the dilution series"
                 + ("\n(no line fitted: see prediction_summary.txt)" if fit["skipped"]
                    else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dilution_counts.png", dpi=110)
    plt.close(fig)
    return fit


def write_summaries(out_dir: Path, rows: list[dict], meta: dict, fit: dict | None) -> None:
    mio.atomic_write_csv(out_dir / "prediction_summary.csv", rows, SUMMARY_COLUMNS)
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [
        "Microbead prediction summary",
        "============================",
        f"model:      {meta['model']}",
        f"chosen as:  {meta['note']}",
        f"threshold:  {meta['threshold']}",
        f"scale:      {meta['scale']:.4g} model px per frame px; tile {meta['tile_size']} px, "
        f"overlap {meta['overlap']} px, TTA {'on' if meta['tta'] else 'off'}",
        *([f"INTERRUPTED: {meta['interrupted']}"] if meta.get("interrupted") else []),
        f"images:     {len(ok)} ok, {len(rows) - len(ok)} failed"
        + (f"; {meta['wall_s']:.1f} s wall ({meta['wall_s'] / max(1, len(rows)):.2f} s/image; "
           "per-image times below overlap)" if "wall_s" in meta else ""),
        "",
        f"{'file':<48} {'size':>11} {'beads':>6} {'area est':>8} {'cover %':>8} {'time s':>7}",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"{r['file'][:48]:<48} {r['width']:>5}x{r['height']:<5} {r['beads']:>6} "
                f"{r['area_estimate']:>8.1f} {r['coverage_pct']:>8.2f} {r['time_s']:>7.2f}")
        else:
            lines.append(f"{r['file'][:48]:<48} FAILED: {r['status']}")
    if ok:
        lines += ["", f"total beads: {sum(r['beads'] for r in ok)}; mean per image "
                      f"{np.mean([r['beads'] for r in ok]):.1f}"]
    if fit:
        lines.append(dilution_fit_text(fit))
    (out_dir / "prediction_summary.txt").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    add = functools.partial(cli.add_option, p)
    add("model", required=True, help="model file (.hdf5/.keras) or run folder")
    add("input_dir", required=True, help="folder of images to predict")
    add("output_dir", required=True, help="folder for the outputs (created)")
    add("threshold", type=cli.ranged(float, 0, 1, lo_open=True, hi_open=True), default=None,
        help="probability cut, 0 < t < 1 (default: the run's config.json)")
    add("tile_size", type=cli.ranged(int, MIN_TILE), default=prediction.DEFAULT_TILE_SIZE,
        help="max tile edge in model pixels, a multiple of the network's pad multiple "
             "(config.json, 16 at depth 4) (a 3840x2160 frame at the usual 0.5 scale is "
             "one tile; lower it if the GPU runs out of memory)")
    add("overlap", type=cli.ranged(int, 0), default=None,
        help="minimum tile overlap in model pixels (default: the network's receptive field, "
             "208 px at depth 4, so tiled equals whole-frame prediction; tiling.default_overlap)")
    add("batch_size", type=cli.ranged(int, 1), default=prediction.DEFAULT_BATCH_SIZE,
        help="tiles per forward pass (bounds memory)")
    add("tta", action="store_true", help="flip/rotation test-time augmentation (8x slower)")
    add("save_prob", action="store_true", help="also write prob/<stem>_prob.tif (float32)")
    add("no_figures", action="store_true", help="skip overlays and comparison images")
    add("roi", action="store_true",
        help="also write rois/<stem>_rois.zip, an ImageJ ROI set of the bead outlines for "
             "Fiji's ROI Manager (needs: pip install roifile)")
    add("geojson", action="store_true",
        help="also write geojson/<stem>.geojson, the beads as QuPath detections")
    add("ome_tiff", action="store_true",
        help="also write ome/<stem>.ome.tif: the frame and its bead labels as two channels")
    cli.add_overwrite(p)
    add("workers", type=cli.ranged(int, 1), default=None,
        help="threads reading and as many writing frames (default: CPUs/2, 1 to 8)")
    add("auto_scale", action="store_true",
        help="when a frame's beads are not the training beads' size (scale_warning), "
             "rescale it to match and predict again")
    add("no_pipeline", action="store_true",
        help="run read, forward pass and writing one after the other (default: overlapped)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = [runtime.add_log_handler()]
    runtime.configure_threads()
    try:
        return _checked_run(args, handlers)
    except KeyboardInterrupt:  # before the frames started (their loop reports its own)
        log.error("interrupted before any frame was predicted")
        return EXIT_INTERRUPTED
    finally:
        runtime.remove_log_handlers(handlers)


def stem_clashes(files) -> list[str]:
    """One line per output stem that two or more inputs share (``a.png`` and ``a.tif``):
    their outputs (``masks/a_mask.png`` ...) would overwrite each other."""
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(Path(f).stem, []).append(Path(f))
    return [f"{', '.join(str(p) for p in group)}: one stem {stem!r}, one set of output files; "
            "rename all but one" for stem, group in sorted(by_stem.items()) if len(group) > 1]


def _checked_run(args, handlers: list) -> int:
    """Usage checks (nothing written), the output-folder policy, the log file, the run."""
    if args.roi:
        import bead_exports

        try:
            bead_exports.require_roifile()
        except ImportError as exc:
            return cli.fatal(log, "%s", exc)
    out_dir = Path(args.output_dir)
    # Frames are read from --input_dir, never written there; the run folder of --model may
    # hold a predictions folder, but the output folder must not hold the model.
    where = {"protected": [args.input_dir], "inputs": [args.model]}
    try:  # the cheap refusal first; claim_output_dir below repeats it, then cleans
        cli.check_output_dir(out_dir, overwrite=args.overwrite, log_name=LOG_NAME, **where)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    try:
        files = mio.list_images(args.input_dir)
    except FileNotFoundError as exc:
        return cli.fatal(log, "%s", exc)
    if not files:
        return cli.fatal(log, "%s: no images found (%s)", args.input_dir,
                         ", ".join(mio.IMAGE_EXTENSIONS))
    clashes = stem_clashes(files)
    if clashes:  # before any work: one frame's outputs would silently replace the other's
        log.error("%d input name clash(es), nothing predicted:\n  %s", len(clashes),
                  "\n  ".join(clashes))
        return cli.EXIT_PARTIAL
    try:
        model_path, cfg_path, note = prediction.resolve_model(args.model)
        cfg = prediction.read_run_config(cfg_path)
    except prediction.PredictionError as exc:
        return cli.fatal(log, "%s", exc)
    pad = int(cfg["preprocessing"].get("pad_multiple", 16))
    if args.tile_size % pad or args.tile_size < pad:
        return cli.fatal(log, "--tile_size %d: must be a multiple of %d, the network's pad "
                         "multiple (%s); e.g. %d", args.tile_size, pad, cfg_path,
                         max(pad, args.tile_size // pad * pad))
    try:
        claim = cli.claim_output_dir(out_dir, OUTPUT_FILES, script="predict_microscope",
                                     overwrite=args.overwrite, log_name=LOG_NAME, **where)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    with claim:
        handlers.append(runtime.add_log_handler(out_dir / LOG_NAME))
        claim.report(log)
        if claim.removed:
            log.info("--overwrite: removed %d file(s) of the previous prediction in %s",
                     len(claim.removed), out_dir)
        return _run(args, files, model_path, cfg, note, out_dir)


def _run(args, files, model_path, cfg, note, out_dir: Path) -> int:
    from tqdm import tqdm

    import models

    cfg = mcfg.for_model(cfg, mcfg.model_name_of(model_path))
    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    pad = int(pre.get("pad_multiple", 16))
    tile = args.tile_size  # a multiple of pad (checked in _checked_run)
    threshold = float(post["threshold"] if args.threshold is None else args.threshold)
    log.info("model: %s", note)
    log.info("preprocessing from config: scale %.4g (pixel_scale %.4g), %d channel(s), %s; "
             "threshold %.3f; median bead area %.1f px (model scale)", pre["scale"],
             pre["pixel_scale"], pre["channels"], pre["normalization"], threshold,
             post["median_bead_area_px"])
    log.info("object filter: %s", bead_filter.describe(post.get("object_filter")))
    if post.get("predicted_bead_area_px"):
        log.info("scale check against the model's own beads on its validation tiles: %.1f px "
                 "(model scale)", post["predicted_bead_area_px"])
    try:
        model = models.load_model(model_path)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return cli.fatal(log, "%s", msg if str(model_path) in msg else f"{model_path}: {msg}")
    log.info("%s", models.device_line())
    predict_fn = prediction.tta_predict_fn(prediction.make_keras_predict_fn(model), args.tta)
    depth = prediction.network_depth(model, pad)
    overlap, overlap_source = prediction.resolve_overlap(args.overlap, depth)
    log.info("tiles of at most %d px, overlap %d px (%s)", tile, overlap, overlap_source)
    if overlap > tile - pad:
        log.warning("--tile_size %d leaves room for an overlap of only %d px (< %d): frames "
                    "larger than one tile are not predicted exactly as a whole; use "
                    "--tile_size >= %d", tile, tile - pad, overlap, 2 * overlap + pad)
    meta = {"model": str(model_path), "note": note, "threshold": threshold,
            "scale": float(pre["scale"]), "tile_size": tile, "overlap": overlap,
            "overlap_source": overlap_source, "network_depth": depth, "tta": args.tta}
    (out_dir / "prediction_config.json").write_text(json.dumps(
        {**meta, "input_dir": str(Path(args.input_dir).resolve()), "run_config": cfg},
        indent=2))
    subdirs = ["masks", "labels"] + ([] if args.no_figures else ["overlays", "comparisons"])
    subdirs += ["prob"] if args.save_prob else []
    for sub in subdirs:
        (out_dir / sub).mkdir(exist_ok=True)

    bar = tqdm(total=len(files), desc="predicting", unit="img")
    finished: list[dict] = []

    def on_row(row):
        finished.append(row)
        bar.update(1)
        if row["status"] == "ok":
            bar.set_postfix(beads=row["beads"])

    t0 = time.perf_counter()
    try:
        rows = prediction_pipeline.predict_files(
            files, predict_fn, cfg, out_dir, tile_size=tile, overlap=overlap,
            batch_size=args.batch_size, threshold=threshold, save_prob=args.save_prob,
            figures=not args.no_figures, pipelined=not args.no_pipeline,
            workers=args.workers, on_row=on_row,
            exports=frozenset(k for k in ("roi", "geojson", "ome_tiff") if getattr(args, k)),
            auto_scale=args.auto_scale)
    except KeyboardInterrupt:
        bar.close()
        # What finished is kept and summarised; the frames not reached are named as such.
        meta["wall_s"] = time.perf_counter() - t0
        meta["n_images"] = len(finished)
        meta["interrupted"] = f"interrupted after {len(finished)} of {len(files)} frames"
        log.error("%s; the summary lists the finished frames only", meta["interrupted"])
        write_summaries(out_dir, finished, meta, write_dilution_outputs(out_dir, finished))
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    meta["wall_s"] = wall
    meta["n_images"] = len(rows)
    fit = write_dilution_outputs(out_dir, rows)
    write_summaries(out_dir, rows, meta, fit)
    failed = [r for r in rows if r["status"] != "ok"]
    if fit:
        log.info("%s", dilution_fit_text(fit))
    if failed:
        log.error("%d of %d image(s) failed:\n  %s", len(failed), len(rows),
                  "\n  ".join(r["status"] for r in failed))
        return 1
    log.info("done: %d image(s) in %.1f s (%.2f s/image) -> %s", len(rows), wall,
             wall / max(1, len(rows)), out_dir)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hides cuInit E0000 without a GPU
    sys.exit(main())

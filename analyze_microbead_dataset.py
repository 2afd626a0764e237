"""Check a microbead dataset and summarise it before anyone spends GPU hours on it.

What it does, in order:

1. **Integrity check** (every file read through ``microbead_io``): image/mask pairing,
   unpaired and unreadable files, mask value sets (0/255, 0/1, anti-aliased ...), image/mask
   size mismatches, duplicate images (identical decoded pixels), empty and nearly full masks,
   images whose contrast looks inverted relative to their mask, blank images. One row per
   problem in ``integrity_problems.csv`` and a table in the report.
2. **Statistics** per image and overall, on the masks *as training sees them*: each mask is
   binarized and resized to ``--image_size`` (default: the stored tile size, as training) with
   ``microbead_io.resize_mask`` and each image resized, then flat-field normalised with the
   spec the trainer computes for the same tiles (``microbead_io.flatfield_spec``). Objects per image
   (8-connected components) and a touching-bead-aware bead count
   (``microbead_metrics.count_beads``), positive-pixel ratio, object areas and equivalent
   diameters, brightness, contrast, focus, partial-mask suspects, per-dilution groups.
3. **Recommended training configuration** (``recommended_config.json``, loadable by
   ``train_microbead_optimized.py --config``) with the evidence behind each value in
   ``recommended_config_evidence.json`` and in the report.
4. **Label quality** (``label_quality``, at native resolution): each mask against its own
   image's darkness map: offset masks (best shift within +-6 px, with the gain), masks that
   mark almost none of their image's beads (with the image they match best: the mask of
   another tile?), bead-sized dark blobs left out, objects merging several beads; and the
   agreement of neighbouring grid tiles' masks on the pixels they share: the
   label-consistency ceiling. Per-file rows in ``integrity_problems.csv``,
   ``label_quality.csv``, ``overlap_pairs.csv``, ``label_quality.png``, a report section and
   ``summary.json`` keys ``label_quality`` and ``label_consistency_ceiling``.
   ``--write_fixed DIR`` writes a corrected copy of the dataset (offset masks shifted back,
   every other file copied byte for byte); the data folder is never written to.

Code
----
This script parses the options, claims the output folder and writes the files; the work is
done in modules: ``dataset_integrity`` (1), ``dataset_stats`` (2, and ``analyze_dataset``,
which runs every step), ``config_recommendation`` (3), ``label_audit`` on ``label_quality``
(4), ``analysis_report`` (the markdown report) and ``analysis_figures`` (the PNG figures).

Inputs
------
``DATA/images/<stem>.png|tif|...`` and ``DATA/masks/<stem>[_mask].png|tif``; paired by
``microbead_io.pair_files``. ``DATA/dataset.json`` (optional) is read for ``pixel_scale``.
Full frames under ``DATA/large/`` are not analysed (they are not training tiles).

Outputs (in ``--output_dir``; never inside ``--data_dir``)
----------------------------------------------------------
``summary.json``, ``per_image.csv``, ``per_dilution.csv``, ``integrity_problems.csv``,
``sample_images.png``, ``distribution_analysis.png``, ``MICROBEAD_ANALYSIS_RESULTS.md``,
``recommended_config.json``, ``recommended_config_evidence.json``, ``label_quality.csv``,
``overlap_pairs.csv``, ``label_quality.png``, ``analysis.log`` and
``analysis_manifest.json``. An existing non-empty output folder is refused unless
``--overwrite``, which replaces only these files (anything else in it is left alone) and
still refuses a folder holding files of these names without this script's manifest.

Exit status
-----------
0: analysed. 1: some files could not be analysed (unreadable, unpaired, size mismatch: the
other files are still analysed and the failures listed), or ``--strict`` and any integrity
problem at all. 2: nothing to analyse, or a bad data/output folder.

Example
-------
    python analyze_microbead_dataset.py --data_dir dataset_microscope \\
        --output_dir dataset_analysis --image_size 256
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import cli
import microbead_io as mio
import runtime
from analysis_figures import plot_distributions, plot_label_quality, plot_samples
from analysis_report import render_report
from config_recommendation import DEFAULT_VAL_FRACTION
from dataset_stats import PER_IMAGE_COLUMNS, Analysis, analyze_dataset, per_image_rows
from label_audit import (
    LABEL_COLUMNS,
    OVERLAP_COLUMNS,
    fixed_dir_problem,
    label_rows,
    overlap_rows,
    write_fixed_copy,
)

log = logging.getLogger("microbead.analyze")

SCRIPT_NAME = "analyze_microbead_dataset.py"

MANIFEST = "analysis_manifest.json"
LOG_FILE = "analysis.log"
REPORT = "MICROBEAD_ANALYSIS_RESULTS.md"
OUTPUT_FILES = (
    "summary.json", "per_image.csv", "per_dilution.csv", "integrity_problems.csv",
    "sample_images.png", "distribution_analysis.png", REPORT, "recommended_config.json",
    "recommended_config_evidence.json", "label_quality.csv", "overlap_pairs.csv",
    "label_quality.png", LOG_FILE, MANIFEST,
)


# --------------------------------------------------------------------------- output folder


def check_output_dir(output_dir: Path, data_dir: Path, *,
                     overwrite: bool = False) -> cli.OutputClaim:
    """Apply the output-folder policy (``cli.claim_output_dir``); create and lock the folder.

    Refused: a folder inside the data folder; an existing non-empty folder without
    ``overwrite``; and, even with ``overwrite``, one holding files named like this script's
    outputs but no manifest of this script (they are someone else's results). ``overwrite``
    removes this script's files only; anything else in the folder is left alone. Returns
    the claim (release it when the run ends).

    Raises
    ------
    cli.OutputDirError
        One-line message naming the folder or the clashing files; nothing was changed.
    """
    out = Path(output_dir)
    if out.is_dir() and overwrite and not _has_own_manifest(out):
        clashes = [f for f in OUTPUT_FILES if (out / f).exists() and f != LOG_FILE]
        if clashes:
            raise cli.OutputDirError(
                f"{output_dir}: holds {', '.join(clashes)} not written by {SCRIPT_NAME} (no "
                f"{MANIFEST}); choose another --output_dir or remove them")
    return cli.claim_output_dir(out, OUTPUT_FILES, script=SCRIPT_NAME, overwrite=overwrite,
                                protected=[data_dir], log_name=LOG_FILE)


def _has_own_manifest(out: Path) -> bool:
    try:
        return json.loads((out / MANIFEST).read_text()).get("generator") == SCRIPT_NAME
    except (ValueError, OSError, AttributeError):
        return False


# --------------------------------------------------------------------------- writers


def _write_csv(path: Path, header, rows) -> None:
    """Positional rows under ``header``, through :func:`microbead_io.atomic_write_csv`."""
    header = list(header)
    mio.atomic_write_csv(path, [dict(zip(header, r)) for r in rows], header)


def write_outputs(analysis: Analysis, out: Path, *, t0: float, command: str) -> dict:
    """Write every output file; returns the summary as written."""
    out.mkdir(parents=True, exist_ok=True)
    mio.atomic_write_json(out / MANIFEST, {"generator": SCRIPT_NAME,
                                           "files": list(OUTPUT_FILES)})
    _write_csv(out / "integrity_problems.csv", ["file", "problem", "detail", "severity"],
               [[p.file, p.problem, p.detail, p.severity] for p in analysis.problems])
    _write_csv(out / "per_image.csv", PER_IMAGE_COLUMNS, per_image_rows(analysis))
    dil = analysis.summary["per_dilution"]
    cols = ["dilution", "n_images", "mean_objects_per_image", "std_objects_per_image",
            "mean_beads_per_image", "std_beads_per_image", "mean_positive_ratio",
            "mean_brightness", "partial_mask_suspects"]
    _write_csv(out / "per_dilution.csv", cols,
               [[k] + [mio.json_ready(v[c]) for c in cols[1:]] for k, v in dil.items()])
    plot_distributions(analysis, out / "distribution_analysis.png")
    samples = plot_samples(analysis, out / "sample_images.png")
    _write_csv(out / "label_quality.csv", LABEL_COLUMNS, label_rows(analysis))
    _write_csv(out / "overlap_pairs.csv", OVERLAP_COLUMNS, overlap_rows(analysis))
    plot_label_quality(analysis, out / "label_quality.png")
    summary = dict(analysis.summary)
    summary.pop("objects_per_image", None)  # per image: per_image.csv
    summary["sample_images"] = samples
    summary["runtime_s"] = round(time.perf_counter() - t0, 3)
    mio.atomic_write_json(out / "summary.json", summary)
    mio.atomic_write_json(out / "recommended_config.json", analysis.config)
    mio.atomic_write_json(out / "recommended_config_evidence.json", analysis.evidence)
    mio.atomic_write_text(out / REPORT, render_report(analysis, samples=samples,
                                                      runtime_s=summary["runtime_s"],
                                                      command=command))
    return summary


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (every underscore flag also accepts its hyphenated spelling)."""
    p = argparse.ArgumentParser(
        description="Integrity check, statistics and a recommended training config for a "
                    "microbead dataset (DATA/images + DATA/masks). Runs without TensorFlow.",
        formatter_class=cli.HelpFormatter)
    cli.add_option(p, "data_dir", default="dataset_microscope", type=Path,
                   help="dataset folder with images/ and masks/")
    cli.add_option(p, "output_dir", default="dataset_analysis", type=Path,
                   help="results folder, never inside --data_dir")
    cli.add_option(p, "image_size", default=0, type=int,
                   help="size masks/images are resized to, as in training; 0 = the stored "
                        "tile size (what training uses by default)")
    cli.add_option(p, "val_fraction", default=DEFAULT_VAL_FRACTION, type=float,
                   help="validation fraction the batch-size recommendation assumes")
    cli.add_option(p, "strict", action="store_true",
                   help="exit 1 if the integrity check finds any problem, warnings included")
    cli.add_option(p, "no_progress", action="store_true", help="no progress bars")
    cli.add_option(p, "write_fixed", type=Path, default=None, metavar="DIR",
                   help="write a corrected copy of the dataset to DIR (new or empty, outside "
                        "--data_dir): offset masks shifted back, every other file copied "
                        "unchanged (default: off)")
    cli.add_overwrite(p)
    args = p.parse_args(argv)
    if args.image_size and args.image_size < 16:
        p.error(f"--image_size must be 0 (stored size) or >= 16, got {args.image_size}")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    return args


def _quiet_opencv() -> int | None:
    """Silence OpenCV's native decoder chatter (we report each unreadable file in one line);
    returns the previous level, None where this OpenCV build has no logging API."""
    try:
        from cv2.utils import logging as cvlog

        previous = cvlog.getLogLevel()
        cvlog.setLogLevel(cvlog.LOG_LEVEL_SILENT)
        return previous
    except (ImportError, AttributeError):
        return None


def main(argv=None) -> int:
    """Run the analysis; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    cv_level = _quiet_opencv()
    handlers = [runtime.add_log_handler()]
    runtime.configure_threads()
    command = "python " + " ".join([SCRIPT_NAME, *(sys.argv[1:] if argv is None else argv)])
    claim = None
    try:
        if not args.data_dir.is_dir():  # a typo creates no output folder
            return cli.fatal(log, "%s: data folder not found", args.data_dir)
        if args.write_fixed is not None:
            reason = fixed_dir_problem(args.write_fixed, args.data_dir, args.output_dir)
            if reason:
                return cli.fatal(log, "%s", reason)
        try:
            claim = check_output_dir(args.output_dir, args.data_dir, overwrite=args.overwrite)
        except cli.OutputDirError as exc:
            return cli.fatal(log, "%s", exc)
        handlers.append(runtime.add_log_handler(args.output_dir / LOG_FILE, mode="w"))
        claim.report(log)
        log.info("analysing %s at %s -> %s", args.data_dir,
                 f"{args.image_size} px" if args.image_size else "the stored tile size",
                 args.output_dir)
        try:
            analysis = analyze_dataset(args.data_dir, image_size=args.image_size,
                                       progress=not args.no_progress,
                                       val_fraction=args.val_fraction)
        except (FileNotFoundError, mio.PairingError) as exc:
            return cli.fatal(log, "%s", exc)
        if args.write_fixed is not None and analysis.records:
            analysis.labels["fixed"] = write_fixed_copy(analysis, args.write_fixed)
            analysis.summary["label_quality"]["fixed"] = analysis.labels["fixed"]
        summary = write_outputs(analysis, args.output_dir, t0=t0, command=command)
        for p in analysis.problems:
            (log.error if p.severity == "error" else log.warning)(
                "%s: %s: %s", p.file, p.problem, p.detail)
        n_err = sum(p.severity == "error" for p in analysis.problems)
        log.info("%d pairs analysed in %.1f s; %d integrity problem(s) (%d file(s) not "
                 "analysed); mask encoding %s; %d partial-mask suspect(s); report %s",
                 summary["dataset_size"], summary["runtime_s"], len(analysis.problems), n_err,
                 summary["mask_encoding_overall"], summary["partial_mask_suspects"],
                 args.output_dir / REPORT)
        if not analysis.records:
            return cli.fatal(log, "%s: no image/mask pair could be analysed", args.data_dir)
        if n_err or (args.strict and analysis.problems):
            return 1
        return 0
    finally:
        if claim is not None:  # the manifest of what was written; the lock goes
            claim.release()
        runtime.remove_log_handlers(handlers)
        if cv_level is not None:
            from cv2.utils import logging as cvlog

            cvlog.setLogLevel(cv_level)


if __name__ == "__main__":
    sys.exit(main())

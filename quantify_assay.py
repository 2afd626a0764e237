"""Turn bead counts into an assay: calibration curve, limits of blank, detection, quantitation.

Across a dilution series the bead density (beads per imaged area) is fitted against
concentration, and the detection limits follow from the blanks, the low end of the curve and
the spread between replicates. The statistics (and their method) are in :mod:`assay_stats`,
the report text in :mod:`assay_report`; this script reads the inputs and writes the outputs.
Runs without TensorFlow.

Inputs
------
``--predictions``: ``predict_microscope.py``'s output folder or its ``prediction_summary.csv``
  (``file, width, height, beads``; rows whose ``status`` is not ``ok`` are listed, excluded).
``--samples`` (optional): sheet of ``file`` (name, stem or glob; exact matches beat globs,
  else the first glob row wins), ``concentration``, ``unit``, ``replicate``, ``blank``.
  Without it the concentration comes from the file name: ``1.5625pM_...`` (aM-mM; ``0pM``
  is a blank) or a dilution ``160x_...`` (1/160, unit ``1/dilution``). Files that match
  nothing are listed, never guessed.
``--um_per_px``: densities per mm² of imaged area (default: per megapixel of image).
``--model RUN_DIR``: the training run whose ``validation_counts.csv`` gives the model's own
  counting error (the model named in ``prediction_config.json``, else the best of
  ``training_summary.csv``); without it the uncertainty is Poisson only.
``--truth``: CSV of ``file`` and ``n_true`` / ``n_beads`` / ``true_count`` (e.g.
  ``evaluate_predictions.py``'s ``per_image_metrics.csv``): the true curve beside the fit.

Outputs (``--output_dir``; a non-empty folder is refused unless ``--overwrite``, which
replaces only these files)
------------------------------------------------------------------------------------------
``assay_results.json``, ``per_image.csv``, ``per_sample.csv``, ``calibration.png``,
``residuals.png``, ``ASSAY_REPORT.md``, ``quantify_assay.log``. Exit status 0 on success,
1 when images or sheet rows were left out (each named), 2 on unusable input.

Example
-------
    python quantify_assay.py --predictions predictions/ --samples samples.csv \\
        --um_per_px 0.345 --model microbead_training_20260101_120000 --output_dir assay/
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np

import assay_report as ar
import assay_stats as stats
import cli
import microbead_io as mio
import reporting
import runtime
from assay_inputs import (
    GLOB_CHARS,
    AssayError,
    assign_concentrations,
    check_units,
    read_predictions,
    read_sample_sheet,
    read_table,
    read_truth,
    resolve_summary,
    unused_sheet_rows,
)

log = logging.getLogger("microbead.assay")

PRED_CONFIG_NAME = "prediction_config.json"
VALIDATION_COUNTS_NAME = "validation_counts.csv"
TRAINING_SUMMARY_NAME = "training_summary.csv"
RESULTS_NAME = "assay_results.json"
PER_IMAGE_NAME = "per_image.csv"
PER_SAMPLE_NAME = "per_sample.csv"
FIG_CALIBRATION = "calibration.png"
FIG_RESIDUALS = "residuals.png"
REPORT_NAME = "ASSAY_REPORT.md"
LOG_NAME = "quantify_assay.log"
OUTPUT_FILES = (RESULTS_NAME, PER_IMAGE_NAME, PER_SAMPLE_NAME, FIG_CALIBRATION, FIG_RESIDUALS,
                REPORT_NAME, LOG_NAME)

# --------------------------------------------------------------------------- counting error


def _model_of_predictions(pred_dir: Path) -> tuple[str | None, int | None, str]:
    """Model name and fold of the model file named in ``prediction_config.json``."""
    cfg_path = pred_dir / PRED_CONFIG_NAME
    if not cfg_path.is_file():
        return None, None, f"{cfg_path} not found"
    try:
        model_file = Path(json.loads(cfg_path.read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, None, f"{cfg_path}: no model file named ({exc})"
    m = re.fullmatch(r"best_(.+)_model", model_file.stem)
    if not m:
        return None, None, f"{cfg_path}: model file {model_file.name} is not best_<name>_model"
    f = re.fullmatch(r"fold_(\d+)", model_file.parent.name)
    return m.group(1), (int(f.group(1)) if f else None), f"{cfg_path} names {model_file}"


def _best_model_of_run(run_dir: Path) -> tuple[str | None, int | None, str]:
    """Model (and fold) with the highest ``best_val_jacard`` in ``training_summary.csv``."""
    path = run_dir / TRAINING_SUMMARY_NAME
    if not path.is_file():
        return None, None, f"{path} not found"
    try:
        _, rows = read_table(path, "training summary")
        rows = [r for r in rows if r.get("best_val_jacard") and r.get("model")]
        best = max(rows, key=lambda r: float(r["best_val_jacard"]))
    except (AssayError, ValueError) as exc:
        return None, None, f"{path}: no usable model ({exc})"
    fold = int(best["fold"]) if (best.get("fold") or "").strip().isdigit() else None
    return best["model"], fold, (f"{best['model']} has the best val Jaccard "
                                 f"{float(best['best_val_jacard']):.4f} in {path}")


def load_count_error(run_dir: str | Path, pred_dir: Path | None = None,
                     ) -> tuple[stats.CountErrorModel | None, str]:
    """The counting-error model of the model that made the predictions, and a note.

    Returns ``(None, reason)`` when ``validation_counts.csv`` or the model's rows are missing
    (uncertainty then Poisson only). Never raises for a missing or unreadable file.
    """
    run_dir = Path(run_dir)
    name, fold, how = (None, None, "")
    if pred_dir is not None:
        name, fold, how = _model_of_predictions(pred_dir)
    if name is None:
        name, fold, how2 = _best_model_of_run(run_dir)
        how = f"{how}; {how2}" if how else how2
    if name is None:
        return None, f"no model to take the counting error from ({how})"
    if fold is not None:
        candidates = [run_dir / f"fold_{fold:02d}" / VALIDATION_COUNTS_NAME]
    else:
        candidates = [run_dir / VALIDATION_COUNTS_NAME]
        if not candidates[0].is_file():
            candidates = sorted(run_dir.glob(f"fold_*/{VALIDATION_COUNTS_NAME}"))
    files = [c for c in candidates if c.is_file()]
    if not files:
        where = candidates[0] if candidates else run_dir / VALIDATION_COUNTS_NAME
        return None, f"{where} not found"
    t, p, a = [], [], []
    for f in files:
        try:
            header, rows = read_table(f, "validation counts")
        except AssayError as exc:
            return None, str(exc)
        need = {"model", "n_true", "n_pred", "area_px"}
        if not need <= set(header):
            return None, f"{f}: missing column(s) {', '.join(sorted(need - set(header)))}"
        for r in rows:
            if r["model"] != name:
                continue
            try:
                t.append(float(r["n_true"]))
                p.append(float(r["n_pred"]))
                a.append(float(r["area_px"]))
            except ValueError:
                continue
    src = ", ".join(str(f) for f in files)
    model = stats.fit_count_error(t, p, a)
    if model is None:
        return None, f"{src}: fewer than 2 validation tiles with beads for model {name}"
    model.model, model.source = name, src
    return model, f"model {name} ({how}); {int(model.n_tiles.sum())} validation tiles in {src}"


# --------------------------------------------------------------------------- figures


def _blank_x(reps: stats.Replicates) -> float:
    """Where blanks are drawn on the log axis: a quarter of the lowest concentration."""
    pos = reps.x[reps.x > 0]
    return float(pos.min()) / 4 if pos.size else 1.0


def _log_x_axis(ax, reps: stats.Replicates, unit: str) -> None:
    """Log concentration axis without crowded minor labels; blanks marked at their spot."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if reps.blank.any():
        xb = _blank_x(reps)
        ax.axvline(xb * 1.6, color="lightgrey", lw=0.8)
        ax.annotate("blank", (xb, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel(f"concentration ({unit or 'no unit'}), log axis")


#: Colour, line style and legend note of each fit that is not the chosen one (the chosen one
#: is solid red). A straight line only looks straight on the axes it was fitted on.
FIT_STYLES = {
    "linear": ("tab:orange", "--", " (straight on linear axes; curved on this log x axis)"),
    "loglog": ("tab:cyan", "-.", " (straight on log-log axes, right panel)"),
    "4pl": ("tab:brown", (0, (1, 1.5)), " (4-parameter logistic)"),
}


def plot_calibration(path: Path, reps: stats.Replicates, fits: dict[str, stats.Fit], chosen: str,
                     limits: dict, *, unit: str, density_label: str, title: str = "",
                     true_fit: stats.Fit | None = None, dpi: int = 110) -> None:
    """Replicates, per-concentration mean ± SD, the chosen fit with its 95 % band, the other
    fits, LoB / LoD / LoQ, and the true curve; log x, linear and log y panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xb = _blank_x(reps)
    xp = np.where(reps.x > 0, reps.x, xb)
    pos = reps.x[reps.x > 0]
    grid = np.geomspace(pos.min() / 1.5, pos.max() * 1.5, 200)
    fit = fits[chosen]
    lo, hi = fit.band(grid)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    for ax, logy in zip(axes, (False, True)):
        ax.scatter(xp, reps.y, s=14, alpha=0.5, color="tab:blue", label="replicates")
        for i, idx in enumerate(reps.levels()):
            m = reps.y[idx].mean()
            s = reps.y[idx].std(ddof=1) if idx.size > 1 else 0.0
            ax.errorbar(xp[idx[0]], m, yerr=s, fmt="s", color="navy", ms=5, capsize=3,
                        label="mean ± SD" if i == 0 else None)
        if np.isfinite(lo).any():
            ax.fill_between(grid, lo, hi, color="tab:red", alpha=0.18, label="95 % CI of fit")
        ax.plot(grid, fit.predict(grid), color="tab:red", lw=2, label=f"{chosen} fit")
        for k, f in fits.items():
            if k != chosen and f.converged:
                color, ls, note = FIT_STYLES.get(k, ("grey", ":", ""))
                ax.plot(grid, f.predict(grid), lw=1.3, ls=ls, color=color,
                        label=f"{k} fit{note}")
        if true_fit is not None and true_fit.converged:
            ax.plot(grid, true_fit.predict(grid), lw=1.5, ls="--", color="tab:green",
                    label="true curve")
            yt = reps.y_true
            if np.isfinite(yt).any():
                ax.scatter(xp, yt, marker="D", facecolors="none", edgecolors="tab:green",
                           s=22, label="true density")
        for key, style, name in (("lob", ":", "LoB"), ("lod_density", "--", "LoD (EP17)")):
            v = limits.get(key)
            if v is not None and math.isfinite(v):
                ax.axhline(v, color="k", ls=style, lw=1, label=name)
        for key, style, name in (("lod", "-.", "LoD"), ("loq_ich", ":", "LoQ (ICH)")):
            v = limits.get(key)
            if v is not None and math.isfinite(v) and v > 0:
                ax.axvline(v, color="purple", ls=style, lw=1, label=f"{name} {v:.3g}")
        _log_x_axis(ax, reps, unit)
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(density_label)
        ax.set_title(f"{chosen} fit, R² {fit.r2:.3f}" + (", log y" if logy else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    # Below the panels: the fits' notes are long and would cover the right panel.
    fig.legend(handles, labels, loc="lower center", fontsize=9, ncols=3, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * math.ceil(len(labels) / 3), 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_residuals(path: Path, reps: stats.Replicates, fits: dict[str, stats.Fit], chosen: str, *,
                   unit: str, dpi: int = 110) -> None:
    """Standardised residuals ``(y - fit) / sd`` vs concentration, one panel per fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [k for k in stats.FIT_KINDS if k in fits and fits[k].converged]
    flag = stats.RESIDUAL_FLAG_SD
    xb = _blank_x(reps)
    xp = np.where(reps.x > 0, reps.x, xb)
    fig, axes = plt.subplots(1, max(1, len(ok)), figsize=(4.5 * max(1, len(ok)), 3.8),
                             squeeze=False)
    sd = reps.sd()
    for ax, k in zip(axes[0], ok):
        r = (reps.y - fits[k].predict(reps.x)) / sd
        good = np.isfinite(r)
        ax.scatter(xp[good], r[good], s=14, color="tab:red" if k == chosen else "tab:blue")
        far = good & (np.abs(np.where(good, r, 0)) > flag)
        if far.any():
            ax.scatter(xp[far], r[far], s=70, facecolors="none", edgecolors="k", lw=1,
                       label=f"beyond ±{flag:g} SD" + (" (listed in the report)"
                                                       if k == chosen else ""))
            ax.legend(fontsize=8, loc="best")
        for v, ls in ((0, "-"), (flag, ":"), (-flag, ":")):
            ax.axhline(v, color="k", lw=0.8, ls=ls)
        _log_x_axis(ax, reps, unit)
        ax.set(ylabel="(y - fit) / SD",
               title=f"{k}{' (chosen)' if k == chosen else ''}: R² {fits[k].r2:.3f}")
    if not ok:
        axes[0][0].text(0.5, 0.5, "no fit converged", ha="center")
    fig.suptitle("Standardised residuals (y - fit) / SD, SD = Poisson + model counting error; "
                 f"dotted: ±{flag:g} SD", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Calibration curve and detection limits (LoB/LoD/LoQ) from bead counts.",
        formatter_class=cli.HelpFormatter)
    add = functools.partial(cli.add_option, p)
    add("predictions", required=True,
        help="predict_microscope.py output folder or its prediction_summary.csv")
    add("output_dir", required=True,
        help="results folder (created; refused if non-empty without --overwrite)")
    add("samples", default=None,
        help="sample sheet CSV: file (name/stem/glob), concentration, unit, replicate, blank "
             "(default: concentrations from the file names)")
    add("um_per_px", type=float, default=None,
        help="pixel size in µm: densities per mm² (default: beads per megapixel)")
    add("model", default=None,
        help="training run folder: validation_counts.csv gives the model's counting error")
    add("truth", default=None, help="CSV of true counts (file, and n_true, n_beads or true_count: "
             "evaluate_predictions.py's per_image_metrics.csv works as it is)")
    add("fit", choices=("auto",) + stats.FIT_KINDS, default="auto",
        help="calibration model (auto: lowest AIC)")
    add("low_range", type=int, default=3,
        help="lowest non-blank concentrations (plus blanks) in the ICH low-range line")
    add("n_boot", type=int, default=2000, help="bootstrap resamples for the 95 %% CIs")
    add("seed", type=int, default=0, help="bootstrap seed")
    add("dpi", type=int, default=110, help="figure resolution")
    cli.add_overwrite(p)
    args = p.parse_args(argv)
    if args.um_per_px is not None and not args.um_per_px > 0:
        p.error(f"--um_per_px must be positive, got {args.um_per_px}")
    if args.n_boot < 0:
        p.error(f"--n_boot must be >= 0, got {args.n_boot}")
    if args.low_range < 2:
        p.error(f"--low_range must be >= 2, got {args.low_range}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = [runtime.add_log_handler()]
    try:
        return _run(args, handlers)
    finally:
        runtime.remove_log_handlers(handlers)


def _precheck(args) -> Path:
    """Input paths that must exist, checked before the output folder is made."""
    summary = resolve_summary(args.predictions)
    for flag, value in (("--samples", args.samples), ("--truth", args.truth)):
        if value and not Path(value).is_file():
            raise AssayError(f"{value}: {flag} file not found")
    if args.model and not Path(args.model).is_dir():
        raise AssayError(f"{args.model}: --model run folder not found")
    return summary


def _run(args: argparse.Namespace, handlers: list) -> int:
    try:
        summary_path = _precheck(args)
    except AssayError as exc:
        return cli.fatal(log, "%s", exc)
    out = Path(args.output_dir)
    inputs = [summary_path, *(Path(v) for v in (args.samples, args.truth, args.model) if v)]
    try:
        claim = cli.claim_output_dir(out, OUTPUT_FILES, script="quantify_assay",
                                     overwrite=args.overwrite, log_name=LOG_NAME,
                                     inputs=inputs)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    with claim:
        handlers.append(runtime.add_log_handler(out / LOG_NAME, mode="w"))
        claim.report(log)
        try:
            return _quantify(args, summary_path, out)
        except AssayError as exc:
            return cli.fatal(log, "%s", exc)


def _quantify(args: argparse.Namespace, summary_path: Path, out: Path) -> int:
    rows, excluded = read_predictions(summary_path)
    for f, why in excluded:
        log.warning("%s: excluded (%s) in %s", f, why, summary_path)
    sheet = read_sample_sheet(args.samples) if args.samples else None
    source = f"sample sheet {args.samples}" if sheet else "file names"
    why_unmatched = (f"matches no row of {args.samples}" if sheet else
                     "no NNNx_ or <value><unit>_ token in the name")
    assigned, unmatched = assign_concentrations(
        [r["file"] for r in rows], sheet, sheet_path=args.samples or "",
        summary_path=summary_path)
    for f in unmatched:
        log.warning("%s: no concentration (%s); left out", f, why_unmatched)
    missing = [f"{args.samples}: line {r['line']}: {r['pattern']!r} "
               + ("matches no file" if GLOB_CHARS & set(r["pattern"]) else "not found")
               + f" in {summary_path}"
               for r in unused_sheet_rows(sheet or [], [r["file"] for r in rows]
                                          + [f for f, _ in excluded])]
    for line in missing:
        log.warning("%s", line)
    unit = check_units(assigned)
    rows = [r for r in rows if r["file"] in assigned]
    named = f"{summary_path}" + (f" with {args.samples}" if args.samples else "")
    levels = sorted({c.value for c in assigned.values() if not c.blank})
    if len(levels) < 3:
        raise AssayError(f"{named}: {len(levels)} concentration(s) "
                         f"({', '.join(reporting.fmt(v, 4) for v in levels) or 'none'}) among "
                         f"{len(rows)} usable image(s); a calibration needs at least 3")
    if not any(r["beads"] > 0 for r in rows if not assigned[r["file"]].blank):
        raise AssayError(f"{named}: no positive bead counts at any non-blank concentration")

    if args.um_per_px:
        px_area, area_unit = (args.um_per_px * 1e-3) ** 2, "mm²"
        density_unit = "beads/mm²"
        heading = f"beads per mm² of imaged area ({args.um_per_px} µm/px)"
    else:
        px_area, area_unit = 1e-6, "MP"
        density_unit = "beads/MP"
        heading = "beads per megapixel of image (no --um_per_px, so not per mm²)"

    err_model, err_note = None, "Poisson only (no --model)"
    if args.model:
        pred_dir = summary_path.parent
        err_model, err_note = load_count_error(args.model, pred_dir)
        if err_model is None:
            err_note = f"Poisson only: {err_note}"
            log.warning("counting error: %s", err_note)
        else:
            log.info("counting error from %s", err_note)
    truth = read_truth(args.truth) if args.truth else None

    images = []
    n_extrapolated = 0
    for r in rows:
        c = assigned[r["file"]]
        area_px = r["width"] * r["height"]
        area = area_px * px_area
        n = r["beads"]
        bias, spread, extra = err_model.at(n, area_px) if err_model else (0.0, 0.0, False)
        n_extrapolated += extra
        sd_n = float(stats.count_sd(n, spread))
        n_true = truth.get(mio.stem_key(r["file"])) if truth is not None else None
        images.append({
            "file": r["file"], "concentration": c.value, "unit": unit, "blank": c.blank,
            "replicate": c.replicate, "concentration_rule": c.rule,
            "width": r["width"], "height": r["height"], "area": area, "area_unit": area_unit,
            "beads": n, "density": n / area, "density_unit": density_unit,
            "count_sd_poisson": math.sqrt(max(n, 1)), "count_bias_rel": bias,
            "count_spread_rel": spread, "count_sd": sd_n, "density_sd": sd_n / area,
            "cv_pct": 100 * sd_n / n if n else math.nan,
            "error_model_extrapolated": extra if err_model else "",
            "n_true": n_true if n_true is not None else "",
            "true_density": n_true / area if n_true is not None else math.nan,
        })
    checks = err_model.warnings() if err_model else []
    if n_extrapolated:
        checks.append(ar.extrapolation_warning(n_extrapolated, err_model))

    reps = stats.build_replicates(images)
    per_sample = stats.sample_table(reps, unit)
    fits = {k: stats.fit_calibration(k, reps.x, reps.y, reps.area, reps.spread)
            for k in stats.FIT_KINDS}
    for k, f in fits.items():
        if f.message:  # why a fit failed, or a caveat of one that converged
            log.warning("%s fit: %s", k, f.message)
    try:
        chosen, why = stats.choose_fit(fits, args.fit)
    except stats.FitError as exc:
        raise AssayError(str(exc)) from None
    log.info("calibration: %s chosen by %s", chosen, why)
    limits = stats.detection_limits(reps, chosen, n_low=args.low_range, fit=fits[chosen])
    boot = None
    if args.n_boot > 0:
        boot = stats.bootstrap_limits(reps, chosen, n_boot=args.n_boot, seed=args.seed,
                                n_low=args.low_range, start=fits[chosen].p)
        if boot is None:
            log.warning("bootstrap skipped: no concentration has 2 replicates (CIs n/a)")

    truth_res = None
    true_fit = None
    if truth is not None:
        have = np.isfinite(reps.y_true)
        n_img_true = sum(1 for r in images if r["n_true"] != "")
        note = (f"True counts from `{args.truth}` for {n_img_true} of {len(images)} images.")
        if np.unique(reps.x[have & (reps.x > 0)]).size >= 3:
            t = reps.subset(np.flatnonzero(have))
            true_fit = stats.fit_calibration(chosen, t.x, t.y_true, t.area)
            if not true_fit.converged:
                note += f" True curve not fitted: {true_fit.message}."
        else:
            note += " Fewer than 3 concentrations have true counts: no true curve."
        truth_res = {"note": note, "n_images": n_img_true,
                     "fit": ar.fit_summary(true_fit) if true_fit and true_fit.converged
                     else None}

    checks += ar.residual_flags(reps, fits[chosen])
    lod_check = ar.lod_warning(limits["lod"], reps, unit)
    if lod_check:
        checks.append(lod_check)
    for line in checks:
        log.warning("%s", line)
    lod_key = "lod_conc_ep17" if limits["lod_method"] == "CLSI EP17" else "lod_ich"
    res = {
        "n_images": len(images),
        "n_replicates": len(reps),
        "n_concentrations": len(levels),
        "n_blank_images": int(sum(1 for r in images if r["blank"])),
        "unit": unit,
        "density_unit": density_unit,
        "density_heading": heading,
        "fit": ar.fit_summary(fits[chosen]),
        "fit_choice": why,
        "fits": {k: ar.fit_summary(f) for k, f in fits.items()},
        "lob": limits["lob_conc"] if reps.blank.any() else None,
        "lod": limits["lod"],
        "loq": limits["loq_ich"],
        "lod_ci95": boot[lod_key]["ci95"] if boot else None,
        "lod_method": ("CLSI EP17: LoB + 1.645·SD_low, through the inverse "
                       f"{chosen} curve" if limits["lod_method"] == "CLSI EP17" else
                       "ICH Q2: 3.3·σ/slope of the low-range line"),
        "detection": {"lob_density": limits["lob"],
                      **{k: limits[k] for k in ("lod_density", "lob_conc", "lod_conc_ep17",
                                                "lod_ich", "loq_ich", "ep17", "ich",
                                                "low_concentration")}},
        "bootstrap": boot,
        "per_sample": per_sample,
        "count_error": {"note": err_note, "model": err_model.model if err_model else None,
                        "bins": err_model.bins() if err_model else [],
                        "n_extrapolated": n_extrapolated},
        "truth": truth_res,
        "warnings": checks,
        "excluded": [list(e) for e in excluded],
        "unmatched": unmatched,
        "unmatched_reason": why_unmatched,
        "missing_samples": missing,
        "rules": [[r["file"], r["concentration"], r["concentration_rule"]] for r in images],
        "settings": {"summary": str(summary_path), "samples": args.samples,
                     "concentration_source": source, "um_per_px": args.um_per_px,
                     "model": args.model, "truth": args.truth, "fit": args.fit,
                     "low_range": args.low_range, "n_boot": args.n_boot, "seed": args.seed},
    }
    res = mio.json_ready(res)

    mio.atomic_write_csv(out / PER_IMAGE_NAME, *reporting.csv_rows(images))
    mio.atomic_write_csv(out / PER_SAMPLE_NAME, *reporting.csv_rows(per_sample))
    plot_calibration(out / FIG_CALIBRATION, reps, fits, chosen, limits, unit=unit,
                     density_label=f"density ({density_unit})",
                     title=f"Calibration; density in {heading}", true_fit=true_fit,
                     dpi=args.dpi)
    plot_residuals(out / FIG_RESIDUALS, reps, fits, chosen, unit=unit, dpi=args.dpi)
    figures = [FIG_CALIBRATION, FIG_RESIDUALS]
    mio.atomic_write_json(out / RESULTS_NAME, res)
    (out / REPORT_NAME).write_text(ar.build_report(res, figures), encoding="utf-8")
    log.info("%d image(s), %d concentration(s): %s fit R² %s; LoD %s %s (%s), CI %s; LoQ %s",
             len(images), len(levels), chosen, reporting.fmt(fits[chosen].r2, 4),
             reporting.fmt(res["lod"], 4), unit, limits["lod_method"],
             ar.ci_text(res["lod_ci95"]), reporting.fmt(res["loq"], 4))
    log.info("wrote %s", out)
    n_bad = len(excluded) + len(unmatched)
    if n_bad:
        log.warning("%d image(s) not used (listed in %s)", n_bad, REPORT_NAME)
    if missing:
        log.warning("%d sample sheet row(s) match no predicted image (listed in %s)",
                    len(missing), REPORT_NAME)
    return 1 if n_bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())

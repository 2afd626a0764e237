"""Training-curve figures, statistics tables and a report, all computed from history CSVs.

Reads the per-model history CSVs of one or several training runs and writes figures, two
tables and a Markdown report in which every number is formatted from the data (no hand-typed
results). Runs without TensorFlow: only NumPy, pandas and matplotlib are imported.

This script is the command line only: reading and statistics are in
:mod:`training_history`, the figures in :mod:`training_plots`, the report text in
:mod:`training_report`.

Inputs
------
``RUN_DIR [RUN_DIR ...]``: training run folders. In each folder the history files are

* ``<model>_history.csv`` written by ``train_microbead_optimized.py``: columns ``epoch``
  (1-based), ``loss, jacard_coef, dice_coef, val_loss, val_jacard_coef, val_dice_coef,
  learning_rate, epoch_time_s`` (extra columns are ignored), or
* the Keras ``CSVLogger`` files of the older pipeline: ``loss, accuracy, jacard_coef,
  dice_coef, val_loss, val_accuracy, val_jacard_coef, val_dice_coef, lr`` and no ``epoch``
  column (epoch = row number, 1-based). Any ``*.csv`` with a ``val_jacard_coef`` column is
  taken; the model name is the file stem without a trailing ``_history`` / ``_log``.

A k-fold run folder holds no history itself but ``fold_01/``, ``fold_02/`` ... subfolders that
do: each fold becomes a run labelled ``<run name>/fold_01`` and the mean and sample standard
deviation of the best validation Jaccard across folds is added per model.

Outputs (in ``--output_dir``; default ``RUN_DIR/training_analysis/`` for one run folder,
``./training_comparison_YYYYMMDD_HHMMSS/`` for several)
------------------------------------------------------------------------------------------
``training_curves_comparison.png``, ``performance_summary.png``,
``detailed_training_analysis.png`` (12 panels), ``learning_rate.png``, ``run_comparison.png``
(only with several runs), ``epoch_by_epoch_comparison.csv``,
``training_summary_statistics.csv``, ``TRAINING_REPORT.md`` and ``plot_training_curves.log``.
An existing non-empty output folder is refused unless ``--overwrite``, which replaces only
these files.

Exit status: 0 every input plotted; 1 some inputs skipped (each named in the log and the
report); 2 nothing to plot, or an unusable output folder.

Statistics (per run and model, computed from the history only)
--------------------------------------------------------------
* best val Jaccard: max of ``val_jacard_coef``; best epoch: its 1-based epoch, first
  occurrence on ties.
* final val Jaccard / final train Jaccard: last row of ``val_jacard_coef`` / ``jacard_coef``.
* stability sigma: sample standard deviation (ddof=1) of ``val_loss`` over the last
  ``min(10, n)`` epochs; NaN when fewer than 2 values.
* train-val gap: final ``jacard_coef`` minus final ``val_jacard_coef``.
* collapsed: True when any epoch after the best epoch has ``val_jacard_coef`` below
  10 % of the best.
* epochs run: number of rows.

Example
-------
    python plot_training_curves.py runs/microbead_training_20240501_101500 \\
        runs/microbead_training_20240502_093000 --output_dir comparison_lr
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
from pathlib import Path

import cli
import runtime  # logging helpers
from training_history import (
    FIG_CURVES,
    FIG_DETAILED,
    FIG_LR,
    FIG_PERFORMANCE,
    FIG_RUNS,
    LOG_FILE,
    OUTPUT_FILES,
    REPORT,
    TABLE_EPOCHS,
    TABLE_STATS,
    best_per_model,
    cross_check_trainer_summary,
    epoch_by_epoch_table,
    load_histories,
    statistics_table,
)
from training_plots import (
    plot_detailed_analysis,
    plot_learning_rate,
    plot_performance_summary,
    plot_run_comparison,
    plot_training_curves,
)
from training_report import build_report, comparison_line, fit_warning_lines

log = logging.getLogger("microbead.plot_training_curves")



# --------------------------------------------------------------------------- CLI


def default_output_dir(run_dirs: list[str | Path], now: _dt.datetime | None = None,
                       cwd: str | Path | None = None) -> Path:
    """Default ``--output_dir``.

    ``RUN_DIR/training_analysis`` for one RUN_DIR; for several,
    ``<cwd>/training_comparison_YYYYMMDD_HHMMSS`` with ``_2``, ``_3`` ... appended when that
    folder already exists (an earlier comparison is never overwritten).
    """
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "training_analysis"
    now = now or _dt.datetime.now()
    base = Path(cwd or Path.cwd()) / f"training_comparison_{now:%Y%m%d_%H%M%S}"
    candidate, i = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}_{i}")
        i += 1
    return candidate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Figures, statistics tables and a report computed from training histories.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="training run folder(s); k-fold folders with fold_*/ subfolders work")
    cli.add_option(p, "output_dir", default=None,
                   help="default: RUN_DIR/training_analysis for one run, "
                        "./training_comparison_YYYYMMDD_HHMMSS for several")
    cli.add_option(p, "compare", default=None, metavar="RUN",
                   help="a training run folder to compare each model's best val Jaccard "
                        "with (nothing is compared otherwise)")
    cli.add_option(p, "dpi", type=int, default=120, help="PNG resolution")
    cli.add_overwrite(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit 0: every input plotted; 1: some inputs skipped (each named); 2: nothing to plot
    or an unusable output folder."""
    args = parse_args(argv)
    handlers = [runtime.add_log_handler()]
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.run_dirs)
    try:
        try:
            claim = cli.claim_output_dir(out, OUTPUT_FILES, script="plot_training_curves",
                                         overwrite=args.overwrite, log_name=LOG_FILE,
                                         inputs=args.run_dirs)
        except cli.OutputDirError as exc:
            return cli.fatal(log, "%s", exc)
        except OSError as err:
            return cli.fatal(log, "%s: cannot create output folder (%s)", out,
                             err.strerror or err)
        handlers.append(runtime.add_log_handler(out / LOG_FILE, mode="w"))
        claim.report(log)
        return _plot(args, out, claim)
    finally:
        runtime.remove_log_handlers(handlers)


def _plot(args, out: Path, claim: cli.OutputClaim) -> int:
    """Everything after the output folder is claimed (released on return)."""
    with claim:
        histories, errors = load_histories(args.run_dirs)
        for msg in errors:
            log.error(msg)
        if not histories:
            return cli.fatal(log, "nothing to plot: no usable history in %s",
                             ", ".join(args.run_dirs))
        log.info("%d history file(s) from %d run(s) -> %s", len(histories),
                 len({h.run for h in histories}), out)

        stats = statistics_table(histories)
        stats.to_csv(out / TABLE_STATS, index=False)
        epoch_by_epoch_table(histories).to_csv(out / TABLE_EPOCHS, index=False)
        log.info("wrote %s and %s", out / TABLE_STATS, out / TABLE_EPOCHS)

        per_run = stats[stats["n_folds"].isna()]
        plot_training_curves(histories, out / FIG_CURVES, args.dpi)
        plot_performance_summary(stats, histories, out / FIG_PERFORMANCE, args.dpi)
        plot_detailed_analysis(per_run, histories, out / FIG_DETAILED, args.dpi)
        plot_learning_rate(histories, out / FIG_LR, args.dpi)
        figures = [FIG_CURVES, FIG_PERFORMANCE, FIG_DETAILED, FIG_LR]
        if len({h.run for h in histories}) > 1:
            plot_run_comparison(histories, out / FIG_RUNS, args.dpi)
            figures.append(FIG_RUNS)

        mismatches = cross_check_trainer_summary(histories)
        for msg in mismatches:
            log.warning(msg)
        problems = [f"skipped: {e}" for e in errors] + mismatches
        generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        reference, ref_name = {}, ""
        if args.compare:
            ref_histories, ref_errors = load_histories([args.compare])
            if not ref_histories:
                return cli.fatal(log, "--compare %s: no usable history (%s)", args.compare,
                                 "; ".join(ref_errors) or "none found")
            reference, ref_name = best_per_model(ref_histories), Path(args.compare).name
        report = build_report(stats, histories, figures, problems, generated, reference,
                              ref_name)
        (out / REPORT).write_text(report, encoding="utf-8")
        log.info("wrote %s", out / REPORT)
        for _, row in per_run.iterrows():
            log.info("%s", comparison_line(f"{row['run']} {row['model']}",
                                           float(row["best_val_jacard"]), row["best_epoch"],
                                           reference.get(row["model"]), ref_name))
        for msg in fit_warning_lines(per_run, histories):
            log.warning("%s", msg)
        if errors:
            log.warning("%d input(s) skipped:\n  %s", len(errors), "\n  ".join(errors))
            return cli.EXIT_PARTIAL
        return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Training-curve figures, statistics tables and a report, all computed from history CSVs.

Reads the per-model history CSVs of one or several training runs and writes figures, two
tables and a Markdown report in which every number is formatted from the data (no hand-typed
results). Runs without TensorFlow: only NumPy, pandas and matplotlib are imported.

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
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import cli  # noqa: E402
import microbead_config as mcfg  # noqa: E402  (history reader, previous-run reference)
import runtime  # noqa: E402  (logging helpers)

log = logging.getLogger("microbead.plot_training_curves")

# Reference line on every Jaccard figure: the label-consistency ceiling the trainer measured
# on the run's own data (training_summary.csv ``label_ceiling``), when there is one. Other
# runs are compared only when the user names them (``--compare RUN``).

STABILITY_WINDOW = 10
COLLAPSE_FRACTION = 0.10

# Internal schema every history is normalised to (see normalize_history): the trainer's
# columns without its collapse diagnostics (val_pred_fg / val_true_fg are not plotted).
HISTORY_COLUMNS = tuple(c for c in mcfg.HISTORY_COLUMNS if c not in ("val_pred_fg",
                                                                      "val_true_fg"))
OPTIONAL_EXTRA_COLUMNS = ("accuracy", "val_accuracy")
REQUIRED_COLUMNS = mcfg.REQUIRED_HISTORY_COLUMNS
HISTORY_SUFFIXES = ("_history", "_log")

KNOWN_MODELS = ("unet", "attention_unet", "attention_resunet")
MODEL_COLORS = {
    "unet": "#1f77b4",
    "attention_unet": "#ff7f0e",
    "attention_resunet": "#2ca02c",
}
MODEL_LABELS = {
    "unet": "U-Net",
    "attention_unet": "Attention U-Net",
    "attention_resunet": "Attention ResU-Net",
}
# Unknown model names get these, in sorted-name order, so a name keeps its colour in every
# figure of one invocation.
FALLBACK_PALETTE = (
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)

FIG_CURVES = "training_curves_comparison.png"
FIG_PERFORMANCE = "performance_summary.png"
FIG_DETAILED = "detailed_training_analysis.png"
FIG_LR = "learning_rate.png"
FIG_RUNS = "run_comparison.png"
TABLE_EPOCHS = "epoch_by_epoch_comparison.csv"
TABLE_STATS = "training_summary_statistics.csv"
REPORT = "TRAINING_REPORT.md"
LOG_FILE = "plot_training_curves.log"
#: What this script writes into --output_dir (--overwrite removes these, nothing else).
OUTPUT_FILES = (FIG_CURVES, FIG_PERFORMANCE, FIG_DETAILED, FIG_LR, FIG_RUNS, TABLE_EPOCHS,
                TABLE_STATS, REPORT, LOG_FILE)
TRAINER_SUMMARY = "training_summary.csv"
# Never mistaken for histories (the trainer's summaries, and our own tables when an output
# folder is a run folder).
_NOT_HISTORIES = {TABLE_EPOCHS, TABLE_STATS, TRAINER_SUMMARY, "kfold_summary.csv"}

STAT_COLUMNS = (
    "run",
    "model",
    "epochs_run",
    "best_val_jacard",
    "best_epoch",
    "final_val_jacard",
    "final_train_jacard",
    "train_val_gap",
    "val_loss_sigma_last10",
    "collapsed",
    "n_folds",
    "best_val_jacard_sd",
    "history_file",
)

_CSV_ERRORS = (
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
    UnicodeDecodeError,
    OSError,
    ValueError,
)


HistoryError = mcfg.HistoryError  # one line naming the file or run folder


@dataclass
class History:
    """One model's normalised training history within one run.

    Attributes
    ----------
    run : str
        Run label shown in figures and tables (run folder name, or ``<name>/fold_01``).
    group : str
        Run folder label; the folds of one k-fold run share it.
    model : str
        Model name (``unet``, ``attention_unet`` ...).
    path : Path
        The CSV the history was read from.
    frame : pandas.DataFrame
        History in the internal schema (:data:`HISTORY_COLUMNS`), one row per epoch.
    fold : str or None
        ``fold_01`` ... for k-fold runs, else None.
    """

    run: str
    group: str
    model: str
    path: Path
    frame: pd.DataFrame
    fold: str | None = None


# --------------------------------------------------------------------------- reading


def normalize_history(raw: pd.DataFrame, source: str = "history") -> pd.DataFrame:
    """Normalise either history format to the internal schema.

    Parameters
    ----------
    raw : pandas.DataFrame
        As read from the CSV: the trainer's format (with a 1-based ``epoch`` column and
        ``learning_rate``) or the old Keras ``CSVLogger`` format (no ``epoch`` column, ``lr``).
        Column names are stripped of whitespace; extra columns are dropped except
        ``accuracy``/``val_accuracy``.
    source : str
        Name used in error messages (the file path).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`HISTORY_COLUMNS` (plus ``accuracy``/``val_accuracy`` when present),
        float64 except ``epoch`` (int64, 1-based), sorted by epoch, one row per epoch.
        Missing optional columns are NaN. Without an ``epoch`` column the epoch is the
        1-based row number; an ``epoch`` column starting at 0 (Keras ``CSVLogger``) is shifted
        to 1-based; a repeated epoch (a resumed run appending to its log) keeps its last row.

    Raises
    ------
    HistoryError
        No rows, a required column (:data:`REQUIRED_COLUMNS`) missing, or no numeric
        ``val_jacard_coef`` value. The message names ``source``.
    """
    rows = mcfg.normalize_history(list(raw.columns), raw.itertuples(index=False),
                                  source, required=REQUIRED_COLUMNS)
    return _history_frame(rows, source)


def _history_frame(rows: list[dict], source: str) -> pd.DataFrame:
    """The internal schema from :func:`microbead_config.normalize_history` rows."""
    out = pd.DataFrame({"epoch": np.array([r["epoch"] for r in rows], dtype=np.int64)})
    for col in HISTORY_COLUMNS[1:] + OPTIONAL_EXTRA_COLUMNS:
        if col in rows[0]:
            out[col] = np.array([r[col] for r in rows], dtype=float)
        elif col in HISTORY_COLUMNS:
            out[col] = np.nan
    if out["val_jacard_coef"].isna().all():
        raise HistoryError(f"{source}: no numeric val_jacard_coef value")
    return out


def read_history(path: str | Path) -> pd.DataFrame:
    """Read one history CSV (either format) into the internal schema.

    Parameters
    ----------
    path : str or Path
        CSV file.

    Returns
    -------
    pandas.DataFrame
        See :func:`normalize_history`.

    Raises
    ------
    HistoryError
        Unreadable, empty or malformed file; the one-line message names the file.
    """
    rows = mcfg.read_history(path, strict=True)
    return _history_frame(rows, str(path))


def model_name_from_path(path: str | Path) -> str:
    """Model name of a history file: the stem without a trailing ``_history`` or ``_log``.

    >>> model_name_from_path("run/attention_unet_history.csv")
    'attention_unet'
    >>> model_name_from_path("unet_log.csv")
    'unet'
    """
    stem = Path(path).stem
    for suffix in HISTORY_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _has_history_header(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0).columns
    except _CSV_ERRORS:
        # An arbitrary CSV we cannot parse is not one of ours; only *_history.csv must parse.
        return False
    names = {str(c).strip() for c in header}
    return "val_jacard_coef" in names or "val_jaccard_coef" in names


def find_history_files(folder: str | Path) -> list[Path]:
    """History CSVs directly inside ``folder`` (not recursive), sorted by name.

    Every ``*_history.csv`` is returned (so a broken one is reported, not skipped), plus any
    other ``*.csv`` whose header has a ``val_jacard_coef`` column. The trainer's
    ``training_summary.csv`` and this script's own tables are never returned.
    """
    files = []
    for path in sorted(Path(folder).glob("*.csv")):
        if path.name in _NOT_HISTORIES or not path.is_file():
            continue
        if path.stem.endswith("_history") or _has_history_header(path):
            files.append(path)
    return files


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def discover_runs(run_dir: str | Path) -> list[tuple[str, Path, str | None]]:
    """Resolve a RUN_DIR into run folders.

    Parameters
    ----------
    run_dir : str or Path
        A run folder with history CSVs, or a k-fold run folder whose ``fold_*`` subfolders
        hold them.

    Returns
    -------
    list of (label, folder, fold)
        One entry ``(name, run_dir, None)`` for a plain run; one per fold
        ``(f"{name}/fold_01", run_dir / "fold_01", "fold_01")`` for a k-fold run, in natural
        order (fold_2 before fold_10).

    Raises
    ------
    HistoryError
        Not a folder, or no history CSV in it or in its ``fold_*`` subfolders.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HistoryError(f"{run_dir}: not a directory")
    name = run_dir.resolve().name
    if find_history_files(run_dir):
        return [(name, run_dir, None)]
    folds = [p for p in run_dir.glob("fold_*") if p.is_dir() and find_history_files(p)]
    if folds:
        folds.sort(key=lambda p: _natural_key(p.name))
        return [(f"{name}/{p.name}", p, p.name) for p in folds]
    raise HistoryError(
        f"{run_dir}: no history CSV (*_history.csv or a CSV with a val_jacard_coef column), "
        "nor fold_*/ subfolders with one"
    )


def model_sort_key(model: str) -> tuple[int, str]:
    """Known models first in their usual order (unet, attention_unet, attention_resunet)."""
    if model in KNOWN_MODELS:
        return (KNOWN_MODELS.index(model), "")
    return (len(KNOWN_MODELS), model)


def load_histories(run_dirs: list[str | Path]) -> tuple[list[History], list[str]]:
    """Discover and read every history of every RUN_DIR.

    Parameters
    ----------
    run_dirs : list of str or Path
        RUN_DIR arguments, in the order given.

    Returns
    -------
    histories : list of History
        In argument order, folds in natural order, models in :func:`model_sort_key` order.
        Two RUN_DIRs with the same folder name get labels ``name`` and ``name#2``.
    errors : list of str
        One line per unusable run folder or file (each names it); the rest is still read.
    """
    histories: list[History] = []
    errors: list[str] = []
    used_groups: set[str] = set()
    for run_dir in run_dirs:
        try:
            runs = discover_runs(run_dir)
        except HistoryError as err:
            errors.append(str(err))
            continue
        group = Path(run_dir).resolve().name
        label_group = group
        i = 2
        while label_group in used_groups:
            label_group = f"{group}#{i}"
            i += 1
        used_groups.add(label_group)
        for label, folder, fold in runs:
            label = label_group + label[len(group) :]
            found: list[History] = []
            for path in find_history_files(folder):
                model = model_name_from_path(path)
                if any(h.model == model for h in found):
                    model = path.stem  # unet_history.csv and unet_log.csv side by side
                try:
                    frame = read_history(path)
                except HistoryError as err:
                    errors.append(str(err))
                    continue
                found.append(History(label, label_group, model, path, frame, fold))
            found.sort(key=lambda h: model_sort_key(h.model))
            histories.extend(found)
    return histories, errors


# --------------------------------------------------------------------------- statistics


def summarize_history(frame: pd.DataFrame) -> dict:
    """Statistics of one normalised history (definitions pinned by the tests).

    Parameters
    ----------
    frame : pandas.DataFrame
        Output of :func:`normalize_history` (at least one row, some numeric
        ``val_jacard_coef``).

    Returns
    -------
    dict
        ``epochs_run`` (int, number of rows); ``best_val_jacard`` (max of ``val_jacard_coef``,
        NaN ignored); ``best_epoch`` (int, 1-based epoch of that max, first occurrence on
        ties); ``final_val_jacard`` and ``final_train_jacard`` (last row, may be NaN);
        ``train_val_gap`` (final ``jacard_coef`` - final ``val_jacard_coef``);
        ``val_loss_sigma_last10`` (sample standard deviation, ddof=1, of ``val_loss`` over the
        last ``min(10, n)`` epochs, NaN values dropped, NaN if fewer than 2 remain);
        ``collapsed`` (bool: any epoch after the best one with ``val_jacard_coef`` <
        0.10 x best).
    """
    val_j = frame["val_jacard_coef"].to_numpy(dtype=float)
    n = len(val_j)
    if n == 0 or np.isnan(val_j).all():
        raise ValueError("history has no numeric val_jacard_coef value")
    best_idx = int(np.nanargmax(val_j))  # first occurrence on ties
    best = float(val_j[best_idx])
    tail = frame["val_loss"].to_numpy(dtype=float)[-min(STABILITY_WINDOW, n) :]
    tail = tail[~np.isnan(tail)]
    sigma = float(np.std(tail, ddof=1)) if tail.size >= 2 else math.nan
    after = val_j[best_idx + 1 :]
    # NaN compares False: a missing value is not a collapse.
    collapsed = bool(np.any(after < COLLAPSE_FRACTION * best))
    final_val = float(val_j[-1])
    final_train = float(frame["jacard_coef"].to_numpy(dtype=float)[-1])
    return {
        "epochs_run": int(n),
        "best_val_jacard": best,
        "best_epoch": int(frame["epoch"].iloc[best_idx]),
        "final_val_jacard": final_val,
        "final_train_jacard": final_train,
        "train_val_gap": final_train - final_val,
        "val_loss_sigma_last10": sigma,
        "collapsed": collapsed,
    }


def fold_aggregates(histories: list[History]) -> pd.DataFrame:
    """Mean and sample SD (ddof=1) of the best val Jaccard per model across the folds of a run.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`STAT_COLUMNS`; one row per (k-fold run folder, model) with
        ``run = "<name>/all_folds"``, ``best_val_jacard`` = mean, ``best_val_jacard_sd``
        (NaN for a single fold), ``n_folds``; the other statistics are left empty. Empty
        when no k-fold run was given.
    """
    rows = []
    groups: dict[tuple[str, str], list[float]] = {}
    for h in histories:
        if h.fold is None:
            continue
        best = summarize_history(h.frame)["best_val_jacard"]
        groups.setdefault((h.group, h.model), []).append(best)
    for (group, model), values in groups.items():
        arr = np.asarray(values, dtype=float)
        rows.append(
            {
                "run": f"{group}/all_folds",
                "model": model,
                "best_val_jacard": float(arr.mean()),
                "best_val_jacard_sd": float(arr.std(ddof=1)) if arr.size >= 2 else math.nan,
                "n_folds": int(arr.size),
            }
        )
    return pd.DataFrame(rows, columns=list(STAT_COLUMNS))


def statistics_table(histories: list[History]) -> pd.DataFrame:
    """One row of :func:`summarize_history` per (run, model), then the k-fold aggregate rows.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`STAT_COLUMNS`. ``n_folds`` and ``best_val_jacard_sd`` are filled only
        on the ``<name>/all_folds`` rows (see :func:`fold_aggregates`).
    """
    rows = []
    for h in histories:
        row = {"run": h.run, "model": h.model}
        row.update(summarize_history(h.frame))
        row["history_file"] = str(h.path)
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(STAT_COLUMNS))
    agg = fold_aggregates(histories)
    if len(agg):
        table = pd.concat([table.astype(object), agg.astype(object)], ignore_index=True)
    return table


def epoch_by_epoch_table(histories: list[History]) -> pd.DataFrame:
    """Wide per-epoch table of every history, outer-joined on ``epoch``.

    Columns are ``epoch`` then ``<prefix>_<metric>`` for the metrics ``loss, val_loss,
    jacard_coef, val_jacard_coef, dice_coef, val_dice_coef, learning_rate``, where the prefix
    is the model name for a single run and ``<run>/<model>`` otherwise. Epochs a history did
    not reach are empty.
    """
    metrics = (
        "loss",
        "val_loss",
        "jacard_coef",
        "val_jacard_coef",
        "dice_coef",
        "val_dice_coef",
        "learning_rate",
    )
    multi = len({h.run for h in histories}) > 1
    parts = []
    for h in histories:
        prefix = f"{h.run}/{h.model}" if multi else h.model
        part = h.frame.set_index("epoch")[list(metrics)]
        part.columns = [f"{prefix}_{m}" for m in metrics]
        parts.append(part)
    table = pd.concat(parts, axis=1, join="outer").sort_index()
    table.index.name = "epoch"
    return table.reset_index()


def cross_check_trainer_summary(histories: list[History]) -> list[str]:
    """Compare each folder's ``training_summary.csv`` with what the histories give.

    Returns
    -------
    list of str
        One line per disagreement in ``best_val_jacard`` (tolerance 1e-4, the summary may be
        rounded), ``best_epoch`` or ``epochs_run``. The figures and tables always use the
        history; this only flags a summary that says otherwise. Unreadable summaries are
        reported too; folders without one are skipped.
    """
    messages = []
    by_folder: dict[Path, list[History]] = {}
    for h in histories:
        by_folder.setdefault(h.path.parent, []).append(h)
    for folder, group in by_folder.items():
        path = folder / TRAINER_SUMMARY
        if not path.is_file():
            continue
        try:
            summary = pd.read_csv(path)
            summary.columns = [str(c).strip() for c in summary.columns]
            summary = summary.set_index("model")
        except (*_CSV_ERRORS, KeyError):
            messages.append(f"{path}: unreadable trainer summary (not cross-checked)")
            continue
        for h in group:
            if h.model not in summary.index:
                continue
            row = summary.loc[h.model]
            if isinstance(row, pd.DataFrame):
                row = row.iloc[-1]
            stats = summarize_history(h.frame)
            checks = (
                ("best_val_jacard", 1e-4),
                ("best_epoch", 0),
                ("epochs_run", 0),
            )
            for key, tol in checks:
                if key not in row.index:
                    continue
                claimed = float(pd.to_numeric(row[key], errors="coerce"))
                if not np.isfinite(claimed) or abs(claimed - stats[key]) > tol:
                    digits = 4 if key == "best_val_jacard" else 0
                    theirs, ours = _fmt(claimed, digits), _fmt(stats[key], digits)
                    messages.append(
                        f"{path}: {h.model} {key} is {theirs} there but {ours} in "
                        f"{h.path.name} (history used)"
                    )
    return messages


# --------------------------------------------------------------------------- figures


def model_colors(models) -> dict[str, str]:
    """Colour per model name: fixed for the known models, fallback palette for the rest.

    Unknown names get :data:`FALLBACK_PALETTE` colours in sorted-name order (cycling), so a
    name has the same colour in every figure of one invocation.
    """
    colors = {m: MODEL_COLORS[m] for m in models if m in MODEL_COLORS}
    others = sorted({m for m in models if m not in MODEL_COLORS})
    for i, m in enumerate(others):
        colors[m] = FALLBACK_PALETTE[i % len(FALLBACK_PALETTE)]
    return colors


def model_label(model: str) -> str:
    """Display name (``U-Net`` ...) for known models, the raw name otherwise."""
    return MODEL_LABELS.get(model, model)


def _shade(color: str, index: int, n: int) -> tuple:
    """Lighten ``color`` for the ``index``-th of ``n`` runs: hue stays the model's."""
    rgb = np.asarray(mcolors.to_rgb(color))
    if n <= 1:
        return tuple(rgb)
    frac = 0.6 * index / (n - 1)
    return tuple(rgb + (1.0 - rgb) * frac)


class _Styler:
    """Colour and legend label per (run, model), shared by every figure."""

    def __init__(self, histories: list[History]):
        self.runs = list(dict.fromkeys(h.run for h in histories))
        self.models = sorted({h.model for h in histories}, key=model_sort_key)
        self.colors = model_colors(self.models)
        self.multi = len(self.runs) > 1
        self.ceilings = sorted(set(label_ceilings(histories).values()))

    def color(self, h: History) -> tuple:
        return _shade(self.colors[h.model], self.runs.index(h.run), len(self.runs))

    def label(self, h: History) -> str:
        return f"{h.run} · {model_label(h.model)}" if self.multi else model_label(h.model)

    def short(self, run: str, model: str) -> str:
        return f"{run}\n{model_label(model)}" if self.multi else model_label(model)


def _log_if_positive(ax, values) -> None:
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if arr.size and (arr > 0).all():
        ax.set_yscale("log")


def label_ceilings(histories: list[History]) -> dict[str, float]:
    """Run label -> label-consistency ceiling from the folder's ``training_summary.csv``
    (``label_ceiling``, written by the trainer when the tiles have grid neighbours); runs
    without one are left out."""
    out = {}
    for h in histories:
        for row in mcfg.read_summary(h.path.parent / TRAINER_SUMMARY):
            try:
                value = float(row.get("label_ceiling") or "nan")
            except ValueError:
                continue
            if math.isfinite(value):
                out[h.run] = round(value, 3)
    return out


def _reference_lines(ax, sty: _Styler, labels: bool = True) -> None:
    """The label-consistency ceiling(s) of the plotted runs' data (nothing without one)."""
    for value in sty.ceilings:
        ax.axhline(value, color="crimson", ls="--", lw=1.2,
                   label=f"label-consistency ceiling {value:.3f}" if labels else None)


def _marks(frame: pd.DataFrame) -> dict:
    """Markers on short histories, so a 1-epoch run is a visible dot, not nothing."""
    return {"marker": "o", "ms": 3} if len(frame) <= 25 else {}


def _mark_best(ax, h: History, color) -> None:
    stats = summarize_history(h.frame)
    ax.plot([stats["best_epoch"]], [stats["best_val_jacard"]], marker="*", ms=12,
            color=color, mec="k", mew=0.6, ls="none", zorder=5)


def _finish(ax, title: str, xlabel: str = "epoch", ylabel: str = "") -> None:
    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel(xlabel)
    if xlabel == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = ax.get_xlim()
        if hi - lo < 2:  # a 1-epoch history: give the integer locator something to tick
            mid = round((lo + hi) / 2)
            ax.set_xlim(mid - 1, mid + 1)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _save(fig, path: Path, dpi: int) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    log.info("wrote %s", path)


def plot_training_curves(histories: list[History], path: Path, dpi: int = 120) -> None:
    """Loss and Jaccard, train (solid) vs validation (dashed): one row per model.

    With several runs each run is a lighter/darker shade of the model's colour.
    """
    sty = _Styler(histories)
    n = len(sty.models)
    fig, axes = plt.subplots(n, 2, figsize=(13, 3.6 * n), squeeze=False)
    for row, model in enumerate(sty.models):
        ax_loss, ax_j = axes[row]
        losses = []
        handles = []
        for h in (h for h in histories if h.model == model):
            c = sty.color(h)
            f = h.frame
            mk = _marks(f)
            ax_loss.plot(f["epoch"], f["loss"], color=c, lw=1.8, **mk)
            ax_loss.plot(f["epoch"], f["val_loss"], color=c, lw=1.8, ls="--", **mk)
            ax_j.plot(f["epoch"], f["jacard_coef"], color=c, lw=1.8, **mk)
            ax_j.plot(f["epoch"], f["val_jacard_coef"], color=c, lw=1.8, ls="--", **mk)
            _mark_best(ax_j, h, c)
            losses.extend(f["loss"].tolist() + f["val_loss"].tolist())
            handles.append(Line2D([], [], color=c, lw=2.5, label=h.run if sty.multi else "run"))
        _log_if_positive(ax_loss, losses)
        _reference_lines(ax_j, sty)
        ax_j.set_ylim(0, 1.0)
        style = [
            Line2D([], [], color="k", lw=1.8, label="train"),
            Line2D([], [], color="k", lw=1.8, ls="--", label="validation"),
            Line2D([], [], color="k", marker="*", ms=10, ls="none", label="best val"),
        ]
        ax_loss.legend(handles=(handles if sty.multi else []) + style[:2], fontsize=8)
        ax_j.legend(fontsize=8, loc="best", handles=style + ax_j.get_legend_handles_labels()[0])
        name = model_label(model)
        _finish(ax_loss, f"{name}: loss", ylabel="loss")
        _finish(ax_j, f"{name}: Jaccard", ylabel="Jaccard")
        ax_loss.title.set_color(sty.colors[model])
        ax_j.title.set_color(sty.colors[model])
    fig.suptitle("Training curves (solid: train, dashed: validation, star: best val Jaccard)",
                 fontsize=14)
    fig.tight_layout()
    _save(fig, path, dpi)


def _grouped_bars(ax, stats: pd.DataFrame, sty: _Styler, value_col: str, digits: int,
                  sd_col: str | None = None) -> None:
    """Bars grouped by run (x) with one bar per model coloured by model; values annotated.

    With a single group the ticks name the models instead of the run.
    """
    runs = list(dict.fromkeys(stats["run"]))
    models = [m for m in sty.models if m in set(stats["model"])]
    width = 0.8 / max(1, len(models))
    ticks, tick_labels = [], []
    for gi, run in enumerate(runs):
        sub = stats[stats["run"] == run]
        for mi, model in enumerate(models):
            match = sub[sub["model"] == model]
            if match.empty:
                continue
            value = float(pd.to_numeric(match[value_col].iloc[0], errors="coerce"))
            x = gi + (mi - (len(models) - 1) / 2) * width
            height = value if np.isfinite(value) else 0.0
            yerr = None
            if sd_col is not None:
                sd = float(pd.to_numeric(match[sd_col].iloc[0], errors="coerce"))
                yerr = sd if np.isfinite(sd) else None
            ax.bar(x, height, width * 0.92, color=sty.colors[model], edgecolor="k", lw=0.6,
                   yerr=yerr, capsize=4)
            ax.annotate(_fmt(value, digits), (x, height), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
            ticks.append(x)
            tick_labels.append(model_label(model))
    if len(runs) > 1:
        ticks, tick_labels = list(range(len(runs))), runs
    many = len(ticks) > 3
    ax.set_xticks(ticks)
    ax.set_xticklabels(tick_labels, rotation=20 if many else 0,
                       ha="right" if many else "center", fontsize=9)


def plot_performance_summary(stats: pd.DataFrame, histories: list[History], path: Path,
                             dpi: int = 120) -> None:
    """Best val Jaccard per model (grouped by run) with the label-consistency ceiling.

    k-fold aggregate rows appear as an extra ``<name>/all_folds`` group with SD error bars.
    """
    sty = _Styler(histories)
    n_groups = stats["run"].nunique()
    width = max(8.5, 3.5 + n_groups * (0.6 + 0.45 * len(sty.models)))
    fig, ax = plt.subplots(figsize=(min(width, 30.0), 5.5))
    _grouped_bars(ax, stats, sty, "best_val_jacard", 3, sd_col="best_val_jacard_sd")
    _reference_lines(ax, sty)
    top = float(pd.to_numeric(stats["best_val_jacard"], errors="coerce").max())
    ax.set_ylim(0, min(1.05, max([top, *sty.ceilings]) * 1.18))
    handles = [Line2D([], [], color=sty.colors[m], lw=8, label=model_label(m))
               for m in sty.models]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=9,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _finish(ax, "Best validation Jaccard per model", xlabel="", ylabel="best val Jaccard")
    fig.tight_layout()
    _save(fig, path, dpi)


def _stat_bars(ax, stats: pd.DataFrame, histories: list[History], sty: _Styler, col: str,
               digits: int) -> None:
    """One bar per (run, model) for a per-run statistic; NaN shown as an 'n/a' label."""
    labels = []
    for i, h in enumerate(histories):
        row = stats[(stats["run"] == h.run) & (stats["model"] == h.model)].iloc[0]
        value = float(pd.to_numeric(row[col], errors="coerce"))
        height = value if np.isfinite(value) else 0.0
        ax.bar(i, height, 0.7, color=sty.color(h), edgecolor="k", lw=0.6)
        ax.annotate(_fmt(value, digits), (i, height), xytext=(0, 3 if height >= 0 else -10),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
        labels.append(sty.short(h.run, h.model))
    ax.set_xticks(range(len(histories)))
    ax.set_xticklabels(labels, fontsize=7 if sty.multi else 9,
                       rotation=45 if len(histories) > 4 else 0,
                       ha="right" if len(histories) > 4 else "center")
    ax.margins(y=0.15)


def plot_detailed_analysis(stats: pd.DataFrame, histories: list[History], path: Path,
                           dpi: int = 120) -> None:
    """Twelve panels (3 x 4).

    Row 1: train/val Jaccard of the first three models, one panel each, and all validation
    Jaccard curves overlaid. Row 2: train loss and validation loss (log scale when positive),
    train-val Jaccard gap per epoch, final train-val gap. Row 3: best val Jaccard, epoch of
    the best, stability sigma of val loss over the last 10 epochs, learning-rate schedule.
    """
    sty = _Styler(histories)
    fig, axes = plt.subplots(3, 4, figsize=(22, 14))
    # Row 1: per-model Jaccard.
    for slot in range(3):
        ax = axes[0, slot]
        if slot >= len(sty.models):
            ax.text(0.5, 0.5, "no further model", ha="center", va="center", color="0.5",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        model = sty.models[slot]
        for h in (h for h in histories if h.model == model):
            c = sty.color(h)
            mk = _marks(h.frame)
            ax.plot(h.frame["epoch"], h.frame["jacard_coef"], color=c, lw=1.6,
                    label=f"{h.run} train" if sty.multi else "train", **mk)
            ax.plot(h.frame["epoch"], h.frame["val_jacard_coef"], color=c, lw=1.6, ls="--",
                    label=f"{h.run} val" if sty.multi else "validation", **mk)
            _mark_best(ax, h, c)
        _reference_lines(ax, sty, labels=False)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        _finish(ax, f"{model_label(model)}: Jaccard", ylabel="Jaccard")
        ax.title.set_color(sty.colors[model])
    ax = axes[0, 3]
    for h in histories:
        ax.plot(h.frame["epoch"], h.frame["val_jacard_coef"], color=sty.color(h), lw=1.6,
                label=sty.label(h), **_marks(h.frame))
    _reference_lines(ax, sty)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _finish(ax, "Validation Jaccard, all models", ylabel="val Jaccard")
    # Row 2: losses and gap.
    for ax, col, title in (
        (axes[1, 0], "loss", "Training loss"),
        (axes[1, 1], "val_loss", "Validation loss"),
    ):
        values = []
        for h in histories:
            ax.plot(h.frame["epoch"], h.frame[col], color=sty.color(h), lw=1.6,
                    label=sty.label(h), **_marks(h.frame))
            values.extend(h.frame[col].tolist())
        _log_if_positive(ax, values)
        ax.legend(fontsize=7)
        _finish(ax, title, ylabel="loss")
    ax = axes[1, 2]
    for h in histories:
        gap = h.frame["jacard_coef"] - h.frame["val_jacard_coef"]
        ax.plot(h.frame["epoch"], gap, color=sty.color(h), lw=1.6, label=sty.label(h),
                **_marks(h.frame))
    ax.axhline(0, color="k", lw=0.8)
    ax.legend(fontsize=7)
    _finish(ax, "Train - val Jaccard gap per epoch", ylabel="gap")
    ax = axes[1, 3]
    _stat_bars(ax, stats, histories, sty, "train_val_gap", 3)
    ax.axhline(0, color="k", lw=0.8)
    _finish(ax, "Final train - val Jaccard gap", xlabel="", ylabel="gap")
    # Row 3: summary bars and learning rate.
    ax = axes[2, 0]
    _stat_bars(ax, stats, histories, sty, "best_val_jacard", 3)
    _reference_lines(ax, sty)
    if sty.ceilings:
        ax.legend(fontsize=7, loc="upper left")
    _finish(ax, "Best validation Jaccard", xlabel="", ylabel="best val Jaccard")
    ax = axes[2, 1]
    _stat_bars(ax, stats, histories, sty, "best_epoch", 0)
    _finish(ax, "Epochs to best val Jaccard", xlabel="", ylabel="epoch")
    ax = axes[2, 2]
    _stat_bars(ax, stats, histories, sty, "val_loss_sigma_last10", 4)
    _finish(ax, f"Stability: σ of val loss, last {STABILITY_WINDOW} epochs", xlabel="",
            ylabel="σ (ddof=1)")
    _lr_axes(axes[2, 3], histories, sty)
    fig.suptitle("Detailed training analysis", fontsize=16)
    fig.tight_layout()
    _save(fig, path, dpi)


def _lr_axes(ax, histories: list[History], sty: _Styler) -> None:
    values = []
    for h in histories:
        lr = h.frame["learning_rate"]
        if lr.notna().any():
            ax.plot(h.frame["epoch"], lr, color=sty.color(h), lw=1.6, label=sty.label(h),
                    drawstyle="steps-post", **_marks(h.frame))
            values.extend(lr.tolist())
    if values:
        _log_if_positive(ax, values)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no learning-rate column", ha="center", va="center", color="0.5",
                transform=ax.transAxes)
    _finish(ax, "Learning-rate schedule", ylabel="learning rate")


def plot_learning_rate(histories: list[History], path: Path, dpi: int = 120) -> None:
    """Learning rate per epoch for every (run, model), log scale when all positive."""
    sty = _Styler(histories)
    fig, ax = plt.subplots(figsize=(9, 5))
    _lr_axes(ax, histories, sty)
    fig.tight_layout()
    _save(fig, path, dpi)


def plot_run_comparison(histories: list[History], path: Path, dpi: int = 120) -> None:
    """Runs side by side: one column per run; validation Jaccard (top) and loss (bottom).

    Rows share their y axis so runs compare at a glance; colours are the models'.
    """
    sty = _Styler(histories)
    n = len(sty.runs)
    fig, axes = plt.subplots(2, n, figsize=(min(30.0, 4.2 * n + 1), 8.5), squeeze=False,
                             sharey="row")
    losses = []
    for h in histories:
        losses.extend(h.frame["val_loss"].tolist())
    for col, run in enumerate(sty.runs):
        ax_j, ax_l = axes[0, col], axes[1, col]
        for h in (h for h in histories if h.run == run):
            c = sty.colors[h.model]
            mk = _marks(h.frame)
            ax_j.plot(h.frame["epoch"], h.frame["val_jacard_coef"], color=c, lw=1.8,
                      label=model_label(h.model), **mk)
            ax_l.plot(h.frame["epoch"], h.frame["val_loss"], color=c, lw=1.8,
                      label=model_label(h.model), **mk)
            _mark_best(ax_j, h, c)
        _reference_lines(ax_j, sty, labels=col == 0)
        ax_j.set_ylim(0, 1)
        ax_j.legend(fontsize=8)
        _finish(ax_j, run, ylabel="val Jaccard" if col == 0 else "")
        _finish(ax_l, run, ylabel="val loss" if col == 0 else "")
    _log_if_positive(axes[1, 0], losses)
    fig.suptitle("Run comparison: validation Jaccard (top) and validation loss (bottom)",
                 fontsize=14)
    fig.tight_layout()
    _save(fig, path, dpi)


# --------------------------------------------------------------------------- report


def _fmt(value, digits: int = 3) -> str:
    """Format a number for the report; NaN/None/non-numeric become ``n/a``."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else ("yes" if value else "no")
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(x):
        return "n/a"
    if float(x).is_integer() and digits == 0:
        return str(int(x))
    return f"{x:.{digits}f}"


def comparison_line(model_label_text: str, best: float, best_epoch,
                    reference: float | None = None, reference_name: str = "") -> str:
    """``"unet: 0.873 (epoch 12)"``, plus ``"; run_a: 0.850 (+0.023)"`` when the user named
    a run to compare with (``--compare``)."""
    if not np.isfinite(best):
        return f"{model_label_text}: n/a"
    epoch = f" (epoch {_fmt(best_epoch, 0)})" if best_epoch is not None else ""
    line = f"{model_label_text}: {best:.3f}{epoch}"
    if reference is not None and np.isfinite(reference):
        line += f"; {reference_name}: {reference:.3f} ({best - reference:+.3f})"
    return line


def best_per_model(histories: list[History]) -> dict[str, float]:
    """Model -> highest best val Jaccard over the given histories (a ``--compare`` run)."""
    out: dict[str, float] = {}
    for h in histories:
        best = float(summarize_history(h.frame)["best_val_jacard"])
        if np.isfinite(best):
            out[h.model] = max(best, out.get(h.model, -np.inf))
    return out


def _val_frames(folder: Path) -> list[str]:
    """Source frames of the validation side, from the run's ``split.json`` (or none)."""
    import json

    try:
        return list(json.loads((folder / "split.json").read_text())["val_groups"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def validation_lines(histories: list[History]) -> list[str]:
    """``## Validation`` section: per run folder, what its ``split.json`` validated on (the
    mode, each tile with its object count, the window cut from it). Empty without one."""
    import json

    out = []
    for folder in dict.fromkeys(h.path.parent for h in histories):
        try:
            split = json.loads((folder / "split.json").read_text())
        except (OSError, ValueError):
            continue
        files, objects = split.get("val", []), split.get("val_objects", [])
        windows = split.get("val_windows") or [None] * len(files)
        mode = split.get("mode", "frames")
        how = ("tiles from inside the frames, each cut so that no pixel is shared with a "
               "training tile" if mode == "tiles" else "whole source frames")
        out += ["", f"## Validation ({folder.name}): {len(files)} tile(s) from "
                f"{len(split.get('val_groups', []))} frame(s), {how}", ""]
        for f, n, w in sorted(zip(files, objects, windows), key=lambda t: t[1]):
            cut = f", window rows {w[0]}-{w[1]}, cols {w[2]}-{w[3]}" if w else ""
            out.append(f"- {f}: {n} objects{cut}")
    return out


def fit_warning_lines(per_run: pd.DataFrame, histories: list[History]) -> list[str]:
    """``microbead_config.fit_warnings`` for every (run, model): validation far above
    training (at the best epoch), or above the data's label-consistency ceiling."""
    ceilings = label_ceilings(histories)
    out = []
    for h in histories:
        f = h.frame
        if not len(f) or not f["val_jacard_coef"].notna().any():
            continue
        i = f["val_jacard_coef"].idxmax()
        name = f"{h.run} · {h.model}" if len({x.run for x in histories}) > 1 else h.model
        out += mcfg.fit_warnings(name, float(f.loc[i, "val_jacard_coef"]),
                                 float(f.loc[i, "jacard_coef"]), ceilings.get(h.run),
                                 val_frames=_val_frames(h.path.parent))
    return out


def build_report(stats: pd.DataFrame, histories: list[History], figures: list[str],
                 problems: list[str], generated: str, reference: dict | None = None,
                 reference_name: str = "") -> str:
    """Markdown report: runs, best val Jaccard (vs a ``--compare`` run the user named, if
    any), warnings, statistics, figures.

    Every number is formatted from ``stats`` / ``histories``; NaN is written ``n/a``.
    """
    sty = _Styler(histories)
    per_run = stats[stats["n_folds"].isna()]
    agg = stats[stats["n_folds"].notna()]
    lines = [
        "# Training report",
        "",
        f"Generated {generated} by `plot_training_curves.py` from {len(histories)} history "
        "file(s). Every number below is computed from those files.",
        "",
        "## Runs",
        "",
        "| Run | Folder | Models | Epochs |",
        "|---|---|---|---|",
    ]
    for run in sty.runs:
        hs = [h for h in histories if h.run == run]
        models = ", ".join(h.model for h in hs)
        epochs = ", ".join(str(len(h.frame)) for h in hs)
        lines.append(f"| {run} | `{hs[0].path.parent}` | {models} | {epochs} |")
    lines += validation_lines(histories)
    reference = reference or {}
    lines += ["", "## Best validation Jaccard"
              + (f" vs. {reference_name} (named with --compare)" if reference else ""), ""]
    for _, row in per_run.iterrows():
        name = f"{row['run']} · {row['model']}" if sty.multi else row["model"]
        lines.append("- " + comparison_line(name, float(row["best_val_jacard"]),
                                            row["best_epoch"], reference.get(row["model"]),
                                            reference_name))
    for run, value in label_ceilings(histories).items():
        lines.append(f"- label-consistency ceiling of {run}'s data: {value:.3f} (how well "
                     "neighbouring tiles' masks agree on their shared pixels; drawn as a "
                     "dashed line on the Jaccard figures)")
    if len(agg):
        lines += ["", "## k-fold summary (best val Jaccard, mean ± SD across folds)", ""]
        for _, row in agg.iterrows():
            mean = float(row["best_val_jacard"])
            lines.append(
                f"- {row['run']} · {row['model']}: {_fmt(mean)} ± "
                f"{_fmt(row['best_val_jacard_sd'])} over {_fmt(row['n_folds'], 0)} folds"
            )
    collapsed = per_run[per_run["collapsed"].astype(bool)]
    lines += ["", "## Warnings", ""]
    if len(collapsed):
        for _, row in collapsed.iterrows():
            lines.append(
                f"- COLLAPSE: {row['run']} · {row['model']} fell below "
                f"{COLLAPSE_FRACTION:.0%} of its best val Jaccard "
                f"{_fmt(row['best_val_jacard'])} after epoch {_fmt(row['best_epoch'], 0)}."
            )
    fit = fit_warning_lines(per_run, histories)
    for msg in fit + list(problems):
        lines.append(f"- {msg}")
    if not len(collapsed) and not problems and not fit:
        lines.append("- none")
    lines += [
        "",
        "## Statistics",
        "",
        "| Run | Model | Epochs run | Best val Jaccard | Best epoch | Final val Jaccard | "
        "Final train Jaccard | Train-val gap | σ val loss (last 10) | Collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in per_run.iterrows():
        lines.append(
            f"| {row['run']} | {row['model']} | {_fmt(row['epochs_run'], 0)} | "
            f"{_fmt(row['best_val_jacard'])} | {_fmt(row['best_epoch'], 0)} | "
            f"{_fmt(row['final_val_jacard'])} | {_fmt(row['final_train_jacard'])} | "
            f"{_fmt(row['train_val_gap'])} | {_fmt(row['val_loss_sigma_last10'], 4)} | "
            f"{_fmt(bool(row['collapsed']))} |"
        )
    lines += ["", f"Full table: [{TABLE_STATS}]({TABLE_STATS}); per epoch: "
              f"[{TABLE_EPOCHS}]({TABLE_EPOCHS}).", "", "## Figures", ""]
    titles = {
        FIG_CURVES: "Training curves",
        FIG_PERFORMANCE: "Performance summary",
        FIG_DETAILED: "Detailed training analysis",
        FIG_LR: "Learning rate",
        FIG_RUNS: "Run comparison",
    }
    for fig in figures:
        lines += [f"### {titles.get(fig, fig)}", "", f"![{titles.get(fig, fig)}]({fig})", ""]
    lines += [
        "## Definitions",
        "",
        "- Best val Jaccard: maximum of `val_jacard_coef`; best epoch: its 1-based epoch "
        "(first occurrence on ties).",
        "- Final val / train Jaccard: last epoch's `val_jacard_coef` / `jacard_coef`.",
        f"- σ val loss: sample standard deviation (ddof=1) of `val_loss` over the last "
        f"min({STABILITY_WINDOW}, n) epochs; n/a with fewer than 2 epochs.",
        "- Train-val gap: final `jacard_coef` minus final `val_jacard_coef`.",
        f"- Collapsed: some epoch after the best one has `val_jacard_coef` below "
        f"{COLLAPSE_FRACTION:.0%} of the best.",
        "- k-fold: mean and sample SD (ddof=1) of the folds' best val Jaccard.",
        "",
    ]
    return "\n".join(lines)


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

"""Training histories: reading both history formats, the per-model statistics, checks.

Reads the per-model history CSVs of training runs (the trainer's ``<model>_history.csv`` or
the older Keras ``CSVLogger`` files; plain runs or k-fold runs with ``fold_*/``
subfolders) into one internal schema (:data:`HISTORY_COLUMNS`) and computes the statistics
``plot_training_curves.py`` reports (definitions in its docstring and
:func:`summarize_history`). No figures here (:mod:`training_plots`), no report text
(:mod:`training_report`). Only NumPy and pandas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import microbead_config as mcfg  # history reader, summary reader
import reporting

STABILITY_WINDOW = 10
COLLAPSE_FRACTION = 0.10

# Internal schema every history is normalised to (normalize_history_frame): the trainer's
# columns without its collapse diagnostics (val_pred_fg / val_true_fg are not plotted).
HISTORY_COLUMNS = tuple(c for c in mcfg.HISTORY_COLUMNS if c not in ("val_pred_fg",
                                                                      "val_true_fg"))
OPTIONAL_EXTRA_COLUMNS = ("accuracy", "val_accuracy")
REQUIRED_COLUMNS = mcfg.REQUIRED_HISTORY_COLUMNS
HISTORY_SUFFIXES = ("_history", "_log")

KNOWN_MODELS = ("unet", "attention_unet", "attention_resunet")

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


def normalize_history_frame(raw: pd.DataFrame, source: str = "history") -> pd.DataFrame:
    """A history table as read from a CSV, in the internal schema (either format).

    (:func:`microbead_config.normalize_history` does the column work on plain rows; this
    turns its rows into the DataFrame the statistics and figures use.)

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
    return _frame_from_rows(rows, source)


def _frame_from_rows(rows: list[dict], source: str) -> pd.DataFrame:
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
        See :func:`normalize_history_frame`.

    Raises
    ------
    HistoryError
        Unreadable, empty or malformed file; the one-line message names the file.
    """
    rows = mcfg.read_history(path, strict=True)
    return _frame_from_rows(rows, str(path))


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
        Output of :func:`normalize_history_frame` (at least one row, some numeric
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
                    theirs, ours = fmt_stat(claimed, digits), fmt_stat(stats[key], digits)
                    messages.append(
                        f"{path}: {h.model} {key} is {theirs} there but {ours} in "
                        f"{h.path.name} (history used)"
                    )
    return messages


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


def best_per_model(histories: list[History]) -> dict[str, float]:
    """Model -> highest best val Jaccard over the given histories (a ``--compare`` run)."""
    out: dict[str, float] = {}
    for h in histories:
        best = float(summarize_history(h.frame)["best_val_jacard"])
        if np.isfinite(best):
            out[h.model] = max(best, out.get(h.model, -np.inf))
    return out



def fmt_stat(value, digits: int = 3) -> str:
    """A statistic as report text: :func:`reporting.fmt` with ``digits`` fixed decimals.

    Unlike :func:`reporting.fmt`, integers and numeric strings get the decimals too and any
    other text is ``n/a`` (this report's format since before ``reporting``; the exact
    rules: None/NaN/inf/non-numeric ``n/a``, bools yes/no, ``digits=0`` whole numbers).
    """
    if value is None or isinstance(value, bool):
        return reporting.fmt(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "n/a"
    # + 0.0: -0.0 written "0" with digits=0, as the old str(int(x)) did.
    return reporting.fmt(x + 0.0 if digits == 0 else x, digits, style="fixed")

"""The Markdown training report (``TRAINING_REPORT.md``) of ``plot_training_curves.py``.

Every number is formatted from the statistics table and the histories
(:mod:`training_history`); NaN is written ``n/a``. Also the validation-split section
(from a run's ``split.json``) and the fit warnings (:func:`microbead_config.fit_warnings`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import microbead_config as mcfg  # fit warnings
from training_history import (
    COLLAPSE_FRACTION,
    FIG_CURVES,
    FIG_DETAILED,
    FIG_LR,
    FIG_PERFORMANCE,
    FIG_RUNS,
    STABILITY_WINDOW,
    TABLE_EPOCHS,
    TABLE_STATS,
    History,
    fmt_stat,
    label_ceilings,
)


def comparison_line(model_label_text: str, best: float, best_epoch,
                    reference: float | None = None, reference_name: str = "") -> str:
    """``"unet: 0.873 (epoch 12)"``, plus ``"; run_a: 0.850 (+0.023)"`` when the user named
    a run to compare with (``--compare``)."""
    if not np.isfinite(best):
        return f"{model_label_text}: n/a"
    epoch = f" (epoch {fmt_stat(best_epoch, 0)})" if best_epoch is not None else ""
    line = f"{model_label_text}: {best:.3f}{epoch}"
    if reference is not None and np.isfinite(reference):
        line += f"; {reference_name}: {reference:.3f} ({best - reference:+.3f})"
    return line


def _val_frames(folder: Path) -> list[str]:
    """Source frames of the validation side, from the run's ``split.json`` (or none)."""
    try:
        return list(json.loads((folder / "split.json").read_text())["val_groups"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def validation_lines(histories: list[History]) -> list[str]:
    """``## Validation`` section: per run folder, what its ``split.json`` validated on (the
    mode, each tile with its object count, the window cut from it). Empty without one."""
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
    runs = list(dict.fromkeys(h.run for h in histories))  # the figures' order
    multi = len(runs) > 1
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
    for run in runs:
        hs = [h for h in histories if h.run == run]
        models = ", ".join(h.model for h in hs)
        epochs = ", ".join(str(len(h.frame)) for h in hs)
        lines.append(f"| {run} | `{hs[0].path.parent}` | {models} | {epochs} |")
    lines += validation_lines(histories)
    reference = reference or {}
    lines += ["", "## Best validation Jaccard"
              + (f" vs. {reference_name} (named with --compare)" if reference else ""), ""]
    for _, row in per_run.iterrows():
        name = f"{row['run']} · {row['model']}" if multi else row["model"]
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
                f"- {row['run']} · {row['model']}: {fmt_stat(mean)} ± "
                f"{fmt_stat(row['best_val_jacard_sd'])} over {fmt_stat(row['n_folds'], 0)} folds"
            )
    collapsed = per_run[per_run["collapsed"].astype(bool)]
    lines += ["", "## Warnings", ""]
    if len(collapsed):
        for _, row in collapsed.iterrows():
            lines.append(
                f"- COLLAPSE: {row['run']} · {row['model']} fell below "
                f"{COLLAPSE_FRACTION:.0%} of its best val Jaccard "
                f"{fmt_stat(row['best_val_jacard'])} after epoch {fmt_stat(row['best_epoch'], 0)}."
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
            f"| {row['run']} | {row['model']} | {fmt_stat(row['epochs_run'], 0)} | "
            f"{fmt_stat(row['best_val_jacard'])} | {fmt_stat(row['best_epoch'], 0)} | "
            f"{fmt_stat(row['final_val_jacard'])} | {fmt_stat(row['final_train_jacard'])} | "
            f"{fmt_stat(row['train_val_gap'])} | {fmt_stat(row['val_loss_sigma_last10'], 4)} | "
            f"{fmt_stat(bool(row['collapsed']))} |"
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

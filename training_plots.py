"""Training-curve figures from normalised histories (:mod:`training_history`).

Loss and Jaccard curves per model, a performance summary, a 12-panel detailed analysis,
the learning rate, and (several runs) a run comparison; every model keeps its colour in
every figure of one invocation, runs are shades of it. Each function writes one PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from training_history import (  # noqa: E402
    STABILITY_WINDOW,
    History,
    fmt_stat,
    label_ceilings,
    model_sort_key,
    summarize_history,
)

log = logging.getLogger("microbead.plot_training_curves")

# Reference line on every Jaccard figure: the label-consistency ceiling the trainer measured
# on the run's own data (training_summary.csv ``label_ceiling``), when there is one. Other
# runs are compared only when the user names them (``--compare RUN``).

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


class Styler:
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


def _reference_lines(ax, sty: Styler, labels: bool = True) -> None:
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
    sty = Styler(histories)
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


def _grouped_bars(ax, stats: pd.DataFrame, sty: Styler, value_col: str, digits: int,
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
            ax.annotate(fmt_stat(value, digits), (x, height), xytext=(0, 3),
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
    sty = Styler(histories)
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


def _stat_bars(ax, stats: pd.DataFrame, histories: list[History], sty: Styler, col: str,
               digits: int) -> None:
    """One bar per (run, model) for a per-run statistic; NaN shown as an 'n/a' label."""
    labels = []
    for i, h in enumerate(histories):
        row = stats[(stats["run"] == h.run) & (stats["model"] == h.model)].iloc[0]
        value = float(pd.to_numeric(row[col], errors="coerce"))
        height = value if np.isfinite(value) else 0.0
        ax.bar(i, height, 0.7, color=sty.color(h), edgecolor="k", lw=0.6)
        ax.annotate(fmt_stat(value, digits), (i, height), xytext=(0, 3 if height >= 0 else -10),
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
    sty = Styler(histories)
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


def _lr_axes(ax, histories: list[History], sty: Styler) -> None:
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
    sty = Styler(histories)
    fig, ax = plt.subplots(figsize=(9, 5))
    _lr_axes(ax, histories, sty)
    fig.tight_layout()
    _save(fig, path, dpi)


def plot_run_comparison(histories: list[History], path: Path, dpi: int = 120) -> None:
    """Runs side by side: one column per run; validation Jaccard (top) and loss (bottom).

    Rows share their y axis so runs compare at a glance; colours are the models'.
    """
    sty = Styler(histories)
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

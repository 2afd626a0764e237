"""Train UNet, Attention UNet and Attention ResUNet on microbead tiles ("optimized" recipe).

Purpose
    The seed recipe (Adam 1e-4, batch 32, dropout 0.3, Dice loss, stratified 85/15 split by
    object density, early stopping patience 20 on val Jaccard, flips + ±15° rotation), made to
    actually learn: masks are augmented together with their images, intensity augmentation
    can never blank an image, masks are resized nearest-neighbour, steps per epoch are
    decoupled from the dataset size, and BatchNorm's moving statistics are given a momentum
    that matches the number of optimizer steps (see ``auto_bn_momentum``).

Inputs
    ``DATA_DIR/images/*`` and ``DATA_DIR/masks/*`` paired by file stem (see microbead_io);
    optional ``DATA_DIR/dataset.json`` with ``pixel_scale`` (tile pixels per microscope-frame
    pixel).

Outputs (one new folder per run, never overwritten)
    ``OUTPUT_DIR/microbead_training_YYYYMMDD_HHMMSS/`` with ``best_<model>_model.hdf5``
    (+ ``.keras``), ``final_<model>_model.hdf5`` (+ ``.keras``), ``<model>_history.csv``,
    ``training_summary.csv``, ``config.json`` (everything prediction needs), ``split.json``,
    ``training_console.log``, ``validation_snapshot_<model>.png``; with ``--kfold K`` one
    ``fold_NN/`` subfolder per fold plus ``kfold_summary.csv``.

Example
    python train_microbead_optimized.py --data_dir dataset_microscope --preset cpu
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

import bead_filter
import cli
import microbead_config as mcfg
import microbead_io as mio
import microbead_metrics
import runtime
from microbead_config import (  # shared with predict, analyze, plot and hpc_tools
    HISTORY_COLUMNS,
    MODEL_NAMES,
    comparison_lines,
    fit_warnings,
    read_history,
)

log = logging.getLogger("microbead.train")

SUMMARY_COLUMNS = (
    "model", "best_epoch", "best_val_jacard", "final_val_jacard", "train_time", "params",
    "epochs_run", "best_val_dice", "best_val_jacard_reloaded", "val_jacard_batchstats",
    "label_ceiling",
)

# Options, defaults and presets live in microbead_config (analysis and hpc_tools need them
# without importing the trainer).
DEFAULTS = mcfg.TRAINING_DEFAULTS
PRESETS = mcfg.TRAINING_PRESETS
# Options that --resume takes from the command line instead of the saved config.json: they
# say how long and how verbosely to run, not what is trained. Every other option is restored;
# an explicit flag that contradicts the saved value is refused (see ``resume_options``).
RESUME_OVERRIDES = frozenset({"epochs", "max_minutes", "verbose", "logical_cpus"})
# Never compared with the saved run: where to resume from, and where to report the folder.
RESUME_IGNORED = frozenset({"resume", "run_dir_file"})
# Paths compared after resolving (the same folder typed two ways is not a conflict).
RESUME_PATH_OPTIONS = frozenset({"data_dir", "output_dir", "config"})


# ----------------------------------------------------------------------------- pure helpers

#: Cost of a training step (and of a validation image) relative to the U-Net at the same
#: settings, on the 2-core development machine: 8-filter runs took 1.1-1.2x (Attention U-Net)
#: and 1.1-1.9x (Attention ResUNet) the U-Net's time (README "Measured", 2026-11/12).
MODEL_COST = {"unet": 1.0, "attention_unet": 1.2, "attention_resunet": 1.5}
#: ``--preset cpu`` on one core of that machine: one training step (16 crops of 128 px, 8
#: filters, depth 3, U-Net) and one megapixel of validation forward pass, in core-seconds.
PRESET_CPU_STEP_CORE_S = 1.7
PRESET_CPU_VAL_CORE_S_PER_MPX = 4.3
#: Per epoch outside the steps: checkpoint, history row, best-model save.
EPOCH_OVERHEAD_S = 3.0
#: Above this estimate the CPU notice is a warning.
CPU_WARN_SECONDS = 3600.0


def estimate_training_seconds(step_s: float, *, steps: int, epochs: int, models, batch: int,
                              train_px: int, val_px: int, n_val: int,
                              measured_model: str = "unet", folds: int = 1) -> float:
    """Wall time of a whole training from one measured training step.

    Parameters
    ----------
    step_s : seconds of one optimizer step of ``measured_model``, measured here.
    steps, epochs, batch : steps per epoch, maximum epochs, batch size.
    models : names of the models to train (their cost relative to the measured one:
        :data:`MODEL_COST`).
    train_px, val_px : pixels of one training input (crop or tile) and of one validation tile.
    n_val : validation tiles (a forward pass over them every epoch, costed at one third of
        a training step's per-pixel time: no backward pass).
    folds : splits trained one after the other (``--kfold``).

    Returns
    -------
    float
        Seconds if every model runs every epoch (early stopping can only shorten it).
    """
    val_image_s = step_s * val_px / (3.0 * max(1, batch) * max(1, train_px))
    epoch_s = steps * step_s + n_val * val_image_s + EPOCH_OVERHEAD_S
    cost = sum(MODEL_COST.get(m, 1.0) for m in models) / MODEL_COST.get(measured_model, 1.0)
    return float(epochs * epoch_s * cost * max(1, folds))


def preset_cpu_seconds(*, models, n_val: int, val_px: int, cores: int, folds: int = 1) -> float:
    """Wall time of ``--preset cpu`` on this dataset from the constants measured on the
    development machine (:data:`PRESET_CPU_STEP_CORE_S`), scaled to ``cores`` CPUs."""
    preset = PRESETS["cpu"]
    cores = max(1, int(cores))
    epoch_s = (preset["steps_per_epoch"] * PRESET_CPU_STEP_CORE_S / cores
               + n_val * PRESET_CPU_VAL_CORE_S_PER_MPX * val_px / 1e6 / cores
               + EPOCH_OVERHEAD_S)
    return float(preset["epochs"] * epoch_s * sum(MODEL_COST.get(m, 1.0) for m in models)
                 * max(1, folds))


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"26.4 h"``, ``"3.1 days"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cpu_notice(estimate_s: float, preset_s: float | None) -> str:
    """The trainer's line on a machine without a GPU.

    ``preset_s`` None: the run already is ``--preset cpu`` (nothing faster to suggest).
    """
    if preset_s is None:
        return (f"no GPU found; this configuration (--preset cpu) needs about "
                f"{format_duration(estimate_s)} here")
    return (f"no GPU found; this configuration needs about {format_duration(estimate_s)} "
            f"here; `--preset cpu` takes about {format_duration(preset_s)}")


def config_overrides(preset: dict, config: dict, explicit) -> list[str]:
    """``"depth 3 -> 4"`` for every preset value a ``--config`` file replaces (explicit
    flags win over both, so they are not listed)."""
    return [f"{k} {preset[k]!r} -> {config[k]!r}" for k in sorted(config)
            if k in preset and k not in explicit and config[k] != preset[k]]



def auto_steps_per_epoch(n_train: int, batch_size: int, minimum: int = 50) -> int:
    """Optimizer steps per epoch, decoupled from the dataset size.

    One pass over 62 images at batch 32 is a single step: the old pipeline took 100 steps in
    100 epochs. nnU-Net fixes 250 iterations per epoch; we use at least ``minimum`` (50) and
    at least one full pass.
    """
    return max(minimum, math.ceil(n_train / max(1, batch_size)))


def auto_bn_momentum(steps_per_epoch: int) -> float:
    """BatchNorm momentum so the moving statistics are refreshed ~5 times per epoch.

    The EMA of momentum ``m`` averages over ~``1/(1-m)`` steps. Keras' 0.99 needs hundreds of
    steps before the moving statistics match the current weights, so a short run validates
    an untrained-looking model (measured: val IoU 0.00 in inference mode vs 0.84 with batch
    statistics after 80 steps). ``1 - 5/steps`` clipped to [0.8, 0.99]: 25 steps -> 0.8,
    50 -> 0.9, 250 -> 0.98.
    """
    return float(np.clip(1.0 - 5.0 / max(1, steps_per_epoch), 0.8, 0.99))


def _group_ids(groups, n: int) -> np.ndarray | None:
    """Integer group ids, or None when every image is its own group (or no groups given)."""
    if groups is None:
        return None
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} images")
    _, ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return None if ids.max(initial=-1) + 1 == n else ids


def _group_folds(strata, gid: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Validation index sets of ``k`` stratified group folds (scikit-learn's
    ``StratifiedGroupKFold``): every group lies in exactly one fold."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = int(gid.max()) + 1
    if n_groups < k:
        raise ValueError(
            f"only {n_groups} source-frame group(s) for {k} folds: tiles of one frame must "
            "stay on one side of a split. Use fewer folds, or --group_pattern if the frames "
            "are named differently")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    strata = np.asarray(strata)
    while True:
        with warnings.catch_warnings():
            # "The least populated class in y has only N members": strata smaller than k
            # are expected with few frames; they are still spread as evenly as possible.
            warnings.simplefilter("ignore", UserWarning)
            try:
                folds = [np.sort(va) for _, va in sgkf.split(np.zeros(len(gid)), strata, gid)]
                break
            except ValueError:
                # Every stratum is smaller than k: merge neighbouring strata and retry
                # (one stratum at the end, i.e. plain group folds).
                if strata.max(initial=0) == 0:
                    raise
                strata = strata // 2
    return [f for f in folds if f.size]


def _merge_single_strata(strata: np.ndarray) -> np.ndarray:
    """Strata with every one-image stratum merged into its neighbour in sorted-id order."""
    out = np.asarray(strata).copy()
    while True:
        ids, counts = np.unique(out, return_counts=True)
        if ids.size < 2 or counts.min() > 1:
            return out
        i = int(np.argmin(counts))
        out[out == ids[i]] = ids[i - 1] if i > 0 else ids[1]


def stratified_split(strata, val_fraction: float, seed: int, groups=None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/validation index split, reproducible for a seed.

    Each stratum gives ``val_fraction`` of its images to validation (largest-remainder
    rounding so the total is ``max(1, round(N * val_fraction))``), keeping at least one
    training image per stratum. A stratum of one image cannot do both, so it first joins
    its neighbour (the next lower stratum id, i.e. density, or the next higher for the
    lowest): the validation set is never empty. Needs N >= 2.

    With ``groups`` (one key per image, e.g. the source frame from
    :func:`microbead_io.frame_group`) that are not all distinct, whole groups move:
    ``round(1 / val_fraction)`` stratified group folds are made and the one whose size is
    closest to ``val_fraction`` of the images becomes validation, so no group is on both
    sides.
    """
    strata = np.asarray(strata)
    n = strata.size
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and validation, got {n}")
    gid = _group_ids(groups, n)
    if gid is not None:
        k = max(2, int(min(gid.max() + 1, round(1.0 / max(val_fraction, 1e-6)))))
        folds = _group_folds(strata, gid, k, seed)
        target = n * val_fraction
        val = min(folds, key=lambda f: (abs(f.size - target), f[0]))
        return np.setdiff1d(np.arange(n), val), val
    n_val = int(min(n - 1, max(1, round(n * val_fraction))))
    strata = _merge_single_strata(strata)
    rng = np.random.default_rng(seed)
    ids = np.unique(strata)
    members = {s: rng.permutation(np.flatnonzero(strata == s)) for s in ids}
    quota = {s: len(members[s]) * n_val / n for s in ids}
    take = {s: min(int(math.floor(quota[s])), len(members[s]) - 1) for s in ids}
    rest = n_val - sum(take.values())
    for s in sorted(ids, key=lambda s: (quota[s] - math.floor(quota[s]), len(members[s])),
                    reverse=True):
        if rest <= 0:
            break
        if take[s] < len(members[s]) - 1:
            take[s] += 1
            rest -= 1
    val = np.sort(np.concatenate([members[s][: take[s]] for s in ids]).astype(int))
    train = np.setdiff1d(np.arange(n), val)
    return train, val


def within_frame_split(strata, groups, val_fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Validation tiles taken from inside the source frames, so validation spans the frames'
    densities even when there are only a handful of frames.

    ``round(N * val_fraction)`` tiles (at least one) go to validation. Every frame with at
    least two tiles gives one while the quota lasts; when the quota is smaller than the
    number of such frames, frames are picked evenly over the density order (``strata``; the
    sparsest and the densest first). A surplus goes to the largest frames, each keeping at
    least half of its tiles for training. Within a frame the tiles are drawn at random
    (seeded). Pixels a validation tile shares with a training neighbour are cut out of
    validation by :func:`validation_windows`.

    Parameters
    ----------
    strata : (N,) int, density stratum per tile (higher = denser)
    groups : (N,) source-frame key per tile
    """
    strata = np.asarray(strata)
    n = strata.size
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and validation, got {n}")
    keys = [str(g) for g in groups]
    frames: dict[str, list[int]] = {}
    for i, g in enumerate(keys):
        frames.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    eligible = [g for g, idx in frames.items() if len(idx) >= 2]
    if not eligible:
        raise ValueError("no source frame holds two or more tiles")
    # Density order of the frames: median stratum, then name (reproducible).
    eligible.sort(key=lambda g: (float(np.median(strata[frames[g]])), g))
    n_val = int(min(n - 1, max(1, round(n * val_fraction))))
    take = dict.fromkeys(frames, 0)
    if n_val < len(eligible):
        pos = np.unique(np.round(np.linspace(0, len(eligible) - 1, n_val)).astype(int))
        for k in pos:
            take[eligible[k]] = 1
    else:
        for g in eligible:
            take[g] = 1
        rest = n_val - len(eligible)
        while rest > 0:
            room = [g for g in eligible if take[g] + 1 <= len(frames[g]) // 2]
            if not room:
                break
            g = max(room, key=lambda g: (len(frames[g]) - take[g], g))
            take[g] += 1
            rest -= 1
    val = []
    for g, k in take.items():
        if k:
            val += list(rng.choice(frames[g], size=k, replace=False))
    val = np.sort(np.asarray(val, int))
    return np.setdiff1d(np.arange(n), val), val


def validation_windows(overlaps, train_idx, val_idx, shape, multiple: int
                       ) -> list[tuple[int, int, int, int]]:
    """Per validation tile, the window ``(y0, y1, x0, x1)`` that shares no pixel with any
    training tile; all windows have one size, a multiple of ``multiple`` (the pooling grid).

    ``overlaps``: ``(first, second, side, width)`` tuples in model pixels (see
    ``label_quality.Overlap``; ``right``: the last ``width`` columns of ``first`` are the first
    of ``second``; ``below``: the same for rows). A validation tile loses the strip it shares
    with a training neighbour; strips shared with other validation tiles stay.

    Raises ValueError when the windows would be smaller than ``multiple``.
    """
    h, w = int(shape[0]), int(shape[1])
    train = set(int(i) for i in train_idx)
    boxes = []
    for v in val_idx:
        y0, y1, x0, x1 = 0, h, 0, w
        for first, second, side, width in overlaps:
            if first == v and second in train:
                if side == "right":
                    x1 = min(x1, w - int(width))
                else:
                    y1 = min(y1, h - int(width))
            elif second == v and first in train:
                if side == "right":
                    x0 = max(x0, int(width))
                else:
                    y0 = max(y0, int(width))
        boxes.append((y0, y1, x0, x1))
    bh = min(b[1] - b[0] for b in boxes) // multiple * multiple
    bw = min(b[3] - b[2] for b in boxes) // multiple * multiple
    if bh < multiple or bw < multiple:
        raise ValueError("validation tiles share too much with their training neighbours to "
                         "leave a window of one pooling cell")
    out = []
    for y0, y1, x0, x1 in boxes:
        # Centred in the free area: as far from the cut edges as the size allows.
        oy, ox = y0 + (y1 - y0 - bh) // 2, x0 + (x1 - x0 - bw) // 2
        out.append((oy, oy + bh, ox, ox + bw))
    return out


def choose_val_split(mode: str, files, groups, n_frames_limit: int = 20) -> tuple[str, str]:
    """``frames`` or ``tiles`` for ``--val_split`` (``auto`` resolved) and why.

    ``auto`` takes validation tiles from inside the frames when every tile names its grid
    cell (``..._grid_rR_cC``, so the strips neighbours share can be found and cut out) and
    there are fewer than ``n_frames_limit`` frames: whole-frame validation would then rest on
    one or two frames, i.e. one or two densities.
    """
    n_frames = len(set(map(str, groups)))
    if mode != "auto":
        return mode, f"--val_split {mode}"
    gridded = all(mio.grid_cell(Path(f).name) is not None for f in files)
    if n_frames < n_frames_limit and gridded:
        return "tiles", (f"auto: {n_frames} source frame(s) (< {n_frames_limit}), grid tiles: "
                         "validation tiles from inside the frames, strips shared with "
                         "training tiles cut out")
    why = "not every tile is a _grid_rR_cC tile" if not gridded else f"{n_frames} frames"
    return "frames", f"auto: {why}; whole source frames validate"


def stratified_kfold(strata, k: int, seed: int, groups=None
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """K stratified folds: within each stratum, shuffled images are dealt round-robin.

    With ``groups`` that are not all distinct, stratified group folds instead (see
    :func:`stratified_split`): every group is validated in exactly one fold.
    """
    strata = np.asarray(strata)
    n = strata.size
    if k < 2 or k > n:
        raise ValueError(f"--kfold must be between 2 and the number of images ({n}), got {k}")
    gid = _group_ids(groups, n)
    if gid is not None:
        folds = _group_folds(strata, gid, k, seed)
        if len(folds) < k:
            raise ValueError(f"only {len(folds)} non-empty group folds for --kfold {k}")
        return [(np.setdiff1d(np.arange(n), va), va) for va in folds]
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, int)
    offset = 0
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        fold_of[idx] = (np.arange(idx.size) + offset) % k
        offset += idx.size
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def per_image_jaccard(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """NumPy twin of ``models.jacard_coef``: per-image IoU, both-empty = 1.

    ``pred`` ``(N, ...)`` probabilities, foreground ``> threshold``; ``truth`` ``(N, ...)``
    {0, 1} masks, foreground ``> 0.5`` (``microbead_metrics.above_threshold``, the one rule).
    Returns float64 ``(N,)``.
    """
    p = microbead_metrics.above_threshold(np.asarray(pred).reshape(len(pred), -1), threshold)
    t = microbead_metrics.above_threshold(np.asarray(truth).reshape(len(truth), -1), 0.5)
    inter = np.logical_and(p, t).sum(1)
    union = np.logical_or(p, t).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def run_folder_name(now: _dt.datetime | None = None) -> str:
    """``microbead_training_YYYYMMDD_HHMMSS`` in this machine's local time."""
    return f"microbead_training_{(now or _dt.datetime.now()):%Y%m%d_%H%M%S}"


def read_config_file(path) -> dict:
    """Training options from a JSON file (``microbead_config.read_options``: unknown keys
    are an error naming the key and the file)."""
    try:
        return mcfg.read_options(path)
    except mcfg.ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        epilog="Defaults are the seed's recipe; --preset values replace them, a --config "
               "file replaces those, explicit flags win. Exit status: 0 trained; 2 usage or "
               "fatal error (also written to the run's training_console.log).",
    )

    def add(name, **kw):
        # The help shows the resolved default and every preset's value: defaults are
        # applied after parsing (preset < config < flags), so argparse alone would show None.
        if name in DEFAULTS and "default" not in kw:
            kw["default"] = DEFAULTS[name]
            presets = "".join(f"; --preset {k}: {v[name]}" for k, v in sorted(PRESETS.items())
                              if name in v)
            if kw["default"] is not None and kw.get("help") is not argparse.SUPPRESS:
                kw["help"] = f"{kw.get('help', '')} (default: %(default)s{presets})".lstrip()
        cli.add_option(p, name, **kw)

    add("data_dir", help="dataset folder with images/ and masks/")
    add("output_dir",
        help="where the run folder is created: a new microbead_training_<time> folder every "
             "run, so an existing folder is fine and --overwrite does not apply")
    add("models", help="comma-separated subset of " + ",".join(MODEL_NAMES))
    add("preset", choices=sorted(PRESETS), default=None,
        help="named configuration (cpu: small, minutes on a laptop); flags override it")
    add("config", default=None, help="JSON of option values (e.g. from the dataset analysis)")
    add("epochs", type=int, help="maximum epochs per model")
    add("batch_size", type=int, help="global batch size")
    add("lr", type=float, help="Adam learning rate")
    add("dropout", type=float, help="dropout rate")
    add("loss", help="dice, bce_dice, bce, focal, tversky, jaccard")
    add("filters", type=int, help="base filters (64 = classic U-Net)")
    add("depth", type=int, help="number of poolings")
    add("image_size", type=int,
        help="tiles are resized to this (area / nearest); 0 = the stored tile size (never "
             "upsampled: beads of the users' native 512-px tiles are ~3 px across at 256)")
    add("patch_size", type=int,
        help="train on random crops of this size (0 = whole tile); validation uses whole tiles")
    add("val_fraction", type=float, help="validation share of the tiles (whole source frames)")
    add("patience", type=int, help="early-stopping patience (epochs) on val_jacard_coef")
    add("steps_per_epoch", type=int, help="0 = auto: max(50, one pass over the training set)")
    add("kfold", type=int, help="train K stratified folds (0 = one 85/15 split)")
    add("seed", type=int, help="split, initialisation and augmentation seed")
    add("bn_momentum", type=float, help="BatchNorm momentum; 0 = auto from steps per epoch")
    add("density_bins", type=float, nargs="+",
        help="objects-per-image bin edges e1 < ... < ek for the stratified split: bins "
             "c <= e1, e1 < c <= e2, ..., c > ek (the same meaning as evaluate's "
             "--density_bins and analyze's recommended_config.json); sparse bins are merged. "
             "Default: quantile edges (microbead_metrics.density_edges)")
    add("channels", type=int, choices=(1, 3))
    add("pixel_scale", type=float,
        help="stored tile pixels per microscope-frame pixel (default: DATA_DIR/dataset.json, "
             "else 1.0 for '..._grid_rR_cC' tiles, else an error: pass it)")
    add("normalization", choices=("flatfield", "percentile"),
        help="flatfield: divide by the local background (crop-invariant, evens out uneven "
             "light), dataset-level scale; percentile: per-tile 1-99.8 %% (the old method)")
    add("group_pattern",
        help="regex whose first group names a tile's source frame (default: the name without "
             "'_grid_rR_cC'); tiles of one frame never straddle a split")
    add("val_split", choices=("auto", "frames", "tiles"),
        help="frames: whole source frames validate; tiles: validation tiles from inside "
             "every frame, pixels shared with training tiles cut out; auto: tiles when there "
             "are fewer than 20 frames of grid tiles, else frames")
    add("threshold", type=float, help="probability threshold stored for prediction")
    add("rotation", type=float, help="max random rotation in degrees (0 = off)")
    add("intensity_aug", type=_bool, help="brightness/contrast/gamma/noise on images")
    add("elastic", type=_bool, help="elastic deformation (image and mask together)")
    add("lr_schedule", choices=("plateau", "cosine"),
        help="plateau: halve the LR when val Jaccard stalls; cosine: decay to 5%% of --lr "
             "over --epochs (short runs end on a small, stable LR)")
    add("max_minutes", type=float, help="stop a model's training after this many minutes (0 = no)")
    add("mixed_precision", choices=("auto", "on", "off"))
    add("strategy", choices=("auto", "none", "mirrored", "multiworker"),
        help="auto: MirroredStrategy with >1 GPU, MultiWorker when TF_CONFIG names workers")
    add("logical_cpus", type=int, help=argparse.SUPPRESS)
    add("resume", default=None,
        help="continue an interrupted run folder from its last completed epoch (settings "
             "from its config.json; only --epochs, --max_minutes, --verbose may differ, any "
             "other flag must match the saved value)")
    add("run_dir_file", default=None, help="write the run folder path to this file")
    add("verbose", type=int, help="Keras verbosity (-1: progress bar on a terminal, else 0)")
    return p


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def explicit_options(argv=None) -> set[str]:
    """Names of the options given on the command line (not from defaults, preset or config)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv=None) -> argparse.Namespace:
    """Resolve options: built-in defaults < --preset < --config file < explicit flags."""
    parser = build_parser()
    first = parser.parse_args(argv)
    defaults = dict(DEFAULTS)
    if first.preset:
        defaults.update(PRESETS[first.preset])
    if first.config:
        defaults.update(read_config_file(first.config))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in str(args.models).split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODEL_NAMES]
    if bad:
        parser.error(f"unknown model(s) {bad}; choose from {', '.join(MODEL_NAMES)}")
    # A patch size from the defaults, a preset or a --config file adapts to small tiles
    # (fit_patch_size); one typed on the command line is checked as given.
    args._patch_size_explicit = "patch_size" in explicit_options(argv)
    check_ranges(args, parser.error)
    check_sizes(args, parser.error)
    return args


#: Allowed range of each numeric option: (low, high, low open, high open); None = no bound.
#: Checked on the resolved values (flag, --config or preset alike), before any folder exists.
OPTION_RANGES = {
    "epochs": (1, None, False, False), "batch_size": (1, None, False, False),
    "lr": (0, None, True, False), "dropout": (0, 1, False, True),
    "filters": (1, None, False, False), "depth": (1, None, False, False),
    "image_size": (0, None, False, False), "patch_size": (0, None, False, False),
    "val_fraction": (0, 1, True, True), "patience": (0, None, False, False),
    "steps_per_epoch": (0, None, False, False), "kfold": (0, None, False, False),
    "bn_momentum": (0, 1, False, True), "pixel_scale": (0, None, True, False),
    "threshold": (0, 1, True, True), "rotation": (0, 180, False, False),
    "max_minutes": (0, None, False, False), "logical_cpus": (0, None, False, False),
}


def check_ranges(args, error) -> None:
    """Call ``error(message)`` naming the first option out of :data:`OPTION_RANGES`
    (``--epochs 0``, ``--lr -0.001``: a run of zero epochs or a negative step is no run)."""
    for name, (lo, hi, lo_open, hi_open) in OPTION_RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        bad = (value != value or (lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            low = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
            high = f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""
            error(f"--{name} {value:g}: must be {' and '.join(x for x in (low, high) if x)}")


def fit_patch_size(patch_size: int, image_size: int, depth: int) -> int:
    """The largest multiple of ``2**depth`` that is <= both ``patch_size`` and ``image_size``.

    ``patch_size`` 0 (whole tile) and ``image_size`` 0 (not resolved yet) leave it unchanged.
    Returns 0 (train on whole tiles) when not even one pooling cell fits.
    """
    if not patch_size:
        return 0
    multiple = 2 ** depth
    limit = min(patch_size, image_size) if image_size else patch_size
    return limit - limit % multiple


def check_sizes(args, error, adapt: bool = False) -> None:
    """``image_size`` and ``patch_size`` fit the network's pooling grid (0 = resolved later).

    An explicit ``--patch_size`` that does not fit is an error. One from the defaults, a
    preset or a config file is left for the data loader, which calls this with ``adapt``
    once the input size is known: it is replaced by :func:`fit_patch_size` (logged), so
    e.g. ``--preset cpu`` (128-px patches) trains on 64-px tiles.
    """
    if args.image_size and args.image_size % (2 ** args.depth):
        error(f"--image_size {args.image_size} must be divisible by 2**depth "
              f"({2 ** args.depth})")
    p = args.patch_size
    if p and (p % (2 ** args.depth) or (args.image_size and p > args.image_size)):
        if getattr(args, "_patch_size_explicit", True):
            error(f"--patch_size {p} must be divisible by 2**depth ({2 ** args.depth}) and "
                  f"<= image_size ({args.image_size or 'the stored tile size'})")
        if adapt:
            args.patch_size = fit_patch_size(p, args.image_size, args.depth)
            log.info("patch size %s instead of %d (preset/default): the largest multiple of "
                     "2**depth = %d that fits the %d-px input", args.patch_size or
                     "0 (whole tiles)", p, 2 ** args.depth, args.image_size)


# ----------------------------------------------------------------------------- data


def resolve_image_size(args, stored_hw) -> tuple[int, str]:
    """Network input size and where it came from: the flag, or the stored tile size.

    The default (0) trains at the stored size: never upsampled, and not downsampled either,
    since the users' native 512-px tiles hold beads only ~7-9 px across.
    """
    stored = int(min(stored_hw))
    if args.image_size:
        if args.image_size > stored:
            log.warning("--image_size %d upsamples the %d-px stored tiles: beads gain no "
                        "detail, training costs %.1fx more", args.image_size, stored,
                        (args.image_size / stored) ** 2)
        return int(args.image_size), "--image_size"
    multiple = 2 ** args.depth
    size = stored - stored % multiple
    if size <= 0:
        raise SystemExit(f"error: stored tiles are {stored} px, smaller than the network's "
                         f"pooling grid ({multiple}); pass a smaller --depth")
    return size, f"stored tile size ({stored} px)" + (
        f", cropped to a multiple of {multiple}" if size != stored else "")


def flatfield_spec(masks: np.ndarray, images: np.ndarray) -> dict:
    """The run's flat-field normalisation: window from the bead size, dataset-level levels.

    ``masks`` ``(N, H, W)`` and raw ``images`` ``(N, H, W, C)`` at model scale. The window
    spans :data:`microbead_io.FLATFIELD_DIAMETERS` median bead diameters; ``low``/``high``
    are pooled percentiles of the background ratio over all tiles (one scale for the whole
    dataset, never per image, so tiles and frames normalise alike).
    """
    return mio.flatfield_spec(images, float(microbead_metrics.estimate_bead_area(list(masks))))


def _fatal(message: str):
    raise SystemExit(f"error: {message}")


def _dataset_dirs(data_dir) -> tuple[Path, Path]:
    data_dir = Path(data_dir)
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            _fatal(f"{d}: folder not found (expected {data_dir}/images and {data_dir}/masks "
                   "with the same file names)")
    return images_dir, masks_dir


def _image_names(data_dir) -> list[str]:
    images_dir = _dataset_dirs(data_dir)[0]
    names = [p.name for p in mio.list_images(images_dir)]
    if not names:
        _fatal(f"no images in {images_dir} ({', '.join(mio.IMAGE_EXTENSIONS)})")
    return names


def check_data(args) -> None:
    """The checks that need no run folder: the dataset's folders, at least one image in
    images/, and a pixel scale. Raises SystemExit naming what is wrong."""
    resolve_pixel_scale(args.data_dir, args.pixel_scale, _image_names(args.data_dir))


def load_training_data(args) -> dict:
    """Pair, read and preprocess the dataset; unpaired and unreadable files are listed.

    Resolves (and stores on ``args``) the input size when it was left at 0. With flat-field
    normalisation the tiles are read raw at model scale first, since the background window
    depends on the bead size measured on the masks.
    """
    data_dir = Path(args.data_dir)
    images_dir, masks_dir = _dataset_dirs(data_dir)
    pairing = mio.pair_files(images_dir, masks_dir)
    skipped = ([f"{p}: image has no mask" for p in pairing.unpaired_images]
               + [f"{p}: mask has no image" for p in pairing.unpaired_masks]
               + [f"{p}: same stem as {used}, which is used" for p, used in pairing.ignored])
    for line in skipped:
        log.warning("skipped: %s", line)
    if not pairing.pairs:
        raise SystemExit(f"error: {data_dir}: no image/mask pairs found")
    stored = mio.read_image(pairing.pairs[0][0]).shape[:2]
    args.image_size, size_source = resolve_image_size(args, stored)
    check_sizes(args, _fatal, adapt=True)
    norm = mio.DEFAULT_NORMALIZATION if args.normalization == "percentile" else mio.RAW
    loaded = mio.load_pairs(
        pairing.pairs, image_size=args.image_size, channels=args.channels,
        normalization=norm, progress=True,
    )
    if loaded.failures:
        log.warning("%d pair(s) could not be used:\n  %s", len(loaded.failures),
                    "\n  ".join(loaded.failures))
    if len(loaded.files) < 2:
        raise SystemExit(f"error: {data_dir}: need at least 2 usable pairs, got "
                         f"{len(loaded.files)}")
    if args.normalization == "flatfield":
        norm = flatfield_spec(loaded.masks, loaded.images)
        log.info("flat-field normalisation: background window %d px, ratio %.3f -> 0, "
                 "%.3f -> 1 (pooled over all %d tiles)", norm["window"], norm["low"],
                 norm["high"], len(loaded.files))
        for i in range(len(loaded.images)):
            loaded.images[i] = mio.apply_normalization(loaded.images[i], norm)
    log.info("input size %d px (%s)", args.image_size, size_source)
    import label_quality

    # Found once, on the stored tiles: the label ceiling and the validation windows use them.
    overlaps = label_quality.grid_overlaps_from_files([i for i, _ in pairing.pairs])
    ceiling = label_ceiling(pairing.pairs, overlaps)
    if ceiling:
        log.info("label-consistency ceiling: masks of neighbouring tiles agree at pooled "
                 "Jaccard %.3f on their shared pixels (%d pairs): averaged over the dataset, "
                 "a model cannot be expected to agree with the masks much better (a few "
                 "easy validation frames can score above it)", ceiling["pooled_jaccard"],
                 ceiling["n_pairs"])
    # Shared strips in model pixels, indexed like ``files`` (pairs that failed to load are
    # not in ``files``); a strip is rounded up so that a partly shared pixel counts as shared.
    index = {Path(p[0]).name: i for i, p in enumerate(pairing.pairs)}
    where = {Path(f).name: i for i, f in enumerate(loaded.files)}
    names = {i: n for n, i in index.items()}
    factor = args.image_size / stored[0]
    model_overlaps = [
        (where[names[o.first]], where[names[o.second]], o.side,
         int(math.ceil(o.width * factor)))
        for o in overlaps if names[o.first] in where and names[o.second] in where]
    return {
        "label_ceiling": ceiling,
        "overlaps": model_overlaps,
        "normalization": dict(norm),
        "image_size_source": size_source,
        "groups": [mio.frame_group(f, args.group_pattern) for f in loaded.files],
        "images": loaded.images,
        "masks": loaded.masks,
        "files": loaded.files,
        "counts": np.array([microbead_metrics.count_components(m) for m in loaded.masks]),
        "stored_size": stored,
        "skipped": skipped + loaded.failures,
    }


class ScaleError(SystemExit):
    """Nothing determines the pixel scale; the message names the flag to pass."""


def resolve_pixel_scale(data_dir, flag: float | None, files=()) -> tuple[float, str]:
    """Stored tile px per microscope-frame px, and where that number came from.

    In order: ``--pixel_scale``; ``pixel_scale`` in ``DATA_DIR/dataset.json``; 1.0 when the
    tiles are named ``..._grid_rR_cC`` (the users' layout: native-resolution crops of their
    frames). Anything else stops with :class:`ScaleError`: a guessed scale silently changes
    every count at prediction (a wrong 0.5 cost the users' real tiles 46 % of their beads).
    """
    if flag:
        return float(flag), "--pixel_scale"
    meta = Path(data_dir) / "dataset.json"
    if meta.is_file():
        try:
            value = json.loads(meta.read_text()).get("pixel_scale")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ScaleError(f"error: {meta}: unreadable ({exc}); fix it or pass "
                             "--pixel_scale") from None
        if value:
            return float(value), f"{meta}"
    names = [f for f in files if mio.grid_cell(f)]
    if files and len(names) == len(files):
        return 1.0, ("file names: '..._grid_rR_cC' tiles are native-resolution crops of "
                     "their microscope frames")
    raise ScaleError(
        f"error: {data_dir}: cannot tell the pixel scale (no --pixel_scale, no pixel_scale in "
        f"{meta.name}, and {len(files) - len(names)} of {len(files)} tiles are not named "
        "'..._grid_rR_cC'). Pass --pixel_scale: stored tile px per microscope-frame px, e.g. "
        "1.0 for native-resolution crops, 0.5 for tiles downscaled 2x.")


# ----------------------------------------------------------------------------- TF pipeline


def rotation_transform(angle, height, width):
    """Projective transform (8 floats) rotating by ``angle`` radians about the image centre."""
    import tensorflow as tf

    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (tf.cast(width, tf.float32) - 1) / 2, (tf.cast(height, tf.float32) - 1) / 2
    return tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                     sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def augment_pair(image, mask, *, patch_size: int = 0, rotation: float = 15.0,
                 intensity: bool = True, elastic: bool = False):
    """Augment one (image, mask) pair with TensorFlow ops (used inside ``tf.data``).

    Geometric transforms (flips, 90° rotations, ±``rotation``° rotation with reflect padding,
    optional elastic warp, random crop) are applied to the image and mask *concatenated
    along channels*, so the mask follows its image by construction; the mask is re-binarized
    at 0.5 after bilinear resampling. Intensity transforms (gamma, contrast, brightness,
    gaussian noise) touch the image only and fall back to the un-augmented image if the
    result would be flat, all-zero or mostly saturated.

    Parameters
    ----------
    image : float32 ``(H, W, C)`` in [0, 1];  mask : float32 ``(H, W, 1)`` in {0, 1}

    Returns
    -------
    (image, mask) with spatial size ``patch_size`` (or unchanged when 0).
    """
    import tensorflow as tf

    c = image.shape[-1]
    x = tf.concat([image, mask], axis=-1)
    x = tf.cond(tf.random.uniform([]) < 0.5, lambda: tf.reverse(x, [1]), lambda: x)
    x = tf.cond(tf.random.uniform([]) < 0.5, lambda: tf.reverse(x, [0]), lambda: x)
    x = tf.image.rot90(x, tf.random.uniform([], 0, 4, dtype=tf.int32))
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    if rotation:
        angle = tf.random.uniform([], -rotation, rotation) * (math.pi / 180.0)
        x = tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=rotation_transform(angle, h, w)[None],
            output_shape=tf.stack([h, w]), fill_value=0.0, interpolation="BILINEAR",
            fill_mode="REFLECT",
        )[0]
    if elastic:
        x = _elastic(x)
    if patch_size:
        x = tf.image.random_crop(x, tf.stack([patch_size, patch_size, c + 1]))
    img, msk = x[..., :c], tf.cast(x[..., c:] > 0.5, tf.float32)
    if intensity:
        img = _intensity(img)
    return img, msk


def _intensity(img):
    import tensorflow as tf

    orig = tf.clip_by_value(img, 0.0, 1.0)
    gamma = tf.exp(tf.random.uniform([], math.log(0.8), math.log(1.25)))
    out = tf.pow(orig + 1e-6, gamma)
    mean = tf.reduce_mean(out)
    out = (out - mean) * tf.random.uniform([], 0.8, 1.2) + mean
    out = out + tf.random.uniform([], -0.08, 0.08)
    out = out + tf.random.normal(tf.shape(out)) * tf.random.uniform([], 0.0, 0.03)
    out = tf.clip_by_value(out, 0.0, 1.0)
    saturated = tf.reduce_mean(tf.cast((out <= 0.0) | (out >= 1.0), tf.float32))
    ok = (tf.math.reduce_std(out) > 0.02) & (saturated < 0.5)
    return tf.where(ok, out, orig)


def _elastic(x, alpha: float = 6.0, grid: int = 8):
    """Smooth random displacement (coarse grid, bilinear upsampling) applied to all channels."""
    import tensorflow as tf

    h, w = tf.shape(x)[0], tf.shape(x)[1]
    coarse = tf.random.normal([1, grid, grid, 2]) * alpha
    flow = tf.image.resize(coarse, tf.stack([h, w]), method="bicubic")[0]
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32),
                         indexing="ij")
    sy = tf.clip_by_value(yy + flow[..., 0], 0.0, tf.cast(h - 1, tf.float32))
    sx = tf.clip_by_value(xx + flow[..., 1], 0.0, tf.cast(w - 1, tf.float32))
    y0, x0 = tf.floor(sy), tf.floor(sx)
    y1 = tf.minimum(y0 + 1, tf.cast(h - 1, tf.float32))
    x1 = tf.minimum(x0 + 1, tf.cast(w - 1, tf.float32))
    wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]

    def at(yv, xv):
        return tf.gather_nd(x, tf.cast(tf.stack([yv, xv], -1), tf.int32))

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bot = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bot * wy


def any_replica(strategy, flag_fn) -> bool:
    """True if ``flag_fn()`` is true on any replica (all workers) of ``strategy``.

    An all-reduce across replicas, so every worker of a MultiWorkerMirroredStrategy
    takes the same decision from its own clock. ``flag_fn`` runs in each replica's context.
    Without a strategy, or with one replica, it is just ``flag_fn()``.
    """
    if strategy is None or getattr(strategy, "num_replicas_in_sync", 1) <= 1:
        return bool(flag_fn())
    import tensorflow as tf

    def step():
        flag = flag_fn()
        value = tf.cast(flag, tf.float32) if tf.is_tensor(flag) else tf.constant(float(flag))
        # ReduceOp has SUM and MEAN only: a sum > 0 means some replica said yes.
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                              value)

    result = strategy.experimental_local_results(strategy.run(step))
    return bool(float(result[0]) > 0.5)


def val_layout(n_val: int, batch_size: int, replicas: int = 1) -> tuple[int, int]:
    """``(batch, n_pad)`` for the validation dataset under ``replicas`` replicas.

    ``MirroredStrategy`` / ``MultiWorkerMirroredStrategy`` need every validation batch to
    split into equal per-replica shares: a last batch of 1 on 2 replicas, or of 3 split 2/1,
    fails inside ``fit`` (``AddN ... [2,H,W,1] != [1,H,W,1]``), and frame-grouped splits make
    odd validation sizes common. So the batch is a multiple of ``replicas`` and the set is
    padded with ``n_pad`` repeated images up to a multiple of it (logged; the mean per-image
    Jaccard then counts those images twice). One replica: ``(min(batch, n_val), 0)``.
    """
    if replicas <= 1:
        return max(1, min(batch_size, n_val)), 0
    n_pad = (-n_val) % replicas
    total = n_val + n_pad
    batch = max(replicas, min(batch_size, total) // replicas * replicas)
    return batch, n_pad


def validation_arrays(images, masks, val_idx, windows=None) -> tuple[np.ndarray, np.ndarray]:
    """Validation images ``(n, h, w, C)`` and float masks ``(n, h, w, 1)``: whole tiles, or
    each tile's window ``(y0, y1, x0, x1)`` from :func:`validation_windows`."""
    if not windows:
        return images[val_idx], masks[val_idx][..., None].astype(np.float32)
    xs = np.stack([images[i, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in zip(val_idx, windows)])
    ys = np.stack([masks[i, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in zip(val_idx, windows)])
    return xs, ys[..., None].astype(np.float32)


def make_datasets(images, masks, train_idx, val_idx, args, seed: int, replicas: int = 1,
                  val_data=None):
    """``tf.data`` pipelines: cached, shuffled, augmented in parallel, batched, prefetched.

    Validation is never augmented and covers every validation image (last batch partial),
    so it can never have zero steps. ``val_data``: ``(images, masks)`` to validate on instead
    of ``images[val_idx]`` (windows cut from the tiles, :func:`validation_arrays`).
    """
    import tensorflow as tf

    x = images.astype(np.float32)
    y = masks.astype(np.float32)[..., None]
    train = (
        tf.data.Dataset.from_tensor_slices((x[train_idx], y[train_idx]))
        .cache()
        .shuffle(len(train_idx), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .map(
            lambda a, b: augment_pair(
                a, b, patch_size=args.patch_size, rotation=args.rotation,
                intensity=args.intensity_aug, elastic=args.elastic,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
        .batch(args.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    val_batch, n_pad = val_layout(len(val_idx), args.batch_size, replicas)
    if n_pad:
        log.warning("validation: %d image(s) repeated so each of %d replicas gets an equal "
                    "share of every batch", n_pad, replicas)
    if val_data is None:
        xv, yv = x[val_idx], y[val_idx]
    else:
        xv, yv = np.asarray(val_data[0], np.float32), np.asarray(val_data[1], np.float32)
        yv = yv[..., None] if yv.ndim == 3 else yv
    if n_pad:
        pad = np.resize(np.arange(len(xv)), n_pad)
        xv, yv = np.concatenate([xv, xv[pad]]), np.concatenate([yv, yv[pad]])
    val = (
        tf.data.Dataset.from_tensor_slices((xv, yv))
        .batch(val_batch)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return train.with_options(opts), val.with_options(opts)


# ----------------------------------------------------------------------------- callbacks

# Early stopping, LR reduction and best-model selection all follow this value.
MONITOR = "val_jacard_coef"
# The resume state travels inside the checkpoint archive (an extra member Keras ignores): the
# weights, the optimizer and the state that says which epoch they are are one file, committed
# by one rename, so they can never disagree (see ``save_checkpoint``).
RESUME_STATE_MEMBER = "microbead_resume_state.json"
RESUME_STATE_VERSION = 1
# Counters of the monitoring callbacks carried across a resume (Keras resets them in
# ``on_train_begin``).
CALLBACK_STATE = {
    "early_stopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "lr_plateau": ("wait", "best", "cooldown_counter"),
}
# Why training stopped before --epochs (a resumed run does not continue after any of them).
STOP_EARLY_STOPPING, STOP_TIME_LIMIT, STOP_NAN = "early_stopping", "max_minutes", "nan_loss"


def history_best(rows, key: str = MONITOR) -> tuple[float, int | None]:
    """Best (largest) ``key`` over history rows, ignoring NaN and missing values.

    Parameters
    ----------
    rows : list of dict
        History rows with a 1-based ``epoch`` and ``key`` (float, NaN or None).

    Returns
    -------
    (value, epoch)
        The first epoch reaching the maximum; ``(-inf, None)`` when no row has a finite value
        (``max`` over a list starting with NaN would return NaN, after which nothing improves).
    """
    best, best_epoch = -math.inf, None
    for r in rows:
        v = r.get(key)
        v = math.nan if v is None else float(v)
        if math.isfinite(v) and v > best:
            best, best_epoch = v, int(r["epoch"])
    return best, best_epoch


def checkpoint_path(out_dir: Path, model_name: str) -> Path:
    return Path(out_dir) / "checkpoints" / f"last_{model_name}.keras"


def save_checkpoint(model, path: Path, state: dict) -> None:
    """Write the resume point: weights + optimizer (``.keras``) with ``state`` inside it.

    One temporary archive gets the model and the state member, then one ``os.replace``
    commits both: a kill at any moment leaves the previous epoch's checkpoint whole.
    """
    import models

    def write(tmp):
        models.save_model(model, tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(RESUME_STATE_MEMBER, json.dumps(mio.json_ready(state), indent=1))

    mio.atomic_write(path, write)


def read_checkpoint_state(path: Path) -> dict | None:
    """The resume state stored by :func:`save_checkpoint`; None without a checkpoint or for a
    checkpoint written before the state was stored in it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if RESUME_STATE_MEMBER not in archive.namelist():
                return None
            state = json.loads(archive.read(RESUME_STATE_MEMBER))
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({exc}); move it away to restart "
                         "this model from epoch 1") from None
    if state.get("format_version") != RESUME_STATE_VERSION:
        raise ValueError(f"{path}: resume state format_version {state.get('format_version')!r}"
                         f", this trainer reads {RESUME_STATE_VERSION}")
    return state


def restore_checkpoint(model, path: Path, state: dict) -> None:
    """Load weights and optimizer state into ``model``, built and compiled as for training.

    Rebuilding from the run's options and loading the weights (not ``keras.saving.
    load_model``) always gives a compiled model with the run's loss, metrics and optimizer,
    also where another Keras version cannot deserialize the stored config.
    """
    model.optimizer.build(model.trainable_variables)  # so its variables load too
    try:
        model.load_weights(path)
    except Exception as exc:  # Keras raises ValueError, KeyError... by version
        raise ValueError(f"{path}: cannot load the checkpoint into the configured model "
                         f"({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
    model.optimizer.learning_rate = state["learning_rate"]


def write_history(path: Path, rows: list[dict]) -> None:
    """``<model>_history.csv`` rewritten whole and atomically (NaN as an empty cell)."""
    mio.atomic_write_csv(path, rows, HISTORY_COLUMNS)


def _nan_as_worst(base):
    """``base`` (a Keras monitor callback, mode max) taking a NaN value as the worst one.

    Keras' EarlyStopping adopts a first NaN as its best; every later comparison with NaN is
    False, so it never improves and stops after ``patience`` epochs.
    """

    class NanAsWorst(base):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is not None and math.isnan(float(value)):
                logs = {**logs, self.monitor: -math.inf}
            super().on_epoch_end(epoch, logs)

    NanAsWorst.__name__ = NanAsWorst.__qualname__ = base.__name__
    return NanAsWorst


def make_callbacks(model_name, out_dir: Path, y_val, args, resume_state=None,
                   start_time=None) -> list:
    """Callbacks: LR schedule, stops, the per-epoch commit (checkpoint, then history), best.

    Order matters. Keras runs ``on_epoch_end`` in list order, so the schedule and the stops
    update their counters first, ``EpochRecorder`` then commits the epoch (checkpoint with
    those counters, then the history row) and only then is the best model saved: a kill
    between the commit and the best save is repaired on resume from the checkpoint (see
    ``train_one_model``), whereas a best model saved before its epoch is committed could be
    the weights of an epoch the resumed run redoes differently.

    Parameters
    ----------
    y_val : float array (N, H, W, 1)
        Validation masks (for the foreground fraction the collapse check compares with).
    resume_state : dict or None
        :func:`read_checkpoint_state` of the checkpoint training continues from.
    """
    import keras

    import models

    class TimeLimit(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.fired = False

        def on_epoch_end(self, epoch, logs=None):
            if not args.max_minutes:
                return
            over = time.time() - start_time > 60 * args.max_minutes
            # Each worker has its own clock: they must agree, or the ones that go on hang
            # in their next collective op.
            strategy = getattr(self.model, "distribute_strategy", None)
            if any_replica(strategy, lambda: over):
                log.warning("%s: --max_minutes %.1f reached%s; stopping", model_name,
                            args.max_minutes, "" if over else " on another worker")
                self.fired = True
                self.model.stop_training = True

    early = _nan_as_worst(keras.callbacks.EarlyStopping)(
        monitor=MONITOR, mode="max", patience=args.patience, restore_best_weights=False)
    schedule = lr_callback(args)
    time_limit = TimeLimit()
    stateful = {"early_stopping": early}
    if args.lr_schedule != "cosine":  # the cosine schedule is a function of the epoch
        stateful["lr_plateau"] = schedule
    best_model = models.BestModelCheckpoint(out_dir / f"best_{model_name}_model.hdf5",
                                            monitor=MONITOR, mode="max")
    rows = list(resume_state["history"]) if resume_state else []
    best_model.best, best_epoch = history_best(rows)
    best_model.best_epoch = None if best_epoch is None else best_epoch - 1

    class EpochRecorder(keras.callbacks.Callback):
        """Commit each epoch: checkpoint (weights, optimizer, resume state), then history.

        The history row is written only after the checkpoint it describes; on resume the
        history is rewritten from the state inside the checkpoint, so it never holds an
        epoch whose weights were lost, nor lacks one whose weights were kept.
        """

        def __init__(self):
            super().__init__()
            self.t0, self.lr = time.time(), math.nan
            self.ckpt = checkpoint_path(out_dir, model_name)
            self.history_path = out_dir / f"{model_name}_history.csv"
            self.true_fg = float(np.mean(y_val))

        def on_train_begin(self, logs=None):
            # After the other callbacks' on_train_begin (later in the list), which reset them.
            saved = (resume_state or {}).get("callbacks", {})
            for key, cb in stateful.items():
                for attr in CALLBACK_STATE[key]:
                    value = saved.get(key, {}).get(attr)
                    if value is not None:  # None: non-finite or unset; keep Keras' reset
                        setattr(cb, attr, value)

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()
            # After a scheduler set it: the rate this epoch trains with.
            self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            # models.pred_fg is a compiled metric: no extra forward pass over validation.
            fg = float(logs.get("val_pred_fg", np.nan))
            logs["val_true_fg"] = self.true_fg
            if fg < 0.1 * self.true_fg or fg > min(0.95, 3 * self.true_fg + 0.05):
                log.warning(
                    "!!! %s epoch %d: predictions COLLAPSED: %.2f%% of validation pixels "
                    "predicted as bead vs %.2f%% true. The model is predicting (almost) "
                    "all-%s.", model_name, epoch + 1, 100 * fg, 100 * self.true_fg,
                    "background" if fg < self.true_fg else "foreground",
                )
            row = mio.json_ready({
                **{k: float(logs[k]) for k in HISTORY_COLUMNS if k in logs},
                "epoch": epoch + 1, "learning_rate": self.lr,
                "epoch_time_s": round(time.time() - self.t0, 3),
            })
            rows.append(row)
            if early.stopped_epoch == epoch and epoch > 0:
                stop = STOP_EARLY_STOPPING
            elif time_limit.fired:
                stop = STOP_TIME_LIMIT
            else:
                stop = STOP_NAN if self.model.stop_training else None
            save_checkpoint(self.model, self.ckpt, {
                "format_version": RESUME_STATE_VERSION,
                "model": model_name,
                "epoch": epoch + 1,
                "learning_rate": float(
                    keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                "stop_reason": stop,
                "callbacks": {key: {attr: getattr(cb, attr) for attr in CALLBACK_STATE[key]}
                              for key, cb in stateful.items()},
                "history": rows,
            })
            write_history(self.history_path, rows)
            score = logs.get(MONITOR, np.nan)
            log.info(
                "%s epoch %d: loss %.4f  jacard %.4f  val_loss %.4f  val_jacard %.4f%s  "
                "lr %.2e  pred fg %.1f%% (true %.1f%%)  %.1fs", model_name, epoch + 1,
                logs.get("loss", np.nan), logs.get("jacard_coef", np.nan),
                logs.get("val_loss", np.nan), score,
                " *" if history_best(rows)[1] == epoch + 1 else "", self.lr,
                100 * fg, 100 * self.true_fg, row["epoch_time_s"],
            )

    return [
        keras.callbacks.TerminateOnNaN(),
        schedule,
        early,
        time_limit,
        EpochRecorder(),
        best_model,
    ]


def step_timer(on_measured, steps: int, timed: int = 3):
    """Callback timing the first optimizer steps of a ``fit`` (the first one, which traces
    the graph, is left out when there are more), then calling ``on_measured(seconds per
    step)`` once."""
    import keras

    last = max(0, min(int(steps) - 1, timed))  # batch index whose end closes the timing
    first = 1 if last >= 1 else 0

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.t0, self.done = None, False

        def on_train_batch_begin(self, batch, logs=None):
            if batch == first and self.t0 is None:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if not self.done and self.t0 is not None and batch >= last:
                self.done = True
                on_measured((time.perf_counter() - self.t0) / (batch - first + 1))

    return StepTimer()


def cosine_lr(epoch: int, base_lr: float, epochs: int, floor: float = 0.05) -> float:
    """Learning rate of 0-based ``epoch``: cosine from ``base_lr`` to ``floor * base_lr``."""
    t = min(1.0, epoch / max(1, epochs - 1))
    return float(base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))))


def lr_callback(args):
    """ReduceLROnPlateau on val Jaccard (seed recipe) or a per-epoch cosine schedule."""
    import keras

    if args.lr_schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: cosine_lr(epoch, args.lr, args.epochs))
    return _nan_as_worst(keras.callbacks.ReduceLROnPlateau)(
        monitor=MONITOR, mode="max", factor=0.5,
        patience=max(2, args.patience // 3), min_lr=1e-6, verbose=0,
    )


# ----------------------------------------------------------------------------- training


def make_strategy(kind: str):
    """Distribution strategy: MirroredStrategy for >1 local GPU, MultiWorker with TF_CONFIG."""
    import tensorflow as tf

    n_workers = 1
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        n_workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if kind == "multiworker" or (kind == "auto" and n_workers > 1):
        # Before anything lists devices: collective ops must be configured at startup.
        return _multiworker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        devices = [d.name for d in (gpus if gpus else cpus)]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def _multiworker_strategy():
    """MultiWorkerMirroredStrategy whose ``reduce`` accepts what Keras 3 passes it.

    Keras 3 (3.0-3.15 at least) calls ``strategy.reduce`` on a whole ``(x, y)`` batch before
    ``fit`` and on scalar metrics with ``axis=0`` (keras-team/keras#20585); the collective
    strategy only reduces one value of rank >= 1 along an axis. Reduce each leaf, scalars
    with ``axis=None``.
    """
    import tensorflow as tf

    class NestedReduceMultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            parent = super()

            def one(v):
                first = self.experimental_local_results(v)[0]
                ax = None if axis is not None and first.shape.rank == 0 else axis
                return parent.reduce(reduce_op, v, ax)

            return tf.nest.map_structure(one, value)

    return NestedReduceMultiWorker()


def setup_tensorflow(args) -> tuple[dict, object]:
    """Logical CPUs (tests), distribution strategy, seed, mixed precision.

    The strategy is created here, before any other TensorFlow call initialises the runtime
    (MultiWorkerMirroredStrategy cannot be created afterwards). Returns (facts for
    config.json, strategy).
    """
    import models  # first: importing it silences TensorFlow's native start-up log
    keras = models.keras
    import tensorflow as tf

    if args.logical_cpus and args.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)
    gpus = tf.config.list_physical_devices("GPU")  # lists without initialising the runtime
    for g in gpus:
        try:
            tf.config.experimental.set_memory_growth(g, True)
        except (RuntimeError, ValueError):
            pass
    log.info("%s", models.device_line())
    strategy = make_strategy(args.strategy)
    keras.utils.set_random_seed(args.seed)
    mp = args.mixed_precision == "on" or (args.mixed_precision == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if mp else "float32")
    return {"gpus": [g.name for g in gpus], "mixed_precision": mp}, strategy


def train_one_model(name, data, train_idx, val_idx, args, out_dir: Path, strategy) -> dict:
    """Train one architecture on one split; returns its ``training_summary.csv`` row."""

    import models

    x, y = data["images"], data["masks"]
    x_val, y_val = validation_arrays(x, y, val_idx, data.get("val_windows"))
    steps = args.steps_per_epoch or auto_steps_per_epoch(len(train_idx), args.batch_size)
    bn_m = args.bn_momentum or auto_bn_momentum(steps)
    history_path = out_dir / f"{name}_history.csv"
    last_ckpt = checkpoint_path(out_dir, name)
    state = read_checkpoint_state(last_ckpt)
    if state is None and last_ckpt.is_file():
        log.warning("%s: %s holds no resume state (written by an older trainer: which epoch "
                    "it is cannot be told); training this model again from epoch 1",
                    name, last_ckpt)
    initial_epoch = int(state["epoch"]) if state else 0
    train_ds, val_ds = make_datasets(x, y, train_idx, val_idx, args, args.seed,
                                     replicas=int(strategy.num_replicas_in_sync),
                                     val_data=(x_val, y_val[..., 0]))

    with strategy.scope():
        model = models.build_model(
            name, (None, None, args.channels), filters=args.filters, depth=args.depth,
            dropout=args.dropout, batch_norm=True, bn_momentum=bn_m,
        )
        models.compile_model(model, lr=args.lr, loss=args.loss, threshold=args.threshold)
        if state:
            restore_checkpoint(model, last_ckpt, state)
    if state:
        log.info("%s: resuming after epoch %d from %s", name, initial_epoch, last_ckpt)
        # The checkpoint is the commit record; a kill between it and the history write
        # left the file a row short.
        write_history(history_path, state["history"])
        if history_best(state["history"])[1] == initial_epoch:
            # Killed between the commit of the best epoch and the best-model save.
            models.save_model(model, out_dir / f"best_{name}_model.hdf5")
    elif history_path.exists():
        history_path.unlink()  # rows of a run that never committed an epoch
    params = int(model.count_params())
    log.info("%s: %s parameters, %d steps/epoch x %d epochs, batch %d, BN momentum %.3f, "
             "%d train / %d val images", name, f"{params:,}", steps, args.epochs,
             args.batch_size, bn_m, len(train_idx), len(val_idx))
    t0 = time.time()
    # Each epoch is logged in one line by EpochRecorder; Keras' own bar only on a terminal.
    verbose = args.verbose if args.verbose >= 0 else (1 if sys.stdout.isatty() else 0)
    stop = (state or {}).get("stop_reason")
    if stop:  # as the uninterrupted run would have: it stopped there and finished
        log.info("%s: training had stopped after epoch %d (%s); not continuing", name,
                 initial_epoch, stop)
    elif initial_epoch < args.epochs:
        callbacks = make_callbacks(name, out_dir, y_val, args, state, t0)
        notice = data.get("cpu_notice")
        if notice is not None and not notice["done"]:
            notice["done"] = True  # once per run: the first model trained on this CPU
            callbacks.append(step_timer(lambda step_s: log_cpu_notice(
                step_s, args, name, steps, len(val_idx), x.shape[1] * x.shape[2],
                notice["folds"]), steps))
        model.fit(
            train_ds, validation_data=val_ds, epochs=args.epochs, initial_epoch=initial_epoch,
            steps_per_epoch=steps, callbacks=callbacks,
            verbose=verbose, shuffle=False,  # the dataset shuffles itself
        )
    train_time = time.time() - t0
    models.save_model(model, out_dir / f"final_{name}_model.hdf5")
    models.save_model(model, out_dir / f"final_{name}_model.keras")

    hist = read_history(history_path)
    if not hist:
        raise RuntimeError(f"{name}: no epoch completed")
    vj = np.array([r["val_jacard_coef"] for r in hist])
    best_epoch = history_best(hist)[1]
    if best_epoch is None:
        raise RuntimeError(f"{name}: no epoch has a finite {MONITOR} ({history_path}); "
                           "no best model")
    best_i = [int(r["epoch"]) for r in hist].index(best_epoch)
    best = load_best(out_dir, name)
    models.save_model(best, out_dir / f"best_{name}_model.keras")
    prob = predict_in_batches(best, x_val, args.batch_size)
    reloaded = float(np.mean(per_image_jaccard(prob, y_val, args.threshold)))
    batchstat = batchstat_jaccard(best, x_val, y_val, args.threshold, args.batch_size)
    if abs(reloaded - vj[best_i]) > 1e-3:
        log.warning("%s: reloaded best model scores %.4f but %.4f was logged", name,
                    reloaded, vj[best_i])
    save_snapshot(out_dir / f"validation_snapshot_{name}.png", name, x_val, y_val, prob,
                  [data["files"][i] for i in val_idx], args.threshold)
    calib, pred_labels = calibrate_on_validation(prob, x_val, y_val, args.threshold,
                                                 data["median_area_px"])
    mio.atomic_write_json(out_dir / calibration_file(name), calib)
    log.info("%s: %s", name, bead_filter.describe(calib["object_filter"]))
    v = calib["validation"]
    log.info("%s: on the validation tiles the filter keeps %d of %d predicted objects: drops "
             "%d of the %d no labelled bead confirms and %d of the %d it does; predicted beads "
             "are %.1f px (median component, model scale) against %.1f px in the masks",
             name, v["kept"], v["objects"], v["dropped_unmatched"], v["unmatched"],
             v["dropped_matched"], v["matched"], calib["predicted_bead_area_px"] or 0.0,
             data["median_area_px"])
    append_validation_counts(out_dir / VALIDATION_COUNTS, name, prob, y_val,
                             [data["files"][i] for i in val_idx], args.threshold,
                             data["median_area_px"], data["model_scale"], pred_labels)
    return {
        "model": name,
        "best_epoch": int(hist[best_i]["epoch"]),
        "best_val_jacard": round(float(vj[best_i]), 6),
        "final_val_jacard": round(float(vj[-1]), 6),
        "train_time": round(train_time, 1),
        "params": params,
        "epochs_run": len(hist),
        "best_val_dice": round(float(hist[best_i].get("val_dice_coef", np.nan)), 6),
        "best_val_jacard_reloaded": round(reloaded, 6),
        "val_jacard_batchstats": round(batchstat, 6),
        "label_ceiling": (round(data["label_ceiling"]["pooled_jaccard"], 4)
                          if data.get("label_ceiling") else ""),
        "_steps_per_epoch": steps,
        "_bn_momentum": bn_m,
        "_train_jacard": float(hist[best_i].get("jacard_coef", np.nan)),
        "_n_val": len(val_idx),
        "_val_frames": sorted({data["groups"][i] for i in val_idx}),
    }


def calibration_file(name: str) -> str:
    """``calibration_<model>.json``: the model's object filter and predicted bead area."""
    return f"calibration_{name}.json"


def calibrate_on_validation(prob, x_val, y_val, threshold: float, median_area: float,
                            quantile: float = bead_filter.DEFAULT_QUANTILE
                            ) -> tuple[dict, list[np.ndarray]]:
    """The model's object filter and its own bead size, from its validation predictions.

    Each validation tile's prediction is split into beads as ``predict_microscope`` does;
    every object gets :func:`bead_filter.object_features` (against the normalised input);
    objects whose centre lies within :func:`bead_filter.match_radius` of a labelled
    object's are *confirmed*. :func:`bead_filter.calibrate` sets lower bounds that keep all
    but ``quantile`` of the confirmed objects per feature. ``predicted_bead_area_px`` is the
    median 8-connected component area of the kept objects (model scale): the scale check's
    reference (the masks' own beads may be shrunk).

    Returns
    -------
    (calibration dict, per-tile filtered labels). The dict has ``object_filter`` (or None),
    ``predicted_bead_area_px`` (None without objects) and ``validation`` counts.
    """
    labels, feats, matched = [], [], []
    for p, x in zip(prob, x_val):
        p2 = np.asarray(p, np.float32)[..., 0]
        lab = microbead_metrics.label_beads(
            microbead_metrics.above_threshold(p2, threshold).astype(np.uint8),
            median_area=median_area, prob=p2)
        img = np.asarray(x, np.float32).mean(axis=-1)
        f = bead_filter.object_features(lab, p2, img)
        labels.append(lab)
        feats.append(f)
    all_area = np.concatenate([f["area_px"] for f in feats]) if feats else np.zeros(0)
    radius = bead_filter.match_radius(float(np.median(all_area)) if all_area.size else
                                      median_area)
    for f, t in zip(feats, y_val):
        truth = bead_filter.component_centres(np.asarray(t)[..., 0] > 0.5)
        matched.append(bead_filter.match_centres(
            truth, np.stack([f["cy"], f["cx"]], 1), radius)[1])
    cat = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} if feats else {}
    conf = np.concatenate(matched) if matched else np.zeros(0, bool)
    rule = bead_filter.calibrate(cat, conf, quantile=quantile) if feats else None
    kept_labels, areas, keeps = [], [], []
    for lab, f in zip(labels, feats):
        keeps.append(bead_filter.accepted(f, rule))
        kept_labels.append(bead_filter.apply_filter(lab, keeps[-1]))
        areas.append(microbead_metrics.component_areas(kept_labels[-1] > 0))
    areas = np.concatenate(areas) if areas else np.zeros(0)
    keep = np.concatenate(keeps) if keeps else np.zeros(0, bool)
    return {
        "object_filter": rule,
        "predicted_bead_area_px": float(np.median(areas)) if areas.size else None,
        "match_radius_px": round(float(radius), 3),
        "validation": {
            "objects": int(conf.size), "kept": int(keep.sum()),
            "matched": int(conf.sum()), "unmatched": int((~conf).sum()),
            "dropped_matched": int((conf & ~keep).sum()),
            "dropped_unmatched": int((~conf & ~keep).sum()),
        },
    }, kept_labels


def log_cpu_notice(step_s: float, args, name: str, steps: int, n_val: int, val_px: int,
                   folds: int) -> None:
    """Log :func:`cpu_notice` from the measured step time of ``name`` (the first model)."""
    remaining = args.models[args.models.index(name):]
    train_px = (args.patch_size or args.image_size) ** 2
    total = estimate_training_seconds(step_s, steps=steps, epochs=args.epochs,
                                      models=remaining, batch=args.batch_size,
                                      train_px=train_px, val_px=val_px, n_val=n_val,
                                      measured_model=name, folds=folds)
    is_preset = all(getattr(args, k) == v for k, v in PRESETS["cpu"].items())
    preset = None if is_preset else preset_cpu_seconds(
        models=remaining, n_val=n_val, val_px=val_px, cores=runtime.usable_cpus(), folds=folds)
    line = cpu_notice(total, preset)
    detail = (f"{step_s:.2f} s per training step measured on {name}: {steps} steps x "
              f"{args.epochs} epochs x {len(remaining)} model(s)"
              + (f" x {folds} folds" if folds > 1 else "") + "; early stopping may end it sooner")
    level = logging.WARNING if total > CPU_WARN_SECONDS and preset is not None else logging.INFO
    log.log(level, "%s (%s)", line, detail)


VALIDATION_COUNTS = "validation_counts.csv"
VALIDATION_COUNT_COLUMNS = ("model", "file", "n_true", "n_pred", "area_px")


def validation_count_rows(name, prob, y_val, files, threshold: float, median_area: float,
                          model_scale: float, pred_labels=None) -> list[dict]:
    """Per validation tile: beads in the label mask and in the prediction, split alike.

    Both masks go through ``microbead_metrics.label_beads`` with the same median bead area
    (prediction: with its probabilities, as ``predict_microscope`` does), so ``n_pred -
    n_true`` is the model's own counting error. ``area_px`` is the tile's area in native
    frame pixels (for densities). ``quantify_assay.py --model`` reads these rows.
    ``pred_labels``: the predicted beads already split and filtered (as prediction counts
    them, :func:`calibrate_on_validation`); else split here without a filter.
    """
    rows = []
    for k, (p, t, f) in enumerate(zip(prob, y_val, files)):
        p2 = np.asarray(p)[..., 0]
        t2 = microbead_metrics.above_threshold(np.asarray(t)[..., 0], 0.5).astype(np.uint8)
        if pred_labels is not None:
            n_pred = int(len(np.unique(pred_labels[k])) - 1)
        else:
            n_pred = int(microbead_metrics.label_beads(
                microbead_metrics.above_threshold(p2, threshold).astype(np.uint8),
                median_area=median_area, prob=p2).max())
        n_true = int(microbead_metrics.label_beads(t2, median_area=median_area).max())
        rows.append({"model": name, "file": f, "n_true": n_true, "n_pred": n_pred,
                     "area_px": round(t2.size / model_scale ** 2, 1)})
    return rows


def append_validation_counts(path: Path, name, prob, y_val, files, threshold, median_area,
                             model_scale, pred_labels=None) -> None:
    """Replace ``name``'s rows of ``validation_counts.csv`` (atomic; other models kept)."""
    rows = [r for r in _read_csv_rows(path) if r["model"] != name]
    rows += validation_count_rows(name, prob, y_val, files, threshold, median_area,
                                  model_scale, pred_labels)
    mio.atomic_write_csv(path, rows, VALIDATION_COUNT_COLUMNS)


def _read_csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_best(out_dir: Path, name: str):
    import models

    return models.load_model(out_dir / f"best_{name}_model.hdf5")


def predict_in_batches(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Inference-mode probabilities ``(N, H, W, 1)`` float32, by direct calls on chunks.

    Not ``model.predict``: each reloaded best model gets its own traced predict function,
    and a last batch of another size traces it again, so three models end the log with
    TensorFlow's "triggered tf.function retracing" warning. Direct calls trace nothing.
    """
    import keras

    if len(x) == 0:
        return np.zeros((0, *x.shape[1:3], 1), np.float32)
    chunks = np.array_split(np.arange(len(x)), int(math.ceil(len(x) / max(1, int(batch_size)))))
    return np.concatenate([keras.ops.convert_to_numpy(model(x[i], training=False))
                           for i in chunks]).astype(np.float32)


def batchstat_jaccard(model, x_val, y_val, threshold: float, batch_size: int = 32) -> float:
    """Validation Jaccard when BatchNorm uses the batch's own statistics (training mode).

    Compared with the inference-mode score this exposes the old pipeline's trap: moving
    statistics that never caught up with the weights (inference IoU ~0 while batch-statistics
    IoU is high). Runs on the reloaded copy, since calling with ``training=True`` updates its
    moving statistics; dropout is active too, so expect a slightly lower value.

    The validation set goes through in ``ceil(N / batch_size)`` chunks of near-equal size
    (at most ``batch_size`` images, the training batch size: memory stays that of a training
    step, and each chunk's statistics come from about as many images as a training batch's;
    equal sizes avoid a last chunk of one or two images with unrepresentative statistics).
    With ``batch_size >= N`` it is one batch. Returns the mean per-image Jaccard (NaN for
    an empty validation set).
    """
    import keras

    n = len(x_val)
    if n == 0:
        return float("nan")
    chunks = np.array_split(np.arange(n), int(math.ceil(n / max(1, int(batch_size)))))
    scores = [per_image_jaccard(keras.ops.convert_to_numpy(model(x_val[i], training=True)),
                                y_val[i], threshold) for i in chunks]
    return float(np.mean(np.concatenate(scores)))


def save_snapshot(path: Path, name, x_val, y_val, prob, files, threshold, k: int = 4) -> None:
    """Figure: image / truth / prediction for up to ``k`` validation images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(k, len(x_val))
    order = np.argsort([-float(m.sum()) for m in y_val])[:k]
    fig, axes = plt.subplots(k, 3, figsize=(9, 3 * k), squeeze=False)
    for row, i in enumerate(order):
        iou = per_image_jaccard(prob[i : i + 1], y_val[i : i + 1], threshold)[0]
        for ax, img, title in zip(
            axes[row],
            (x_val[i, ..., 0], y_val[i, ..., 0], prob[i, ..., 0]),
            (files[i], "truth", f"prediction (IoU {iou:.3f})"),
        ):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{name}: best model on validation tiles")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- run folder


class _DropLegacyH5Advice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "HDF5 file via" not in record.getMessage()


def setup_logging(run_dir: Path) -> logging.Handler:
    # .hdf5 is written on purpose (the users' tools read it): drop Keras' per-save advice.
    logging.getLogger("absl").addFilter(_DropLegacyH5Advice())
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    fh = logging.FileHandler(run_dir / "training_console.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    return fh


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("tensorflow", "keras"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    out["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    return out


def build_config(args, data, split_info, tf_facts, pixel_scale: float,
                 pixel_scale_source: str = "--pixel_scale") -> dict:
    """The resolved configuration written next to the weights; prediction reads it back."""
    train_masks = [data["masks"][i] for i in split_info["train_idx"]]
    area = float(microbead_metrics.estimate_bead_area(train_masks))
    stored_h = data["stored_size"][0]
    model_scale = pixel_scale * args.image_size / stored_h
    return {
        "format_version": mcfg.FORMAT_VERSION,
        "models": {
            m: {"architecture": m, "filters": args.filters, "depth": args.depth,
                "dropout": args.dropout, "batch_norm": True}
            for m in args.models
        },
        "preprocessing": {
            "channels": args.channels,
            "input_size": [args.image_size, args.image_size],
            "stored_tile_size": list(map(int, data["stored_size"])),
            "pixel_scale": pixel_scale,
            "pixel_scale_source": pixel_scale_source,
            "scale": model_scale,
            "scale_source": (f"pixel_scale x input size / stored tile size = {pixel_scale:g} x "
                             f"{args.image_size} / {stored_h}; input size from "
                             f"{data.get('image_size_source', '--image_size')}"),
            "channel_mode": ("luminance (ITU-R BT.601 of RGB)" if args.channels == 1
                             else "RGB"),
            "normalization": dict(data.get("normalization", mio.DEFAULT_NORMALIZATION)),
            "pad_multiple": 2 ** args.depth,
        },
        "postprocessing": {
            "threshold": args.threshold,
            "median_bead_area_px": area,
            "median_bead_area_native_px": area / model_scale ** 2,
        },
        "training": {k: v for k, v in vars(args).items()
                     if k != "resume" and not k.startswith("_")},
        "data": {
            "data_dir": str(Path(args.data_dir).resolve()),
            "n_images": len(data["files"]),
            "skipped": data["skipped"],
            "mean_objects_per_image": float(np.mean(data["counts"])),
            "positive_ratio": float(np.mean(data["masks"])),
            "label_consistency_ceiling": data.get("label_ceiling"),
        },
        "environment": {
            **versions(), **tf_facts,
            "git_commit": git_commit(),
            "pbs_job_id": os.environ.get("PBS_JOBID"),
            "hostname": platform.node(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        },
    }


def write_summary(path: Path, rows: list[dict], extra_cols=()) -> None:
    """``training_summary.csv``, atomically: resume and ``hpc_tools run_status`` read it while
    a job may be writing it."""
    mio.atomic_write_csv(path, rows, list(extra_cols) + list(SUMMARY_COLUMNS))


def label_ceiling(pairs, overlaps=None) -> dict | None:
    """How well the masks agree with themselves where grid neighbours share pixels.

    ``label_quality.consistency_ceiling_from_files`` on the stored tiles (native
    resolution; ``overlaps`` from ``label_quality.grid_overlaps_from_files`` if the caller
    has them); None without ``_grid_rR_cC`` neighbours. No model can be expected to agree
    with the labels much better than this pooled Jaccard.
    """
    import label_quality

    res = label_quality.consistency_ceiling_from_files(
        [i for i, _ in pairs], [m for _, m in pairs], overlaps=overlaps)
    if not res:
        return None
    return {k: res[k] for k in ("pooled_jaccard", "median_pair_jaccard", "n_pairs")}


def train_split(data, train_idx, val_idx, args, out_dir: Path, strategy, counts,
                median_area: float) -> list[dict]:
    """Train every requested model on one split into ``out_dir``; skip finished ones.

    ``median_area`` is the ``config.json`` median bead area (model scale) written into
    ``out_dir``: validation beads are counted with the area prediction will use.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files, groups = data["files"], data["groups"]
    mode = data.get("val_split", "frames")
    windows = None
    if mode == "tiles":
        try:
            windows = validation_windows(data.get("overlaps", []), train_idx, val_idx,
                                         data["images"].shape[1:3], 2 ** args.depth)
        except ValueError as exc:
            raise SystemExit(f"error: {args.data_dir}: {exc}; use --val_split frames") \
                from None
    data = {**data, "val_windows": windows}
    shared = sorted({groups[i] for i in train_idx} & {groups[i] for i in val_idx})
    mio.atomic_write_json(out_dir / "split.json", {
        "mode": mode,
        "train": [files[i] for i in train_idx],
        "val": [files[i] for i in val_idx],
        "train_objects": [int(counts[i]) for i in train_idx],
        "val_objects": [int(counts[i]) for i in val_idx],
        "val_windows": [list(map(int, w)) for w in windows] if windows else None,
        "train_groups": sorted({groups[i] for i in train_idx}),
        "val_groups": sorted({groups[i] for i in val_idx}),
        "groups_on_both_sides": shared,
        "group_pattern": args.group_pattern or "default: name without _grid_rR_cC",
        "seed": args.seed,
    })
    log.info("validation: %d tile(s) from %d frame(s)%s:", len(val_idx),
             len({groups[i] for i in val_idx}),
             f", each cut to {windows[0][1] - windows[0][0]}x{windows[0][3] - windows[0][2]} px "
             "so no pixel is shared with a training tile" if windows else "")
    for i in sorted(val_idx, key=lambda i: counts[i]):
        log.info("  %s (%d objects)", files[i], counts[i])
    log.info("training: %d tile(s) from %d frame(s)", len(train_idx),
             len({groups[i] for i in train_idx}))
    done = mcfg.finished_models(out_dir)
    data = {**data, "median_area_px": float(median_area)}
    rows = []
    for name in args.models:
        if name in done:
            log.info("%s: already finished in %s; skipping", name, out_dir)
            rows.append(done[name])
            continue
        rows.append(train_one_model(name, data, train_idx, val_idx, args, out_dir, strategy))
        write_summary(out_dir / "training_summary.csv", rows)
    return rows


def _same_option(name: str, given, saved) -> bool:
    if name in RESUME_PATH_OPTIONS and given is not None and saved is not None:
        return Path(given).resolve() == Path(saved).resolve()
    if isinstance(given, list | tuple) and isinstance(saved, list | tuple):
        return len(given) == len(saved) and all(
            _same_option("", a, b) for a, b in zip(given, saved))
    if (isinstance(given, int | float) and isinstance(saved, int | float)
            and not isinstance(given, bool) and not isinstance(saved, bool)):
        return math.isclose(given, saved, rel_tol=1e-9, abs_tol=0.0)
    return given == saved


def resume_options(args, argv, saved: dict, source: Path) -> list[str]:
    """Put the saved training options of a ``--resume``d run back onto ``args``.

    Explicit flags in :data:`RESUME_OVERRIDES` win (how long and how verbosely to run); any
    other explicit flag must equal the saved value, so a resumed run trains what it started.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options; updated in place.
    argv : list of str or None
        The command line (to tell explicit flags from defaults).
    saved : dict
        The ``training`` section of the run's ``config.json``.
    source : Path
        That ``config.json`` (named in messages).

    Returns
    -------
    list of str
        One line per honoured flag whose value differs from the saved one (for the log).

    Raises
    ------
    SystemExit
        Naming every conflicting flag with its saved value.
    """
    given = explicit_options(argv) - RESUME_IGNORED
    conflicts, notes = [], []
    for name in sorted(given):
        value, old = getattr(args, name), saved.get(name, mcfg.LATER_OPTIONS.get(name))
        if _same_option(name, value, old):
            continue
        if name in RESUME_OVERRIDES:
            notes.append(f"resume: --{name} {value!r} from the command line (the run was "
                         f"saved with {old!r})")
        else:
            conflicts.append(f"--{name} {value!r} (saved: {old!r})")
    if conflicts:
        raise SystemExit(
            f"error: --resume {source.parent}: {'; '.join(conflicts)} contradict(s) {source}. "
            "A resumed run continues with its saved options; only "
            f"{', '.join('--' + k for k in sorted(RESUME_OVERRIDES))} may change. Drop the "
            "flag(s), or start a new run.")
    for name, value in {**mcfg.LATER_OPTIONS, **saved}.items():
        if name not in RESUME_IGNORED and not (name in RESUME_OVERRIDES and name in given):
            setattr(args, name, value)
    return notes


def main(argv=None) -> int:
    """Train; exit 0, or 2 on a usage or fatal error (argparse's own errors raise SystemExit).

    A fatal error is logged instead of raised: once the run folder exists it also lands in
    its ``training_console.log``. There is no --overwrite: every run gets a new folder.
    """
    try:
        return _main(argv)
    except SystemExit as exc:  # before the run folder exists: stderr only
        return _fatal_exit(exc)


def _fatal_exit(exc: SystemExit) -> int:
    """``SystemExit("error: ...")`` raised deep in the trainer -> logged, exit 2."""
    if exc.code is None or isinstance(exc.code, int):
        raise exc
    return cli.fatal(log, "%s", str(exc.code).removeprefix("error: "))


def _main(argv=None) -> int:
    args = parse_args(argv)
    runtime.configure_threads()
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir:
        cfg_path = resume_dir / "config.json"
        if not cfg_path.is_file():
            raise SystemExit(f"error: {cfg_path}: not found; cannot resume")
        try:
            saved = mcfg.read_run_config(cfg_path)["training"]
        except mcfg.ConfigError as exc:
            raise SystemExit(f"error: {exc}; cannot resume") from None
        resume_notes = resume_options(args, argv, saved, cfg_path)
        run_dir = resume_dir
    check_data(args)  # a typo'd or empty dataset creates no run folder
    if not resume_dir:
        out = Path(args.output_dir)
        made_out = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        run_dir = mio.unique_path(out / run_folder_name())
        run_dir.mkdir(parents=True)
    handler = setup_logging(run_dir)
    rc = cli.EXIT_FATAL
    try:
        for note in resume_notes if resume_dir else ():
            log.info("%s", note)
        if args.preset and args.config and not resume_dir:
            changed = config_overrides(PRESETS[args.preset], read_config_file(args.config),
                                       explicit_options(argv))
            if changed:
                log.info("--config %s overrides --preset %s: %s (explicit flags override "
                         "both)", args.config, args.preset, ", ".join(changed))
        rc = _run(args, run_dir, resuming=resume_dir is not None)
        return rc
    except SystemExit as exc:  # into training_console.log too
        return _fatal_exit(exc)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        # A folder announced through --run_dir_file is kept: the job script that asked for
        # it writes its own log there (pbs_microbead_optimized.sh).
        if not resume_dir and rc != cli.EXIT_OK and not args.run_dir_file:
            _remove_if_unused(run_dir, out if made_out else None)


def _remove_if_unused(run_dir: Path, made_out: Path | None) -> None:
    """Remove a failed run's folder when it holds nothing but its console log (no model,
    no config: nothing to resume or inspect; the messages went to stderr as well), and the
    output folder this run created if that leaves it empty."""
    extra = [p for p in run_dir.iterdir() if p.name != "training_console.log"] \
        if run_dir.is_dir() else [None]
    if extra:
        return
    (run_dir / "training_console.log").unlink(missing_ok=True)
    run_dir.rmdir()
    log.error("%s: removed: the run failed before writing anything but its log", run_dir)
    if made_out is not None and made_out.is_dir() and not any(made_out.iterdir()):
        made_out.rmdir()


def _run(args, run_dir: Path, resuming: bool) -> int:
    log.info("run folder: %s%s", run_dir, " (resuming)" if resuming else "")
    if args.run_dir_file:
        Path(args.run_dir_file).write_text(f"{run_dir.resolve()}\n")
    pixel_scale, scale_source = resolve_pixel_scale(
        args.data_dir, args.pixel_scale, _image_names(args.data_dir))
    log.info("pixel scale %.4g (stored tile px per frame px) from %s", pixel_scale,
             scale_source)
    data = load_training_data(args)
    data["model_scale"] = pixel_scale * args.image_size / data["stored_size"][0]
    counts = data["counts"]
    groups = data["groups"]
    strata = microbead_metrics.density_strata(counts, args.density_bins)
    tf_facts, strategy = setup_tensorflow(args)
    tf_facts["replicas"] = int(strategy.num_replicas_in_sync)
    if not tf_facts["gpus"]:  # estimate the whole run from the first model's first steps
        data["cpu_notice"] = {"done": False, "folds": max(1, args.kfold or 1)}
    log.info("%d image pairs, %.1f objects/image on average, %d density strata, %d replica(s)",
             len(data["files"]), counts.mean(), strata.max() + 1, tf_facts["replicas"])

    n_groups = len(set(groups))
    log.info("%d source-frame group(s) (%s)", n_groups,
             "no image shares a frame" if n_groups == len(groups) else
             f"largest holds {max(groups.count(g) for g in set(groups))} tiles")
    try:
        if args.kfold and args.kfold > 1:
            splits = stratified_kfold(strata, args.kfold, args.seed, groups=groups)
            folders = [mcfg.fold_dir(run_dir, k + 1) for k in range(len(splits))]
        else:
            mode, why = choose_val_split(args.val_split, data["files"], groups)
            log.info("validation split: %s (%s)", mode, why)
            data["val_split"] = mode
            if mode == "tiles":
                splits = [within_frame_split(strata, groups, args.val_fraction, args.seed)]
            else:
                splits = [stratified_split(strata, args.val_fraction, args.seed, groups=groups)]
            folders = [run_dir]
    except ValueError as exc:
        raise SystemExit(f"error: {args.data_dir}: {exc}") from None
    first_train = splits[0][0]
    config = build_config(args, data, {"train_idx": first_train}, tf_facts, pixel_scale,
                          scale_source)
    if len(splits) > 1:
        # Written before the folds train so an interrupted k-fold run can be --resume'd.
        mcfg.save_run_config(run_dir / mcfg.CONFIG_FILE, config)
    all_rows = []
    for k, ((tr, va), folder) in enumerate(zip(splits, folders)):
        folder.mkdir(parents=True, exist_ok=True)
        mcfg.save_run_config(folder / mcfg.CONFIG_FILE, config)
        rows = train_split(data, tr, va, args, folder, strategy, counts,
                           config["postprocessing"]["median_bead_area_px"])
        config["postprocessing"]["per_model"] = read_calibrations(folder, args.models)
        if len(splits) > 1:
            for r in rows:
                r["fold"] = k + 1
        all_rows.extend(rows)
        for r in rows:
            if "_steps_per_epoch" in r:
                config["training"]["steps_per_epoch_used"] = r["_steps_per_epoch"]
                config["training"]["bn_momentum_used"] = r["_bn_momentum"]
        mcfg.save_run_config(folder / mcfg.CONFIG_FILE, config)
    if len(splits) > 1:
        write_summary(run_dir / "training_summary.csv", all_rows, extra_cols=("fold",))
        write_kfold_summary(run_dir / "kfold_summary.csv", all_rows)
        mcfg.save_run_config(run_dir / mcfg.CONFIG_FILE, config)
    log.info("best validation Jaccard per model (columns of training_summary.csv: see "
             "README 'What each step writes'):")
    for line in comparison_lines(all_rows):
        log.info("%s", line)
    for r in all_rows:
        ceiling = r.get("label_ceiling")
        for line in fit_warnings(r["model"], float(r["best_val_jacard"]), r.get("_train_jacard"),
                                 float(ceiling) if ceiling not in (None, "") else None,
                                 r.get("_n_val"), r.get("_val_frames", ())):
            log.warning("%s", line)
    for r in all_rows:
        infer, batch = float(r["best_val_jacard_reloaded"]), float(r["val_jacard_batchstats"])
        if infer < batch - 0.1:
            log.warning("%s: val Jaccard %.3f with BatchNorm moving statistics but %.3f with "
                        "batch statistics: the moving statistics have not caught up with the "
                        "weights; train more steps or lower --bn_momentum", r["model"], infer,
                        batch)
    log.info("done: %s", run_dir)
    print(f"RUN_DIR={run_dir.resolve()}")
    return 0


def read_calibrations(folder: Path, names) -> dict:
    """``postprocessing.per_model`` of a run folder: each model's ``calibration_<model>.json``
    (written when its training finished; a resumed run reads the earlier models' files)."""
    out = {}
    for name in names:
        path = folder / calibration_file(name)
        if path.is_file():
            c = json.loads(path.read_text())
            out[name] = {"predicted_bead_area_px": c.get("predicted_bead_area_px"),
                         "object_filter": c.get("object_filter")}
    return out


def recalibrate_run(run_dir, data_dir=None, models_=None) -> dict:
    """Calibrate a finished run's models on its own validation tiles after the fact.

    For runs trained before the object filter existed: reads ``config.json`` and
    ``split.json`` (validation files and windows), preprocesses those tiles exactly as
    training did, predicts them with each ``best_<model>_model.hdf5`` and runs
    :func:`calibrate_on_validation`; writes ``calibration_<model>.json`` and adds
    ``postprocessing.per_model`` to ``config.json``. The weights are not touched.

    Returns the new ``per_model`` dict.
    """
    import models

    run_dir = Path(run_dir)
    cfg = mcfg.read_run_config(run_dir / mcfg.CONFIG_FILE)
    split = json.loads((run_dir / "split.json").read_text())
    pre, post = cfg["preprocessing"], cfg["postprocessing"]
    data_dir = Path(data_dir or cfg["data"]["data_dir"])
    images_dir, masks_dir = _dataset_dirs(data_dir)
    pairs = dict((Path(i).name, m) for i, m in mio.pair_files(images_dir, masks_dir).pairs)
    windows = split.get("val_windows") or [None] * len(split["val"])
    xs, ys = [], []
    for name, w in zip(split["val"], windows):
        img, m = mio.load_pair(images_dir / name, pairs[name], image_size=pre["input_size"][0],
                               channels=pre["channels"], normalization=pre["normalization"])
        if w:
            img, m = img[w[0]:w[1], w[2]:w[3]], m[w[0]:w[1], w[2]:w[3]]
        xs.append(img)
        ys.append(m)
    x_val = np.stack(xs)
    y_val = np.stack(ys)[..., None].astype(np.float32)
    for name in models_ or list(cfg["models"]):
        path = run_dir / f"best_{name}_model.hdf5"
        if not path.is_file():
            continue
        prob = models.load_model(path).predict(x_val, batch_size=4, verbose=0)
        calib, _ = calibrate_on_validation(prob, x_val, y_val, float(post["threshold"]),
                                           float(post["median_bead_area_px"]))
        mio.atomic_write_json(run_dir / calibration_file(name), calib)
        log.info("%s: %s", name, bead_filter.describe(calib["object_filter"]))
    cfg["postprocessing"]["per_model"] = read_calibrations(run_dir, list(cfg["models"]))
    mcfg.save_run_config(run_dir / mcfg.CONFIG_FILE, cfg)
    return cfg["postprocessing"]["per_model"]


def write_kfold_summary(path: Path, rows: list[dict]) -> None:
    """``kfold_summary.csv`` (atomic): mean and SD of the best val Jaccard over the folds."""
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        v = np.array([float(r["best_val_jacard"]) for r in rows if r["model"] == m])
        sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        out.append({"model": m, "folds": v.size, "mean_best_val_jacard": round(float(v.mean()), 6),
                    "sd_best_val_jacard": round(sd, 6)})
        log.info("%s: best val Jaccard over %d folds %.4f ± %.4f", m, v.size, v.mean(), sd)
    mio.atomic_write_csv(path, out, ("model", "folds", "mean_best_val_jacard",
                                     "sd_best_val_jacard"))


if __name__ == "__main__":
    sys.exit(main())

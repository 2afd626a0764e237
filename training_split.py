"""Train/validation splits of the training tiles: stratified by object density, whole source
frames (groups) kept on one side, or validation tiles taken from inside the frames with the
strips they share with training tiles cut out.

Pure functions of index arrays; the trainer (``train_microbead_optimized``) and the
benchmarks call them. All are reproducible for a seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import microbead_io as mio


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


"""The recommended training configuration of a microbead dataset, with the evidence for each value.

:func:`recommend_config` turns the dataset statistics of ``dataset_stats.build_summary`` into
``recommended_config.json`` (keys the trainer's ``--config`` accepts,
``microbead_config.CONFIG_FILE_KEYS``) and ``recommended_config_evidence.json`` (per key:
value, rule and the measured evidence). Pure functions; nothing is read or written here.

Example
-------
>>> config, evidence = recommend_config(summary, val_fraction=0.15)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np

import microbead_config as mcfg
import microbead_metrics as mm
from tiling import receptive_field  # one formula: also sets predict's default tile overlap

#: Recommendation rules (evidence in the report).
MIN_BEAD_DIAMETER_PX = 8.0
ASSUMED_DEPTH = 4  # models.build_unet default: four 2x2 poolings
MIN_STEPS_PER_EPOCH = 50
DEFAULT_VAL_FRACTION = mcfg.TRAINING_DEFAULTS["val_fraction"]  # the trainer's default
DICE_ONLY_MAX_FOREGROUND = 0.02
DICE_ONLY_MAX_EMPTY_FRACTION = 0.05
MAX_DENSITY_BINS = mm.DENSITY_MAX_BINS
MIN_IMAGES_PER_BIN = mm.DENSITY_MIN_PER_BIN


def _round_to(x: float, multiple: int, how: str) -> int:
    f = {"up": math.ceil, "down": math.floor, "nearest": round}[how]
    return max(multiple, int(f(x / multiple)) * multiple)


def recommend_config(stats: dict, *, val_fraction: float = DEFAULT_VAL_FRACTION
                     ) -> tuple[dict, dict]:
    """Training configuration and the evidence for each value.

    Parameters
    ----------
    stats : dict
        Needs ``dataset_size`` (int), ``native_size`` (int, median native tile width),
        ``analysis_image_size`` (int), ``median_bead_diameter_px`` (at the analysis size),
        ``mean_positive_ratio``, ``empty_mask_fraction`` and ``objects_per_image`` (list).
    val_fraction : float
        Validation fraction the batch-size rule assumes (written into the config too).

    Returns
    -------
    config : dict
        Keys from :data:`microbead_config.CONFIG_FILE_KEYS` only (what the trainer's
        ``--config`` accepts).
    evidence : dict
        Per key: ``value``, ``rule`` and the measured ``evidence`` it rests on.
    """
    config, evidence = _recommend_image_size(stats)
    for part_config, part_evidence in (
        _recommend_loss(stats),
        _recommend_batch(int(stats["dataset_size"]), val_fraction, config["image_size"]),
        _recommend_density_bins(stats),
    ):
        config.update(part_config)
        evidence.update(part_evidence)
    unknown = set(config) - mcfg.CONFIG_FILE_KEYS
    if unknown:  # a programming error here would only surface as a failed training job
        raise AssertionError(f"config keys not accepted by the trainer: {sorted(unknown)}")
    return config, evidence


def _recommend_image_size(stats: dict) -> tuple[dict, dict]:
    """``image_size`` (and the ``depth`` it assumes) from the median bead diameter."""
    multiple = 2 ** ASSUMED_DEPTH
    rf = receptive_field(ASSUMED_DEPTH)
    max_diam = rf / 4.0
    native = int(stats.get("native_size") or stats["analysis_image_size"])
    d_an = stats.get("median_bead_diameter_px")
    if d_an is None or not math.isfinite(d_an) or d_an <= 0:
        size = _round_to(native, multiple, "nearest")
        d_nat = float("nan")
        why = "no bead in any mask: kept the native tile size"
    else:
        d_nat = float(d_an) * native / float(stats["analysis_image_size"])
        if d_nat < MIN_BEAD_DIAMETER_PX:
            # Never upsample past the stored tiles: interpolation adds no detail, only cost.
            size = _round_to(native, multiple, "down")
            d256 = d_nat * 256.0 / native
            why = (f"beads are {d_nat:.1f} px at the stored size (< {MIN_BEAD_DIAMETER_PX:g}) "
                   f"and would be {d256:.1f} px at 256: train at the stored size, never "
                   f"upsampled (costs {(size / 256.0) ** 2:.1f}x a 256-px input per tile)")
        elif d_nat > max_diam:
            size = _round_to(native * max_diam / d_nat, multiple, "down")
            why = f"beads are {d_nat:.1f} px at native size (> RF/4 = {max_diam:g}): shrink"
        else:
            size = _round_to(native, multiple, "nearest")
            why = (f"beads are {d_nat:.1f} px at native size, within "
                   f"[{MIN_BEAD_DIAMETER_PX:g}, {max_diam:g}]: keep the native size")
    d_at = d_nat * size / native if math.isfinite(d_nat) else float("nan")
    smallest = (
        _round_to(native * MIN_BEAD_DIAMETER_PX / d_nat, multiple, "up")
        if math.isfinite(d_nat) else None
    )
    config = {"image_size": int(size), "depth": ASSUMED_DEPTH}
    evidence = {
        "image_size": {
            "value": int(size),
            "rule": (f"median bead diameter at the input size in [{MIN_BEAD_DIAMETER_PX:g}, "
                     f"RF/4] px; keep the stored tile size when it already is, or when beads "
                     f"are smaller (never upsample past it); multiple of 2^depth = {multiple}"),
            "evidence": {
                "native_tile_size": native, "median_bead_diameter_native_px": d_nat,
                "median_bead_diameter_at_recommended_size_px": d_at,
                "receptive_field_px": rf, "assumed_depth": ASSUMED_DEPTH,
                "smallest_size_keeping_min_diameter": smallest, "decision": why,
            },
        },
        "depth": {
            "value": ASSUMED_DEPTH,
            "rule": "the depth the receptive-field calculation assumes (models.py default)",
            "evidence": {"receptive_field_px": rf},
        },
    }
    return config, evidence


def smaller_input_note(smallest, size: int) -> str:
    """The sentence on a faster, smaller input size: offered only when there is one."""
    if smallest is None:
        return ""
    if smallest < size:
        return (f"Smallest input size still giving {MIN_BEAD_DIAMETER_PX:g} px beads: "
                f"{smallest} (a faster, lower-resolution option).")
    return (f"No smaller input size keeps beads at {MIN_BEAD_DIAMETER_PX:g} px or more "
            f"(it would take {smallest} px, above the {size} px recommended), so there is "
            "no faster, lower-resolution option.")


def _recommend_loss(stats: dict) -> tuple[dict, dict]:
    """``loss``: plain Dice only for extreme imbalance without empty masks."""
    f = stats.get("mean_positive_ratio")
    empty = float(stats.get("empty_mask_fraction") or 0.0)
    if f is not None and math.isfinite(f) and f < DICE_ONLY_MAX_FOREGROUND and (
        empty <= DICE_ONLY_MAX_EMPTY_FRACTION
    ):
        loss, why = "dice", "extreme imbalance and (almost) no empty masks"
    else:
        loss, why = "bce_dice", "default compound loss"
    return {"loss": loss}, {"loss": {
        "value": loss,
        "rule": (f"'dice' only if mean foreground ratio < {DICE_ONLY_MAX_FOREGROUND} and empty "
                 f"masks <= {DICE_ONLY_MAX_EMPTY_FRACTION:.0%}; otherwise 'bce_dice'"),
        "evidence": {"mean_positive_ratio": f, "empty_mask_fraction": empty, "decision": why},
    }}


def _recommend_batch(n: int, val_fraction: float, size: int) -> tuple[dict, dict]:
    """``batch_size``, ``steps_per_epoch`` and the ``val_fraction`` they assume."""
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_train = max(n - n_val, 1)
    cap = max(1, int(16 * (256 / size) ** 2))
    limit = max(1, min(n_train // 4, cap))
    batch = 2 ** int(math.floor(math.log2(limit)))
    steps = max(MIN_STEPS_PER_EPOCH, math.ceil(n_train / batch))
    config = {"batch_size": int(batch), "steps_per_epoch": int(steps),
              "val_fraction": float(val_fraction)}
    evidence = {
        "batch_size": {
            "value": int(batch),
            "rule": ("largest power of two <= n_train / 4 (several optimizer steps per pass "
                     "over the data) and <= 16 * (256 / image_size)^2 (memory)"),
            "evidence": {"dataset_size": n, "n_val": n_val, "n_train": n_train,
                         "memory_cap": cap},
        },
        "steps_per_epoch": {
            "value": int(steps),
            "rule": (f"max({MIN_STEPS_PER_EPOCH}, ceil(n_train / batch_size)): an epoch is at "
                     f"least {MIN_STEPS_PER_EPOCH} optimizer steps whatever the dataset size "
                     "(nnU-Net uses a fixed 250)"),
            "evidence": {"n_train": n_train, "batches_per_pass": math.ceil(n_train / batch)},
        },
        "val_fraction": {
            "value": float(val_fraction),
            "rule": "the validation fraction the batch-size rule assumed",
            "evidence": {"n_val": n_val},
        },
    }
    return config, evidence


def _recommend_density_bins(stats: dict) -> tuple[dict, dict]:
    """``density_bins``: quantile strata of objects per image for the stratified split."""
    counts = [int(c) for c in stats.get("objects_per_image", [])]
    edges = mm.density_edges(counts, min_per_bin=MIN_IMAGES_PER_BIN, max_bins=MAX_DENSITY_BINS)
    per_bin = np.histogram(counts, bins=edges)[0].tolist() if len(edges) >= 2 else []
    return {"density_bins": edges}, {"density_bins": {
        "value": edges,
        "rule": (f"quantile bins of objects per image (8-connected components at the analysis "
                 f"size), at most {MAX_DENSITY_BINS}, merged until every stratum has >= "
                 f"{MIN_IMAGES_PER_BIN} images; half-integer edges, stratum i = counts in "
                 "(edges[i], edges[i+1])"),
        "evidence": {"images_per_stratum": per_bin, "n_images": len(counts)},
    }}

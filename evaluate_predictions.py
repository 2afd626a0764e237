"""Evaluate predicted bead masks against ground truth: pixel, object and bead-count metrics.

Answers "can these masks and counts be trusted?" per image, not only pooled over a folder, so
failures on dense or empty images stay visible. Runs without TensorFlow (NumPy, SciPy,
scikit-image, OpenCV, matplotlib).

Inputs
------
``--pred_dir``: a folder of predicted masks, or the output folder of ``predict_microscope.py``
  (then ``masks/`` is used, and ``labels/`` when present). Masks are 0/255 or 0/1 images.
``--gt_dir``: the true masks folder (or a dataset root holding ``masks/``). A sibling
  ``labels/`` next to a ``masks/`` folder is used as true instance labels (logged);
  ``--gt_labels_dir`` names one explicitly.
Files pair by stem, tolerating ``_mask``/``-mask``/``_labels`` suffixes and different
extensions (``microbead_io.pair_files``); unpaired files are listed by name. A prediction and
truth of different sizes is an error naming both, unless ``--resize pred_to_truth`` (nearest
neighbour, re-binarized; flagged per image).

Instances
---------
From label images when given, else from the binary mask with ``microbead_metrics.label_beads``
(connected components with the touching-bead split the predictor uses). The single-bead area
it needs is estimated once from all truth masks (``estimate_bead_area``) and used for truth
and prediction alike (logged; ``--median_area`` overrides). Truth masks of several sizes
(tiles and full frames) get one estimate per size.

Metrics (definitions in ``microbead_metrics``; pooling and the report in ``evaluation_report``)
------------------------------------------------------------------------------------------------
* Pixel, per image and pooled (summed TP/FP/FN/TN): Jaccard (IoU), Dice, precision, recall,
  accuracy. Truth and prediction both empty -> 1; exactly one empty -> 0 (accuracy excepted).
  Precision with no predicted pixels is 1 if the truth is empty, else 0 (recall likewise).
  Same numbers as ``models.jacard_coef`` / ``dice_coef`` in training (tested).
* Objects: one-to-one Hungarian matching by IoU, a match when IoU >= threshold, at
  ``--iou_threshold`` and at 0.50, 0.55 ... 0.95: TP, FP, FN, precision, recall, F1, mean
  matched IoU, panoptic quality = sum matched IoU / (TP + FP/2 + FN/2). No true and no
  predicted objects -> precision = recall = F1 = PQ = 1.
* Counts: true and predicted bead counts, signed error (pred - true), absolute error,
  relative error |pred - true| / max(true, 1); over images MAE, mean relative error, bias and
  R^2 about y = x.
* Per-density groups: by true bead count in bins 0, 1-10, 11-50, 51-150, >150 (``--density_bins``
  changes the edges) and by dilution when names carry ``NNNx_``.

Truth-label quality (when the truth images are found: ``images/`` next to the truth
``masks/``, or ``--gt_images_dir``; ``label_quality``)
---------------------------------------------------------------------------------------
* ``mask_offset`` column: ``dy=+2 dx=-3`` when the truth mask sits that far from its image's
  beads (best shift within +-6 px raising the mean darkness under the mask by >= 5 %),
  ``none`` when assessed and aligned, ``mismatch`` when it marks almost none of its image's
  beads at any shift (the mask of another image?), empty when not assessed. An offset truth
  mask caps the IoU of a prediction that sits on the beads.
* Label-consistency ceiling: pooled Jaccard of the truth masks of neighbouring grid tiles
  (``..._grid_r<R>_c<C>``) on the pixels they share; printed next to the Jaccard in the
  report and stored as ``summary.json["label_consistency_ceiling"]`` (null when no two
  truth tiles share pixels).

Outputs (``--output_dir``; created; an existing non-empty folder is refused unless
``--overwrite``, which deletes and rewrites the files named here and touches nothing else;
the folder may not lie inside the truth dataset)
--------------------------------------------------------------------------------------
``per_image_metrics.csv``, ``summary.json``, ``evaluation_report.md``, ``evaluate.log``,
and unless ``--no_figures``: ``count_scatter.png`` (predicted vs true count, y = x, R^2),
``iou_per_image.png`` (sorted bars), ``f1_vs_iou_threshold.png``, ``worst_images.png``
(``--worst`` images with the lowest IoU: TP green, FP red, FN blue; large frames are
downsampled for display only).

Exit status: 0 on success; 1 when any pair failed (unreadable file, size mismatch) or, with
``--strict``, when any file is unpaired; 2 on unusable arguments. Failures are listed at the
end and in the report; the other images are still evaluated.

Example
-------
    python evaluate_predictions.py --pred_dir predictions/ --gt_dir test_masks/ \\
        --output_dir evaluation/ --iou_threshold 0.5
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

import cli
import evaluation_report as er
import label_quality as lq
import microbead_io as mio
import microbead_metrics as mm
import reporting
import runtime

log = logging.getLogger("microbead.evaluate")

CSV_NAME = "per_image_metrics.csv"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "evaluation_report.md"
LOG_NAME = "evaluate.log"
FIG_COUNTS = "count_scatter.png"
FIG_IOU = "iou_per_image.png"
FIG_F1 = "f1_vs_iou_threshold.png"
FIG_WORST = "worst_images.png"
OUTPUT_FILES = (CSV_NAME, SUMMARY_NAME, REPORT_NAME, LOG_NAME, FIG_COUNTS, FIG_IOU, FIG_F1,
                FIG_WORST)

#: Upper edges of the true-count bins: 0, 1-10, 11-50, 51-150, >150. Tiles of 256 px hold
#: tens of beads, full frames thousands, so the bins separate empty, sparse, typical-tile,
#: dense-tile and frame-scale images.
DEFAULT_DENSITY_EDGES = (0, 10, 50, 150)
OBJECT_KEYS = ("precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")
# Longest side of a gallery panel in pixels: 4K frames are downsampled for display only.
GALLERY_MAX_SIDE = 720


class EvaluationError(Exception):
    """One-line, file-naming error for one prediction/truth pair."""


# --------------------------------------------------------------------------- inputs


def resolve_dirs(path: str | Path, labels_dir: str | Path | None = None, *, role: str = "",
                 ) -> tuple[Path, Path | None, str]:
    """Masks folder and optional labels folder for a ``--pred_dir`` / ``--gt_dir`` argument.

    ``PATH/masks/`` is used when it exists (predictor output or dataset root), and then
    ``PATH/labels/`` if present; a folder named ``masks`` with a sibling ``labels/`` gets that
    sibling. An explicit ``labels_dir`` wins.

    Returns
    -------
    (masks_dir, labels_dir or None, note) where ``note`` says what was detected.

    Raises
    ------
    FileNotFoundError
        Naming the missing folder.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: {role} folder not found")
    masks, labels, note = p, None, f"{role} masks: {p}"
    if (p / "masks").is_dir():
        masks = p / "masks"
        note = f"{role} masks: {masks} (found masks/ inside {p})"
        if (p / "labels").is_dir():
            labels = p / "labels"
    elif p.name == "masks" and (p.parent / "labels").is_dir():
        labels = p.parent / "labels"
    if labels is not None:
        note += f"; instance labels from sibling folder {labels}"
    if labels_dir is not None:
        labels = Path(labels_dir)
        if not labels.is_dir():
            raise FileNotFoundError(f"{labels}: {role} labels folder not found")
        note = f"{role} masks: {masks}; instance labels from {labels}"
    return masks, labels, note


def index_by_stem(directory: Path | None) -> dict[str, Path]:
    """``stem_key -> path`` for the images in ``directory`` (first one wins on duplicates)."""
    if directory is None:
        return {}
    out: dict[str, Path] = {}
    for f in mio.list_images(directory):
        k = mio.stem_key(f)
        if k in out:
            log.warning("%s: more than one label file with stem %r, using %s", f, k, out[k].name)
            continue
        out[k] = f
    return out


def _read_labels(path: Path, shape: tuple[int, int], mask_path: Path, *,
                 resize: bool = False) -> np.ndarray:
    """Label image that must match its mask's ``shape`` (resampled nearest first if asked)."""
    lab = mio.read_labels(path)
    if resize and lab.shape != shape:
        lab = mio.resize_labels(lab, shape)
    if lab.shape != shape:
        raise EvaluationError(
            f"{path} is {lab.shape[1]}x{lab.shape[0]} but its mask {mask_path} is "
            f"{shape[1]}x{shape[0]}"
        )
    return lab


def load_pair_masks(pred_path: Path, true_path: Path, *, resize: str = "none",
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read a prediction and truth mask; ``(pred, truth, resized)``, uint8 ``{0,1}`` ``(H, W)``.

    Raises
    ------
    EvaluationError
        When sizes differ and ``resize == "none"``; the message names both files.
    """
    pred = mio.read_mask(pred_path)
    truth = mio.read_mask(true_path)
    if pred.shape == truth.shape:
        return pred, truth, False
    if resize != "pred_to_truth":
        raise EvaluationError(
            f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but truth {true_path} "
            f"is {truth.shape[1]}x{truth.shape[0]} (use --resize pred_to_truth to resample "
            "the prediction)"
        )
    return mio.resize_mask(pred, truth.shape), truth, True


def evaluate_pair(
    pred_path: Path,
    true_path: Path,
    *,
    pred_labels_path: Path | None = None,
    true_labels_path: Path | None = None,
    median_area: float = 0.0,
    thresholds: Sequence[float] = mm.IOU_THRESHOLDS,
    iou_threshold: float = 0.5,
    resize: str = "none",
    bins: Sequence[float] | None = None,
) -> tuple[dict, dict[float, dict]]:
    """All metrics of one prediction/truth pair.

    ``bins``: density bin edges (``microbead_metrics.density_bin_ids``' meaning; default
    :data:`DEFAULT_DENSITY_EDGES`) naming the row's ``density_bin``.

    Returns
    -------
    row : dict
        One ``per_image_metrics.csv`` row (object columns at ``iou_threshold``).
    by_threshold : dict
        ``threshold -> microbead_metrics.object_metrics`` result, for pooling.

    Raises
    ------
    EvaluationError, microbead_io.ImageReadError
        One line naming the file(s).
    """
    t0 = time.perf_counter()
    pred, truth, resized = load_pair_masks(pred_path, true_path, resize=resize)
    px = mm.pixel_metrics(pred, truth)

    if true_labels_path is not None:
        true_lab, true_from = _read_labels(true_labels_path, truth.shape, true_path), "labels"
    else:
        true_lab, true_from = mm.label_beads(truth, median_area=median_area), "mask"
    if pred_labels_path is not None:
        pred_lab = _read_labels(pred_labels_path, truth.shape, pred_path, resize=resized)
        pred_from = "labels"
    else:
        pred_lab, pred_from = mm.label_beads(pred, median_area=median_area), "mask"

    thr_all = sorted({float(t) for t in thresholds} | {float(iou_threshold)})
    by_thr = mm.object_metrics(true_lab, pred_lab, thr_all)
    obj = by_thr[float(iou_threshold)]
    name = Path(pred_path).name
    dil = mio.parse_dilution(name) or mio.parse_dilution(Path(true_path).name)
    row: dict = {
        "file": name,
        "truth_file": Path(true_path).name,
        "dilution": dil if dil is not None else "",
        "height": truth.shape[0],
        "width": truth.shape[1],
        "true_count": obj["n_true"],
        "pred_count": obj["n_pred"],
        "count_error": int(obj["count_error"]),
        "abs_count_error": int(obj["abs_count_error"]),
        "rel_count_error": obj["rel_count_error"],
        "density_bin": mm.density_bin_name(
            obj["n_true"], DEFAULT_DENSITY_EDGES if bins is None else bins),
    }
    row.update({k: px[k] for k in er.PIXEL_KEYS})
    row.update({"tp_px": px["tp"], "fp_px": px["fp"], "fn_px": px["fn"], "tn_px": px["tn"]})
    row.update({"obj_tp": obj["tp"], "obj_fp": obj["fp"], "obj_fn": obj["fn"]})
    row.update({f"obj_{k}": obj[k] for k in OBJECT_KEYS})
    for t in mm.IOU_THRESHOLDS:
        if t in by_thr:
            row[f"f1_iou_{t:.2f}"] = by_thr[t]["f1"]
    row.update({
        "true_instances_from": true_from,
        "pred_instances_from": pred_from,
        "resized": resized,
        "time_s": round(time.perf_counter() - t0, 4),
    })
    return row, by_thr


def resolve_truth_images(gt_masks: Path, images_dir: str | Path | None) -> Path | None:
    """Folder of the truth images: ``images_dir`` if given, else ``images/`` beside a truth
    ``masks/`` folder, else None.

    Raises
    ------
    FileNotFoundError
        When ``images_dir`` is given and is not a folder (the message names it).
    """
    if images_dir is not None:
        d = Path(images_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: truth images folder not found")
        return d
    if gt_masks.name == "masks" and (gt_masks.parent / "images").is_dir():
        return gt_masks.parent / "images"
    return None


def truth_label_quality(truth_paths: Sequence[Path], images: dict[str, Path],
                        progress: bool = False) -> tuple[dict[Path, str], dict | None]:
    """Offsets of the truth masks against their images, and the label-consistency ceiling.

    Parameters
    ----------
    truth_paths : truth mask files
    images : ``stem_key -> image path`` (:func:`index_by_stem` of the truth images folder)

    Returns
    -------
    offsets : dict
        truth path -> ``"dy=+2 dx=-3"`` (offset), ``"none"`` (aligned), ``"mismatch"`` (the
        mask marks almost none of its image's beads at any shift: far below the other truth
        masks, :func:`label_quality.mismatch_threshold`) or ``""`` (no image, empty mask,
        sizes differ, unreadable).
    ceiling : dict or None
        :func:`label_quality.consistency_ceiling_from_files` of the truth pairs with images.
    """
    from tqdm import tqdm

    offsets: dict[Path, str] = {}
    regs: dict[Path, lq.Registration] = {}
    with_image = []
    for tp in tqdm(truth_paths, desc="truth offsets", unit="img", disable=not progress,
                   leave=False):
        offsets[tp] = ""
        ip = images.get(mio.stem_key(tp))
        if ip is None:
            continue
        try:
            img, mask = mio.read_image(ip, 1)[..., 0], mio.read_mask(tp, warn=False)
        except mio.ImageReadError as exc:
            log.warning("%s: truth offset not assessed (%s)", tp, exc)
            continue
        if img.shape != mask.shape:
            log.warning("%s: truth mask is %dx%d but its image %s is %dx%d; offset not "
                        "assessed", tp, mask.shape[1], mask.shape[0], ip, img.shape[1],
                        img.shape[0])
            continue
        with_image.append((ip, tp))
        if mask.any():
            regs[tp] = lq.register(img, mask)
    _, threshold = lq.mismatch_threshold([r.evidence for r in regs.values()])
    for tp, reg in regs.items():
        if math.isfinite(threshold) and reg.evidence < threshold:
            offsets[tp] = "mismatch"
            log.warning("%s: truth mask marks almost none of its image's beads (evidence %.1f, "
                        "threshold %.1f): the mask of another image?", tp, reg.evidence,
                        threshold)
        else:
            offsets[tp] = f"dy={reg.dy:+d} dx={reg.dx:+d}" if reg.is_offset() else "none"
    ceiling = lq.consistency_ceiling_from_files([i for i, _ in with_image],
                                                [t for _, t in with_image])
    return offsets, ceiling


# --------------------------------------------------------------------------- writing


def write_csv(path: Path, rows: list[dict]) -> None:
    """Per-image table (atomic): columns in order of first appearance, floats ``.6g``, NaN
    as an empty cell; no rows, an empty file."""
    if not rows:
        mio.atomic_write_text(path, "")
        return
    mio.atomic_write_csv(path, *reporting.csv_rows(rows))


# --------------------------------------------------------------------------- figures


def overlay_rgb(pred: np.ndarray, truth: np.ndarray, max_side: int = GALLERY_MAX_SIDE,
                ) -> np.ndarray:
    """uint8 RGB ``(h, w, 3)``: TP green, FP red, FN blue, TN black; downsampled (area
    interpolation, display only) so the longest side is at most ``max_side``."""
    import cv2

    p, t = pred > 0, truth > 0
    rgb = np.zeros(p.shape + (3,), np.uint8)
    rgb[p & t] = (0, 200, 0)
    rgb[p & ~t] = (230, 30, 30)
    rgb[~p & t] = (40, 90, 255)
    h, w = p.shape
    scale = max_side / max(h, w)
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    return rgb


#: Colours of the worst-images gallery, and what a mixed colour means (downscaling averages
#: neighbouring pixels): every colour the figure can show is in its legend.
GALLERY_LEGEND = (((0, 200, 0), "TP: bead in both"), ((230, 30, 30), "FP: predicted only"),
                  ((40, 90, 255), "FN: truth only"),
                  ((135, 60, 142), "magenta: FP beside FN (a shifted bead)"),
                  ((115, 115, 15), "olive: TP beside FP (prediction larger)"))
#: Longest side of a wide frame's panel in the gallery (one per row).
WIDE_GALLERY_MAX_SIDE = 1400


def worst_gallery(panels):
    """Figure of ``(row, rgb)`` panels with titles and a colour legend, little white space:
    wide frames (more than 2:1) one per row at full figure width, tiles in a grid of 4."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    wide = any(rgb.shape[1] > 2 * rgb.shape[0] for _, rgb in panels)
    ncols = 1 if wide else max(1, min(len(panels), 4))
    nrows = max(1, math.ceil(len(panels) / ncols))
    width = 13.0 if wide else 3.6 * ncols
    # A squarer frame among wide ones is drawn at most 4.5 in tall, not at full width.
    heights = ([min(4.5, width * rgb.shape[0] / rgb.shape[1]) + 0.5 for _, rgb in panels]
               if wide else [3.9] * nrows) or [1.0]
    fig = plt.figure(figsize=(width, sum(heights) + 0.9), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols, height_ratios=heights)
    for i, (r, rgb) in enumerate(panels):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        ax.imshow(rgb, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{r['file']}: IoU {r['jaccard']:.3f}, beads {r['true_count']} true / "
                     f"{r['pred_count']} predicted", fontsize=9)
    handles = [Patch(color=np.array(c) / 255.0, label=t) for c, t in GALLERY_LEGEND]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9,
               frameon=False)
    fig.suptitle("Worst images by IoU (prediction against truth)", fontsize=11)
    return fig


def plot_figures(out: Path, rows: list[dict], summary: dict, worst: list[dict],
                 load: Callable[[dict], tuple[np.ndarray, np.ndarray]], dpi: int = 110,
                 ) -> list[str]:
    """Write the four figures; returns their file names (those written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    t = np.array([r["true_count"] for r in rows], float)
    p = np.array([r["pred_count"] for r in rows], float)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    dils = sorted({r["dilution"] for r in rows if r["dilution"] != ""})
    if 1 < len(dils) <= 10:
        for d in dils:
            sel = np.array([r["dilution"] == d for r in rows])
            ax.scatter(t[sel], p[sel], s=18, alpha=0.8, label=f"{d}x")
    else:
        ax.scatter(t, p, s=18, alpha=0.8)
    hi = max(1.0, float(max(t.max(), p.max()))) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="y = x")
    ax.legend(title="dilution" if 1 < len(dils) <= 10 else None, fontsize=8)
    c = summary["counts"]
    ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="true bead count", ylabel="predicted bead count",
           title=f"R² (about y = x) = {reporting.fmt(c['r2_identity'], style='fixed')}, "
                 f"MAE = {reporting.fmt(c['mae'], 2, style='fixed')}")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / FIG_COUNTS, dpi=dpi)
    plt.close(fig)
    written.append(FIG_COUNTS)

    order = sorted(rows, key=lambda r: r["jaccard"])
    fig, ax = plt.subplots(figsize=(min(16, 4 + 0.12 * len(rows)), 4))
    ax.bar(np.arange(len(order)), [r["jaccard"] for r in order], width=0.9, color="tab:blue")
    mean = summary["pixel"]["mean_per_image"]["jaccard"]
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
    if len(order) <= 40:
        ax.set_xticks(np.arange(len(order)))
        ax.set_xticklabels([r["file"] for r in order], rotation=90, fontsize=6)
    else:
        ax.set_xlabel("images, sorted by IoU")
    ax.set(ylim=(0, 1.02), ylabel="pixel IoU (Jaccard)", title="Per-image IoU")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / FIG_IOU, dpi=dpi)
    plt.close(fig)
    written.append(FIG_IOU)

    curve = summary["objects_by_threshold"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    th = [c["iou_threshold"] for c in curve]
    for key, style in (("f1", "o-"), ("precision", "s--"), ("recall", "^--"),
                       ("mean_image_f1", "x:")):
        ax.plot(th, [c[key] for c in curve], style, label=key.replace("_", " "))
    ax.axvline(summary["settings"]["iou_threshold"], color="grey", lw=0.8)
    ax.set(xlabel="IoU threshold", ylabel="score (pooled over images)", ylim=(0, 1.02),
           title="Object matching vs IoU threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / FIG_F1, dpi=dpi)
    plt.close(fig)
    written.append(FIG_F1)

    if worst:
        panels = []
        for r in worst:
            try:
                pred, truth = load(r)
            except Exception as exc:  # a file changed since evaluation: keep the others
                log.warning("%s: gallery panel skipped (%s)", r["file"], exc)
                continue
            panels.append((r, overlay_rgb(pred, truth, WIDE_GALLERY_MAX_SIDE
                                          if pred.shape[1] > 2 * pred.shape[0] else
                                          GALLERY_MAX_SIDE)))
        fig = worst_gallery(panels)
        fig.savefig(out / FIG_WORST, dpi=dpi)
        plt.close(fig)
        written.append(FIG_WORST)
    return written


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Pixel, object and bead-count metrics of predicted masks vs ground truth.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--pred_dir", "--pred-dir", dest="pred_dir", required=True,
                   help="predicted masks, or predict_microscope.py output (masks/, labels/)")
    p.add_argument("--gt_dir", "--gt-dir", dest="gt_dir", required=True,
                   help="true masks folder (or a dataset root holding masks/)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                   help="results folder (created; refused if non-empty without --overwrite)")
    p.add_argument("--gt_labels_dir", "--gt-labels-dir", dest="gt_labels_dir", default=None,
                   help="true instance labels (default: sibling labels/ of a masks/ folder)")
    p.add_argument("--gt_images_dir", "--gt-images-dir", dest="gt_images_dir", default=None,
                   help="truth images, to check the truth masks' alignment and measure the "
                        "label-consistency ceiling (default: images/ beside a masks/ folder)")
    p.add_argument("--pred_labels_dir", "--pred-labels-dir", dest="pred_labels_dir",
                   default=None, help="predicted instance labels (default: PRED/labels/)")
    p.add_argument("--no_labels", "--no-labels", dest="no_labels", action="store_true",
                   help="ignore label images; derive all instances from masks")
    p.add_argument("--iou_threshold", "--iou-threshold", dest="iou_threshold", type=float,
                   default=0.5, help="IoU for an object match (0.5-0.95 are always reported)")
    p.add_argument("--median_area", "--median-area", dest="median_area", type=float,
                   default=None, help="single-bead area in px (default: from the truth masks)")
    p.add_argument("--density_bins", "--density-bins", dest="density_bins", type=float,
                   nargs="+", default=list(DEFAULT_DENSITY_EDGES),
                   help="true-count bin edges e1 < ... < ek: bins c <= e1, e1 < c <= e2, ..., "
                        "c > ek (the trainer's --density_bins meaning); 0 10 50 150 -> bins "
                        "0, 1-10, 11-50, 51-150, >150")
    p.add_argument("--resize", choices=("none", "pred_to_truth"), default="none",
                   help="size mismatch: error (none) or resample the prediction to the truth")
    p.add_argument("--worst", type=int, default=8, help="images in the worst-image gallery")
    cli.add_overwrite(p)
    p.add_argument("--strict", action="store_true", help="unpaired files make the exit code 1")
    p.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bar")
    p.add_argument("--no_figures", "--no-figures", dest="no_figures", action="store_true",
                   help="tables and report only (faster)")
    p.add_argument("--dpi", type=int, default=110, help="figure resolution")
    args = p.parse_args(argv)
    if not 0.0 < args.iou_threshold <= 1.0:
        p.error(f"--iou_threshold must be in (0, 1], got {args.iou_threshold}")
    if args.median_area is not None and args.median_area <= 0:
        p.error(f"--median_area must be positive, got {args.median_area}")
    return args


def _sizes_text(area_by_size: dict[tuple[int, int], float]) -> str:
    return ", ".join(f"{a:.1f} px for {w}x{h}" for (h, w), a in sorted(area_by_size.items()))


def _truth_masks(paths: Sequence[Path], shapes: dict[Path, tuple[int, int]],
                 progress: bool) -> Iterator[np.ndarray]:
    """Stream truth masks (recording each one's shape); unreadable ones are skipped here and
    reported once, by the evaluation loop."""
    from tqdm import tqdm

    for p in tqdm(paths, desc="bead area", unit="img", disable=not progress, leave=False):
        try:
            m = mio.read_mask(p, warn=False)
        except mio.ImageReadError:
            continue
        shapes[p] = m.shape
        yield m


def estimate_areas(truth_paths: Sequence[Path], progress: bool = False,
                   ) -> tuple[float, dict[tuple[int, int], float], dict[Path, tuple[int, int]]]:
    """Single-bead area from the truth masks: overall, per image size, and each file's size.

    Tiles and full frames differ in scale, so when the truth masks come in several sizes each
    size gets its own estimate (one more pass over the masks in that case only).
    """
    shapes: dict[Path, tuple[int, int]] = {}
    overall = mm.estimate_bead_area(_truth_masks(truth_paths, shapes, progress))
    sizes = sorted(set(shapes.values()))
    if len(sizes) <= 1:
        return overall, {sz: overall for sz in sizes}, shapes
    by_size = {}
    for sz in sizes:
        group = [p for p in truth_paths if shapes.get(p) == sz]
        by_size[sz] = mm.estimate_bead_area(_truth_masks(group, {}, False)) or overall
    return overall, by_size, shapes


def _protected_inputs(args: argparse.Namespace, inputs: dict) -> list[Path]:
    """Input folders the output folder may not lie in: the mask and label folders and the
    truth dataset root. A predictor output folder may hold its evaluation (``PRED/evaluation``
    beside ``PRED/masks``), as the PBS prediction job writes it."""
    folders = [Path(args.gt_dir), inputs["gt_masks"], inputs["pred_masks"]]
    folders += [d for d in (inputs["gt_labels"], inputs["pred_labels"]) if d]
    if inputs["gt_masks"].name == "masks":
        folders.append(inputs["gt_masks"].parent)  # the dataset root
    return folders


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = [runtime.add_log_handler()]
    runtime.configure_threads()
    out = Path(args.output_dir)
    try:
        try:  # input folders first: a typo creates no output folder
            inputs = _resolve_inputs(args)
            claim = cli.claim_output_dir(out, OUTPUT_FILES, script="evaluate_predictions",
                                         overwrite=args.overwrite, log_name=LOG_NAME,
                                         protected=_protected_inputs(args, inputs))
        except (FileNotFoundError, cli.OutputDirError) as exc:
            return cli.fatal(log, "%s", exc)
        with claim:
            handlers.append(runtime.add_log_handler(out / LOG_NAME, mode="w"))
            claim.report(log)
            return _run(args, out, inputs)
    finally:
        runtime.remove_log_handlers(handlers)


def _resolve_inputs(args: argparse.Namespace) -> dict:
    """Prediction and truth folders (``pred_masks, pred_labels, pred_note, gt_masks,
    gt_labels, gt_note, gt_images``); FileNotFoundError names a missing one."""
    pred_masks, pred_labels, pred_note = resolve_dirs(
        args.pred_dir, args.pred_labels_dir, role="prediction")
    gt_masks, gt_labels, gt_note = resolve_dirs(args.gt_dir, args.gt_labels_dir, role="truth")
    gt_images = resolve_truth_images(gt_masks, args.gt_images_dir)
    if args.no_labels:
        pred_labels = gt_labels = None
    return {"pred_masks": pred_masks, "pred_labels": pred_labels, "pred_note": pred_note,
            "gt_masks": gt_masks, "gt_labels": gt_labels, "gt_note": gt_note,
            "gt_images": gt_images}


def _pair_predictions(pred_masks: Path, gt_masks: Path) -> mio.Pairing:
    """Pair prediction and truth masks by stem; every unpaired or duplicated file is named."""
    # pair_files words its warnings as image/mask; say prediction/truth instead.
    io_log = logging.getLogger("microbead.io")
    level = io_log.level
    io_log.setLevel(logging.ERROR)
    try:
        pairing = mio.pair_files(pred_masks, gt_masks)
    finally:
        io_log.setLevel(level)
    for p in pairing.unpaired_images:
        log.warning("%s: prediction has no truth mask", p)
    for p in pairing.unpaired_masks:
        log.warning("%s: truth mask has no prediction", p)
    for k in pairing.duplicates:
        log.warning("%s: more than one file with this stem in one folder (first used)", k)
    return pairing


def _warn_missing_labels(keys: Sequence[str], folders) -> None:
    """``folders``: ``(role, stem index, folder or None)``; name the first uncovered stem."""
    for role, idx, folder in folders:
        if folder is not None:
            missing = [k for k in keys if k not in idx]
            if missing:
                log.warning("%d %s image(s) have no label file in %s; their instances come "
                            "from the mask (e.g. %s)", len(missing), role, folder, missing[0])


def _single_bead_area(args: argparse.Namespace, truth_paths: Sequence[Path], need_area: bool,
                      progress: bool) -> dict:
    """The single-bead area that splits touching beads: ``median_area``, ``by_size``
    (per truth image size, when sizes differ), ``shapes`` (truth file -> size), ``source``."""
    by_size: dict[tuple[int, int], float] = {}
    shapes: dict[Path, tuple[int, int]] = {}
    if args.median_area is not None:
        median_area, source = float(args.median_area), "--median_area"
    elif need_area:
        median_area, by_size, shapes = estimate_areas(truth_paths, progress)
        source = f"estimated from {len(shapes)} truth masks"
        if len(by_size) > 1:
            source += ", per image size"
            log.warning("truth masks come in %d sizes; each size gets its own single-bead "
                        "area: %s", len(by_size), _sizes_text(by_size))
    else:
        median_area, source = float("nan"), "not needed (label images for all)"
    if need_area:
        log.info("single-bead area %s (%s), used for truth and prediction instances",
                 _sizes_text(by_size) if len(by_size) > 1 else f"{median_area:.1f} px",
                 source)
    return {"median_area": median_area, "by_size": by_size, "shapes": shapes,
            "source": source}


def _evaluate_pairs(args: argparse.Namespace, pairing: mio.Pairing, keys: Sequence[str],
                    label_index: tuple[dict, dict], area: dict, thresholds: list[float],
                    bins, progress: bool):
    """Evaluate every pair; returns ``rows, results, failures, paths`` (file -> (pred, truth)).
    A pair that cannot be evaluated is logged by name and listed in ``failures``."""
    from tqdm import tqdm

    pred_lab_idx, gt_lab_idx = label_index
    rows, results, failures, paths = [], [], [], {}
    for (pp, tp), key in tqdm(list(zip(pairing.pairs, keys)), desc="evaluating", unit="img",
                              disable=not progress):
        try:
            row, res = evaluate_pair(
                pp, tp, pred_labels_path=pred_lab_idx.get(key),
                true_labels_path=gt_lab_idx.get(key),
                median_area=area["by_size"].get(area["shapes"].get(tp), area["median_area"]),
                thresholds=thresholds, iou_threshold=args.iou_threshold, resize=args.resize,
                bins=bins)
        except (EvaluationError, mio.ImageReadError, mio.SizeMismatchError) as exc:
            failures.append(str(exc))
            log.error("%s", exc)
            continue
        if row["resized"]:
            log.warning("%s: resized to the truth size %dx%d", pp, row["width"], row["height"])
        rows.append(row)
        results.append(res)
        paths[row["file"]] = (pp, tp)
    return rows, results, failures, paths


def _add_truth_label_quality(summary: dict, rows: list[dict], paths: dict, gt_images: Path,
                             progress: bool) -> None:
    """Truth-mask offsets (``mask_offset`` column) and the label-consistency ceiling, added to
    ``rows`` and ``summary`` in place."""
    log.info("truth images: %s (truth-mask offsets, label-consistency ceiling)", gt_images)
    offsets, ceiling = truth_label_quality([paths[r["file"]][1] for r in rows],
                                           index_by_stem(gt_images), progress)
    for r in rows:
        r["mask_offset"] = offsets[paths[r["file"]][1]]
    if ceiling:
        ceiling.pop("pairs")
    summary["label_consistency_ceiling"] = ceiling["pooled_jaccard"] if ceiling else None
    summary["label_quality"] = {
        "gt_images_dir": str(gt_images),
        "n_assessed": sum(r["mask_offset"] != "" for r in rows),
        "ceiling": ceiling,
    }
    summary["truth_offsets"] = [
        {k: r[k] for k in ("file", "mask_offset", "jaccard", "obj_f1")}
        for r in rows if r["mask_offset"] not in ("", "none")]
    for o in summary["truth_offsets"]:
        if o["mask_offset"] != "mismatch":
            log.warning("%s: truth mask offset from its image's beads (%s); IoU %.3f",
                        o["file"], o["mask_offset"], o["jaccard"])
    if ceiling:
        log.info("label-consistency ceiling: pooled Jaccard %.3f over %d truth tile pairs "
                 "sharing pixels", ceiling["pooled_jaccard"], ceiling["n_pairs"])


def _write_results(args: argparse.Namespace, out: Path, rows: list[dict], summary: dict,
                   worst: list[dict], paths: dict) -> None:
    """Per-image CSV, figures (unless ``--no_figures``), summary.json and the report."""
    write_csv(out / CSV_NAME, rows)
    figures: list[str] = []
    if rows and not args.no_figures:
        def load(r):
            pred, truth, _ = load_pair_masks(*paths[r["file"]], resize=args.resize)
            return pred, truth

        figures = plot_figures(out, rows, summary, worst, load, dpi=args.dpi)
    mio.atomic_write_json(out / SUMMARY_NAME, summary)
    mio.atomic_write_text(out / REPORT_NAME, er.build_report(summary, figures))


def _run(args: argparse.Namespace, out: Path, inputs: dict) -> int:
    pred_masks, pred_labels = inputs["pred_masks"], inputs["pred_labels"]
    gt_masks, gt_labels, gt_images = inputs["gt_masks"], inputs["gt_labels"], inputs["gt_images"]
    log.info("%s", inputs["pred_note"])
    log.info("%s", inputs["gt_note"])
    if args.no_labels:
        log.info("--no_labels: all instances from masks")

    pairing = _pair_predictions(pred_masks, gt_masks)
    if not pairing.pairs:
        log.error("no prediction/truth pairs between %s and %s", pred_masks, gt_masks)
        return 1
    pred_lab_idx, gt_lab_idx = index_by_stem(pred_labels), index_by_stem(gt_labels)
    keys = [mio.stem_key(pp) for pp, _ in pairing.pairs]
    _warn_missing_labels(keys, (("prediction", pred_lab_idx, pred_labels),
                                ("truth", gt_lab_idx, gt_labels)))
    need_area = any(k not in pred_lab_idx or k not in gt_lab_idx for k in keys)
    progress = not args.no_progress
    area = _single_bead_area(args, [t for _, t in pairing.pairs], need_area, progress)

    thresholds = sorted(set(mm.IOU_THRESHOLDS) | {float(args.iou_threshold)})
    bins = sorted(args.density_bins)
    rows, results, failures, paths = _evaluate_pairs(
        args, pairing, keys, (pred_lab_idx, gt_lab_idx), area, thresholds, bins, progress)

    summary: dict = {
        "settings": {
            "pred_masks_dir": str(pred_masks), "pred_labels_dir": str(pred_labels or ""),
            "gt_masks_dir": str(gt_masks), "gt_labels_dir": str(gt_labels or ""),
            "iou_threshold": float(args.iou_threshold), "thresholds": thresholds,
            "median_area": area["median_area"], "median_area_source": area["source"],
            "median_area_by_size": {f"{w}x{h}": a for (h, w), a in area["by_size"].items()},
            "density_bin_edges": sorted(args.density_bins), "resize": args.resize,
        },
        "n_pairs": len(pairing.pairs),
        "unpaired_predictions": [p.name for p in pairing.unpaired_images],
        "unpaired_truth": [p.name for p in pairing.unpaired_masks],
        "duplicates": list(pairing.duplicates),
        "failures": failures,
    }
    summary.update(er.summarize(rows, results, iou_threshold=float(args.iou_threshold), bins=bins))
    summary["label_consistency_ceiling"] = None
    if gt_images is not None and rows:
        _add_truth_label_quality(summary, rows, paths, gt_images, progress)
    worst = er.worst_rows(rows, max(args.worst, 0))
    summary["worst"] = [{k: r[k] for k in ("file", "jaccard", "dice", "true_count",
                                           "pred_count", "obj_f1")} for r in worst]
    _write_results(args, out, rows, summary, worst, paths)

    if rows:
        for line in er.headline_lines(summary, float(args.iou_threshold)):
            log.info("%s", line)
    log.info("wrote %s (report: %s; per image: per_image_metrics.csv, which "
             "quantify_assay.py --truth takes as it is)", out, REPORT_NAME)
    n_unpaired = len(pairing.unpaired_images) + len(pairing.unpaired_masks)
    if failures:
        log.error("%d pair(s) failed:\n  %s", len(failures), "\n  ".join(failures))
    if n_unpaired:
        log.warning("%d file(s) unpaired (listed in %s)", n_unpaired, REPORT_NAME)
    if failures or not rows or (args.strict and n_unpaired):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

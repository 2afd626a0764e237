"""What an evaluation says over all its images: the numbers of ``summary.json`` and the text.

Pure functions of the per-image rows and object-matching results that
``evaluate_predictions.py`` computes: pooled pixel and object scores, count agreement, groups
by true bead count and by dilution (:func:`summarize`), the worst images, the markdown
report (:func:`build_report`) and the terminal headline. Metric definitions are in
:mod:`microbead_metrics`. Numbers in the report are :func:`reporting.fmt` with fixed
decimals (3 unless stated).

Example
-------
>>> count_stats([{"true_count": 2, "pred_count": 3}, {"true_count": 4, "pred_count": 4}])["mae"]
0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import label_quality as lq
import microbead_metrics as mm
import reporting

PIXEL_KEYS = ("jaccard", "dice", "precision", "recall", "accuracy")


def _nanmean(values) -> float:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def pooled_pixel(rows: list[dict]) -> dict[str, float]:
    """Pixel metrics from TP/FP/FN/TN summed over ``rows``."""
    return mm.metrics_from_counts(
        sum(r["tp_px"] for r in rows), sum(r["fp_px"] for r in rows),
        sum(r["fn_px"] for r in rows), sum(r["tn_px"] for r in rows),
    )


def pooled_objects(results: list[dict[float, dict]], threshold: float) -> dict:
    """Object counts summed over images at one threshold, and the scores from those sums."""
    tp = sum(r[threshold]["tp"] for r in results)
    fp = sum(r[threshold]["fp"] for r in results)
    fn = sum(r[threshold]["fn"] for r in results)
    s = sum(r[threshold]["sum_matched_iou"] for r in results)
    out: dict = {"iou_threshold": threshold, "tp": tp, "fp": fp, "fn": fn}
    out.update(mm.object_scores(tp, fp, fn, s))
    out["mean_image_f1"] = _nanmean(r[threshold]["f1"] for r in results)
    return out


def count_stats(rows: list[dict]) -> dict:
    """Count agreement over images: totals, MAE, mean relative error, bias, R^2 about y = x."""
    t = np.array([r["true_count"] for r in rows], dtype=np.float64)
    p = np.array([r["pred_count"] for r in rows], dtype=np.float64)
    if t.size == 0:
        return {"n_images": 0}
    pearson = float("nan")
    if t.size >= 2 and t.std() > 0 and p.std() > 0:
        pearson = float(np.corrcoef(t, p)[0, 1])
    return {
        "n_images": int(t.size),
        "true_total": int(t.sum()),
        "pred_total": int(p.sum()),
        "mae": float(np.abs(p - t).mean()),
        "mean_rel_error": float((np.abs(p - t) / np.maximum(t, 1)).mean()),
        "median_rel_error": float(np.median(np.abs(p - t) / np.maximum(t, 1))),
        "mean_signed_error": float((p - t).mean()),
        "total_rel_error": float(abs(p.sum() - t.sum()) / max(t.sum(), 1)),
        "r2_identity": mm.r2_identity(t, p),
        "pearson_r": pearson,
    }


def group_summary(rows: list[dict], results: list[dict[float, dict]], key: str,
                  order: Sequence | None = None, threshold: float = 0.5) -> list[dict]:
    """Per-group metrics (groups = distinct values of ``row[key]``; empty values skipped)."""
    groups: dict = {}
    for r, res in zip(rows, results):
        g = r[key]
        if g == "" or g is None:
            continue
        groups.setdefault(g, ([], []))
        groups[g][0].append(r)
        groups[g][1].append(res)
    names = [g for g in order if g in groups] if order is not None else sorted(groups)
    out = []
    for g in names:
        rs, res = groups[g]
        obj = pooled_objects(res, threshold)
        cs = count_stats(rs)
        out.append({
            key: g,
            "n_images": len(rs),
            "true_beads": cs["true_total"],
            "pred_beads": cs["pred_total"],
            "mean_jaccard": _nanmean(r["jaccard"] for r in rs),
            "min_jaccard": float(min(r["jaccard"] for r in rs)),
            "pooled_jaccard": pooled_pixel(rs)["jaccard"],
            "mean_dice": _nanmean(r["dice"] for r in rs),
            "obj_tp": obj["tp"], "obj_fp": obj["fp"], "obj_fn": obj["fn"],
            "obj_precision": obj["precision"], "obj_recall": obj["recall"],
            "obj_f1": obj["f1"], "mean_image_f1": obj["mean_image_f1"],
            "count_mae": cs["mae"], "count_mean_rel_error": cs["mean_rel_error"],
            "count_bias": cs["mean_signed_error"],
        })
    return out


def summarize(rows: list[dict], results: list[dict[float, dict]], *, iou_threshold: float,
              bins: Sequence[float]) -> dict:
    """Everything ``summary.json`` holds except settings and file lists."""
    thresholds = sorted(results[0]) if results else []
    return {
        "n_evaluated": len(rows),
        "pixel": {
            "mean_per_image": {k: _nanmean(r[k] for r in rows) for k in PIXEL_KEYS},
            "median_per_image": {k: float(np.median([r[k] for r in rows])) for k in PIXEL_KEYS}
            if rows else {},
            "pooled": pooled_pixel(rows),
        },
        "objects": pooled_objects(results, iou_threshold) if results else {},
        "objects_by_threshold": [pooled_objects(results, t) for t in thresholds],
        "counts": count_stats(rows),
        "by_density": group_summary(rows, results, "density_bin", mm.density_bin_names(bins),
                                    threshold=iou_threshold),
        "by_dilution": group_summary(rows, results, "dilution", threshold=iou_threshold),
    }


def worst_rows(rows: list[dict], k: int) -> list[dict]:
    """``k`` rows with the lowest Jaccard (ties: larger absolute count error first)."""
    return sorted(rows, key=lambda r: (r["jaccard"], -r["abs_count_error"], r["file"]))[:k]



# --------------------------------------------------------------------------- text


def _fmt(v, digits: int = 3) -> str:
    """:func:`reporting.fmt` with ``digits`` fixed decimals (the evaluation's precision)."""
    return reporting.fmt(v, digits, style="fixed")


def _table(rows: list[dict], cols: Sequence[tuple[str, str]]) -> list[str]:
    return [reporting.md_dict_table(rows, cols, formatter=_fmt)]


def headline_lines(summary: dict, iou_threshold: float) -> list[str]:
    """The evaluation's result in three terminal lines: pixels, objects, counts."""
    px, obj, cnt = summary["pixel"], summary["objects"], summary["counts"]
    ceiling = summary.get("label_consistency_ceiling")
    c = ceiling.get("pooled_jaccard") if isinstance(ceiling, dict) else None
    total = (100.0 * (cnt["pred_total"] - cnt["true_total"]) / cnt["true_total"]
             if cnt["true_total"] else float("nan"))
    return [
        f"{cnt['n_images']} image(s): mean IoU {px['mean_per_image']['jaccard']:.3f}, pooled "
        f"IoU {px['pooled']['jaccard']:.3f}"
        + (f" (the truth masks agree with themselves at {c:.3f})" if c is not None else ""),
        f"beads matched at IoU >= {iou_threshold:.2f}: F1 {obj['f1']:.3f} (precision "
        f"{obj['precision']:.3f}, recall {obj['recall']:.3f})",
        f"bead counts: {cnt['pred_total']} predicted vs {cnt['true_total']} true "
        f"({total:+.1f} % in total; per image median |error| "
        f"{100 * cnt['median_rel_error']:.1f} %, MAE {cnt['mae']:.1f} beads)",
    ]



def build_report(summary: dict, figures: Sequence[str]) -> str:
    """Markdown report; every number is formatted from ``summary``."""
    s = summary
    st = s["settings"]
    px, obj, cnt = s["pixel"], s["objects"], s["counts"]
    L = ["# Evaluation report", ""]
    L += [f"- predictions: `{st['pred_masks_dir']}`"
          + (f" (instance labels `{st['pred_labels_dir']}`)" if st["pred_labels_dir"] else ""),
          f"- truth: `{st['gt_masks_dir']}`"
          + (f" (instance labels `{st['gt_labels_dir']}`)" if st["gt_labels_dir"] else ""),
          f"- pairs evaluated: {s['n_evaluated']} of {s['n_pairs']}; "
          f"unpaired predictions: {len(s['unpaired_predictions'])}; "
          f"unpaired truth masks: {len(s['unpaired_truth'])}; failed: {len(s['failures'])}",
          f"- IoU threshold for object matching: {st['iou_threshold']}",
          "- single-bead area for instances from masks: "
          + (", ".join(f"{_fmt(a, 1)} px ({k})" for k, a in st["median_area_by_size"].items())
             if len(st["median_area_by_size"]) > 1 else f"{_fmt(st['median_area'], 1)} px")
          + f" ({st['median_area_source']})",
          f"- prediction resizing: {st['resize']}", ""]
    L += ["## Headline", "",
          "| metric | mean per image | pooled over all pixels/objects |", "|---|---|---|"]
    ceiling = s.get("label_consistency_ceiling")
    for k in PIXEL_KEYS:
        L.append(f"| pixel {k} | {_fmt(px['mean_per_image'].get(k))} | "
                 f"{_fmt(px['pooled'].get(k))} |")
        if k == "jaccard" and ceiling is not None:
            L.append(f"| label-consistency ceiling (truth vs truth on shared pixels, "
                     f"{s['label_quality']['ceiling']['n_pairs']} tile pairs) | | "
                     f"{_fmt(ceiling)} |")
    if obj:
        L.append(f"| object F1 @ IoU {st['iou_threshold']} | {_fmt(obj['mean_image_f1'])} | "
                 f"{_fmt(obj['f1'])} |")
        L += ["", f"Objects at IoU >= {st['iou_threshold']}: TP {obj['tp']}, FP {obj['fp']}, "
              f"FN {obj['fn']}; precision {_fmt(obj['precision'])}, recall "
              f"{_fmt(obj['recall'])}, mean matched IoU {_fmt(obj['mean_matched_iou'])}, "
              f"panoptic quality {_fmt(obj['panoptic_quality'])}."]
    if cnt.get("n_images"):
        L += ["", f"Bead counts: truth {cnt['true_total']}, predicted {cnt['pred_total']} "
              f"(total error {_fmt(100 * cnt['total_rel_error'], 1)} %); per image MAE "
              f"{_fmt(cnt['mae'], 2)}, mean relative error "
              f"{_fmt(100 * cnt['mean_rel_error'], 1)} %, bias (pred - true) "
              f"{_fmt(cnt['mean_signed_error'], 2)}, R^2 about y = x {_fmt(cnt['r2_identity'])}, "
              f"Pearson r {_fmt(cnt['pearson_r'])}."]
    group_cols = [("n_images", "images"), ("true_beads", "true beads"),
                  ("pred_beads", "pred beads"), ("mean_jaccard", "mean IoU"),
                  ("min_jaccard", "min IoU"), ("pooled_jaccard", "pooled IoU"),
                  ("obj_precision", "obj precision"), ("obj_recall", "obj recall"),
                  ("obj_f1", "obj F1"), ("count_mae", "count MAE"),
                  ("count_mean_rel_error", "mean rel. count error"), ("count_bias", "bias")]
    L += ["", "## By true bead count", "",
          "Images binned by their true bead count, so failures on dense or nearly empty images "
          "are not averaged away.", ""]
    L += _table(s["by_density"], [("density_bin", "true beads per image")] + group_cols)
    if s["by_dilution"]:
        L += ["", "## By dilution", ""]
        L += _table(s["by_dilution"], [("dilution", "dilution")] + group_cols)
    L += ["", "## Object F1 vs IoU threshold (pooled)", ""]
    L += _table(s["objects_by_threshold"],
                [("iou_threshold", "IoU threshold"), ("tp", "TP"), ("fp", "FP"), ("fn", "FN"),
                 ("precision", "precision"), ("recall", "recall"), ("f1", "F1"),
                 ("mean_image_f1", "mean image F1"), ("panoptic_quality", "PQ")])
    lqs = s.get("label_quality")
    if lqs:
        L += ["", "## Truth-label quality", ""]
        c = lqs["ceiling"]
        if c:
            L += [f"Label-consistency ceiling: where two neighbouring truth tiles share pixels "
                  f"({c['n_pairs']} pairs, {c['overlap_px']} px of overlap width in all), their "
                  f"truth masks agree at pooled Jaccard **{_fmt(c['pooled_jaccard'])}** (median "
                  f"per pair {_fmt(c['median_pair_jaccard'])}). The labels disagree with "
                  "themselves that much on identical pixels, so a pixel Jaccard near it "
                  f"(pooled here {_fmt(px['pooled'].get('jaccard'))}) is as good as these labels "
                  "can show.", ""]
        else:
            L += ["Label-consistency ceiling: not measurable (no two truth tiles with grid "
                  "names share pixels).", ""]
        off = s["truth_offsets"]
        L += [f"Truth masks offset from their images' beads (>= {lq.MIN_OFFSET_PX} px, gain >= "
              f"{lq.MIN_OFFSET_GAIN:.0%}) or marking almost none of them (`mismatch`); column "
              f"`mask_offset`: {len(off)} of {lqs['n_assessed']} assessed."]
        if off:
            L += [""] + _table(off, [("file", "file"), ("mask_offset", "truth offset"),
                                     ("jaccard", "IoU"), ("obj_f1", "obj F1")])
    L += ["", "## Worst images (lowest IoU)", ""]
    L += _table(s["worst"], [("file", "file"), ("jaccard", "IoU"), ("dice", "Dice"),
                             ("true_count", "true beads"), ("pred_count", "pred beads"),
                             ("obj_f1", "obj F1")])
    if figures:
        L += ["", "## Figures", ""]
        L += [f"![{f}]({f})" for f in figures]
    problems = ([f"{p}: prediction has no truth mask" for p in s["unpaired_predictions"]]
                + [f"{p}: truth mask has no prediction" for p in s["unpaired_truth"]]
                + [f"{k}: more than one file with this stem" for k in s["duplicates"]]
                + list(s["failures"]))
    if problems:
        L += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    L += ["", "## Definitions", "",
          "- Pixel metrics use masks binarized at half their maximum. Truth and prediction "
          "both empty: every score 1; exactly one empty: IoU, Dice, precision, recall 0. "
          "Precision with no predicted pixels is 1 if the truth is empty, else 0; recall "
          "with no true pixels is 1 if the prediction is empty, else 0. Pooled values come "
          "from TP/FP/FN/TN summed over all images.",
          "- Objects: instances from label images when available, else from masks by "
          "`label_beads` (connected components, touching beads split by watershed). "
          "One-to-one Hungarian matching; a pair is a match when IoU >= threshold. No true and "
          "no predicted objects: precision = recall = F1 = PQ = 1. Panoptic quality = sum of "
          "matched IoU / (TP + FP/2 + FN/2). Mean matched IoU is n/a without matches.",
          "- Count error = predicted - true; relative error = |error| / max(true, 1); "
          "R^2 about y = x = 1 - sum((pred - true)^2) / sum((true - mean true)^2).", ""]
    return "\n".join(L)

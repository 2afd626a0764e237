"""The figures of ``analyze_microbead_dataset.py``: samples, distributions, label quality.

``sample_images.png`` (mask outlines and unlabelled bead-like blobs on tiles spread over the
density range), ``distribution_analysis.png`` (six histograms and scatters of the per-image
statistics) and ``label_quality.png`` (offsets, bead evidence, overlap agreement, the largest
offset on its image). Each function draws a ``dataset_stats.Analysis`` into one PNG with the
Agg backend; matplotlib is imported only when a figure is drawn.

Example
-------
>>> names = plot_samples(analysis, out / "sample_images.png")   # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

import label_quality as lq
import microbead_io as mio
from dataset_integrity import ImageRecord
from dataset_stats import Analysis, analysis_image, equivalent_diameter, objects_histogram
from label_audit import offset_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_samples(records: list[ImageRecord], k: int = 8) -> list[ImageRecord]:
    """Up to ``k`` records evenly spread over the density range (sorted by beads, then
    positive ratio), always including the sparsest and the densest."""
    if not records:
        return []
    order = sorted(records, key=lambda r: (r.stats["n_beads"], r.stats["positive_ratio"],
                                           r.name))
    idx = np.unique(np.rint(np.linspace(0, len(order) - 1, min(k, len(order)))).astype(int))
    return [order[i] for i in idx]


def plot_samples(analysis: Analysis, path: Path, k: int = 8) -> list[str]:
    """Overlay figure: mask outline (red) and unlabelled bead-like candidates (yellow)."""
    plt = _pyplot()
    chosen = pick_samples(analysis.records, k)
    if not chosen:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no analysable image", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return []
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.1 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), chosen):
        img = np.clip(analysis_image(rec.image_path, analysis.image_size,
                                      analysis.normalization), 0.0, 1.0)
        m = rec.mask.astype(bool)
        edge = m & ~ndi.binary_erosion(m, structure=np.ones((3, 3), bool))
        rgb = np.repeat(img[..., None], 3, axis=-1)
        rgb[edge] = (1.0, 0.1, 0.1)
        ax.imshow(rgb, interpolation="nearest")
        c = rec.candidates
        if c and "unlabelled" in c and c["unlabelled"].any():
            r = math.sqrt(analysis.summary["median_bead_area_px"] / math.pi)
            for y, x in zip(c["y"][c["unlabelled"]], c["x"][c["unlabelled"]]):
                ax.add_patch(plt.Circle((x, y), r * 1.2, fill=False, color="yellow", lw=1.2))
        name = rec.name if len(rec.name) <= 34 else rec.name[:15] + "..." + rec.name[-16:]
        flag = " [partial?]" if rec.stats.get("partial_mask_suspect") else ""
        ax.set_title(f"{name}\nobjects {rec.stats['n_objects']}, beads {rec.stats['n_beads']}, "
                     f"fg {rec.stats['positive_ratio']:.1%}{flag}", fontsize=8)
    fig.suptitle("Samples across the density range (red: mask outline, yellow: bead-like "
                 "blobs not in the mask)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (4.1 * rows + 0.4)), h_pad=1.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [r.name for r in chosen]


def plot_distributions(analysis: Analysis, path: Path) -> None:
    """Six panels: positive ratio, objects/beads per image (every image), object size,
    brightness vs contrast, beads vs objects, focus."""
    plt = _pyplot()
    recs = analysis.records
    s = analysis.summary
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (a1, a2, a3), (a4, a5, a6) = axes
    pos = [r.stats["positive_ratio"] for r in recs]
    objs = [r.stats["n_objects"] for r in recs]
    beads = [r.stats["n_beads"] for r in recs]
    a1.hist(pos, bins=min(20, max(1, len(pos))), color="tab:blue", edgecolor="white")
    a1.set(title="Positive pixel ratio", xlabel="foreground fraction", ylabel="images")
    edges = np.asarray(s["objects_per_image_histogram"]["edges"])
    if edges.size:
        a2.hist(objs, bins=edges, color="tab:green", alpha=0.7, label="8-connected objects")
        b_edges = objects_histogram(beads)[0]
        a2.hist(beads, bins=b_edges, histtype="step", color="black", lw=1.5,
                label="beads (touching split)")
        a2.legend(fontsize=8)
    a2.set(title=f"Objects per image (all {len(objs)} images)", xlabel="count",
           ylabel="images")
    areas = np.concatenate([r.stats["areas"] for r in recs]) if recs else np.zeros(0)
    if areas.size:
        a3.hist(equivalent_diameter(areas), bins=40, color="tab:orange", edgecolor="white")
        if math.isfinite(s["median_bead_diameter_px"]):
            a3.axvline(s["median_bead_diameter_px"], color="k", ls="--",
                       label=f"single bead {s['median_bead_diameter_px']:.1f} px")
            a3.legend(fontsize=8)
    a3.set(title="Object size", xlabel=f"equivalent diameter (px at {analysis.image_size})",
           ylabel="objects")
    sc = a4.scatter([r.brightness for r in recs], [r.contrast for r in recs], c=beads,
                    cmap="viridis", s=18)
    if recs:
        fig.colorbar(sc, ax=a4, label="beads")
    a4.set(title="Brightness vs contrast (stored range)", xlabel="mean / full scale",
           ylabel="std / full scale")
    a5.scatter(objs, beads, s=14, color="tab:purple")
    top = max(objs + beads + [1])
    a5.plot([0, top], [0, top], "k:", lw=1)
    a5.set(title="Touching beads split vs components", xlabel="objects (components)",
           ylabel="beads")
    a6.hist([r.stats["focus"] for r in recs], bins=min(20, max(1, len(recs))), color="tab:gray",
            edgecolor="white")
    a6.set(title="Focus (variance of Laplacian)", xlabel="focus", ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_quality(analysis: Analysis, path: Path) -> None:
    """Offsets, bead evidence per mask, overlap agreement, and the largest offset on its
    image (mask as stored red, shifted back green)."""
    plt = _pyplot()
    lab = analysis.labels or {"rows": {}, "pairs": [], "summary": {}}
    rows = [r for r in lab["rows"].values() if r.get("assessed")]
    s = lab["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    a1, a2, a3, a4 = axes.ravel()
    if rows:
        dx = np.array([r["offset_dx"] for r in rows], float)
        dy = np.array([r["offset_dy"] for r in rows], float)
        flag = np.array([bool(r["mask_offset"]) for r in rows])
        bad = np.array([bool(r["mismatch"]) for r in rows])
        jit = np.random.default_rng(0).uniform(-0.15, 0.15, (2, len(rows)))
        a1.scatter((dx + jit[0])[~bad], (dy + jit[1])[~bad], s=14,
                   c=np.where(flag, "tab:red", "tab:blue")[~bad])
        a1.scatter([], [], s=14, color="tab:blue", label="mask on its beads")
        a1.scatter([], [], s=14, color="tab:red", label="offset mask (numbered)")
        if bad.any():
            a1.scatter(dx[bad], dy[bad], marker="x", color="grey", label="mismatched mask")
        a1.legend(fontsize=8, loc="lower left")
        # Numbered points, names in a list beside: names keep their dilution and never
        # overlap, however many masks share an offset.
        listed = [r for r in rows if r["mask_offset"]]
        for k, r in enumerate(listed, start=1):
            a1.annotate(str(k), (r["offset_dx"], r["offset_dy"]), xytext=(4, 4 + 7 * (k % 2)),
                        textcoords="offset points", fontsize=9, color="tab:red")
        if listed:
            a1.text(1.02, 1.0, "offset masks\n" + "\n".join(
                f"{k}  {short_tile_name(r['file'])}  "
                f"{offset_text(r['offset_dy'], r['offset_dx'])}"
                for k, r in enumerate(listed, start=1)), transform=a1.transAxes, va="top",
                fontsize=9, family="monospace")
        m = lq.MIN_OFFSET_PX - 0.5
        a1.add_patch(plt.Rectangle((-m, -m), 2 * m, 2 * m, fill=False, ls=":", color="grey"))
        lim = s.get("max_shift_px", lq.MAX_SHIFT) + 0.5
        a1.set(xlim=(-lim, lim), ylim=(lim, -lim))
        ev = sorted((r["evidence"], r["file"], r["mismatch"]) for r in rows)
        a2.bar(range(len(ev)), [e[0] for e in ev],
               color=["tab:red" if e[2] else "tab:green" for e in ev])
        a2.bar([0], [0], color="tab:green", label="mask")
        if any(e[2] for e in ev):
            a2.bar([0], [0], color="tab:red", label="mismatched mask")
        if s.get("evidence_median") is not None and math.isfinite(s["evidence_median"]):
            a2.axhline(s["evidence_median"], color="k", ls="--", lw=1, label="median")
        if s.get("mismatch_threshold") is not None and math.isfinite(s["mismatch_threshold"]):
            a2.axhline(s["mismatch_threshold"], color="tab:red", ls=":", lw=1,
                       label="mismatch threshold")
        a2.legend(fontsize=7)
    a1.set(title="Mask offset from its beads (native px)", xlabel="dx", ylabel="dy")
    a2.set(title="Bead evidence per mask (sorted)", xlabel="masks", ylabel="evidence")
    js = [p["jaccard"] for p in lab["pairs"] if math.isfinite(p["jaccard"])]
    if js:
        a3.hist(js, bins=np.linspace(0, 1, 21), color="tab:purple", edgecolor="white")
        c = s["label_consistency_ceiling"]
        a3.axvline(c, color="k", ls="--", label=f"pooled {c:.2f} (ceiling)")
        a3.legend(fontsize=7)
    else:
        a3.text(0.5, 0.5, "no tiles share pixels", ha="center", va="center",
                transform=a3.transAxes)
    a3.set(title="Mask agreement on shared strips", xlabel="Jaccard per neighbour pair",
           ylabel="pairs")
    a4.axis("off")
    offs = [r for r in rows if r["mask_offset"]]
    if offs:
        r = max(offs, key=lambda r: r["offset_gain"])
        rec = next(x for x in analysis.records if x.name == r["file"])
        img = mio.normalize_image(mio.read_image(rec.image_path, 1)[..., 0])
        m = mio.read_mask(rec.mask_path, warn=False).astype(bool)
        f = lq.shift_mask(m, -r["offset_dy"], -r["offset_dx"])
        cy, cx = (int(v) for v in np.argwhere(m).mean(axis=0))
        h = min(64, img.shape[0] // 2, img.shape[1] // 2)
        y0 = int(np.clip(cy - h, 0, img.shape[0] - 2 * h))
        x0 = int(np.clip(cx - h, 0, img.shape[1] - 2 * h))
        win = (slice(y0, y0 + 2 * h), slice(x0, x0 + 2 * h))
        rgb = np.repeat(img[win][..., None], 3, axis=-1)
        for mm_, colour in ((m[win], (1.0, 0.1, 0.1)), (f[win], (0.1, 0.9, 0.1))):
            edge = mm_ & ~ndi.binary_erosion(mm_, structure=np.ones((3, 3), bool))
            rgb[edge] = colour
        a4.imshow(rgb, interpolation="nearest")
        a4.set_title(f"{short_tile_name(r['file'])}: offset "
                     f"{offset_text(r['offset_dy'], r['offset_dx'])}\nmask as stored red, "
                     "shifted back green", fontsize=10)
    else:
        a4.text(0.5, 0.5, "no offset mask", ha="center", va="center", transform=a4.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_tile_name(name: str) -> str:
    """``"640x r1 c1"`` for ``640x_2025-05-16_00-59-00_002_grid_r1_c1.png``: the dilution
    and grid position a figure label needs; other names: the stem, cut to 28 characters."""
    stem = Path(name).stem
    m = re.match(r"^(?:(\d+(?:\.\d+)?x)_)?.*?_grid_r(\d+)_c(\d+)$", stem)
    if m:
        return " ".join(x for x in (m.group(1), f"r{m.group(2)}", f"c{m.group(3)}") if x)
    return stem if len(stem) <= 28 else stem[:13] + "..." + stem[-12:]

"""The label audit of a microbead dataset: every mask against its own image (``label_quality``).

Per pair, at native resolution: registration (offset and the gain of undoing it), bead
evidence, missed and merged beads. Over the dataset: mismatched masks (evidence far below
the median at any shift) with the image each matches best
(``label_quality.best_matching_images``), and the agreement of neighbouring grid tiles' masks
on the pixels they share (the label-consistency ceiling). :func:`label_checks` is the pass
``dataset_stats.analyze_dataset`` runs; :func:`label_rows` gives ``label_quality.csv``;
:func:`write_fixed_copy` writes the corrected copy of ``--write_fixed``.

Example
-------
>>> labels = label_checks(records, data_dir, problems, skip=set(), image_size=512,
...                       median_area=50.0)                           # doctest: +SKIP
>>> labels["summary"]["label_consistency_ceiling"]                    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

import label_quality as lq
import microbead_io as mio
from dataset_integrity import (
    MASK_MISMATCH,
    MASK_OFFSET,
    MERGED_BEADS,
    MISSED_BEADS,
    NEARLY_FULL_RATIO,
    ImageRecord,
    Problem,
    rel_path,
)

log = logging.getLogger("microbead.analyze")

LABEL_COLUMNS = (
    "file", "mask_file", "assessed", "note", "mask_px", "offset_dy", "offset_dx",
    "dark_score_unshifted", "dark_score", "offset_gain", "mask_offset",
    "offset_at_search_limit", "evidence", "mismatch", "best_match", "best_match_evidence",
    "n_image_beads", "n_missed", "missed_beads", "n_mask_objects", "n_merged_objects",
    "n_beads_in_merged", "n_beads_lost", "merged_beads", "n_overlap_pairs",
    "mean_overlap_jaccard",
)

OVERLAP_COLUMNS = (
    "first", "second", "side", "width", "image_correlation", "image_max_abs_diff",
    "images_identical", "intersection", "union", "jaccard",
)


# --------------------------------------------------------------------------- checks


def offset_text(dy: int, dx: int) -> str:
    """``"dy=+2, dx=-3"``: an offset as the problem details and figures write it."""
    return f"dy={dy:+d}, dx={dx:+d}"


def label_checks(records: list[ImageRecord], root: Path, problems: list[Problem], *,
                 skip: set[str], image_size: int, median_area: float,
                 progress: bool = False) -> dict:
    """Masks against their own images, at native resolution (``label_quality``).

    Per pair: registration (offset and gain), bead evidence, missed and merged beads. Over the
    dataset: mismatched masks (evidence far below the median at any shift) with the image
    each matches best, and the masks' agreement on pixels neighbouring grid tiles share (the
    label-consistency ceiling). Appends one :class:`Problem` per finding to ``problems``.

    Parameters
    ----------
    skip : set of str
        Record names not assessed (inverted images): their darkness map means nothing.
    image_size, median_area
        Analysis size and the single-bead area there; scaled to each tile's native size for
        the darkness map's background window.

    Returns
    -------
    dict
        ``rows`` (name -> per-file numbers), ``pairs`` (overlap rows), ``summary``
        (``summary.json["label_quality"]``), ``ceiling`` (pooled dict or None).
    """
    from tqdm import tqdm

    rows: dict[str, dict] = {}
    regs: dict[str, lq.Registration] = {}
    diameters: dict[str, float | None] = {}
    assessed: list[ImageRecord] = []
    for rec in tqdm(records, desc="labels", unit="img", disable=not progress):
        row = {"file": rec.name, "mask_file": rec.mask_path.name, "assessed": False,
               "note": ""}
        rows[rec.name] = row
        if rec.name in skip:
            row["note"] = "inverted image"
            continue
        try:
            img = mio.read_image(rec.image_path, 1)[..., 0]
            mask = mio.read_mask(rec.mask_path, warn=False)
        except mio.ImageReadError as exc:  # changed since the integrity pass
            row["note"] = str(exc)
            continue
        ratio = float(np.count_nonzero(mask)) / mask.size
        if ratio == 0 or ratio > NEARLY_FULL_RATIO or rec.contrast == 0:
            row["note"] = "empty mask" if ratio == 0 else (
                "nearly full mask" if ratio > NEARLY_FULL_RATIO else "blank image")
            continue
        scale = rec.native_shape[1] / float(image_size)
        diam = (2.0 * math.sqrt(median_area / math.pi) * scale
                if math.isfinite(median_area) and median_area > 0 else None)
        dark = lq.darkness_map(img, bead_diameter=diam)
        diameters[rec.name] = diam
        # Registered on bead centres (solid and ring beads); shapes judged on darkness.
        reg = lq.register_mask(mask, lq.centre_response(dark, bead_diameter=diam))
        fixed = lq.shift_mask(mask, -reg.dy, -reg.dx) if reg.is_offset() else mask
        shape = lq.shape_check(dark, fixed)
        regs[rec.name] = reg
        assessed.append(rec)
        row.update(
            assessed=True, mask_px=reg.n_mask_px, offset_dy=reg.dy, offset_dx=reg.dx,
            dark_score_unshifted=reg.score_unshifted, dark_score=reg.score,
            offset_gain=reg.gain, evidence=reg.evidence, mask_offset=reg.is_offset(),
            offset_at_search_limit=reg.at_search_edge and reg.is_offset(), mismatch=False,
            best_match="", best_match_evidence=None,
            **{k: v for k, v in shape.items() if k.startswith("n_")},
            missed_yx=shape["missed_yx"])

    # Mismatch: evidence far below the dataset's, at the best shift.
    median, threshold = lq.mismatch_threshold([regs[r.name].evidence for r in assessed])
    flagged = [r for r in assessed if math.isfinite(threshold)
               and regs[r.name].evidence < threshold]
    if flagged:
        masks = {r.name: mio.read_mask(r.mask_path, warn=False) for r in flagged}

        def sources():  # bead maps of the images some flagged mask can fit, one at a time
            for cand in tqdm(assessed, desc="mask sources", unit="img", disable=not progress):
                if any(r is not cand and masks[r.name].shape == tuple(cand.native_shape)
                       for r in flagged):
                    yield cand.name, lq.centre_map(mio.read_image(cand.image_path, 1)[..., 0],
                                                   bead_diameter=diameters[cand.name])

        where = {r.name: rel_path(r.image_path, root) for r in assessed}
        best = {name: (where[src], reg)
                for name, (src, reg) in lq.best_matching_images(masks, sources()).items()}
        for r in flagged:
            own, row = regs[r.name], rows[r.name]
            row["mismatch"] = True
            row["mask_offset"] = False  # an offset of a mask of nothing means nothing
            match = best.get(r.name)
            detail = (f"the mask marks almost none of its image's beads: bead evidence "
                      f"{own.evidence:.1f} at its best shift vs dataset median {median:.1f} "
                      f"(threshold {threshold:.1f}); ")
            if match and match[1].evidence >= lq.MATCH_FRACTION * median \
                    and match[1].evidence > own.evidence:
                row["best_match"], row["best_match_evidence"] = match[0], match[1].evidence
                detail += (f"it matches {match[0]} (evidence {match[1].evidence:.1f}, offset "
                           f"{offset_text(*match[1].offset)}): the mask of another tile?")
            else:
                detail += "no image in the dataset matches it"
            problems.append(Problem(rel_path(r.mask_path, root), MASK_MISMATCH, detail))

    for r in assessed:
        row, reg = rows[r.name], regs[r.name]
        if row["mismatch"]:
            continue
        if row["mask_offset"]:
            edge = (f" (at the search limit +-{reg.max_shift} px: may be larger)"
                    if reg.at_search_edge else "")
            problems.append(Problem(
                rel_path(r.mask_path, root), MASK_OFFSET,
                f"mask sits {offset_text(reg.dy, reg.dx)} px from its image's beads{edge}; "
                f"undoing it raises the mean bead-centre darkness under the mask from "
                f"{reg.score_unshifted:.1f} to {reg.score:.1f} ({reg.gain:+.0%}); "
                "--write_fixed shifts it back"))
        missed, merged = lq.shape_flags(row)
        row["missed_beads"], row["merged_beads"] = missed, merged
        if missed:
            problems.append(Problem(
                rel_path(r.mask_path, root), MISSED_BEADS,
                f"{row['n_missed']} of {row['n_image_beads']} bead-sized dark blobs in the "
                "image are not in the mask"))
        if merged:
            problems.append(Problem(
                rel_path(r.mask_path, root), MERGED_BEADS,
                f"{row['n_merged_objects']} mask objects each cover 2 or more of the image's "
                "beads that the touching-bead split cannot separate "
                f"({row['n_beads_in_merged']} of {row['n_image_beads']} beads; "
                f"{row['n_beads_lost']} lost to every count made from this mask)"))

    # Overlap consistency between grid neighbours that share pixels.
    names = [r.name for r in records]
    ovs = lq.find_grid_overlaps(names, lambda i: mio.read_image(records[i].image_path, 1))
    pairs = lq.overlap_agreement(
        ovs, lambda i: mio.read_mask(records[i].mask_path, warn=False), names=names)
    ceiling = lq.pooled_agreement(pairs)
    after = None
    moved = {r.name for r in assessed if rows[r.name]["mask_offset"]}
    if ceiling and any(p["first"] in moved or p["second"] in moved for p in pairs):
        def fixed_mask(i):
            m = mio.read_mask(records[i].mask_path, warn=False)
            reg = regs.get(records[i].name)
            return lq.shift_mask(m, -reg.dy, -reg.dx) if records[i].name in moved else m
        after = lq.pooled_agreement(lq.overlap_agreement(ovs, fixed_mask, names=names))
    for p in pairs:
        for key in ("first", "second"):
            row = rows[p[key]]
            row.setdefault("overlap_jaccards", []).append(p["jaccard"])

    offsets = [rows[r.name] for r in assessed if rows[r.name]["mask_offset"]]
    summary = {
        "n_assessed": len(assessed),
        "max_shift_px": lq.MAX_SHIFT,
        "offset_rule": f"|offset| >= {lq.MIN_OFFSET_PX} px and gain >= "
                       f"{lq.MIN_OFFSET_GAIN:.0%}",
        "n_offset": len(offsets),
        "offset_files": [{"file": o["file"], "dy": o["offset_dy"], "dx": o["offset_dx"],
                          "gain": o["offset_gain"]} for o in offsets],
        "evidence_median": median,
        "mismatch_threshold": threshold,
        "mismatch_files": [{"file": rows[r.name]["file"], "evidence": regs[r.name].evidence,
                            "best_match": rows[r.name]["best_match"] or None}
                           for r in flagged],
        "missed_beads_files": [n for n, r in rows.items() if r.get("missed_beads")],
        "merged_beads_files": [n for n, r in rows.items() if r.get("merged_beads")],
        "n_grid_neighbours_by_name": len(lq.grid_neighbours(names)),
        "overlap": ({k: v for k, v in ceiling.items()} if ceiling else None),
        "overlap_after_offset_fix": after,
        "label_consistency_ceiling": ceiling["pooled_jaccard"] if ceiling else None,
    }
    return {"rows": rows, "pairs": pairs, "summary": summary, "ceiling": ceiling,
            "after": after}


# --------------------------------------------------------------------------- rows, fixed copy


def _cell(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool | np.bool_):
        return int(v)
    return f"{v:.6g}" if isinstance(v, float | np.floating) else v


def label_rows(analysis) -> list[list]:
    """Rows of ``label_quality.csv`` in :data:`LABEL_COLUMNS` order."""
    out = []
    for r in analysis.labels.get("rows", {}).values():
        r = dict(r)
        js = r.pop("overlap_jaccards", [])
        r["n_overlap_pairs"] = len(js)
        js = [j for j in js if math.isfinite(j)]
        r["mean_overlap_jaccard"] = float(np.mean(js)) if js else None
        out.append([_cell(r.get(c)) for c in LABEL_COLUMNS])
    return out


def overlap_rows(analysis) -> list[list]:
    """Rows of ``overlap_pairs.csv`` in :data:`OVERLAP_COLUMNS` order."""
    return [[_cell(p[c]) for c in OVERLAP_COLUMNS] for p in analysis.labels.get("pairs", [])]


def fixed_dir_problem(fixed: Path, data_dir: Path, output_dir: Path) -> str | None:
    """None if ``--write_fixed`` may write to ``fixed``, else a one-line reason."""
    f, d, o = fixed.resolve(), data_dir.resolve(), output_dir.resolve()
    if f == d or d in f.parents or f in d.parents:
        return (f"{fixed}: --write_fixed folder overlaps the data folder {data_dir}; the input "
                "is never written to, choose another folder")
    if f == o or o in f.parents or f in o.parents:
        return f"{fixed}: --write_fixed folder overlaps --output_dir {output_dir}"
    if f.exists() and (not f.is_dir() or any(f.iterdir())):
        return f"{fixed}: --write_fixed folder exists and is not empty"
    return None


def write_fixed_copy(analysis, dest: Path) -> dict:
    """Corrected copy of the dataset: offset masks shifted back, everything else copied.

    ``images/``, ``masks/`` and the data folder's top-level files are copied byte for byte
    (other sub-folders, such as ``large/``, are not copied and are listed); each mask
    reported as offset is then rewritten, moved by minus its offset, with its stored dtype,
    foreground value and file format. ``dest/label_fixes.csv`` lists the changes. The input
    folder is only read.

    Returns
    -------
    dict
        ``dir``, ``changed`` (list of ``{file, shift_dy, shift_dx}``), ``not_copied``.
    """
    import shutil

    src = analysis.data_dir
    dest.mkdir(parents=True, exist_ok=True)
    not_copied = []
    for p in sorted(src.iterdir()):
        if p.is_dir() and p.name in ("images", "masks"):
            shutil.copytree(p, dest / p.name)
        elif p.is_file():
            shutil.copy2(p, dest / p.name)
        else:
            not_copied.append(p.name + ("/" if p.is_dir() else ""))
    changed = []
    for rec in analysis.records:
        row = analysis.labels.get("rows", {}).get(rec.name, {})
        if not row.get("mask_offset"):
            continue
        raw = mio._read_raw(rec.mask_path)
        sy, sx = -int(row["offset_dy"]), -int(row["offset_dx"])
        target = dest / rec.mask_path.relative_to(src)
        mio.write_image(target, lq.shift_mask(raw, sy, sx))
        changed.append({"file": rel_path(rec.mask_path, src), "shift_dy": sy, "shift_dx": sx})
    mio.atomic_write_csv(dest / "label_fixes.csv",
                         [{"file": c["file"], "change": "mask shifted back by its offset",
                           "shift_dy": c["shift_dy"], "shift_dx": c["shift_dx"]}
                          for c in changed], ["file", "change", "shift_dy", "shift_dx"])
    for c in changed:
        log.info("%s: mask shifted by dy=%+d, dx=%+d in %s", c["file"], c["shift_dy"],
                 c["shift_dx"], dest)
    return {"dir": str(dest), "changed": changed, "not_copied": not_copied}

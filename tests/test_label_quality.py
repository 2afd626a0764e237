"""Tests of label_quality.py and of the label checks it adds to analyze and evaluate.

Tiles are tiny seeded brightfield-like scenes: solid dark discs (radius 4, the users' 7-9 px
beads) on grey with an illumination gradient and noise; masks are "shrunk" discs (radius 3)
like the users' blob-detector masks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import analyze_microbead_dataset as am
import dataset_integrity as di
import evaluate_predictions as ev
import label_quality as lq
import microbead_io as mio

S = 96


def scene(rng, h=S, w=S, n=10, r=4, spacing=14, touching=0, margin=8):
    """``(image uint8 (h, w), labels int32, centres)``: dark discs on a lit grey field."""
    centres: list[tuple[float, float]] = []
    for _ in range(5000):
        if len(centres) == n:
            break
        c = (rng.uniform(margin, h - margin), rng.uniform(margin, w - margin))
        if all(math.hypot(c[0] - q[0], c[1] - q[1]) >= spacing for q in centres):
            centres.append(c)
    for cy, cx in centres[:touching]:  # a partner touching the first beads
        a = rng.uniform(0, 2 * np.pi)
        centres.append((cy + 2 * r * np.sin(a), cx + 2 * r * np.cos(a)))
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)
    dark = np.zeros((h, w), np.float32)
    for i, (cy, cx) in enumerate(centres):
        d = np.hypot(yy - cy, xx - cx)
        lab[(d <= r) & (lab == 0)] = i + 1
        dark = np.maximum(dark, np.clip(r + 0.5 - d, 0, 1).astype(np.float32))
    dark = cv2.GaussianBlur(dark, (0, 0), 0.7)
    img = 165.0 + 50.0 * (xx / w - 0.5) + 25.0 * (yy / h - 0.5) - 100.0 * dark
    img += rng.normal(0.0, 3.0, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), lab, centres


def shrunk_mask(centres, shape, r=3):
    m = np.zeros(shape, np.uint8)
    for cy, cx in centres:
        cv2.circle(m, (int(round(cx)), int(round(cy))), r, 1, -1)
    return m


def md5_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- registration


def test_shift_mask_moves_content_and_fills_with_zero():
    m = np.zeros((5, 6), np.uint8)
    m[1, 1] = 1
    m[4, 5] = 7
    out = lq.shift_mask(m, 2, -1)
    assert out[3, 0] == 1 and out.sum() == 1  # (4, 5) moved past the border: lost
    assert lq.shift_mask(m, 0, 0).tolist() == m.tolist()
    assert not lq.shift_mask(m, 5, 0).any()


def test_shift_scores_by_hand():
    d = np.zeros((10, 12), np.float32)
    d[5, 7] = 1.0
    m = np.zeros((10, 12), np.uint8)
    m[5, 5] = m[5, 6] = 1  # two pixels
    sc = lq.shift_scores(m, d, max_shift=3)
    assert sc.shape == (7, 7)
    assert sc[3 + 0, 3 + 2] == pytest.approx(0.5)  # (5,5)->(5,7) hits, (5,6)->(5,8) misses
    assert sc[3 + 0, 3 + 1] == pytest.approx(0.5)
    assert sc[3, 3] == 0.0
    corner = np.zeros_like(m)
    corner[0, 0] = 1
    sc = lq.shift_scores(corner, d, max_shift=2)
    assert np.isnan(sc[0, 2]) and sc[2, 2] == 0.0  # moved outside: undefined, not 0
    assert np.isnan(lq.shift_scores(np.zeros_like(m), d)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_offsets_are_found_within_one_pixel(seed):
    rng = np.random.default_rng(seed)
    img, _, centres = scene(rng)
    mask = shrunk_mask(centres, img.shape)
    assert not lq.register(img, mask).is_offset()  # unshifted tile: not flagged
    for planted in [(2, -3), (-4, 0)]:
        reg = lq.register(img, lq.shift_mask(mask, *planted))
        assert abs(reg.dy - planted[0]) <= 1 and abs(reg.dx - planted[1]) <= 1, reg
        assert reg.is_offset() and reg.gain > lq.MIN_OFFSET_GAIN
        assert reg.score > reg.score_unshifted


def test_empty_mask_registers_to_nothing():
    img, _, _ = scene(np.random.default_rng(0))
    reg = lq.register(img, np.zeros(img.shape, np.uint8))
    assert reg.offset == (0, 0) and math.isnan(reg.score) and not reg.is_offset()


def test_mask_of_another_tile_has_no_evidence_and_its_source_is_found():
    rng = np.random.default_rng(3)
    tiles = [scene(rng) for _ in range(5)]
    masks = [shrunk_mask(c, img.shape) for img, _, c in tiles]
    darks = [lq.darkness_map(img) for img, _, _ in tiles]
    own = [lq.register_mask(m, d).evidence for m, d in zip(masks, darks)]
    foreign = lq.register_mask(masks[3], darks[0]).evidence
    median, threshold = lq.mismatch_threshold(own + [foreign])
    assert foreign < threshold < min(own)
    name, reg = lq.best_matching_image(
        masks[3], ((f"t{i}", d) for i, d in enumerate(darks) if i != 0))
    assert name == "t3" and reg.offset == (0, 0)


def test_best_matching_images_one_pass_never_matches_a_mask_to_its_own_name():
    rng = np.random.default_rng(3)
    tiles = [scene(rng) for _ in range(4)]
    masks = [shrunk_mask(c, img.shape) for img, _, c in tiles]
    darks = [lq.darkness_map(img) for img, _, _ in tiles]
    seen = []

    def candidates():  # a generator: every map is made once, whatever the number of masks
        for i, d in enumerate(darks):
            seen.append(i)
            yield f"t{i}", d

    # t1 holds t2's mask, t2 holds t3's: each is found where its beads are; t3's own mask
    # under its own name is skipped, so it can only match elsewhere (and scores less).
    best = lq.best_matching_images({"t1": masks[2], "t2": masks[3], "t3": masks[3]},
                                   candidates())
    assert seen == [0, 1, 2, 3]
    assert best["t1"][0] == "t2" and best["t2"][0] == "t3" and best["t3"][0] != "t3"
    assert best["t3"][1].evidence < best["t2"][1].evidence
    assert best["t1"][1].offset == (0, 0)
    # Maps of another shape are skipped; no candidate left -> the mask is left out.
    small = [("s", np.zeros((10, 10), np.float32))]
    assert lq.best_matching_images({"t1": masks[0]}, small) == {}
    assert lq.best_matching_image(masks[0], small) == (None, None)


def test_mismatch_threshold_by_hand():
    assert lq.mismatch_threshold([10, 20, 30, 1, float("nan")]) == (15.0, pytest.approx(4.5))
    med, thr = lq.mismatch_threshold([10, 20])  # too few masks to judge
    assert med == 15.0 and math.isnan(thr)
    assert all(math.isnan(v) for v in lq.mismatch_threshold([]))


# --------------------------------------------------------------------------- overlaps


def two_tiles(rng, h=64, w=64, overlap=37):
    """Two tiles cut from one textured frame, the second ``w - overlap`` px to the right."""
    stride = w - overlap
    frame = cv2.GaussianBlur(rng.uniform(0, 255, (h, w + stride)).astype(np.float32), (0, 0),
                             1.0)
    frame += np.linspace(0, 60, w + stride)[None, :]
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame[:, :w], frame[:, stride:], stride


def test_neighbours_sharing_37_px_and_their_mask_jaccard_by_hand(tmp_path):
    a, b, stride = two_tiles(np.random.default_rng(0))
    assert lq.find_overlap(a, b, side="right")[:1] == (37,)
    w, corr, diff, identical = lq.find_overlap(a, b)
    assert (w, diff, identical) == (37, 0.0, True) and corr == pytest.approx(1.0)
    # Masks in frame coordinates; the shared strip is frame columns 27..63.
    ma, mb = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    ma[10:20, 30:40] = 1   # 100 px in the strip
    mb[10:20, 35 - stride:45 - stride] = 1  # frame cols 35..44: 50 px shared, union 150
    ma[40:50, 0:10] = 1    # outside the strip: must not count
    mb[40:50, 50:60] = 1
    names = ["640x_2025-05-16_10-00-00_002_grid_r1_c1.png",
             "640x_2025-05-16_10-00-00_002_grid_r1_c2.png"]
    res = lq.consistency_ceiling([a, b], [ma, mb], names)
    assert res["n_pairs"] == 1 and res["n_identical"] == 1
    assert res["pooled_jaccard"] == pytest.approx(1 / 3)
    p = res["pairs"][0]
    assert (p["first"], p["second"], p["side"], p["width"]) == (*names, "right", 37)
    assert (p["intersection"], p["union"]) == (50, 150)
    # Per-tile normalised images (what the trainer holds) still pair up, not identical.
    norm = [mio.normalize_image(x.astype(np.float32)) for x in (a, b)]
    res_n = lq.consistency_ceiling(norm, [ma, mb], names)
    assert res_n["pooled_jaccard"] == pytest.approx(1 / 3) and res_n["n_identical"] == 0
    # From files, at native resolution, masks with the _mask suffix.
    for name, img, m in zip(names, (a, b), (ma, mb)):
        mio.write_image(tmp_path / name, img)
        mio.write_mask(tmp_path / name.replace(".png", "_mask.png"), m)
    res_f = lq.consistency_ceiling_from_files(
        [tmp_path / n for n in names], [tmp_path / n.replace(".png", "_mask.png") for n in names])
    assert res_f["pooled_jaccard"] == pytest.approx(1 / 3) and res_f["n_pairs"] == 1
    # Loaders instead of arrays, and strips already found: not searched again.
    ovs = lq.find_grid_overlaps(names, [a, b].__getitem__)
    res_o = lq.consistency_ceiling(None, [ma, mb].__getitem__, names, overlaps=ovs)
    assert res_o == res


def test_pooled_and_median_over_pairs():
    rows = [{"intersection": 1, "union": 2, "jaccard": 0.5, "width": 37,
             "images_identical": True},
            {"intersection": 9, "union": 10, "jaccard": 0.9, "width": 37,
             "images_identical": True},
            {"intersection": 0, "union": 0, "jaccard": float("nan"), "width": 37,
             "images_identical": False}]
    res = lq.pooled_agreement(rows)
    assert res["pooled_jaccard"] == pytest.approx(10 / 12)
    assert res["median_pair_jaccard"] == pytest.approx(0.7)
    assert (res["n_pairs"], res["n_pairs_with_beads"], res["n_identical"]) == (3, 2, 2)
    assert lq.pooled_agreement([]) is None and lq.pooled_agreement(rows[2:]) is None


def test_no_grid_names_or_no_shared_pixels_means_no_ceiling():
    rng = np.random.default_rng(1)
    a, b, _ = two_tiles(rng)
    m = np.ones((64, 64), np.uint8)
    assert lq.consistency_ceiling([a, b], [m, m], ["a.png", "b.png"]) is None
    assert lq.grid_neighbours(["a.png", "x_grid_r1_c1.png", "y_grid_r1_c2.png"]) == []
    # Named neighbours (rows do not touch in the users' frames) that share no pixels.
    frame, _, _ = scene(rng, h=160, w=64)
    top, bottom = frame[:64], frame[96:]
    names = ["f_grid_r1_c1.png", "f_grid_r2_c1.png"]
    assert lq.grid_neighbours(names) == [(0, 1, "below")]
    assert lq.find_overlap(top, bottom, side="below") is None
    assert lq.consistency_ceiling([top, bottom], [m, m], names) is None
    # A real vertical overlap is found too.
    assert lq.find_overlap(frame[:64], frame[40:104], side="below")[0] == 24


# --------------------------------------------------------------------------- shape


def test_missed_and_merged_beads():
    rng = np.random.default_rng(4)
    img, lab, centres = scene(rng, n=10, touching=2)
    dark = lq.darkness_map(img)
    exact = shrunk_mask(centres, img.shape, r=4)  # touching discs touch: one object each ...
    res = lq.shape_check(dark, exact)
    assert res["n_image_beads"] == lab.max() == 12
    assert res["n_missed"] == 0
    assert res["n_mask_objects"] == 10 and res["n_merged_objects"] == 0  # ... split by label_beads
    # A detector's round blob over the contact of a touching pair: one bead to any split.
    blobs = shrunk_mask(centres[2:10], img.shape)
    for (ay, ax), (by, bx) in zip(centres[:2], centres[10:]):
        cv2.circle(blobs, (round((ax + bx) / 2), round((ay + by) / 2)), 4, 1, -1)
    res = lq.shape_check(dark, blobs)
    assert (res["n_merged_objects"], res["n_beads_in_merged"], res["n_beads_lost"]) == (2, 4, 2)
    assert lq.shape_flags(res) == (False, True)  # 2 objects, 4 of 12 beads >= 25 %
    partial = shrunk_mask(centres[:2] + centres[5:], img.shape, r=2)  # 3 lone beads left out
    res = lq.shape_check(dark, partial)
    assert res["n_missed"] == 3 and res["missed_yx"].shape == (3, 2)
    assert lq.shape_flags(res) == (True, False)
    assert lq.shape_check(dark, np.zeros_like(exact))["n_missed"] == 0  # empty: not assessed


# --------------------------------------------------------------------------- label noise


def test_degrade_mask_is_reproducible_and_reports_what_it_did():
    img, lab, _ = scene(np.random.default_rng(5), n=14, touching=3)
    before = lab.copy()
    kw = dict(image=img, drop_fraction=0.2, offset_prob=1.0, offset_px=(2, 3), merge_prob=1.0)
    m1, i1 = lq.degrade_mask(lab, np.random.default_rng(0), **kw)
    m2, i2 = lq.degrade_mask(lab, np.random.default_rng(0), **kw)
    assert np.array_equal(lab, before)  # input untouched
    assert np.array_equal(m1, m2) and i1 == i2
    assert m1.dtype == np.uint8 and set(np.unique(m1)) <= {0, 1}
    assert i1["offset"] and 2 <= max(abs(i1["dy"]), abs(i1["dx"])) <= 3
    assert i1["shift"] == (i1["dy"], i1["dx"])
    reg = lq.register(img, m1)
    assert abs(reg.dy - i1["dy"]) <= 1 and abs(reg.dx - i1["dx"]) <= 1
    back = lq.shift_mask(m1, -i1["dy"], -i1["dx"]).astype(bool)
    ids = np.unique(lab[lab > 0])
    hit = np.isin(ids, np.unique(lab[back]))
    dropped = set(i1["dropped_ids"])
    assert i1["n_dropped"] == len(dropped) >= 1
    assert {int(i) for i in ids[~hit]} == dropped  # dropped beads gone, every other kept
    assert back.sum() < (lab > 0).sum()  # shrunk
    assert i1["n_merged"] == i1["n_touching_pairs"] >= 1


def test_degrade_mask_drops_faint_beads_merges_touching_and_can_do_nothing():
    img, lab, centres = scene(np.random.default_rng(6), n=12, touching=2)
    faint = set(range(1, 7))  # make beads 1..6 faint in the image
    img = img.astype(np.float32)
    sel = np.isin(lab, list(faint))
    img[sel] = 0.7 * 165.0 + 0.3 * img[sel]
    m, info = lq.degrade_mask(lab, np.random.default_rng(1), image=img.astype(np.uint8),
                              drop_fraction=0.3, offset_prob=0.0, merge_prob=0.0)
    assert info["n_dropped"] >= 1 and set(info["dropped_ids"]) <= faint
    assert info["shift"] == (0, 0) and not info["offset"] and info["n_merged"] == 0
    n_none = cv2.connectedComponents(m, connectivity=8)[0] - 1
    assert n_none == lab.max() - info["n_dropped"]  # shrunk touching beads come apart
    m_all, info_all = lq.degrade_mask(lab, np.random.default_rng(1), drop_fraction=0.0,
                                      offset_prob=0.0, merge_prob=1.0)
    n_merged = cv2.connectedComponents(m_all, connectivity=8)[0] - 1
    assert n_merged == lab.max() - info_all["n_merged"] == lab.max() - 2
    m0, info0 = lq.degrade_mask(lab, np.random.default_rng(1), shrink_px=0, drop_fraction=0,
                                offset_prob=0, merge_prob=0)
    assert np.array_equal(m0, (lab > 0).astype(np.uint8)) and info0["n_dropped"] == 0


# --------------------------------------------------------------------------- analyze


@pytest.fixture
def labelled_dataset(tmp_path):
    """8 tiles; two masks offset, one the copy of another tile's mask, two grid neighbours
    sharing 37 px."""
    data = tmp_path / "data"
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(6):
        img, _, centres = scene(rng)
        stem = f"320x_tile_{i}"
        mask = shrunk_mask(centres, img.shape)
        truth[stem] = mask
        mio.write_image(data / "images" / f"{stem}.png", np.dstack([img] * 3))
        mio.write_mask(data / "masks" / f"{stem}.png", mask)
    frame, _, centres = scene(rng, w=2 * S - 37, n=16)
    fmask = shrunk_mask(centres, frame.shape)
    for c, x0 in ((1, 0), (2, S - 37)):
        stem = f"640x_2025-05-16_10-00-00_grid_r1_c{c}"
        mio.write_image(data / "images" / f"{stem}.png", frame[:, x0 : x0 + S])
        mio.write_mask(data / "masks" / f"{stem}.png", fmask[:, x0 : x0 + S])
        truth[stem] = fmask[:, x0 : x0 + S]
    mio.write_mask(data / "masks" / "320x_tile_1.png", lq.shift_mask(truth["320x_tile_1"], 2, -3))
    mio.write_mask(data / "masks" / "320x_tile_2.png", lq.shift_mask(truth["320x_tile_2"], -4, 0))
    mio.write_mask(data / "masks" / "320x_tile_4.png", truth["320x_tile_5"])  # wrong tile's mask
    (data / "dataset.json").write_text("{}")
    return data, truth


def test_analyze_names_offsets_mismatch_and_the_ceiling(labelled_dataset, tmp_path,
                                                        monkeypatch):
    data, truth = labelled_dataset
    monkeypatch.setattr(am, "plot_samples", lambda a, p, *x, **k: Path(p).write_bytes(b"") or [])
    before = md5_tree(data)
    out, fixed = tmp_path / "analysis", tmp_path / "fixed"
    rc = am.main(["--data_dir", str(data), "--output_dir", str(out), "--no_progress",
                  "--image_size", str(S), "--write_fixed", str(fixed)])
    assert rc == 0
    assert md5_tree(data) == before  # the input folder is byte-identical
    rows = read_csv(out / "integrity_problems.csv")
    offsets = {r["file"]: r["detail"] for r in rows if r["problem"] == di.MASK_OFFSET}
    assert set(offsets) == {"masks/320x_tile_1.png", "masks/320x_tile_2.png"}
    for f, (dy, dx) in (("masks/320x_tile_1.png", (2, -3)), ("masks/320x_tile_2.png", (-4, 0))):
        got = re.search(r"dy=([+-]\d+), dx=([+-]\d+)", offsets[f])
        assert abs(int(got[1]) - dy) <= 1 and abs(int(got[2]) - dx) <= 1, offsets[f]
    mism = [r for r in rows if r["problem"] == di.MASK_MISMATCH]
    assert [r["file"] for r in mism] == ["masks/320x_tile_4.png"]
    assert "images/320x_tile_5.png" in mism[0]["detail"]
    s = json.loads((out / "summary.json").read_text())
    lqs = s["label_quality"]
    assert lqs["n_assessed"] == 8 and lqs["n_offset"] == 2
    assert lqs["mismatch_files"][0]["best_match"] == "images/320x_tile_5.png"
    assert s["label_consistency_ceiling"] == pytest.approx(1.0)  # same pixels, same mask
    assert lqs["overlap"]["n_pairs"] == 1 and lqs["overlap"]["n_identical"] == 1
    pairs = read_csv(out / "overlap_pairs.csv")
    assert len(pairs) == 1 and pairs[0]["width"] == "37"
    per_file = {r["file"]: r for r in read_csv(out / "label_quality.csv")}
    assert per_file["320x_tile_1.png"]["mask_offset"] == "1"
    assert per_file["320x_tile_0.png"]["mask_offset"] == "0"
    report = (out / am.REPORT).read_text()
    assert "320x_tile_1.png" in report and "label-consistency ceiling" in report.lower()
    assert (out / "label_quality.png").stat().st_size > 0
    # The corrected copy: offsets undone, nothing else changed, changes listed.
    copy = md5_tree(fixed)
    changed = {k for k in before if copy.get(k) != before[k]}
    assert changed == {"masks/320x_tile_1.png", "masks/320x_tile_2.png"}
    assert set(copy) - set(before) == {"label_fixes.csv"}
    for stem in ("320x_tile_1", "320x_tile_2"):
        m = mio.read_mask(fixed / "masks" / f"{stem}.png")
        assert np.array_equal(m, truth[stem]), stem  # no bead near the border is lost here
    fixes = read_csv(fixed / "label_fixes.csv")
    assert {r["file"] for r in fixes} == {"masks/320x_tile_1.png", "masks/320x_tile_2.png"}
    assert "shifted back" in report


def test_write_fixed_refuses_the_data_folder(labelled_dataset, tmp_path):
    data, _ = labelled_dataset
    before = md5_tree(data)
    for target in (data / "fixed", data, tmp_path):
        rc = am.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "o"),
                      "--no_progress", "--write_fixed", str(target)])
        assert rc == 2
    assert md5_tree(data) == before and not (data / "fixed").exists()


def test_analyze_without_grid_names_has_no_ceiling(tmp_path, monkeypatch):
    monkeypatch.setattr(am, "plot_samples", lambda a, p, *x, **k: Path(p).write_bytes(b"") or [])
    data = tmp_path / "data"
    rng = np.random.default_rng(8)
    for i in range(3):
        img, _, centres = scene(rng)
        mio.write_image(data / "images" / f"t{i}.png", img)
        mio.write_mask(data / "masks" / f"t{i}.png", shrunk_mask(centres, img.shape))
    out = tmp_path / "out"
    assert am.main(["--data_dir", str(data), "--output_dir", str(out), "--no_progress",
                    "--strict"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["label_consistency_ceiling"] is None and s["label_quality"]["n_offset"] == 0
    assert "no ceiling can be measured" in (out / am.REPORT).read_text()


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reports_truth_offsets_and_the_ceiling(labelled_dataset, tmp_path):
    data, truth = labelled_dataset
    pred = tmp_path / "pred"
    for stem, m in truth.items():  # predictions exactly on the beads
        mio.write_mask(pred / f"{stem}.png", m)
    out = tmp_path / "eval"
    assert ev.main(["--pred_dir", str(pred), "--gt_dir", str(data), "--output_dir", str(out),
                    "--no_progress", "--no_figures"]) == 0
    rows = {r["file"]: r for r in read_csv(out / "per_image_metrics.csv")}
    got = re.fullmatch(r"dy=([+-]\d+) dx=([+-]\d+)", rows["320x_tile_1.png"]["mask_offset"])
    assert got and abs(int(got[1]) - 2) <= 1 and abs(int(got[2]) + 3) <= 1
    assert rows["320x_tile_2.png"]["mask_offset"].startswith("dy=-")
    assert rows["320x_tile_4.png"]["mask_offset"] == "mismatch"
    assert rows["320x_tile_0.png"]["mask_offset"] == "none"
    assert float(rows["320x_tile_1.png"]["jaccard"]) < 0.5  # the offset caps the IoU
    s = json.loads((out / "summary.json").read_text())
    assert s["label_consistency_ceiling"] == pytest.approx(1.0)
    report = (out / "evaluation_report.md").read_text()
    assert "| label-consistency ceiling" in report and "## Truth-label quality" in report
    # Without truth images: no column, no ceiling.
    out2 = tmp_path / "eval2"
    assert ev.main(["--pred_dir", str(pred), "--gt_dir", str(data / "masks"), "--output_dir",
                    str(out2), "--no_progress", "--no_figures", "--gt_images_dir",
                    str(data / "images")]) == 0
    assert "mask_offset" in read_csv(out2 / "per_image_metrics.csv")[0]
    out3 = tmp_path / "eval3"
    masks_only = tmp_path / "masks_only"
    masks_only.mkdir()
    for f in (data / "masks").iterdir():
        (masks_only / f.name).write_bytes(f.read_bytes())
    assert ev.main(["--pred_dir", str(pred), "--gt_dir", str(masks_only), "--output_dir",
                    str(out3), "--no_progress", "--no_figures"]) == 0
    assert "mask_offset" not in read_csv(out3 / "per_image_metrics.csv")[0]
    assert json.loads((out3 / "summary.json").read_text())["label_consistency_ceiling"] is None


# --------------------------------------------------------------------------- ring beads


def ring_tiles(seed: int, n_tiles: int = 36, n_offset: int = 6, size: int = 128):
    """Ring beads (dark rim, lighter core: the generator's ``rings`` style, ~9 px across)
    with shrunk masks; the first ``n_offset`` masks moved by a planted 2-4 px offset."""
    import synthetic_render as sr
    import synthetic_scenes as ss

    rng = np.random.default_rng(seed)
    tiles = []
    for i in range(n_tiles):
        ap = sr.sample_appearance(rng, (size, size))
        sc = ss.make_scene(rng, (size, size), (size, size), int(rng.integers(6, 14)),
                           appearance=ap, radius_native=4.7)
        mask, _ = lq.degrade_mask(sc["labels"], rng, shrink_px=(1, 2), drop_fraction=0.0,
                                  offset_prob=0.0)
        planted = (0, 0)
        while i < n_offset and not 2 <= max(map(abs, planted)) <= 4:
            planted = tuple(int(v) for v in rng.integers(-4, 5, 2))
        tiles.append((sc["image"] * 255.0, lq.shift_mask(mask, *planted), planted))
    return tiles


@pytest.mark.parametrize("seed", [0, 1])
def test_ring_beads_offsets_are_named_and_unshifted_masks_are_not(seed):
    tiles = ring_tiles(seed)
    areas = np.concatenate([np.bincount(cv2.connectedComponents(m.astype(np.uint8))[1].ravel())
                            [1:] for _, m, _ in tiles])
    diameter = 2.0 * math.sqrt(np.median(areas) / math.pi)  # from the shrunk masks
    named, false = 0, 0
    for img, mask, planted in tiles:
        reg = lq.register(img, mask, bead_diameter=diameter)
        if planted != (0, 0):
            named += reg.is_offset() and abs(reg.dy - planted[0]) <= 1 \
                and abs(reg.dx - planted[1]) <= 1
        else:
            false += reg.is_offset()
    # Raw darkness put shrunk masks on the rims: it flagged 14-16 of the 30 unshifted tiles.
    assert named == 6 and false <= 1, (named, false)

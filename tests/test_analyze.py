"""Tests for analyze_microbead_dataset.py (integrity check, statistics, recommendation)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import analysis_figures as af
import analyze_microbead_dataset as am
import cli
import config_recommendation as cr
import dataset_integrity as di
import dataset_stats as ds
import microbead_config as mcfg
import microbead_io as mio
import microbead_metrics as mm

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _ring_pair(rng, centres, size=64, radius=4, inverted=False):
    """Brightfield-like tile (dark rims, lighter core, bright background) and its mask."""
    img = np.full((size, size), 200.0)
    for cy, cx in centres:
        cv2.circle(img, (cx, cy), radius, 60.0, thickness=2)
        cv2.circle(img, (cx, cy), max(radius - 2, 1), 150.0, thickness=-1)
    img += rng.normal(0.0, 4.0, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if inverted:
        img = 255 - img
    mask = np.zeros((size, size), np.uint8)
    for cy, cx in centres:
        cv2.circle(mask, (cx, cy), radius + 1, 1, thickness=-1)
    return img, mask


def _layout(rng, n, size=64, margin=8, spacing=14):
    """``n`` well-separated bead centres (rejection sampling)."""
    pts: list[tuple[int, int]] = []
    while len(pts) < n:
        p = tuple(int(v) for v in rng.integers(margin, size - margin, 2))
        if all(math.hypot(p[0] - q[0], p[1] - q[1]) >= spacing for q in pts):
            pts.append(p)
    return pts


def _write_pair(root: Path, stem: str, img, mask, mask_writer=None):
    mio.write_image(root / "images" / f"{stem}.png", img)
    (mask_writer or mio.write_mask)(root / "masks" / f"{stem}.png", mask)


def _clean_dataset(root: Path, n=6, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, mask = _ring_pair(rng, _layout(rng, 3 + i % 3))
        _write_pair(root, f"{160 * 2 ** (i % 2)}x_tile_{i:02d}", img, mask)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def no_figures(monkeypatch):
    """Skip matplotlib rendering in tests about exit codes and files (figures are covered
    by the other end-to-end tests); the stub still writes the file so the output set is whole."""
    def stub(analysis, path, *a, **k):
        Path(path).write_bytes(b"")
        return []

    monkeypatch.setattr(am, "plot_samples", stub)
    monkeypatch.setattr(am, "plot_distributions", stub)


def _run(tmp_path, data, *extra, out=None):
    out = out or tmp_path / "analysis"
    rc = am.main(["--data_dir", str(data), "--output_dir", str(out), "--no_progress", *extra])
    return rc, out


# --------------------------------------------------------------------------- unit tests


def test_parse_args_accepts_hyphenated_aliases():
    a = am.parse_args(["--data-dir", "d", "--output-dir", "o", "--image-size", "128",
                       "--val-fraction", "0.1", "--no-progress", "--strict"])
    assert (str(a.data_dir), str(a.output_dir), a.image_size) == ("d", "o", 128)
    assert a.val_fraction == 0.1 and a.no_progress and a.strict
    d = am.parse_args([])
    assert (str(d.data_dir), str(d.output_dir), d.image_size) == (
        "dataset_microscope", "dataset_analysis", 0)  # 0: the stored size, as training


def test_describe_mask_levels_classifies_value_sets():
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 255
    assert di.describe_mask_levels(m)[:2] == ("0/255", None)
    assert di.describe_mask_levels((m // 255).astype(np.uint8))[:2] == ("0/1", di.MASK_0_1)
    aa = cv2.GaussianBlur(m, (3, 3), 1.0)
    enc, code, detail = di.describe_mask_levels(aa)
    assert code == di.MASK_ANTIALIASED and "levels" in enc and "half max" in detail
    assert di.describe_mask_levels(np.zeros((4, 4), np.uint8))[:2] == ("empty", None)
    assert di.describe_mask_levels(m.astype(np.uint16) * 257)[:2] == ("0/65535", None)
    assert di.describe_mask_levels(np.where(m > 0, 255, 7).astype(np.uint8))[1] == (
        di.MASK_ENCODING)
    labels = np.zeros((12, 12), np.uint16)
    labels[1:4, 1:4], labels[6:9, 1:4], labels[6:9, 6:10] = 1, 2, 3
    assert di.describe_mask_levels(labels)[:2] == ("instance labels (3 ids)", None)


def test_image_hash_equal_for_identical_pixels_only():
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    b = a.copy()
    assert di.image_hash(a) == di.image_hash(b)
    b[0, 0] = 1
    assert di.image_hash(a) != di.image_hash(b)


def test_mask_polarity_sign_flags_inverted_image():
    rng = np.random.default_rng(0)
    centres = _layout(rng, 4)
    img, mask = _ring_pair(rng, centres)
    inv, _ = _ring_pair(np.random.default_rng(0), centres, inverted=True)
    norm = mio.normalize_image(img.astype(np.float32))
    norm_inv = mio.normalize_image(inv.astype(np.float32))
    assert di.mask_polarity(norm, mask, 2) > 0.1
    assert di.mask_polarity(norm_inv, mask, 2) < -0.1
    assert math.isnan(di.mask_polarity(norm, np.zeros_like(mask), 2))


def test_object_areas_use_8_connectivity():
    m = np.zeros((6, 6), np.uint8)
    m[1, 1] = m[2, 2] = 1  # diagonal neighbours: one 8-connected object
    m[4, 4] = 1
    assert sorted(ds.object_areas(m).tolist()) == [1, 2]
    assert ds.object_areas(np.zeros((3, 3))).size == 0


def test_objects_histogram_keeps_every_image():
    counts = [0, 1, 1, 2, 3, 250, 800]  # dense outliers the old script dropped
    edges, hist = ds.objects_histogram(counts)
    assert hist.sum() == len(counts)
    assert edges[0] < min(counts) and edges[-1] > max(counts)
    edges, hist = ds.objects_histogram([4, 4, 5])
    assert edges.tolist() == [3.5, 4.5, 5.5] and hist.tolist() == [2, 1]


def test_partial_suspect_rule():
    assert ds.is_partial_suspect(1, 2) == (False, 0.5)  # one unlabelled blob is not enough
    assert ds.is_partial_suspect(2, 8) == (True, 0.25)
    assert ds.is_partial_suspect(2, 9)[0] is False
    assert ds.is_partial_suspect(0, 0) == (False, 0.0)


def _stats(**kw):
    base = {"dataset_size": 73, "native_size": 256, "analysis_image_size": 256,
            "median_bead_diameter_px": 9.4, "mean_positive_ratio": 0.11,
            "empty_mask_fraction": 0.0, "objects_per_image": list(range(73))}
    base.update(kw)
    return base


def test_recommend_config_rules():
    cfg, ev = cr.recommend_config(_stats())
    assert set(cfg) <= mcfg.CONFIG_FILE_KEYS and set(cfg) == set(ev)
    assert cfg["image_size"] == 256  # 9.4 px beads: within [8, RF/4], keep native
    n_train = 73 - round(73 * cr.DEFAULT_VAL_FRACTION)
    assert cfg["batch_size"] <= n_train / 4 and cfg["batch_size"] == 8
    assert cfg["val_fraction"] == cr.DEFAULT_VAL_FRACTION
    assert cfg["steps_per_epoch"] == 50 and cfg["loss"] == "bce_dice"
    assert cr.receptive_field(4) == 200
    # Small beads: never upsample past the stored tiles (it adds no detail, only cost).
    cfg, ev = cr.recommend_config(_stats(median_bead_diameter_px=4.0))
    assert cfg["image_size"] == 256
    assert "never upsampled" in ev["image_size"]["evidence"]["decision"]
    # The users' real tiles: native 512 px, beads ~3 px across at a 256-px analysis. The
    # old rule asked for 656 px; now: the stored size, with the reason and the cost.
    cfg, ev = cr.recommend_config(_stats(native_size=512, analysis_image_size=256,
                                         median_bead_diameter_px=3.0))
    assert cfg["image_size"] == 512
    decision = ev["image_size"]["evidence"]["decision"]
    assert "6.0 px at the stored size" in decision and "3.0 px at 256" in decision
    assert "4.0x a 256-px input" in decision
    # Beads larger than RF/4 = 50 px: shrink.
    cfg, _ = cr.recommend_config(_stats(median_bead_diameter_px=100.0))
    assert cfg["image_size"] == 128
    # Extreme imbalance without empty masks -> dice; with many empty masks -> bce_dice.
    assert cr.recommend_config(_stats(mean_positive_ratio=0.01))[0]["loss"] == "dice"
    assert cr.recommend_config(_stats(mean_positive_ratio=0.01, empty_mask_fraction=0.3)
                               )[0]["loss"] == "bce_dice"
    # A big dataset gets more than 50 steps (one full pass), a tiny one batch 1.
    cfg, _ = cr.recommend_config(_stats(dataset_size=2000, objects_per_image=[1] * 2000))
    n_train = 2000 - round(2000 * cr.DEFAULT_VAL_FRACTION)
    assert cfg["batch_size"] == 16 and cfg["steps_per_epoch"] == math.ceil(n_train / 16)
    cfg, _ = cr.recommend_config(_stats(dataset_size=5, objects_per_image=[1, 2, 3, 4, 5]))
    assert cfg["batch_size"] == 1 and cfg["steps_per_epoch"] == 50


def test_recommended_config_is_what_the_trainer_loads(tmp_path):
    # What analysis writes, the trainer's --config loader accepts and applies; a key the
    # trainer does not know is rejected with the key and the file named.
    cfg, _ = cr.recommend_config(_stats())
    path = tmp_path / "recommended_config.json"
    mio.atomic_write_json(path, cfg)
    assert mcfg.read_options(path) == cfg
    trainer = pytest.importorskip("train_microbead_optimized")
    args = trainer.parse_args(["--config", str(path)])
    for key, value in cfg.items():
        assert getattr(args, key) == value, key
    bad = tmp_path / "edited.json"
    mio.atomic_write_json(bad, {**cfg, "learning_rate": 1e-3})
    with pytest.raises(mcfg.ConfigError, match=r"'learning_rate'") as exc:
        mcfg.read_options(bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(SystemExit) as exit_:
        trainer.parse_args(["--config", str(bad)])
    assert "'learning_rate'" in str(exit_.value) and str(bad) in str(exit_.value)


# --------------------------------------------------------------------------- end to end


def test_counts_match_masks_recomputed_independently(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    # Tile 0: three separate beads and a touching pair (4 components, 5 beads).
    centres = [(12, 12), (12, 50), (50, 12), (40, 40), (40, 51)]
    img, mask = _ring_pair(rng, centres)
    _write_pair(data, "640x_a", img, mask)
    for i in range(1, 5):
        img, mask = _ring_pair(rng, _layout(rng, i + 1))
        _write_pair(data, f"1280x_b{i}", img, mask)
    rc, out = _run(tmp_path, data, "--image_size", "64")
    assert rc == 0
    rows = {r["file"]: r for r in _read_csv(out / "per_image.csv")}
    expected_ratio, expected_n = [], []
    for f in sorted((data / "masks").iterdir()):
        m = cv2.imread(str(f), cv2.IMREAD_UNCHANGED) > 0
        n, _ = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        r = rows[f.name]
        assert int(r["n_objects"]) == n - 1
        assert float(r["positive_ratio"]) == pytest.approx(m.mean(), abs=1e-6)
        expected_ratio.append(m.mean())
        expected_n.append(n - 1)
    assert int(rows["640x_a.png"]["n_objects"]) == 4
    assert int(rows["640x_a.png"]["n_beads"]) == 5  # the touching pair is split
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset_size"] == 5
    assert s["mean_objects_per_image"] == pytest.approx(np.mean(expected_n))
    assert s["std_objects_per_image"] == pytest.approx(np.std(expected_n))
    assert s["mean_positive_ratio"] == pytest.approx(np.mean(expected_ratio))
    for key in ("dataset_size", "mean_positive_ratio", "std_positive_ratio",
                "mean_objects_per_image", "std_objects_per_image", "mean_object_size",
                "partial_mask_suspects", "partial_mask_ratio", "mean_brightness",
                "std_brightness"):
        assert key in s
    assert set(s["per_dilution"]) == {"640", "1280"}
    assert s["per_dilution"]["640"]["n_images"] == 1
    for name in ("sample_images.png", "distribution_analysis.png", "recommended_config.json",
                 "recommended_config_evidence.json", "integrity_problems.csv", "analysis.log"):
        assert (out / name).stat().st_size > 0
    report = (out / am.REPORT).read_text()
    assert "![distributions](distribution_analysis.png)" in report
    assert "![samples](sample_images.png)" in report
    assert f"{s['total_objects']} / {s['total_beads']}" in report


def test_statistics_are_at_the_training_size(tmp_path, no_figures):
    data = tmp_path / "data"
    _clean_dataset(data, n=4)
    rc, out = _run(tmp_path, data, "--image_size", "32")
    assert rc == 0
    for r in _read_csv(out / "per_image.csv"):
        raw = cv2.imread(str(data / "masks" / r["mask_file"]), cv2.IMREAD_UNCHANGED)
        small = cv2.resize((raw > 0).astype(np.uint8), (32, 32),
                           interpolation=cv2.INTER_NEAREST)
        assert float(r["positive_ratio"]) == pytest.approx(small.mean(), abs=1e-6)
        assert (int(r["native_width"]), int(r["native_height"])) == (64, 64)
    s = json.loads((out / "summary.json").read_text())
    assert s["analysis_image_size"] == 32 and s["native_sizes"] == {"64x64": 4}


def test_default_is_the_stored_size_and_the_trainers_flatfield(tmp_path, no_figures):
    data = tmp_path / "data"
    _clean_dataset(data, n=4)
    rc, out = _run(tmp_path, data)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["analysis_image_size"] == 64  # the stored 64-px tiles, as training uses
    report = (out / "MICROBEAD_ANALYSIS_RESULTS.md").read_text()
    assert "flat-field normalised like the trainer" in report
    assert "at 64 px (the stored tile size" in report
    assert "image percentile-normalised and resized" not in report and "dark rims" not in report


def test_no_faster_smaller_input_is_offered_when_beads_are_already_small():
    assert cr.smaller_input_note(608, 512).startswith("No smaller input size keeps beads")
    assert "608 (a faster" not in cr.smaller_input_note(608, 512)
    assert "256 (a faster, lower-resolution option)" in cr.smaller_input_note(256, 512)


def test_every_seeded_integrity_problem_is_reported_by_file_name(tmp_path, capsys, no_figures):
    data = tmp_path / "data"
    _clean_dataset(data, n=5)
    rng = np.random.default_rng(1)

    def pair():  # a fresh tile each time, so only the seeded copy is a duplicate
        return _ring_pair(rng, _layout(rng, 4))

    # corrupt image (with a valid mask)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    mio.write_mask(data / "masks" / "corrupt.png", pair()[1])
    # unpaired image / unpaired mask
    mio.write_image(data / "images" / "lonely.png", pair()[0])
    mio.write_mask(data / "masks" / "orphan.png", pair()[1])
    # 0/1 mask
    _write_pair(data, "zero_one", *pair(),
                mask_writer=lambda p, m: mio.write_image(p, m.astype(np.uint8)))
    # anti-aliased mask
    _write_pair(data, "smooth", *pair(),
                mask_writer=lambda p, m: mio.write_image(
                    p, cv2.GaussianBlur(m.astype(np.uint8) * 255, (5, 5), 1.5)))
    # size mismatch
    img, mask = pair()
    mio.write_image(data / "images" / "mismatch.png", img)
    mio.write_mask(data / "masks" / "mismatch.png", mask[:48, :48])
    # duplicate of a clean image, under another name
    shutil.copy(data / "images" / "160x_tile_00.png", data / "images" / "zz_copy.png")
    shutil.copy(data / "masks" / "160x_tile_00.png", data / "masks" / "zz_copy.png")
    # inverted image
    inv, inv_mask = _ring_pair(rng, _layout(rng, 4), inverted=True)
    _write_pair(data, "inverted", inv, inv_mask)
    # empty and nearly full masks
    img, mask = pair()
    _write_pair(data, "empty", img, np.zeros_like(mask))
    img, mask = pair()
    _write_pair(data, "full", img, np.ones_like(mask))
    # files list_images does not take: named as skipped, not silently ignored
    (data / "images" / "notes.txt").write_text("exposure 20 ms")
    (data / "images" / "raw_stack.czi").write_bytes(b"\0" * 16)
    (data / "masks" / "old").mkdir()
    (data / "images" / ".DS_Store").write_bytes(b"")  # hidden: not worth a line
    before = sorted(p.relative_to(data) for p in data.rglob("*"))

    rc, out = _run(tmp_path, data, "--strict")
    captured = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in captured.err + captured.out
    rows = _read_csv(out / "integrity_problems.csv")
    found = {(r["file"], r["problem"]) for r in rows}
    expected = {
        ("images/corrupt.png", di.UNREADABLE_IMAGE),
        ("images/lonely.png", di.UNPAIRED_IMAGE),
        ("masks/orphan.png", di.UNPAIRED_MASK),
        ("masks/zero_one.png", di.MASK_0_1),
        ("masks/smooth.png", di.MASK_ANTIALIASED),
        ("images/mismatch.png", di.SIZE_MISMATCH),
        ("images/zz_copy.png", di.DUPLICATE_IMAGE),
        ("images/inverted.png", di.INVERTED),
        ("masks/empty.png", di.EMPTY_MASK),
        ("masks/full.png", di.NEARLY_FULL_MASK),
        ("images/notes.txt", di.SKIPPED_FILE),
        ("images/raw_stack.czi", di.SKIPPED_FILE),
        ("masks/old", di.SKIPPED_FILE),
    }
    assert expected <= found, expected - found
    assert sum(r["problem"] == di.DUPLICATE_IMAGE for r in rows) == 1
    dup = next(r for r in rows if r["problem"] == di.DUPLICATE_IMAGE)
    assert "160x_tile_00.png" in dup["detail"]
    mism = next(r for r in rows if r["problem"] == di.SIZE_MISMATCH)
    assert "64x64" in mism["detail"] and "48x48" in mism["detail"]
    skipped = {r["file"]: r["detail"] for r in rows if r["problem"] == di.SKIPPED_FILE}
    assert set(skipped) == {"images/notes.txt", "images/raw_stack.czi", "masks/old"}
    assert ".czi" in skipped["images/raw_stack.czi"] and "folder" in skipped["masks/old"]
    # Clean tiles raise nothing; the two-level check does not misfire on 0/255 masks.
    assert not any("tile_0" in r["file"] and "copy" not in r["file"] for r in rows)
    # Each problem is named in the report table and in the log.
    report = (out / am.REPORT).read_text()
    log_text = (out / am.LOG_FILE).read_text()
    for f, code in expected:
        assert f"| {f} | {code} |" in report
        assert f"{f}: {code}" in log_text
    s = json.loads((out / "summary.json").read_text())
    assert s["mask_encoding_overall"] == "mixed"
    assert s["mask_encodings"]["0/1"] == 1
    # Readable files are still analysed (corrupt, mismatch and unpaired are not).
    analysed = {r["file"] for r in _read_csv(out / "per_image.csv")}
    assert {"zero_one.png", "smooth.png", "inverted.png", "zz_copy.png"} <= analysed
    assert not {"corrupt.png", "mismatch.png", "lonely.png"} & analysed
    # The data folder is untouched.
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    # Without --strict the unreadable/unpaired files still make the exit status 1.
    assert _run(tmp_path, data, out=tmp_path / "again")[0] == 1


def test_strict_passes_on_a_clean_dataset_and_warnings_fail_only_with_strict(tmp_path,
                                                                             no_figures):
    data = tmp_path / "data"
    _clean_dataset(data, n=4)
    assert _run(tmp_path, data, "--strict")[0] == 0
    assert _read_csv(tmp_path / "analysis" / "integrity_problems.csv") == []
    rng = np.random.default_rng(3)
    img, mask = _ring_pair(rng, _layout(rng, 3))
    _write_pair(data, "zero_one", img, mask,
                mask_writer=lambda p, m: mio.write_image(p, m.astype(np.uint8)))
    assert _run(tmp_path, data, out=tmp_path / "b")[0] == 0  # a warning only
    assert _run(tmp_path, data, "--strict", out=tmp_path / "c")[0] == 1


def test_missing_or_empty_data_is_one_line_error(tmp_path, capsys):
    rc, _ = _run(tmp_path, tmp_path / "nope")
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "Traceback" not in err
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    rc, _ = _run(tmp_path, tmp_path / "d", out=tmp_path / "out_d")
    err = capsys.readouterr().err
    assert rc == 2 and "no image/mask pair" in err and "Traceback" not in err
    (tmp_path / "e").mkdir()
    rc, out = _run(tmp_path, tmp_path / "e", out=tmp_path / "out_e")
    err = capsys.readouterr().err
    assert rc == 2 and "images: folder not found" in err
    assert "images: folder not found" in (out / am.LOG_FILE).read_text()  # in the run's log


def test_output_folder_policy(tmp_path, no_figures):
    data = tmp_path / "data"
    _clean_dataset(data, n=4)
    # Inside the data folder: refused, nothing written there.
    rc, _ = _run(tmp_path, data, out=data / "analysis")
    assert rc == 2 and not (data / "analysis").exists()
    # A folder holding a foreign summary.json: refused, file untouched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text("user data")
    assert _run(tmp_path, data, out=foreign)[0] == 2
    assert (foreign / "summary.json").read_text() == "user data"
    # ... even with --overwrite: files of our names but no manifest of ours are not ours.
    assert _run(tmp_path, data, "--overwrite", out=foreign)[0] == 2
    assert (foreign / "summary.json").read_text() == "user data"
    with pytest.raises(cli.OutputDirError, match="not written by"):  # cli's one class
        am.check_output_dir(foreign, data, overwrite=True)
    assert not hasattr(am, "OutputDirError")
    # A non-empty folder needs --overwrite; unrelated files survive, our outputs are replaced.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _run(tmp_path, data, out=mine)[0] == 2
    assert _run(tmp_path, data, "--overwrite", out=mine)[0] == 0
    assert json.loads((mine / am.MANIFEST).read_text())["generator"] == am.SCRIPT_NAME
    (mine / "summary.json").write_text("stale")
    assert _run(tmp_path, data, out=mine)[0] == 2
    assert _run(tmp_path, data, "--overwrite", out=mine)[0] == 0
    assert json.loads((mine / "summary.json").read_text())["dataset_size"] == 4
    assert (mine / "notes.txt").read_text() == "keep"


def test_sample_images_span_the_density_range(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i, n in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]):
        img, mask = _ring_pair(rng, _layout(rng, n, spacing=12))
        _write_pair(data, f"t{i}", img, mask)
    rc, out = _run(tmp_path, data)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["sample_images"]) == 8
    assert "t0.png" in s["sample_images"] and "t9.png" in s["sample_images"]


def test_runs_without_tensorflow(tmp_path):
    data = tmp_path / "data"
    _clean_dataset(data, n=3)
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'keras'):\n"
        "    sys.modules[m] = None  # any import of them now raises ImportError\n"
        "import analyze_microbead_dataset as a\n"
        f"rc = a.main(['--data_dir', {str(data)!r}, '--output_dir', "
        f"{str(tmp_path / 'out')!r}, '--no_progress'])\n"
        "sys.exit(rc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "summary.json").is_file()


# --------------------------------------------------------------------------- generator data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    gen = pytest.importorskip("synthetic_dataset")
    root = tmp_path_factory.mktemp("synthetic")
    gen.generate_dataset(root / "data", n=16, size=256, seed=0, log_file=False, style="rings")
    return root


def test_generator_counts_and_touching_bead_estimate(synthetic, tmp_path):
    data = synthetic / "data"
    rc, out = _run(tmp_path, data)
    assert rc == 0
    rows = {r["file"]: r for r in _read_csv(out / "per_image.csv")}
    truth = {r["file"]: r for r in _read_csv(data / "counts.csv")}
    assert set(rows) == set(truth) and len(rows) == 16
    n_obj, ratios = [], []
    for f in sorted((data / "masks").iterdir()):
        m = cv2.imread(str(f), cv2.IMREAD_UNCHANGED) > 0
        n, _ = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        row = next(r for r in rows.values() if r["mask_file"] == f.name)
        assert int(row["n_objects"]) == n - 1, f.name
        assert float(row["positive_ratio"]) == pytest.approx(m.mean(), abs=1e-6)
        n_obj.append(n - 1)
        ratios.append(m.mean())
    s = json.loads((out / "summary.json").read_text())
    assert s["mean_objects_per_image"] == pytest.approx(np.mean(n_obj))
    assert s["mean_positive_ratio"] == pytest.approx(np.mean(ratios))
    assert s["pixel_scale"] == pytest.approx(0.5)
    true_total = sum(int(r["n_beads"]) for r in truth.values())
    est_total = sum(int(r["n_beads"]) for r in rows.values())
    assert abs(est_total - true_total) <= 0.05 * true_total, (est_total, true_total)
    assert s["total_beads"] == est_total
    # Touching beads exist in this data, so the split count must exceed the component count.
    assert est_total > sum(n_obj)
    # Complete masks (with debris in the images) are not flagged en masse.
    assert s["partial_mask_suspects"] <= 0.1 * len(rows)
    cfg = json.loads((out / "recommended_config.json").read_text())
    assert set(cfg) <= mcfg.CONFIG_FILE_KEYS
    per_bin = np.histogram(n_obj, bins=cfg["density_bins"])[0]
    assert per_bin.sum() == 16 and per_bin.min() >= 2
    # The trainer accepts the file and stratifies into the same strata (imports no TF).
    trainer = pytest.importorskip("train_microbead_optimized")
    assert trainer.read_config_file(out / "recommended_config.json") == cfg
    strata = mm.density_strata(n_obj, cfg["density_bins"])
    assert sorted(np.bincount(strata).tolist()) == sorted(per_bin.tolist())


def test_mask_with_half_its_beads_erased_is_a_partial_suspect(synthetic, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic / "data", data)
    truth = sorted(_read_csv(data / "counts.csv"), key=lambda r: int(r["n_beads"]))
    victims = [r for r in truth if int(r["n_beads"]) >= 8][::4][:3]
    assert len(victims) == 3
    for r in victims:
        lab = mio.read_labels(data / "labels" / f"{r['stem']}.tif")
        ids = np.unique(lab[lab > 0])
        mio.write_mask(data / "masks" / f"{r['stem']}.png", np.isin(lab, ids[::2]))
    rc, out = _run(tmp_path, data)
    assert rc == 0
    rows = _read_csv(out / "per_image.csv")
    flagged = {r["file"] for r in rows if r["partial_mask_suspect"] == "1"}
    assert {r["file"] for r in victims} <= flagged
    assert len(flagged - {r["file"] for r in victims}) <= 1
    report = (out / am.REPORT).read_text()
    for r in victims:
        assert r["file"] in report


def test_figure_labels_keep_the_dilution_and_grid_position():
    assert af.short_tile_name("640x_2025-05-16_00-59-00_002_grid_r1_c1.png") == "640x r1 c1"
    assert af.short_tile_name("-0-59-00_grid_r3_c2.png") == "r3 c2"
    assert len(af.short_tile_name("x" * 60 + ".tif")) <= 28

"""Benchmark: leave-one-frame-out cross-validation on the users' real tiles.

For each source frame of ``../shared/real_tiles`` (7 frames, 49 tiles) a model is trained on
the other frames' tiles with the CPU recipe (``--preset cpu --models unet`` plus any
``--train_args``) and used to predict the held-out frame's tiles and, where a grid row's
columns are contiguous, that stitched row. Per frame it reports

* the bead count against the labels (connected components of the label masks);
* recall and precision of labelled bead centres: a labelled and a predicted centre match when
  they lie within ``--match_px`` (6) px, one-to-one (minimum total distance);
* false beads per megapixel (predicted beads with no labelled centre within reach);
* the same for a classical baseline a user might pick instead: luminance, minus a Gaussian
  background (sigma 15 px), smoothed at sigma 1, Otsu, one opening, distance watershed;
* ``pred_in_shared_label``: predicted beads beyond the first inside one label component (the
  users' masks merge touching beads), and the count error without them;
* false beads on the held-out tiles with every bead inpainted away (labelled beads and what
  the classical detector finds, grown 5 px), as found and with the right side darkened to
  45 % plus 1.5 grey levels of noise (the dark corners of the users' frames), per 3840x2160
  frame: with the model's object filter, without it, and for the classical baseline.

Also: CPU seconds to predict one 3840x2160 frame with each trained width, and whether the
scale check (``bead_area_ratio`` / ``scale_warning``) fires on any held-out tile.

Writes ``benchmarks/results/bench_real_cv<suffix>.json`` and prints a table. Asserts nothing.
Skips (exit 0 with a message) when the real tiles are absent.

Example
    python benchmarks/bench_real_cv.py --work /tmp/cv            # ~25 min on 2 CPU cores
    python benchmarks/bench_real_cv.py --work /tmp/cv --reuse    # re-score saved models
    python benchmarks/bench_real_cv.py --work /tmp/cv16 --train_args "--filters 16" --tag f16
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine_info  # noqa: E402

import bead_filter  # noqa: E402
import microbead_config as mcfg  # noqa: E402
import microbead_io as mio  # noqa: E402
import microbead_metrics as mm  # noqa: E402
import runtime  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "real_tiles"
MATCH_PX = 6.0
FRAME_SHAPE = (2160, 3840)


# ----------------------------------------------------------------------------- scoring


def centres(labels: np.ndarray) -> np.ndarray:
    """``(N, 2)`` float (row, col) centroids of labels 1..max (ids without pixels skipped)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    if n == 0:
        return np.zeros((0, 2))
    ids = np.arange(1, n + 1)
    c = np.array(ndimage.center_of_mass(np.ones(labels.shape), labels, ids), float)
    return c[np.isfinite(c).all(axis=1)]


def score(truth_mask: np.ndarray, pred_labels: np.ndarray, max_dist: float = MATCH_PX) -> dict:
    """Counts, recall, precision and false beads for one image (see module docstring).

    Labelled beads are the label mask's 8-connected components (what the users' detector
    marked; it merges touching beads, so on crowded frames one component can cover two
    beads and a prediction that splits them scores one unmatched bead).
    """
    comp = _components(truth_mask)
    t = centres(comp)
    p = centres(pred_labels)
    tm, pm = bead_filter.match_centres(t, p, max_dist)
    # Predicted beads beyond the first inside one label component: where the labels merged
    # touching beads (or the prediction split one), counted from the label side.
    if len(p):
        rc = np.clip(np.round(p).astype(int), 0, np.array(comp.shape) - 1)
        inside = comp[rc[:, 0], rc[:, 1]]
        _, per = np.unique(inside[inside > 0], return_counts=True)
        extra = int((per - 1).sum())
    else:
        extra = 0
    return {"n_true": int(len(t)), "n_pred": int(len(p)), "tp_true": int(tm.sum()),
            "tp_pred": int(pm.sum()), "fp": int((~pm).sum()), "fn": int((~tm).sum()),
            "area_mpx": truth_mask.size / 1e6, "pred_in_shared_label": extra}


def _components(mask: np.ndarray) -> np.ndarray:
    import cv2

    _, lab = cv2.connectedComponents((np.asarray(mask) > 0).astype(np.uint8), connectivity=8)
    return lab


def summarise(rows: list[dict]) -> dict:
    """Pooled scores of several images' :func:`score` rows."""
    s = {k: sum(r[k] for r in rows) for k in ("n_true", "n_pred", "tp_true", "tp_pred", "fp",
                                                "fn", "area_mpx", "pred_in_shared_label")}
    s["recall"] = s["tp_true"] / s["n_true"] if s["n_true"] else float("nan")
    s["precision"] = s["tp_pred"] / s["n_pred"] if s["n_pred"] else float("nan")
    s["count_error_pct"] = (100.0 * (s["n_pred"] - s["n_true"]) / s["n_true"]
                            if s["n_true"] else float("nan"))
    s["false_per_mpx"] = s["fp"] / s["area_mpx"] if s["area_mpx"] else float("nan")
    # The count error left when a label component holding several predicted beads counts
    # them all (merged labels): what the error would be if the labels had split them.
    s["count_error_merged_labels_pct"] = (
        100.0 * (s["n_pred"] - s["pred_in_shared_label"] - s["n_true"]) / s["n_true"]
        if s["n_true"] else float("nan"))
    return s


# ----------------------------------------------------------------------------- classical


def classical_labels(image: np.ndarray, *, bg_sigma: float = 15.0, smooth: float = 1.0
                     ) -> np.ndarray:
    """The baseline a user might pick: luminance minus Gaussian background, smoothed, Otsu,
    one opening, distance-transform watershed. ``image`` ``(H, W[, C])``; beads are dark."""
    import cv2
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    a = np.asarray(image, np.float32)
    lum = a if a.ndim == 2 else a[..., 0] if a.shape[-1] == 1 else mio.to_channels(a, 1)[..., 0]
    dark = ndimage.gaussian_filter(lum, bg_sigma) - lum
    dark = ndimage.gaussian_filter(dark, smooth)
    if float(dark.max() - dark.min()) <= 0:
        return np.zeros(lum.shape, np.int32)
    mask = (dark > threshold_otsu(dark)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    area = mm.estimate_bead_area([mask])
    return mm.label_beads(mask, median_area=area if area > 0 else None)


# ----------------------------------------------------------------------------- blanks


def blank_tile(image: np.ndarray, mask: np.ndarray, grow: int = 5) -> np.ndarray:
    """The tile with every bead inpainted away: labelled beads and what the classical
    detector finds (the labels miss faint beads), each grown by ``grow`` px (masks are
    shrunk and some sit a few px off), filled from their surroundings (OpenCV Telea)."""
    import cv2

    a = np.asarray(image, np.float32)
    found = classical_labels(a) > 0
    hole = ((np.asarray(mask) > 0) | found).astype(np.uint8)
    hole = cv2.dilate(hole, cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                      (2 * grow + 1, 2 * grow + 1)))
    u8 = np.clip(a, 0, 255).astype(np.uint8)
    chans = [u8] if u8.ndim == 2 else [u8[..., c] for c in range(u8.shape[-1])]
    out = [cv2.inpaint(c, hole, 2 * grow, cv2.INPAINT_TELEA) for c in chans]
    res = out[0] if u8.ndim == 2 else np.stack(out, -1)
    return res.astype(np.float32)


def dark_corner(image: np.ndarray, rng: np.random.Generator, floor: float = 0.45,
                noise: float = 1.5) -> np.ndarray:
    """Vignetting towards the right edge (light falls to ``floor``) plus sensor noise of
    constant absolute size (``noise`` grey levels): the dark side of the users' frames,
    where dividing by the background amplifies noise."""
    a = np.asarray(image, np.float32)
    h, w = a.shape[:2]
    ramp = 1.0 - (1.0 - floor) * np.linspace(0.0, 1.0, w) ** 1.5
    gain = np.broadcast_to(ramp[None, :], (h, w))
    gain = gain[..., None] if a.ndim == 3 else gain
    return np.clip(a * gain + rng.normal(0.0, noise, a.shape), 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- data layout


def frames_of(data: Path) -> dict[str, list[Path]]:
    """Source frame -> its tile paths (sorted), from the grid names."""
    out: dict[str, list[Path]] = {}
    for p in mio.list_images(data / "images"):
        out.setdefault(mio.frame_group(p.name), []).append(p)
    return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: _dilution(kv[0]))}


def _dilution(name: str) -> int:
    d = mio.parse_dilution(name)
    return d if d is not None else 0


def mask_path(data: Path, image: Path) -> Path:
    for ext in (".png", ".tif", ".tiff"):
        for cand in (data / "masks" / f"{image.stem}{ext}",
                     data / "masks" / f"{image.stem}_mask{ext}"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"no mask for {image}")


def row_runs(tiles: list[Path]) -> list[list[Path]]:
    """Runs of at least two tiles in one grid row with consecutive columns."""
    cells = {}
    for p in tiles:
        g = mio.grid_cell(p.name)
        if g:
            cells[(g[1], g[2])] = p
    runs: list[list[Path]] = []
    for r in sorted({rc[0] for rc in cells}):
        cols = sorted(c for rr, c in cells if rr == r)
        run = [cols[0]]
        for c in cols[1:] + [None]:
            if c is not None and c == run[-1] + 1:
                run.append(c)
                continue
            if len(run) > 1:
                runs.append([cells[(r, cc)] for cc in run])
            run = [c]
    return runs


def stitch(images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray,
                                                                        list[int]]:
    """A row image from horizontally overlapping tiles (overlap found from the pixels)."""
    import label_quality as lq

    xs = [0]
    for a, b in zip(images[:-1], images[1:]):
        hit = lq.find_overlap(a, b, side="right")
        w = hit[0] if hit else 0
        xs.append(xs[-1] + a.shape[1] - w)
    h, wt = images[0].shape[0], xs[-1] + images[-1].shape[1]
    img = np.zeros((h, wt) + images[0].shape[2:], images[0].dtype)
    msk = np.zeros((h, wt), np.uint8)
    for x, im, m in zip(xs, images, masks):
        img[:, x:x + im.shape[1]] = im
        # Each pixel keeps the mask of the tile that wrote it last, as the image does.
        msk[:, x:x + m.shape[1]] = m
    return img, msk, xs


# ----------------------------------------------------------------------------- train / predict


def train_fold(data: Path, held: str, frames: dict, work: Path, train_args: list[str],
               reuse: bool, calibrate_missing: bool = False, recalibrate: bool = False
               ) -> Path:
    """Train on every frame but ``held``; returns the run folder (reused when finished)."""
    fold = work / f"fold_{held}"
    run_file = fold / "run_dir.txt"
    if reuse and run_file.is_file():
        run = Path(run_file.read_text().strip())
        if (run / "training_summary.csv").is_file():
            if recalibrate or (calibrate_missing
                               and not (run / "calibration_unet.json").is_file()):
                # A run trained before the object filter (or before its current rules): the
                # trainer's own calibration on the run's own validation windows (weights
                # unchanged).
                import training_outputs

                training_outputs.recalibrate_run(run, fold / "data")
            return run
    ds = fold / "data"
    for sub in ("images", "masks"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    for name, tiles in frames.items():
        if name == held:
            continue
        for p in tiles:
            for src, sub in ((p, "images"), (mask_path(data, p), "masks")):
                dst = ds / sub / src.name
                if not dst.exists():
                    dst.symlink_to(src.resolve())
    cmd = [sys.executable, str(ROOT / "train_microbead_optimized.py"), "--data_dir", str(ds),
           "--output_dir", str(fold), "--preset", "cpu", "--models", "unet",
           "--run_dir_file", str(run_file), "--verbose", "0", *train_args]
    with open(fold / "train.log", "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"training fold {held} failed (rc {rc}); see {fold / 'train.log'}")
    return Path(run_file.read_text().strip())


class Predictor:
    """A trained run's model and config, predicting through ``predict_microscope``'s core."""

    def __init__(self, run: Path):
        import models
        import prediction as pm

        self.pm = pm
        model_path, cfg_path, _ = pm.resolve_model(str(run))
        self.cfg = mcfg.for_model(pm.read_run_config(cfg_path), mcfg.model_name_of(model_path))
        model = models.load_model(model_path)
        self.fn = pm.make_keras_predict_fn(model)
        pad = int(self.cfg["preprocessing"].get("pad_multiple", 16))
        self.pad = pad
        self.overlap, _ = pm.resolve_overlap(None, pm.network_depth(model, pad))

    def __call__(self, image: np.ndarray, tile: int = 1024) -> dict:
        colour = image if image.ndim == 3 and image.shape[-1] == 3 else None
        image = mio.to_channels(image, int(self.cfg["preprocessing"]["channels"]))
        return self.pm.predict_frame(image, self.fn, self.cfg, tile_size=tile,
                                     overlap=self.overlap, batch_size=4, colour=colour)


def frame_seconds(pred: Predictor, rng: np.random.Generator) -> float:
    """CPU wall seconds to predict one synthetic-looking 3840x2160 frame (second call)."""
    img = (rng.normal(106, 3, FRAME_SHAPE + (3,))).astype(np.float32)
    pred(img)
    t0 = time.perf_counter()
    pred(img)
    return time.perf_counter() - t0


def width_seconds(run: Path, widths, rng: np.random.Generator) -> dict:
    """CPU seconds of the network stage (preprocessing + tiled forward passes) for one
    3840x2160 frame with a U-Net of each base width, at ``run``'s scale and depth. The
    networks are untrained: the forward time does not depend on the weights, but their
    output is noise, so the bead split (the same for every width) is not timed."""
    import models
    import tiling

    pred = Predictor(run)
    depth = int(round(math.log2(pred.pad)))
    pre = pred.cfg["preprocessing"]
    img = rng.normal(106, 3, FRAME_SHAPE + (int(pre["channels"]),)).astype(np.float32)
    out = {}
    for w in widths:
        net = models.build_model("unet", (None, None, int(pre["channels"])),
                                 filters=int(w), depth=depth, dropout=0.0, batch_norm=True)
        fn = pred.pm.make_keras_predict_fn(net)

        def stage(fn=fn):
            x = pred.pm.preprocess_frame(img, pre)
            tiling.predict_tiled(x, fn, tile_size=1024, overlap=pred.overlap, batch_size=4,
                                 pad_multiple=pred.pad)

        stage()  # warm-up (graph tracing)
        t0 = time.perf_counter()
        stage()
        out[str(w)] = round(time.perf_counter() - t0, 2)
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder with images/ and masks/ (default: ../shared/real_tiles)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the folds")
    ap.add_argument("--train_args", default="", help="extra trainer flags (quoted)")
    ap.add_argument("--tag", default="", help="suffix of the results file and its label")
    ap.add_argument("--folds", default="",
                    help="comma-separated frame names or prefixes, in this order (default: all)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished fold runs")
    ap.add_argument("--calibrate_missing", action="store_true",
                    help="with --reuse: calibrate the object filter of runs trained without one "
                         "(training_outputs.recalibrate_run)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="with --reuse: calibrate every reused run's object filter again with "
                         "the current rules (training_outputs.recalibrate_run)")
    ap.add_argument("--match_px", type=float, default=MATCH_PX)
    ap.add_argument("--no_rows", action="store_true", help="skip the stitched rows")
    ap.add_argument("--time_frame", action="store_true",
                    help="also time one 3840x2160 frame per fold's model (first fold only)")
    ap.add_argument("--time_widths", default="",
                    help="also time one 3840x2160 frame with U-Nets of these base widths, "
                         "e.g. 8,16,32 (first fold's preprocessing)")
    ap.add_argument("--output", type=Path, default=None, help="results JSON path")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.configure_threads()  # OpenCV's pool bounded as the pipeline's entry points do
    if not (args.data / "images").is_dir():
        print(f"skipped: {args.data}/images not found (the users' real tiles are not here)")
        return 0
    frames = frames_of(args.data)

    wanted = [w for w in args.folds.split(",") if w]
    # In the order given (a prefix of a frame name is enough, e.g. 10240x).
    held_list = ([f for w in wanted for f in frames if f.startswith(w)] if wanted
                 else list(frames))
    args.work.mkdir(parents=True, exist_ok=True)
    train_args = shlex.split(args.train_args)
    results = {"data": str(args.data), "train_args": train_args, "match_px": args.match_px,
               "frames": {}, "rows": {}, "machine": machine_info(keras_backend=True)}
    rng = np.random.default_rng(0)
    for fi, held in enumerate(held_list):
        t0 = time.perf_counter()
        run = train_fold(args.data, held, frames, args.work, train_args, args.reuse,
                         args.calibrate_missing, args.recalibrate)
        train_s = time.perf_counter() - t0
        pred = Predictor(run)
        tiles = frames[held]
        model_rows, class_rows, warn = [], [], []
        imgs, msks = {}, {}
        for p in tiles:
            img = mio.read_image(p, 3)
            m = mio.read_mask(mask_path(args.data, p), warn=False)
            imgs[p], msks[p] = img, m
            res = pred(img)
            model_rows.append({"file": p.name, **score(m, res["labels"], args.match_px),
                               "bead_area_ratio": res["bead_area_ratio"],
                               "scale_warning": res["scale_warning"]})
            if res["scale_warning"]:
                warn.append(p.name)
            class_rows.append({"file": p.name, **score(m, classical_labels(img),
                                                       args.match_px)})
        blanks = {}
        for variant in ("inpainted", "inpainted_dark"):
            n_model = n_raw = n_class = 0
            area = 0.0
            for p in tiles:
                im = blank_tile(imgs[p], msks[p])
                if variant.endswith("dark"):
                    im = dark_corner(im, rng)
                res = pred(im)
                n_model += res["beads"]
                n_raw += res["beads"] + res.get("rejected", 0)
                n_class += int(classical_labels(im).max())
                area += im.shape[0] * im.shape[1] / 1e6
            frame_mpx = FRAME_SHAPE[0] * FRAME_SHAPE[1] / 1e6
            blanks[variant] = {
                "area_mpx": area, "model_false": n_model, "model_unfiltered_false": n_raw,
                "classical_false": n_class,
                "model_false_per_frame": n_model / area * frame_mpx,
                "model_unfiltered_false_per_frame": n_raw / area * frame_mpx,
                "classical_false_per_frame": n_class / area * frame_mpx}
        entry = {"run": str(run), "train_s": round(train_s, 1), "n_tiles": len(tiles),
                 "blanks": blanks,
                 "dilution": _dilution(held), "model": summarise(model_rows),
                 "classical": summarise(class_rows), "tiles": model_rows,
                 "scale_warnings": warn}
        if not args.no_rows:
            rows_out = []
            for run_tiles in row_runs(tiles):
                img, msk, _ = stitch([imgs[p] for p in run_tiles], [msks[p] for p in run_tiles])
                res = pred(img)
                rows_out.append({"tiles": [p.name for p in run_tiles],
                                 "model": summarise([score(msk, res["labels"], args.match_px)]),
                                 "classical": summarise([score(msk, classical_labels(img),
                                                               args.match_px)])})
            entry["rows"] = rows_out
        if args.time_frame and fi == 0:
            results["frame_predict_s"] = round(frame_seconds(pred, rng), 2)
        if args.time_widths and fi == 0:
            results["frame_predict_s_by_width"] = width_seconds(
                run, [int(w) for w in args.time_widths.split(",")], rng)
            print(f"CPU s of the network stage per 3840x2160 frame by base width: "
                  f"{results['frame_predict_s_by_width']}", flush=True)
        results["frames"][held] = entry
        m, c = entry["model"], entry["classical"]
        print(f"{held[:34]:34s} n={m['n_true']:5d} model: count {m['count_error_pct']:+6.1f}% "
              f"R {m['recall']:.3f} P {m['precision']:.3f} FP/MP {m['false_per_mpx']:6.1f} | "
              f"classical: count {c['count_error_pct']:+6.1f}% R {c['recall']:.3f} "
              f"P {c['precision']:.3f}  warn {len(warn)}", flush=True)
        for variant, bl in blanks.items():
            print(f"    {variant:15s} false beads per 3840x2160 frame: model "
                  f"{bl['model_false_per_frame']:.0f} (unfiltered "
                  f"{bl['model_unfiltered_false_per_frame']:.0f}), classical "
                  f"{bl['classical_false_per_frame']:.0f}", flush=True)
    results["pooled"] = {
        k: summarise([results["frames"][f][k] for f in results["frames"]])
        for k in ("model", "classical")}
    out = args.output or ROOT / "benchmarks" / "results" / (
        f"bench_real_cv{'_' + args.tag if args.tag else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    mio.atomic_write_json(out, mio.json_ready(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())

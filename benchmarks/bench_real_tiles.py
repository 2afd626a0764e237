"""Benchmark: the pipeline on data like the users' real tiles (and the older ring style).

For each synthetic style it generates 73 training tiles + 7 full 3840x2160 frames (one per
dilution, 160x-10240x, exact instance labels), trains the three models with ``--preset
cpu``, predicts every frame with each model through ``predict_microscope.main`` and scores
it against the exact truth, and measures:

* bead-count median relative error on the frames, object F1 at IoU 0.5, the dilution
  slope (log count vs log dilution; truth's slope beside it);
* tile-vs-frame agreement (microscope style): the users' grid tiles (column stride 475,
  rows at 0/549/1099/1648 px) cut from each frame, predicted alone, compared with the same
  pixels of the whole-frame prediction in the tile's interior (128-px border excluded);
* pixel Jaccard of each model on its validation tiles against the training masks and
  against the exact labels (they differ with ``--styles microscope+label_noise``, masks
  degraded like the users': shrunk, merged, faint beads dropped, some tiles offset);
* a classical baseline a user might pick instead (flat-field background division, Otsu
  threshold, distance-transform watershed; no learning): beads found (true beads matched at
  IoU >= 0.5) per dilution, all beads and touching beads, against the best model.

Prints a table and writes ``benchmarks/results/bench_real_tiles.json``. Asserts nothing.

Example
    python benchmarks/bench_real_tiles.py --work /tmp/bench_real   # ~25 min on 2 CPU cores
    python benchmarks/bench_real_tiles.py --work /tmp/bench_real --reuse  # skip training
    python benchmarks/bench_real_tiles.py --work /tmp/t --styles rings --models unet \
        --n_tiles 6 --n_frames 2 --frame_size 320 256 \
        --train_args "--filters 4 --depth 2 --epochs 1 --val_split frames"  # plumbing only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine_info  # noqa: E402

import microbead_config as mcfg  # noqa: E402
import microbead_io as mio  # noqa: E402
import microbead_metrics as mm  # noqa: E402
import runtime  # noqa: E402
from reporting import fmt  # noqa: E402

MODELS = ("unet", "attention_unet", "attention_resunet")
BORDER = 128


def classical_labels(image: np.ndarray, window: int = 65) -> np.ndarray:
    """Background division + Otsu + distance watershed: the no-learning baseline.

    ``image`` float ``(H, W, C)`` as read; beads are dark. Returns int32 labels.
    """
    from skimage.filters import threshold_otsu

    ratio = mio.flatfield_ratio(mio.to_channels(image, 1)[..., 0], window)
    dark = 1.0 - ratio
    mask = (dark > threshold_otsu(dark)).astype(np.uint8)
    area = mm.estimate_bead_area([mask])
    return mm.label_beads(mask, median_area=area if area > 0 else None)


def touching_ids(labels: np.ndarray) -> np.ndarray:
    """True instance ids whose 8-connected component holds more than one bead."""
    from scipy import ndimage

    fg = labels > 0
    comp, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    ids = labels[fg]
    comps = comp[fg]
    per_comp = {}
    for i, c in set(zip(ids.tolist(), comps.tolist())):
        per_comp.setdefault(c, set()).add(i)
    return np.array(sorted(i for s in per_comp.values() if len(s) > 1 for i in s), np.int64)


def found(true_labels, pred_labels, subset=None) -> tuple[int, int]:
    """(true beads matched at IoU >= 0.5, true beads), optionally within ``subset`` ids."""
    m = mm.match_instances(true_labels, pred_labels, iou_threshold=0.5)
    matched = np.asarray(m["matched_true"])
    if subset is None:
        return int(matched.size), int(m["n_true"])
    return int(np.isin(matched, subset).sum()), int(len(subset))


def tile_vs_frame(model, cfg: dict, image: np.ndarray, frame_mask: np.ndarray) -> float:
    """Pooled interior IoU of the users' grid tiles predicted alone vs in the frame."""
    import prediction as pm
    import synthetic_render as syn

    fn = pm.make_keras_predict_fn(model)
    inter = union = 0
    for row in range(syn.MICRO_GRID_ROWS):
        for col in (1, 3, 5):
            y0, x0 = syn.micro_tile_origin(row, col)
            tile = image[y0:y0 + 512, x0:x0 + 512]
            if tile.shape[:2] != (512, 512):
                continue
            res = pm.predict_frame(tile, fn, cfg, tile_size=2048, overlap=64, batch_size=1)
            a = res["mask"][BORDER:-BORDER, BORDER:-BORDER] > 0
            b = frame_mask[y0 + BORDER:y0 + 512 - BORDER, x0 + BORDER:x0 + 512 - BORDER] > 0
            inter += int((a & b).sum())
            union += int((a | b).sum())
    return inter / union if union else float("nan")


def val_tile_jaccards(run: Path, name: str, data: Path) -> dict:
    """Mean pixel Jaccard of the best model on its validation tiles, against the training
    masks (noisy with --label_noise) and against the exact instance labels."""
    import models as mdl
    import prediction as pm

    cfg = mcfg.read_run_config(run / mcfg.CONFIG_FILE)
    split = json.loads((run / "split.json").read_text())
    fn = pm.make_keras_predict_fn(mdl.load_model(run / f"best_{name}_model.hdf5"))
    vs_mask, vs_exact = [], []
    for f in split["val"]:
        img = mio.read_image(data / "images" / f, channels=int(cfg["preprocessing"]["channels"]))
        res = pm.predict_frame(img, fn, cfg, tile_size=2048, overlap=64, batch_size=1)
        pred = res["mask"] > 0
        stem = Path(f).stem
        for truth, out in ((mio.read_mask(data / "masks" / f"{stem}.png") > 0, vs_mask),
                           (mio.read_labels(data / "labels" / f"{stem}.tif") > 0, vs_exact)):
            union = (pred | truth).sum()
            out.append(float((pred & truth).sum() / union) if union else 1.0)
    return {"val_jaccard_vs_training_masks": float(np.mean(vs_mask)),
            "val_jaccard_vs_exact_labels": float(np.mean(vs_exact))}


def run_style(style: str, work: Path, models, reuse: bool, *, n_tiles: int = 73,
              n_frames: int = 7, frame_size=(3840, 2160), train_args=()) -> dict:
    """Generate, train, predict and score one synthetic ``style`` (see the module docstring).

    ``n_tiles``, ``n_frames``, ``frame_size`` and ``train_args`` (extra trainer flags after
    ``--preset cpu``) default to the benchmark's sizes; smaller ones are for smoke tests.
    """
    import evaluate_predictions
    import models as mdl
    import predict_microscope
    import synthetic_dataset as syn
    import train_microbead_optimized as tmo

    data = work / style / "data"
    base_style, _, variant = style.partition("+")
    t0 = time.perf_counter()
    if not (reuse and (data / "dataset.json").is_file()):
        syn.generate_dataset(data, n=n_tiles, seed=0, large=n_frames,
                             large_size=tuple(frame_size), style=base_style, overwrite=True,
                             label_noise=variant == "label_noise")
    gen_s = time.perf_counter() - t0
    run_file = work / style / "run_dir.txt"
    t0 = time.perf_counter()
    if not (reuse and run_file.is_file()):
        rc = tmo.main(["--data_dir", str(data), "--output_dir", str(work / style / "runs"),
                       "--models", ",".join(models), "--preset", "cpu",
                       "--run_dir_file", str(run_file), *train_args])
        if rc:
            raise SystemExit(f"training failed ({rc})")
    train_s = time.perf_counter() - t0
    run = Path(run_file.read_text().strip())
    summary = {r["model"]: r for r in mcfg.read_summary(run / mcfg.SUMMARY_FILE)}
    truth_rows = {r["stem"]: r for r in _csv(data / "large" / "counts.csv")}
    frames = sorted((data / "large" / "images").iterdir())
    dil = np.array([mio.parse_dilution(f.name) for f in frames], float)
    true_n = np.array([int(truth_rows[f.stem]["n_beads"]) for f in frames], float)
    out: dict = {"style": style, "generate_s": round(gen_s, 1), "train_s": round(train_s, 1),
                 "run_dir": str(run), "frames": [f.name for f in frames],
                 "true_beads": true_n.astype(int).tolist(),
                 "true_dilution_slope": _slope(dil, true_n),
                 "models": {}}
    cfg = mcfg.read_run_config(run / mcfg.CONFIG_FILE)
    for name in models:
        pred = work / style / f"pred_{name}"
        ev = work / style / f"eval_{name}"
        t0 = time.perf_counter()
        rc = predict_microscope.main(["--model", str(run / f"best_{name}_model.hdf5"),
                                      "--input_dir", str(data / "large" / "images"),
                                      "--output_dir", str(pred), "--no_figures",
                                      "--overwrite"])
        pred_s = time.perf_counter() - t0
        evaluate_predictions.main(["--pred_dir", str(pred), "--gt_dir",
                                   str(data / "large" / "masks"), "--gt_labels_dir",
                                   str(data / "large" / "labels"), "--output_dir", str(ev),
                                   "--no_progress", "--overwrite"])
        es = json.loads((ev / "summary.json").read_text())
        rows = {r["file"]: r for r in _csv(pred / "prediction_summary.csv")}
        n_pred = np.array([float(rows[f.name]["beads"]) for f in frames])
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(n_pred - true_n) / true_n
        res = {
            "best_val_jacard": float(summary[name]["best_val_jacard"]),
            "predict_rc": rc, "predict_s_per_frame": round(pred_s / len(frames), 2),
            "pred_beads": n_pred.astype(int).tolist(),
            "count_rel_error": [round(float(x), 4) for x in rel],
            "median_rel_count_error": float(np.median(rel)),
            "f1_at_0.5": float(es["objects"]["f1"]),
            "mean_pixel_jaccard": float(es["pixel"]["mean_per_image"]["jaccard"]),
            "dilution_slope": _slope(dil, n_pred),
        }
        res.update(val_tile_jaccards(run, name, data))
        res["label_ceiling"] = summary[name].get("label_ceiling")
        if base_style == "microscope":
            model = mdl.load_model(run / f"best_{name}_model.hdf5")
            ious = []
            for f in frames[::2]:
                img = mio.read_image(f, channels=int(cfg["preprocessing"]["channels"]))
                fm = mio.read_mask(pred / "masks" / f"{f.stem}_mask.png")
                ious.append(tile_vs_frame(model, cfg, img, fm))
            res["tile_vs_frame_interior_iou"] = [round(x, 4) for x in ious]
        out["models"][name] = res
        print(f"[{style}] {name}: median count error {100 * res['median_rel_count_error']:.2f} %,"
              f" F1@0.5 {res['f1_at_0.5']:.3f}, slope "
              f"{fmt(res['dilution_slope'], 3, style='fixed')}"
              + (f", tile-vs-frame IoU {min(res['tile_vs_frame_interior_iou']):.3f}-"
                 f"{max(res['tile_vs_frame_interior_iou']):.3f}"
                 if "tile_vs_frame_interior_iou" in res else ""), flush=True)

    best = max(models, key=lambda m: out["models"][m]["best_val_jacard"])
    base_rows = []
    for f in frames:
        truth = mio.read_labels(data / "large" / "labels" / f"{f.stem}.tif")
        touching = touching_ids(truth)
        unet = mio.read_labels(work / style / f"pred_{best}" / "labels" / f"{f.stem}_labels.tif")
        classic = classical_labels(mio.read_image(f, channels=3))
        u_all, n_all = found(truth, unet)
        c_all, _ = found(truth, classic)
        u_t, n_t = found(truth, unet, touching)
        c_t, _ = found(truth, classic, touching)
        base_rows.append({"frame": f.name, "dilution": int(mio.parse_dilution(f.name)),
                          "true": n_all, "unet_found": u_all, "classical_found": c_all,
                          "classical_count": int(classic.max()),
                          "true_touching": n_t, "unet_found_touching": u_t,
                          "classical_found_touching": c_t})
        print(f"[{style}] baseline {f.name[:12]}: true {n_all}, {best} found {u_all}, "
              f"classical {c_all}; touching {n_t}: {u_t} vs {c_t}", flush=True)
    out["baseline_vs_model"] = best
    out["baseline"] = base_rows
    return out


def _slope(dilutions, counts) -> float | None:
    """Slope of log10 count against log10 dilution (ideal -1); None without two frames of
    positive counts (a count of 0 has no logarithm)."""
    dilutions, counts = np.asarray(dilutions, float), np.asarray(counts, float)
    ok = counts > 0
    if ok.sum() < 2 or np.unique(dilutions[ok]).size < 2:
        return None
    return float(np.polyfit(np.log10(dilutions[ok]), np.log10(counts[ok]), 1)[0])


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bench_real_tiles", help="scratch folder")
    p.add_argument("--styles", default="microscope,rings",
                   help="comma-separated; 'microscope+label_noise' trains on masks degraded "
                        "like the users' and scores against the exact truth")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--reuse", action="store_true", help="reuse data and trained runs in --work")
    p.add_argument("--n_tiles", type=int, default=73, help="training tiles per style")
    p.add_argument("--n_frames", type=int, default=7,
                   help="full frames per style (dilutions: make_synthetic_dataset.large_dilutions)")
    p.add_argument("--frame_size", type=int, nargs=2, default=(3840, 2160), metavar=("W", "H"))
    p.add_argument("--train_args", default="",
                   help="extra trainer flags after --preset cpu (quoted), e.g. '--epochs 1'")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        "bench_real_tiles.json"))
    args = p.parse_args(argv)
    runtime.configure_threads()  # OpenCV's pool bounded as the pipeline's entry points do
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {"command": " ".join(["python", "benchmarks/bench_real_tiles.py"]
                                   + (argv if argv is not None else sys.argv[1:])),
               "machine": machine_info(keras_backend=True), "styles": {}}
    for style in args.styles.split(","):
        results["styles"][style] = run_style(
            style, work, args.models.split(","), args.reuse, n_tiles=args.n_tiles,
            n_frames=args.n_frames, frame_size=args.frame_size,
            train_args=shlex.split(args.train_args))
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: large-frame prediction speed, memory and count accuracy.

For each frame (3840x2160 by default): wall time of the full per-frame prediction
(read, normalise, tiled forward passes, blending, threshold, bead splitting, mask + label
files; figures optional), the time of ONE pure forward pass of the same model over the
whole model-scale frame (warm, as a single tensor), their ratio, the process's peak
resident memory, and the count error against the generator's ground truth.

Prints a table and writes JSON (``--out``). Asserts nothing about timing.

Example
    python benchmarks/bench_predict.py --model demo/runs/microbead_training_20261122_134729 \
        --frames demo/dataset_microscope/large
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(model_arg: str, frames_dir: Path, *, tile_size: int, overlap: int, batch_size: int,
          figures: bool, repeats: int) -> dict:
    import numpy as np

    import microbead_io as mio
    import models
    import predict_microscope as pm

    model_path, cfg_path, note = pm.resolve_model(model_arg)
    cfg = pm.read_run_config(cfg_path)
    pre = cfg["preprocessing"]
    pad = int(pre.get("pad_multiple", 16))
    model = models.load_model(model_path)
    predict_fn = pm.make_keras_predict_fn(model, batch_size)
    truth = {}
    counts_csv = frames_dir / "counts.csv"
    if counts_csv.is_file():
        with open(counts_csv, newline="") as fh:
            truth = {r["file"]: int(r["n_beads"]) for r in csv.DictReader(fh)}
    files = mio.list_images(frames_dir / "images")
    rss_before = peak_rss_mb()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for i, path in enumerate(files):
            image = mio.read_image(path, channels=int(pre["channels"]))
            x = pm.preprocess_frame(image, pre)
            h, w = x.shape[:2]
            ph, pw = -h % pad, -w % pad
            whole = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")[None]
            model.predict_on_batch(whole)  # warm-up / trace for this shape
            t = time.perf_counter()
            model.predict_on_batch(whole)
            forward = time.perf_counter() - t
            if i == 0:  # trace the tile shapes once
                pm.predict_frame(image, predict_fn, cfg, tile_size=tile_size, overlap=overlap,
                                 batch_size=batch_size)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                img = mio.read_image(path, channels=int(pre["channels"]))
                res = pm.predict_frame(img, predict_fn, cfg, tile_size=tile_size,
                                       overlap=overlap, batch_size=batch_size)
                mio.write_mask(out / f"{path.stem}_mask.png", res["mask"])
                mio.write_labels(out / f"{path.stem}_labels.tif", res["labels"])
                if figures:
                    gray = mio.normalize_image(img.mean(axis=-1))
                    ov = pm.overlay_image(gray, res["labels"])
                    mio.write_image(out / f"{path.stem}_overlay.png", ov)
                    mio.write_image(out / f"{path.stem}_comparison.png",
                                    pm.comparison_image(gray, res["prob"], ov))
                times.append(time.perf_counter() - t)
            wall = float(np.median(times))
            n_true = truth.get(path.name)
            rows.append({
                "file": path.name, "size": f"{image.shape[1]}x{image.shape[0]}",
                "model_input": f"{w}x{h}", "wall_s": round(wall, 3),
                "forward_s": round(forward, 3), "ratio": round(wall / forward, 3),
                "beads": res["beads"], "true_beads": n_true,
                "rel_count_error": (round(abs(res["beads"] - n_true) / max(n_true, 1), 5)
                                    if n_true is not None else None),
            })
    return {
        "model": str(model_path), "model_note": note,
        "tile_size": tile_size, "overlap": overlap, "batch_size": batch_size,
        "figures": figures, "repeats": repeats, "frames": rows,
        "median_wall_s": float(np.median([r["wall_s"] for r in rows])),
        "median_ratio": float(np.median([r["ratio"] for r in rows])),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_frames_mb": round(rss_before, 1),
    }


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "date": _dt.datetime.now().isoformat(timespec="seconds")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model file or training run folder")
    p.add_argument("--frames", default=None,
                   help="folder with images/ (+ counts.csv); default: generate 2 frames")
    p.add_argument("--tile_size", type=int, default=1024)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--figures", action="store_true", help="include overlay/comparison images")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_predict.json"))
    args = p.parse_args(argv)
    if args.frames:
        frames = Path(args.frames)
        result = bench(args.model, frames, tile_size=args.tile_size, overlap=args.overlap,
                       batch_size=args.batch_size, figures=args.figures, repeats=args.repeats)
    else:
        import make_synthetic_dataset

        with tempfile.TemporaryDirectory() as tmp:
            make_synthetic_dataset.generate_dataset(Path(tmp) / "d", n=1, large=2, seed=1)
            result = bench(args.model, Path(tmp) / "d" / "large", tile_size=args.tile_size,
                           overlap=args.overlap, batch_size=args.batch_size,
                           figures=args.figures, repeats=args.repeats)
    result["machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'file':<40}{'size':>11}{'wall s':>8}{'fwd s':>8}{'ratio':>7}{'beads':>7}"
          f"{'true':>7}")
    for r in result["frames"]:
        print(f"{r['file'][:40]:<40}{r['size']:>11}{r['wall_s']:>8.2f}{r['forward_s']:>8.2f}"
              f"{r['ratio']:>7.2f}{r['beads']:>7}{str(r['true_beads']):>7}")
    print(f"median wall {result['median_wall_s']:.2f} s/frame, median ratio to one forward pass "
          f"{result['median_ratio']:.2f}x, peak RSS {result['peak_rss_mb']:.0f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

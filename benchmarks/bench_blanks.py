"""Benchmark: false beads on blank frames (the limit of blank rests on these).

A blank frame holds no bead, only what real frames hold besides beads: debris, faint
out-of-focus smudges and specks (dense where the light is dim) and the background's
blotchy texture (``make_synthetic_dataset.py --blank_frames``, microscope style). Every
object the model reports there is a false bead and goes straight into LoB and LoD.

Generates ``--n`` blank frames (3840x2160 by default; or reads ``--frames DIR``), predicts
each with ``predict_microscope``'s own stages (``predict_frame``: normalise, tiled forward
passes, blend, threshold, bead splitting, with the run's ``config.json``) and reports false
beads per frame (median, max), per megapixel, and their areas. Issue 22 asks for a median
of <= 2 false beads per blank 3840x2160 frame over >= 5 frames.

Prints a table and writes JSON (``--out``). Asserts nothing.

Example
    python benchmarks/bench_blanks.py --model demo/runs/microbead_training_20261122_134729
    python benchmarks/bench_blanks.py --model RUN_DIR --frames demo/dataset_microscope/large
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import machine_info  # noqa: E402

import runtime  # noqa: E402
from reporting import fmt, md_table  # noqa: E402

#: ``--quick``: two small frames, for a smoke test of the plumbing (seconds).
QUICK_N, QUICK_SIZE = 2, (256, 192)


def blank_frames_dir(tmp: Path, n: int, size, seed: int) -> Path:
    """Write ``n`` blank microscope-style frames of ``size`` (W, H); returns the folder
    holding ``images/`` (the generator's ``large/``, as the demo's frames are)."""
    import synthetic_dataset as syn

    syn.generate_dataset(tmp / "blanks", n=1, seed=seed, blank_frames=n,
                         large_size=tuple(size), log_file=False)
    return tmp / "blanks" / "large"


def _frame_files(frames: Path) -> list[Path]:
    """Images under ``frames`` (or ``frames/images``); with the generator's ``counts.csv``
    beside them (e.g. the demo's ``large/``), only the frames it lists with 0 beads."""
    import csv

    import microbead_io as mio

    folder = frames / "images" if (frames / "images").is_dir() else frames
    files = mio.list_images(folder)
    counts = frames / "counts.csv"
    if counts.is_file():
        with open(counts, newline="") as fh:
            blank = {r["file"] for r in csv.DictReader(fh) if int(r["n_beads"]) == 0}
        files = [f for f in files if f.name in blank]
    if not files:
        raise SystemExit(f"error: {folder}: no blank images"
                         + (f" (none with n_beads 0 in {counts})" if counts.is_file() else ""))
    return files


def bench(model_arg: str, frames: Path, *, tile_size: int, overlap: int | None,
          batch_size: int) -> dict:
    """False beads of the model in ``model_arg`` on every image under ``frames``."""
    import numpy as np

    import microbead_config as mcfg
    import microbead_io as mio
    import models
    import prediction as pm

    model_path, cfg_path, note = pm.resolve_model(model_arg)
    # The model's own calibration (object filter, bead size), as predict_microscope uses it.
    cfg = mcfg.for_model(pm.read_run_config(cfg_path), mcfg.model_name_of(model_path))
    pre = cfg["preprocessing"]
    model = models.load_model(model_path)
    predict_fn = pm.make_keras_predict_fn(model)
    overlap, overlap_source = pm.resolve_overlap(
        overlap, pm.network_depth(model, int(pre.get("pad_multiple", 16))))
    rows = []
    for path in _frame_files(frames):
        image = mio.read_image(path, channels=int(pre["channels"]))
        colour = mio.read_image(path, channels=3) if pm.needs_colour(cfg) else None
        t = time.perf_counter()
        res = pm.predict_frame(image, predict_fn, cfg, tile_size=tile_size, overlap=overlap,
                               batch_size=batch_size, colour=colour)
        seconds = time.perf_counter() - t
        areas = np.bincount(res["labels"].ravel())[1:]
        areas = areas[areas > 0]
        megapixels = image.shape[0] * image.shape[1] / 1e6
        rows.append({
            "file": path.name, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "false_beads": int(res["beads"]),
            "rejected_by_filter": int(res.get("rejected", 0)),
            "false_beads_per_megapixel": round(res["beads"] / megapixels, 4),
            "false_pixels": int(res["mask"].sum()),
            "false_bead_area_px_p10_median_p90": (
                [float(v) for v in np.percentile(areas, [10, 50, 90]).round(1)]
                if areas.size else None),
            "predict_s": round(seconds, 3),
        })
    counts = np.array([r["false_beads"] for r in rows], dtype=float)
    per_mp = np.array([r["false_beads_per_megapixel"] for r in rows], dtype=float)
    return {
        "model": str(model_path), "model_note": note, "frames": str(frames),
        "n_frames": len(rows), "tile_size": tile_size, "overlap": overlap,
        "overlap_source": overlap_source,
        "threshold": float(cfg["postprocessing"]["threshold"]),
        "false_beads_median": float(np.median(counts)),
        "false_beads_max": int(counts.max()),
        "false_beads_mean": round(float(counts.mean()), 3),
        "object_filter": cfg["postprocessing"].get("object_filter"),
        "false_beads_without_filter_median": float(np.median(
            [r["false_beads"] + r["rejected_by_filter"] for r in rows])),
        "false_beads_per_megapixel_median": round(float(np.median(per_mp)), 4),
        # Issue 22's target is per 3840x2160 frame (8.29 MP); other sizes scale by area.
        "false_beads_per_3840x2160_median": round(float(np.median(per_mp)) * 3840 * 2160
                                                  / 1e6, 2),
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    import prediction

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="training run folder or model file (best_unet_model.hdf5 with its "
                        "config.json)")
    p.add_argument("--frames", default=None,
                   help="folder of blank frames (or one holding images/); default: generate "
                        "--n synthetic blank frames")
    p.add_argument("--n", type=int, default=5, help="blank frames to generate")
    p.add_argument("--frame_size", type=int, nargs=2, default=(3840, 2160),
                   metavar=("W", "H"), help="size of the generated frames")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated frames")
    p.add_argument("--tile_size", type=int, default=prediction.DEFAULT_TILE_SIZE,
                   help="default: predict_microscope.py's")
    p.add_argument("--overlap", type=int, default=None,
                   help="default: predict_microscope.py's (from the network depth)")
    p.add_argument("--batch_size", type=int, default=prediction.DEFAULT_BATCH_SIZE)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_N} frames of {QUICK_SIZE[0]}x{QUICK_SIZE[1]}")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_blanks.json"))
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.quick:
        args.n, args.frame_size = QUICK_N, QUICK_SIZE
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.configure_threads()  # OpenCV's pool bounded as the pipeline's entry points do
    with tempfile.TemporaryDirectory() as tmp:
        if args.frames:
            frames, source = Path(args.frames), f"--frames {args.frames}"
        else:
            frames = blank_frames_dir(Path(tmp), args.n, args.frame_size, args.seed)
            source = (f"{args.n} synthetic blank frames {args.frame_size[0]}x"
                      f"{args.frame_size[1]}, seed {args.seed} (make_synthetic_dataset."
                      "blank_frame: debris, smudges, specks, mottle)")
        result = bench(args.model, frames, tile_size=args.tile_size, overlap=args.overlap,
                       batch_size=args.batch_size)
    result.update(source=source, quick=bool(args.quick),
                  date=_dt.datetime.now().isoformat(timespec="seconds"),
                  machine=machine_info(keras_backend=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['n_frames']} blank frame(s) ({source}); model {result['model_note']}")
    print(md_table(
        ["file", "false beads", "per MP", "areas p10/med/p90 px"],
        [[r["file"], r["false_beads"], fmt(r["false_beads_per_megapixel"], 2, style="fixed"),
          "/".join(fmt(v, big=100) for v in r["false_bead_area_px_p10_median_p90"] or [])
          or "-"]
         for r in result["rows"]]))
    print(f"false beads per frame: median {result['false_beads_median']:g}, max "
          f"{result['false_beads_max']}; per 3840x2160 frame (median, area-scaled) "
          f"{result['false_beads_per_3840x2160_median']:g}. JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

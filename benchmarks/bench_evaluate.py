"""Benchmark of evaluate_predictions.py and the metrics it runs (no assertions on timing).

Builds synthetic truth/prediction mask pairs from random discs in a temporary folder (truth:
random discs, touching and overlapping ones included; prediction: the truth with discs
shifted, resized, dropped and false positives added), then times

* evaluating ``--n_images`` pairs of ``--size``^2 pixels end to end (``main()``), with and
  without figures;
* one 3840x2160 pair (``--frame_shape``) with about ``--n_beads`` beads of ~276 px (the
  native bead area): ``label_beads`` on each mask, ``object_metrics`` at 10 IoU thresholds,
  ``pixel_metrics``, and the whole ``main()`` on that pair.

Prints a table and writes ``benchmarks/results/bench_evaluate.json`` (``--output``) with the
machine facts of ``_common.machine_info``.

Example
-------
    python benchmarks/bench_evaluate.py --n_images 100 --size 256
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, load_average, machine_info  # puts the repository on sys.path

import evaluate_predictions as ev
import microbead_io as mio
import microbead_metrics as mm

log = logging.getLogger("microbead.bench_evaluate")


def random_pair(rng: np.random.Generator, shape, n_beads: int, radius: float):
    """Truth and prediction uint8 ``{0,1}`` masks of random discs (see module docstring)."""
    import cv2

    h, w = shape
    truth = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for _ in range(n_beads):
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        r = max(2, int(round(radius * rng.uniform(0.85, 1.15))))
        cv2.circle(truth, (cx, cy), r, 1, -1)
        if rng.random() < 0.93:  # 7 % missed
            dy, dx = rng.integers(-2, 3, 2)
            cv2.circle(pred, (cx + int(dx), cy + int(dy)), max(2, r + int(rng.integers(-1, 2))),
                       1, -1)
    for _ in range(max(1, n_beads // 20)):  # 5 % false positives
        cv2.circle(pred, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(radius), 1, -1)
    return truth, pred


def _timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def bench_folder(tmp: Path, rng, n_images: int, size: int) -> dict:
    gt, pred = tmp / "tiles_gt", tmp / "tiles_pred"
    gt.mkdir()
    pred.mkdir()
    # Tile scale: bead area ~69 px (276 native px at pixel_scale 0.5), 0-120 beads a tile.
    radius = float(np.sqrt(69 / np.pi))
    for i in range(n_images):
        t, p = random_pair(rng, (size, size), int(rng.integers(0, 121)), radius)
        mio.write_mask(gt / f"{(i % 4 + 1) * 80}x_tile_{i:03d}.png", t)
        mio.write_mask(pred / f"{(i % 4 + 1) * 80}x_tile_{i:03d}_mask.png", p)
    base = ["--pred_dir", str(pred), "--gt_dir", str(gt), "--no_progress"]
    rc1, t_fig = _timed(ev.main, base + ["--output_dir", str(tmp / "ev_tiles")])
    rc2, t_nofig = _timed(ev.main, base + ["--output_dir", str(tmp / "ev_tiles2"),
                                           "--no_figures"])
    s = json.loads((tmp / "ev_tiles" / ev.SUMMARY_NAME).read_text())
    return {
        "n_images": n_images, "size": size, "exit_codes": [rc1, rc2],
        "seconds_with_figures": round(t_fig, 3), "seconds_without_figures": round(t_nofig, 3),
        "ms_per_image_without_figures": round(1000 * t_nofig / n_images, 2),
        "true_beads": s["counts"]["true_total"], "mean_iou": s["pixel"]["mean_per_image"][
            "jaccard"], "f1_at_0.5": s["objects"]["f1"],
    }


def bench_frame(tmp: Path, rng, n_beads: int, shape=(2160, 3840)) -> dict:
    shape = tuple(int(v) for v in shape)
    radius = float(np.sqrt(276 / np.pi))
    truth, pred = random_pair(rng, shape, n_beads, radius)
    area, t_area = _timed(mm.estimate_bead_area, truth)
    lt, t_lt = _timed(mm.label_beads, truth, median_area=area)
    lp, t_lp = _timed(mm.label_beads, pred, median_area=area)
    res, t_obj = _timed(mm.object_metrics, lt, lp)
    _, t_px = _timed(mm.pixel_metrics, pred, truth)
    gt_dir, pred_dir = tmp / "frame_gt", tmp / "frame_pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    mio.write_mask(gt_dir / "640x_frame.png", truth)
    mio.write_mask(pred_dir / "640x_frame_mask.png", pred)
    base = ["--pred_dir", str(pred_dir), "--gt_dir", str(gt_dir), "--no_progress"]
    rc1, t_main = _timed(ev.main, base + ["--output_dir", str(tmp / "ev_frame")])
    rc2, t_main_nofig = _timed(ev.main, base + ["--output_dir", str(tmp / "ev_frame2"),
                                                "--no_figures"])
    return {
        "shape": list(shape), "beads_drawn": n_beads, "area_estimate": area,
        "true_instances": int(lt.max()), "pred_instances": int(lp.max()),
        "f1_at_0.5": res[0.5]["f1"], "exit_codes": [rc1, rc2],
        "seconds": {
            "estimate_bead_area": round(t_area, 3), "label_beads_truth": round(t_lt, 3),
            "label_beads_pred": round(t_lp, 3), "object_metrics_10_thresholds": round(t_obj, 3),
            "pixel_metrics": round(t_px, 4), "main_with_figures": round(t_main, 3),
            "main_without_figures": round(t_main_nofig, 3),
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_images", "--n-images", dest="n_images", type=int, default=100)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--n_beads", "--n-beads", dest="n_beads", type=int, default=3000,
                   help="beads drawn on the frame")
    p.add_argument("--frame_shape", "--frame-shape", dest="frame_shape", type=int, nargs=2,
                   default=[2160, 3840], metavar=("H", "W"),
                   help="height and width of the frame pair (small for a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(RESULTS / "bench_evaluate.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # evaluate_predictions logs its own lines to stderr
    try:
        return _bench(args)
    finally:
        log.removeHandler(handler)


def _bench(args: argparse.Namespace) -> int:
    machine = machine_info()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder = bench_folder(tmp, rng, args.n_images, args.size)
        frame = bench_frame(tmp, rng, args.n_beads, args.frame_shape)
    h, w = frame["shape"]
    result = {
        "benchmark": "evaluate_predictions",
        "machine": machine, "load_average_1min_at_end": load_average(),
        "tiles": folder, f"frame_{w}x{h}": frame,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    log.info("%d pairs of %d^2: %.2f s end to end (%.2f s without figures, %.1f ms/image)",
             folder["n_images"], folder["size"], folder["seconds_with_figures"],
             folder["seconds_without_figures"], folder["ms_per_image_without_figures"])
    fs = frame["seconds"]
    log.info("%dx%d pair, %d true / %d predicted beads:", w, h, frame["true_instances"],
             frame["pred_instances"])
    for k, v in fs.items():
        log.info("  %-30s %7.3f s", k, v)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: large-frame prediction speed, memory and count accuracy.

Runs ``prediction_pipeline.predict_files`` -- the code path of ``predict_microscope.py``:
tiled forward passes, blending, threshold, bead splitting, mask + label files (figures
optional) -- over a folder of frames (3840x2160 by default), both pipelined (the CLI
default: the next frame is read and the previous one finished while the current one is in
the network) and sequential, and reports seconds per frame for each, the time of ONE pure
forward pass of the same model over a whole model-scale frame (warm, as a single tensor;
sampled before and between the passes), their ratio, the peak resident memory of the
process and, on Linux, of the predictor alone (``predictor_peak_rss_mb``, measured before any
whole-frame tensor: the reference pass takes far more memory than the tiled predictor)
and the count error against the generator's ground truth. Works with any Keras backend
(``KERAS_BACKEND=jax`` on a GPU machine without TensorFlow).

Prints a table and writes JSON (``--out``). Asserts nothing about timing.

Example
    python benchmarks/bench_predict.py --model demo/runs/microbead_training_20261122_134729 \
        --frames demo/dataset_microscope/large
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class BenchError(Exception):
    """A benchmark input that cannot be measured; the message names the file."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(key: str) -> float | None:
    """``VmHWM`` / ``VmRSS`` of ``/proc/self/status`` in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> float | None:
    """Restart the kernel's peak-RSS count (``VmHWM``; Linux ``clear_refs`` 5) and return
    the RSS now, so that :func:`pass_peak_rss_mb` measures the predictor alone, not the
    whole-frame reference passes (one tensor of a 3840x2160 frame took ~3.6 GB more than
    the tiled predictor on the demo's UNet). None where that is not possible."""
    import runtime

    # Free heap pages go back to the OS first: glibc keeps what the whole-frame passes
    # freed, and that would count as the predictor's.
    runtime.release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_mb("VmRSS")


def pass_peak_rss_mb() -> float | None:
    """Peak RSS since :func:`reset_peak_rss` (None off Linux)."""
    return _proc_status_mb("VmHWM")


def bench(model_arg: str, frames_dir: Path, *, tile_size: int, overlap: int | None,
          batch_size: int, figures: bool, repeats: int, modes=("pipelined", "sequential"),
          workers: int | None = None, engine: str = "keras") -> dict:
    """Seconds per frame of each mode, one forward pass, peak RSS and counts (see module).

    ``overlap`` None: the CLI's default for the model (``prediction.resolve_overlap``).
    Raises :class:`BenchError` (no images, a frame that fails) and
    ``prediction.PredictionError`` (no model / config.json).
    """
    import numpy as np

    import microbead_config as mcfg
    import microbead_io as mio
    import models
    import prediction
    import prediction_pipeline

    model_path, cfg_path, note = prediction.resolve_model(model_arg)
    # The model's own calibration (object filter, bead size), as predict_microscope uses it.
    cfg = mcfg.for_model(prediction.read_run_config(cfg_path), mcfg.model_name_of(model_path))
    pre = cfg["preprocessing"]
    pad = int(pre.get("pad_multiple", 16))
    model = models.load_model(model_path)
    overlap, overlap_source = prediction.resolve_overlap(
        overlap, prediction.network_depth(model, pad))
    if engine == "onnxruntime":  # the network converted to ONNX, run by ONNX Runtime
        import onnx_engine

        predict_fn = onnx_engine.make_onnxruntime_predict_fn(
            onnx_engine.keras_to_onnx_session(model, channels=int(pre["channels"])))
    else:
        predict_fn = prediction.make_keras_predict_fn(model)
    truth = {}
    counts_csv = frames_dir / "counts.csv"
    if counts_csv.is_file():
        with open(counts_csv, newline="") as fh:
            truth = {r["file"]: int(r["n_beads"]) for r in csv.DictReader(fh)}
    files = mio.list_images(frames_dir / "images")
    if not files:
        raise BenchError(f"{frames_dir / 'images'}: no images")
    rss_before = peak_rss_mb()

    # Reference: ONE pure forward pass over each whole model-scale frame, as a single
    # tensor (warm: traced/compiled for that shape first). No reading, tiling, blending,
    # splitting or writing. Sampled once per frame before the passes and again after each
    # round of passes, so slow phases of a shared machine hit both sides of the ratio.
    wholes, model_input, sizes = [], {}, {}
    warm_shapes = set()
    for path in files:
        image = mio.read_image(path, channels=int(pre["channels"]))
        sizes[path.name] = f"{image.shape[1]}x{image.shape[0]}"
        x = prediction.preprocess_frame(image, pre)
        h, w = x.shape[:2]
        model_input[path.name] = f"{w}x{h}"
        whole = np.pad(x, ((0, -h % pad), (0, -w % pad), (0, 0)), mode="reflect")[None]
        if whole.shape not in warm_shapes:
            # A new shape's first calls are slow (tracing / compilation, allocator and
            # kernel caches): 3 untimed calls of the tiled predictor here, of the whole
            # frame below (after the memory passes: a whole-frame tensor's memory stays
            # with the process and would be counted as the predictor's).
            for _ in range(3):
                prediction.predict_frame(image, predict_fn, cfg, tile_size=tile_size,
                                         overlap=overlap, batch_size=batch_size)
            warm_shapes.add(whole.shape)
        wholes.append(whole)

    # One untimed pass of each mode over all frames: first-use costs (lazy imports in the
    # workers, allocator growth, first file writes) are paid once per process, like the
    # tracing above, and are not per-frame costs. Its peak RSS is the predictor's own
    # (nothing of the size of a whole-frame tensor has run yet): predictor_peak_rss_mb.
    predictor_rss: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / mode
            for sub in ("masks", "labels", "overlays", "comparisons"):
                (out / sub).mkdir(parents=True)
            have_reset = reset_peak_rss() is not None
            prediction_pipeline.predict_files(
                files, predict_fn, cfg, out, tile_size=tile_size, overlap=overlap,
                batch_size=batch_size, figures=figures, pipelined=mode == "pipelined",
                workers=workers)
            predictor_rss[mode] = pass_peak_rss_mb() if have_reset else None
    warm_shapes.clear()
    for whole in wholes:
        if whole.shape not in warm_shapes:
            for _ in range(3):
                predict_fn(whole)
            warm_shapes.add(whole.shape)

    forward: list[float] = []

    def sample_forward():
        for whole in wholes:
            t = time.perf_counter()
            np.asarray(predict_fn(whole))
            forward.append(time.perf_counter() - t)

    sample_forward()
    # The predictor itself: prediction_pipeline.predict_files, the code path of the CLI
    # (read, normalise, tiled forward passes, blend, threshold, split beads, write mask +
    # label files [+ figures]), over all frames; wall time per frame = pass time / frames.
    walls: dict[str, list[float]] = {m: [] for m in modes}
    pass_rss: dict[str, list[float]] = {m: [] for m in modes}
    rss_at_start: dict[str, list[float]] = {m: [] for m in modes}
    last_rows = {}
    for _ in range(repeats):
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                for sub in ("masks", "labels", "overlays", "comparisons"):
                    (out / sub).mkdir()
                start_rss = reset_peak_rss()
                t = time.perf_counter()
                rows = prediction_pipeline.predict_files(
                    files, predict_fn, cfg, out, tile_size=tile_size, overlap=overlap,
                    batch_size=batch_size, figures=figures, pipelined=mode == "pipelined",
                    workers=workers)
                walls[mode].append((time.perf_counter() - t) / len(files))
                if start_rss is not None:
                    pass_rss[mode].append(pass_peak_rss_mb())
                    rss_at_start[mode].append(start_rss)
            bad = [r["status"] for r in rows if r["status"] != "ok"]
            if bad:
                raise BenchError(f"prediction failed: {bad}")
            last_rows[mode] = rows
        sample_forward()
    forward_s = float(np.median(forward))
    passes = {m: {"s_per_frame": round(float(np.median(v)), 4),
                  "s_per_frame_all": [round(w, 4) for w in v],
                  "ratio": round(float(np.median(v)) / forward_s, 3),
                  # Peak RSS of the process in the untimed pass, before any whole-frame
                  # tensor: the predictor's memory (model and libraries included).
                  "predictor_peak_rss_mb": None if predictor_rss[m] is None
                  else round(predictor_rss[m], 1),
                  # Peak RSS in the timed passes: what the whole-frame reference passes
                  # left allocated (rss_at_pass_start_mb) is included.
                  "pass_peak_rss_mb": round(max(pass_rss[m]), 1) if pass_rss[m] else None,
                  "rss_at_pass_start_mb": round(max(rss_at_start[m]), 1)
                  if rss_at_start[m] else None}
              for m, v in walls.items()}
    rows_out = []
    for r in last_rows[modes[0]]:
        n_true = truth.get(r["file"])
        rows_out.append({
            "file": r["file"], "size": sizes[r["file"]], "model_input": model_input[r["file"]],
            "stage_time_s": r["time_s"], "beads": r["beads"], "true_beads": n_true,
            "rel_count_error": (round(abs(r["beads"] - n_true) / max(n_true, 1), 5)
                                if n_true is not None else None),
        })
    errors = [r["rel_count_error"] for r in rows_out if r["rel_count_error"] is not None]
    return {
        "model": str(model_path), "model_note": note,
        "keras_backend": __import__("keras").backend.backend(), "engine": engine,
        "tile_size": tile_size, "overlap": overlap, "overlap_source": overlap_source,
        "batch_size": batch_size,
        "figures": figures, "repeats": repeats, "n_frames": len(files),
        "workers": workers or prediction_pipeline.default_workers(),
        "forward_s": round(forward_s, 4),
        "forward_s_range": [round(min(forward), 4), round(max(forward), 4)],
        "modes": passes, "frames": rows_out,
        "s_per_frame": passes[modes[0]]["s_per_frame"],
        "ratio": passes[modes[0]]["ratio"],
        "median_rel_count_error": float(np.median(errors)) if errors else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_frames_mb": round(rss_before, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model file or training run folder")
    p.add_argument("--frames", default=None,
                   help="folder with images/ (+ counts.csv); default: generate 2 frames")
    import prediction

    p.add_argument("--tile_size", type=int, default=prediction.DEFAULT_TILE_SIZE,
                   help="default: predict_microscope.py's")
    p.add_argument("--overlap", type=int, default=None,
                   help="default: predict_microscope.py's (the network's receptive field)")
    p.add_argument("--batch_size", type=int, default=prediction.DEFAULT_BATCH_SIZE)
    p.add_argument("--figures", action="store_true", help="include overlay/comparison images")
    p.add_argument("--repeats", type=int, default=1, help="passes over all frames per mode")
    p.add_argument("--modes", default="pipelined,sequential",
                   help="comma-separated: pipelined (the CLI default) and/or sequential")
    p.add_argument("--workers", type=int, default=None,
                   help="pipeline threads per stage (default: predict_microscope's)")
    p.add_argument("--engine", choices=("keras", "onnxruntime"), default="keras",
                   help="run the network with Keras or, converted to ONNX, ONNX Runtime")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_predict.json"))
    args = p.parse_args(argv)
    try:
        result = _bench_frames(args)
    except (BenchError, prediction.PredictionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from _common import machine_info

    result["machine"] = machine_info(keras_backend=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print(result, args)
    return 0


def _bench_frames(args) -> dict:
    """:func:`bench` on ``--frames``, or on 2 generated 3840x2160 frames."""
    kw = dict(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
              figures=args.figures, repeats=args.repeats, modes=tuple(args.modes.split(",")),
              workers=args.workers, engine=args.engine)
    if args.frames:
        return bench(args.model, Path(args.frames), **kw)
    import synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_dataset.generate_dataset(Path(tmp) / "d", n=1, large=2, seed=1)
        return bench(args.model, Path(tmp) / "d" / "large", **kw)


def _print(result: dict, args) -> None:
    """The table on stdout."""
    print(f"engine {result['engine']}, Keras backend {result['keras_backend']}; "
          f"{result['n_frames']} frame(s), "
          f"{result['workers']} worker(s) per stage, figures {'on' if args.figures else 'off'}; "
          f"overlap {result['overlap']} px; one pure "
          f"forward pass over a whole frame: {result['forward_s']:.3f} s (median)")
    print(f"{'file':<44}{'size':>11}{'stage s':>9}{'beads':>7}{'true':>7}")
    for r in result["frames"]:
        print(f"{r['file'][:44]:<44}{r['size']:>11}{r['stage_time_s']:>9.2f}{r['beads']:>7}"
              f"{str(r['true_beads']):>7}")
    for mode, m in result["modes"].items():
        print(f"{mode:<11} {m['s_per_frame']:.3f} s/frame = {m['ratio']:.2f}x one forward pass")
    if result["median_rel_count_error"] is not None:
        print(f"median relative count error {100 * result['median_rel_count_error']:.2f} %")
    for mode, m in result["modes"].items():
        if m["predictor_peak_rss_mb"] is not None:
            print(f"{mode:<11} peak RSS of the predictor {m['predictor_peak_rss_mb']:.0f} MB; "
                  f"in the timed passes {m['pass_peak_rss_mb']:.0f} MB (whole-frame "
                  f"reference left {m['rss_at_pass_start_mb']:.0f} MB allocated)")
    print(f"peak RSS of the process {result['peak_rss_mb']:.0f} MB (whole-frame reference "
          f"passes included) -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())

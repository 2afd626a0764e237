"""Many frames: read, forward pass and finish overlapped on threads, one row per frame.

Purpose
    :func:`predict_files` is the code path of ``predict_microscope.py`` (and of
    ``benchmarks/bench_predict.py``): each frame is *loaded* (read, checked,
    ``prediction.preprocess_frame``), sent through the network (``tiling.predict_tiled``)
    and *finished* (``prediction.finish_frame`` + ``frame_outputs.write_outputs``), the
    stages of neighbouring frames overlapped. A frame that fails gets its error as the row's
    ``status``; the others are still processed. Nothing happens at import.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import microbead_io as mio
import prediction
import runtime
import tiling
from frame_outputs import write_outputs

log = logging.getLogger("microbead.predict")


#: Errors that fail one image (reported by name, the rest still processed).
FRAME_ERRORS = (mio.ImageReadError, OSError, ValueError, MemoryError)
#: Nice value added to the pipeline's worker threads (reading, bead splitting, writing).
#: On 2 cores this took a 3840x2160 frame from 0.97 to 0.86 s (tiles of 1024).
WORKER_NICE = 10


class _Inline:
    """Executor stand-in that runs each job at once (``pipelined=False``)."""

    def __init__(self, *_, **__):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # delivered by .result(), as a thread's would be
            fut.set_exception(exc)
        return fut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _lower_priority(nice: int) -> None:
    """Raise this worker thread's nice value (Linux: per thread), so that on a machine
    with few cores the network's threads win every contended core and the workers use
    the gaps; where that is not possible, nothing changes."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except (AttributeError, OSError):
        pass


def _base_row(path: Path) -> dict:
    return {"file": path.name, "dilution": mio.parse_dilution(path.name) or ""}


def _error_row(path: Path, exc: BaseException, seconds: float) -> dict:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if path.name not in msg:
        msg = f"{path}: {msg}"
    return {**_base_row(path), "status": msg, "time_s": round(seconds, 3)}


def predict_files(files, predict_fn, cfg: dict, out_dir: Path, *, tile_size: int,
                  overlap: int, batch_size: int, threshold: float | None = None,
                  save_prob: bool = False, figures: bool = True, pipelined: bool = True,
                  workers: int | None = None, on_row=None,
                  exports: frozenset[str] = frozenset(), auto_scale: bool = False
                  ) -> list[dict]:
    """Predict every file and write its outputs; one summary row per file, in input order.

    Three stages per frame: *load* (read + ``prediction.preprocess_frame``), *forward*
    (``tiling.predict_tiled`` with ``predict_fn``, on the calling thread) and *finish*
    (``prediction.finish_frame`` + ``frame_outputs.write_outputs``). With ``pipelined`` the
    next frames are loaded and the previous ones finished on worker threads while the
    current frame's tiles go through the network, so file I/O and bead splitting hide
    behind the forward passes.
    ``workers`` threads load and one more finish (default :func:`default_workers`: 1 on a
    2-core machine; on a GPU node, where a forward pass takes milliseconds, up to 8 frames
    are read and 9 finished at once). The workers run at a lower CPU priority
    (:data:`WORKER_NICE`) and OpenCV runs single-threaded meanwhile: on a machine with few
    cores the network keeps its cores and the workers fill the gaps, instead of every stage
    slowing the others. Only the first frame, which the network waits for with nothing
    else to do, is normalised on every usable CPU (``prediction.preprocess_frame``'s row
    strips; the same values). Frames are read at most ``workers`` ahead and at most
    ``workers + 1`` are being finished, so memory stays bounded by ``2 * workers + 2``
    frames, never by the number of files; after each finished frame the C heap's free pages
    go back to the system (``runtime.release_free_memory``). A frame that fails in any stage
    gets its error (naming the file) as ``status``; the others are still processed.

    ``time_s`` in a row is the sum of that frame's own stage times (they overlap with
    neighbouring frames, so the rows add up to more than the wall time). ``on_row(row)`` is
    called as each row completes (progress bars).

    Every row carries ``bead_area_ratio`` and, outside ``prediction.SCALE_RATIO_RANGE``, a
    ``scale_warning``. With ``auto_scale`` such a frame is preprocessed again at the scale
    ``prediction.auto_scale_factor`` decides (``scale_used``) and predicted once more.
    """
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    pre = cfg["preprocessing"]
    channels, pad = int(pre["channels"]), int(pre.get("pad_multiple", 16))
    files = [Path(f) for f in files]
    rows: list[dict | None] = [None] * len(files)

    def load(path, threads=1):
        t = time.perf_counter()
        image = mio.read_image(path, channels=channels)
        prediction.check_size(image, path, pre)
        prediction.check_usable(image, path)
        return (image, prediction.preprocess_frame(image, pre, threads),
                time.perf_counter() - t)

    def tiled(x):
        return tiling.predict_tiled(x, predict_fn, tile_size=tile_size, overlap=overlap,
                                    batch_size=batch_size, pad_multiple=pad)

    use_colour = prediction.needs_colour(cfg)

    def colour_of(path, image):
        # The network may see luminance; the colour bound needs the frame's RGB, read again
        # (only when the run's filter has that bound).
        if not use_colour:
            return None
        return image if image.shape[-1] == 3 else mio.read_image(path, channels=3)

    def forward(image, x, path):
        """``(prob, scale, x, colour)``; ``colour`` is the RGB frame when the --auto_scale
        decision already read it (None otherwise: the finisher reads it if needed)."""
        prob = tiled(x)
        scale = float(pre["scale"])
        colour = colour_of(path, image) if auto_scale else None
        factor = prediction.auto_scale_factor(
            prob, cfg, threshold, image_small=x, colour=colour) if auto_scale else None
        if factor is not None:
            scale *= factor
            x = prediction.preprocess_frame(image, {**pre, "scale": scale})
            prob = tiled(x)
        return prob, scale, x, colour

    notes: dict[int, list] = {}  # frame index -> its log lines, logged by done() in order

    def finish(i, path, image, fwd, seconds):
        prob_small, scale, x_small, colour = fwd
        t = time.perf_counter()
        try:
            used = prediction.config_at_scale(cfg, scale)
            if colour is None:
                colour = colour_of(path, image)
            res = prediction.finish_frame(prob_small, image.shape, used, threshold,
                                          image_small=x_small, colour=colour)
            write_outputs(out_dir, path.stem, image, res, save_prob=save_prob, figures=figures,
                          exports=exports)
        except FRAME_ERRORS as exc:
            return _error_row(path, exc, seconds + time.perf_counter() - t)
        finally:
            colour = None  # this frame's own arrays go before the heap is trimmed below
        dt = seconds + time.perf_counter() - t
        notes[i] = [(logging.INFO, "%s: %d beads (area estimate %.1f), %.2f%% coverage, "
                     "%.2f s", (path.name, res["beads"], res["area_estimate"],
                                res["coverage_pct"], dt))]
        if res["scale_warning"]:
            notes[i].append((logging.WARNING, "%s: %s%s", (
                path.name, res["scale_warning"],
                f" (auto-scaled: model scale {scale:.4g})" if scale != pre["scale"] else "")))
        row = {
            **_base_row(path), "width": image.shape[1], "height": image.shape[0],
            "beads": res["beads"], "n_components": res["n_components"],
            "coverage_pct": round(res["coverage_pct"], 4),
            "mean_bead_area_px": round(res["mean_bead_area_px"], 2),
            "area_estimate": round(res["area_estimate"], 2),
            "bead_area_ratio": round(res["bead_area_ratio"], 3),
            "scale_used": round(scale, 6), "scale_warning": res["scale_warning"],
            "rejected_objects": res["rejected"],
            "time_s": round(dt, 3),
            "status": "ok",
        }
        del res
        runtime.release_free_memory()
        return row

    def done(i, row):
        # Logged here, in input order (finishers may complete out of order).
        failed = [(logging.ERROR, "%s", (row["status"],))] if row["status"] != "ok" else []
        for level, fmt, args in notes.pop(i, failed):
            log.log(level, fmt, *args)
        rows[i] = row
        if on_row is not None:
            on_row(row)

    n = max(1, int(workers or default_workers())) if pipelined else 1
    pool = ThreadPoolExecutor if pipelined else _Inline
    cv2_threads = cv2.getNumThreads()
    if pipelined:  # the stages are the parallelism; OpenCV's own pool would oversubscribe
        cv2.setNumThreads(1)
    try:
        # One finisher more than loaders: finishing a frame costs more than loading one,
        # and the frames still waiting when the network is done with the last one (on 2
        # cores the low-priority finishers fall behind while it runs) are then finished
        # side by side instead of one after the other.
        with pool(n, thread_name_prefix="mb-load", initializer=_lower_priority,
                  initargs=(WORKER_NICE,)) as loader, \
                pool(n + 1, thread_name_prefix="mb-finish", initializer=_lower_priority,
                     initargs=(WORKER_NICE,)) as finisher:
            # Nothing runs beside the first frame's load (the network waits for it): its
            # normalisation gets every usable CPU (prediction.preprocess_frame's strips).
            first = functools.partial(load, threads=runtime.usable_cpus() if pipelined else 1)
            _schedule(files, loader, load, forward, finisher, finish, done, ahead=n,
                      load_first=first)
    finally:
        cv2.setNumThreads(cv2_threads)
    return rows


def default_workers() -> int:
    """Load and finish threads each: half the CPUs this process may use, 1 to 8 (1 on a
    2-core machine, where the network needs both cores). On an H100 node with 16 CPUs,
    figures on, 4 workers gave 0.42 s/frame and 8 gave 0.24 s/frame. CPUs as
    :func:`runtime.usable_cpus` counts them (affinity, ``NCPUS``, ``OMP_NUM_THREADS``)."""
    return max(1, min(8, runtime.usable_cpus() // 2))


def _schedule(files, loader, load, forward, finisher, finish, done, ahead: int = 1,
              load_first=None) -> None:
    """Run ``load`` on ``loader`` ``ahead`` frames ahead, ``forward`` here, ``finish`` on
    ``finisher`` (at most ``ahead + 1`` frames queued or running while frames still come,
    ``ahead + 2`` once the last one is past the network: nothing is loaded or sent through
    the network any more, and its finishing need not wait for the others);
    ``done(i, row)`` in input order. ``load_first`` (default ``load``) loads the first
    frame."""
    loads: list = []  # read futures of the frames not yet taken, in input order
    finishing: list = []

    def drain(keep: int):
        while len(finishing) > keep:
            i, fut = finishing.pop(0)
            done(i, fut.result())

    n_read = 0

    def read_up_to(last: int):  # submit reads of frames up to index ``last``
        nonlocal n_read
        while n_read <= min(last, len(files) - 1):
            loads.append(loader.submit(load_first if n_read == 0 and load_first else load,
                                       files[n_read]))
            n_read += 1

    try:
        for i, path in enumerate(files):
            read_up_to(i + ahead)  # the next frames are read while this one is in the network
            fut = loads.pop(0)
            seconds = 0.0
            try:
                image, x, seconds = fut.result()
                t = time.perf_counter()
                prob_small = forward(image, x, path)
                seconds += time.perf_counter() - t
            except FRAME_ERRORS as exc:
                drain(0)  # keep rows and log lines in input order
                done(i, _error_row(path, exc, seconds))
                continue
            del x
            last = i == len(files) - 1
            if not last:  # bounded memory while frames still come; the last one goes at once
                drain(ahead)
            finishing.append((i, finisher.submit(finish, i, path, image, prob_small, seconds)))
    except KeyboardInterrupt:
        drain(0)  # frames already past the network are finished and reported (Ctrl-C)
        raise
    drain(0)

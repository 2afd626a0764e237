"""Benchmark the segmentation architectures: parameters and images per second.

For each architecture in ``models.MODELS`` and each base width (default 64 and 16) the
model is built at ``--size`` x ``--size`` x 1, and the script measures

- ``forward``: ``model.predict_on_batch`` (inference, no gradients),
- ``train``: ``model.train_on_batch`` (forward + backward + Adam update, ``bce_dice`` loss,
  compiled with ``models.compile_model``),

on one random batch of ``--batch-size`` images. The first call of each (graph tracing /
XLA compilation) is a warm-up and is not timed; timed calls repeat until ``--min-time``
seconds have been spent or ``--max-repeats`` calls are done (at least one), so the slow
64-filter models get few repeats and the whole run stays within a few minutes on 2 CPU
cores. Throughput is ``batch_size / median(seconds per call)``; process CPU seconds per image
are recorded too, as they depend less on other processes sharing the cores. Timings depend
on whatever else runs on the machine; nothing here is asserted.

Inputs: none (synthetic data). Outputs: a table on stdout and a JSON file (``--out``) with
one record per (architecture, filters) plus the environment
(``_common.machine_info``: machine, versions, CPUs, load).

Example
-------
    python benchmarks/bench_models.py --out benchmarks/results/bench_models.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from _common import machine_info  # puts the repository on sys.path

import runtime

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_models.json"

logger = logging.getLogger("microbead.bench_models")


def time_calls(fn, *, min_time: float, max_repeats: int) -> tuple[list[float], list[float]]:
    """Call ``fn()`` once untimed, then time calls until ``min_time`` or ``max_repeats``.

    Parameters
    ----------
    fn : callable
        Zero-argument callable; it must block until its work is done.
    min_time : float
        Stop once the timed calls add up to at least this many wall-clock seconds.
    max_repeats : int
        Upper bound on timed calls (at least one is always made).

    Returns
    -------
    wall, cpu : list of float
        Wall-clock and process CPU seconds (all threads) per timed call, each of length in
        ``[1, max_repeats]``. CPU seconds are less sensitive than wall time to other
        processes sharing the cores.
    """
    fn()  # warm-up: tracing / compilation
    wall: list[float] = []
    cpu: list[float] = []
    while not wall or (sum(wall) < min_time and len(wall) < max_repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def bench_one(arch: str, filters: int, *, size: int, batch_size: int, min_time: float,
              max_repeats: int, jit_compile, depth: int | None = None) -> dict:
    """Parameter count and forward / training throughput of one architecture.

    Returns
    -------
    dict
        ``arch, filters, params, forward_img_s, train_img_s`` (wall clock, median),
        ``forward_cpu_s_per_img, train_cpu_s_per_img`` (process CPU seconds per image,
        median) and ``forward_s, train_s`` (wall seconds of each timed call).
    """
    import keras
    import numpy as np

    import models

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, size, size, 1), dtype=np.float32)
    y = (rng.random((batch_size, size, size, 1)) > 0.8).astype(np.float32)
    kwargs = {"filters": filters} if depth is None else {"filters": filters, "depth": depth}
    model = models.build_model(arch, (size, size, 1), **kwargs)
    models.compile_model(model, loss="bce_dice", jit_compile=jit_compile)
    forward, forward_cpu = time_calls(lambda: model.predict_on_batch(x), min_time=min_time,
                                      max_repeats=max_repeats)
    train, train_cpu = time_calls(lambda: model.train_on_batch(x, y), min_time=min_time,
                                  max_repeats=max_repeats)
    record = {
        "arch": arch,
        "filters": filters,
        "params": int(model.count_params()),
        "forward_img_s": batch_size / statistics.median(forward),
        "train_img_s": batch_size / statistics.median(train),
        "forward_cpu_s_per_img": statistics.median(forward_cpu) / batch_size,
        "train_cpu_s_per_img": statistics.median(train_cpu) / batch_size,
        "forward_s": [round(t, 4) for t in forward],
        "train_s": [round(t, 4) for t in train],
    }
    keras.backend.clear_session()
    return record


def format_table(records: list[dict]) -> str:
    """Markdown table of the benchmark records (``reporting.md_table``)."""
    from reporting import fmt, md_table

    return md_table(
        ["architecture", "filters", "params", "forward img/s", "train img/s",
         "fwd cpu s/img", "train cpu s/img", "repeats"],
        [[r["arch"], r["filters"], f"{r['params']:,}",
          fmt(r["forward_img_s"], 2, style="fixed"), fmt(r["train_img_s"], 2, style="fixed"),
          fmt(r["forward_cpu_s_per_img"], 3, style="fixed"),
          fmt(r["train_cpu_s_per_img"], 3, style="fixed"),
          f"{len(r['forward_s'])}/{len(r['train_s'])}"] for r in records])


def _jit(value: str):
    choices = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return choices[value.lower()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="architectures (default: all of models.MODELS)")
    parser.add_argument("--filters", nargs="+", type=int, default=[64, 16],
                        help="base widths to benchmark (default: 64 16)")
    parser.add_argument("--size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--depth", type=int, default=None,
                        help="encoder levels (default: each architecture's own)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--min_time", "--min-time", type=float, default=10.0,
                        help="seconds of timed calls per measurement before stopping")
    parser.add_argument("--max_repeats", "--max-repeats", type=int, default=5)
    parser.add_argument("--jit_compile", "--jit-compile", type=_jit, default="auto",
                        help="auto (as the trainer compiles), true or false")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_repeats < 1 or args.size < 1:
        parser.error("--batch_size, --max_repeats and --size must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.configure_threads()  # OpenCV's pool bounded as the pipeline's entry points do
    with runtime.script_logging():  # stderr, under the "microbead" logger
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    import models

    archs = args.models or list(models.MODELS)
    unknown = [a for a in archs if a not in models.MODELS]
    if unknown:
        logger.error("unknown model(s) %s; valid names: %s", ", ".join(unknown),
                     ", ".join(models.MODELS))
        return 2

    records = []
    for filters in args.filters:
        for arch in archs:
            logger.info("benchmarking %s, %d filters, batch %d at %dx%d", arch, filters,
                        args.batch_size, args.size, args.size)
            records.append(bench_one(arch, filters, size=args.size,
                                     batch_size=args.batch_size, min_time=args.min_time,
                                     max_repeats=args.max_repeats,
                                     jit_compile=args.jit_compile, depth=args.depth))
            logger.info("%s/%d: %.2f img/s forward, %.2f img/s train", arch, filters,
                        records[-1]["forward_img_s"], records[-1]["train_img_s"])

    result = {
        "settings": {"size": args.size, "depth": args.depth, "channels": 1,
                     "batch_size": args.batch_size,
                     "min_time_s": args.min_time, "max_repeats": args.max_repeats,
                     "jit_compile": args.jit_compile, "loss": "bce_dice",
                     "forward": "predict_on_batch", "train": "train_on_batch"},
        "environment": machine_info(keras_backend=True),
        "results": records,
    }
    print(format_table(records))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

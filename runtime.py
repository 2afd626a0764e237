"""Process-wide settings every entry point makes explicitly: CPU policy and logging.

Nothing here runs at import. An entry point calls :func:`configure_threads` once after
parsing its arguments, and brackets its work with :func:`script_logging` (or
:func:`add_log_handler` / :func:`remove_log_handlers` where the log file is only known
later), so that importing a module never changes the process.

Example
-------
>>> import runtime
>>> runtime.usable_cpus() >= 1
True
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def usable_cpus() -> int:
    """CPUs this process should use: the smallest of its CPU affinity, ``NCPUS`` (PBS) and
    ``OMP_NUM_THREADS``, at least 1.

    ``os.cpu_count()`` is the whole node: on a PBS node shared by several jobs, as many
    OpenCV threads as cores oversubscribe the allocation (and slow every job on it).
    Unset, empty or non-positive variables are ignored.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    for var in ("NCPUS", "OMP_NUM_THREADS"):
        try:
            v = int(os.environ.get(var, "").strip() or 0)
        except ValueError:
            v = 0
        if v > 0:
            n = min(n, v)
    return max(1, n)


def configure_threads(n: int | None = None) -> int:
    """Bound OpenCV's thread pool to ``n`` (default :func:`usable_cpus`); returns ``n``.

    OpenCV's own default is every core of the machine, which oversubscribes a PBS
    allocation on a shared node. Entry points call this once; library code never does.
    """
    import cv2

    n = max(1, int(n or usable_cpus()))
    cv2.setNumThreads(n)
    return n


def release_free_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim``;
    nothing elsewhere).

    Freed NumPy arrays below glibc's mmap threshold (which grows to 32 MB as large blocks
    are freed) stay in the heap of the thread that used them: with loader, finisher and
    split threads each keeping a few frames' worth, a predictor's resident memory crept up
    frame after frame. ``prediction_pipeline`` calls this after each finished frame.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def add_log_handler(
    log_file: str | os.PathLike | None = None, *, logger: str = "microbead", mode: str = "a"
) -> logging.Handler | None:
    """Attach a stderr handler (``log_file=None``) or a log-file handler to ``logger``.

    Every script logs under the ``microbead`` package logger, to stderr and to a log file in
    its output folder. The stderr handler is skipped (None is returned) when this logger or
    the root logger already writes to a stream, so scripts run inside one another (the demo,
    tests) never print a line twice. Remove with :func:`remove_log_handlers`.
    """
    target = logging.getLogger(logger)
    target.setLevel(logging.INFO)
    if log_file is None:
        streams = [h for h in logging.getLogger().handlers + target.handlers
                   if type(h) is logging.StreamHandler]
        if streams:
            return None
        handler: logging.Handler = logging.StreamHandler()
    else:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, mode=mode, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    target.addHandler(handler)
    return handler


def remove_log_handlers(handlers, *, logger: str = "microbead") -> None:
    """Detach and close handlers returned by :func:`add_log_handler` (None entries ignored)."""
    target = logging.getLogger(logger)
    for h in handlers:
        if h is not None:
            target.removeHandler(h)
            h.close()


@contextlib.contextmanager
def script_logging(log_file: str | os.PathLike | None = None, *, mode: str = "a"):
    """Log to stderr (and to ``log_file`` when given) inside the ``with`` block.

    Yields the list of handlers, so an entry point that learns its output folder later can
    ``handlers.append(add_log_handler(path))``; all of them are removed on exit.
    """
    handlers = [add_log_handler()]
    if log_file is not None:
        handlers.append(add_log_handler(log_file, mode=mode))
    try:
        yield handlers
    finally:
        remove_log_handlers(handlers)

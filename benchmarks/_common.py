"""What every benchmark records beside its numbers: the machine, the software, the load.

A figure without the machine it came from cannot be compared, so every benchmark writes
:func:`machine_info` into its JSON. CPUs are counted the way the pipeline counts them
(:func:`runtime.usable_cpus`: affinity, ``NCPUS``, ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def load_average() -> float | None:
    """One-minute load average (None where the OS has none): a busy machine slows timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def accelerators(backend: str) -> list[str]:
    """Accelerators the Keras ``backend`` sees; empty on a CPU-only machine."""
    try:
        if backend == "jax":
            import jax

            return [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()
                    if d.platform != "cpu"]
        if backend == "tensorflow":
            import tensorflow as tf

            return [tf.config.experimental.get_device_details(d).get("device_name", d.name)
                    for d in tf.config.list_physical_devices("GPU")]
        if backend == "torch":
            import torch

            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # provenance only: never fail a benchmark over it
        return [f"unknown ({type(exc).__name__})"]
    return []


def backend_version(backend: str) -> str | None:
    """Version of the Keras ``backend``'s framework (TensorFlow, JAX, PyTorch), if importable."""
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    if module is None:
        return None
    try:
        return __import__(module).__version__
    except Exception:  # provenance only
        return None


def machine_info(*, keras_backend: bool = False) -> dict:
    """Machine and software facts for a benchmark's JSON.

    ``keras_backend=True`` adds the Keras version, the backend, the backend framework's
    version and its accelerators (this imports Keras, so benchmarks of NumPy-only code leave
    it off).
    """
    import numpy as np

    info = {
        "node": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": runtime.usable_cpus(),
        "load_average_1min": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if keras_backend:
        import keras

        backend = keras.backend.backend()
        info.update(keras=keras.__version__, backend=backend,
                    backend_version=backend_version(backend),
                    accelerators=accelerators(backend))
        info["accelerator"] = info["accelerators"][0] if info["accelerators"] else "cpu"
    return info
